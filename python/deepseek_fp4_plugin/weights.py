"""Weight stores: the one interface through which the model reaches every weight.

The model never holds a weight. Each forward asks the store for the weights of a layer
(``acquire_layer(l)``), uses them, and hands them back (``release_layer(l)``). The first store,
``ResidentWeightStore``, keeps everything on the device, so acquire returns a prebuilt bundle
and release does nothing; a paged store (GPU ↔ pinned host ↔ SSD) implements the same calls and
fills a layer slot on acquire, and maps the experts a batch selects to expert-cache slots
through ``RoutedExperts.group``.

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

Precision
---------
Two choices shape every weight. The compute dtype: bfloat16 runs FP4 weights through the FP4
ops (``fp4_gemm`` / ``fp4_grouped_gemm``) and dense weights as BF16 matmuls; float32 (the CPU
reference path) dequantizes every weight once to float32 — the same values the FP4 kernels
multiply by — and runs float32 matmuls. And the ``PrecisionPolicy``: which module groups run
in NVFP4 and how FP8-block and BF16 weights get there (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .checkpoint import FP8_BLOCK, NVFP4, CheckpointSource, LinearTensors
from .config import DeepseekV3Config
from .ops import Fp4Weight

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


# ---------------------------------------------------------------------------------------
# linear layers


class Linear:
    """A callable linear layer y[..., n] = x[..., k] · Wᵀ (+ bias), output in the compute dtype."""

    n: int
    k: int
    fp4: bool   # True when W holds NVFP4 values (FP4 kernels, or their float32 dequantization)

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


class DenseLinear(Linear):
    """Dense weight [n, k] in the compute dtype; ``fp4`` records that it holds NVFP4 values."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, fp4: bool = False):
        self.weight, self.bias = weight, bias
        self.n, self.k = weight.shape
        self.fp4 = fp4

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
    if all(isinstance(p, DenseLinear) for p in parts) and len({p.weight.dtype for p in parts}) == 1:
        return DenseLinear(torch.cat([p.weight for p in parts]), fp4=all(p.fp4 for p in parts))
    return _ConcatLinear(parts)


