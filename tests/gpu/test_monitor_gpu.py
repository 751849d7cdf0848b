"""PerfMonitor on the GPU: NVML's PCIe byte count against the engine's byte counters during a
real paged run; the live figures and verdict; the knobs that only show on a GPU.

NVML counts PCIe packets, headers included, and (depending on the GPU) exactly between two
reads or over sampled windows. The test therefore first measures what NVML reports for a
plain pinned copy of known size in the same process (its ratio to the payload), then requires
the run's NVML RX bytes, divided by that ratio, to be within 10% of the bytes the engine says
it moved host → device (expert and layer copies plus in-place reads)."""

import json
import os
import time
from collections import deque

import pytest
import torch

from deepseek_fp4_plugin import DeepseekInference, Engine, PerfMonitor
from deepseek_fp4_plugin.bottlenecks import figures
from deepseek_fp4_plugin.nvml import GpuSampler
from deepseek_fp4_plugin.paged import PagedWeightStore
from deepseek_fp4_plugin.tiny import make_tiny

GiB = 1 << 30
KW = dict(device="cuda", max_batch_size=1, max_seq_len=256, prefill_chunk=128, verbose=False)
# experts of 1.6 MB (hidden 1024, intermediate 1024), 64 per layer, 3 MoE layers: copies dominate the bus
SHAPE = dict(
    hidden_size=1024,
    moe_intermediate_size=1024,
    n_routed_experts=64,
    num_hidden_layers=4,
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
)


def _out(name: str, data) -> None:
    """Figures for the record: printed, and written under $DSFP4_GPU_OUT when set."""
    print(name, json.dumps(data))
    d = os.environ.get("DSFP4_GPU_OUT")
    if d:
        with open(os.path.join(d, "monitor_gpu.jsonl"), "a") as f:
            f.write(json.dumps({name: data}) + "\n")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("monitor_paged")
    make_tiny(d, seed=4, **SHAPE)
    return d


