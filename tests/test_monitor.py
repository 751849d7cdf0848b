"""PerfMonitor: the bottleneck analysis and suggestions on traces with known answers, the
counter mapping, the NVML sampler's arithmetic (on a stand-in NVML), the live monitor on a
CPU engine, and this machine's ceilings."""

import copy
import json
import math
import types

import pytest

from deepseek_fp4_plugin import Engine, PerfMonitor
from deepseek_fp4_plugin import ceilings as ceil_mod
from deepseek_fp4_plugin import nvml as nvml_mod
from deepseek_fp4_plugin.bottlenecks import analyze, figures, suggest, utilization
from deepseek_fp4_plugin.monitor import COUNTERS, counter, flatten_counters, monitor_for
from deepseek_fp4_plugin.tiny import make_tiny
from monitor_traces import GiB, make_trace, pcie_bound


def verdict(trace):
    f = figures(trace)
    a = analyze(f)
    return f, a, suggest(f, a)


def knobs(sugg):
    return {s["knob"]: s for s in sugg}


# ---------------------------------------------------------------------------------------
# analysis on traces with known answers


def test_pcie_bound_decode():
    f, a, s = verdict(pcie_bound())
    assert a["bound"] == "pcie"
    assert a["busy"] == pytest.approx(450e9 / 50e9 / 10.0)  # 0.9 of the run
    assert a["resources"]["gpu_compute"]["busy"] == pytest.approx(0.25)  # GPM SM utilization
    assert a["resources"]["hbm"]["busy"] == pytest.approx(0.20)
    assert a["runner_up"] == "gpu_compute" and a["headroom"] == pytest.approx(0.9 / 0.25)
    assert "PCIe-bound" in a["verdict"] and "90%" in a["verdict"]
    k = knobs(s)
    # 97% of copies evicted something: read once-used experts in place
    assert k["miss_mode"]["value"] == "auto" and k["miss_mode"]["config"] == {"miss_mode": "auto"}
    assert (
        k["memory_limit"]["how"].startswith("Engine.from_pretrained") and k["memory_limit"]["config"] is None
    )
    assert "use_cuda_graph" not in k and "cpu_cache_size" not in k and "prefetch_experts" not in k
    assert "expert_threshold" not in k  # approximation not allowed
    allowed = knobs(suggest(f, a, allow_approximation=True))
    assert allowed["expert_threshold"]["value"] == 0.1


def test_wasted_prefetch_is_named():
    _, a, s = verdict(pcie_bound(counters={"wasted_bytes": 90e9}))
    k = knobs(s)
    assert a["bound"] == "pcie"
    assert k["prefetch_experts"]["value"] == 4 and k["prefetch_experts"]["current"] == 8  # top-8 halved
    assert "20%" in k["prefetch_experts"]["expected_effect"]


