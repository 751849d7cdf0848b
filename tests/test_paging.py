"""Paging on the CPU: planner, cache policies, the checkpoint reader, expert units, the
expert store, and the paged engine against the resident one (same tokens and logits)."""

import os

import numpy as np
import pytest
import torch

from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.loader import open_checkpoint
from deepseek_fp4_plugin.memory_plan import GiB, PagingSettings, plan_memory
from deepseek_fp4_plugin.ops import Fp4Weight
from deepseek_fp4_plugin.paged import PagedWeightStore
from deepseek_fp4_plugin.precision import PrecisionPolicy
from deepseek_fp4_plugin.tiny import make_tiny

P = _C.paging
# BF16 attention stays BF16 when it pages (the planner's FP8 choice is tested in test_fp8_model.py)
KW = dict(device="cpu", dtype="bfloat16", max_batch_size=2, max_seq_len=128, prefill_chunk=32, verbose=False,
          precision=PrecisionPolicy(auto_fp8_attention=False))
PROMPT = list(range(1, 40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("paging_tiny")
    make_tiny(d, seed=3, hidden_size=512, moe_intermediate_size=256, n_routed_experts=64, num_hidden_layers=5,
              n_group=8, topk_group=4, num_experts_per_tok=6)
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    eng = Engine.from_pretrained(model_dir, **KW)
    return eng.generate(PROMPT, max_tokens=10, ignore_eos=True).token_ids, eng.logits(PROMPT[:30])


def paged(model_dir, limit=0.03, **paging):
    eng = Engine.from_pretrained(model_dir, memory_limit=limit, paging={"cpu_cache_size": 0.02, **paging}, **KW)
    assert isinstance(eng.store, PagedWeightStore)
    return eng


# ---------------------------------------------------------------------------------------
# planner


def _plan(model_dir, budget_gib, **settings):
    src = open_checkpoint(model_dir)
    unit = P.expert_unit_layout(src.config.hidden_size, src.config.moe_intermediate_size)["bytes"]
    return plan_memory(src, PrecisionPolicy(auto_fp8_attention=False), torch.bfloat16, int(budget_gib * GiB),
                       PagingSettings(**settings),
                       max_batch_size=2, max_seq_len=128, prefill_chunk=32, expert_unit_bytes=unit,
                       host_bytes=64 * GiB), unit


def test_plan_carves_within_budget(model_dir):
    plan, unit = _plan(model_dir, 0.03, cpu_cache_size=0.02)
    assert plan.paged
    used = sum(b for _, b, _ in plan.rows())
    assert used <= plan.budget
    assert plan.budget - used < unit                    # the rest went to the expert cache
    assert plan.expert_slots >= 2 * 6                   # one decode step: max_batch · top_k
    assert plan.host_expert_slots == int(0.02 * GiB) // unit
    d = plan.as_dict()
    assert d["expert_slots"] == plan.expert_slots and {r["part"] for r in d["rows"]} >= {"KV cache", "expert cache"}
    assert "expert cache" in plan.table() and "GiB" in plan.table()


def test_plan_everything_resident_when_it_fits(model_dir):
    plan, _ = _plan(model_dir, 2.0)
    assert not plan.paged and plan.paged_layers == [] and plan.expert_slots == plan.total_experts


def test_plan_max_gpu_layers_pages_layers(model_dir):
    plan, _ = _plan(model_dir, 0.03, cpu_cache_size=0.02, max_gpu_layers=3, prefetch_layers=1)
    assert plan.layer_slots == 2 and len(plan.resident_layers) == 1 and len(plan.paged_layers) == 4
    assert plan.layer_slot_bytes >= max(plan.layer_unit_bytes[x] for x in plan.paged_layers)
    with pytest.raises(ValueError, match="prefetch_layers = 3 needs 4"):
        _plan(model_dir, 0.03, max_gpu_layers=2, prefetch_layers=3)


def test_plan_refuses_small_budget_with_sizes(model_dir):
    with pytest.raises(ValueError, match=r"too small.*needs at least|raise memory_limit to at least [0-9.]+ GiB"):
        _plan(model_dir, 0.005)
    with pytest.raises(ValueError, match="cpu_cache_size"):
        _plan(model_dir, 0.03, cpu_cache_size=0.0001)


@pytest.mark.parametrize("bad", [dict(prefetch_layers=-1), dict(expert_threshold=1.5), dict(miss_mode="fast"),
                                 dict(cache_policy="fifo"), dict(pinned_memory=False, miss_mode="zero_copy"),
                                 dict(gpu_memory_fraction=0), dict(streams={"bogus": True}),
                                 dict(cpu_cache_size=float("nan"))])
def test_settings_are_validated(bad):
    with pytest.raises(ValueError):
        PagingSettings(**bad).validate()


def test_unknown_paging_key_is_refused(model_dir):
    with pytest.raises(ValueError, match="unknown setting"):
        Engine.from_pretrained(model_dir, memory_limit=0.03, paging={"turbo": 1}, **KW)


# ---------------------------------------------------------------------------------------
# cache policies on synthetic routing traces


def _hit_rate(trace, capacity, policy, lam=0.05, keys=256):
    c = P.SlotCache(keys, capacity, policy, lam)
    hits = total = 0
    for step in trace:
        c.tick()
        for k in step:
            c.touch(k)
            if c.slot_of(k) >= 0:
                hits += 1
            else:
                assert c.insert(k)[0] >= 0
            total += 1
    return hits / total


def _trace(rng, steps, per_step, keys, zipf=None):
    if zipf is None:
        return [rng.choice(keys, per_step, replace=False) for _ in range(steps)]
    p = 1.0 / np.arange(1, keys + 1) ** zipf
    p /= p.sum()
    perm = rng.permutation(keys)
    return [perm[rng.choice(keys, per_step, replace=False, p=p)] for _ in range(steps)]


def test_lrfu_beats_lru_on_skewed_routing():
    rng = np.random.default_rng(0)
    trace = _trace(rng, 400, 8, 256, zipf=1.0)
    lrfu = _hit_rate(trace, 48, P.CachePolicy.lrfu)
    lru = _hit_rate(trace, 48, P.CachePolicy.lru)
    assert lrfu > lru + 0.03, (lrfu, lru)


def test_uniform_routing_hit_rate_is_the_cache_fraction():
    rng = np.random.default_rng(1)
    trace = _trace(rng, 400, 8, 256)
    for pol in (P.CachePolicy.lru, P.CachePolicy.lrfu):
        assert abs(_hit_rate(trace, 64, pol) - 64 / 256) < 0.05


def test_pinned_and_held_keys_are_never_evicted():
    c = P.SlotCache(16, 4, P.CachePolicy.lru, 0.05)
    for k in range(4):
        c.tick()
        c.touch(k)
        c.insert(k)
    c.set_pinned(0, True)
    c.hold(1)
    evicted = set()
    for k in range(4, 12):
        c.tick()
        c.touch(k)
        slot, ev = c.insert(k)
        assert slot >= 0
        evicted.add(ev)
    assert 0 not in evicted and 1 not in evicted
    assert c.slot_of(0) >= 0 and c.slot_of(1) >= 0
    # only pinned/held keys left to evict → no slot
    full = P.SlotCache(4, 2, P.CachePolicy.lrfu, 0.05)
    for k in (0, 1):
        full.touch(k)
        full.insert(k)
    full.hold(0)
    full.set_pinned(1, True)
    assert full.insert(2) == (-1, -1)


# ---------------------------------------------------------------------------------------
# the checkpoint reader


@pytest.mark.parametrize("direct", [False, True])
def test_reader_reads_exact_ranges(tmp_path, direct):
    data = np.random.default_rng(2).integers(0, 256, 3 * 1024 * 1024 + 777, dtype=np.uint8)
    f = tmp_path / "shard.bin"
    f.write_bytes(data.tobytes())
    files = P.CheckpointFiles([str(f)], direct)
    for off, n in ((0, 4096), (1, 5000), (12345, 1 << 20), (len(data) - 9000, 9000), (4095, 3)):
        out = torch.empty(n, dtype=torch.uint8)
        files.read(0, off, n, "t", out.data_ptr())
        assert (out.numpy() == data[off:off + n]).all(), (off, n)
    c = files.counters()
    assert c["bytes"] == 4096 + 5000 + (1 << 20) + 9000 + 3 and c["reads"] >= 5


def test_reader_truncated_file_and_injected_error(tmp_path):
    f = tmp_path / "model-00001.safetensors"
    f.write_bytes(bytes(100000))
    files = P.CheckpointFiles([str(f)], True)
    out = torch.empty(50000, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"model-00001.safetensors.*'layers.0.w'.*truncated"):
        files.read(0, 60000, 50000, "layers.0.w", out.data_ptr())
    files.inject_fault(0, 10)
    with pytest.raises(RuntimeError, match=r"'layers.0.x'.*injected"):
        files.read(0, 0, 100, "layers.0.x", out.data_ptr())
    files.inject_fault(0, -1)
    files.read(0, 0, 100, "layers.0.x", out.data_ptr())
    with pytest.raises(ValueError, match="cannot be opened"):
        P.CheckpointFiles([str(tmp_path / "missing.safetensors")], True)


# ---------------------------------------------------------------------------------------
# expert units


@pytest.mark.parametrize("hidden,inter", [(256, 128), (512, 1024), (96, 48)])
def test_expert_unit_is_the_resident_layout(hidden, inter):
    """A unit holds exactly what the resident store's stacked experts hold (both repack paths)."""
    g = torch.Generator().manual_seed(hidden)
    parts = [torch.ops.dsfp4.nvfp4_quantize(torch.randn(n, k, generator=g) * s)
             for (n, k), s in (((inter, hidden), 0.02), ((inter, hidden), 0.5), ((hidden, inter), 0.1))]
    lay = P.expert_unit_layout(hidden, inter)
    unit = torch.full((lay["bytes"],), 0xAB, dtype=torch.uint8)
    (gw, gs, g2), (uw, us, u2), (dw, ds, d2) = parts
    P.expert_unit_from_modelopt(hidden, inter, gw.data_ptr(), gs.data_ptr(), float(g2), uw.data_ptr(), us.data_ptr(),
                                float(u2), dw.data_ptr(), ds.data_ptr(), float(d2), unit.data_ptr(), 2)
    gu = Fp4Weight.concat_rows([Fp4Weight.from_modelopt(gw, gs, g2), Fp4Weight.from_modelopt(uw, us, u2)])
    dn = Fp4Weight.from_modelopt(dw, ds, d2)

    def part(off, n):
        return unit[off:off + n]

    assert torch.equal(part(lay["gate_up_qweight"], gu.qweight.numel() * 4), gu.qweight.view(torch.uint8))
    assert torch.equal(part(lay["gate_up_qscale"], gu.qscale.numel()), gu.qscale)
    assert torch.equal(part(lay["down_qweight"], dn.qweight.numel() * 4), dn.qweight.view(torch.uint8))
    assert torch.equal(part(lay["down_qscale"], dn.qscale.numel()), dn.qscale)
    tiles = -(-inter // 16)
    scales = part(lay["gate_up_scale"], 8 * tiles).view(torch.float32)
    assert (scales[:tiles] == float(g2)).all() and (scales[tiles:] == float(u2)).all()
    with pytest.raises(ValueError, match="weight_scale_2"):
        P.expert_unit_from_modelopt(hidden, inter, gw.data_ptr(), gs.data_ptr(), float("nan"), uw.data_ptr(),
                                    us.data_ptr(), float(u2), dw.data_ptr(), ds.data_ptr(), float(d2), unit.data_ptr())


def test_grouped_gemm_units_cpu_matches_stacked():
    hidden, inter, E = 256, 128, 5
    g = torch.Generator().manual_seed(7)
    lay = P.expert_unit_layout(hidden, inter)
    units = torch.empty(E, lay["bytes"], dtype=torch.uint8)
    gus = []
    for e in range(E):
        q = [torch.ops.dsfp4.nvfp4_quantize(torch.randn(n, k, generator=g) * 0.1)
             for n, k in ((inter, hidden), (inter, hidden), (hidden, inter))]
        P.expert_unit_from_modelopt(hidden, inter, q[0][0].data_ptr(), q[0][1].data_ptr(), float(q[0][2]),
                                    q[1][0].data_ptr(), q[1][1].data_ptr(), float(q[1][2]), q[2][0].data_ptr(),
                                    q[2][1].data_ptr(), float(q[2][2]), units[e].data_ptr())
        gus.append(Fp4Weight.concat_rows([Fp4Weight.from_modelopt(*q[0]), Fp4Weight.from_modelopt(*q[1])]))
    table = torch.tensor([units[e].data_ptr() for e in range(E)], dtype=torch.int64)
    table[3] = 0                           # no weights: NaN rows, never a silently wrong row
    offsets = torch.tensor([0, 2, 2, 7, 9, 13], dtype=torch.int32)
    x = torch.randn(13, hidden, generator=g).to(torch.bfloat16)
    y = torch.ops.dsfp4.fp4_grouped_gemm_units(x, offsets, torch.arange(E, dtype=torch.int32), table,
                                               lay["gate_up_qweight"], lay["gate_up_qscale"], lay["gate_up_scale"],
                                               2 * inter, hidden, 5)
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if e == 3:
            assert torch.isnan(y[lo:hi]).all()
            continue
        assert torch.equal(y[lo:hi], gus[e](x[lo:hi])), e
    with pytest.raises(ValueError, match="unit_qweight"):
        torch.ops.dsfp4.fp4_grouped_gemm_units(x, offsets, torch.arange(E, dtype=torch.int32), table, 3, 0, 0,
                                               2 * inter, hidden, 5)


# ---------------------------------------------------------------------------------------
# the paged engine


@pytest.mark.parametrize("settings", [dict(), dict(max_gpu_layers=3), dict(miss_mode="zero_copy"),
                                      dict(miss_mode="auto"), dict(cache_policy="lru", prefetch_layers=0),
                                      dict(prefetch_min_accuracy=0.0, prefetch_experts=2), dict(direct_io=False)],
                         ids=["default", "paged_layers", "zero_copy", "auto", "lru_no_prefetch", "eager_prefetch",
                              "buffered_io"])
def test_paged_equals_resident(model_dir, reference, settings):
    ref_tokens, ref_logits = reference
    eng = paged(model_dir, **settings)
    assert eng.generate(PROMPT, max_tokens=10, ignore_eos=True).token_ids == ref_tokens
    assert torch.equal(eng.logits(PROMPT[:30]), ref_logits)
    c = eng.store.counters()
    e = c["experts"]
    assert e["requests"] > 0 and e["ssd_reads"] > 0
    assert e["requests"] == e["gpu_hits"] + (e["copies"] - e["prefetch_copies"]) + e["zero_copy"]
    if settings.get("miss_mode") == "zero_copy":
        assert e["zero_copy"] > 0 and e["copies"] == 0
    if settings.get("prefetch_layers") == 0:
        assert e["predicted"] == 0 and c["prefetch_accuracy"] is None
    else:
        assert 0 < c["prefetch_accuracy"] <= 1
    if "max_gpu_layers" in settings:
        assert c["layers"]["copies"] > 0 and c["layer_hit_rate"] is not None


def test_prefetch_bookkeeping():
    """Accuracy = |predicted ∩ used| / |used|; wasted = speculative copies not used."""
    # a store over a synthetic checkpoint of 2 layers × 8 experts
    hidden, inter, E = 64, 32, 8
    import tempfile

    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as d:
        t = {}
        for layer in range(2):
            for e in range(E):
                for proj, (n, k) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                     ("down_proj", (hidden, inter))):
                    p, s, g = torch.ops.dsfp4.nvfp4_quantize(torch.randn(n, k))
                    m = f"l{layer}.e{e}.{proj}"
                    t[m + ".weight"], t[m + ".weight_scale"], t[m + ".weight_scale_2"] = p, s, g.reshape(())
        f = os.path.join(d, "x.safetensors")
        save_file(t, f)
        from safetensors import safe_open
        import json
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            hdr = json.loads(fh.read(n))
        stored = []
        for layer in range(2):
            for e in range(E):
                parts = []
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    for suf in ("weight", "weight_scale", "weight_scale_2"):
                        name = f"l{layer}.e{e}.{proj}.{suf}"
                        b, en = hdr[name]["data_offsets"]
                        parts.append((0, 8 + n + b, en - b, name))
                stored.append(parts)
        lay = P.expert_unit_layout(hidden, inter)
        gpu = torch.empty(6 * lay["bytes"], dtype=torch.uint8)
        from plugin_fixtures import store_options
        opts = store_options(layers=2, experts=E, hidden=hidden, inter=inter, gpu_slots=6, gpu_base=gpu.data_ptr(),
                             host_slots=16, pinned=False, on_device=False, gpu_policy=P.CachePolicy.lrfu,
                             host_policy=P.CachePolicy.lru, lam=0.05, miss_mode=P.MissMode.copy, io_threads=2,
                             repack_threads=1, direct_io=False, async_copy=False, max_prefetch_units=-1,
                             prefetch_min_accuracy=0.0, max_step_copies=-1)
        store = P.ExpertStore(opts, P.CheckpointFiles([f], False), stored)
        tables = torch.zeros(2, E, dtype=torch.int64)
        store.set_device_tables(tables.data_ptr())

        def ids(*xs):
            return np.array(xs, dtype=np.int32)

        a = ids(0, 1, 2)
        store.begin_step()
        store.resolve(0, a.ctypes.data, 3, 0)
        pred = ids(4, 5, 6, 7)
        store.load_host(1, pred.ctypes.data, 4)   # speculative copies take units already in host memory
        store.prefetch(1, pred.ctypes.data, 4, 0)
        used = ids(5, 6, 1, 1)                   # |used| = 3, of which 2 predicted
        store.resolve(1, used.ctypes.data, 4, 0)
        c = store.counters(1)
        assert c["predicted"] == 4 and c["predicted_used"] == 2 and c["used_after_prediction"] == 3
        assert c["prefetch_copies"] == 3        # 6 slots, 3 held by layer 0's step, then none evictable
        assert c["prefetch_hits"] == 2 and c["prefetch_wasted"] == 1
        # every used expert's table entry is its GPU unit, and holds the repacked bytes
        for e in (1, 5, 6):
            addr = int(tables[1, e])
            assert addr == store.gpu_address(1, e) and addr != 0
            host = store.host_unit(1, e)
            assert host != 0
            a_bytes = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * lay["bytes"]).from_address(addr))
            h_bytes = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * lay["bytes"]).from_address(host))
            assert (a_bytes == h_bytes).all()
        del store


