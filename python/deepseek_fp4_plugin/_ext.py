"""Loads the compiled core (deepseek_fp4_plugin._C)."""

import torch  # noqa: F401  (loads the CUDA runtime the extension may share)

from . import _C  # type: ignore[attr-defined]

DTYPE_TO_C = {
    torch.float32: _C.DType.float32,
    torch.float16: _C.DType.float16,
    torch.bfloat16: _C.DType.bfloat16,
    torch.float8_e4m3fn: _C.DType.float8_e4m3fn,
    torch.uint8: _C.DType.uint8,
    torch.int32: _C.DType.int32,
}


def has_cuda_kernels() -> bool:
    """True when the extension was built with nvcc (CUDA kernels present)."""
    return bool(_C.built_with_cuda())


def stream_of(t: torch.Tensor) -> int:
    """Raw handle of the current torch stream on t's device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
