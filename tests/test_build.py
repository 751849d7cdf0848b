"""The installed extension matches the machine: CUDA kernels are compiled wherever nvcc exists."""

import glob
import os
import shutil

import deepseek_fp4_plugin as dsfp4


def _nvcc_present() -> bool:
    if shutil.which("nvcc"):
        return True
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + glob.glob("/usr/local/cuda-*")
    return any(r and os.path.exists(os.path.join(r, "bin", "nvcc")) for r in roots)


def test_cuda_kernels_built_when_nvcc_is_available():
    if os.environ.get("DSFP4_WITH_CUDA", "AUTO").upper() == "OFF":
        assert not dsfp4.has_cuda_kernels()
        return
    assert dsfp4.has_cuda_kernels() == _nvcc_present()
