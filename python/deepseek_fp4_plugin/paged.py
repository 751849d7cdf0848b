"""PagedWeightStore: a model larger than its GPU budget, paged GPU ↔ pinned host ↔ SSD.

What stays where follows the ``MemoryPlan`` (memory_plan.py). The tiers are the C++ core's
(``_C.paging``, cpp/include/dsfp4/paging.h):

- routed experts: ``ExpertStore`` keeps expert units (gate, up, down + scales, repacked) in
  GPU slots, a pinned host cache, and reads missing ones from the checkpoint's safetensors
  files (pread / O_DIRECT, a thread pool). The grouped expert GEMM reads each expert through
  a device table ``tables[moe_layer, expert]`` of unit addresses (a GPU slot, or pinned host
  memory the kernel reads in place), so expert choice reaches the kernels without changing
  any pointer a CUDA graph captured.
- per-layer weights that do not stay resident (attention, dense MLP, shared expert): packed
  once into pinned host units and streamed through a ring of GPU layer slots (``LayerRing``):
  paged layer r always uses slot r % slots, so captured graphs stay valid.

Decode pipeline (the default on CUDA). After each MoE layer's routing a tiny kernel publishes
the routed ids (and the next layer's predicted ids: its router applied to this layer's hidden
state) to the ExpertStore's own thread, through a mailbox in mapped host memory. The thread
resolves them at once: hits need nothing, misses are placed by the store's one miss policy
(copy into a GPU slot, or read in place), and each expert's table entry and ready word reach
the device by copies on the store's copy stream, behind that expert's data. The grouped GEMMs
wait per expert on those ready words, so hits and the shared expert compute while misses copy,
and a decode step is one CUDA graph with no host point per MoE layer. Speculative copies of the
predicted experts go in chunks while no demand copy waits.

Host points. Before a paged layer the forward yields a ``LayerPoint`` (the ring slot is
filled and the next layers' copies start). Prefill (and decode without the pipeline) yields a
``RoutePoint`` after each MoE layer's routing: the host resolves the ids (ready words again,
so the GEMM starts on the experts already there), in waves when the layer needs more experts
than the GPU cache holds, then prefetches the next layer's predicted experts.

Streams: ``compute`` (high priority) runs the model; the expert store copies on its own stream;
the layer ring uses ``transfer`` (copies the current layer waits for) and ``prefetch``.
"""

from __future__ import annotations

import ctypes
import os
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Generator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import paged_ops  # noqa: F401  (registers torch.ops.dsfp4.fp4_grouped_gemm_units)
from ._ext import _C
from .checkpoint import FP8_BLOCK, NVFP4, CheckpointSource
from .conversion import WeightConverter, split_kv_b
from .memory_plan import MemoryPlan, PagingSettings
from .ops import Fp4Weight
from .precision import FP8, PrecisionPolicy
from .resident import add_layer_report, nbytes
from .validation import check_expert_global_scales
from .weights import (AttentionWeights, BuiltWeights, DenseLinear, ExpertGroups, Fp4Linear, HostPoint, LayerWeights,
                      Linear,
                      MlpWeights, MoeWeights, RoutedExperts, WeightStore, _ConcatLinear)

_ALIGN = 256
_PARTS = ("gate_proj", "up_proj", "down_proj")


def paged_expert_format(source: CheckpointSource, policy: PrecisionPolicy) -> Tuple[Optional[str], Optional[str]]:
    """How routed experts page: ("nvfp4", None) for NVFP4-stored experts, ("fp8_block", None) for
    DeepSeek FP8 blocks that the policy runs in FP8 (their units hold the stored bytes), else
    (None, the first module that cannot page) — BF16 experts, or FP8 ones re-quantized to NVFP4."""
    c = source.config
    found = None
    for layer in range(c.num_hidden_layers):
        if not c.is_moe_layer(layer):
            continue
        m = f"model.layers.{layer}.mlp.experts.0.gate_proj"
        stored = source.linear_format(m)
        fmt = ("nvfp4" if stored == NVFP4 else
               "fp8_block" if stored == FP8_BLOCK and policy.runtime_format(m, stored) == FP8 else None)
        if fmt is None or (found is not None and fmt != found):
            return None, m
        found = fmt
    return found or "nvfp4", None