@pytest.mark.parametrize("miss_mode", ["copy", "auto"])
def test_expert_store_source_serves_the_units_gemm(tmp_path, miss_mode):
    """ExpertStoreSource (the store as the plugins' ExpertSource) in CPU mode: each acquire hands
    out the layer's table row, and the expert FFN over it equals the torch ops over resident
    experts, over steps that reuse 4 slots and a host cache of 10 units for 16 experts."""
    from plugin_fixtures import Experts, expert_store
    e, h, i, k, slots = 16, 128, 64, 2, 4
    ex = Experts(e, h, i, seed=21)
    stored = ex.write_checkpoint(tmp_path / "experts.safetensors")
    lay = P.expert_unit_layout(h, i)
    gpu = torch.empty(slots * lay["bytes"], dtype=torch.uint8)
    tables = torch.zeros(1, e, dtype=torch.int64)
    store = expert_store(tmp_path / "experts.safetensors", stored, ex, gpu.data_ptr(), slots, 10, miss_mode,
                         on_device=False)
    source = P.ExpertStoreSource(store)
    ids = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="set_device_tables"):
        source.acquire(0, ids.data_ptr(), 2, 0)
    store.set_device_tables(tables.data_ptr())
    with pytest.raises(ValueError, match="layer 1 is outside"):
        source.acquire(1, ids.data_ptr(), 2, 0)
    assert source.address != 0

    def units_ffn(x, w, ids):
        t = ids.shape[0]
        xp, offs, perm = torch.ops.dsfp4.moe_permute(x, ids, e)
        ge, go = torch.ops.dsfp4.moe_compact_groups(offs, min(e, ids.numel()))
        gu = torch.ops.dsfp4.fp4_grouped_gemm_units(xp, go, ge, tables[0], lay["gate_up_qweight"],
                                                    lay["gate_up_qscale"], lay["gate_up_scale"], 2 * i, h, t)
        hh = torch.ops.dsfp4.silu_mul(gu)
        y = torch.ops.dsfp4.fp4_grouped_gemm_units(hh, go, ge, tables[0], lay["down_qweight"],
                                                   lay["down_qscale"], lay["down_scale"], h, i, t)
        return torch.ops.dsfp4.moe_combine(y, perm, w, offs)

    g = torch.Generator().manual_seed(0)
    for step, t in enumerate([1, 6, 3, 9, 2, 7]):
        n = slots if miss_mode == "copy" else 8   # copy: every expert of a step needs a slot
        subset = [(5 * step + j) % e for j in range(n)]
        ids = torch.tensor([[subset[(j * k + m) % n] for m in range(k)] for j in range(t)], dtype=torch.int32)
        if t > 1:
            ids[1, 0] = -1
        x = torch.randn(t, h, generator=g).to(torch.bfloat16)
        w = torch.rand(t, k, generator=g) + 0.1
        store.begin_step()
        assert source.acquire(0, ids.data_ptr(), ids.numel(), 0) == tables.data_ptr()
        assert torch.equal(units_ffn(x, w, ids), ex.reference(x, w, ids)), step
        source.release(0, 0)
    assert source.acquired == 6
    c = store.counters()
    assert c["evictions"] > 0 and c["ssd_reads"] > 10   # slots and host cache both reused
    assert (c["zero_copy"] > 0) == (miss_mode == "auto")


