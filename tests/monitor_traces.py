"""PerfMonitor traces with known answers: a run described by its totals, laid out step by step
the way the monitor records one (decode steps, counter snapshots, NVML samples)."""

from __future__ import annotations

from typing import Any, Dict, Optional

GiB = 1 << 30
UNIT = 24 * (1 << 20)  # expert unit bytes

CEILINGS = {"h2d_GBps": 50.0, "d2h_GBps": 55.0, "hbm_GBps": 3000.0, "disk_GBps": 1.0, "host_read_GBps": 90.0}


def make_trace(
    seconds: float = 10.0,
    steps: int = 100,
    batch: int = 1,
    device: str = "cuda",
    counters: Optional[Dict[str, float]] = None,
    nvml: Optional[Dict[str, float]] = None,
    thread_busy: Optional[float] = 0.3,
    config: Optional[Dict[str, Any]] = None,
    per_layer: int = 4,
    layer_hit: float = 0.5,
    ceilings: Optional[Dict[str, float]] = None,
    frag: Optional[float] = None,
    reserved: int = 0,
    load1: Optional[float] = None,
) -> Dict[str, Any]:
    """A run of one prefill and ``steps - 1`` decode steps filling ``seconds``; ``counters``
    are totals over the run (dotted store-counter paths), spread evenly over the snapshots;
    ``nvml`` are constant sample values (None: no NVML)."""
    dt = seconds / steps
    totals = dict(counters or {})
    snaps = []
    n_snap = 11
    for i in range(n_snap):
        frac = i / (n_snap - 1)
        flat = {k: v * frac for k, v in totals.items()}
        req = 100 * frac
        snap = {
            "t": seconds * frac,
            "flat": flat,
            "per_layer": [
                {
                    "requests": req,
                    "gpu_hits": req * layer_hit * (1 + j) / per_layer,
                    "host_hits": 0,
                    "copies": 0,
                }
                for j in range(per_layer)
            ],
        }
        if frag is not None:
            snap.update(fragmentation=frag, reserved=reserved, allocated=int(reserved * (1 - frag)))
        snaps.append(snap)
    step_list = [{"t": dt, "stage": "prefill", "seconds": dt, "rows": 128 * batch, "thread_busy": None}]
    for i in range(1, steps):
        step_list.append(
            {"t": dt * (i + 1), "stage": "decode", "seconds": dt, "rows": batch, "thread_busy": thread_busy}
        )
    samples = []
    if nvml is not None:
        rx = nvml.get("pcie_rx_Bps", 0.0)
        for i in range(int(seconds / 0.1) + 1):
            s = {
                "t": 0.1 * i,
                "mem_used": 40 * GiB,
                "mem_total": 80 * GiB,
                "sm_clock_mhz": 1980,
                "pcie_rx_bytes": rx * 0.1 * i,
                "pcie_tx_bytes": 0.0,
            }
            s.update(nvml)
            samples.append(s)
    cfg = {
        "device": device,
        "max_batch_size": batch,
        "use_cuda_graph": False,
        "prefill_chunk": 2048,
        "pages": True,
        "graph_safe": True,
        "model": {"layers": 61, "experts": 256, "top_k": 8, "hidden": 7168},
        "paging": {
            "prefetch_layers": 1,
            "max_gpu_layers": None,
            "expert_threshold": 0.0,
            "cpu_cache_size": 4.0,
            "miss_mode": "copy",
            "prefetch_experts": None,
        },
        "plan": {
            "budget": 16 * GiB,
            "paged": True,
            "paged_layers": [],
            "resident_layers": 61,
            "layer_slots": 0,
            "layer_slot_bytes": 0,
            "expert_slots": 400,
            "total_experts": 14848,
            "expert_unit_bytes": UNIT,
            "host_expert_slots": 170,
            "kv_cache": GiB,
            "workspace": GiB,
        },
    }
    for k, v in (config or {}).items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return {
        "version": 1,
        "label": "synthetic",
        "recorded_at": "2026-12-01T00:00:00+00:00",
        "device": {
            "type": device,
            "nvml": nvml is not None,
            "nvml_reason": "" if nvml is not None else "unavailable: no NVML in this trace",
            "name": "NVIDIA H100 80GB HBM3" if device == "cuda" else None,
            "pcie_source": "counters",
        },
        "config": cfg,
        "ceilings": dict(ceilings or CEILINGS),
        "process": {"cpu_s": None, "wall_s": seconds, "cores": 16, "load1": load1},
        "samples": samples,
        "steps": step_list,
        "snapshots": snaps,
    }


def pcie_bound(**kw) -> Dict[str, Any]:
    """Decode that copies 45 GB/s of experts over a 50 GB/s bus; GPU kernels run 30% of the time."""
    counters = {
        "experts.requests": 8000,
        "experts.gpu_hits": 2000,
        "experts.host_hits": 6000,
        "experts.copies": 6000,
        "experts.evictions": 5800,
        "h2d_bytes": 450e9,
        "experts.h2d_bytes": 450e9,
        "zero_copy_bytes": 0,
        "ssd_bytes": 0,
        "wasted_bytes": 10e9,
        "experts.predicted_used": 700,
        "experts.used_after_prediction": 1000,
    }
    counters.update(kw.pop("counters", {}))
    nvml = {"gpu_util": 30.0, "sm_util": 25.0, "dram_bw_util": 20.0, "mem_util": 18.0, "pcie_rx_Bps": 46e9}
    nvml.update(kw.pop("nvml", {}))
    return make_trace(counters=counters, nvml=nvml, **kw)
