"""Build: CMake compiles the C++/CUDA core and the pybind11 module deepseek_fp4_plugin._C.

Environment knobs:
  DSFP4_WITH_CUDA   AUTO (default: CUDA kernels when nvcc is found), ON or OFF
  DSFP4_CUDA_ARCHS  CMake CUDA architectures, default "80;90a-real"
  DSFP4_BUILD_DIR   CMake build directory, default ./build (ctest runs there)
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("DSFP4_BUILD_DIR", ROOT / "build")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DDSFP4_PYTHON_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDSFP4_WITH_CUDA={os.environ.get('DSFP4_WITH_CUDA', 'AUTO')}",
            f"-DDSFP4_CUDA_ARCHS={os.environ.get('DSFP4_CUDA_ARCHS', '80;90a-real')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and str(ROOT) not in cache.read_text(errors="ignore"):
            cache.unlink()  # a build directory configured for another checkout
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("deepseek_fp4_plugin._C")],
    cmdclass={"build_ext": CMakeBuild},
)