def test_read_error_fails_the_request_and_the_engine_recovers(model_dir, reference):
    ref_tokens, _ = reference
    eng = paged(model_dir, prefetch_layers=0)
    files = eng.store.files
    for i in range(files.num_files):
        files.inject_fault(i, 0)
    with pytest.raises(RuntimeError, match=r"\.safetensors: reading tensor 'model\.layers\.\d+\.mlp\.experts\.\d+\."):
        eng.generate(PROMPT, max_tokens=10, ignore_eos=True)
    for i in range(files.num_files):
        files.inject_fault(i, -1)
    assert eng.generate(PROMPT, max_tokens=10, ignore_eos=True).token_ids == ref_tokens


def test_truncated_shard_mid_generation(tmp_path, reference):
    d = tmp_path / "m"
    make_tiny(d, seed=3, hidden_size=512, moe_intermediate_size=256, n_routed_experts=64, num_hidden_layers=5,
              n_group=8, topk_group=4, num_experts_per_tok=6)
    eng = paged(d, prefetch_layers=0)
    shard = max(d.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    with pytest.raises(RuntimeError, match=rf"{shard.name}.*truncated"):
        eng.generate(PROMPT, max_tokens=10, ignore_eos=True)


def test_nothing_is_written_to_the_model_folder(model_dir):
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()}
    eng = paged(model_dir)
    eng.generate(PROMPT, max_tokens=4, ignore_eos=True)
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()}
    assert before == after