def test_paged_layers_dominating_the_bus():
    tr = pcie_bound(
        counters={"layers.h2d_bytes": 300e9},
        config={"plan": {"paged_layers": list(range(40)), "layer_slot_bytes": GiB // 4}},
    )
    k = knobs(verdict(tr)[2])
    # 40 layer units of 0.25 GiB, plus the expert-cache suggestion (hit rate 25%): one memory_limit
    assert k["memory_limit"]["value"] == pytest.approx(16 + 10.0 + 9.4)
    assert [s["knob"] for s in verdict(tr)[2]].count("memory_limit") == 1


def test_disk_bound_suggests_a_larger_host_cache():
    tr = make_trace(
        counters={
            "experts.requests": 8000,
            "experts.gpu_hits": 2000,
            "experts.host_hits": 3000,
            "h2d_bytes": 100e9,
            "ssd_bytes": 9e9,
        },
        nvml={"gpu_util": 20.0, "sm_util": 15.0, "dram_bw_util": 10.0},
    )
    f, a, s = verdict(tr)
    assert a["bound"] == "disk" and a["busy"] == pytest.approx(0.9)
    assert a["resources"]["pcie"]["busy"] == pytest.approx(0.2)
    assert f["host_hit_rate"] == pytest.approx(5000 / 8000)
    k = knobs(s)
    assert k["cpu_cache_size"]["current"] == 4.0
    assert k["cpu_cache_size"]["value"] == pytest.approx(
        math.ceil(340 * 24 / 1024 * 100) / 100
    )  # 2 × 170 units


def test_host_bound_eager_decode_wants_cuda_graphs():
    tr = make_trace(counters={"h2d_bytes": 10e9}, nvml={"gpu_util": 20.0}, thread_busy=0.98)
    f, a, s = verdict(tr)
    assert a["bound"] == "host_cpu"
    assert a["busy"] == pytest.approx(0.98 - 0.2)  # thread time not covered by kernels
    assert a["resources"]["gpu_compute"]["basis"].startswith("NVML GPU utilization")
    k = knobs(s)
    assert k["use_cuda_graph"]["value"] is True and k["use_cuda_graph"]["config"] == {"use_cuda_graph": True}
    # graphs already on: no graph suggestion, and full batches of a host-bound run may grow
    tr = make_trace(
        counters={"h2d_bytes": 10e9},
        nvml={"gpu_util": 20.0},
        thread_busy=0.98,
        config={"use_cuda_graph": True},
    )
    k = knobs(verdict(tr)[2])
    assert "use_cuda_graph" not in k and k["batch_size"]["value"] == 2


def test_hbm_bound_decode_wants_a_larger_batch():
    tr = make_trace(
        counters={"h2d_bytes": 1e9},
        nvml={"gpu_util": 90.0, "sm_util": 40.0, "dram_bw_util": 85.0},
        thread_busy=0.95,
        batch=4,
        config={"max_batch_size": 4, "use_cuda_graph": True},
    )
    _, a, s = verdict(tr)
    assert a["bound"] == "hbm" and a["busy"] == pytest.approx(0.85)
    assert a["runner_up"] == "host_cpu" and a["headroom"] == pytest.approx(0.85 / 0.55)
    assert knobs(s)["batch_size"]["value"] == 8


def test_nothing_saturated_is_latency_bound():
    tr = make_trace(
        counters={"h2d_bytes": 100e9, "experts.wait_ms": 2500.0},
        nvml={"gpu_util": 30.0, "sm_util": 30.0, "dram_bw_util": 20.0},
        thread_busy=0.5,
    )
    f, a, s = verdict(tr)
    assert a["bound"] is None and a["busy"] == pytest.approx(0.3)
    assert a["verdict"].startswith("no resource is saturated") and "2500 ms" in a["verdict"]
    k = knobs(s)
    assert (
        k["prefetch_layers"]["value"] == 2 and k["prefetch_layers"]["current"] == 1
    )  # waits: 25% of the run


def test_weight_wait_counter_takes_precedence_over_disk_wait():
    tr = make_trace(
        counters={"h2d_bytes": 1e9, "experts.wait_ms": 10.0, "weight_wait_ms": 4000.0},
        nvml={"gpu_util": 30.0},
    )
    f, _, s = verdict(tr)
    assert f["weight_wait_ms"] == pytest.approx(4000.0)
    assert utilization(f)["latency"]["prefetch_wait_ms"] == pytest.approx(4000.0 / 100)  # per step
    assert "4000 ms" in knobs(s)["prefetch_layers"]["expected_effect"]


def test_fragmentation_suggestion():
    tr = make_trace(counters={"h2d_bytes": 1e9}, nvml={"gpu_util": 30.0}, frag=0.4, reserved=10 * GiB)
    k = knobs(verdict(tr)[2])
    assert (
        k["PYTORCH_CUDA_ALLOC_CONF"]["how"] == "environment"
        and "4.0 GiB" in k["PYTORCH_CUDA_ALLOC_CONF"]["expected_effect"]
    )
    assert utilization(figures(tr))["memory"]["fragmentation_pct"] == pytest.approx(40.0)


def test_cpu_engine_is_host_bound_and_gpu_figures_say_unavailable():
    tr = make_trace(device="cpu", thread_busy=0.95, load1=1.0)
    f, a, _ = verdict(tr)
    assert a["bound"] == "host_cpu" and a["resources"]["host_cpu"]["basis"] == "the model computes on the CPU"
    assert a["resources"]["pcie"]["busy"] is None and a["resources"]["gpu_compute"]["busy"] is None
    u = utilization(f)
    assert u["gpu"]["available"] is False and u["gpu"]["utilization_pct"].startswith("unavailable")
    # a host whose cores other processes fill bounds a CPU run though its thread waits
    tr = make_trace(device="cpu", thread_busy=0.15, load1=32.0)
    _, a, _ = verdict(tr)
    assert (
        a["bound"] == "host_cpu" and "load average 32.0 on 16 cores" in a["resources"]["host_cpu"]["measured"]
    )


def test_trace_totals_match_the_figures():
    tr = pcie_bound()
    f = figures(tr)
    assert f["active_s"] == pytest.approx(10.0)
    assert f["decode_steps"] == 99 and f["prefill_calls"] == 1
    assert f["decode_tokens_per_s"] == pytest.approx(99 / 9.9)
    assert f["nvml_pcie_rx_bytes"] == pytest.approx(46e9 * 10.0)
    assert f["expert_hit_rate"] == pytest.approx(0.25)
    assert f["prefetch_accuracy"] == pytest.approx(0.7)
    assert f["per_layer_hit_rate"] == pytest.approx([0.125, 0.25, 0.375, 0.5])


def test_recorded_trace_round_trip():
    tr = pcie_bound()
    again = json.loads(json.dumps(tr))
    m = PerfMonitor.from_trace(again)
    assert m.analyze_bottlenecks()["verdict"] == analyze(figures(tr))["verdict"]
    assert m.get_optimization_suggestions() == suggest(figures(tr), analyze(figures(tr)))
    with pytest.raises(ValueError, match="recorded trace"):
        m.start()
    with pytest.raises(ValueError, match="version"):
        PerfMonitor.from_trace({"version": 99})


def test_a_recorded_cpu_paged_run():
    """A trace recorded on this project's CPU paged engine (two prompts, 8 tokens, a 0.03 GiB
    budget): the figures are the counters' differences, computed here by hand."""
    from pathlib import Path

    tr = json.loads((Path(__file__).parent / "data" / "trace_cpu_paged.json").read_text())
    first, last = tr["snapshots"][0]["flat"], tr["snapshots"][-1]["flat"]
    d = {
        k: last[k] - first[k]
        for k in (
            "experts.requests",
            "experts.gpu_hits",
            "experts.host_hits",
            "experts.predicted_used",
            "experts.used_after_prediction",
            "h2d_bytes",
            "ssd_bytes",
            "experts.wait_ms",
        )
    }
    f, a, s = verdict(tr)
    assert d["experts.requests"] == 727
    assert f["expert_hit_rate"] == pytest.approx(d["experts.gpu_hits"] / 727)
    assert f["host_hit_rate"] == pytest.approx((d["experts.gpu_hits"] + d["experts.host_hits"]) / 727)
    assert f["prefetch_accuracy"] == pytest.approx(
        d["experts.predicted_used"] / d["experts.used_after_prediction"]
    )
    assert (f["h2d_bytes"], f["ssd_bytes"], f["disk_wait_ms"]) == (
        d["h2d_bytes"],
        d["ssd_bytes"],
        pytest.approx(d["experts.wait_ms"]),
    )
    busy = [(x["thread_busy"], x["seconds"]) for x in tr["steps"] if x["thread_busy"] is not None]
    thread = sum(b * w for b, w in busy) / sum(w for _, w in busy)
    # the CPU engine's thread ran about 15% of the time (a shared, oversubscribed host; the trace
    # has no load average): nothing saturated, and the 1 s of disk waits are named
    assert a["resources"]["host_cpu"]["busy"] == pytest.approx(thread) and thread < 0.6
    assert a["bound"] is None and "1042 ms" in a["verdict"]
    assert a["resources"]["disk"]["busy"] == pytest.approx(
        d["ssd_bytes"] / 1e9 / f["active_s"]
    )  # 1 GB/s ceiling
    assert s == []


# ---------------------------------------------------------------------------------------
# the counter mapping


class _Stats:
    prompt_tokens = decode_steps = decoded_rows = 0
    prefill_s = decode_s = 0.0


class _FakeStore:
    pages = graph_safe = True

    def __init__(self):
        self.c = {
            "experts": {"requests": 0, "gpu_hits": 0, "wait_ms": 0.0, "brand_new": 0},
            "h2d_bytes": 0,
            "per_layer": [{"requests": 0, "gpu_hits": 0}],
            "expert_hit_rate": None,
        }

    def counters(self):
        return copy.deepcopy(self.c)


class _FakeEngine:
    def __init__(self):
        from deepseek_fp4_plugin.tiny import tiny_config

        self.store, self.step_observers, self.last_stats = _FakeStore(), [], _Stats()
        self.config, self.max_batch_size, self.use_cuda_graph, self.prefill_chunk = (
            tiny_config(),
            1,
            False,
            64,
        )
        import torch

        self.device = torch.device("cpu")


def test_counters_map_by_name_and_new_counters_slot_in():
    eng = _FakeEngine()
    m = PerfMonitor(eng, ceilings={})
    m.start()
    assert m.on_step in eng.step_observers
    eng.store.c["experts"].update(requests=40, gpu_hits=30, brand_new=7)
    eng.store.c["per_layer"] = [{"requests": 40, "gpu_hits": 10}]
    eng.store.c["h2d_bytes"] = 1234
    eng.store.c["weight_wait_ms"] = 55.0  # a counter the store starts reporting
    m.stop()
    assert m.on_step not in eng.step_observers
    f = figures(m.export())
    assert f["expert_hit_rate"] == pytest.approx(0.75) and f["h2d_bytes"] == 1234
    assert f["per_layer_hit_rate"] == pytest.approx([0.25])
    # present in the last snapshot only: no window delta, but kept by name in the trace
    assert f["weight_wait_ms"] is None
    assert m.export()["snapshots"][-1]["flat"]["experts.brand_new"] == 7


def test_counter_paths_exist_in_a_paged_store(tmp_path):
    make_tiny(
        tmp_path,
        seed=3,
        hidden_size=256,
        moe_intermediate_size=128,
        n_routed_experts=32,
        num_hidden_layers=3,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
    )
    eng = Engine.from_pretrained(
        tmp_path,
        device="cpu",
        dtype="bfloat16",
        memory_limit=0.025,
        max_batch_size=1,
        max_seq_len=64,
        prefill_chunk=16,
        paging={"cpu_cache_size": 0.01, "max_gpu_layers": 2},
        verbose=False,
    )
    assert eng.store.pages and eng.memory_plan.paged_layers
    flat = flatten_counters(eng.store.counters())
    optional = {"weight_wait_ms"}  # once the store reports it
    missing = [m for m in COUNTERS if m not in optional and counter(flat, m) is None]
    assert not missing, f"COUNTERS names paths the paged store does not report: {missing}"


# ---------------------------------------------------------------------------------------
# the NVML sampler's arithmetic, on a stand-in NVML


class _FakeNvml:
    NVML_SUCCESS, NVML_ERROR = 0, 3
    NVML_FI_DEV_PCIE_COUNT_RX_BYTES, NVML_FI_DEV_PCIE_COUNT_TX_BYTES = 198, 197
    NVML_VALUE_TYPE_DOUBLE, NVML_VALUE_TYPE_UNSIGNED_INT, NVML_VALUE_TYPE_UNSIGNED_LONG = 0, 1, 2
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, NVML_VALUE_TYPE_SIGNED_LONG_LONG, NVML_VALUE_TYPE_SIGNED_INT = 3, 4, 5
    NVML_CLOCK_SM, NVML_PCIE_UTIL_RX_BYTES, NVML_PCIE_UTIL_TX_BYTES = 1, 1, 0

    def __init__(self, counters=True):
        self.rx, self.tx, self.counters, self.kbps = 0, 0, counters, 2_000_000

    def nvmlDeviceGetFieldValues(self, h, ids):
        out = []
        for fid in ids:
            v = types.SimpleNamespace(
                nvmlReturn=self.NVML_SUCCESS if self.counters else self.NVML_ERROR,
                valueType=self.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
                value=types.SimpleNamespace(ullVal=self.rx if fid == 198 else self.tx),
            )
            out.append(v)
        return out

    def nvmlGpmQueryDeviceSupport(self, h):
        raise RuntimeError("not supported")

    def nvmlDeviceGetPcieThroughput(self, h, which):
        return self.kbps

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=42, memory=17)

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=10, total=80)

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1755


