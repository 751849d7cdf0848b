"""Precision: which module groups run in NVFP4, FP8 or dense, and the compute dtype.

Two choices shape every weight. The compute dtype: bfloat16 runs FP4 weights through the FP4
ops (``fp4_gemm`` / ``fp4_grouped_gemm``), FP8 weights through the FP8 ops (``fp8_gemm`` /
``fp8_grouped_gemm``) and dense weights as BF16 matmuls; float32 (the CPU reference path)
dequantizes every weight once to float32 — the same values the kernels multiply by — and runs
float32 matmuls. And the ``PrecisionPolicy``: which format each module runs in, given how it is
stored (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


FP4 = "fp4"
FP8 = "fp8"
DENSE = "dense"


@dataclass(frozen=True)
class PrecisionPolicy:
    """The format each linear module runs in: "fp4" (NVFP4), "fp8" (DeepSeek FP8 blocks) or
    "dense" (the compute dtype), given how the checkpoint stores it.

    Parameters
    ----------
    fp4_groups : module groups that may run in NVFP4 (subset of ``GROUPS``: "attention",
        "dense_mlp", "shared_experts", "experts", "lm_head"). A module of these groups stored in
        NVFP4 runs in FP4; stored in FP8 blocks it is converted to NVFP4 (dequantized in float32,
        then quantized as ModelOpt does) only with ``requantize_fp8``; stored in BF16/FP16/FP32
        it is quantized only with ``quantize_dense``.
    quantize_dense : quantize BF16/FP16/FP32-stored modules of ``fp4_groups`` to NVFP4.
    dequantize_nvfp4 : modules *outside* ``fp4_groups`` that the checkpoint stores in NVFP4
        are dequantized to BF16 when True. Off by default: dequantizing cannot restore
        precision and costs 3.6× the memory.
    requantize_fp8 : FP8-stored modules of ``fp4_groups`` are converted to NVFP4 (lossy: the
        logits move by several percent). Off by default: FP8 modules run in FP8.
    fp8_groups : module groups whose BF16/FP16/FP32-stored modules are quantized to FP8 blocks
        at load (128×128 block scales, the DeepSeek formula: ``fp8_block_quantize``).
    dequantize_fp8 : FP8-stored modules that do not become FP4 run dense ("bf16").
    auto_fp8_attention : the memory planner may add "attention" to ``fp8_groups`` when dense
        attention does not fit the GPU budget beside the minimum expert cache (it says so in
        the plan).

    The MoE router, embedding and norms are never quantized: the router runs in float32 because
    expert choice is sensitive to small score changes.

    The default (``PrecisionPolicy()``) runs every module as stored: NVFP4 as FP4 (NVIDIA's
    DeepSeek-R1-FP4 export: MLPs and experts in FP4, attention and lm_head in BF16), FP8 blocks
    as FP8 (DeepSeek's own release), BF16 as BF16. ``"fp4"`` quantizes every group to NVFP4
    (smallest footprint), ``"fp8"`` quantizes every BF16-stored group but lm_head to FP8 and
    ``"bf16"`` runs everything dense.
    """

    fp4_groups: FrozenSet[str] = frozenset({DENSE_MLP, SHARED_EXPERTS, EXPERTS})
    quantize_dense: bool = False
    dequantize_nvfp4: bool = False
    requantize_fp8: bool = False
    fp8_groups: FrozenSet[str] = frozenset()
    dequantize_fp8: bool = False
    auto_fp8_attention: bool = True

    def __post_init__(self):
        for name in ("fp4_groups", "fp8_groups"):
            groups = frozenset(getattr(self, name))
            bad = sorted(groups - set(GROUPS))
            if bad:
                raise ValueError(f"precision: unknown module group(s) {bad} in {name} "
                                 f"(known: {', '.join(GROUPS)})")
            object.__setattr__(self, name, groups)

    @classmethod
    def parse(cls, spec: Union[None, str, "PrecisionPolicy"]) -> "PrecisionPolicy":
        """``None`` / "default", "fp4" (every group in NVFP4, FP8 and BF16 weights quantized),
        "fp8" (BF16-stored groups but lm_head quantized to FP8), "bf16" (all dense), or a
        PrecisionPolicy."""
        if spec is None or spec == "default":
            return cls()
        if isinstance(spec, PrecisionPolicy):
            return spec
        if spec == "fp4":
            return cls(frozenset(GROUPS), quantize_dense=True, requantize_fp8=True)
        if spec == "fp8":
            return cls(fp8_groups=frozenset(GROUPS) - {LM_HEAD})
        if spec == "bf16":
            return cls(frozenset(), dequantize_nvfp4=True, dequantize_fp8=True, auto_fp8_attention=False)
        raise ValueError(f"precision must be 'default', 'fp4', 'fp8', 'bf16' or a PrecisionPolicy, "
                         f"got {spec!r}")

    def runtime_format(self, module: str, stored_format: str) -> str:
        """"fp4", "fp8" or "dense": how ``module``, stored in ``stored_format``, runs."""
        group = module_group(module)
        if group is None:
            return DENSE
        if stored_format == NVFP4:
            return FP4 if group in self.fp4_groups or not self.dequantize_nvfp4 else DENSE
        if stored_format == FP8_BLOCK:
            if group in self.fp4_groups and self.requantize_fp8:
                return FP4
            return DENSE if self.dequantize_fp8 else FP8
        if group in self.fp4_groups and self.quantize_dense:
            return FP4
        return FP8 if group in self.fp8_groups else DENSE

    def runs_fp4(self, module: str, stored_format: str) -> bool:
        """True when ``module``, stored in ``stored_format``, runs as an NVFP4 weight."""
        return self.runtime_format(module, stored_format) == FP4

    def with_fp8(self, *groups: str) -> "PrecisionPolicy":
        """The same policy with ``groups`` added to ``fp8_groups``."""
        return replace(self, fp8_groups=self.fp8_groups | frozenset(groups))


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