def quarter_cache_limit(model_dir) -> float:
    """A budget (GiB) whose expert cache holds about a quarter of the experts."""
    plan = Engine.plan(model_dir, memory_limit=20, **{k: v for k, v in KW.items() if k != "verbose"})
    base = sum(b for name, b, _ in plan.rows() if name != "expert cache")
    return (base + plan.total_experts // 4 * plan.expert_unit_bytes) / GiB


def _sampler():
    s, why = GpuSampler.open(torch.cuda.current_device(), deque(maxlen=100000), 0.02)
    if s is None:
        pytest.skip(f"NVML: {why}")
    return s


def nvml_ratio() -> dict:
    """NVML RX bytes per payload byte for a pinned host → device copy of 1 GiB."""
    n = GiB
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    s = _sampler()
    s.start()
    time.sleep(0.3)
    rx0 = s.pcie_totals()[0]
    reps = 10  # ~0.2 s of traffic: long enough for a sampled source to see it
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    time.sleep(0.3)
    rx1 = s.pcie_totals()[0]
    s.close()
    return {"source": s.pcie_source, "gpm": s.gpm, "ratio": (rx1 - rx0) / (reps * n), "name": s.name}


def test_nvml_pcie_bytes_agree_with_the_engine_counters(model_dir):
    cal = nvml_ratio()
    _out("nvml_calibration", cal)
    assert 0.9 < cal["ratio"] < 1.3, f"NVML saw {cal['ratio']:.3f} bytes per copied byte ({cal['source']})"
    limit = quarter_cache_limit(model_dir)
    eng = Engine.from_pretrained(
        model_dir, memory_limit=limit, paging={"cpu_cache_size": 4.0}, use_cuda_graph=True, **KW
    )
    assert isinstance(eng.store, PagedWeightStore)
    assert eng.memory_plan.expert_slots < eng.memory_plan.total_experts // 2
    prompt = list(range(3, 120))
    eng.generate(prompt, max_tokens=8, ignore_eos=True)  # host cache filled, graphs captured
    torch.cuda.synchronize()
    mon = PerfMonitor(eng, interval_s=0.02, ceilings={})
    mon.start()
    assert mon.export()["device"]["nvml"], mon.export()["device"]["nvml_reason"]
    for i in range(3):
        eng.generate([t + 17 * i for t in prompt], max_tokens=96, ignore_eos=True)
    torch.cuda.synchronize()  # speculative copies issued at the last step are counted when issued
    time.sleep(0.3)
    mon.stop()
    f = figures(mon.export())
    engine_bytes = f["pcie_bytes"]
    nvml_bytes = f["nvml_pcie_rx_bytes"]
    _out(
        "pcie_agreement",
        {
            "engine_bytes": engine_bytes,
            "nvml_rx_bytes": nvml_bytes,
            "ratio": cal["ratio"],
            "source": cal["source"],
            "expert_hit_rate": f["expert_hit_rate"],
            "decode_tokens_per_s": f["decode_tokens_per_s"],
        },
    )
    assert engine_bytes > 1e9, "the run should move over a gigabyte of experts"
    assert nvml_bytes is not None
    assert abs(nvml_bytes / cal["ratio"] - engine_bytes) / engine_bytes < 0.10

    # the live figures of the same run
    u = mon.get_utilization()
    assert u["gpu"]["available"] and isinstance(u["gpu"]["utilization_pct"], float)
    assert (
        u["memory"]["expert_hit_rate_pct"] is not None and len(u["memory"]["per_layer_expert_hit_rate"]) == 3
    )
    mon.ceilings = {"h2d_GBps": 50.0, "disk_GBps": 1.0}
    a = mon.analyze_bottlenecks()
    _out("verdict", {"verdict": a["verdict"], "busy": {k: v["busy"] for k, v in a["resources"].items()}})
    assert a["resources"]["pcie"]["busy"] is not None and a["resources"]["gpu_compute"]["busy"] is not None


def test_enable_tf32_changes_the_float32_matmuls(tmp_path):
    make_tiny(tmp_path, seed=2)
    model = DeepseekInference(tmp_path, device="cuda", verbose=False)
    ids = list(range(3, 60))
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        model.apply_config({"enable_tf32": False})
        exact = model.engine.logits(ids)
        model.apply_config({"enable_tf32": True})
        assert torch.backends.cuda.matmul.allow_tf32
        tf32 = model.engine.logits(ids)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert torch.isfinite(tf32).all()
    assert (tf32 - exact).abs().max().item() > 0  # the routers' float32 GEMMs round to TF32


def test_cuda_graphs_and_overlap_compute_change_the_run(model_dir):
    limit = quarter_cache_limit(model_dir)
    model = DeepseekInference(model_dir, memory_limit=limit, paging={"cpu_cache_size": 4.0}, **KW)
    prompt = list(range(3, 40))
    rates = {}
    for graphs in (False, True):
        model.apply_config({"use_cuda_graph": graphs})
        model.engine.generate(prompt, max_tokens=4, ignore_eos=True)
        model.engine.generate(prompt, max_tokens=48, ignore_eos=True)
        assert model.stats.cuda_graph is graphs
        rates[graphs] = model.stats.decode_tokens_per_s
    _out("decode_tokens_per_s", {"eager": rates[False], "graphs": rates[True]})
    assert rates[True] > 1.2 * rates[False]  # eager decode pays Python per layer
    assert model.engine.store.compute_stream is not None
    model.apply_config({"overlap_compute": False})  # copies and compute on one stream, synchronous copies
    store = model.engine.store
    assert store.compute_stream is None and store.transfer_stream is None and store.prefetch_stream is None
    assert store.settings.enable_async_copy is False
    ref = model.engine.generate(prompt, max_tokens=8, ignore_eos=True).token_ids
    model.apply_config({"overlap_compute": True})
    assert model.engine.generate(prompt, max_tokens=8, ignore_eos=True).token_ids == ref