class _ConcatLinear(Linear):
    """Fallback fusion: runs each part and concatenates (mixed formats)."""

    def __init__(self, parts: Sequence[Linear]):
        self.parts = list(parts)
        self.n, self.k = sum(p.n for p in parts), parts[0].k
        self.fp4 = all(p.fp4 for p in parts)

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
    w_uk: Tensor                     # [H, nope, kv_lora]  compute dtype (absorbed form)
    w_uv: Tensor                     # [H, v, kv_lora]     compute dtype (absorbed form)
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

    # ---- properties the engine checks ----
    @property
    def graph_safe(self) -> bool:
        """True when a decode step can be captured in a CUDA graph."""
        raise NotImplementedError

    def memory_report(self) -> Dict[str, int]:
        """Device bytes held, by category."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------
# the resident store


class ResidentWeightStore(WeightStore):
    """Every weight resident on ``device``, converted once at load.

    Parameters
    ----------
    source : CheckpointSource (safetensors folder or in-memory state dict)
    device : torch device the model runs on
    compute_dtype : None (float32 on CPU, bfloat16 on CUDA), torch.float32 or torch.bfloat16
    policy : PrecisionPolicy, or "default" / "fp4" / "bf16"
    progress : show a tqdm bar while loading
    """

    def __init__(self, source: CheckpointSource, device: Union[str, torch.device] = "cpu",
                 compute_dtype: Union[None, str, torch.dtype] = None,
                 policy: Union[None, str, PrecisionPolicy] = None, progress: bool = False):
        self.source = source   # dropped once loaded: the resident store reads nothing later
        self.config = source.config
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.compute_dtype = resolve_compute_dtype(compute_dtype, self.device)
        self.policy = PrecisionPolicy.parse(policy)
        self._block = getattr(getattr(source, "quant", None), "weight_block_size", (128, 128))[0]
        c = self.config
        self._shapes = _linear_shapes(c)
        self.formats: Dict[str, str] = {}     # module → runtime format ("fp4" | "dense")

        it: Iterable[int] = range(c.num_hidden_layers)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="loading layers", unit="layer")
        self._embed = self._dense_tensor("model.embed_tokens.weight", (c.vocab_size, c.hidden_size),
                                         self.compute_dtype)
        self._layers: List[LayerWeights] = [self._load_layer(layer) for layer in it]
        self._norm = self._dense_tensor("model.norm.weight", (c.hidden_size,), torch.float32)
        if c.tie_word_embeddings:
            self._lm_head: Linear = DenseLinear(self._embed)
            self.formats["lm_head"] = "dense"
        else:
            self._lm_head = self._linear("lm_head")
        self.source = None

    # ---- WeightStore ----
    def embedding(self) -> Tensor:
        return self._embed

    def final_norm(self) -> Tensor:
        return self._norm

    def lm_head(self) -> Linear:
        return self._lm_head

    def acquire_layer(self, layer: int) -> LayerWeights:
        return self._layers[layer]

    @property
    def graph_safe(self) -> bool:
        return all(lw.moe is None or lw.moe.experts.graph_safe for lw in self._layers)

    def memory_report(self) -> Dict[str, int]:
        rep = {"embedding": _nbytes(self._embed), "lm_head": self._lm_head.nbytes if not
               self.config.tie_word_embeddings else 0, "attention": 0, "dense_mlp": 0, "experts": 0,
               "shared_experts": 0, "router_and_norms": _nbytes(self._norm)}
        for lw in self._layers:
            a = lw.attn
            linears = (a.qkv_a, a.q_b, a.q, a.kv_a, a.kv_b, a.o)
            rep["attention"] += sum(x.nbytes for x in linears if x is not None)
            if not isinstance(a.kv_b, DenseLinear):   # otherwise w_uk / w_uv view kv_b's weight
                rep["attention"] += _nbytes(a.w_uk) + _nbytes(a.w_uv)
            rep["router_and_norms"] += _nbytes(lw.input_norm) + _nbytes(lw.post_attention_norm)
            if lw.mlp is not None:
                rep["dense_mlp"] += lw.mlp.gate_up.nbytes + lw.mlp.down.nbytes
            if lw.moe is not None:
                rep["experts"] += lw.moe.experts.nbytes
                rep["router_and_norms"] += _nbytes(lw.moe.router) + _nbytes(lw.moe.correction_bias)
                if lw.moe.shared is not None:
                    rep["shared_experts"] += lw.moe.shared.gate_up.nbytes + lw.moe.shared.down.nbytes
        rep["total"] = sum(rep.values())
        return rep

    # ---- loading ----
    def _dense_tensor(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
        t = self.source.get_tensor(name, shape, (torch.bfloat16, torch.float16, torch.float32))
        return t.to(self.device).to(dtype).contiguous()

    def _linear(self, module: str) -> Linear:
        n, k = self._shapes[module]
        lt = self.source.linear(module, n, k, self._block)
        lin = self._to_linear(lt)
        self.formats[module] = "fp4" if lin.fp4 else "dense"
        return lin

    def _to_linear(self, lt: LinearTensors) -> Linear:
        """Stored tensors → runtime linear, as the policy and compute dtype say."""
        dev, cdt = self.device, self.compute_dtype
        bias = None if lt.bias is None else lt.bias.to(dev).to(cdt)
        if self.policy.runs_fp4(lt.module, lt.format):
            w = _to_fp4(lt, dev, self._block)
            if cdt == torch.float32:
                # float32 reference path: the exact values the FP4 kernels would use
                return DenseLinear(w.dequantize(torch.float32), bias, fp4=True)
            return Fp4Linear(w, bias)
        return DenseLinear(_to_dense(lt, dev, cdt, self._block), bias)

    def _load_layer(self, layer: int) -> LayerWeights:
        c = self.config
        p = f"model.layers.{layer}"
        a = f"{p}.self_attn"
        h = c.hidden_size
        attn = AttentionWeights(None, None, None, None, None, None, None, None, None, None)
        if c.q_lora_rank is not None:
            attn.qkv_a = fuse_linears([self._linear(f"{a}.q_a_proj"),
                                       self._linear(f"{a}.kv_a_proj_with_mqa")])
            attn.q_a_norm = self._dense_tensor(f"{a}.q_a_layernorm.weight", (c.q_lora_rank,), torch.float32)
            attn.q_b = self._linear(f"{a}.q_b_proj")
        else:
            attn.q = self._linear(f"{a}.q_proj")
            attn.kv_a = self._linear(f"{a}.kv_a_proj_with_mqa")
        attn.kv_a_norm = self._dense_tensor(f"{a}.kv_a_layernorm.weight", (c.kv_lora_rank,), torch.float32)
        attn.kv_b = self._linear(f"{a}.kv_b_proj")
        # the absorbed form needs kv_b per head; a dense kv_b is viewed, an FP4 one dequantized once
        w = attn.kv_b.dense_weight(self.compute_dtype)
        w = w.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        attn.w_uk = w[:, : c.qk_nope_head_dim]                 # [H, nope, kv_lora]
        attn.w_uv = w[:, c.qk_nope_head_dim:]                  # [H, v, kv_lora]
        attn.o = self._linear(f"{a}.o_proj")

        lw = LayerWeights(self._dense_tensor(f"{p}.input_layernorm.weight", (h,), torch.float32),
                          self._dense_tensor(f"{p}.post_attention_layernorm.weight", (h,), torch.float32),
                          attn, None, None)
        m = f"{p}.mlp"
        if not c.is_moe_layer(layer):
            lw.mlp = self._mlp(m)
            return lw
        e = c.n_routed_experts
        router = self._dense_tensor(f"{m}.gate.weight", (e, h), torch.float32)
        if self.source.has(f"{m}.gate.e_score_correction_bias"):
            bias = self._dense_tensor(f"{m}.gate.e_score_correction_bias", (e,), torch.float32)
        else:
            bias = torch.zeros(e, dtype=torch.float32, device=self.device)
        self.formats[f"{m}.gate"] = "dense"
        shared = self._mlp(f"{m}.shared_experts") if c.n_shared_experts > 0 else None
        lw.moe = MoeWeights(router, bias, self._experts(m), shared)
        return lw

    def _mlp(self, prefix: str) -> MlpWeights:
        gate_up = fuse_linears([self._linear(f"{prefix}.gate_proj"), self._linear(f"{prefix}.up_proj")])
        return MlpWeights(gate_up, self._linear(f"{prefix}.down_proj"))

    def _experts(self, prefix: str) -> RoutedExperts:
        c = self.config
        names = [f"{prefix}.experts.{e}.{proj}" for e in range(c.n_routed_experts)
                 for proj in ("gate_proj", "up_proj", "down_proj")]
        if self.compute_dtype != torch.float32 and all(
                self.policy.runs_fp4(m, self.source.linear_format(m)) for m in names):
            # fill the stacked buffers expert by expert: peak memory stays one expert above the result
            experts = None
            for e in range(c.n_routed_experts):
                mlp = self._mlp(f"{prefix}.experts.{e}")
                if experts is None:
                    experts = Fp4RoutedExperts.allocate(c.n_routed_experts, mlp.gate_up.weight,
                                                        mlp.down.weight)
                experts.set_expert(e, mlp.gate_up.weight, mlp.down.weight)
            return experts
        gate_up, down = [], []
        for e in range(c.n_routed_experts):
            mlp = self._mlp(f"{prefix}.experts.{e}")
            gate_up.append(mlp.gate_up.dense_weight(self.compute_dtype))
            down.append(mlp.down.dense_weight(self.compute_dtype))
        fp4 = all(self.formats[m] == "fp4" for m in names)
        return DenseRoutedExperts(torch.stack(gate_up), torch.stack(down), fp4)


def _to_fp4(lt: LinearTensors, dev: torch.device, declared: int = 128) -> Fp4Weight:
    t = lt.tensors
    if lt.format == NVFP4:
        return Fp4Weight.from_modelopt(t["weight"].to(dev), t["weight_scale"].to(dev),
                                       t["weight_scale_2"].to(dev).to(torch.float32))
    if lt.format == FP8_BLOCK:
        w, s = t["weight"].to(dev), t["weight_scale_inv"].to(dev)
        block = _fp8_block_size(lt, declared)
        packed, scale, gs = torch.ops.dsfp4.fp8_block_to_nvfp4(w, s, block[0], block[1])
        return Fp4Weight.from_modelopt(packed, scale, gs)
    return Fp4Weight.from_float(t["weight"].to(dev))


def _to_dense(lt: LinearTensors, dev: torch.device, dtype: torch.dtype, declared: int = 128) -> Tensor:
    t = lt.tensors
    if lt.format == NVFP4:
        w = torch.ops.dsfp4.nvfp4_dequantize(t["weight"].to(dev), t["weight_scale"].to(dev),
                                             t["weight_scale_2"].to(dev).to(torch.float32), torch.float32)
        return w.to(dtype)
    if lt.format == FP8_BLOCK:
        block = _fp8_block_size(lt, declared)
        return ops.fp8_block_dequantize(t["weight"].to(dev), t["weight_scale_inv"].to(dev), *block).to(dtype)
    return t["weight"].to(dev).to(dtype).contiguous()


def _fp8_block_size(lt: LinearTensors, declared: int = 128) -> Tuple[int, int]:
    """Square FP8 block size: the declared one (config.json weight_block_size) when the scale
    shape fits it, else the one the scale shape implies."""
    rows, cols = lt.tensors["weight_scale_inv"].shape
    for b in (declared, 128, 64, 256, 32, 16, 512):
        if -(-lt.n // b) == rows and -(-lt.k // b) == cols:
            return b, b
    raise ValueError(f"{lt.module}.weight_scale_inv has shape {(rows, cols)}, which no square block size "
                     f"fits for a [{lt.n}, {lt.k}] weight")


def _nbytes(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _linear_shapes(c: DeepseekV3Config) -> Dict[str, Tuple[int, int]]:
    """module → (n, k) for every linear layer the config implies."""
    from .loader import linear_shapes  # the loader owns the naming scheme

    return dict(linear_shapes(c))


# ---------------------------------------------------------------------------------------
# memory planning (before anything is loaded)


def estimate_bytes(source: CheckpointSource, policy: Union[None, str, PrecisionPolicy] = None,
                   compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Device bytes a ResidentWeightStore would hold for ``source``, from shapes and stored
    formats alone (no tensor data is read)."""
    policy = PrecisionPolicy.parse(policy)
    c = source.config
    elt = torch.tensor([], dtype=compute_dtype).element_size()
    total = c.vocab_size * c.hidden_size * elt
    for module, (n, k) in _linear_shapes(c).items():
        fmt = source.linear_format(module)
        if module_group(module) is None:
            total += n * k * 4
        elif policy.runs_fp4(module, fmt) and compute_dtype != torch.float32:
            words, sbytes = ops.tiled_sizes(n, k)
            total += words * 4 + sbytes + 4 * math.ceil(n / 16)
        else:
            total += n * k * elt
        if module.endswith(".kv_b_proj") and policy.runs_fp4(module, fmt) and compute_dtype != torch.float32:
            total += n * k * elt   # w_uk / w_uv for the absorbed form, dequantized
    return total