def test_expert_threshold_skips_only_non_resident_and_renormalizes(model_dir, reference):
    _, ref_logits = reference
    eng = paged(model_dir, expert_threshold=0.2, prefetch_layers=0)
    logits = eng.logits(PROMPT[:30])
    skipped = eng.store.counters()["experts"]["skipped"]
    assert skipped > 0
    assert not torch.equal(logits, ref_logits)                     # an approximation
    assert torch.isfinite(logits).all()
    # the filter on its own: weights of kept experts renormalized to the same total
    store = eng.store
    store.expert_threshold = 0.3
    table = store.tables[0].clone()
    table.zero_()                                                  # nothing on the GPU
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    ids = torch.tensor([[3, 1, 2, 0], [0, 1, 2, 3]], dtype=torch.int32)
    kw, kid = store._threshold(table, w, ids)
    assert kid.tolist() == [[3, 1, -1, -1], [0, -1, -1, -1]]      # the top expert always stays
    assert torch.allclose(kw.sum(-1), w.sum(-1))
    assert kw[1, 0].item() == pytest.approx(1.0)


def test_runtime_reconfigure(model_dir, reference):
    ref_tokens, _ = reference
    eng = paged(model_dir)
    eng.reconfigure_paging(miss_mode="zero_copy", cache_policy="lru")
    eng.store.reset_counters()
    assert eng.generate(PROMPT, max_tokens=10, ignore_eos=True).token_ids == ref_tokens
    assert eng.store.counters()["experts"]["copies"] == 0
    with pytest.raises(ValueError, match="new memory plan"):
        eng.reconfigure_paging(max_gpu_layers=2)


