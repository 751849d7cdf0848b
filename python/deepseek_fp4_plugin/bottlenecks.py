"""From a PerfMonitor trace to figures, a bottleneck verdict and knob suggestions.

``figures(trace, ceilings)`` reduces a trace (monitor.py) to the run's totals and averages over
its *active* time (the seconds spent inside prefill and decode steps), ``utilization`` lays
them out as the tuning guide's metrics, ``analyze`` says which resource bounds the run, and
``suggest`` proposes knob changes with their expected effect. All are pure functions of the
trace, so recorded runs give the same answers as live ones.

How busy each resource was (share of the active time):

  pcie         bytes the engine moved host → device (copies + in-place reads) over the
               measured H2D rate: the time the bus needed, over the time the run took
  disk         bytes read from the checkpoint files over the measured disk rate
  hbm          GPM DRAM bandwidth utilization (Hopper+), else NVML's memory-controller busy time
  gpu_compute  GPM share of SMs busy, else NVML's kernel-active time (an upper bound)
  host_cpu     the generating thread's CPU time not explained by device work (CUDA spin-waits
               count as CPU time, so the busiest device resource is taken off), or the CPU
               expert lane's share where the store reports it; on a CPU engine, the thread's
               CPU time (the model computes there)
"""

from __future__ import annotations

import bisect
import math
import statistics
from typing import Any, Dict, List, Optional, Tuple

from .monitor import counter_deltas, per_layer_hit_rates, ratio

GiB = 1 << 30
SATURATED = 0.6  # a resource busy this share of the run bounds it
RESOURCES = ("pcie", "disk", "hbm", "gpu_compute", "host_cpu")
LABELS = {"pcie": "PCIe", "disk": "disk", "hbm": "HBM", "gpu_compute": "GPU compute", "host_cpu": "host CPU"}


# ---------------------------------------------------------------------------------------
# figures


def active_intervals(steps: List[Dict[str, Any]]) -> List[Tuple[float, float]]:
    """Merged [start, end] intervals covered by engine steps."""
    iv = sorted((s["t"] - s["seconds"], s["t"]) for s in steps)
    out: List[Tuple[float, float]] = []
    for a, b in iv:
        if out and a <= out[-1][1] + 0.002:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _inside(t: float, iv: List[Tuple[float, float]]) -> bool:
    i = bisect.bisect_right(iv, (t, math.inf)) - 1
    return i >= 0 and iv[i][0] <= t <= iv[i][1]


