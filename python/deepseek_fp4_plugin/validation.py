"""Checks of untrusted input that would otherwise turn into wrong numbers: quantization scales
read from a checkpoint, a tokenizer that does not fit the model.

Each check is one cheap pass (or less) over data that is being read anyway, and raises
ValueError naming the file, tensor or argument.
"""

from __future__ import annotations

import math
import os
import struct
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .checkpoint import LinearTensors
    from .tokenizer import Tokenizer

# E4M3 codes: 0x7F and 0xFF are NaN, 0x80..0xFF have the sign bit (0x80 is -0)
_E4M3_NAN = 0x7F
_E4M3_NEG_ZERO = 0x80


def _bad_global_scale(v: float, name: str, where: str) -> ValueError:
    return ValueError(f"{where}: tensor {name!r} = {v!r} must be a finite number > 0 "
                      f"(the checkpoint is corrupt)")


def check_global_scale(t: Tensor, name: str, where: str) -> None:
    """A float32 scalar scale (``weight_scale_2``, ``input_scale``) must be finite and > 0."""
    v = float(t.reshape(-1)[0]) if t.numel() == 1 else math.nan
    if not (math.isfinite(v) and v > 0):
        raise _bad_global_scale(v, name, where)


def check_expert_global_scales(source, layers: Sequence[int]) -> None:
    """The routed experts of MoE ``layers`` as a paged store reads them: straight from the
    safetensors files, never through CheckpointSource.linear. Checks every expert's
    weight_scale_2 / input_scale at open, one 4-byte read each (an expert's block scales are
    read only when it is paged in; the generation guard catches what they break)."""
    c = source.config
    by_file = {}
    for layer in layers:
        for e in range(c.n_routed_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix in ("weight_scale_2", "input_scale"):
                    name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.{suffix}"
                    if source.has(name):
                        info = source.tensor_info(name)
                        by_file.setdefault(info.file, []).append(info)
    for path, infos in by_file.items():
        with open(path, "rb") as f:
            for info in infos:
                if info.dtype != torch.float32 or info.nbytes != 4:
                    raise ValueError(f"{path}: {info.name!r} must be one float32, is {info.dtype} "
                                     f"{list(info.shape)}")
                (v,) = struct.unpack("<f", os.pread(f.fileno(), 4, info.offset))
                if not (math.isfinite(v) and v > 0):
                    raise _bad_global_scale(v, info.name, str(path))


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