def test_sampler_integrates_cumulative_pcie_counters():
    from collections import deque

    nv = _FakeNvml()
    nv.rx = (1 << 64) - 1000  # about to wrap
    ring = deque(maxlen=4)
    s = nvml_mod.GpuSampler(nv, None, "fake", ring, 0.01)
    assert s.pcie_source == "counters"
    first = s.read()
    assert first["gpu_util"] == 42 and first["mem_util"] == 17 and first["sm_clock_mhz"] == 1755
    nv.rx, nv.tx = 5_000, 300  # 6000 bytes received across the wrap
    second = s.read()
    assert second["pcie_rx_bytes"] == 6000 and second["pcie_tx_bytes"] == 300
    assert second["pcie_rx_Bps"] == pytest.approx(6000 / (second["t"] - first["t"]))
    nv.rx += 10**9
    assert s.pcie_totals()[0] == 6000 + 10**9 and len(ring) == 1


def test_sampler_falls_back_to_the_throughput_window():
    from collections import deque

    nv = _FakeNvml(counters=False)
    s = nvml_mod.GpuSampler(nv, None, "fake", deque(), 0.01)
    assert s.pcie_source == "throughput"
    a = s.read()
    b = s.read()
    assert b["pcie_rx_Bps"] == pytest.approx(2e9)  # 2,000,000 KB/s
    assert b["pcie_rx_bytes"] == pytest.approx(2e9 * (b["t"] - a["t"]))