def test_facade_knobs_change_behaviour(model_dir, reference):
    from deepseek_fp4_plugin import DeepseekInference

    ref_tokens, _ = reference
    model = DeepseekInference(model_dir, device="cpu", memory_limit=0.03, paging={"cpu_cache_size": 0.02},
                              **{k: v for k, v in KW.items() if k != "device"})

    def run():
        model.engine.store.reset_counters()
        out = model.engine.generate(PROMPT, max_tokens=10, ignore_eos=True).token_ids
        return out, model.paging_counters

    assert isinstance(model.engine.store, PagedWeightStore) and not model.engine.memory_plan.paged_layers
    model.set_memory_config(max_gpu_layers=3)                      # a new plan: 4 layers paged, 2 slots
    assert len(model.engine.memory_plan.paged_layers) == 4
    tokens, c = run()
    assert tokens == ref_tokens and c["layers"]["copies"] > 0 and c["experts"]["predicted"] > 0
    model.set_memory_config(prefetch_layers=0)                     # at once: no prediction, no prefetch
    tokens, c = run()
    assert tokens == ref_tokens and c["experts"]["predicted"] == 0 and c["layers"]["prefetch_copies"] == 0
    model.set_memory_strategy({"max_experts": 1})                  # one copy per step, the rest in place
    tokens, c = run()
    assert tokens == ref_tokens and c["experts"]["zero_copy"] > 0
    host = model.engine.memory_plan.host_expert_slots
    model.set_memory_strategy({"cpu_cache_size": 0.04})
    assert model.engine.memory_plan.host_expert_slots > host
    model.set_compute_streams({"prefetch": False})
    model.set_memory_config(expert_threshold=0.2)                  # the opt-in approximation
    _, c = run()
    assert c["experts"]["skipped"] > 0
    model.apply_config({"batch_size": 1, "expert_threshold": 0.0})
    assert model.engine.max_batch_size == 1
    assert run()[0] == ref_tokens


