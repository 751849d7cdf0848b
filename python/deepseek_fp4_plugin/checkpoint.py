"""Checkpoint sources: where the model's tensors come from, in their stored form.

A source answers ``get_tensor(name)`` for any stored tensor and ``linear(module)`` for a
linear layer, returning its tensors in one of three stored formats, detected per module from
the tensors present (so mixed checkpoints work):

  nvfp4       weight uint8 [N, K/2], weight_scale float8_e4m3fn [N, K/16],
              weight_scale_2 float32 [], optional input_scale float32 []   (NVIDIA ModelOpt)
  fp8_block   weight float8_e4m3fn [N, K], weight_scale_inv float32 [ceil(N/b), ceil(K/b)]
  dense       weight bfloat16/float16/float32 [N, K]

Shapes and dtypes are checked against the expected [N, K], and scales for being finite and
non-negative (global scales: positive) when a layer is read; errors name the tensor and where
it is stored. ``StateDictCheckpoint`` serves tensors from memory (tests, freshly built
models); the safetensors-backed source lives in loader.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor

from .config import DeepseekV3Config
from .validation import check_linear_scales

NVFP4 = "nvfp4"
FP8_BLOCK = "fp8_block"
DENSE = "dense"

_DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class LinearTensors:
    """The stored tensors of one linear layer ``module`` (weight shape [n, k])."""

    module: str
    format: str                      # NVFP4, FP8_BLOCK or DENSE
    n: int
    k: int
    tensors: Dict[str, Tensor] = field(default_factory=dict)  # suffix ("weight", ...) → tensor
    bias: Optional[Tensor] = None


class CheckpointSource:
    """Base of every tensor source. Subclasses implement names(), _raw(name) and where(name)."""

    config: DeepseekV3Config

    def names(self) -> Iterable[str]:
        raise NotImplementedError

    def _raw(self, name: str) -> Tensor:
        raise NotImplementedError

    def where(self, name: str) -> str:
        """Human-readable location of a tensor (file name), for error messages."""
        return "checkpoint"

    def has(self, name: str) -> bool:
        return name in self._name_set()

    def _name_set(self) -> set:
        if not hasattr(self, "_names_cache"):
            self._names_cache = set(self.names())
        return self._names_cache

    def get_tensor(self, name: str, shape: Optional[Tuple[int, ...]] = None,
                   dtypes: Optional[Tuple[torch.dtype, ...]] = None) -> Tensor:
        """A stored tensor, checked against an expected shape and dtypes when given."""
        if not self.has(name):
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        t = self._raw(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.where(name)}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"config.json implies {tuple(shape)}")
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"{self.where(name)}: tensor {name!r} has dtype {t.dtype}, "
                             f"expected {' or '.join(map(str, dtypes))}")
        return t

    def linear_format(self, module: str) -> str:
        if self.has(module + ".weight_scale_inv"):
            return FP8_BLOCK
        if self.has(module + ".weight_scale") and self.has(module + ".weight_scale_2"):
            return NVFP4
        return DENSE

    def linear(self, module: str, n: int, k: int, block: int = 128) -> LinearTensors:
        """Tensors of linear layer ``module`` whose weight is [n, k], validated."""
        fmt = self.linear_format(module)
        w = module + ".weight"
        out = LinearTensors(module, fmt, n, k)
        if fmt == NVFP4:
            if k % 16:
                raise ValueError(f"{self.where(w)}: {w!r}: K = {k} is not a multiple of 16")
            out.tensors["weight"] = self.get_tensor(w, (n, k // 2), (torch.uint8,))
            out.tensors["weight_scale"] = self.get_tensor(module + ".weight_scale", (n, k // 16),
                                                          (torch.float8_e4m3fn,))
            s2 = self.get_tensor(module + ".weight_scale_2", None, (torch.float32,))
            if s2.numel() != 1:
                raise ValueError(f"{self.where(module + '.weight_scale_2')}: {module}.weight_scale_2 must hold one "
                                 f"value, has shape {tuple(s2.shape)}")
            out.tensors["weight_scale_2"] = s2.reshape(())
            if self.has(module + ".input_scale"):
                out.tensors["input_scale"] = self.get_tensor(module + ".input_scale", None, (torch.float32,))
        elif fmt == FP8_BLOCK:
            out.tensors["weight"] = self.get_tensor(w, (n, k), (torch.float8_e4m3fn,))
            want = (-(-n // block), -(-k // block))
            out.tensors["weight_scale_inv"] = self.get_tensor(module + ".weight_scale_inv", want, (torch.float32,))
        else:
            out.tensors["weight"] = self.get_tensor(w, (n, k), _DENSE_DTYPES)
        if self.has(module + ".bias"):
            out.bias = self.get_tensor(module + ".bias", (n,), _DENSE_DTYPES)
        check_linear_scales(out, self.where)   # a NaN or negative scale would load and emit garbage
        return out


class StateDictCheckpoint(CheckpointSource):
    """Tensors held in memory, keyed by their checkpoint names."""

    def __init__(self, config: DeepseekV3Config, tensors: Dict[str, Tensor]):
        config.validate("state dict config")
        self.config = config
        self._tensors = dict(tensors)

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def _raw(self, name: str) -> Tensor:
        return self._tensors[name]

    def where(self, name: str) -> str:
        return "state dict"