def _mean(xs: List[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def calls(steps: List[Dict[str, Any]]) -> List[Dict[str, float]]:
    """Per generate call (a prefill and the decode steps after it): prefill and total seconds."""
    out: List[Dict[str, float]] = []
    for s in steps:
        if s["stage"] == "prefill" or not out:
            out.append(
                {
                    "prefill_s": s["seconds"] if s["stage"] == "prefill" else 0.0,
                    "total_s": 0.0,
                    "decode_steps": 0,
                }
            )
        out[-1]["total_s"] += s["seconds"]
        if s["stage"] == "decode":
            out[-1]["decode_steps"] += 1
    return out


def figures(trace: Dict[str, Any], ceilings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The run's figures over its active time (see the module docstring)."""
    steps = list(trace.get("steps") or [])
    snaps = [s for s in trace.get("snapshots") or [] if "flat" in s]
    samples = list(trace.get("samples") or [])
    ceil = dict(ceilings or trace.get("ceilings") or {})
    f: Dict[str, Any] = {
        "config": trace.get("config") or {},
        "device": trace.get("device") or {},
        "ceilings": ceil,
        "label": trace.get("label", ""),
    }
    pre = [s for s in steps if s["stage"] == "prefill"]
    dec = [s for s in steps if s["stage"] == "decode"]
    iv = active_intervals(steps)
    active = sum(b - a for a, b in iv)
    wall = (trace.get("process") or {}).get("wall_s")
    if not active:
        active = wall or (snaps[-1]["t"] - snaps[0]["t"] if len(snaps) > 1 else 0.0)
        iv = []
    f.update(
        active_s=active,
        wall_s=wall,
        prefill_s=sum(s["seconds"] for s in pre),
        decode_s=sum(s["seconds"] for s in dec),
        prompt_tokens=sum(s["rows"] for s in pre),
        decode_rows=sum(s["rows"] for s in dec),
        decode_steps=len(dec),
        prefill_calls=len(pre),
    )
    f["prefill_tokens_per_s"] = ratio(f["prompt_tokens"], f["prefill_s"])
    f["decode_tokens_per_s"] = ratio(f["decode_rows"], f["decode_s"])
    f["decode_step_ms"] = statistics.median([s["seconds"] for s in dec]) * 1e3 if dec else None
    f["decode_batch"] = statistics.median([s["rows"] for s in dec]) if dec else None
    cs = calls(steps)
    f["prefill_ms"] = _mean([c["prefill_s"] * 1e3 for c in cs if c["prefill_s"]])
    f["end_to_end_ms"] = _mean([c["total_s"] * 1e3 for c in cs])
    busy = [(s["thread_busy"], s["seconds"]) for s in dec if s.get("thread_busy") is not None]
    f["thread_busy"] = (sum(b * w for b, w in busy) / sum(w for _, w in busy)) if busy else None
    proc = trace.get("process") or {}
    f["process_cpu"] = (
        ratio(proc.get("cpu_s"), (proc.get("wall_s") or 0) * (proc.get("cores") or 1))
        if proc.get("cpu_s") is not None
        else None
    )
    f["load1"], f["cores"] = proc.get("load1"), proc.get("cores")

    # the store's counters over the window
    d: Dict[str, Optional[float]] = {}
    f["per_layer_hit_rate"] = []
    if len(snaps) >= 2:
        d = counter_deltas(snaps[0], snaps[-1])
        f["per_layer_hit_rate"] = per_layer_hit_rates(snaps[0], snaps[-1])
    f["counters"] = d
    g = lambda k: d.get(k) or 0  # noqa: E731
    f["h2d_bytes"], f["zero_copy_bytes"], f["ssd_bytes"] = (
        g("h2d_bytes"),
        g("zero_copy_bytes"),
        g("ssd_bytes"),
    )
    f["layer_h2d_bytes"], f["wasted_bytes"] = g("layer_h2d_bytes"), g("wasted_bytes")
    f["pcie_bytes"] = f["h2d_bytes"] + f["zero_copy_bytes"]
    f["expert_hit_rate"] = ratio(d.get("expert_gpu_hits"), d.get("expert_requests"))
    f["host_hit_rate"] = ratio(g("expert_gpu_hits") + g("expert_host_hits"), d.get("expert_requests"))
    f["layer_hit_rate"] = ratio(d.get("layer_hits"), d.get("layer_requests"))
    f["prefetch_accuracy"] = ratio(d.get("predicted_used"), d.get("used_after_prediction"))
    f["weight_wait_ms"] = d.get("weight_wait_ms")
    f["disk_wait_ms"] = d.get("disk_wait_ms")
    f["cpu_experts"], f["cpu_expert_ms"] = d.get("cpu_experts"), d.get("cpu_expert_ms")
    last = snaps[-1] if snaps else {}
    f["fragmentation"], f["reserved_bytes"] = last.get("fragmentation"), last.get("reserved")

    # NVML over the active time
    f["nvml"] = bool(samples) and bool((trace.get("device") or {}).get("nvml", bool(samples)))
    f["nvml_reason"] = (trace.get("device") or {}).get("nvml_reason", "")
    act = [s for s in samples if not iv or _inside(s["t"], iv)] or samples
    for key in ("gpu_util", "mem_util", "sm_util", "sm_occupancy", "dram_bw_util", "sm_clock_mhz"):
        f[key] = _mean([s[key] for s in act if s.get(key) is not None])
    used = [
        s["mem_used"] / s["mem_total"] for s in act if s.get("mem_used") is not None and s.get("mem_total")
    ]
    f["mem_used_frac"] = _mean(used)
    f["pcie_rx_GBps"] = _mean([s["pcie_rx_Bps"] / 1e9 for s in act if s.get("pcie_rx_Bps") is not None])
    f["pcie_tx_GBps"] = _mean([s["pcie_tx_Bps"] / 1e9 for s in act if s.get("pcie_tx_Bps") is not None])
    cum = [s for s in samples if s.get("pcie_rx_bytes") is not None]
    f["nvml_pcie_rx_bytes"] = cum[-1]["pcie_rx_bytes"] - cum[0]["pcie_rx_bytes"] if len(cum) > 1 else None
    f["pcie_source"] = (trace.get("device") or {}).get("pcie_source")
    return f


# ---------------------------------------------------------------------------------------
# the tuning guide's metrics


def _pct(x: Optional[float]) -> Any:
    return None if x is None else round(100.0 * x, 2)


def utilization(f: Dict[str, Any]) -> Dict[str, Any]:
    """Figures laid out as the tuning guide's metrics (GPU, memory, latency, host)."""
    na = f["nvml_reason"] or "unavailable"
    ceil = f["ceilings"]
    gpu: Dict[str, Any] = {"available": f["nvml"]}
    if f["nvml"]:
        h2d = ceil.get("h2d_GBps")
        gpu.update(
            utilization_pct=f["gpu_util"],
            memory_used_pct=_pct(f["mem_used_frac"]),
            sm_activity_pct=f["sm_util"],
            sm_occupancy_pct=f["sm_occupancy"],
            sm_clock_mhz=f["sm_clock_mhz"],
            hbm_bandwidth_pct=f["dram_bw_util"],
            memory_controller_pct=f["mem_util"],
            pcie_rx_GBps=f["pcie_rx_GBps"],
            pcie_tx_GBps=f["pcie_tx_GBps"],
            pcie_bandwidth_pct=_pct(ratio(f["pcie_rx_GBps"], h2d)),
            pcie_source=f["pcie_source"],
        )
    else:
        gpu.update(
            {k: na for k in ("utilization_pct", "memory_used_pct", "sm_activity_pct", "pcie_bandwidth_pct")}
        )
    steps = f["decode_steps"] + f["prefill_calls"]
    wait = f["weight_wait_ms"] if f["weight_wait_ms"] is not None else f["disk_wait_ms"]
    bus_ms = (f["pcie_bytes"] / (ceil["h2d_GBps"] * 1e9) * 1e3) if ceil.get("h2d_GBps") else None
    memory = {
        "layer_hit_rate_pct": _pct(f["layer_hit_rate"]),
        "expert_hit_rate_pct": _pct(f["expert_hit_rate"]),
        "host_hit_rate_pct": _pct(f["host_hit_rate"]),
        "prefetch_accuracy_pct": _pct(f["prefetch_accuracy"]),
        "fragmentation_pct": _pct(f["fragmentation"])
        if f["fragmentation"] is not None
        else ("unavailable: no CUDA allocator" if f["device"].get("type") != "cuda" else None),
        "bytes": {
            "host_to_device": f["h2d_bytes"],
            "layer_units_host_to_device": f["layer_h2d_bytes"],
            "zero_copy_reads": f["zero_copy_bytes"],
            "disk_reads": f["ssd_bytes"],
            "wasted_prefetch": f["wasted_bytes"],
            "nvml_pcie_rx": f["nvml_pcie_rx_bytes"],
        },
        "per_layer_expert_hit_rate": f["per_layer_hit_rate"],
    }
    latency = {
        "prefill_ms": f["prefill_ms"],
        "decode_step_ms": f["decode_step_ms"],
        "end_to_end_ms": f["end_to_end_ms"],
        "compute_ms": (f["decode_step_ms"] - wait / max(1, steps))
        if f["decode_step_ms"] is not None and wait is not None
        else f["decode_step_ms"],
        "memory_access_ms": bus_ms / max(1, steps) if bus_ms is not None else None,
        "prefetch_wait_ms": wait / max(1, steps) if wait is not None else None,
        "prefill_tokens_per_s": f["prefill_tokens_per_s"],
        "decode_tokens_per_s": f["decode_tokens_per_s"],
    }
    host = {
        "generating_thread_busy_pct": _pct(f["thread_busy"]),
        "process_cpu_pct": _pct(f["process_cpu"]),
        "cpu_experts": f["cpu_experts"],
    }
    return {"window_s": f["active_s"], "gpu": gpu, "memory": memory, "latency": latency, "host": host}


# ---------------------------------------------------------------------------------------
# the verdict


def _busy(f: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    ceil, active = f["ceilings"], f["active_s"] or 0.0
    on_gpu = f["device"].get("type") == "cuda"
    r: Dict[str, Dict[str, Any]] = {}

    def put(name: str, busy: Optional[float], measured: str, basis: str) -> None:
        r[name] = {"busy": None if busy is None else max(0.0, busy), "measured": measured, "basis": basis}

    h2d = ceil.get("h2d_GBps")
    if not on_gpu:
        put("pcie", None, "not used", "the engine runs on the CPU")
    elif h2d and active:
        b = f["pcie_bytes"] or (f["nvml_pcie_rx_bytes"] or 0)
        put(
            "pcie",
            b / (h2d * 1e9) / active,
            f"{b / active / 1e9:.2f} GB/s",
            f"bytes host → device over the measured {h2d:.1f} GB/s",
        )
    else:
        put("pcie", None, "unknown", "no measured host → device rate")
    disk = ceil.get("disk_GBps")
    if disk and active:
        put(
            "disk",
            f["ssd_bytes"] / (disk * 1e9) / active,
            f"{f['ssd_bytes'] / active / 1e9:.3f} GB/s",
            f"bytes read from the checkpoint files over the measured {disk:.2f} GB/s",
        )
    else:
        put("disk", None, "unknown", "no measured disk rate")
    if f["dram_bw_util"] is not None:
        put(
            "hbm",
            f["dram_bw_util"] / 100,
            f"{f['dram_bw_util']:.0f}% of DRAM bandwidth",
            "GPM DRAM bandwidth",
        )
    elif f["mem_util"] is not None:
        put(
            "hbm",
            f["mem_util"] / 100,
            f"memory controller busy {f['mem_util']:.0f}%",
            "NVML memory utilization",
        )
    else:
        put("hbm", None, "unavailable", f["nvml_reason"] or "no NVML samples")
    if f["sm_util"] is not None:
        put("gpu_compute", f["sm_util"] / 100, f"{f['sm_util']:.0f}% of SMs busy", "GPM SM utilization")
    elif f["gpu_util"] is not None:
        put(
            "gpu_compute",
            f["gpu_util"] / 100,
            f"a kernel ran {f['gpu_util']:.0f}% of the time",
            "NVML GPU utilization (kernel-active time: an upper bound)",
        )
    else:
        put("gpu_compute", None, "unavailable", f["nvml_reason"] or "no NVML samples")
    thread = f["thread_busy"] if f["thread_busy"] is not None else f["process_cpu"]
    lane = (f["cpu_expert_ms"] / 1e3 / active) if f["cpu_expert_ms"] and active else None
    load = (f["load1"] / f["cores"]) if f.get("load1") is not None and f.get("cores") else None
    if not on_gpu:
        # the model computes on the CPU: its threads, or other processes, filling every core bound it
        put(
            "host_cpu",
            max(thread or 0.0, min(1.0, load or 0.0)) if thread is not None or load else None,
            f"generating thread busy {100 * (thread or 0):.0f}%"
            + (f", load average {f['load1']:.1f} on {f['cores']} cores" if load is not None else ""),
            "the model computes on the CPU",
        )
    elif thread is not None:
        device = max(
            [r[k]["busy"] for k in ("pcie", "disk", "gpu_compute") if r[k]["busy"] is not None] or [0.0]
        )
        host = max(thread - min(device, 1.0), lane or 0.0)
        put(
            "host_cpu",
            host,
            f"generating thread busy {100 * thread:.0f}%"
            + (f", CPU experts {100 * lane:.0f}%" if lane else ""),
            "thread CPU time not covered by the busiest device resource",
        )
    else:
        put("host_cpu", lane, "unknown", "no per-step CPU time")
    return r


def analyze(f: Dict[str, Any]) -> Dict[str, Any]:
    """The bottleneck verdict: ``bound`` (a RESOURCES name, or None when nothing is
    saturated), ``busy`` (its share of the run), ``headroom`` (how much faster the run could
    go before the next resource binds), ``resources`` (each one's busy share, measured rate
    and basis) and a one-line ``verdict``."""
    res = _busy(f)
    known = sorted(((v["busy"], k) for k, v in res.items() if v["busy"] is not None), reverse=True)
    out: Dict[str, Any] = {
        "resources": res,
        "window_s": f["active_s"],
        "bound": None,
        "busy": None,
        "headroom": None,
        "runner_up": None,
    }
    if not known:
        out["verdict"] = "no figures: run something while the monitor is started"
        return out
    (top, name), rest = known[0], known[1:]
    second = rest[0] if rest else (0.0, None)
    out["busy"], out["runner_up"] = top, second[1]
    out["headroom"] = (top / second[0]) if second[0] > 0 else math.inf
    wait = f["weight_wait_ms"] if f["weight_wait_ms"] is not None else f["disk_wait_ms"]
    if top >= SATURATED:
        out["bound"] = name
        nxt = (
            (
                f"; next: {LABELS[second[1]]} at {100 * second[0]:.0f}% (removing this bound speeds the run "
                f"up at most {out['headroom']:.1f}×)"
            )
            if second[1] and second[0] >= 0.05
            else "; nothing else is near its limit"
        )
        out["verdict"] = (
            f"{LABELS[name]}-bound: busy {100 * top:.0f}% of the run "
            f"({res[name]['measured']}; {res[name]['basis']}){nxt}"
        )
    else:
        why = f"; compute waited {wait:.0f} ms for weights" if wait else ""
        out["verdict"] = (
            f"no resource is saturated (busiest: {LABELS[name]} at {100 * top:.0f}%): the run is "
            f"latency-bound — waits, synchronization and launch gaps{why}"
        )
    return out


# ---------------------------------------------------------------------------------------
# suggestions


def _s(
    knob: str, value: Any, current: Any, effect: str, reason: str, how: str = "apply_config"
) -> Dict[str, Any]:
    return {
        "knob": knob,
        "value": value,
        "current": current,
        "expected_effect": effect,
        "reason": reason,
        "how": how,
        "config": {knob: value} if how == "apply_config" else None,
    }


def suggest(f: Dict[str, Any], a: Dict[str, Any], allow_approximation: bool = False) -> List[Dict[str, Any]]:
    """Knob changes for the run ``f`` with verdict ``a`` (see PerfMonitor.get_optimization_suggestions)."""
    cfg = f["config"]
    paging = cfg.get("paging") or {}
    plan = cfg.get("plan") or {}
    res = a["resources"]
    busy = {k: (v["busy"] or 0.0) for k, v in res.items()}
    bound = a["bound"]
    on_gpu = f["device"].get("type") == "cuda"
    out: List[Dict[str, Any]] = []
    pcie = max(f["pcie_bytes"], 1)
    steps = max(1, f["decode_steps"] + f["prefill_calls"])

    if (
        on_gpu
        and busy["host_cpu"] >= SATURATED
        and not cfg.get("use_cuda_graph")
        and cfg.get("graph_safe", True)
    ):
        speed = 1 / max(0.05, 1 - busy["host_cpu"])
        out.append(
            _s(
                "use_cuda_graph",
                True,
                False,
                f"decode steps replay CUDA graphs instead of launching from Python: the host's "
                f"{100 * busy['host_cpu']:.0f}% share of each step mostly goes, up to {speed:.1f}× decode "
                f"tokens/s",
                "host-bound eager decode",
            )
        )
    batch = cfg.get("max_batch_size") or 1
    if (
        on_gpu
        and bound in ("hbm", "gpu_compute", "host_cpu")
        and f["decode_batch"]
        and f["decode_batch"] >= batch
        and batch < 64
        and (bound != "host_cpu" or cfg.get("use_cuda_graph"))
    ):
        out.append(
            _s(
                "batch_size",
                2 * batch,
                batch,
                f"each decode step reads the weights once for all its rows: about {min(2.0, 1 + 0.9):.1f}× "
                f"decode tokens/s while {LABELS[bound]} stays the bound, per-token latency about the same",
                f"{LABELS[bound]}-bound decode with full batches",
            )
        )
    if busy["pcie"] >= SATURATED or bound == "pcie":
        if f["wasted_bytes"] / pcie > 0.1:
            k = paging.get("prefetch_experts") or (cfg.get("model") or {}).get("top_k") or 8
            out.append(
                _s(
                    "prefetch_experts",
                    max(1, k // 2),
                    k,
                    f"fewer speculative copies of experts that were not used: up to "
                    f"{f['wasted_bytes'] / 1e9:.2f} GB ({100 * f['wasted_bytes'] / pcie:.0f}% of the bus "
                    f"traffic) saved",
                    f"prediction accuracy {100 * (f['prefetch_accuracy'] or 0):.0f}%: wasted prefetch",
                )
            )
        if f["layer_h2d_bytes"] / pcie > 0.25 and plan.get("paged_layers"):
            slot = plan.get("layer_slot_bytes") or 0
            more = math.ceil(len(plan["paged_layers"]) * slot / GiB * 100) / 100
            out.append(
                _s(
                    "memory_limit",
                    round(plan["budget"] / GiB + more, 2),
                    round(plan["budget"] / GiB, 2),
                    f"every layer's attention stays resident: −{f['layer_h2d_bytes'] / 1e9:.2f} GB "
                    f"({100 * f['layer_h2d_bytes'] / pcie:.0f}%) of the bus traffic",
                    f"{len(plan['paged_layers'])} layers page their weights every step",
                    how="Engine.from_pretrained(memory_limit=...)",
                )
            )
        copies = f["counters"].get("expert_copies") or 0
        evict = f["counters"].get("expert_evictions") or 0
        if paging.get("miss_mode", "copy") == "copy" and copies and evict / copies > 0.5:
            out.append(
                _s(
                    "miss_mode",
                    "auto",
                    "copy",
                    f"experts the cache would not keep are read in place (≈ 91% of the copy rate) instead of "
                    f"evicting one that is reused: up to {evict:.0f} evictions of the window avoided",
                    f"{100 * evict / copies:.0f}% of copies evicted an expert: the cache churns",
                )
            )
        if f["expert_hit_rate"] is not None and f["expert_hit_rate"] < 0.5 and plan.get("expert_unit_bytes"):
            unit = plan["expert_unit_bytes"]
            total, slots = plan.get("total_experts") or 1, plan.get("expert_slots") or 0
            gib = max(1.0, round(min(total - slots, slots) * unit / GiB, 1))
            out.append(
                _s(
                    "memory_limit",
                    round(plan["budget"] / GiB + gib, 2),
                    round(plan["budget"] / GiB, 2),
                    f"{int(gib * GiB // unit)} more GPU expert slots ({slots} of {total} now): with uniform "
                    f"use the hit rate rises by up to {100 * min(1.0, gib * GiB / unit / total):.0f} points",
                    f"GPU expert hit rate {100 * f['expert_hit_rate']:.0f}%",
                    how="Engine.from_pretrained(memory_limit=...)",
                )
            )
        if allow_approximation and not paging.get("expert_threshold") and (f["expert_hit_rate"] or 0) < 0.8:
            out.append(
                _s(
                    "expert_threshold",
                    0.1,
                    paging.get("expert_threshold", 0.0),
                    "missed experts with under 10% of a token's routing weight are skipped (renormalized): "
                    "fewer copies, outputs change (approximate)",
                    "PCIe-bound, approximation allowed",
                )
            )
    if f["ssd_bytes"] and (busy["disk"] >= 0.3 or bound == "disk") and (f["host_hit_rate"] or 1) < 0.98:
        unit = plan.get("expert_unit_bytes") or 1
        have, total = plan.get("host_expert_slots") or 0, plan.get("total_experts") or 1
        want = min(total, max(2 * have, have + 1))
        gain = (want - have) / max(1, total - have)
        cur = (
            paging.get("cpu_cache_size")
            if paging.get("cpu_cache_size") is not None
            else round(have * unit / GiB, 2)
        )
        out.append(
            _s(
                "cpu_cache_size",
                math.ceil(want * unit / GiB * 100) / 100,
                cur,
                f"{want - have} more experts in pinned host memory: disk reads −{100 * gain:.0f}% with "
                f"uniform use ({f['ssd_bytes'] / 1e9:.2f} GB were read this window)",
                f"host hit rate {100 * (f['host_hit_rate'] or 0):.0f}%, disk busy {100 * busy['disk']:.0f}%",
            )
        )
    wait = f["weight_wait_ms"] if f["weight_wait_ms"] is not None else f["disk_wait_ms"]
    pl = paging.get("prefetch_layers", 1) if paging else None
    if wait and f["active_s"] and wait / 1e3 / f["active_s"] > 0.15 and pl is not None and pl < 4:
        out.append(
            _s(
                "prefetch_layers",
                pl + 1,
                pl,
                f"copies start one layer earlier: up to {wait / steps:.1f} ms per step of the "
                f"{wait:.0f} ms compute waited for weights overlaps compute",
                f"compute waited for weights {100 * wait / 1e3 / f['active_s']:.0f}% of the run",
            )
        )
    if f["fragmentation"] is not None and f["fragmentation"] > 0.25 and (f["reserved_bytes"] or 0) > GiB:
        lost = f["fragmentation"] * f["reserved_bytes"] / GiB
        out.append(
            _s(
                "PYTORCH_CUDA_ALLOC_CONF",
                "expandable_segments:True",
                None,
                f"about {lost:.1f} GiB of reserved but unusable device memory returns",
                f"allocator fragmentation {100 * f['fragmentation']:.0f}%",
                how="environment",
            )
        )
    return _merge(out)


def _merge(out: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One suggestion per knob: a second one for the same knob (memory_limit for paged layers
    and for the expert cache) raises the value to cover both and adds its effect."""
    merged: Dict[str, Dict[str, Any]] = {}
    for s in out:
        m = merged.get(s["knob"])
        if m is None:
            merged[s["knob"]] = s
            continue
        if isinstance(s["value"], (int, float)) and isinstance(m["value"], (int, float)):
            m["value"] = (
                round(m["value"] + s["value"] - (s["current"] or 0), 2)
                if s["current"] == m["current"]
                else max(m["value"], s["value"])
            )
        m["expected_effect"] += "; and " + s["expected_effect"]
        m["reason"] += "; " + s["reason"]
        if m["config"] is not None:
            m["config"] = {m["knob"]: m["value"]}
    return list(merged.values())