def test_pinned_expert_stays_on_the_gpu(model_dir, reference):
    ref_tokens, _ = reference
    eng = paged(model_dir)
    layer = eng.store.moe_layers[1]
    eng.store.pin_expert(layer, 5)
    addr = eng.store.experts.gpu_address(1, 5)
    assert addr != 0
    assert eng.generate(PROMPT, max_tokens=10, ignore_eos=True).token_ids == ref_tokens
    assert eng.store.experts.gpu_address(1, 5) == addr                  # never evicted, same slot
    assert eng.store.counters()["experts"]["evictions"] > 0             # while others were
    with pytest.raises(ValueError, match="not a MoE layer"):
        eng.store.pin_expert(0, 1)


def test_corrupt_block_scale_of_a_paged_expert_is_an_error(tmp_path):
    d = tmp_path / "m"
    make_tiny(d, seed=4, hidden_size=512, moe_intermediate_size=256, n_routed_experts=64, num_hidden_layers=5,
              n_group=8, topk_group=4, num_experts_per_tok=6)
    src = open_checkpoint(d)
    layer = next(x for x in range(src.config.num_hidden_layers) if src.config.is_moe_layer(x))
    for e in range(src.config.n_routed_experts):   # every expert of one layer: the prompt must touch one
        info = src.tensor_info(f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight_scale")
        with open(info.file, "r+b") as f:
            f.seek(info.offset + 7)
            f.write(bytes([0xC0]))                      # e4m3 -2.0
    src.close()
    # before loading (a change after loading is refused as such): block scales of paged experts
    # are checked when an expert is first read, not at load
    eng = paged(d, prefetch_layers=0)
    with pytest.raises(ValueError, match=r"experts\.\d+\.up_proj\.weight_scale.*negative block scale"):
        eng.generate(PROMPT, max_tokens=4, ignore_eos=True)


def test_prefill_in_groups_equals_resident(model_dir, reference):
    """A prefill longer than the plan's prefill_group_tokens runs in consecutive layer-major
    groups and still equals the resident engine."""
    ref_tokens, ref_logits = reference
    eng = paged(model_dir)
    assert eng.memory_plan.prefill_group_tokens == 128     # max_seq_len: the 39-token prompt is one group
    eng.store.plan.prefill_group_tokens = 32             # 32-token chunks: two groups of one chunk
    assert eng.generate(PROMPT, max_tokens=10, ignore_eos=True).token_ids == ref_tokens
    assert torch.equal(eng.logits(PROMPT[:30]), ref_logits)


# ---------------------------------------------------------------------------------------
# a shard changed after loading


def test_reader_refuses_a_file_changed_since_open(tmp_path):
    f = tmp_path / "model-00001.safetensors"
    data = bytes(range(256)) * 400
    f.write_bytes(data)
    st = f.stat()
    files = P.CheckpointFiles([str(f)], True)
    out = torch.empty(9000, dtype=torch.uint8)
    files.read(0, 100, 9000, "layers.0.w", out.data_ptr())
    with open(f, "r+b") as fh:                 # the same size, other bytes
        fh.seek(5000)
        fh.write(bytes(16))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    for direct_size in (9000, 100):            # through O_DIRECT and buffered
        with pytest.raises(RuntimeError, match=r"model-00001\.safetensors: reading tensor 'layers\.0\.w'.*"
                                               r"changed since the model was loaded \(modified\)"):
            files.read(0, 100, direct_size, "layers.0.w", out.data_ptr())
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    files.read(0, 100, 9000, "layers.0.w", out.data_ptr())   # identity as recorded: reads again
    os.truncate(f, 4096)
    with pytest.raises(RuntimeError, match=r"size 102400 -> 4096 bytes, truncated"):
        files.read(0, 0, 100, "layers.0.w", out.data_ptr())
    with pytest.raises(ValueError, match="not a regular file"):
        P.CheckpointFiles(["/dev/zero"], False)


def test_shard_changed_after_load_fails_the_request_naming_it(tmp_path, reference):
    """Bytes of a shard changed in place after loading (same size): the paged store's read of it
    fails that request naming the file, and the engine serves again once the file is as it was
    (no half-filled cache entry survives)."""
    ref_tokens, _ = reference
    d = tmp_path / "m"
    make_tiny(d, seed=3, hidden_size=512, moe_intermediate_size=256, n_routed_experts=64, num_hidden_layers=5,
              n_group=8, topk_group=4, num_experts_per_tok=6)
    eng = paged(d, prefetch_layers=0)
    shards = sorted(d.glob("*.safetensors"))
    saved = {p: (p.read_bytes(), p.stat()) for p in shards}
    for p in shards:                                  # XOR a run of bytes in the middle of every shard
        with open(p, "r+b") as fh:
            fh.seek(p.stat().st_size // 2)
            chunk = fh.read(64)
            fh.seek(p.stat().st_size // 2)
            fh.write(bytes(b ^ 0xFF for b in chunk))
        os.utime(p, ns=(saved[p][1].st_atime_ns, saved[p][1].st_mtime_ns + 1_000_000))
    with pytest.raises(RuntimeError, match=r"model-\d+-of-\d+\.safetensors: reading tensor .*changed since "
                                           r"the model was loaded"):
        eng.generate(PROMPT, max_tokens=10, ignore_eos=True)
    for p, (data, st) in saved.items():               # put every shard back as it was
        p.write_bytes(data)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert eng.generate(PROMPT, max_tokens=10, ignore_eos=True).token_ids == ref_tokens
