"""Stored tensors → runtime weights, shared by the resident and the paged store.

``WeightConverter`` reads a ``CheckpointSource`` and builds what the model multiplies by, as
the ``PrecisionPolicy`` and the compute dtype say: NVFP4 weights repacked into the tiled
kernel layout (``Fp4Linear``), FP8-block weights kept as they are (``Fp8Linear``), converted to
NVFP4 or dequantized, dense weights cast or quantized (NVFP4 or FP8 blocks); gate+up and
q_a+kv_a fused; kv_b split per head for the absorbed MLA form.
Tensors are converted on ``device`` (the GPU when there is one: conversion is fastest there).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import fp8_ops, ops
from .checkpoint import FP8_BLOCK, NVFP4, CheckpointSource, LinearTensors
from .config import DeepseekV3Config
from .fp8_ops import Fp8Weight
from .ops import Fp4Weight
from .precision import FP4, FP8, PrecisionPolicy, module_group
from .weights import (AttentionWeights, DenseLinear, DenseRoutedExperts, Fp4Linear, Fp4RoutedExperts, Fp8KvB,
                      Fp8Linear, Fp8RoutedExperts, LayerWeights, Linear, MlpWeights, MoeWeights,
                      RoutedExperts, fuse_linears)


class WeightConverter:
    """Builds runtime weights from ``source`` on ``device``.

    Attributes: ``formats`` records, per linear module converted so far, its runtime format
    ("fp4", "fp8" or "dense").
    """

    def __init__(self, source: CheckpointSource, device: torch.device, compute_dtype: torch.dtype,
                 policy: PrecisionPolicy):
        self.source, self.device, self.compute_dtype, self.policy = source, device, compute_dtype, policy
        self.config: DeepseekV3Config = source.config
        self.block = getattr(getattr(source, "quant", None), "weight_block_size", (128, 128))[0]
        self.shapes = linear_shapes(self.config)
        self.formats: Dict[str, str] = {}

    # ---- tensors and linears ---------------------------------------------------------------
    def dense_tensor(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
        t = self.source.get_tensor(name, shape, (torch.bfloat16, torch.float16, torch.float32))
        return owned(t.to(self.device).to(dtype).contiguous(), t)

    def linear(self, module: str) -> Linear:
        n, k = self.shapes[module]
        lt = self.source.linear(module, n, k, self.block)
        lin = self.to_linear(lt)
        self.formats[module] = "fp4" if lin.fp4 else "fp8" if lin.fp8 else "dense"
        return lin

    def to_linear(self, lt: LinearTensors) -> Linear:
        """Stored tensors → runtime linear, as the policy and compute dtype say."""
        dev, cdt = self.device, self.compute_dtype
        bias = None if lt.bias is None else owned(lt.bias.to(dev).to(cdt), lt.bias)
        fmt = self.policy.runtime_format(lt.module, lt.format)
        if fmt == FP4:
            w = to_fp4(lt, dev, self.block)
            if cdt == torch.float32:
                # float32 reference path: the exact values the FP4 kernels would use
                return DenseLinear(w.dequantize(torch.float32), bias, fp4=True)
            return Fp4Linear(w, bias)
        if fmt == FP8 and fp8_runnable(lt, dev, self.block):
            w = to_fp8(lt, dev)
            if cdt == torch.float32:
                # float32 reference path: e4m3 × block scale, as the FP8 kernels multiply
                return DenseLinear(w.dequantize(torch.float32), bias, fp8=True)
            return Fp8Linear(w, bias)
        return DenseLinear(to_dense(lt, dev, cdt, self.block), bias)

    def mlp(self, prefix: str) -> MlpWeights:
        gate_up = fuse_linears([self.linear(f"{prefix}.gate_proj"), self.linear(f"{prefix}.up_proj")])
        return MlpWeights(gate_up, self.linear(f"{prefix}.down_proj"))

    # ---- model-wide ------------------------------------------------------------------------
    def embedding(self) -> Tensor:
        c = self.config
        return self.dense_tensor("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), self.compute_dtype)

    def final_norm(self) -> Tensor:
        return self.dense_tensor("model.norm.weight", (self.config.hidden_size,), torch.float32)

    def lm_head(self, embedding: Optional[Tensor] = None) -> Linear:
        if self.config.tie_word_embeddings:
            self.formats["lm_head"] = "dense"
            return DenseLinear(embedding if embedding is not None else self.embedding())
        return self.linear("lm_head")

    # ---- one layer -------------------------------------------------------------------------
    def attention(self, layer: int) -> AttentionWeights:
        c = self.config
        a = f"model.layers.{layer}.self_attn"
        attn = AttentionWeights(None, None, None, None, None, None, None, None, None, None)
        if c.q_lora_rank is not None:
            attn.qkv_a = fuse_linears([self.linear(f"{a}.q_a_proj"), self.linear(f"{a}.kv_a_proj_with_mqa")])
            attn.q_a_norm = self.dense_tensor(f"{a}.q_a_layernorm.weight", (c.q_lora_rank,), torch.float32)
            attn.q_b = self.linear(f"{a}.q_b_proj")
        else:
            attn.q = self.linear(f"{a}.q_proj")
            attn.kv_a = self.linear(f"{a}.kv_a_proj_with_mqa")
        attn.kv_a_norm = self.dense_tensor(f"{a}.kv_a_layernorm.weight", (c.kv_lora_rank,), torch.float32)
        attn.kv_b = self.linear(f"{a}.kv_b_proj")
        split_kv_b(attn, c, self.compute_dtype)
        attn.o = self.linear(f"{a}.o_proj")
        return attn

    def layer(self, layer: int, experts: bool = True) -> LayerWeights:
        """The weights of ``layer``; with ``experts=False`` a MoE layer's ``experts`` is None
        (a paged store serves them)."""
        c = self.config
        p = f"model.layers.{layer}"
        h = c.hidden_size
        lw = LayerWeights(self.dense_tensor(f"{p}.input_layernorm.weight", (h,), torch.float32),
                          self.dense_tensor(f"{p}.post_attention_layernorm.weight", (h,), torch.float32),
                          self.attention(layer), None, None)
        m = f"{p}.mlp"
        if not c.is_moe_layer(layer):
            lw.mlp = self.mlp(m)
            return lw
        e = c.n_routed_experts
        router = self.dense_tensor(f"{m}.gate.weight", (e, h), torch.float32)
        if self.source.has(f"{m}.gate.e_score_correction_bias"):
            bias = self.dense_tensor(f"{m}.gate.e_score_correction_bias", (e,), torch.float32)
        else:
            bias = torch.zeros(e, dtype=torch.float32, device=self.device)
        self.formats[f"{m}.gate"] = "dense"
        shared = self.mlp(f"{m}.shared_experts") if c.n_shared_experts > 0 else None
        lw.moe = MoeWeights(router, bias, self.routed_experts(m) if experts else None, shared)
        return lw

    def expert_modules(self, prefix: str):
        return [f"{prefix}.experts.{e}.{proj}" for e in range(self.config.n_routed_experts)
                for proj in ("gate_proj", "up_proj", "down_proj")]

    def experts_run_fp4(self, prefix: str) -> bool:
        """True when the routed experts under ``prefix`` run as stacked NVFP4 experts."""
        return self.compute_dtype != torch.float32 and all(
            self.policy.runs_fp4(m, self.source.linear_format(m)) for m in self.expert_modules(prefix))

    def experts_run_fp8(self, prefix: str) -> bool:
        """True when the routed experts under ``prefix`` run as stacked FP8 experts."""
        c = self.config
        return (self.compute_dtype != torch.float32 and c.hidden_size % 16 == 0
                and c.moe_intermediate_size % 16 == 0
                and all(self.policy.runtime_format(m, self.source.linear_format(m)) == FP8
                        for m in self.expert_modules(prefix)))

    def routed_experts(self, prefix: str) -> RoutedExperts:
        c = self.config
        stack = (Fp4RoutedExperts if self.experts_run_fp4(prefix) else
                 Fp8RoutedExperts if self.experts_run_fp8(prefix) else None)
        linear = Fp4Linear if stack is Fp4RoutedExperts else Fp8Linear
        if stack is not None:
            # fill the stacked buffers expert by expert: peak memory stays one expert above the result
            experts = None
            for e in range(c.n_routed_experts):
                mlp = self.mlp(f"{prefix}.experts.{e}")
                if type(mlp.gate_up) is not linear or type(mlp.down) is not linear:
                    return self.dense_experts(prefix)   # e.g. FP8 blocks other than 128×128
                if experts is None:
                    experts = stack.allocate(c.n_routed_experts, mlp.gate_up.weight, mlp.down.weight)
                experts.set_expert(e, mlp.gate_up.weight, mlp.down.weight)
            return experts
        return self.dense_experts(prefix)

    def dense_experts(self, prefix: str) -> DenseRoutedExperts:
        gate_up, down = [], []
        for e in range(self.config.n_routed_experts):
            mlp = self.mlp(f"{prefix}.experts.{e}")
            gate_up.append(mlp.gate_up.dense_weight(self.compute_dtype))
            down.append(mlp.down.dense_weight(self.compute_dtype))
        fp4 = all(self.formats[m] == "fp4" for m in self.expert_modules(prefix))
        return DenseRoutedExperts(torch.stack(gate_up), torch.stack(down), fp4)


def split_kv_b(attn: AttentionWeights, c: DeepseekV3Config, dtype: torch.dtype) -> None:
    """w_uk / w_uv for the absorbed form: views of a dense kv_b, a dequantized copy of an FP4
    one; an FP8 kv_b whose heads are whole scale blocks becomes an ``Fp8KvB`` (the absorbed
    products read FP8, w_uk / w_uv stay None)."""
    kv_b = attn.kv_b
    if type(kv_b) is Fp8Linear and Fp8KvB.fits(kv_b.n, kv_b.k, c.num_attention_heads, c.qk_nope_head_dim,
                                                   c.v_head_dim) and kv_b.weight.split_rows == 0:
        attn.kv_b = Fp8KvB(kv_b.weight, c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, kv_b.bias)
        attn.w_uk = attn.w_uv = None
        return
    w = attn.kv_b.dense_weight(dtype)
    w = w.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
    attn.w_uk = w[:, : c.qk_nope_head_dim]                 # [H, nope, kv_lora]
    attn.w_uv = w[:, c.qk_nope_head_dim:]                  # [H, v, kv_lora]


def to_fp4(lt: LinearTensors, dev: torch.device, declared: int = 128) -> Fp4Weight:
    t = lt.tensors
    if lt.format == NVFP4:
        gs = t["weight_scale_2"]
        return Fp4Weight.from_modelopt(t["weight"].to(dev), t["weight_scale"].to(dev),
                                       owned(gs.to(dev).to(torch.float32), gs))
    if lt.format == FP8_BLOCK:
        w, s = t["weight"].to(dev), t["weight_scale_inv"].to(dev)
        block = fp8_block_size(lt, declared)
        packed, scale, gs = torch.ops.dsfp4.fp8_block_to_nvfp4(w, s, block[0], block[1])
        return Fp4Weight.from_modelopt(packed, scale, gs)
    return Fp4Weight.from_float(t["weight"].to(dev))


def fp8_runnable(lt: LinearTensors, dev: torch.device, declared: int = 128) -> bool:
    """True when the FP8 kernels can run this weight: 128×128 blocks (stored FP8) and, on CUDA,
    K a multiple of 16. Otherwise it runs dense."""
    if lt.format == FP8_BLOCK and fp8_block_size(lt, declared) != (fp8_ops.BLOCK, fp8_ops.BLOCK):
        return False
    if lt.format == NVFP4:
        return False
    return dev.type != "cuda" or lt.k % 16 == 0


def to_fp8(lt: LinearTensors, dev: torch.device) -> Fp8Weight:
    """FP8 blocks as stored, or a dense weight quantized to them (fp8_block_quantize)."""
    t = lt.tensors
    if lt.format == FP8_BLOCK:
        w, s = t["weight"], t["weight_scale_inv"]
        return Fp8Weight(owned(w.to(dev).contiguous(), w), owned(s.to(dev).contiguous(), s))
    return Fp8Weight.from_float(t["weight"].to(dev))


def to_dense(lt: LinearTensors, dev: torch.device, dtype: torch.dtype, declared: int = 128) -> Tensor:
    t = lt.tensors
    if lt.format == NVFP4:
        w = torch.ops.dsfp4.nvfp4_dequantize(t["weight"].to(dev), t["weight_scale"].to(dev),
                                             t["weight_scale_2"].to(dev).to(torch.float32), torch.float32)
        return w.to(dtype)
    if lt.format == FP8_BLOCK:
        block = fp8_block_size(lt, declared)
        return ops.fp8_block_dequantize(t["weight"].to(dev), t["weight_scale_inv"].to(dev), *block).to(dtype)
    return owned(t["weight"].to(dev).to(dtype).contiguous(), t["weight"])


def owned(t: Tensor, stored: Tensor) -> Tensor:
    """``t``, copied when it still shares memory with the stored tensor it was made from. On
    the CPU a stored tensor is a view of the checkpoint's memory map, and a loaded weight must
    not depend on the file staying as it was (a shard truncated after loading would be a SIGBUS
    at the next read)."""
    return t.clone() if t.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr() else t


def fp8_block_size(lt: LinearTensors, declared: int = 128) -> Tuple[int, int]:
    """Square FP8 block size: the declared one (config.json weight_block_size) when the scale
    shape fits it, else the one the scale shape implies."""
    rows, cols = lt.tensors["weight_scale_inv"].shape
    for b in (declared, 128, 64, 256, 32, 16, 512):
        if -(-lt.n // b) == rows and -(-lt.k // b) == cols:
            return b, b
    raise ValueError(f"{lt.module}.weight_scale_inv has shape {(rows, cols)}, which no square block size "
                     f"fits for a [{lt.n}, {lt.k}] weight")


def linear_shapes(c: DeepseekV3Config) -> Dict[str, Tuple[int, int]]:
    """module → (n, k) for every linear layer the config implies."""
    from .loader import linear_shapes as shapes  # the loader owns the naming scheme

    return dict(shapes(c))


# ---------------------------------------------------------------------------------------
# sizes, from shapes and stored formats alone (no tensor data is read)


def linear_bytes(source: CheckpointSource, policy: PrecisionPolicy, module: str, n: int, k: int,
                 compute_dtype: torch.dtype) -> int:
    """Device bytes of one converted linear (plus w_uk / w_uv for an FP4 or FP8 kv_b)."""
    elt = torch.tensor([], dtype=compute_dtype).element_size()
    stored = source.linear_format(module)
    if module_group(module) is None:
        return n * k * 4
    fmt = policy.runtime_format(module, stored)
    if compute_dtype == torch.float32:
        return n * k * elt
    kv_b = module.endswith(".kv_b_proj")
    if fmt == FP4:
        words, sbytes = ops.tiled_sizes(n, k)
        total = words * 4 + sbytes + 4 * math.ceil(n / 16)
        return total + (n * k * elt if kv_b else 0)   # w_uk / w_uv for the absorbed form, dequantized
    declared = getattr(getattr(source, "quant", None), "weight_block_size", (128, 128))
    if fmt == FP8 and (stored != FP8_BLOCK or tuple(declared) == (fp8_ops.BLOCK, fp8_ops.BLOCK)):
        total = n * k + 4 * math.ceil(n / 128) * math.ceil(k / 128)
        if kv_b:
            c = source.config
            h, nope, v = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
            if Fp8KvB.fits(n, k, h, nope, v):   # W_uk transposed, in FP8
                total += h * k * nope + 4 * h * math.ceil(k / 128) * (nope // 128)
            else:
                total += n * k * elt
        return total
    return n * k * elt


def estimate_bytes(source: CheckpointSource, policy: Union[None, str, PrecisionPolicy] = None,
                   compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Device bytes a ResidentWeightStore would hold for ``source``."""
    policy = PrecisionPolicy.parse(policy)
    c = source.config
    elt = torch.tensor([], dtype=compute_dtype).element_size()
    total = c.vocab_size * c.hidden_size * elt
    for module, (n, k) in linear_shapes(c).items():
        total += linear_bytes(source, policy, module, n, k, compute_dtype)
    return total
