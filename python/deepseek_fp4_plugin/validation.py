"""Checks of untrusted input that would otherwise turn into wrong numbers: quantization scales
read from a checkpoint, a tokenizer that does not fit the model.

Each check is one cheap pass (or less) over data that is being read anyway, and raises
ValueError naming the file, tensor or argument.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .checkpoint import LinearTensors
    from .tokenizer import Tokenizer

# E4M3 codes: 0x7F and 0xFF are NaN, 0x80..0xFF have the sign bit (0x80 is -0)
_E4M3_NAN = 0x7F
_E4M3_NEG_ZERO = 0x80


def check_global_scale(t: Tensor, name: str, where: str) -> None:
    """A float32 scalar scale (``weight_scale_2``, ``input_scale``) must be finite and > 0."""
    v = float(t.reshape(-1)[0]) if t.numel() == 1 else math.nan
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{where}: tensor {name!r} = {v!r} must be a finite number > 0 "
                         f"(the checkpoint is corrupt)")


def check_block_scales(t: Tensor, name: str, where: str) -> None:
    """Per-block scales (float8_e4m3fn ``weight_scale`` or float32 ``weight_scale_inv``) must be
    finite and >= 0 (zero is what an all-zero block stores). One reduction in the usual case."""
    if t.numel() == 0:
        return
    if t.dtype == torch.float8_e4m3fn:
        codes = t.view(torch.uint8)
        if int(codes.max()) < _E4M3_NAN:   # the usual case, one max pass: no NaN, no sign bit
            return
        bad = (codes == _E4M3_NAN) | (codes > _E4M3_NEG_ZERO)   # 0xFF is NaN too; -0 is harmless
        if not bool(bad.any()):
            return
    else:
        lo, hi = (float(v) for v in torch.aminmax(t.float()))
        if math.isfinite(lo) and math.isfinite(hi) and lo >= 0:
            return
        tf = t.float()
        bad = ~torch.isfinite(tf) | (tf < 0)
    first = torch.nonzero(bad.reshape(t.shape))[0].tolist()
    value = float(t[tuple(first)].float())
    raise ValueError(f"{where}: tensor {name!r} holds {int(bad.sum())} NaN, infinite or negative block "
                     f"scale(s), the first {value!r} at {first} (the checkpoint is corrupt)")


def check_linear_scales(lt: "LinearTensors", where: Callable[[str], str]) -> None:
    """Every scale of one stored linear layer (see checkpoint.LinearTensors); ``where(name)``
    says where a tensor is stored."""
    for suffix, t in lt.tensors.items():
        name = f"{lt.module}.{suffix}"
        if suffix in ("weight_scale_2", "input_scale"):
            check_global_scale(t, name, where(name))
        elif suffix in ("weight_scale", "weight_scale_inv"):
            check_block_scales(t, name, where(name))


def check_tokenizer_fits(tokenizer: "Tokenizer", vocab_size: int) -> None:
    """Every id the tokenizer can produce must index the model's embedding."""
    top = tokenizer.max_token_id()
    if top >= vocab_size:
        raise ValueError(f"{tokenizer.file}: token ids go up to {top}, beyond the model's vocabulary "
                         f"(config.json vocab_size = {vocab_size}); this tokenizer does not belong to "
                         f"this model")
