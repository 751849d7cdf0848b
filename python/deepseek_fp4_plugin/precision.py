"""Precision: which module groups run in NVFP4, and the compute dtype.

Two choices shape every weight. The compute dtype: bfloat16 runs FP4 weights through the FP4
ops (``fp4_gemm`` / ``fp4_grouped_gemm``) and dense weights as BF16 matmuls; float32 (the CPU
reference path) dequantizes every weight once to float32 — the same values the FP4 kernels
multiply by — and runs float32 matmuls. And the ``PrecisionPolicy``: which module groups run
in NVFP4 and how FP8-block and BF16 weights get there (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional, Union

import torch

from .checkpoint import FP8_BLOCK, NVFP4

# module groups the precision policy speaks about
ATTENTION = "attention"
DENSE_MLP = "dense_mlp"
SHARED_EXPERTS = "shared_experts"
EXPERTS = "experts"
LM_HEAD = "lm_head"
GROUPS = (ATTENTION, DENSE_MLP, SHARED_EXPERTS, EXPERTS, LM_HEAD)

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def module_group(module: str) -> Optional[str]:
    """Precision group of a linear module name; None for the MoE router (always float32)."""
    if module == "lm_head":
        return LM_HEAD
    if ".self_attn." in module:
        return ATTENTION
    if ".mlp.experts." in module:
        return EXPERTS
    if ".mlp.shared_experts." in module:
        return SHARED_EXPERTS
    if module.endswith(".mlp.gate"):
        return None
    if ".mlp." in module:
        return DENSE_MLP
    raise ValueError(f"unknown linear module {module!r}")


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which linear modules run in NVFP4 and how weights stored otherwise get there.

    Parameters
    ----------
    fp4_groups : module groups that run in NVFP4 (subset of ``GROUPS``: "attention",
        "dense_mlp", "shared_experts", "experts", "lm_head"). A module in these groups runs
        in FP4 when stored in NVFP4; when stored in FP8 block format it is converted to
        NVFP4 (dequantized in float32, then quantized as ModelOpt does); when stored in
        BF16/FP16/FP32 it is quantized only if ``quantize_dense``.
    quantize_dense : quantize BF16/FP16/FP32-stored modules of ``fp4_groups`` to NVFP4.
    dequantize_nvfp4 : modules *outside* ``fp4_groups`` that the checkpoint stores in NVFP4
        are dequantized to BF16 when True. Off by default: dequantizing cannot restore
        precision and costs 3.6× the memory.

    FP8-block modules outside ``fp4_groups`` are always dequantized to BF16. The MoE router,
    embedding and norms are never quantized: the router runs in float32 because expert
    choice is sensitive to small score changes.

    The default (``PrecisionPolicy()``) puts the MLPs and experts — 96% of DeepSeek-V3's
    parameters — in FP4 and keeps attention and lm_head as stored, which is what NVIDIA's
    DeepSeek-R1-FP4 export does; BF16 checkpoints run as stored. ``"fp4"`` quantizes every
    group (smallest footprint), ``"bf16"`` runs everything dense.
    """

    fp4_groups: FrozenSet[str] = frozenset({DENSE_MLP, SHARED_EXPERTS, EXPERTS})
    quantize_dense: bool = False
    dequantize_nvfp4: bool = False

    def __post_init__(self):
        groups = frozenset(self.fp4_groups)
        bad = sorted(groups - set(GROUPS))
        if bad:
            raise ValueError(f"precision: unknown module group(s) {bad} (known: {', '.join(GROUPS)})")
        object.__setattr__(self, "fp4_groups", groups)

    @classmethod
    def parse(cls, spec: Union[None, str, "PrecisionPolicy"]) -> "PrecisionPolicy":
        """``None`` / "default", "fp4" (every group, BF16 weights quantized), "bf16" (all dense),
        or a PrecisionPolicy."""
        if spec is None or spec == "default":
            return cls()
        if isinstance(spec, PrecisionPolicy):
            return spec
        if spec == "fp4":
            return cls(frozenset(GROUPS), quantize_dense=True)
        if spec == "bf16":
            return cls(frozenset(), dequantize_nvfp4=True)
        raise ValueError(f"precision must be 'default', 'fp4', 'bf16' or a PrecisionPolicy, got {spec!r}")

    def runs_fp4(self, module: str, stored_format: str) -> bool:
        """True when ``module``, stored in ``stored_format``, runs as an NVFP4 weight."""
        group = module_group(module)
        if group is None:
            return False
        if stored_format == NVFP4:
            return group in self.fp4_groups or not self.dequantize_nvfp4
        if stored_format == FP8_BLOCK:
            return group in self.fp4_groups
        return group in self.fp4_groups and self.quantize_dense


def resolve_compute_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA unless ``dtype`` says otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        dtype = names[dtype]
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype
