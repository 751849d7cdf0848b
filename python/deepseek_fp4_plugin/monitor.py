"""PerfMonitor: one home for what a run measures, and what it says about the run.

    model = DeepseekInference("path/to/model", memory_limit=16)
    model.perf_monitor.start()                  # NVML sampling thread + per-step engine figures
    model.generate("...", max_tokens=64)
    metrics = model.perf_monitor.get_utilization()
    print(model.perf_monitor.analyze_bottlenecks()["verdict"])
    for s in model.perf_monitor.get_optimization_suggestions():
        print(s["knob"], s["value"], s["expected_effect"])

Three sources feed it:

- NVML (nvml.py), on a background thread every ``interval_s``: GPU and memory utilization,
  memory used, SM clock and activity, PCIe RX/TX. Without a GPU these say "unavailable".
- The engine, after every prefill and decode step (``Engine.step_observers``): stage, seconds,
  rows, the generating thread's CPU time; and, at most every ``interval_s``, a snapshot of the
  weight store's counters (``store.counters()``) and of the CUDA allocator.
- Ceilings measured on this machine (ceilings.py), which the analysis compares rates against.

Everything lives in bounded rings; ``export()`` writes the run as a JSON trace, and
``PerfMonitor.from_trace`` reads one back (analysis, reports, tests on recorded runs).

``COUNTERS`` below is the one place that knows the store's counter names: a new counter is a
new line there. Numeric counters it does not name are still kept in every snapshot (by their
dotted path), so they reach the trace before anything reads them.
"""

from __future__ import annotations

import datetime
import os
import statistics
import threading
import time
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import torch

from .nvml import GpuSampler

TRACE_VERSION = 1

# metric → where the store's counters() keeps it (first path present wins). Additive counters
# only: rates are recomputed from their parts over the window asked for.
COUNTERS: Dict[str, Tuple[str, ...]] = {
    "expert_requests": ("experts.requests",),
    "expert_gpu_hits": ("experts.gpu_hits",),
    "expert_prefetch_hits": ("experts.prefetch_hits",),
    "expert_host_hits": ("experts.host_hits",),
    "expert_copies": ("experts.copies",),
    "expert_zero_copy": ("experts.zero_copy",),
    "expert_evictions": ("experts.evictions",),
    "expert_skipped": ("experts.skipped",),
    "ssd_reads": ("experts.ssd_reads",),
    "predicted_used": ("experts.predicted_used",),
    "used_after_prediction": ("experts.used_after_prediction",),
    "prefetch_copies": ("experts.prefetch_copies",),
    "prefetch_wasted": ("experts.prefetch_wasted",),
    "layer_requests": ("layers.requests",),
    "layer_hits": ("layers.hits",),
    "layer_copies": ("layers.copies",),
    "h2d_bytes": ("h2d_bytes",),  # experts + layer units, host → device copies
    "layer_h2d_bytes": ("layers.h2d_bytes",),
    "zero_copy_bytes": ("zero_copy_bytes",),  # read in place over the bus by the GEMM
    "ssd_bytes": ("ssd_bytes",),
    "wasted_bytes": ("wasted_bytes",),  # speculative copies of experts not used
    "disk_wait_ms": ("experts.wait_ms",),  # host time resolve() blocked on disk reads
    # compute waiting for weights, and the CPU expert lane, where the store reports them
    "weight_wait_ms": ("weight_wait_ms", "experts.weight_wait_ms", "experts.stall_ms", "stall_ms"),
    "cpu_experts": ("cpu_experts", "experts.cpu_experts", "experts.cpu_computed", "cpu.experts"),
    "cpu_expert_ms": ("cpu_expert_ms", "experts.cpu_ms", "cpu.ms"),
    "cpu_expert_bytes": ("experts.cpu_bytes",),  # unit bytes the CPU lane read
    # the decode pipeline: layers its thread resolved, and its host time from seeing a layer's
    # routed ids to issuing the last ready word (summed)
    "pipeline_publishes": ("experts.publishes",),
    "pipeline_resolve_ms": ("experts.publish_to_ready_ms",),
    "expert_failed": ("experts.failed",),
    "prefetch_cancelled": ("experts.prefetch_cancelled",),
    "file_read_s": ("files.seconds",),
}
PER_LAYER_KEYS = ("requests", "gpu_hits", "host_hits", "copies")


