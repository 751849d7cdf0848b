"""Weight stores: the one interface through which the model reaches every weight.

The model never holds a weight. Each forward asks the store for the weights of a layer
(``acquire_layer(l)``), uses them, and hands them back (``release_layer(l)``). Two stores
implement it: ``ResidentWeightStore`` (resident.py) keeps everything on the device, so acquire
returns a prebuilt bundle; ``PagedWeightStore`` (paged.py) keeps what fits resident and pages
the rest (GPU ↔ pinned host ↔ SSD): layer units through a ring of layer slots, routed experts
through an expert cache reached by a device-side expert → unit table. Both build their
runtime weights with ``WeightConverter`` (conversion.py); ``PrecisionPolicy`` lives in
precision.py.

Host points
-----------
Some GPU work cannot start before the host has acted (a paged layer's slot must be filled, a
MoE layer's selected experts made resident). The forward is a generator that yields a
``HostPoint`` at each such place; ``run_host_points`` (or a sequence of CUDA graphs, one per
stretch between points) drives it and calls ``store.resolve(point)`` at each one. A resident
store yields none.

What the model asks for
-----------------------
``embedding()``, ``final_norm()``, ``lm_head()``, and per layer a ``LayerWeights`` bundle:
- dense tensors (RMSNorm weights, router weight and correction bias; float32)
- linear layers as callables ``y = linear(x)`` (``Linear``: FP4 GEMM or dense matmul)
- gate_proj + up_proj of every MLP fused into one ``gate_up`` GEMM, and q_a_proj +
  kv_a_proj_with_mqa into one ``qkv_a`` GEMM (``Fp4Weight.concat_rows``, exact: each part keeps
  its global scale per 16-row tile)
- the routed experts of a layer as one stacked, grouped-GEMM-ready ``RoutedExperts``
- kv_b_proj split per head into ``w_uk`` [H, qk_nope, kv_lora] and ``w_uv`` [H, v, kv_lora]
  for the absorbed MLA form used in decode

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Generator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DeepseekV3Config
from .fp8_ops import Fp8Weight
from .ops import Fp4Weight
from .precision import (ATTENTION, DENSE_MLP, EXPERTS, GROUPS, LM_HEAD, SHARED_EXPERTS,  # noqa: F401
                        PrecisionPolicy, module_group, resolve_compute_dtype)

# ---------------------------------------------------------------------------------------
# linear layers


class Linear:
    """A callable linear layer y[..., n] = x[..., k] · Wᵀ (+ bias), output in the compute dtype."""

    n: int
    k: int
    fp4: bool   # True when W holds NVFP4 values (FP4 kernels, or their float32 dequantization)
    fp8: bool = False   # True when W holds FP8 block values (FP8 kernels, or their dequantization)

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        """W [n, k] exactly as this layer multiplies by it."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class Fp4Linear(Linear):
    """NVFP4 weight run by ``fp4_gemm`` (bfloat16 activations, float32 accumulation)."""

    def __init__(self, weight: Fp4Weight, bias: Optional[Tensor] = None):
        self.weight, self.bias = weight, bias
        self.n, self.k, self.fp4 = weight.n, weight.k, True

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(torch.bfloat16)
        if not x.is_contiguous() and not (x.dim() == 2 and x.stride(1) == 1):
            x = x.contiguous()   # the GEMM takes strided rows only in 2-D
        y = self.weight(x)                                                         # [..., n] bf16
        return y if self.bias is None else y + self.bias

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        return self.weight.dequantize(dtype)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class Fp8Linear(Linear):
    """DeepSeek FP8 block weight run by ``fp8_gemm`` (bfloat16 activations, float32 accumulation)."""

    fp4, fp8 = False, True

    def __init__(self, weight: Fp8Weight, bias: Optional[Tensor] = None):
        self.weight, self.bias = weight, bias
        self.n, self.k = weight.n, weight.k

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(torch.bfloat16)
        if not x.is_contiguous() and not (x.dim() == 2 and x.stride(1) == 1):
            x = x.contiguous()   # the GEMM takes strided rows only in 2-D
        y = self.weight(x)                                                         # [..., n] bf16
        return y if self.bias is None else y + self.bias

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        return self.weight.dequantize(dtype)

    def map_tensors(self, fn) -> "Fp8Linear":
        """The same layer over fn(tensor) of each tensor (paging packs layers this way)."""
        w = self.weight
        return Fp8Linear(Fp8Weight(fn(w.weight), fn(w.scale), w.split_rows),
                         None if self.bias is None else fn(self.bias))

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class Fp8KvB(Fp8Linear):
    """kv_b_proj in FP8 whose absorbed-MLA products also read FP8: per head h, q_c = q_nope ·
    W_uk[h] and out = o_c · W_uv[h]ᵀ are grouped FP8 GEMMs (one group per head). W_uv[h] are
    views of kv_b's own rows; W_uk[h]ᵀ is a transposed copy (exact: bytes and block scales
    transpose together), half of kv_b. Needs qk_nope_head_dim and v_head_dim multiples of 128,
    so each head's rows are whole scale blocks."""

    def __init__(self, weight: Fp8Weight, heads: int, nope: int, v: int, bias: Optional[Tensor] = None,
                 uk_t: Optional[Tensor] = None, uk_t_scale: Optional[Tensor] = None):
        super().__init__(weight, bias)
        self.heads, self.nope, self.v = heads, nope, v
        c = weight.k
        b, kb = 128, weight.scale.shape[1]
        w = weight.weight.view(heads, nope + v, c)                                  # [H, Dn+Dv, C]
        s = weight.scale.view(heads, (nope + v) // b, kb)                           # [H, (Dn+Dv)/128, C/128]
        self.uv, self.uv_scale = w[:, nope:], s[:, nope // b:]              # [H, Dv, C], [H, Dv/128, C/128]
        if uk_t is None:
            uk_t = w[:, :nope].transpose(1, 2).contiguous()                         # [H, C, Dn]
            uk_t_scale = s[:, :nope // b].transpose(1, 2).contiguous()              # [H, C/128, Dn/128]
        self.uk_t, self.uk_t_scale = uk_t, uk_t_scale
        self._steps = torch.arange(heads + 1, dtype=torch.int32, device=weight.device)
        self._heads = self._steps[:heads]

    @staticmethod
    def fits(n: int, c: int, heads: int, nope: int, v: int) -> bool:
        return n == heads * (nope + v) and nope % 128 == 0 and v % 128 == 0 and c % 16 == 0 and nope % 16 == 0

    def _per_head(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        """x [B, T, H, K] → [B, T, H, N], head h multiplied by weight[h] [N, K]."""
        B, T, H, K = x.shape
        rows = B * T
        xh = x.permute(2, 0, 1, 3).reshape(H * rows, K).to(torch.bfloat16).contiguous()   # [H·B·T, K]
        y = torch.ops.dsfp4.fp8_grouped_gemm(xh, self._steps * rows, self._heads, weight, scale, rows)
        return y.view(H, B, T, -1).permute(1, 2, 0, 3)                              # [B, T, H, N]

    def q_to_latent(self, q_nope: Tensor) -> Tensor:
        """q_nope [B, T, H, Dn] → q_nope · W_uk [B, T, H, C]."""
        return self._per_head(q_nope, self.uk_t, self.uk_t_scale)

    def latent_to_v(self, o_c: Tensor) -> Tensor:
        """o_c [B, T, H, C] → o_c · W_uvᵀ [B, T, H, Dv]."""
        return self._per_head(o_c, self.uv, self.uv_scale)

    def map_tensors(self, fn) -> "Fp8KvB":
        w = self.weight
        return Fp8KvB(Fp8Weight(fn(w.weight), fn(w.scale), w.split_rows), self.heads, self.nope, self.v,
                      None if self.bias is None else fn(self.bias), fn(self.uk_t), fn(self.uk_t_scale))

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.uk_t.numel() + self.uk_t_scale.numel() * 4


class DenseLinear(Linear):
    """Dense weight [n, k] in the compute dtype; ``fp4`` / ``fp8`` record that it holds NVFP4 /
    FP8-block values (the float32 reference path)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, fp4: bool = False, fp8: bool = False):
        self.weight, self.bias = weight, bias
        self.n, self.k = weight.shape
        self.fp4, self.fp8 = fp4, fp8

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        return self.weight.to(dtype)

    @property
    def nbytes(self) -> int:
        b = self.weight.numel() * self.weight.element_size()
        return b + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


def fuse_linears(parts: Sequence[Linear]) -> Linear:
    """One linear whose output is the parts' outputs concatenated (same input). Exact: FP4
    parts fuse with ``Fp4Weight.concat_rows``, dense parts with ``torch.cat``."""
    if len(parts) == 1:
        return parts[0]
    if any(p.bias is not None for p in parts):
        return _ConcatLinear(parts)
    if all(isinstance(p, Fp4Linear) for p in parts) and all(p.n % 16 == 0 for p in parts[:-1]):
        return Fp4Linear(Fp4Weight.concat_rows([p.weight for p in parts]))
    if (len(parts) == 2 and all(type(p) is Fp8Linear for p in parts)
            and all(p.weight.split_rows == 0 for p in parts)):
        return Fp8Linear(Fp8Weight.concat_rows([p.weight for p in parts]))
    if all(isinstance(p, DenseLinear) for p in parts) and len({p.weight.dtype for p in parts}) == 1:
        return DenseLinear(torch.cat([p.weight for p in parts]), fp4=all(p.fp4 for p in parts),
                           fp8=all(p.fp8 for p in parts))
    return _ConcatLinear(parts)


class _ConcatLinear(Linear):
    """Fallback fusion: runs each part and concatenates (mixed formats)."""

    def __init__(self, parts: Sequence[Linear]):
        self.parts = list(parts)
        self.n, self.k = sum(p.n for p in parts), parts[0].k
        self.fp4 = all(p.fp4 for p in parts)
        self.fp8 = all(p.fp8 for p in parts)

    def __call__(self, x: Tensor) -> Tensor:
        ys = [p(x) for p in self.parts]
        dt = ys[0].dtype
        return torch.cat([y.to(dt) for y in ys], dim=-1)

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        return torch.cat([p.dense_weight(dtype) for p in self.parts])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


# ---------------------------------------------------------------------------------------
# routed experts


@dataclass
class ExpertGroups:
    """How permuted rows map to expert weights for one MoE layer's grouped GEMMs.

    row_offsets : int32 [G+1], rows row_offsets[g]:row_offsets[g+1] form group g
    slot_of_group : int32 [G], the weight slot group g multiplies by (negative: skip)
    max_rows : upper bound on any group's rows (tokens in the batch)
    """

    row_offsets: Tensor
    slot_of_group: Tensor
    max_rows: int


class RoutedExperts:
    """The routed experts of one MoE layer, stacked so one call runs every selected expert.

    ``group`` turns ``moe_permute``'s per-expert row offsets into ``ExpertGroups``; this is
    where a paged store makes the selected experts resident and maps them to cache slots.
    ``gate_up`` and ``down`` then run every group in one grouped GEMM each.
    """

    num_experts: int
    hidden: int
    inter: int
    graph_safe: bool   # no host synchronisation: may be captured in a CUDA graph

    def group(self, row_offsets: Tensor, rows: int, max_rows: int) -> ExpertGroups:
        """row_offsets int32 [E+1] (rows of expert e: row_offsets[e]:row_offsets[e+1]) of
        ``rows`` permuted rows in all, no expert holding more than ``max_rows``."""
        raise NotImplementedError

    def gate_up(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        """x [R, hidden] → [R, 2·inter] (gate, then up), each row by its group's expert."""
        raise NotImplementedError

    def down(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        """x [R, inter] → [R, hidden], each row by its group's expert."""
        raise NotImplementedError

    def run(self, x: Tensor, row_offsets: Tensor, tokens: int) -> Tensor:
        """The expert FFN of permuted rows: x [R, hidden] grouped by ``row_offsets`` [E+1] →
        [R, hidden]. A token picks an expert at most once, so no expert has more than
        ``tokens`` rows."""
        groups = self.group(row_offsets, x.shape[0], tokens)
        h = torch.ops.dsfp4.silu_mul(self.gate_up(x, groups))                # [R, I]
        return self.down(h, groups)                                          # [R, hidden]

    def route_point(self, layer: int, h: Tensor, weights: Tensor, ids: Tensor
                    ) -> Tuple[Tensor, Tensor, Optional["HostPoint"]]:
        """After routing: (weights, ids) to use, and the host point to yield (None: nothing
        to do on the host). Resident experts change nothing."""
        return weights, ids, None


class Fp4RoutedExperts(RoutedExperts):
    """NVFP4 experts in the tiled layout, stacked [E, …], run by ``fp4_grouped_gemm`` over the
    experts that received rows (``moe_compact_groups``: no host sync, graph safe)."""

    graph_safe = True

    def __init__(self, gu_qweight: Tensor, gu_qscale: Tensor, gu_scale: Tensor, dn_qweight: Tensor,
                 dn_qscale: Tensor, dn_scale: Tensor, hidden: int, inter: int):
        self.gu_qweight, self.gu_qscale, self.gu_scale = gu_qweight, gu_qscale, gu_scale   # [E, …]
        self.dn_qweight, self.dn_qscale, self.dn_scale = dn_qweight, dn_qscale, dn_scale   # [E, …]
        self.num_experts, self.hidden, self.inter = gu_qweight.shape[0], hidden, inter

    @classmethod
    def allocate(cls, num_experts: int, gate_up: Fp4Weight, down: Fp4Weight) -> "Fp4RoutedExperts":
        """Empty stacked buffers shaped like ``gate_up`` [2I, H] and ``down`` [H, I]. Global
        scales are kept per 16-row tile, so fused parts with different scales stay exact."""
        def bufs(w: Fp4Weight):
            dev = w.device
            return (torch.empty(num_experts, w.qweight.numel(), dtype=torch.int32, device=dev),
                    torch.empty(num_experts, w.qscale.numel(), dtype=torch.uint8, device=dev),
                    torch.empty(num_experts, -(-w.n // 16), dtype=torch.float32, device=dev))
        return cls(*bufs(gate_up), *bufs(down), gate_up.k, gate_up.n // 2)

    def set_expert(self, e: int, gate_up: Fp4Weight, down: Fp4Weight) -> None:
        for w, qw, qs, gs in ((gate_up, self.gu_qweight, self.gu_qscale, self.gu_scale),
                              (down, self.dn_qweight, self.dn_qscale, self.dn_scale)):
            if w.qweight.numel() != qw.shape[1] or w.qscale.numel() != qs.shape[1]:
                raise ValueError(f"expert {e}: weight [{w.n}, {w.k}] does not match the other experts")
            qw[e].copy_(w.qweight)
            qs[e].copy_(w.qscale)
            gs[e].copy_(w.global_scale.reshape(-1).expand(gs.shape[1]))

    def group(self, row_offsets: Tensor, rows: int, max_rows: int) -> ExpertGroups:
        # at most min(E, rows) experts have rows: launch that many groups, no host sync;
        # resident, the slot of an expert is its id (-1 pads the unused groups)
        max_groups = max(1, min(self.num_experts, rows))
        expert_of_group, offsets = torch.ops.dsfp4.moe_compact_groups(row_offsets, max_groups)
        return ExpertGroups(offsets, expert_of_group, max_rows)

    def gate_up(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        return torch.ops.dsfp4.fp4_grouped_gemm(
            x.to(torch.bfloat16), groups.row_offsets, groups.slot_of_group, self.gu_qweight, self.gu_qscale,
            self.gu_scale, 2 * self.inter, self.hidden, groups.max_rows)

    def down(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        return torch.ops.dsfp4.fp4_grouped_gemm(
            x.to(torch.bfloat16), groups.row_offsets, groups.slot_of_group, self.dn_qweight, self.dn_qscale,
            self.dn_scale, self.hidden, self.inter, groups.max_rows)

    def expert_weights(self, e: int) -> Tuple[Fp4Weight, Fp4Weight]:
        """(gate_up, down) of expert e as Fp4Weight views (tests, per-expert loops)."""
        gu = Fp4Weight(self.gu_qweight[e], self.gu_qscale[e], self.gu_scale[e], 2 * self.inter, self.hidden)
        dn = Fp4Weight(self.dn_qweight[e], self.dn_qscale[e], self.dn_scale[e], self.hidden, self.inter)
        return gu, dn

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gu_qweight, self.gu_qscale, self.gu_scale,
                                                           self.dn_qweight, self.dn_qscale, self.dn_scale))


class Fp8RoutedExperts(RoutedExperts):
    """FP8 block experts stacked [E, …] in the checkpoint's own layout, run by
    ``fp8_grouped_gemm`` over the experts that received rows (graph safe, like the FP4 ones).
    gate_up stacks gate and up rows (split at ``inter`` rows when that is not whole blocks)."""

    graph_safe = True

    def __init__(self, gu_weight: Tensor, gu_scale: Tensor, dn_weight: Tensor, dn_scale: Tensor, split: int):
        self.gu_weight, self.gu_scale = gu_weight, gu_scale          # [E, 2I, H] e4m3, [E, rows, H/128]
        self.dn_weight, self.dn_scale = dn_weight, dn_scale          # [E, H, I] e4m3, [E, H/128, I/128]
        self.num_experts, two_i, self.hidden = gu_weight.shape
        self.inter, self.split = two_i // 2, split

    @classmethod
    def allocate(cls, num_experts: int, gate_up: Fp8Weight, down: Fp8Weight) -> "Fp8RoutedExperts":
        dev = gate_up.device
        return cls(torch.empty(num_experts, *gate_up.weight.shape, dtype=torch.float8_e4m3fn, device=dev),
                   torch.empty(num_experts, *gate_up.scale.shape, dtype=torch.float32, device=dev),
                   torch.empty(num_experts, *down.weight.shape, dtype=torch.float8_e4m3fn, device=dev),
                   torch.empty(num_experts, *down.scale.shape, dtype=torch.float32, device=dev),
                   gate_up.split_rows)

    def set_expert(self, e: int, gate_up: Fp8Weight, down: Fp8Weight) -> None:
        if (gate_up.weight.shape != self.gu_weight.shape[1:] or down.weight.shape != self.dn_weight.shape[1:]
                or gate_up.split_rows != self.split):
            shapes = f"{tuple(gate_up.weight.shape)} / {tuple(down.weight.shape)}"
            raise ValueError(f"expert {e}: weights {shapes} do not match the other experts")
        self.gu_weight[e].copy_(gate_up.weight)
        self.gu_scale[e].copy_(gate_up.scale)
        self.dn_weight[e].copy_(down.weight)
        self.dn_scale[e].copy_(down.scale)

    def group(self, row_offsets: Tensor, rows: int, max_rows: int) -> ExpertGroups:
        max_groups = max(1, min(self.num_experts, rows))
        expert_of_group, offsets = torch.ops.dsfp4.moe_compact_groups(row_offsets, max_groups)
        return ExpertGroups(offsets, expert_of_group, max_rows)

    def gate_up(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        g = groups
        return torch.ops.dsfp4.fp8_grouped_gemm(x.to(torch.bfloat16), g.row_offsets, g.slot_of_group,
                                                self.gu_weight, self.gu_scale, g.max_rows, self.split)

    def down(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        g = groups
        return torch.ops.dsfp4.fp8_grouped_gemm(x.to(torch.bfloat16), g.row_offsets, g.slot_of_group,
                                                self.dn_weight, self.dn_scale, g.max_rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gu_weight, self.gu_scale, self.dn_weight,
                                                           self.dn_scale))


class DenseRoutedExperts(RoutedExperts):
    """Dense experts [E, 2I, H] / [E, H, I] run one matmul per expert that has rows. Used by
    the float32 reference path and for experts kept in BF16. Reads ``row_offsets`` on the
    host, so it is not CUDA-graph safe."""

    graph_safe = False

    def __init__(self, gate_up: Tensor, down: Tensor, fp4: bool = False):
        self.w_gate_up, self.w_down = gate_up, down   # [E, 2I, H], [E, H, I]
        self.num_experts, two_i, self.hidden = gate_up.shape
        self.inter = two_i // 2
        self.fp4 = fp4
        self._slots = torch.arange(self.num_experts, dtype=torch.int32, device=gate_up.device)

    def group(self, row_offsets: Tensor, rows: int, max_rows: int) -> ExpertGroups:
        return ExpertGroups(row_offsets, self._slots, max_rows)

    def _grouped(self, x: Tensor, groups: ExpertGroups, w: Tensor) -> Tensor:
        x = x.to(w.dtype)
        y = x.new_zeros(x.shape[0], w.shape[1])
        offs = groups.row_offsets.tolist()
        for g, slot in enumerate(groups.slot_of_group.tolist()):
            lo, hi = offs[g], offs[g + 1]
            if slot >= 0 and hi > lo:
                y[lo:hi] = x[lo:hi] @ w[slot].t()
        return y

    def gate_up(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        return self._grouped(x, groups, self.w_gate_up)

    def down(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        return self._grouped(x, groups, self.w_down)

    @property
    def nbytes(self) -> int:
        return (self.w_gate_up.numel() + self.w_down.numel()) * self.w_gate_up.element_size()


# ---------------------------------------------------------------------------------------
# what one layer's forward needs


@dataclass
class AttentionWeights:
    """MLA weights of one layer. With a q LoRA, ``q_a`` and ``kv_a`` are fused into one
    ``qkv_a`` GEMM (same input); ``q`` is the direct projection otherwise."""

    qkv_a: Optional[Linear]          # [q_lora + kv_lora + rope, hidden]  (q LoRA models)
    q_a_norm: Optional[Tensor]       # [q_lora] float32
    q_b: Optional[Linear]            # [H·(nope + rope), q_lora]
    q: Optional[Linear]              # [H·(nope + rope), hidden]          (no q LoRA)
    kv_a: Optional[Linear]           # [kv_lora + rope, hidden]           (no q LoRA)
    kv_a_norm: Tensor                # [kv_lora] float32
    kv_b: Linear                     # [H·(nope + v), kv_lora]
    w_uk: Optional[Tensor]           # [H, nope, kv_lora]  compute dtype (absorbed form); None when
    w_uv: Optional[Tensor]           # [H, v, kv_lora]     kv_b is an Fp8KvB (FP8 absorbed products)
    o: Linear                        # [hidden, H·v]


@dataclass
class MlpWeights:
    gate_up: Linear                  # [2·inter, hidden] (gate rows, then up rows)
    down: Linear                     # [hidden, inter]


@dataclass
class MoeWeights:
    router: Tensor                   # [E, hidden] float32
    correction_bias: Tensor          # [E] float32
    experts: RoutedExperts
    shared: Optional[MlpWeights]


@dataclass
class LayerWeights:
    input_norm: Tensor               # [hidden] float32
    post_attention_norm: Tensor      # [hidden] float32
    attn: AttentionWeights
    mlp: Optional[MlpWeights]        # dense layers
    moe: Optional[MoeWeights]        # MoE layers


# ---------------------------------------------------------------------------------------
# the interface


class WeightStore:
    """What the model asks for. Subclasses decide where weights live.

    Attributes: ``config``, ``device``, ``compute_dtype``, ``policy``.
    """

    config: DeepseekV3Config
    device: torch.device
    compute_dtype: torch.dtype
    policy: PrecisionPolicy

    # ---- model-wide tensors ----
    def embedding(self) -> Tensor:
        """[vocab, hidden] in the compute dtype."""
        raise NotImplementedError

    def final_norm(self) -> Tensor:
        """[hidden] float32."""
        raise NotImplementedError

    def lm_head(self) -> Linear:
        raise NotImplementedError

    # ---- per layer ----
    def acquire_layer(self, layer: int) -> LayerWeights:
        """The weights of ``layer``, on the device until ``release_layer(layer)``."""
        raise NotImplementedError

    def release_layer(self, layer: int) -> None:
        """The forward is done with ``layer`` (a paged store may evict or reuse its slot)."""

    def prefetch(self, layer: int) -> None:
        """Hint: ``layer`` is needed soon (paged stores start copying it)."""

    def layer_points(self, layer: int) -> Generator["HostPoint", None, None]:
        """Host points before ``layer`` runs (a paged layer unit to bring in); none by default."""
        return
        yield

    def resolve(self, point: "HostPoint") -> None:
        """The host's part at ``point`` (called between the GPU work before and after it)."""
        raise NotImplementedError(f"{type(self).__name__} yields no host points")

    def begin_step(self, tokens: int, decode: bool = False) -> None:
        """A forward over ``tokens`` token positions starts (paged stores tick their caches);
        ``decode``: it is a decode step (one token per sequence)."""

    def end_step(self) -> None:
        """The forward's results were read. Raises what went wrong in the store's background
        work for this forward (a disk read, a changed file), naming the file and tensor."""

    def prepare_decode(self) -> None:
        """Called on the stream a decode step will run on, before the engine picks a captured
        graph (outside capture): a store may change how it decodes here (see decode_mode)."""

    @property
    def decode_mode(self) -> Any:
        """What a captured decode graph depends on besides its batch and length; a graph captured
        under another mode is captured again."""
        return None

    # ---- properties the engine checks ----
    @property
    def graph_safe(self) -> bool:
        """True when a decode step can be captured in a CUDA graph."""
        raise NotImplementedError

    @property
    def pages(self) -> bool:
        """True when some weights live off the device and are brought in while running."""
        return False

    @property
    def layer_major_prefill(self) -> bool:
        """True when prefill should run every chunk through a layer before the next layer (a
        paged layer or expert is then brought in once per prompt)."""
        return self.pages

    @property
    def prefill_group_tokens(self) -> int:
        """Most tokens a layer-major prefill holds between layers (0: no limit)."""
        return 0

    @property
    def compute_stream(self) -> Optional[torch.cuda.Stream]:
        """The stream the model should run on (None: the caller's)."""
        return None

    @property
    def reads_source(self) -> bool:
        """True when the store keeps reading the checkpoint after loading (its files must stay
        open); False lets the loader release them."""
        return False

    def memory_report(self) -> Dict[str, int]:
        """Device bytes held, by category."""
        raise NotImplementedError

    # ---- counters and knobs ----
    def counters(self) -> Dict[str, Any]:
        """Paging counters (``COUNTER_KEYS``): bytes per tier and direction, hit rates,
        prediction accuracy. A store that pages nothing answers zeros (rates None)."""
        return empty_counters()

    def reset_counters(self) -> None:
        """Zeroes the counters."""

    def reconfigure(self, **changes: Any) -> None:
        """Changes paging knobs that need no new memory plan."""
        raise ValueError("this engine keeps every weight resident: there are no paging knobs to change "
                         "(give a memory_limit below the model's size to page)")


class BuiltWeights:
    """The WeightStore accessors of a store that holds its model-wide tensors in ``_embed``,
    ``_norm``, ``_lm_head`` and one LayerWeights per layer in ``_layers`` (both stores do)."""

    _embed: Tensor
    _norm: Tensor
    _lm_head: Linear
    _layers: List[LayerWeights]

    def embedding(self) -> Tensor:
        return self._embed

    def final_norm(self) -> Tensor:
        return self._norm

    def lm_head(self) -> Linear:
        return self._lm_head

    def acquire_layer(self, layer: int) -> LayerWeights:
        return self._layers[layer]


# ---------------------------------------------------------------------------------------
# host points


class HostPoint:
    """A place in the forward where the host acts before the GPU work after it may run.
    ``graph_safe``: the GPU work before it can be captured in a CUDA graph and the host part
    run between replays. One point object may serve graphs captured for several batch sizes:
    ``snapshot`` returns what a replay must restore (``restore``) before the host acts."""

    graph_safe = True

    def snapshot(self) -> Any:
        return None

    def restore(self, state: Any) -> None:
        pass


COUNTER_KEYS = ("experts", "per_layer", "layers", "files", "expert_hit_rate", "host_hit_rate", "prefetch_accuracy",
                "wasted_bytes", "h2d_bytes", "zero_copy_bytes", "ssd_bytes", "layer_hit_rate", "cpu_lane")


def empty_counters() -> Dict[str, Any]:
    """The counters of a store that pages nothing: every key of ``COUNTER_KEYS``, zero bytes,
    rates None (nothing was requested)."""
    return {"experts": {}, "per_layer": [], "layers": {}, "files": {}, "expert_hit_rate": None,
            "host_hit_rate": None, "prefetch_accuracy": None, "wasted_bytes": 0, "h2d_bytes": 0,
            "zero_copy_bytes": 0, "ssd_bytes": 0, "layer_hit_rate": None, "cpu_lane": None}


def run_host_points(steps: Generator[HostPoint, None, Any], store: WeightStore) -> Any:
    """Runs a forward generator eagerly, resolving each host point; returns its result."""
    try:
        point = next(steps)
        while True:
            store.resolve(point)
            point = steps.send(None)
    except StopIteration as done:
        return done.value


def __getattr__(name: str):
    # the stores moved to their own modules
    if name in ("ResidentWeightStore", "estimate_bytes"):
        from . import resident
        return getattr(resident, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