def test_without_nvml_the_gpu_figures_say_unavailable(monkeypatch):
    def missing():
        raise ImportError("no pynvml")

    monkeypatch.setattr(nvml_mod, "_nvml", missing)
    sampler, why = nvml_mod.GpuSampler.open(0, [], 0.1)
    assert sampler is None and why.startswith("unavailable") and "nvidia-ml-py" in why


# ---------------------------------------------------------------------------------------
# live, on a CPU engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("monitor_tiny")
    make_tiny(d, seed=2)
    return Engine.from_pretrained(d, device="cpu")


def test_live_monitor_records_every_step(tiny):
    m = PerfMonitor(tiny, interval_s=0.01, capacity=64, ceilings={})
    with m:
        tiny.generate([[5, 6, 7, 8, 9], [10, 11, 12]], max_tokens=6, ignore_eos=True)
    s = tiny.last_stats
    assert tiny.step_observers == []
    steps = list(m.steps)
    assert [x["stage"] for x in steps] == ["prefill"] + ["decode"] * 5
    assert steps[0]["rows"] == 8 and all(x["rows"] == 2 for x in steps[1:])
    u = m.get_utilization()
    assert u["latency"]["decode_tokens_per_s"] == pytest.approx(s.decode_tokens_per_s)
    assert u["latency"]["prefill_tokens_per_s"] == pytest.approx(s.prefill_tokens_per_s)
    assert u["gpu"]["available"] is False and "CPU" in u["gpu"]["utilization_pct"]
    assert u["memory"]["expert_hit_rate_pct"] is None  # nothing paged
    assert m.analyze_bottlenecks()["bound"] in (None, "host_cpu")
    assert len(json.dumps(m.export())) > 0
    # the rings are bounded
    m2 = PerfMonitor(tiny, interval_s=0.001, capacity=3, ceilings={})
    with m2:
        tiny.generate([5, 6, 7], max_tokens=8, ignore_eos=True)
    assert len(m2.steps) == 3 and len(m2.snapshots) <= 3


