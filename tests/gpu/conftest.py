"""Gates every test under tests/gpu: marked `gpu`, skipped without a CUDA device or kernels."""

import os
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    from deepseek_fp4_plugin import has_cuda_kernels

    if not has_cuda_kernels():
        return "the extension was built without CUDA kernels"
    if torch.cuda.get_device_capability() < (8, 0):
        return "needs compute capability 8.0 or newer"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if _HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if not checked:
            reason, checked = _skip_reason(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def quick():
    """DSFP4_QUICK=1 shrinks problem sizes (for runs under compute-sanitizer)."""
    return os.environ.get("DSFP4_QUICK", "0") == "1"
