"""The paging store's placement policy, ready words, decode pipeline and ordering, on the CPU.

CPU mode runs the same store code as the GPU: with ``sim_copy_delay_us`` its copies run on a
simulated asynchronous stream (a worker thread that delays each copy) with real events, so the
ordering between copies, host-cache refills, ready words and the GEMM's waits is exercised
here, not only on a GPU."""

import threading
import time
import types

import numpy as np
import pytest
import torch

from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.ops import Fp4Weight
from deepseek_fp4_plugin.paged import PagedWeightStore
from deepseek_fp4_plugin.replay import RoutingReplay
from deepseek_fp4_plugin.tiny import make_tiny

P = _C.paging
KW = dict(device="cpu", dtype="bfloat16", max_batch_size=2, max_seq_len=128, prefill_chunk=32, verbose=False)
PROMPTS = [list(range(1, 30)), [5, 9, 13, 200, 17, 3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline_tiny")
    make_tiny(d, seed=5, hidden_size=256, moe_intermediate_size=128, n_routed_experts=64, num_hidden_layers=4,
              n_group=8, topk_group=4, num_experts_per_tok=6)
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    eng = Engine.from_pretrained(model_dir, **KW)
    out = eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)
    return [o.token_ids for o in out], eng.logits(PROMPTS[0])


def paged(model_dir, **paging):
    # 29 GPU slots and a host cache of 40 units for 192 experts: fills churn while copies are
    # still in flight
    unit = P.expert_unit_layout(256, 128)["bytes"]
    eng = Engine.from_pretrained(model_dir, memory_limit=0.02, paging={"cpu_cache_size": 40.5 * unit / 2 ** 30,
                                                                       **paging}, **KW)
    assert isinstance(eng.store, PagedWeightStore)
    plan = eng.memory_plan
    assert plan.expert_slots < plan.total_experts and plan.host_expert_slots < plan.total_experts
    return eng


# ---------------------------------------------------------------------------------------
# the one miss policy


def _lanes(misses, **opt):
    o = P.MissPolicyOptions()
    for k, v in opt.items():
        setattr(o, k, v)
    return [str(x).split(".")[-1] for x in P.choose_lanes([P.MissInfo(*m) for m in misses], o)]


def test_lanes_copy_mode_copies_until_slots_run_out():
    assert _lanes([(True, 1)] * 3, mode=P.MissMode.copy, free_slots=5) == ["copy"] * 3
    # no mapped host cache: what does not fit fails (the caller reports it)
    assert _lanes([(True, 1)] * 3, mode=P.MissMode.copy, free_slots=2) == ["copy", "copy", "failed"]
    assert _lanes([(True, 1)] * 3, mode=P.MissMode.copy, free_slots=2, mapped_ok=True) == ["copy", "copy", "mapped"]


def test_lanes_auto_copies_what_the_cache_keeps_and_caps():
    m = [(True, 1), (False, 1), (True, 1), (True, 1)]
    assert _lanes(m, mode=P.MissMode.auto, free_slots=9, mapped_ok=True) == ["copy", "mapped", "copy", "copy"]
    assert _lanes(m, mode=P.MissMode.auto, free_slots=9, mapped_ok=True, max_copies=1) == \
        ["copy", "mapped", "mapped", "mapped"]
    assert _lanes(m, mode=P.MissMode.zero_copy, free_slots=9, mapped_ok=True) == ["mapped"] * 4


def test_lanes_cpu_balances_bus_and_cpu_from_rates():
    unit = 24_000_000
    m = [(False, 1)] * 8
    base = dict(mode=P.MissMode.copy, free_slots=8, mapped_ok=True, unit_bytes=unit, bus_gbs=50.0)
    assert "cpu" not in _lanes(m, **base)                                 # no CPU lane
    half = _lanes(m, cpu_ok=True, cpu_gbs=50.0, **base)
    assert half.count("cpu") == 4                                          # equal rates: half each
    slow = _lanes(m, cpu_ok=True, cpu_gbs=10.0, **base)
    assert slow.count("cpu") == 1                                          # 5× slower CPU: 1 of 8
    fast = _lanes(m, cpu_ok=True, cpu_gbs=150.0, **base)
    assert fast.count("cpu") == 6
    # the lanes finish together: neither side could take one more expert and end sooner
    for lanes, cpu in ((half, 50.0), (slow, 10.0), (fast, 150.0)):
        n_cpu = lanes.count("cpu")
        t_bus, t_cpu = (8 - n_cpu) * unit / 50e9, n_cpu * unit / (cpu * 1e9)
        assert max(t_bus, t_cpu) <= min(max(t_bus - unit / 50e9, t_cpu + unit / (cpu * 1e9)),
                                        max(t_bus + unit / 50e9, t_cpu - unit / (cpu * 1e9))) + 1e-12
    # experts the cache would keep stay on the bus first
    keep = _lanes([(True, 1), (False, 1), (True, 1), (False, 1)], cpu_ok=True, cpu_gbs=50.0, **base)
    assert keep == ["copy", "cpu", "copy", "cpu"]


# ---------------------------------------------------------------------------------------
# ready words in the units GEMM


def _units(hidden, inter, E, g):
    lay = P.expert_unit_layout(hidden, inter)
    units = torch.empty(E, lay["bytes"], dtype=torch.uint8)
    ref = []
    for e in range(E):
        q = [torch.ops.dsfp4.nvfp4_quantize(torch.randn(n, k, generator=g) * 0.1)
             for n, k in ((inter, hidden), (inter, hidden), (hidden, inter))]
        P.expert_unit_from_modelopt(hidden, inter, q[0][0].data_ptr(), q[0][1].data_ptr(), float(q[0][2]),
                                    q[1][0].data_ptr(), q[1][1].data_ptr(), float(q[1][2]), q[2][0].data_ptr(),
                                    q[2][1].data_ptr(), float(q[2][2]), units[e].data_ptr())
        ref.append(Fp4Weight.concat_rows([Fp4Weight.from_modelopt(*q[0]), Fp4Weight.from_modelopt(*q[1])]))
    return lay, units, ref


def test_units_gemm_waits_for_ready_words_written_later():
    g = torch.Generator().manual_seed(11)
    hidden, inter, E = 64, 32, 4
    lay, units, ref = _units(hidden, inter, E, g)
    table = torch.zeros(E, dtype=torch.int64)
    ready = torch.zeros(E, dtype=torch.int32)
    epoch = torch.tensor([7], dtype=torch.int32)
    failed = torch.zeros(1, dtype=torch.int32)
    offsets = torch.tensor([0, 3, 3, 8, 11], dtype=torch.int32)
    x = torch.randn(11, hidden, generator=g).to(torch.bfloat16)

    def land():   # another thread plays the copy stream: address first, then the ready word
        for e in (2, 0, 3, 1):
            time.sleep(0.05)
            table[e] = units[e].data_ptr()
            ready[e] = 7

    t = threading.Thread(target=land)
    t.start()
    y = torch.ops.dsfp4.fp4_grouped_gemm_units(x, offsets, torch.arange(E, dtype=torch.int32), table,
                                               lay["gate_up_qweight"], lay["gate_up_qscale"], lay["gate_up_scale"],
                                               2 * inter, hidden, 5, 0, ready.data_ptr(), epoch.data_ptr(),
                                               failed.data_ptr(), 10 ** 10)
    t.join()
    assert int(failed) == 0
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        assert torch.equal(y[lo:hi], ref[e](x[lo:hi])), e


def test_units_gemm_wait_times_out_with_nan_rows_and_a_flag():
    g = torch.Generator().manual_seed(12)
    hidden, inter, E = 64, 32, 2
    lay, units, ref = _units(hidden, inter, E, g)
    table = torch.tensor([units[0].data_ptr(), units[1].data_ptr()], dtype=torch.int64)
    ready = torch.tensor([3, 2], dtype=torch.int32)      # expert 1 never becomes ready for epoch 3
    epoch = torch.tensor([3], dtype=torch.int32)
    failed = torch.zeros(1, dtype=torch.int32)
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    x = torch.randn(5, hidden, generator=g).to(torch.bfloat16)
    y = torch.ops.dsfp4.fp4_grouped_gemm_units(x, offsets, torch.arange(E, dtype=torch.int32), table,
                                               lay["gate_up_qweight"], lay["gate_up_qscale"], lay["gate_up_scale"],
                                               2 * inter, hidden, 3, 0, ready.data_ptr(), epoch.data_ptr(),
                                               failed.data_ptr(), 50_000_000)
    assert int(failed) == 1
    assert torch.equal(y[:2], ref[0](x[:2]))
    assert torch.isnan(y[2:]).all()


def test_units_gemm_wait_gives_up_once_another_wait_failed():
    """A wait that finds the failure word set gives up at once: a pipeline that stopped answering
    costs one timeout per step, not one per layer (58 × 30 s on DeepSeek-V3)."""
    g = torch.Generator().manual_seed(13)
    hidden, inter, E = 64, 32, 1
    lay, units, _ = _units(hidden, inter, E, g)
    table = torch.tensor([units[0].data_ptr()], dtype=torch.int64)
    ready = torch.zeros(E, dtype=torch.int32)            # never becomes ready for epoch 4
    epoch = torch.tensor([4], dtype=torch.int32)
    failed = torch.zeros(1, dtype=torch.int32)
    offsets = torch.tensor([0, 2], dtype=torch.int32)
    x = torch.randn(2, hidden, generator=g).to(torch.bfloat16)

    def gemm(timeout_ns):
        return torch.ops.dsfp4.fp4_grouped_gemm_units(
            x, offsets, torch.arange(E, dtype=torch.int32), table, lay["gate_up_qweight"],
            lay["gate_up_qscale"], lay["gate_up_scale"], 2 * inter, hidden, 2, 0, ready.data_ptr(),
            epoch.data_ptr(), failed.data_ptr(), timeout_ns)

    assert torch.isnan(gemm(20_000_000)).all() and int(failed) == 1
    t0 = time.perf_counter()
    y = gemm(5 * 10 ** 9)                                  # a later layer of the same failed step
    assert time.perf_counter() - t0 < 2.0
    assert torch.isnan(y).all()


# ---------------------------------------------------------------------------------------
# the paged engine: ready words, the pipeline thread, simulated asynchronous copies


CASES = {
    # Python resolves each layer, ready words signal the GEMM, copies delayed
    "ready_sim": dict(sim_copy_delay_us=300, prefetch_min_accuracy=0.0),
    # the store's thread resolves decode steps as the ids are published
    "pipeline": dict(decode_pipeline=True, prefetch_min_accuracy=0.0),
    "pipeline_sim": dict(decode_pipeline=True, sim_copy_delay_us=300, prefetch_min_accuracy=0.0),
    "pipeline_sim_auto": dict(decode_pipeline=True, sim_copy_delay_us=200, miss_mode="auto", cache_policy="lru",
                              prefetch_min_accuracy=0.0),
    # blocking resolves (compute waits on events) with delayed copies
    "blocking": dict(enable_async_copy=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_paged_equals_resident_with_asynchronous_copies(model_dir, reference, case):
    """A host cache smaller than the experts, speculative copies always on, copies that land
    late: every generated token and the logits equal the resident engine's. Any read of a slot
    or host unit before its copy finished, or a refill under a copy still in flight, shows here."""
    ref_tokens, ref_logits = reference
    eng = paged(model_dir, **CASES[case])
    out = eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == ref_tokens
    assert all(o.finish_reason == "length" for o in out)
    logits = eng.logits(PROMPTS[0])
    assert torch.isfinite(logits).all()
    assert (logits - ref_logits).abs().max().item() < 1e-3
    c = eng.store.counters()["experts"]
    assert c["ssd_reads"] > eng.memory_plan.host_expert_slots      # the host cache churned
    assert c["failed"] == 0
    if "pipeline" in case:
        assert c["publishes"] > 0 and c["prefetch_copies"] > 0
    else:
        assert c["publishes"] == 0


def test_pipeline_read_error_fails_the_step_naming_the_file_and_recovers(model_dir, reference):
    ref_tokens, _ = reference
    eng = paged(model_dir, decode_pipeline=True, sim_copy_delay_us=100)
    files = eng.store.files
    size = max(range(files.num_files), key=lambda i: __import__("os").path.getsize(files.path(i)))
    eng.generate(PROMPTS[0], max_tokens=2, ignore_eos=True)
    files.inject_fault(size, 0)
    with pytest.raises(RuntimeError, match=r"\.safetensors"):
        for _ in range(40):    # some decode step needs an expert from that shard
            eng.generate(PROMPTS[0], max_tokens=12, ignore_eos=True)
    files.inject_fault(size, -1)
    out = eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == ref_tokens


def test_pipeline_step_left_open_by_an_exception_does_not_break_the_engine(model_dir, reference):
    """A decode step that raises between begin_step and end_step (here inside its second MoE layer)
    must not leave the store's thread in a step: it would take the next prefill's publishes and
    refuse every later decode step ("a step is already running") and reconfigure."""
    ref_tokens, _ = reference
    eng = paged(model_dir, decode_pipeline=True, sim_copy_delay_us=100, prefetch_min_accuracy=0.0)
    store = eng.store
    orig, seen = store._route_point, []

    def failing(experts, h, weights, ids):
        if store.decoding:
            seen.append(experts.index)
            if len(seen) == 2:
                raise RuntimeError("injected")
        return orig(experts, h, weights, ids)

    store._route_point = failing
    try:
        try:
            out = eng.generate(PROMPTS, max_tokens=4, ignore_eos=True)
            assert any(o.finish_reason == "error" for o in out)
        except RuntimeError as e:
            assert "injected" in str(e)
    finally:
        del store._route_point
    assert len(seen) >= 2
    eng.reconfigure_paging(cache_policy="lru")           # refused while the store thought a step ran
    out = eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == ref_tokens
    assert eng.store.counters()["experts"]["failed"] == 0


class _FakeProbe:
    """Stands in for ExpertStore.check_copy_stream (the probe itself needs a GPU)."""

    def __init__(self, results):
        self.results, self.calls = list(results), []

    def check_copy_stream(self, computes, max_tries):
        self.calls.append((list(computes), max_tries))
        return self.results.pop(0)


def _as_if_on_a_gpu(monkeypatch, store, fake, handle):
    stream = types.SimpleNamespace(cuda_stream=handle)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    real = store.experts
    store.on_device, store.experts = True, fake
    return stream, real


def test_copy_stream_probe_keeps_or_turns_off_the_pipeline(model_dir, reference, monkeypatch):
    """Each stream a decode step runs on is probed once against the copy stream, with the streams
    probed before; when no copy stream passes, the pipeline turns off with the reason (graphs
    captured with it are captured again: decode_mode), cannot be forced back on, and decoding
    goes on without it."""
    ref_tokens, _ = reference
    eng = paged(model_dir, decode_pipeline=True, sim_copy_delay_us=100)
    st = eng.store
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    fake = _FakeProbe([(True, 1), (False, 9)])
    stream, real = _as_if_on_a_gpu(monkeypatch, st, fake, 111)
    try:
        st.prepare_decode()
        st.prepare_decode()
        assert fake.calls == [([111], 9)] and st.pipeline and st.decode_mode
        stream.cuda_stream = 222
        with pytest.warns(RuntimeWarning, match=r"no hardware queue .*CUDA_DEVICE_MAX_CONNECTIONS=8, 9 probes"):
            st.prepare_decode()
        assert fake.calls[-1] == ([111, 222], 9)
        assert not st.pipeline and not st.decode_mode and "hardware queue" in st.pipeline_off_reason
        st.prepare_decode()
        assert len(fake.calls) == 2
    finally:
        st.on_device, st.experts = False, real
        monkeypatch.undo()
    with pytest.raises(ValueError, match=r"decode_pipeline: .*hardware queue"):
        eng.reconfigure_paging(decode_pipeline=True)
    eng.reconfigure_paging(cache_policy="lru")
    assert not st.pipeline
    out = eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == ref_tokens


class _FailingProbe:
    def check_copy_stream(self, computes, max_tries):
        raise RuntimeError("copy stream probe: cudaMalloc: out of memory")


def test_copy_stream_probe_error_turns_the_pipeline_off(model_dir, monkeypatch):
    """A probe that cannot run (no memory for its buffers) turns the pipeline off with the error
    as the reason, once, instead of failing every decode step."""
    eng = paged(model_dir, decode_pipeline=True, sim_copy_delay_us=100)
    st = eng.store
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    _, real = _as_if_on_a_gpu(monkeypatch, st, _FailingProbe(), 111)
    try:
        with pytest.warns(RuntimeWarning, match=r"probe failed \(copy stream probe: cudaMalloc: out of memory\)"):
            st.prepare_decode()
        st.prepare_decode()   # off: not probed again, nothing raised
    finally:
        st.on_device, st.experts = False, real
    assert not st.pipeline and "out of memory" in st.pipeline_off_reason


def test_one_hardware_queue_turns_the_pipeline_off_without_probing(model_dir, monkeypatch):
    eng = paged(model_dir, decode_pipeline=True, sim_copy_delay_us=100)
    st = eng.store
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    fake = _FakeProbe([])
    _, real = _as_if_on_a_gpu(monkeypatch, st, fake, 111)
    try:
        with pytest.warns(RuntimeWarning, match=r"CUDA_DEVICE_MAX_CONNECTIONS=1 puts every stream on one"):
            st.prepare_decode()
    finally:
        st.on_device, st.experts = False, real
    assert fake.calls == [] and not st.pipeline


def test_graph_replay_of_route_points_after_a_prefill_in_waves(model_dir):
    """Decode without the pipeline, as a graph replay runs it (graphs.DecodeGraph.replay: each
    point restored, then resolved; no Python forward, so no waves). A prefill that resolved layers
    in waves left their points deferred: the replay used to raise on that stale state ("needs more
    experts than the GPU cache holds") for every generation after it, and a replay step that
    itself needed waves left its table unwritten for waves that never come."""
    eng = paged(model_dir, decode_pipeline=False, prefetch_min_accuracy=0.0)
    st = eng.store
    eng.generate(PROMPTS, max_tokens=1, ignore_eos=True)      # a prefill only: 2 × 16 tokens × top-6 per layer
    assert any(p.deferred for p in st.route_points)
    cap = st._wave_capacity()
    rows = -(-2 * cap // 6) + 1                                  # more distinct ids than waves allow
    st.begin_step(2, decode=True)
    for p in st.route_points:
        ids = p.ids_host[:rows * 6].numpy()
        assert len(np.unique(ids)) > cap
        p.restore(rows)
        st.resolve(p)
        assert not p.deferred
        table = st.experts.host_tables
        for e in np.unique(ids):                                 # every expert of the step is readable
            assert np.ctypeslib.ctypes.c_uint64.from_address(table + 8 * (p.index * 64 + int(e))).value > 1
    st.end_step()


def _mailbox_near_wrap(view, count):
    """Mailbox entries as 64 publishes ending at sequence `count` (uint32) leave them."""
    import ctypes
    entry_bytes = (32 + 4 * (view.max_ids + view.max_pred) + 127) // 128 * 128
    for d in range(view.ring):
        s = (count - d) % 2 ** 32
        ctypes.c_uint32.from_address(view.mailbox + ((s - 1) % 2 ** 32 % view.ring) * entry_bytes).value = s


def _i32(u):
    return u - 2 ** 32 if u >= 2 ** 31 else u


def test_pipeline_mailbox_sequence_and_epochs_wrap(tmp_path):
    """The publish count and the epochs are uint32 words that wrap. The thread must follow the
    mailbox across the wrap (it used to expect sequence 2^32 for the publish after 2^32 - 1 and
    stop answering), and an epoch never becomes 0, which every ready word holds before its first
    write."""
    store, gpu, tables, lay, ref, keep = _two_layer_store(tmp_path, gpu_slots=4, host_slots=6, delay_us=0)
    sync = keep[2]
    e = 6
    store.start_pipeline()
    view = store.pipeline_view
    count = 2 ** 32 - 3
    sync[2 * e + 2] = _i32(count)                      # publish count
    sync[2 * e:2 * e + 2] = -1                         # both layers' epochs: 2^32 - 1
    _mailbox_near_wrap(view, count)
    store.begin_step()
    store.begin_pipeline_step(0)
    ids = np.array([0, 1, 2], dtype=np.int32)
    for i in range(6):                                 # sequences 2^32 - 2, 2^32 - 1, 0, 1, 2, 3
        P.publish_route(view, i % 2, -1, ids.ctypes.data, len(ids), 0, 0, 0)
    deadline = time.time() + 10
    while store.counters(-1)["publishes"] < 6 and time.time() < deadline:
        time.sleep(0.01)
    assert store.counters(-1)["publishes"] == 6
    store.end_pipeline_step()
    store.sync_copies()
    for layer in (0, 1):
        ep = int(sync[2 * e + layer]) % 2 ** 32
        assert ep == 3                                 # 2^32 - 1 → 1 (0 skipped) → 2 → 3
        assert [int(sync[layer * e + x]) for x in ids] == [ep] * len(ids)


def test_paged_engine_across_epoch_and_sequence_wrap(model_dir, reference):
    """The same generation with every epoch and the publish count a few steps from 2^32: prefill
    resolves with epochs ≥ 2^31 (an int32 on the host), decode steps cross the wrap of both."""
    ref_tokens, _ = reference
    eng = paged(model_dir, decode_pipeline=True, sim_copy_delay_us=100, prefetch_min_accuracy=0.0)
    st = eng.store
    nm, off = len(st.moe_layers), st.view_epoch_offset
    count = 2 ** 32 - 20
    st.sync[off:off + nm] = -3                         # epochs 2^32 - 3
    st.sync[off + nm] = _i32(count)
    _mailbox_near_wrap(st.view, count)
    out = eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == ref_tokens
    assert all(0 < int(st.sync[off + i]) < 2 ** 31 for i in range(nm))      # wrapped
    assert 0 < int(st.sync[off + nm]) < 2 ** 31
    assert st.counters()["experts"]["failed"] == 0


def test_replay_routing_paged_equals_resident(model_dir):
    """Routing replay: the ids come from a trace (skewed, reused), everything else runs as usual;
    the paged pipeline engine equals the resident one under the same replay."""
    rng = np.random.default_rng(0)
    steps, L, B, K, E = 16, 3, 2, 6, 64   # the tiny model: 4 layers, the first dense
    pop = rng.dirichlet(np.full(E, 0.3), size=L)
    dec = np.stack([[[rng.choice(E, K, replace=False, p=pop[l]) for _ in range(B)] for l in range(L)]
                    for _ in range(steps)]).astype(np.int32)
    pre = np.stack([[rng.choice(E, K, replace=False, p=pop[l]) for _ in range(40)] for l in range(L)]).astype(np.int32)
    res = Engine.from_pretrained(model_dir, **KW)
    res.set_routing_replay(RoutingReplay(dec, pre))
    ref = res.generate(PROMPTS, max_tokens=10, ignore_eos=True)
    eng = paged(model_dir, decode_pipeline=True, sim_copy_delay_us=100, prefetch_min_accuracy=0.0)
    eng.set_routing_replay(RoutingReplay(dec, pre))
    out = eng.generate(PROMPTS, max_tokens=10, ignore_eos=True)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    # the replayed ids reached the store: its requests follow the trace's distinct experts
    reqs = eng.store.counters()["experts"]["requests"]
    assert reqs > 0
    with pytest.raises(ValueError, match="MoE layers"):
        res.set_routing_replay(RoutingReplay(dec[:, :2], pre[:2]))


# ---------------------------------------------------------------------------------------
# the races of the old store, each as a deterministic case over a slow simulated copy stream


def _two_layer_store(tmp_path, gpu_slots, host_slots, delay_us, e=6, hidden=128, inter=64):
    """A 2-layer CPU-mode ExpertStore (layer 1 holds the same experts as layer 0) whose copies
    run late on a simulated stream, and a reference: every unit as the store's fill makes it."""
    from plugin_fixtures import Experts, store_options
    ex = Experts(e, hidden, inter, seed=31)
    stored = ex.write_checkpoint(tmp_path / "experts.safetensors")
    lay = P.expert_unit_layout(hidden, inter)
    gpu = torch.zeros(gpu_slots * lay["bytes"], dtype=torch.uint8)
    opts = store_options(layers=2, experts=e, hidden=hidden, inter=inter, gpu_slots=gpu_slots,
                         gpu_base=gpu.data_ptr(), host_slots=host_slots, pinned=False, on_device=False,
                         miss_mode=P.MissMode.copy, io_threads=2, repack_threads=1, direct_io=False,
                         async_copy=True, prefetch_min_accuracy=0.0, sim_copy_delay_us=delay_us,
                         pipeline_max_ids=64, pipeline_max_pred=64)
    files = P.CheckpointFiles([str(tmp_path / "experts.safetensors")], False)
    store = P.ExpertStore(opts, files, stored + stored)
    tables = torch.zeros(2, e, dtype=torch.int64)
    sync = torch.zeros(P.pipeline_sync_words(2, e), dtype=torch.int32)
    store.set_device_tables(tables.data_ptr(), sync.data_ptr())
    ref_opts = store_options(layers=1, experts=e, hidden=hidden, inter=inter, gpu_slots=0, host_slots=e,
                             pinned=False, on_device=False, io_threads=1, repack_threads=1, direct_io=False)
    ref_store = P.ExpertStore(ref_opts, P.CheckpointFiles([str(tmp_path / "experts.safetensors")], False), stored)
    ids = np.arange(e, dtype=np.int32)
    ref_store.load_host(0, ids.ctypes.data, e)
    ref = [bytes((np.ctypeslib.ctypes.c_uint8 * lay["bytes"]).from_address(ref_store.host_unit(0, i))) for i in range(e)]
    return store, gpu, tables, lay, ref, (ref_store, files, sync)   # sync: the store writes into it


def _slot_bytes(addr, lay):
    return bytes((np.ctypeslib.ctypes.c_uint8 * lay["bytes"]).from_address(addr))


def test_host_unit_not_refilled_under_a_copy_still_in_flight(tmp_path):
    """A speculative copy out of host unit h is queued (it runs 0.2 s later); a demand read of another
    expert then evicts h. The refill must wait for the copy: the old store recorded the copy's event
    only after its loop, so the refill waited on nothing and the slot received the other expert."""
    store, gpu, tables, lay, ref, keep = _two_layer_store(tmp_path, gpu_slots=4, host_slots=3, delay_us=200_000)
    ids = lambda *xs: np.array(xs, dtype=np.int32)  # noqa: E731
    a = ids(0)
    store.begin_step()
    store.load_host(1, a.ctypes.data, 1)                       # expert 0 of layer 1 in host unit h
    store.prefetch(1, a.ctypes.data, 1, 0)                     # its copy is queued, 0.2 s late
    others = ids(3, 4, 5)
    store.resolve(0, others.ctypes.data, 3, 0)                 # 3 demand reads: every host unit refilled
    store.sync_copies()
    addr = store.gpu_address(1, 0)
    assert addr != 0
    assert _slot_bytes(addr, lay) == ref[0]                    # the prefetched slot holds expert 0
    for e in (3, 4, 5):
        assert _slot_bytes(int(tables[0, e]), lay) == ref[e]


def test_table_row_is_a_snapshot_not_the_live_mirror(tmp_path):
    """A layer's device table row (the only writer of its hits' entries) is copied late on the
    simulated stream; a resolve of the other layer evicts those experts meanwhile, changing the host
    mirror. The row must show the addresses of its own resolve: the old store copied straight from
    the mirror, so the late copy wrote the new, wrong addresses."""
    store, gpu, tables, lay, ref, keep = _two_layer_store(tmp_path, gpu_slots=4, host_slots=6, delay_us=100_000)
    ids = lambda *xs: np.array(xs, dtype=np.int32)  # noqa: E731
    first = ids(0, 1)
    store.begin_step()
    store.resolve_ready(0, first.ctypes.data, 2, 1, 0)          # copies experts 0 and 1 of layer 0
    store.sync_copies()
    store.begin_step()
    store.resolve_ready(0, first.ctypes.data, 2, 2, 0)          # both hits: only the row writes them, late
    want = [int(store.gpu_address(0, e)) for e in (0, 1)]
    assert all(want)
    other = ids(0, 1, 2, 3)
    store.begin_step()
    store.resolve_ready(1, other.ctypes.data, 4, 1, 0)          # evicts layer 0's experts from the slots
    assert store.gpu_address(0, 0) == 0
    store.sync_copies()
    got = [int(tables[0, e]) for e in (0, 1)]
    assert got == want, (got, want)                           # layer 0's row as its resolve wrote it


# ---------------------------------------------------------------------------------------
# the CPU expert lane: decode misses computed by CPU threads from the host cache

CPU_LANE = dict(sim_copy_delay_us=2000, cpu_experts=1, prefetch_min_accuracy=0.0)


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipeline", "host_points"])
def test_cpu_lane_equals_resident(model_dir, reference, pipeline):
    """A slow simulated bus: the miss policy puts decode misses on the CPU lane, whose rows replace
    the GEMM's NaN rows after the down GEMM. Tokens equal the resident engine's; nothing failed."""
    ref_tokens, ref_logits = reference
    eng = paged(model_dir, decode_pipeline=pipeline, **CPU_LANE)
    assert "host CPU: 1 threads" in eng.memory_plan.table()
    out = eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == ref_tokens
    assert all(o.finish_reason == "length" for o in out)
    c = eng.store.counters()
    ex, unit = c["experts"], eng.memory_plan.expert_unit_bytes
    assert ex["cpu_experts"] > 0 and ex["failed"] == 0
    assert ex["cpu_bytes"] == ex["cpu_experts"] * unit and ex["cpu_ms"] > 0
    assert sum(p["cpu_experts"] for p in c["per_layer"]) == ex["cpu_experts"]
    lane = c["cpu_lane"]
    assert lane["threads"] == 1 and lane["cpu_gbs"] > 0 and lane["bus_gbs"] > 0
    assert eng.store.cpu_lane.max_rows == KW["max_batch_size"]   # decode rows, not a prefill chunk
    # prefill keeps streaming to the GPU: the logits of a prompt are the paged engine's usual ones
    assert (eng.logits(PROMPTS[0]) - ref_logits).abs().max().item() < 1e-3


def test_cpu_lane_off_and_forced_paths(model_dir, reference):
    ref_tokens, _ = reference
    eng = paged(model_dir, decode_pipeline=True, sim_copy_delay_us=2000, prefetch_min_accuracy=0.0)
    eng.generate(PROMPTS, max_tokens=4, ignore_eos=True)
    assert eng.store.counters()["experts"]["cpu_experts"] == 0 and eng.store.counters()["cpu_lane"] is None
    feats = __import__("deepseek_fp4_plugin.cpu_experts", fromlist=["x"]).cpu_features()
    if feats["avx2"] and feats["fma"]:     # the AVX2 path, forced
        eng = paged(model_dir, decode_pipeline=True, cpu_isa="avx2", **CPU_LANE)
        assert eng.store.counters()["cpu_lane"]["isa"] == "avx2"
        assert [o.token_ids for o in eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)] == ref_tokens
    if not feats["avx512f"]:               # a path this CPU cannot run is refused with the reason
        with pytest.raises(ValueError, match=r"cpu_experts=1: .*avx512"):
            paged(model_dir, cpu_isa="avx512", **CPU_LANE)


@pytest.mark.parametrize("bad,match", [
    (dict(cpu_experts="many"), "cpu_experts must be 'off', 'auto' or a number of threads"),
    (dict(cpu_experts=0), "cpu_experts must be"),
    (dict(cpu_experts=True), "cpu_experts must be"),
    (dict(cpu_isa="sse2"), "cpu_isa must be"),
    (dict(cpu_experts="auto", enable_async_copy=False), "cpu_experts needs enable_async_copy"),
])
def test_cpu_lane_bad_settings(model_dir, bad, match):
    with pytest.raises(ValueError, match=match):
        paged(model_dir, **bad)


def test_cpu_lane_fault_fails_the_request_naming_layer_and_expert(model_dir):
    """Routing replay pins the first MoE layer's (decoder layer 1's) decode experts to 0..5
    (misses: prefill used others, no prefetch); a fault inside the CPU job of expert 3 fails that
    generation naming the layer and the expert; the engine stays usable and gives the same tokens
    again."""
    L, B, K, E = 3, 2, 6, 64
    rng = np.random.default_rng(1)
    dec = np.stack([[[rng.choice(E, K, replace=False) for _ in range(B)] for _ in range(L)] for _ in range(16)])
    dec[:, 0] = np.arange(K)
    pre = np.stack([[rng.choice(np.arange(10, E), K, replace=False) for _ in range(40)] for _ in range(L)])
    eng = paged(model_dir, decode_pipeline=True, prefetch_layers=0, **CPU_LANE)

    def run():   # a fresh replay each time (a replay walks its trace step by step)
        eng.set_routing_replay(RoutingReplay(dec.astype(np.int32), pre.astype(np.int32)))
        return [o.token_ids for o in eng.generate(PROMPTS, max_tokens=6, ignore_eos=True)]

    first = run()
    assert eng.store.counters()["per_layer"][0]["cpu_experts"] > 0
    eng.store.experts.inject_cpu_fault(0, 3)
    with pytest.raises(RuntimeError, match=r"layer 1 expert 3"):
        run()
    assert run() == first


def test_cpu_lane_turns_off_and_on_between_generations(model_dir):
    eng = paged(model_dir, decode_pipeline=True, **CPU_LANE)
    eng.generate(PROMPTS, max_tokens=6, ignore_eos=True)
    n = eng.store.counters()["experts"]["cpu_experts"]
    assert n > 0
    eng.reconfigure_paging(cpu_experts="off")
    eng.generate(PROMPTS, max_tokens=6, ignore_eos=True)
    assert eng.store.counters()["experts"]["cpu_experts"] == n
    eng.reconfigure_paging(cpu_experts=1)
    eng.generate(PROMPTS, max_tokens=6, ignore_eos=True)
    assert eng.store.counters()["experts"]["cpu_experts"] > n
    with pytest.raises(ValueError, match="another count needs a reload"):
        eng.reconfigure_paging(cpu_experts=3)
    plain = paged(model_dir, sim_copy_delay_us=100)
    with pytest.raises(ValueError, match="this engine has no CPU lane"):
        plain.reconfigure_paging(cpu_experts="auto")


def test_cpu_lane_only_for_a_whole_routing(model_dir):
    """A prefill or decode wave resolves a subset of a layer's experts (no [rows, top_k] order, no
    join after it): the CPU lane never takes those, whatever their count; the layer's whole
    routing may go to it."""
    eng = paged(model_dir, decode_pipeline=False, **CPU_LANE)
    st = eng.store.experts
    st.begin_step(False)                              # a decode step
    wave = np.arange(12, dtype=np.int32)              # 12 = 2 tokens × top-6: the count alone passes
    lanes = st.resolve_ready(0, wave.ctypes.data, len(wave), 1, 0)
    assert lanes and all(str(lane).split(".")[-1] != "cpu" for _, lane in lanes)
    whole = np.arange(20, 32, dtype=np.int32)
    lanes = st.resolve_ready(0, whole.ctypes.data, len(whole), 2, 0, whole_routing=True)
    assert any(str(lane).split(".")[-1] == "cpu" for _, lane in lanes)
    st.take_error()


def test_store_source_never_places_on_the_cpu(model_dir):
    """The TensorRT expert plugin's source (ExpertStoreSource) over a store whose CPU lane is on:
    its acquire resolves a whole routing, yet no expert goes to the CPU lane (the plugin has no
    join after its down GEMM), so its table row holds only real unit addresses."""
    eng = paged(model_dir, decode_pipeline=False, **CPU_LANE)
    st = eng.store.experts
    source = _C.paging.ExpertStoreSource(st)
    e = eng.config.n_routed_experts
    before = st.counters()["cpu_experts"]
    st.begin_step(False)
    ids = np.arange(e, dtype=np.int32)[: 2 * eng.config.num_experts_per_tok]
    source.acquire(0, ids.ctypes.data, len(ids), 0)
    row = eng.store.tables[0, ids].tolist()
    assert all(a > 1 for a in row), row         # 0: missing, 1: the CPU lane's marker
    assert st.counters()["cpu_experts"] == before
    source.release(0, 0)
    # the same ids through the engine's own whole-routing resolve do use the lane
    st.begin_step(False)
    fresh = np.arange(e - len(ids), e, dtype=np.int32)
    lanes = st.resolve_ready(0, fresh.ctypes.data, len(fresh), 2, 0, whole_routing=True)
    assert any(str(lane).split(".")[-1] == "cpu" for _, lane in lanes)
    st.take_error()