def test_unstarted_monitor_reports_the_last_call(tiny):
    tiny.generate([5, 6, 7, 8], max_tokens=4, ignore_eos=True)
    m = monitor_for(tiny)
    assert monitor_for(tiny) is m
    u = m.get_utilization()
    assert u["latency"]["decode_tokens_per_s"] == pytest.approx(tiny.last_stats.decode_tokens_per_s)
    assert not m.running and tiny.step_observers == []


def test_a_started_model_monitor_follows_a_reload(tmp_path):
    from deepseek_fp4_plugin import DeepseekInference

    make_tiny(tmp_path, seed=2)
    model = DeepseekInference(tmp_path, device="cpu", max_batch_size=1)
    mon = model.perf_monitor.start()
    old = model.engine
    model.apply_config({"batch_size": 2})  # a new engine
    assert model.engine is not old and old.step_observers == []
    model.engine.generate([5, 6, 7], max_tokens=3, ignore_eos=True)
    mon.stop()
    assert [s["stage"] for s in mon.steps] == ["prefill", "decode", "decode"]
    assert model.engine.step_observers == []


def test_bad_sample_rate():
    m = PerfMonitor(None)
    with pytest.raises(ValueError, match="sample rate"):
        m.set_sample_rate(0)
    with pytest.raises(ValueError, match="interval_s"):
        PerfMonitor(None, interval_s=-1)
    m.set_sample_rate(20)
    assert m.interval_s == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------
# ceilings


def test_ceilings_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(ceil_mod, "HOST_READ_BYTES", 8 << 20)
    monkeypatch.setattr(ceil_mod, "SCRATCH_BYTES", 8 << 20)
    monkeypatch.setenv("DSFP4_DISK_DIR", str(tmp_path))
    cache = tmp_path / "ceilings.json"
    a = ceil_mod.measure_ceilings("cpu", cache=cache)
    assert a["cached"] is False and a["h2d_GBps"] is None and a["hbm_GBps"] is None  # no GPU to time
    assert a["disk_GBps"] > 0 and a["host_read_GBps"] > 0
    assert not list(tmp_path.glob("dsfp4-disk-*"))  # the scratch file is gone
    b = ceil_mod.measure_ceilings("cpu", cache=cache)
    assert b["cached"] is True and b["disk_GBps"] == a["disk_GBps"]
    cache.write_text("{not json")
    assert (
        ceil_mod.measure_ceilings("cpu", cache=cache)["cached"] is False
    )  # a damaged cache is measured again
