"""The GPU memory plan: how a fixed budget is carved before anything is loaded.

``plan_memory`` sizes every part from shapes and stored formats alone (no tensor data is
read) and decides what stays resident and what is paged:

  resident     embedding, final norm, lm_head, MoE routers and correction biases (the router
               of layer l+1 predicts its experts from layer l), and the per-layer weights of
               as many layers as fit — attention, dense MLP / shared expert — because those
               are read by every token: a resident byte saves one PCIe byte per token, more
               than any expert-cache byte can
  kv_cache     max_batch_size × max_seq_len latents per layer
  workspace    activations of one prefill chunk (prefill_chunk tokens), logits, the float32
               residual a paged prefill keeps between layers (max_seq_len tokens), and the
               cuBLAS workspaces of the streams that run matmuls (32 MiB each on Hopper)
  layer slots  a ring of ``layer_slots`` slots through which the other layers' weights page
               (≥ prefetch_layers + 1, ≥ min_layers; ``max_gpu_layers`` caps resident + slots)
  expert cache whatever is left, in expert-unit slots (one expert: gate, up, down + scales);
               at least the experts one decode step can touch, min(E, max_batch_size · top_k)

When dense attention does not fit beside the minimum expert cache, the plan runs it in FP8
(converted at load; ``MemoryPlan.policy`` then says so, and the notes give the sizes).

The host side: pinned memory for the paged layer units, and the expert host cache
(``cpu_cache_size``) in front of the checkpoint files. A budget below the minimum working
set is refused with the sizes that would fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ._ext import _C
from .checkpoint import CheckpointSource
from .config import DeepseekV3Config
from .conversion import linear_bytes, linear_shapes
from .precision import ATTENTION, DENSE, FP4, FP8, PrecisionPolicy, module_group

GiB = 1 << 30
MiB = 1 << 20
_ALIGN = 256
_MISS_MODES = ("copy", "zero_copy", "auto")
_POLICIES = ("lrfu", "lru")


@dataclass
class PagingSettings:
    """The memory and stream knobs (the seed documents' names), validated.

    prefetch_layers : layers (and MoE layers' predicted experts) brought in ahead; 0 disables
        prefetch and prediction
    max_gpu_layers : most layers whose per-layer weights are on the GPU at once (resident +
        layer slots); None lets the plan keep as many resident as fit
    expert_threshold : opt-in approximation: a routed expert that is not on the GPU is skipped
        when its normalized routing weight is below this (the others renormalized); 0 = exact
    gpu_reserved : GiB of the budget left unused (for other work in the process)
    cpu_cache_size : GiB of pinned host memory for expert units (None: what the host can spare)
    prefetch_size : GiB of GPU expert slots reserved for speculative copies (None: one step's
        worth, min(E, max_batch_size · prefetch_experts) units)
    min_layers : fewest layer slots when layers are paged
    max_experts : most experts one MoE layer step may copy into GPU slots; the rest are read
        in place from pinned host memory (None: no cap)
    gpu_memory_fraction : with no memory_limit, the budget is this fraction of the card
    pinned_memory : page-locked host memory (False: pageable, slower copies, no zero-copy)
    enable_async_copy : copies on their own streams, overlapped with compute (False: on the
        compute stream)
    miss_mode : "copy" (copy every missed expert into a GPU slot), "zero_copy" (compute missed
        experts from pinned host memory), "auto" (copy what the cache policy would keep)
    cache_policy : "lrfu" (frequency and recency) or "lru" (the ablation)
    lrfu_lambda : LRFU decay per decode step (larger: more recency)
    prefetch_experts : predicted experts per token prefetched for the next MoE layer (None: top_k)
    prefetch_min_accuracy : speculative copies of a layer's predicted experts stop while the
        measured prediction accuracy of that layer is below this (a wrong guess costs a whole
        expert of bus time; disk reads into the host cache continue)
    io_threads : disk reader threads; direct_io : O_DIRECT reads (bypass the page cache)
    streams : {"compute", "prefetch", "transfer"}: False runs that stream's work on the
        current stream; stream_priorities : compute high, prefetch medium, transfer low
    expert_slots : most GPU expert slots in use (at most the plan's; None: all of them), a
        runtime cap, e.g. to give a short model the cache share of a deeper one
    decode_pipeline : resolve each decode step's experts on the store's own thread as the GPU
        publishes them, with no host point per MoE layer (None: on CUDA with async copies)
    sim_copy_delay_us : tests only, CPU mode: copies run on a simulated asynchronous stream,
        each delayed this long (exposes ordering bugs between copies, reads and events)
    cpu_experts : "off" (default), "auto" or a number of threads: in decode steps, missed
        experts may be computed by CPU threads from the host cache while the bus brings others
        (the miss policy balances the two lanes from measured rates); needs enable_async_copy
    cpu_isa : the CPU lane's instruction set: "auto", "avx512_bf16", "avx512" or "avx2"
    """

    prefetch_layers: int = 1
    max_gpu_layers: Optional[int] = None
    expert_threshold: float = 0.0
    gpu_reserved: float = 0.0
    cpu_cache_size: Optional[float] = None
    prefetch_size: Optional[float] = None
    min_layers: int = 1
    max_experts: Optional[int] = None
    gpu_memory_fraction: Optional[float] = None
    pinned_memory: bool = True
    enable_async_copy: bool = True
    miss_mode: str = "copy"
    cache_policy: str = "lrfu"
    lrfu_lambda: float = 0.05
    prefetch_experts: Optional[int] = None
    prefetch_min_accuracy: float = 0.8
    io_threads: int = 8
    direct_io: bool = True
    streams: Dict[str, bool] = field(default_factory=lambda: {"compute": True, "prefetch": True, "transfer": True})
    stream_priorities: bool = True
    expert_slots: Optional[int] = None
    decode_pipeline: Optional[bool] = None
    sim_copy_delay_us: int = 0
    cpu_experts: Union[str, int] = "off"
    cpu_isa: str = "auto"

    def validate(self) -> "PagingSettings":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.prefetch_layers) and self.prefetch_layers >= 0,
             f"prefetch_layers must be an integer >= 0, got {self.prefetch_layers!r}")
        need(self.max_gpu_layers is None or (is_int(self.max_gpu_layers) and self.max_gpu_layers >= 1),
             f"max_gpu_layers must be an integer >= 1, got {self.max_gpu_layers!r}")
        need(is_num(self.expert_threshold) and 0 <= self.expert_threshold < 1,
             f"expert_threshold must be a number in [0, 1), got {self.expert_threshold!r}")
        for k in ("gpu_reserved", "cpu_cache_size", "prefetch_size"):
            v = getattr(self, k)
            need(v is None or (is_num(v) and v >= 0), f"{k} must be a non-negative number of GiB, got {v!r}")
        need(is_int(self.min_layers) and self.min_layers >= 1, f"min_layers must be an integer >= 1, got {self.min_layers!r}")
        need(self.max_experts is None or (is_int(self.max_experts) and self.max_experts >= 1),
             f"max_experts must be an integer >= 1, got {self.max_experts!r}")
        need(self.gpu_memory_fraction is None or (is_num(self.gpu_memory_fraction) and 0 < self.gpu_memory_fraction <= 1),
             f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction!r}")
        need(self.expert_slots is None or (is_int(self.expert_slots) and self.expert_slots >= 1),
             f"expert_slots must be None or an integer >= 1, got {self.expert_slots!r}")
        need(self.decode_pipeline is None or isinstance(self.decode_pipeline, bool),
             f"decode_pipeline must be None, True or False, got {self.decode_pipeline!r}")
        need(is_int(self.sim_copy_delay_us) and 0 <= self.sim_copy_delay_us <= 1_000_000,
             f"sim_copy_delay_us must be an integer in [0, 1000000], got {self.sim_copy_delay_us!r}")
        if isinstance(self.cpu_experts, str) and self.cpu_experts.strip().isdigit():
            self.cpu_experts = int(self.cpu_experts.strip())   # from a command line
        need(self.cpu_experts in ("off", "auto") or (is_int(self.cpu_experts) and 1 <= self.cpu_experts <= 1024),
             f"cpu_experts must be 'off', 'auto' or a number of threads in [1, 1024], got {self.cpu_experts!r}")
        need(self.cpu_isa in ("auto", "avx512_bf16", "avx512", "avx2"),
             f"cpu_isa must be 'auto', 'avx512_bf16', 'avx512' or 'avx2', got {self.cpu_isa!r}")
        need(self.cpu_experts == "off" or (self.enable_async_copy and self.streams.get("transfer", True)),
             "cpu_experts needs enable_async_copy=True and the transfer stream on (ready words order the GPU's "
             "side of the CPU lane)")
        for k in ("pinned_memory", "enable_async_copy", "direct_io", "stream_priorities"):
            need(isinstance(getattr(self, k), bool), f"{k} must be True or False, got {getattr(self, k)!r}")
        need(self.miss_mode in _MISS_MODES, f"miss_mode must be one of {_MISS_MODES}, got {self.miss_mode!r}")
        need(self.cache_policy in _POLICIES, f"cache_policy must be one of {_POLICIES}, got {self.cache_policy!r}")
        need(is_num(self.lrfu_lambda) and self.lrfu_lambda >= 0, f"lrfu_lambda must be >= 0, got {self.lrfu_lambda!r}")
        need(is_num(self.prefetch_min_accuracy) and 0 <= self.prefetch_min_accuracy <= 1,
             f"prefetch_min_accuracy must be in [0, 1], got {self.prefetch_min_accuracy!r}")
        need(self.prefetch_experts is None or (is_int(self.prefetch_experts) and self.prefetch_experts >= 1),
             f"prefetch_experts must be an integer >= 1, got {self.prefetch_experts!r}")
        need(is_int(self.io_threads) and 1 <= self.io_threads <= 256, f"io_threads must be in [1, 256], got {self.io_threads!r}")
        need(isinstance(self.streams, dict) and set(self.streams) <= {"compute", "prefetch", "transfer"}
             and all(isinstance(v, bool) for v in self.streams.values()),
             f"streams must map 'compute' / 'prefetch' / 'transfer' to True or False, got {self.streams!r}")
        if not self.pinned_memory and self.miss_mode != "copy":
            raise ValueError(f"miss_mode={self.miss_mode!r} reads experts in place from pinned host memory: it "
                             f"needs pinned_memory=True")
        if not self.pinned_memory and self.max_experts is not None:
            raise ValueError("max_experts leaves the overflow in pinned host memory: it needs pinned_memory=True")
        return self


@dataclass
class MemoryPlan:
    """How the budget is carved. ``paged`` is False when everything fits resident."""

    budget: int
    paged: bool
    device_total: Optional[int]
    resident_fixed: int              # embedding, lm_head, final norm, routers
    resident_layers: List[int]
    paged_layers: List[int]          # per-layer weights paged through the ring, forward order
    layer_unit_bytes: Dict[int, int]  # layer → bytes of its per-layer weights
    layer_slots: int
    layer_slot_bytes: int
    kv_cache: int
    workspace: int
    expert_unit_bytes: int
    expert_slots: int
    total_experts: int
    host_layer_bytes: int
    host_expert_slots: int
    min_budget: int                  # smallest budget this configuration accepts
    prefill_group_tokens: int = 0    # tokens a layer-major prefill holds between layers
    cpu_expert_threads: int = 0      # CPU lane threads (cpu_experts), 0: off
    cpu_reserved_cores: List[int] = field(default_factory=list)   # kept free of them
    notes: List[str] = field(default_factory=list)
    policy: Optional[PrecisionPolicy] = None   # the precision the plan was made for (the stores use it)

    @property
    def resident_layer_bytes(self) -> int:
        return sum(self.layer_unit_bytes[layer] for layer in self.resident_layers)

    def rows(self) -> List[Tuple[str, int, str]]:
        r = [("resident: embedding, lm_head, norms, routers", self.resident_fixed, ""),
             ("resident: per-layer weights", self.resident_layer_bytes, f"{len(self.resident_layers)} layers"),
             ("KV cache", self.kv_cache, ""),
             ("workspace (activations)", self.workspace, ""),
             ("layer slots", self.layer_slots * self.layer_slot_bytes,
              f"{self.layer_slots} × {self.layer_slot_bytes / MiB:.1f} MiB for {len(self.paged_layers)} paged layers"),
             ("expert cache", self.expert_slots * self.expert_unit_bytes,
              f"{self.expert_slots} of {self.total_experts} experts × {self.expert_unit_bytes / MiB:.2f} MiB")]
        return r

    def table(self) -> str:
        lines = [f"GPU memory plan: budget {size_text(self.budget)}"
                 + (f" (card {self.device_total / GiB:.1f} GiB)" if self.device_total else "")
                 + ("" if self.paged else " — everything resident")]
        for name, b, note in self.rows():
            lines.append(f"  {name:<46} {b / GiB:9.3f} GiB  {note}")
        used = sum(b for _, b, _ in self.rows())
        lines.append(f"  {'total':<46} {used / GiB:9.3f} GiB")
        if self.paged:
            lines.append(f"host (pinned): {self.host_layer_bytes / GiB:.3f} GiB of layer units, "
                         f"{self.host_expert_slots} expert units ({self.host_expert_slots * self.expert_unit_bytes / GiB:.2f} GiB)")
            if self.cpu_expert_threads:
                lines.append(f"host CPU: {self.cpu_expert_threads} threads compute missed experts in decode steps "
                             f"(cores {self.cpu_reserved_cores or 'none'} kept for the GPU and I/O threads)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        pol = self.policy
        d["policy"] = None if pol is None else {
            k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in asdict(pol).items()}
        d["layer_unit_bytes"] = {str(k): v for k, v in self.layer_unit_bytes.items()}
        d["rows"] = [{"part": n, "bytes": b, "note": note} for n, b, note in self.rows()]
        return d


# ---------------------------------------------------------------------------------------


def layer_unit_bytes(source: CheckpointSource, policy: PrecisionPolicy, compute_dtype: torch.dtype,
                     layer: int) -> int:
    """Bytes of a layer's per-layer weights (attention, norms, dense MLP or shared expert) as
    converted, with each tensor aligned as a layer unit packs it; routed experts, router and
    correction bias are not included."""
    c = source.config
    total = 0
    prefix = f"model.layers.{layer}."
    for module, (n, k) in linear_shapes(c).items():
        if not module.startswith(prefix) or module_group(module) in (None, "experts"):
            continue
        total += _align(linear_bytes(source, policy, module, n, k, compute_dtype)) + 8 * _ALIGN
    norms = 2 * c.hidden_size + c.kv_lora_rank + (c.q_lora_rank or 0)
    return total + _align(4 * norms) + 4 * _ALIGN


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def activation_bytes_per_token(c: DeepseekV3Config) -> int:
    """Transient bytes per token of a forward (the larger of the attention and MoE peaks)."""
    h, heads = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    attn = 2 * heads * qk * 4 + 2 * heads * (c.qk_nope_head_dim + c.v_head_dim) + 2 * heads * c.v_head_dim + 12 * h
    k, i = c.num_experts_per_tok, max(c.moe_intermediate_size, 1)
    moe = k * (2 * h + 4 * i + 2 * i + 2 * h) + 12 * h
    dense = 6 * c.intermediate_size + 12 * h
    return int(1.5 * max(attn, moe, dense))


def host_available_bytes() -> int:
    """MemAvailable of this host (what pinned memory may take at most)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def expert_unit_bytes(source: CheckpointSource, policy: PrecisionPolicy, compute_dtype: torch.dtype) -> int:
    """Device bytes of one routed expert as it will run: an NVFP4 paging unit, an FP8 unit
    (fp8_expert_unit_layout) or dense gate, up and down in the compute dtype."""
    c = source.config
    h, i = c.hidden_size, c.moe_intermediate_size
    elt = torch.tensor([], dtype=compute_dtype).element_size()
    layer = next((x for x in range(c.num_hidden_layers) if c.is_moe_layer(x)), None)
    fmt = DENSE
    if layer is not None and compute_dtype != torch.float32:
        m = f"model.layers.{layer}.mlp.experts.0.gate_proj"
        fmt = policy.runtime_format(m, source.linear_format(m))
    if h % 16 or i % 16:
        fmt = DENSE
    if fmt == FP4:
        return _C.paging.expert_unit_layout(h, i)["bytes"]
    if fmt == FP8:
        return _C.fp8_expert_unit_layout(h, i)["bytes"]
    return 3 * h * i * elt


def attention_bytes(source: CheckpointSource, policy: PrecisionPolicy, compute_dtype: torch.dtype) -> int:
    """Device bytes of every layer's attention linears, as converted."""
    return sum(linear_bytes(source, policy, m, n, k, compute_dtype)
               for m, (n, k) in linear_shapes(source.config).items() if module_group(m) == ATTENTION)


def plan_memory(source: CheckpointSource, policy: PrecisionPolicy, compute_dtype: torch.dtype,
                budget: int, settings: PagingSettings, max_batch_size: int, max_seq_len: int,
                prefill_chunk: int, expert_unit_bytes: int, device_total: Optional[int] = None,
                host_bytes: Optional[int] = None, experts_pageable: bool = True,
                library_workspace: int = 0, not_pageable_reason: str = "") -> MemoryPlan:
    """Carves ``budget`` bytes (see the module docstring). Raises ValueError, with the sizes
    that would fit, when the budget cannot hold the minimum working set.

    When dense (BF16) attention pages — it does not fit beside the minimum expert cache — and
    the policy allows it (``auto_fp8_attention``), the plan converts attention to FP8 blocks at
    load (half the bytes) if that pages fewer layers, and says so in its notes;
    ``MemoryPlan.policy`` is the precision the stores must then load with."""
    args = (compute_dtype, budget, settings, max_batch_size, max_seq_len, prefill_chunk, expert_unit_bytes,
            device_total, host_bytes, experts_pageable, library_workspace, not_pageable_reason)
    try:
        plan, error = _plan_with(source, policy, *args), None
    except ValueError as e:
        plan, error = None, e
    fp8 = policy.with_fp8(ATTENTION)
    if (policy.auto_fp8_attention and compute_dtype == torch.bfloat16 and (plan is None or plan.paged_layers)
            and attention_bytes(source, fp8, compute_dtype) < attention_bytes(source, policy, compute_dtype)):
        try:
            alt = _plan_with(source, fp8, *args)
        except ValueError:
            alt = None
        if alt is not None and (plan is None or len(alt.paged_layers) < len(plan.paged_layers)):
            L = source.config.num_hidden_layers
            was = "none fit" if plan is None else f"{len(plan.resident_layers)} of {L} resident"
            dense_gib = attention_bytes(source, policy, compute_dtype) / GiB
            fp8_gib = attention_bytes(source, fp8, compute_dtype) / GiB
            alt.notes.insert(0, f"attention runs in FP8 (stored dense, converted at load with 128×128 "
                                f"block scales): dense it takes {dense_gib:.2f} GiB and does not fit "
                                f"beside the minimum expert cache ({was}); in FP8 {fp8_gib:.2f} GiB, "
                                f"{len(alt.resident_layers)} of {L} layers resident")
            return _with_cpu_lane(alt, settings)
    if plan is None:
        raise error
    return _with_cpu_lane(plan, settings)


def cpu_lane_cores(setting: Union[str, int]) -> Tuple[int, List[int]]:
    """(threads, reserved cores) of the CPU expert lane for ``cpu_experts=setting``: the first
    cores this process may use are kept for the threads that drive the GPU and read the disk
    (two from 6 cores, one from 3), the lane takes the rest ("auto") or the number asked for."""
    if setting == "off":
        return 0, []
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    keep = 2 if len(cores) >= 6 else 1 if len(cores) >= 3 else 0
    free = max(1, len(cores) - keep)
    return (free if setting == "auto" else min(int(setting), free)), cores[:keep]


def _with_cpu_lane(plan: MemoryPlan, settings: PagingSettings) -> MemoryPlan:
    if plan.paged and plan.total_experts > plan.expert_slots:
        plan.cpu_expert_threads, plan.cpu_reserved_cores = cpu_lane_cores(settings.cpu_experts)
    return plan


def _plan_with(source: CheckpointSource, policy: PrecisionPolicy, compute_dtype: torch.dtype,
               budget: int, settings: PagingSettings, max_batch_size: int, max_seq_len: int,
               prefill_chunk: int, expert_unit_bytes: int, device_total: Optional[int] = None,
               host_bytes: Optional[int] = None, experts_pageable: bool = True,
               library_workspace: int = 0, not_pageable_reason: str = "") -> MemoryPlan:
    """The plan for one precision policy (see plan_memory)."""
    s = settings.validate()
    c = source.config
    elt = torch.tensor([], dtype=compute_dtype).element_size()
    L = c.num_hidden_layers
    moe_layers = [layer for layer in range(L) if c.is_moe_layer(layer)]
    E, K = c.n_routed_experts, c.num_experts_per_tok
    total_experts = len(moe_layers) * E

    # always resident
    fixed = c.vocab_size * c.hidden_size * elt + 4 * c.hidden_size
    if not c.tie_word_embeddings:
        fixed += linear_bytes(source, policy, "lm_head", c.vocab_size, c.hidden_size, compute_dtype)
    fixed += len(moe_layers) * (E * c.hidden_size * 4 + E * 4)
    units = {layer: layer_unit_bytes(source, policy, compute_dtype, layer) for layer in range(L)}
    kv = L * max_batch_size * max_seq_len * (c.kv_lora_rank + c.qk_rope_head_dim) * elt
    chunk = min(prefill_chunk, max_batch_size * max_seq_len)
    # a paged prefill keeps the float32 residual of up to one max_seq_len prompt (or one chunk)
    # between layers; longer prefills run in groups of that many tokens
    prefill_group = max(chunk, max_seq_len)
    workspace = (chunk * activation_bytes_per_token(c) + 2 * max_batch_size * c.vocab_size * 4 + 2 * L * 4 * 1024
                 + prefill_group * c.hidden_size * 4 + 16 * MiB + library_workspace)
    reserved = int(s.gpu_reserved * GiB)

    step_experts = min(E, max_batch_size * K) if moe_layers else 0
    pred = s.prefetch_experts or K
    prefetch_units = 0
    if s.prefetch_layers > 0 and moe_layers:
        prefetch_units = (int(s.prefetch_size * GiB) // expert_unit_bytes if s.prefetch_size is not None
                          else min(E, max_batch_size * pred))
    min_expert_slots = step_experts + prefetch_units
    if s.max_experts is not None:
        min_expert_slots = min(min_expert_slots, s.max_experts + prefetch_units)

    # which layers' per-layer weights page: MoE layers first (smaller units), evenly spread
    order = _page_order(moe_layers, [layer for layer in range(L) if layer not in moe_layers])
    ring = max(s.min_layers, s.prefetch_layers + 1)
    base = fixed + kv + workspace + reserved

    def cost(n_paged: int) -> Tuple[int, int, int]:
        paged = order[:n_paged]
        slots = min(ring, n_paged) if n_paged else 0
        slot_bytes = max((units[layer] for layer in paged), default=0)
        resident_units = sum(units[layer] for layer in range(L) if layer not in paged)
        return base + resident_units + slots * slot_bytes, slots, slot_bytes

    if s.max_gpu_layers is not None and s.max_gpu_layers < L:
        ring = min(ring, s.max_gpu_layers)
        if s.prefetch_layers > ring - 1:
            raise ValueError(f"max_gpu_layers = {s.max_gpu_layers} leaves room for {ring} layer slot(s), but "
                             f"prefetch_layers = {s.prefetch_layers} needs {s.prefetch_layers + 1}")
        n_paged, fixed_choice = L - (s.max_gpu_layers - ring), True
    else:
        n_paged, fixed_choice = 0, False

    min_cost, _, _ = cost(len(order))
    min_budget = min_cost + min_expert_slots * expert_unit_bytes
    if budget < min_budget or (fixed_choice and budget < cost(n_paged)[0] + min_expert_slots * expert_unit_bytes):
        need = max(min_budget, cost(n_paged)[0] + min_expert_slots * expert_unit_bytes) if fixed_choice else min_budget
        shown_budget, shown_need = distinct_sizes(budget, need)
        raise ValueError(
            f"memory budget {shown_budget} is too small: the minimum working set needs {shown_need} "
            f"(resident embedding/lm_head/norms/routers {size_text(fixed)}, KV cache for {max_batch_size} × "
            f"{max_seq_len} tokens {size_text(kv)}, workspace for {chunk}-token prefill chunks "
            f"{size_text(workspace)}, "
            f"{ring} layer slot(s), {min_expert_slots} expert slots × {expert_unit_bytes / MiB:.1f} MiB"
            f"{', gpu_reserved ' + size_text(reserved) if reserved else ''}); raise memory_limit to at least "
            f"{gib_at_least(need)} GiB or lower max_batch_size / max_seq_len / prefill_chunk")

    if not fixed_choice:
        # keep as many layers resident as leave the minimum expert cache
        n_paged = 0
        while n_paged < len(order) and cost(n_paged)[0] + min_expert_slots * expert_unit_bytes > budget:
            n_paged += 1
    used, slots, slot_bytes = cost(n_paged)
    expert_slots = min(total_experts, (budget - used) // expert_unit_bytes) if moe_layers else 0
    if not experts_pageable and expert_slots < total_experts:
        raise ValueError("the routed experts do not fit the budget and cannot be paged: " + (
            not_pageable_reason or "paging experts reads them from NVFP4 safetensors files (convert FP8/BF16 "
                                   "checkpoints with `deepseek-fp4 convert`)"))
    paged_layers = sorted(order[:n_paged])
    is_paged = bool(paged_layers) or expert_slots < total_experts
    if not is_paged:
        slots, slot_bytes = 0, 0

    notes: List[str] = []
    host_layer = sum(units[layer] for layer in paged_layers)
    host_slots = 0
    if is_paged:
        if paged_layers:
            o_proj = f"model.layers.{paged_layers[0]}.self_attn.o_proj"
            attn_fmt = policy.runtime_format(o_proj, source.linear_format(o_proj))
            notes.append(f"{len(paged_layers)} of {L} layers page their attention"
                         f"{' / dense MLP' if any(not c.is_moe_layer(x) for x in paged_layers) else ''}"
                         f"{' / shared expert' if c.n_shared_experts else ''} weights "
                         f"({sum(units[x] for x in paged_layers) / GiB:.2f} GiB) through {slots} slots: they do not fit "
                         f"beside the minimum expert cache"
                         + ("" if attn_fmt == FP4 or compute_dtype == torch.float32 else
                            "; attention runs in " + ("FP8" if attn_fmt == FP8 else
                                                      str(compute_dtype).replace("torch.", "")) +
                            " by the precision policy — precision='fp4' would shrink it about "
                            + ("1.8×" if attn_fmt == FP8 else "3.5× ('fp8' halves it)")))
        notes.append(f"routed experts: {expert_slots} of {total_experts} fit on the GPU; the rest are paged "
                     f"from pinned host memory and the checkpoint files")
        avail = host_bytes if host_bytes is not None else host_available_bytes()
        if s.cpu_cache_size is not None:
            host_slots = int(s.cpu_cache_size * GiB) // expert_unit_bytes
        else:
            host_slots = max(0, int(0.5 * avail) - host_layer) // expert_unit_bytes
        host_slots = min(host_slots, total_experts)
        min_host = 2 * step_experts + prefetch_units
        if moe_layers and host_slots < min_host:
            raise ValueError(f"cpu_cache_size: the host expert cache holds {host_slots} expert units, fewer than the "
                             f"{min_host} one step needs (2 × {step_experts} + {prefetch_units} prefetched); raise "
                             f"cpu_cache_size to at least {gib_at_least(min_host * expert_unit_bytes)} GiB")
        pinned = host_layer + host_slots * expert_unit_bytes
        if pinned > 0.9 * avail:
            raise ValueError(f"pinned host memory {size_text(pinned)} (layer units {size_text(host_layer)} + "
                             f"expert cache {size_text(host_slots * expert_unit_bytes)}) exceeds 90% of the "
                             f"host's available {size_text(avail)}; lower cpu_cache_size")
        if host_slots < total_experts:
            notes.append(f"host cache holds {host_slots} of {total_experts} experts: the rest are read from disk")
    return MemoryPlan(budget=budget, paged=is_paged, device_total=device_total, resident_fixed=fixed,
                      resident_layers=[x for x in range(L) if x not in paged_layers], paged_layers=paged_layers,
                      layer_unit_bytes=units, layer_slots=slots, layer_slot_bytes=slot_bytes, kv_cache=kv,
                      workspace=workspace, expert_unit_bytes=expert_unit_bytes,
                      expert_slots=expert_slots if is_paged else total_experts, total_experts=total_experts,
                      host_layer_bytes=host_layer if is_paged else 0, host_expert_slots=host_slots,
                      min_budget=min_budget, prefill_group_tokens=prefill_group, notes=notes, policy=policy)


def size_text(n: int, digits: int = 2) -> str:
    """``n`` bytes in GiB from 1 GiB up, else in MiB."""
    unit, name = (GiB, "GiB") if n >= GiB else (MiB, "MiB")
    return f"{n / unit:.{digits}f} {name}"


def distinct_sizes(*ns: int) -> List[str]:
    """Each size with just enough digits that different sizes never print the same."""
    for digits in range(2, 10):
        out = [size_text(n, digits) for n in ns]
        if len(set(out)) == len(set(ns)):
            break
    return out


def gib_at_least(n: int) -> str:
    """``n`` bytes in GiB rounded up to three significant digits (a memory_limit that holds n)."""
    gib = n / GiB
    digits = max(2, 2 - math.floor(math.log10(gib))) if gib > 0 else 2
    return f"{math.ceil(gib * 10**digits) / 10**digits:.{digits}f}"


def _page_order(first: List[int], then: List[int]) -> List[int]:
    """Paging order: ``first`` spread evenly (every k-th layer), then ``then``, so paged layers
    are far apart and each has several layers of compute to hide its copy."""
    out: List[int] = []
    for group in (first, then):
        remaining = list(group)
        while remaining:
            pick = remaining[::2]
            out += pick
            remaining = [x for x in remaining if x not in pick]
    return out