def flatten_counters(counters: Dict[str, Any]) -> Dict[str, float]:
    """Every numeric leaf of ``store.counters()`` by dotted path (per-layer lists apart)."""
    flat: Dict[str, float] = {}

    def walk(prefix: str, d: Dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[prefix + k] = v

    walk("", {k: v for k, v in counters.items() if k != "per_layer"})
    return flat


def counter(flat: Dict[str, float], metric: str) -> Optional[float]:
    """The value of ``metric`` (a COUNTERS key) in a flattened snapshot, or None."""
    for path in COUNTERS[metric]:
        if path in flat:
            return flat[path]
    return None


def snapshot_counters(counters: Dict[str, Any]) -> Dict[str, Any]:
    per_layer = counters.get("per_layer") or []
    return {
        "flat": flatten_counters(counters),
        "per_layer": [{k: d.get(k, 0) for k in PER_LAYER_KEYS} for d in per_layer if isinstance(d, dict)],
    }


def counter_deltas(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """metric → b − a for every COUNTERS metric (None where either snapshot lacks it)."""
    out: Dict[str, Optional[float]] = {}
    for m in COUNTERS:
        x, y = counter(a["flat"], m), counter(b["flat"], m)
        out[m] = None if x is None or y is None else y - x
    return out


def per_layer_hit_rates(a: Dict[str, Any], b: Dict[str, Any]) -> List[Optional[float]]:
    """Expert GPU hit rate of each MoE layer between two snapshots (None: no requests)."""
    pa, pb = a.get("per_layer") or [], b.get("per_layer") or []
    out: List[Optional[float]] = []
    for i, lb in enumerate(pb):
        la = pa[i] if i < len(pa) else {k: 0 for k in PER_LAYER_KEYS}
        req = lb.get("requests", 0) - la.get("requests", 0)
        out.append((lb.get("gpu_hits", 0) - la.get("gpu_hits", 0)) / req if req > 0 else None)
    return out


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or not den else num / den


class PerfMonitor:
    """Performance figures of one engine (see the module docstring).

    Parameters
    ----------
    target : an Engine, a DeepseekInference (followed across its reloads), or None (GPU only)
    interval_s : NVML sampling interval and the least time between counter snapshots
    capacity : samples kept per ring (the oldest drop out)
    ceilings : this machine's ceilings (ceilings.measure_ceilings); None: measured (or read
        from the cache) when the analysis first needs them
    """

    def __init__(
        self,
        target: Any = None,
        interval_s: float = 0.1,
        capacity: int = 4096,
        ceilings: Optional[Dict[str, Any]] = None,
    ):
        self._target = target
        self.interval_s = _check_interval(interval_s)
        self.capacity = int(capacity)
        self.ceilings = ceilings
        self.samples: Deque[Dict[str, Any]] = deque(maxlen=self.capacity)  # NVML
        self.steps: Deque[Dict[str, Any]] = deque(maxlen=self.capacity)  # engine steps
        self.snapshots: Deque[Dict[str, Any]] = deque(maxlen=self.capacity)  # counters + allocator
        self._lock = threading.Lock()
        self._gpu: Optional[GpuSampler] = None
        self._gpu_reason = "not started"
        self._attached = None
        self._running = False
        self._t0 = time.perf_counter()
        self._proc0 = (time.process_time(), self._t0)
        self._proc: Optional[Tuple[float, float]] = None
        self._last_snap = -1e9
        self._last_thread: Optional[Tuple[float, float]] = None
        self._offline: Optional[Dict[str, Any]] = None  # a trace read back (from_trace)
        self.label = ""

    # ---- which engine ----------------------------------------------------------------------
    @property
    def engine(self):
        t = self._target
        if t is None:
            return None
        return t.engine if hasattr(t, "engine") and hasattr(t, "apply_config") else t

    def follow(self, engine) -> None:
        """The target loaded a new engine (a reload): record its steps from now on."""
        if self._running:
            self._attach(engine)

    def _attach(self, engine=None) -> None:
        eng = engine if engine is not None else self.engine
        if eng is self._attached:
            return
        if self._attached is not None:
            _remove(self._attached.step_observers, self.on_step)
        if eng is not None and hasattr(eng, "step_observers"):
            eng.step_observers.append(self.on_step)
        self._attached = eng

    def _detach(self) -> None:
        if self._attached is not None:
            _remove(self._attached.step_observers, self.on_step)
        self._attached = None

    # ---- running ---------------------------------------------------------------------------
    def set_sample_rate(self, hz: float) -> None:
        """NVML samples (and at most counter snapshots) per second."""
        if isinstance(hz, bool) or not isinstance(hz, (int, float)) or not hz > 0:
            raise ValueError(f"sample rate must be a positive number of samples per second, got {hz!r}")
        self.interval_s = _check_interval(1.0 / hz)
        if self._gpu is not None:
            self._gpu.interval_s = self.interval_s

    def start(self) -> "PerfMonitor":
        """Clears the rings and starts a window: NVML sampling, engine step figures."""
        if self._offline is not None:
            raise ValueError("this monitor holds a recorded trace; create a new PerfMonitor to record")
        self.stop()
        self.samples.clear()
        self.steps.clear()
        self.snapshots.clear()
        self._t0 = time.perf_counter()
        self._proc0 = (time.process_time(), self._t0)
        self._proc = None
        self._last_thread = None
        dev = self._device()
        if dev is not None and dev.type == "cuda":
            self._gpu, self._gpu_reason = GpuSampler.open(dev.index or 0, self.samples, self.interval_s)
        elif dev is None and torch.cuda.is_available():
            self._gpu, self._gpu_reason = GpuSampler.open(
                torch.cuda.current_device(), self.samples, self.interval_s
            )
        else:
            self._gpu, self._gpu_reason = None, "unavailable: the engine runs on the CPU"
        if self._gpu is not None:
            self._gpu.t0 = self._t0
            self._gpu.start()
        self._attach()
        self._snapshot(force=True)
        self._running = True
        return self

    def stop(self) -> "PerfMonitor":
        """Ends the window (a last counter snapshot); the figures stay readable."""
        if not self._running:
            return self
        self._snapshot(force=True)
        if self._gpu is not None:
            self._gpu.close()
        self._detach()
        self._proc = (time.process_time(), time.perf_counter())
        self._running = False
        return self

    def __enter__(self) -> "PerfMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._running

    def _device(self) -> Optional[torch.device]:
        eng = self.engine
        return getattr(eng, "device", None)

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    # ---- what the engine reports -------------------------------------------------------------
    def on_step(self, stage: str, seconds: float, rows: int) -> None:
        """Called by the engine after each prefill ("prefill", prompt tokens) and decode step
        ("decode", batch rows), in the generating thread."""
        if self._running:
            self._attach()  # a DeepseekInference may have reloaded its engine
        now = time.perf_counter()
        cpu = time.thread_time()
        busy = None
        if self._last_thread is not None and stage == "decode":
            wall = now - self._last_thread[1]
            if 0 < wall <= seconds * 1.5 + 0.005:  # consecutive steps of one call
                busy = min(1.0, (cpu - self._last_thread[0]) / wall)
        self._last_thread = (cpu, now)
        with self._lock:
            self.steps.append(
                {
                    "t": now - self._t0,
                    "stage": stage,
                    "seconds": float(seconds),
                    "rows": int(rows),
                    "thread_busy": busy,
                }
            )
        self._snapshot()

    def _snapshot(self, force: bool = False) -> None:
        now = self._now()
        if not force and now - self._last_snap < self.interval_s:
            return
        self._last_snap = now
        eng = self.engine
        snap: Dict[str, Any] = {"t": now}
        if eng is not None:
            try:
                snap.update(snapshot_counters(eng.store.counters()))
            except Exception as e:  # a store mid-failure still leaves the monitor usable
                snap["error"] = str(e)
        snap.update(allocator_stats(self._device()))
        with self._lock:
            self.snapshots.append(snap)

    # ---- the figures -----------------------------------------------------------------------
    def export(self) -> Dict[str, Any]:
        """The run as a JSON-ready trace (see ``from_trace``)."""
        if self._offline is not None:
            return self._offline
        if self._running:
            self._snapshot(force=True)
            if self._gpu is not None:
                self.samples.append(self._gpu.read())
        proc_end = self._proc or (time.process_time(), time.perf_counter())
        with self._lock:
            trace = {
                "version": TRACE_VERSION,
                "label": self.label,
                "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": self._device_info(),
                "config": engine_config(self.engine),
                "ceilings": self.ceilings,
                "process": {
                    "cpu_s": proc_end[0] - self._proc0[0],
                    "wall_s": proc_end[1] - self._proc0[1],
                    "cores": os.cpu_count(),
                    "load1": _load1(),
                },
                "samples": list(self.samples),
                "steps": list(self.steps),
                "snapshots": list(self.snapshots),
            }
        return trace

    @classmethod
    def from_trace(cls, trace: Dict[str, Any]) -> "PerfMonitor":
        """A monitor over a recorded trace (analysis, suggestions, reports; no recording)."""
        if not isinstance(trace, dict) or trace.get("version") != TRACE_VERSION:
            raise ValueError(f"not a PerfMonitor trace of version {TRACE_VERSION}")
        m = cls(None, ceilings=trace.get("ceilings"))
        m._offline = trace
        m.label = trace.get("label", "")
        return m

    def _device_info(self) -> Dict[str, Any]:
        dev = self._device()
        info: Dict[str, Any] = {
            "type": dev.type if dev is not None else "none",
            "nvml": self._gpu is not None,
            "nvml_reason": self._gpu_reason,
        }
        if self._gpu is not None:
            info.update(name=self._gpu.name, pcie_source=self._gpu.pcie_source, gpm=self._gpu.gpm)
        elif dev is not None and dev.type == "cuda":
            info["name"] = torch.cuda.get_device_name(dev)
        return info

    def _trace(self) -> Dict[str, Any]:
        if self._offline is not None:
            return self._offline
        if not self.snapshots and self.engine is not None:
            # never started: the counters since load and the last call's timings
            return self._unstarted_trace()
        return self.export()

    def _unstarted_trace(self) -> Dict[str, Any]:
        eng = self.engine
        store = eng.store
        zero = {"t": 0.0, "flat": {k: 0 for k in flatten_counters(store.counters())}, "per_layer": []}
        now = snapshot_counters(store.counters())
        now["t"] = 1.0
        zero["per_layer"] = [{k: 0 for k in PER_LAYER_KEYS} for _ in now["per_layer"]]
        s = eng.last_stats
        steps = []
        if s.prompt_tokens:
            steps.append(
                {
                    "t": 0.0,
                    "stage": "prefill",
                    "seconds": s.prefill_s,
                    "rows": s.prompt_tokens,
                    "thread_busy": None,
                }
            )
        if s.decode_steps:
            steps += [
                {
                    "t": 0.0,
                    "stage": "decode",
                    "seconds": s.decode_s / s.decode_steps,
                    "rows": s.decoded_rows // s.decode_steps,
                    "thread_busy": None,
                }
            ] * s.decode_steps
        dev = self._device()
        gpu, why = (
            GpuSampler.open(dev.index or 0, deque(maxlen=2), self.interval_s)
            if dev is not None and dev.type == "cuda"
            else (None, "unavailable: the engine runs on the CPU")
        )
        samples = [gpu.read()] if gpu is not None else []
        if gpu is not None:
            gpu.close()
        return {
            "version": TRACE_VERSION,
            "label": "since load (monitor not started)",
            "device": {
                "type": dev.type if dev is not None else "none",
                "nvml": gpu is not None,
                "nvml_reason": why,
            },
            "config": engine_config(eng),
            "ceilings": self.ceilings,
            "process": {
                "cpu_s": None,
                "wall_s": s.prefill_s + s.decode_s,
                "cores": os.cpu_count(),
                "load1": _load1(),
            },
            "samples": samples,
            "steps": steps,
            "snapshots": [zero, dict(now, **allocator_stats(dev))],
        }

    def get_utilization(self) -> Dict[str, Any]:
        """The run's figures (the tuning guide's section 8): ``gpu`` (utilization, memory,
        SM activity, PCIe), ``memory`` (hit rates, prefetch accuracy, fragmentation, bytes per
        tier and direction), ``latency`` (per stage, tokens/s, waits), ``host``. Over the
        window since ``start()``; never started: counters since load and the last call."""
        from .bottlenecks import figures, utilization

        return utilization(figures(self._trace(), self._ceilings_or_none()))

    def analyze_bottlenecks(self) -> Dict[str, Any]:
        """Which of PCIe, disk, HBM, GPU compute and host CPU bounds the run, and by how much:
        each resource's busy share of the run from measured figures against this machine's
        ceilings (measured on first use when none were given). See bottlenecks.analyze."""
        from .bottlenecks import analyze, figures

        return analyze(figures(self._trace(), self._ceilings()))

    def get_optimization_suggestions(self, allow_approximation: bool = False) -> List[Dict[str, Any]]:
        """Knob changes for this run: dicts of knob, value, current, expected_effect, reason
        and ``config`` (what ``DeepseekInference.apply_config`` takes, or None when the change
        is not an apply_config key). expert_threshold is suggested only with
        ``allow_approximation``."""
        from .bottlenecks import analyze, figures, suggest

        f = figures(self._trace(), self._ceilings())
        return suggest(f, analyze(f), allow_approximation=allow_approximation)

    def _ceilings_or_none(self) -> Optional[Dict[str, Any]]:
        if self.ceilings is None and self._offline is not None:
            return self._offline.get("ceilings")
        return self.ceilings

    def _ceilings(self) -> Dict[str, Any]:
        if self._ceilings_or_none() is None:
            from .ceilings import measure_ceilings

            self.ceilings = measure_ceilings(self._device())
        return self._ceilings_or_none()  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# engine-side helpers

_MONITORS: "weakref.WeakKeyDictionary[Any, PerfMonitor]" = weakref.WeakKeyDictionary()


def monitor_for(target: Any) -> PerfMonitor:
    """The one PerfMonitor of an Engine or DeepseekInference (created on first use)."""
    m = _MONITORS.get(target)
    if m is None:
        m = _MONITORS[target] = PerfMonitor(target)
    return m


def follow_reload(target: Any, engine: Any) -> None:
    """``target`` (a DeepseekInference) loaded ``engine``: its monitor, if any, follows."""
    m = _MONITORS.get(target)
    if m is not None:
        m.follow(engine)


def allocator_stats(device: Optional[torch.device]) -> Dict[str, Any]:
    """Device bytes the CUDA allocator holds and how fragmented they are: inactive split
    bytes (free pieces of blocks in use) over reserved bytes."""
    if device is None or device.type != "cuda":
        return {}
    try:
        s = torch.cuda.memory_stats(device)
    except Exception:
        return {}
    reserved = s.get("reserved_bytes.all.current", 0)
    return {
        "allocated": s.get("allocated_bytes.all.current", 0),
        "reserved": reserved,
        "fragmentation": (s.get("inactive_split_bytes.all.current", 0) / reserved) if reserved else None,
    }


def engine_config(eng: Any) -> Dict[str, Any]:
    """The knobs in force and the plan's sizes (what the suggestions reason from)."""
    if eng is None:
        return {}
    out: Dict[str, Any] = {
        "device": str(getattr(eng, "device", "")),
        "max_batch_size": eng.max_batch_size,
        "use_cuda_graph": eng.use_cuda_graph,
        "prefill_chunk": eng.prefill_chunk,
        "pages": bool(eng.store.pages),
        "graph_safe": bool(eng.store.graph_safe),
    }
    c = eng.config
    out["model"] = {
        "layers": c.num_hidden_layers,
        "experts": c.n_routed_experts,
        "top_k": c.num_experts_per_tok,
        "hidden": c.hidden_size,
    }
    paging = getattr(eng, "paging", None)
    if paging is not None:
        out["paging"] = {k: v for k, v in paging.__dict__.items()}
    plan = getattr(eng, "memory_plan", None)
    if plan is not None:
        out["plan"] = {
            "budget": plan.budget,
            "paged": plan.paged,
            "paged_layers": list(plan.paged_layers),
            "resident_layers": len(plan.resident_layers),
            "layer_slots": plan.layer_slots,
            "layer_slot_bytes": plan.layer_slot_bytes,
            "expert_slots": plan.expert_slots,
            "total_experts": plan.total_experts,
            "expert_unit_bytes": plan.expert_unit_bytes,
            "host_expert_slots": plan.host_expert_slots,
            "kv_cache": plan.kv_cache,
            "workspace": plan.workspace,
        }
    return out


def _check_interval(s: float) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.001 <= s <= 3600:
        raise ValueError(f"interval_s must be a number of seconds in [0.001, 3600], got {s!r}")
    return float(s)


def _load1() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _remove(observers: List, fn) -> None:
    try:
        observers.remove(fn)
    except ValueError:
        pass


def median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None