def host_tensor(address: int, nbytes_: int) -> Tensor:
    """A CPU uint8 tensor over host memory the C++ core owns (pinned units)."""
    buf = (ctypes.c_uint8 * nbytes_).from_address(address)
    return torch.frombuffer(buf, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------
# host points


@dataclass
class LayerPoint(HostPoint):
    layer: int
    rank: int


@dataclass(eq=False)
class RoutePoint(HostPoint):
    """Per MoE layer, static (its pinned buffers are captured by decode graphs)."""

    layer: int
    index: int                       # MoE layer index in the ExpertStore
    top_k: int
    ids_host: Tensor                 # int32 [max_rows · top_k], pinned
    pred_host: Optional[Tensor]      # int32 [max_rows · predicted], pinned
    epoch_host: Tensor               # int32 [1], pinned: the layer's epoch after this routing
    next_index: int = -1             # the MoE layer the prediction is for
    rows: int = 0                    # tokens in the current forward (set when the GPU work is issued)
    deferred: bool = False           # too many experts at once: resolved in waves by run()
    event: Optional[torch.cuda.Event] = None
    replayed: bool = False           # set by restore(): a graph replay, whose captured run() has no waves

    def epoch(self) -> int:
        """The layer's epoch word after this routing (uint32; the pinned copy is int32)."""
        return int(self.epoch_host[0]) & 0xFFFFFFFF

    def snapshot(self) -> int:
        return self.rows

    def restore(self, rows: int) -> None:
        # (deferred here is the last resolve's, e.g. a prefill's waves: it says nothing about this step)
        self.rows = rows
        self.replayed = True


# ---------------------------------------------------------------------------------------
# routed experts through the unit table


class PagedRoutedExperts(RoutedExperts):
    """One MoE layer's routed experts, read through ``table`` (int64 [E] unit addresses)."""

    graph_safe = True

    def __init__(self, store: "PagedWeightStore", index: int, layer: int):
        self.store, self.index, self.layer = store, index, layer
        c = store.config
        self.num_experts, self.hidden, self.inter = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        self.table = store.tables[index]                                          # int64 [E]
        lay = store.layout
        self.fp8 = store.fp8
        if self.fp8:
            self._gu = (lay["gate_up_weight"], lay["gate_up_scale"])
            self._dn = (lay["down_weight"], lay["down_scale"])
        else:
            self._gu = (lay["gate_up_qweight"], lay["gate_up_qscale"], lay["gate_up_scale"])
            self._dn = (lay["down_qweight"], lay["down_qscale"], lay["down_scale"])

    def group(self, row_offsets: Tensor, rows: int, max_rows: int) -> ExpertGroups:
        max_groups = max(1, min(self.num_experts, rows))
        expert_of_group, offsets = torch.ops.dsfp4.moe_compact_groups(row_offsets, max_groups)
        return ExpertGroups(offsets, expert_of_group, max_rows)

    def gate_up(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        if self.fp8:   # gate rows, then up rows, each with its own block grid (split at inter)
            return torch.ops.dsfp4.fp8_grouped_gemm_units(
                x.to(torch.bfloat16), groups.row_offsets, groups.slot_of_group, self.table, *self._gu,
                2 * self.inter, self.hidden, groups.max_rows, self.inter, 0, *self.store.ready_args(self.index))
        return torch.ops.dsfp4.fp4_grouped_gemm_units(
            x.to(torch.bfloat16), groups.row_offsets, groups.slot_of_group, self.table, *self._gu,
            2 * self.inter, self.hidden, groups.max_rows, 0, *self.store.ready_args(self.index))

    def down(self, x: Tensor, groups: ExpertGroups) -> Tensor:
        # gate_up waited for every expert of the step: nothing to wait for here
        if self.fp8:
            return torch.ops.dsfp4.fp8_grouped_gemm_units(
                x.to(torch.bfloat16), groups.row_offsets, groups.slot_of_group, self.table, *self._dn,
                self.hidden, self.inter, groups.max_rows)
        return torch.ops.dsfp4.fp4_grouped_gemm_units(
            x.to(torch.bfloat16), groups.row_offsets, groups.slot_of_group, self.table, *self._dn,
            self.hidden, self.inter, groups.max_rows)

    def route_point(self, layer: int, h: Tensor, weights: Tensor, ids: Tensor):
        return self.store._route_point(self, h, weights, ids)

    def run(self, x: Tensor, row_offsets: Tensor, tokens: int) -> Tensor:
        point = self.store.route_points[self.index]
        if point.deferred:
            return self.store._run_waves(self, x, row_offsets, tokens)
        y = super().run(x, row_offsets, tokens)
        if self.store.cpu_lane is not None and self.store.decoding:   # prefill never uses the lane
            self.store._cpu_join(self, y, row_offsets)
        return y

    @property
    def nbytes(self) -> int:
        return 0   # held by the store


# ---------------------------------------------------------------------------------------
# the store


class PagedWeightStore(BuiltWeights, WeightStore):
    """Weights paged inside a GPU budget (see the module docstring).

    Parameters
    ----------
    source : SafetensorsCheckpoint (the routed experts are read from its files on demand;
        they must be stored in NVFP4)
    device : torch device (a CUDA device; "cpu" runs the same pipeline in host memory)
    compute_dtype : torch.bfloat16 (the FP4 kernels)
    policy : PrecisionPolicy
    plan : the MemoryPlan carving the budget
    settings : PagingSettings
    max_rows : most tokens one forward runs (sizes the pinned id buffers)
    """

    def __init__(self, source: CheckpointSource, device: torch.device, compute_dtype: torch.dtype,
                 policy: PrecisionPolicy, plan: MemoryPlan, settings: PagingSettings, max_rows: int,
                 progress: bool = False, max_batch: Optional[int] = None):
        if compute_dtype != torch.bfloat16:
            raise ValueError("the paged store runs the FP4 kernels: dtype must be bfloat16")
        if not hasattr(source, "tensor_info"):
            raise ValueError("paging reads routed experts from safetensors files: open the model folder "
                             "(a StateDictCheckpoint has no files)")
        self.config = c = source.config
        self.device, self.compute_dtype, self.policy = device, compute_dtype, policy
        self.plan, self.settings = plan, settings.validate()
        self.on_device = device.type == "cuda"
        self.max_rows = max_rows
        self.max_batch = min(max_rows, max_batch or max_rows)   # rows of a decode step (the CPU lane's)
        self.expert_threshold = float(settings.expert_threshold)
        self.predict = settings.prefetch_layers > 0
        self.expert_format, bad = paged_expert_format(source, policy)
        if bad is not None:
            raise ValueError(f"{source.where(bad + '.weight')}: paging routed experts reads them from the checkpoint "
                             f"files as NVFP4 or FP8 blocks, but {bad} is stored as {source.linear_format(bad)} and "
                             f"runs as {policy.runtime_format(bad, source.linear_format(bad))}; convert the checkpoint "
                             f"with `deepseek-fp4 convert` or give a budget that holds every expert")
        self.fp8 = self.expert_format == "fp8_block"
        # ready words: copies signal each expert to the GEMM (needs the store's own copy stream)
        self.ready_mode = settings.enable_async_copy and settings.streams.get("transfer", True)
        pipe = settings.decode_pipeline
        if self.fp8 and settings.cpu_experts != "off":
            raise ValueError(f"cpu_experts={settings.cpu_experts!r}: the CPU expert kernels compute NVFP4 experts; "
                             f"this model's experts are FP8 blocks")
        self.pipeline = self.ready_mode and (self.on_device if pipe is None else pipe)
        self.pipeline_off_reason: Optional[str] = None   # set when the copy stream probe fails
        self._probed: set = set()                        # compute streams probed against the copy stream
        self.decoding = False    # set by begin_step: the forward is a decode step
        h, i = c.hidden_size, c.moe_intermediate_size
        self.layout = _C.fp8_expert_unit_layout(h, i) if self.fp8 else _C.paging.expert_unit_layout(h, i)
        if self.layout["bytes"] != plan.expert_unit_bytes:
            raise ValueError("the memory plan was made for another expert unit size")
        self._make_streams()
        conv = WeightConverter(source, device, compute_dtype, policy)

        self.moe_layers = [layer for layer in range(c.num_hidden_layers) if c.is_moe_layer(layer)]
        self.moe_index = {layer: i for i, layer in enumerate(self.moe_layers)}
        if not self.fp8:
            check_expert_global_scales(source, self.moe_layers)   # experts are read from the files, not linear()
        E = c.n_routed_experts
        nm = max(1, len(self.moe_layers))
        unit = self.layout["bytes"]
        # device memory, allocated once
        self.expert_buf = torch.empty(max(1, plan.expert_slots) * unit, dtype=torch.uint8, device=device)
        self.tables = torch.zeros(nm, E, dtype=torch.int64, device=device)
        self.sync = torch.zeros(_C.paging.pipeline_sync_words(nm, E), dtype=torch.int32, device=device)
        self.view_epoch_offset = nm * E     # sync: ready words [nm, E], epochs [nm], publish count
        self._step_pipelined, self._step_open, self._last_prefill_index = False, False, -1
        self.ring_buf = None
        if plan.paged_layers:
            self.ring_buf = torch.empty(plan.layer_slots * plan.layer_slot_bytes, dtype=torch.uint8, device=device)

        self.files, stored = self._stored_experts(source)
        self.experts = _C.paging.ExpertStore(self._store_options(plan), self.files, stored)
        self.experts.set_device_tables(self.tables.data_ptr(), self.sync.data_ptr())
        self.view = None
        if self.ready_mode:
            self.experts.start_pipeline()     # the mailbox; its thread only works inside decode steps
            self.view = self.experts.pipeline_view
        self.cpu_lane = None   # the CPU lane's CpuLaneView, once enabled
        self.cpu_x: Optional[Tensor] = None
        if plan.cpu_expert_threads:
            self._enable_cpu_lane(plan)

        self.ring = None
        self.rank_of = {layer: r for r, layer in enumerate(plan.paged_layers)}
        if plan.paged_layers:
            self.ring = _C.paging.LayerRing(len(plan.paged_layers), plan.layer_slots, plan.layer_slot_bytes,
                                            self.ring_buf.data_ptr(), self.on_device, settings.enable_async_copy,
                                            min(settings.prefetch_layers, plan.layer_slots - 1),
                                            settings.pinned_memory)

        it = range(c.num_hidden_layers)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="loading layers", unit="layer")
        self._embed = conv.embedding()
        self._norm = conv.final_norm()
        self._lm_head: Linear = conv.lm_head(self._embed)
        self._layers: List[LayerWeights] = []
        self._resident_layer_bytes = 0
        for layer in it:
            lw = conv.layer(layer, experts=False)
            if lw.moe is not None:
                lw.moe.experts = PagedRoutedExperts(self, self.moe_index[layer], layer)
            if layer in self.rank_of:
                lw = self._page_layer(layer, lw)
            self._layers.append(lw)
        self.formats = conv.formats
        self._make_route_points()
        self.prefetch_next_layer = True   # cleared by a layer-major prefill for all but a layer's last chunk

    # ---- construction helpers ------------------------------------------------------------
    def _make_streams(self) -> None:
        s = self.settings
        self.compute_stream = self.prefetch_stream = self.transfer_stream = None
        if not self.on_device:
            return
        pr = s.stream_priorities
        dev = self.device
        self.compute_stream = torch.cuda.Stream(dev, priority=-5 if pr else 0) if s.streams.get("compute", True) else None
        self.transfer_stream = torch.cuda.Stream(dev, priority=0) if s.streams.get("transfer", True) else None
        self.prefetch_stream = (torch.cuda.Stream(dev, priority=-2 if pr else 0) if s.streams.get("prefetch", True)
                                else None)

    def set_compute_streams(self, streams: Dict[str, bool]) -> None:
        """Turns the compute / prefetch / transfer streams on or off (off: that work runs on the
        current stream)."""
        bad = sorted(set(streams) - {"compute", "prefetch", "transfer"})
        if bad:
            raise ValueError(f"streams: unknown stream(s) {bad} (known: compute, prefetch, transfer)")
        merged = dict(self.settings.streams, **streams)
        self.settings.streams = merged
        self.settings.validate()
        self._make_streams()

    _RUNTIME = ("expert_threshold", "prefetch_layers", "prefetch_experts", "miss_mode", "cache_policy",
                "lrfu_lambda", "prefetch_size", "prefetch_min_accuracy", "streams", "stream_priorities",
                "expert_slots", "decode_pipeline", "cpu_experts")

    def reconfigure(self, **changes) -> None:
        """Changes knobs that need no new memory plan, between generations: expert_threshold,
        prefetch_layers (up to the ring's slots - 1 when layers are paged), prefetch_experts,
        miss_mode, cache_policy, lrfu_lambda, prefetch_size, streams, stream_priorities, and
        cpu_experts "off" / back on for an engine loaded with the CPU lane.
        Changing the policy, miss mode or prefetch size empties the GPU expert cache."""
        bad = sorted(set(changes) - set(self._RUNTIME))
        if bad:
            raise ValueError(f"reconfigure: {bad} need a new memory plan (reload the engine); runtime knobs: "
                             f"{', '.join(self._RUNTIME)}")
        self._end_abandoned_step()
        s = self.settings
        new = PagingSettings(**{**s.__dict__, **changes}).validate()
        if (self.ring is not None and new.prefetch_layers != s.prefetch_layers
                and new.prefetch_layers > self.plan.layer_slots - 1):
            raise ValueError(f"prefetch_layers = {new.prefetch_layers} needs {new.prefetch_layers + 1} layer slots; "
                             f"the plan has {self.plan.layer_slots} (reload the engine with the new setting)")
        if min(self.config.num_experts_per_tok, new.prefetch_experts or self.config.num_experts_per_tok) > self.pred_k:
            raise ValueError("prefetch_experts can only shrink without a reload (the prediction buffers are sized)")
        if new.cpu_experts != s.cpu_experts and new.cpu_experts != "off":
            if self.cpu_lane is None:
                raise ValueError("cpu_experts: this engine has no CPU lane (loaded with cpu_experts='off', or its plan "
                                 "gave the lane no threads); load it with cpu_experts set — at run time the lane "
                                 "can only be turned off and on again")
            if isinstance(new.cpu_experts, int) and new.cpu_experts != self.cpu_lane.threads:
                raise ValueError(f"cpu_experts = {new.cpu_experts}: the lane runs {self.cpu_lane.threads} threads; "
                                 f"another count needs a reload")
        if self.ring is not None and new.prefetch_layers != s.prefetch_layers:
            self.ring.set_prefetch(min(new.prefetch_layers, self.plan.layer_slots - 1))
        self.settings = new
        if self.cpu_lane is not None:
            self.experts.set_cpu_lane_active(new.cpu_experts != "off")
        self.expert_threshold = float(new.expert_threshold)
        self.predict = new.prefetch_layers > 0
        if new.prefetch_experts is not None:
            self.pred_k = min(self.pred_k, new.prefetch_experts)
        if new.streams != s.streams or new.stream_priorities != s.stream_priorities:
            self._make_streams()
        if new.expert_slots is not None and new.expert_slots > self.plan.expert_slots:
            raise ValueError(f"expert_slots = {new.expert_slots} exceeds the plan's {self.plan.expert_slots} GPU "
                             f"expert slots (give a larger memory_limit)")
        if new.decode_pipeline and not self.ready_mode:
            raise ValueError("decode_pipeline needs enable_async_copy=True (the store's own copy stream)")
        if changes.get("decode_pipeline") and self.pipeline_off_reason is not None:
            raise ValueError(f"decode_pipeline: {self.pipeline_off_reason}")
        self.pipeline = (self.ready_mode and self.pipeline_off_reason is None
                         and (self.on_device if new.decode_pipeline is None else new.decode_pipeline))
        if (new.miss_mode, new.cache_policy, new.lrfu_lambda, new.prefetch_size, new.prefetch_min_accuracy,
                new.expert_slots) != (s.miss_mode, s.cache_policy, s.lrfu_lambda, s.prefetch_size,
                                      s.prefetch_min_accuracy, s.expert_slots):
            o = self._store_options(self.plan)
            if new.miss_mode != "copy" and self.on_device and not new.pinned_memory:
                raise ValueError("zero-copy needs pinned_memory=True")
            self.experts.reconfigure(o.gpu_policy, o.lam, o.miss_mode, o.max_prefetch_units,
                                     o.prefetch_min_accuracy, self._stream_handles()[0],
                                     -1 if new.expert_slots is None else new.expert_slots)

    def _stream_handles(self) -> Tuple[int, int, int]:
        """(compute, transfer, prefetch) raw stream handles; compute is the current stream."""
        if not self.on_device:
            return 0, 0, 0
        cur = torch.cuda.current_stream(self.device).cuda_stream
        tr = self.transfer_stream.cuda_stream if self.transfer_stream is not None else cur
        pf = self.prefetch_stream.cuda_stream if self.prefetch_stream is not None else cur
        return cur, tr, pf

    def _store_options(self, plan: MemoryPlan):
        s, c = self.settings, self.config
        pol = {"lrfu": _C.paging.CachePolicy.lrfu, "lru": _C.paging.CachePolicy.lru}[s.cache_policy]
        mode = {"copy": _C.paging.MissMode.copy, "zero_copy": _C.paging.MissMode.zero_copy,
                "auto": _C.paging.MissMode.auto}[s.miss_mode]
        prefetch_cap = -1
        if s.prefetch_size is not None:
            prefetch_cap = int(s.prefetch_size * (1 << 30)) // self.layout["bytes"]
        o = _C.paging.ExpertStoreOptions()
        o.layers, o.experts = max(1, len(self.moe_layers)), c.n_routed_experts
        o.hidden, o.inter = c.hidden_size, c.moe_intermediate_size
        o.gpu_slots, o.gpu_base = min(plan.expert_slots, s.expert_slots or plan.expert_slots), self.expert_buf.data_ptr()
        o.host_slots, o.pinned = max(1, plan.host_expert_slots), s.pinned_memory and self.on_device
        o.on_device, o.gpu_policy, o.host_policy = self.on_device, pol, _C.paging.CachePolicy.lru
        o.lam, o.miss_mode, o.io_threads, o.repack_threads = float(s.lrfu_lambda), mode, s.io_threads, 2
        o.direct_io, o.async_copy = s.direct_io, self.ready_mode
        o.max_prefetch_units, o.prefetch_min_accuracy = prefetch_cap, float(s.prefetch_min_accuracy)
        o.max_step_copies = -1 if s.max_experts is None else int(s.max_experts)
        k = c.num_experts_per_tok
        o.pipeline_max_ids = self.max_rows * k
        o.pipeline_max_pred = self.max_rows * min(k, s.prefetch_experts or k)
        o.sim_copy_delay_us = int(s.sim_copy_delay_us)
        o.format = _C.paging.ExpertFormat.fp8_block if self.fp8 else _C.paging.ExpertFormat.nvfp4
        return o

    def _enable_cpu_lane(self, plan: MemoryPlan) -> None:
        """The CPU expert lane (cpu_experts): CPU threads compute decode misses from the host
        cache; the miss policy balances them against the bus from measured rates."""
        if not self.ready_mode:
            raise ValueError("cpu_experts needs enable_async_copy=True and the transfer stream on "
                             "(ready words order the GPU's side of the CPU lane)")
        c = self.config
        o = _C.paging.CpuLaneOptions()
        o.threads, o.isa, o.reserved_cores = plan.cpu_expert_threads, self.settings.cpu_isa, list(plan.cpu_reserved_cores)
        o.max_rows, o.top_k, o.bus_gbs = self.max_batch, c.num_experts_per_tok, self._bus_gbs()
        o.decoder_layers = list(self.moe_layers)
        try:
            self.experts.enable_cpu_lane(o)
        except NotImplementedError as e:   # no AVX2 + FMA, or the forced instruction set is missing
            raise ValueError(f"cpu_experts={self.settings.cpu_experts!r}: {e}") from None
        self.cpu_lane = self.experts.cpu_lane_view   # addresses and sizes (its rates: read the store's view anew)
        x = host_tensor(self.cpu_lane.x, self.max_batch * c.hidden_size * 2)
        self.cpu_x = x.view(torch.bfloat16).view(self.max_batch, c.hidden_size)

    def _bus_gbs(self) -> float:
        """Host → device rate of one expert unit's copy, measured now (CPU mode: the simulated
        copy delay, else memcpy)."""
        unit = int(self.layout["bytes"])
        if not self.on_device:
            if self.settings.sim_copy_delay_us > 0:
                return unit / (self.settings.sim_copy_delay_us * 1e3)
            src, dst = torch.empty(unit, dtype=torch.uint8), torch.empty(unit, dtype=torch.uint8)
            t0 = time.perf_counter()
            for _ in range(4):
                dst.copy_(src)
            return 4 * unit / max(time.perf_counter() - t0, 1e-9) / 1e9
        n = min(self.expert_buf.numel(), max(unit, 64 << 20))
        src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst = self.expert_buf[:n]    # the (still empty) expert slots: nothing beyond the plan
        dst.copy_(src, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return 3 * n / (start.elapsed_time(end) * 1e6)

    def _cpu_join(self, experts: "PagedRoutedExperts", y: Tensor, row_offsets: Tensor) -> None:
        """After the down GEMM: the rows of experts computed on the CPU replace the GEMM's NaN rows
        (one kernel that waits for the layer's CPU call; graph-safe)."""
        lane, v, i = self.cpu_lane, self.view, experts.index
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.on_device else 0
        _C.paging.cpu_lane_join(y.data_ptr(), row_offsets.data_ptr(), experts.table.data_ptr(), experts.num_experts,
                                experts.hidden, v.epoch(i), lane.done_dev + 4 * i, lane.ok_dev + 4 * i, lane.y_dev,
                                lane.max_rows * lane.top_k, v.wait_failed, v.wait_timeout_ns, self.on_device,
                                stream)

    def _stored_experts(self, source) -> Tuple[object, list]:
        """The byte ranges of every expert's 9 tensors, read from the safetensors headers."""
        c = self.config
        files: Dict[str, int] = {}
        stored = []
        h, i = c.hidden_size, c.moe_intermediate_size
        shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        for layer in self.moe_layers:
            for e in range(c.n_routed_experts):
                parts = []
                for proj in _PARTS:
                    m = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                    n, k = shapes[proj]
                    if self.fp8:   # e4m3 weight and float32 [ceil(n/128), ceil(k/128)] scales; no third part
                        grid = (-(-n // 128)) * (-(-k // 128))
                        for suffix, want in (("weight", n * k), ("weight_scale_inv", 4 * grid)):
                            info = source.tensor_info(f"{m}.{suffix}")
                            if info.nbytes != want:
                                raise ValueError(f"{info.file}: {info.name} holds {info.nbytes} bytes, expected {want}")
                            fi = files.setdefault(str(info.file), len(files))
                            parts.append((fi, info.offset, info.nbytes, info.name))
                        parts.append((0, 0, 0, ""))
                        continue
                    for suffix, want in (("weight", n * k // 2), ("weight_scale", n * k // 16), ("weight_scale_2", 4)):
                        info = source.tensor_info(f"{m}.{suffix}")
                        if info.nbytes != want:
                            raise ValueError(f"{info.file}: {info.name} holds {info.nbytes} bytes, expected {want}")
                        fi = files.setdefault(str(info.file), len(files))
                        parts.append((fi, info.offset, info.nbytes, info.name))
                stored.append(parts)
        paths = sorted(files, key=files.get)
        handle = _C.paging.CheckpointFiles(paths, self.settings.direct_io)
        return handle, stored

    def _page_layer(self, layer: int, lw: LayerWeights) -> LayerWeights:
        """Packs the per-layer weights into the host unit of the layer's rank and returns
        the same bundle as views into its ring slot."""
        rank = self.rank_of[layer]
        plan = self.plan
        tensors: List[Tensor] = []
        _map_layer(lw, lambda t: tensors.append(t) or t, self.config, self.compute_dtype)
        offsets, off = [], 0
        for t in tensors:
            offsets.append(off)
            off += (t.numel() * t.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN
        if off > plan.layer_slot_bytes:
            raise RuntimeError(f"layer {layer}: its weights take {off} bytes, more than the planned slot "
                               f"({plan.layer_slot_bytes})")
        host = host_tensor(self.ring.host_unit(rank), plan.layer_slot_bytes)
        slot = self.ring_buf[(rank % plan.layer_slots) * plan.layer_slot_bytes:][:plan.layer_slot_bytes]
        it = iter(offsets)

        def place(t: Tensor) -> Tensor:
            o = next(it)
            n = t.numel() * t.element_size()
            host[o:o + n].copy_(t.detach().reshape(-1).contiguous().view(torch.uint8))
            return slot[o:o + n].view(t.dtype).view(t.shape)

        return _map_layer(lw, place, self.config, self.compute_dtype)

    def _make_route_points(self) -> None:
        c = self.config
        pin = self.on_device   # graphs copy ids into these: always pinned on CUDA
        k = c.num_experts_per_tok
        self.pred_k = min(k, self.settings.prefetch_experts or k)
        self.route_points: List[RoutePoint] = []
        for i, layer in enumerate(self.moe_layers):
            ids = torch.zeros(self.max_rows * k, dtype=torch.int32, pin_memory=pin)
            nxt = i + 1 if i + 1 < len(self.moe_layers) else -1
            pred = torch.zeros(self.max_rows * self.pred_k, dtype=torch.int32, pin_memory=pin) if nxt >= 0 else None
            ev = torch.cuda.Event() if self.on_device else None
            epoch = torch.zeros(1, dtype=torch.int32, pin_memory=pin)
            self.route_points.append(RoutePoint(layer, i, k, ids, pred, epoch, nxt, event=ev))

    # ---- WeightStore ---------------------------------------------------------------------
    compute_stream: Optional[torch.cuda.Stream] = None   # set by _make_streams
    reads_source = True                                   # experts are read from the files while running

    @property
    def graph_safe(self) -> bool:
        return self.on_device

    @property
    def pages(self) -> bool:
        return True

    @property
    def prefill_group_tokens(self) -> int:
        return int(getattr(self.plan, "prefill_group_tokens", 0) or 0)

    def begin_step(self, tokens: int, decode: bool = False) -> None:
        if tokens > self.max_rows:
            raise ValueError(f"a forward of {tokens} tokens exceeds the {self.max_rows} the paged store was sized for")
        self._end_abandoned_step()
        if decode:
            self.prepare_decode()
        self.decoding = decode
        self.experts.begin_step(not decode)
        if decode and self.pipeline:
            self.experts.begin_pipeline_step(self._stream_handles()[0])
        self._step_pipelined = decode and self.pipeline
        self._step_open = True
        self._last_prefill_index = -1

    def prepare_decode(self) -> None:
        """The pipeline's GEMMs wait on the current stream for copies issued later on the store's
        copy stream: if the two share a hardware queue (CUDA_DEVICE_MAX_CONNECTIONS, 8 by
        default; streams take queues in turn), those copies queue behind the waiting work and
        every wait times out. Each stream a decode step runs on is probed once; a failing probe
        replaces the copy stream, and when none passes the pipeline is turned off, with the reason
        in ``pipeline_off_reason`` (decode then resolves each layer from the host)."""
        if not (self.pipeline and self.on_device) or torch.cuda.is_current_stream_capturing():
            return
        cur = torch.cuda.current_stream(self.device).cuda_stream
        if cur in self._probed:
            return
        self._end_abandoned_step()   # the probe is refused while a step is open
        conns = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8")   # as CUDA read it at start-up
        try:
            n = int(conns)
        except ValueError:
            n = 8
        why = None
        if n <= 1:
            why = f"CUDA_DEVICE_MAX_CONNECTIONS={conns} puts every stream on one hardware queue"
        else:
            try:
                ok, tries = self.experts.check_copy_stream(sorted(self._probed | {cur}), n + 1)
            except RuntimeError as e:   # e.g. no memory left for the probe's buffers
                ok, tries, why = False, 0, f"the copy stream probe failed ({e})"
            if ok:
                self._probed.add(cur)
                return
            why = why or (f"the store's copy stream found no hardware queue apart from the compute stream "
                          f"(CUDA_DEVICE_MAX_CONNECTIONS={conns}, {tries} probes)")
        self._probed.clear()
        self.pipeline = False
        self.pipeline_off_reason = (f"{why}, so the copies would wait behind the GEMMs that wait for them: the "
                                    f"decode pipeline is off (more connections, up to 32, give streams more queues)")
        warnings.warn(self.pipeline_off_reason, RuntimeWarning, stacklevel=2)

    @property
    def decode_mode(self) -> bool:
        return self.pipeline

    def _end_abandoned_step(self) -> None:
        """A step that raised before end_step is still open in the store: end it now. Else a
        decode step's thread would go on taking publishes (a prefill's too) and every later step
        or reconfigure would be refused, and its leftover error or timed-out wait would fail the
        next request. Its error is moot: that step was already lost."""
        if self._step_open:
            try:
                self.end_step()
            except Exception:
                pass

    def end_step(self) -> None:
        self._step_open = False
        if getattr(self, "_step_pipelined", False):
            self._step_pipelined = False
            self.experts.end_pipeline_step()     # raises the step's first error
        else:
            if self.ready_mode and self.on_device:
                # the step's kernels ran: a wait that timed out has set its flag by now
                torch.cuda.current_stream(self.device).synchronize()
            self.experts.take_error()

    def ready_args(self, index: int) -> Tuple[int, int, int, int]:
        """(ready words, epoch word, wait flag, timeout ns) of MoE layer ``index`` for the GEMM
        (zeros: the GEMM does not wait; the host resolved before launching it)."""
        if not self.ready_mode:
            return 0, 0, 0, 0
        v = self.view
        return v.ready(index), v.epoch(index), v.wait_failed, v.wait_timeout_ns

    def layer_points(self, layer: int) -> Generator[HostPoint, None, None]:
        if layer in self.rank_of:
            yield LayerPoint(layer, self.rank_of[layer])

    def resolve(self, point: HostPoint) -> None:
        compute, transfer, prefetch = self._stream_handles()
        if isinstance(point, LayerPoint):
            self.ring.acquire(point.rank, compute, transfer, prefetch)
            return
        assert isinstance(point, RoutePoint)
        if point.event is not None:
            point.event.record()
            point.event.synchronize()
        count = point.rows * point.top_k
        ids = point.ids_host
        if self.expert_threshold > 0:
            self.experts.add_skipped(point.index, int((ids[:count] < 0).sum()))
        if not self.decoding and point.index != self._last_prefill_index:
            # prefill: the layers already done are not needed again before the next step
            self.experts.demote_layers_before(point.index)
            self._last_prefill_index = point.index
        capacity = self._wave_capacity()
        replayed, point.replayed = point.replayed, False
        # a replayed graph runs no waves: it takes every expert at once (the ones past the GPU slots
        # read in place, or a clear error), never a table left for waves that do not come
        point.deferred = not replayed and count > capacity and len(np.unique(ids[:count].numpy())) > capacity
        if point.deferred:
            return   # run() brings the experts in waves, then prefetches the next layer
        if self.ready_mode:
            # the layer's whole routing: the CPU lane may take misses (the join follows the down GEMM)
            self.experts.resolve_ready(point.index, ids.data_ptr(), count, point.epoch(), compute,
                                       whole_routing=self.cpu_lane is not None)
        else:
            self.experts.resolve(point.index, ids.data_ptr(), count, compute)
        self._prefetch_next(point)

    def _wave_capacity(self) -> int:
        """Most distinct experts one resolve of a prefill takes: half of what must hold them at
        once (GPU slots for copies, the host cache for every miss), so that the next wave's
        copies land while this wave computes."""
        host = self.plan.host_expert_slots
        gpu = host if self.settings.miss_mode == "zero_copy" else self.plan.expert_slots
        return max(1, min(gpu, host) // 2)

    def _prefetch_next(self, point: RoutePoint) -> None:
        """Speculative: the experts the next MoE layer is predicted to pick. Skipped for all but
        the last chunk of a layer-major prefill, whose later chunks still need this layer's."""
        if not (self.predict and self.prefetch_next_layer and point.next_index >= 0 and point.pred_host is not None):
            return
        self.experts.prefetch(point.next_index, point.pred_host.data_ptr(), point.rows * self.pred_k,
                              self._stream_handles()[0])

    # ---- the GPU side of a route point -----------------------------------------------------
    def _route_point(self, experts: PagedRoutedExperts, h: Tensor, weights: Tensor, ids: Tensor):
        """h [N, D] the MoE input, weights/ids [N, K] → (weights, ids, point or None). Graph-safe."""
        c = self.config
        point = self.route_points[experts.index]
        n = ids.shape[0]
        if n > self.max_rows:
            raise ValueError(f"{n} tokens in one forward exceed the paged store's {self.max_rows}")
        if self.expert_threshold > 0:
            weights, ids = self._threshold(experts.table, weights, ids)
        point.rows = n
        point.deferred = False
        ids = ids.contiguous()
        pred = None
        if self.predict and point.next_index >= 0:
            nxt = self._layers[self.moe_layers[point.next_index]].moe
            logits = F.linear(h.reshape(-1, h.shape[-1]).float(), nxt.router)          # [N, E]
            _, pred = torch.ops.dsfp4.moe_route(logits, nxt.correction_bias, self.pred_k, c.n_group,
                                                min(c.topk_group, c.n_group), c.routed_scaling_factor,
                                                c.norm_topk_prob)                      # [N, k'] int32
            pred = pred.contiguous()
        if self.cpu_x is not None and self.decoding and n <= self.max_batch:
            # the CPU lane reads the MoE input from host memory (copied before the routing is published)
            self.cpu_x[:n].copy_(h.reshape(-1, h.shape[-1]), non_blocking=True)
        if self.ready_mode:
            # bumps the layer's epoch; inside a pipelined decode step the store's thread takes it from here
            stream = torch.cuda.current_stream(self.device).cuda_stream if self.on_device else 0
            _C.paging.publish_route(self.view, point.index, point.next_index if pred is not None else -1,
                                    ids.data_ptr(), n * point.top_k, 0 if pred is None else pred.data_ptr(),
                                    0 if pred is None else n * self.pred_k, stream)
            if self.decoding and self.pipeline:
                return weights, ids, None
            point.epoch_host.copy_(self.sync[self.view_epoch_offset + point.index:][:1], non_blocking=True)
        point.ids_host[: n * point.top_k].copy_(ids.reshape(-1), non_blocking=True)
        if pred is not None:
            point.pred_host[: n * self.pred_k].copy_(pred.reshape(-1), non_blocking=True)
        return weights, ids, point

    def _threshold(self, table: Tensor, weights: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
        """expert_threshold: drop routed experts that are not on the GPU and whose normalized
        weight is below the threshold; the rest are renormalized to the same total. The top
        expert of each token is always kept. Graph-safe (device ops only)."""
        lo = self.expert_buf.data_ptr()
        hi = lo + self.expert_buf.numel()
        addr = table[ids.long()]                                                       # [N, K]
        on_gpu = (addr >= lo) & (addr < hi)
        total = weights.sum(-1, keepdim=True)
        norm = weights / total.clamp_min(1e-20)
        drop = (~on_gpu) & (norm < self.expert_threshold)
        drop[:, 0] = False   # routing orders by score: column 0 is the top expert
        kept = weights.masked_fill(drop, 0.0)
        kept = kept * (total / kept.sum(-1, keepdim=True).clamp_min(1e-20))
        return kept, ids.masked_fill(drop, -1)

    def _run_waves(self, experts: PagedRoutedExperts, x: Tensor, row_offsets: Tensor, tokens: int) -> Tensor:
        """Eager prefill over more experts than the GPU cache holds: resolve and run them in
        waves of at most half the cache; a wave's copies (issued before the previous wave's
        GEMMs finish) land while those GEMMs run, and each GEMM starts on its experts as they land."""
        offs = row_offsets.cpu().numpy()
        counts = offs[1:] - offs[:-1]
        used = np.nonzero(counts > 0)[0].astype(np.int32)
        cap = self._wave_capacity()
        y = torch.zeros(x.shape[0], self.config.hidden_size, dtype=torch.bfloat16, device=x.device)
        compute, _, _ = self._stream_handles()
        point = self.route_points[experts.index]
        epoch = point.epoch()
        waves = [np.ascontiguousarray(used[w0:w0 + cap]) for w0 in range(0, len(used), cap)]
        meta = []
        for wave in waves:   # the group layout of every wave, with one host → device copy
            e0, e1 = int(wave[0]), int(wave[-1])
            lo, hi = int(offs[e0]), int(offs[e1 + 1])
            meta.append((lo, hi, (offs[e0:e1 + 2] - lo).astype(np.int32), np.arange(e0, e1 + 1, dtype=np.int32)))
        packed = torch.from_numpy(np.concatenate([np.concatenate([m[2], m[3]]) for m in meta]))
        packed = packed.pin_memory().to(x.device, non_blocking=True) if self.on_device else packed
        at = 0
        for wave, (lo, hi, sub, slots) in zip(waves, meta):
            if self.ready_mode:
                self.experts.resolve_ready(experts.index, wave.ctypes.data, len(wave), epoch, compute)
            else:
                self.experts.resolve(experts.index, wave.ctypes.data, len(wave), compute)
            groups = ExpertGroups(packed[at:at + len(sub)], packed[at + len(sub):at + len(sub) + len(slots)], tokens)
            at += len(sub) + len(slots)
            hmid = torch.ops.dsfp4.silu_mul(experts.gate_up(x[lo:hi], groups))
            y[lo:hi] = experts.down(hmid, groups)
        self._prefetch_next(point)
        return y

    def pin_expert(self, layer: int, expert: int, pinned: bool = True) -> None:
        """Keeps routed expert ``expert`` of decoder layer ``layer`` in a GPU slot (loading it
        now), or releases it to the cache policy again."""
        if layer not in self.moe_index:
            raise ValueError(f"pin_expert: layer {layer} is not a MoE layer (MoE layers: {self.moe_layers})")
        if not 0 <= expert < self.config.n_routed_experts:
            raise ValueError(f"pin_expert: expert {expert} is outside [0, {self.config.n_routed_experts})")
        self.experts.set_pinned(self.moe_index[layer], expert, pinned, self._stream_handles()[0])

    # ---- reports ---------------------------------------------------------------------------
    def counters(self) -> Dict[str, object]:
        """Counters for the monitor: per tier and direction, hit rates, prediction accuracy."""
        tot = self.experts.counters(-1)
        per_layer = [self.experts.counters(i) for i in range(len(self.moe_layers))]
        ring = self.ring.counters() if self.ring is not None else {}
        lane = self.experts.cpu_lane_view if self.cpu_lane is not None else None
        unit = self.layout["bytes"]
        req = max(1, tot["requests"])
        out = {
            "experts": tot,
            "per_layer": per_layer,
            "layers": ring,
            "files": self.experts.files_counters(),
            "expert_hit_rate": tot["gpu_hits"] / req,
            "host_hit_rate": (tot["gpu_hits"] + tot["host_hits"]) / req,
            "prefetch_accuracy": (tot["predicted_used"] / tot["used_after_prediction"]
                                  if tot["used_after_prediction"] else None),
            "wasted_bytes": tot["prefetch_wasted"] * unit,
            "h2d_bytes": tot["h2d_bytes"] + ring.get("h2d_bytes", 0),
            "zero_copy_bytes": tot["zero_copy_bytes"],
            "ssd_bytes": tot["ssd_bytes"],
            "layer_hit_rate": (ring["hits"] / ring["requests"]) if ring.get("requests") else None,
            # threads, instruction set and the rates the miss policy balances (the CPU's updated as it runs)
            "cpu_lane": None if lane is None else {
                k: getattr(lane, k) for k in ("threads", "isa", "bus_gbs", "cpu_gbs")},
        }
        return out

    def reset_counters(self) -> None:
        self.experts.reset_counters()
        if self.ring is not None:
            self.ring.reset_counters()

    def memory_report(self) -> Dict[str, int]:
        rep = {"embedding": nbytes(self._embed), "lm_head": self._lm_head.nbytes if not
               self.config.tie_word_embeddings else 0, "attention": 0, "dense_mlp": 0, "experts": 0,
               "shared_experts": 0, "router_and_norms": nbytes(self._norm)}
        for layer, lw in enumerate(self._layers):
            if layer not in self.rank_of:
                add_layer_report(rep, lw)
            elif lw.moe is not None:
                rep["router_and_norms"] += nbytes(lw.moe.router) + nbytes(lw.moe.correction_bias)
        rep["expert_cache"] = nbytes(self.expert_buf)
        rep["layer_slots"] = 0 if self.ring_buf is None else nbytes(self.ring_buf)
        rep["expert_tables"] = nbytes(self.tables)
        rep["total"] = sum(rep.values())
        return rep


# ---------------------------------------------------------------------------------------
# mapping the tensors of a layer bundle (packing into units)


def _map_linear(x: Optional[Linear], fn) -> Optional[Linear]:
    if x is None:
        return None
    if hasattr(x, "map_tensors"):   # FP8 linears map their own tensors
        return x.map_tensors(fn)
    if isinstance(x, Fp4Linear):
        w = x.weight
        return Fp4Linear(Fp4Weight(fn(w.qweight), fn(w.qscale), fn(w.global_scale), w.n, w.k),
                         None if x.bias is None else fn(x.bias))
    if isinstance(x, DenseLinear):
        return DenseLinear(fn(x.weight), None if x.bias is None else fn(x.bias), x.fp4)
    if isinstance(x, _ConcatLinear):
        return _ConcatLinear([_map_linear(p, fn) for p in x.parts])
    raise TypeError(f"cannot page a {type(x).__name__}")


def _map_layer(lw: LayerWeights, fn, config, dtype: torch.dtype) -> LayerWeights:
    """The same bundle with every per-layer tensor replaced by fn(tensor), in a fixed order.
    Router, correction bias and routed experts are left as they are (they are not paged with
    the layer); w_uk / w_uv of a dense kv_b stay views of it."""
    a = lw.attn
    m = lambda t: None if t is None else fn(t)  # noqa: E731
    attn = AttentionWeights(_map_linear(a.qkv_a, fn), m(a.q_a_norm), _map_linear(a.q_b, fn), _map_linear(a.q, fn),
                            _map_linear(a.kv_a, fn), m(a.kv_a_norm), _map_linear(a.kv_b, fn), None, None,
                            _map_linear(a.o, fn))
    if isinstance(attn.kv_b, DenseLinear):
        split_kv_b(attn, config, dtype)
    else:
        attn.w_uk, attn.w_uv = m(a.w_uk), m(a.w_uv)   # None when kv_b reads them in FP8
    mlp = None if lw.mlp is None else MlpWeights(_map_linear(lw.mlp.gate_up, fn), _map_linear(lw.mlp.down, fn))
    moe = None
    if lw.moe is not None:
        sh = lw.moe.shared
        shared = None if sh is None else MlpWeights(_map_linear(sh.gate_up, fn), _map_linear(sh.down, fn))
        moe = MoeWeights(lw.moe.router, lw.moe.correction_bias, lw.moe.experts, shared)
    return LayerWeights(fn(lw.input_norm), fn(lw.post_attention_norm), attn, mlp, moe)
