"""Routing replay: the optimal offline cache (Belady's MIN) against exhaustive search, the engine's
policies, the latent-score generator and its fit (synthetic sources in the real file formats), and,
where the fitted model has been derived (scripts/derive_routing_traces.py), the generator against
the public sources' statistics."""

import functools
import itertools
import json

import numpy as np
import pytest
from deepseek_fp4_plugin import routing_fit as rf
from deepseek_fp4_plugin import routing_replay as rr
from deepseek_fp4_plugin.cache_floor import (
    belady_misses,
    equivalent_capacity,
    lrfu_misses,
    lru_misses,
    max_request,
    prefill_floor,
)

# ------------------------------------------------------------------------------------------------
# exhaustive search: the fewest misses over every choice of evictions


def _requests(trace, experts, pinned):
    steps, layers = trace.shape[:2]
    pin = {layer * experts + e for layer, e in pinned}
    out = []
    for s in range(steps):
        for layer in range(layers):
            keys = {layer * experts + int(e) for e in np.unique(trace[s, layer])}
            out.append(frozenset(keys - pin))
    return out


def brute_force_misses(trace, capacity, pinned=(), experts=None):
    experts = int(trace.max()) + 1 if experts is None else experts
    reqs = _requests(trace, experts, pinned)
    room = capacity - len(set(pinned))

    @functools.lru_cache(maxsize=None)
    def best(r, cache):
        if r == len(reqs):
            return 0
        need = reqs[r]
        miss = need - cache
        over = len(cache) + len(miss) - room
        evictable = sorted(cache - need)
        if over <= 0:
            return len(miss) + best(r + 1, cache | miss)
        return len(miss) + min(best(r + 1, (cache - frozenset(out)) | miss)
                               for out in itertools.combinations(evictable, over))

    return best(0, frozenset())


def _random_trace(rng, steps, layers, batch, k, experts, skew=1.0):
    p = 1.0 / np.arange(1, experts + 1) ** skew
    t = np.empty((steps, layers, batch, k), np.int64)
    for idx in np.ndindex(steps, layers, batch):
        t[idx] = rng.choice(experts, k, replace=False, p=p / p.sum())
    return t


def test_belady_matches_exhaustive_search():
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(120):
        layers, experts = int(rng.integers(1, 4)), int(rng.integers(2, 6))
        k = int(rng.integers(1, min(3, experts) + 1))
        batch = int(rng.integers(1, 3))
        steps = int(rng.integers(3, 8))
        trace = _random_trace(rng, steps, layers, batch, k, experts, skew=rng.uniform(0, 1.5))
        n_pin = int(rng.integers(0, 3))
        pinned = {(int(rng.integers(layers)), int(rng.integers(experts))) for _ in range(n_pin)}
        need = max(len(r) for r in _requests(trace, experts, pinned)) + len(pinned)
        capacity = int(rng.integers(need, need + 3))
        got = belady_misses(trace, capacity, pinned=pinned, experts=experts)
        want = brute_force_misses(trace, capacity, pinned, experts)
        assert got.total_misses == want, (trace.tolist(), capacity, pinned)
        lru = lru_misses(trace, capacity, pinned=pinned, experts=experts).total_misses
        lrfu = lrfu_misses(trace, capacity, pinned=pinned, experts=experts).total_misses
        assert want <= lru and want <= lrfu
        cases += 1
    assert cases == 120


def test_belady_layer_major_matches_exhaustive_search():
    rng = np.random.default_rng(1)
    for _ in range(30):
        trace = _random_trace(rng, 5, 3, 2, 2, 5)
        capacity = int(rng.integers(4, 8))
        # layer-major replay = one layer whose experts are (layer, expert) pairs, steps in that order
        keyed = trace + np.arange(3)[None, :, None, None] * 5
        as_one_layer = keyed.transpose(1, 0, 2, 3).reshape(15, 1, 2, 2)
        want = brute_force_misses(as_one_layer, capacity, experts=15)
        assert belady_misses(trace, capacity, order="layer_major").total_misses == want


def test_hand_cases_belady_lru_lfu():
    # one layer, one expert per step: A B A C B with 2 slots
    trace = np.array([0, 1, 0, 2, 1]).reshape(5, 1, 1, 1)
    assert belady_misses(trace, 2).misses[:, 0].tolist() == [1, 1, 0, 1, 0]  # C evicts A (never used again)
    assert lru_misses(trace, 2).misses[:, 0].tolist() == [1, 1, 0, 1, 1]     # C evicts B, B evicts A
    assert lrfu_misses(trace, 2, lam=0.0).misses[:, 0].tolist() == [1, 1, 0, 1, 1]  # LFU: C evicts B (1 use)
    t = np.array([1, 0, 1, 2, 0]).reshape(5, 1, 1, 1)
    assert lru_misses(t, 2).misses[:, 0].tolist() == [1, 1, 0, 1, 1]         # C evicts A (older than B)
    # frequency against recency: 0 used twice, then 1, 2, 1
    t = np.array([0, 0, 1, 2, 1]).reshape(5, 1, 1, 1)
    assert lrfu_misses(t, 2, lam=0.0).misses[:, 0].tolist() == [1, 0, 1, 1, 1]   # 2 evicts 1 (fewer uses)
    assert lrfu_misses(t, 2, lam=10.0).misses[:, 0].tolist() == [1, 0, 1, 1, 0]  # large λ: LRU
    assert lru_misses(t, 2).misses[:, 0].tolist() == [1, 0, 1, 1, 0]
    # a pinned expert takes a slot and never misses
    r = belady_misses(trace, 2, pinned=[(0, 0)])
    assert r.total_misses == 3 and r.requests.sum() == 5
    # a request's experts are co-resident: 2 distinct per step needs 2 slots, misses counted per expert
    t2 = np.array([[0, 1], [2, 3], [0, 1]]).reshape(3, 1, 1, 2)
    assert belady_misses(t2, 2).misses[:, 0].tolist() == [2, 2, 2]
    assert belady_misses(t2, 4).misses[:, 0].tolist() == [2, 2, 0]


def test_policies_ordering_on_skewed_traces():
    rng = np.random.default_rng(2)
    trace = _random_trace(rng, 60, 4, 4, 3, 16, skew=1.2)
    compulsory = len({(i, int(e)) for i in range(4) for e in np.unique(trace[:, i])})
    prev = None
    for capacity in (12, 16, 24, 32, 48, 64):
        b = belady_misses(trace, capacity)
        lru = lru_misses(trace, capacity)
        lrfu = lrfu_misses(trace, capacity)
        assert compulsory <= b.total_misses <= min(lru.total_misses, lrfu.total_misses) <= b.total_requests
        assert np.all(b.misses <= b.requests) and b.misses.shape == (60, 4)
        assert prev is None or b.total_misses <= prev
        prev = b.total_misses
    everything = belady_misses(trace, 64)
    assert everything.total_misses == compulsory == lru_misses(trace, 64).total_misses
    # with room for all but one layer's experts, the optimal cache is strictly better than LRU here
    assert belady_misses(trace, 24).total_misses < lru_misses(trace, 24).total_misses


def test_prefill_floor():
    trace = np.array([[[0, 1], [1, 2], [0, 2]], [[3, 4], [3, 4], [3, 4]]])  # [layers 2, tokens 3, k 2]
    assert prefill_floor(trace).tolist() == [3, 2]
    assert prefill_floor(trace, pinned=[(1, 3), (0, 5)], experts=6).tolist() == [3, 1]


def test_max_request_and_equivalent_capacity():
    t = np.array([[[[0, 1], [1, 2]], [[3, 4], [3, 4]]]])  # [1 step, 2 layers, batch 2, k 2]
    assert max_request(t) == 3
    assert equivalent_capacity(120, 58, 6, 8.0) == 20     # (120 − 8) · 6/58 + 8 = 19.6
    assert equivalent_capacity(120, 58, 58, 8.0) == 120
    with pytest.raises(ValueError, match="sub_layers"):
        equivalent_capacity(120, 58, 59, 8.0)
    with pytest.raises(ValueError, match="working_set"):
        equivalent_capacity(10, 58, 6, 11.0)


@pytest.mark.parametrize("call, match", [
    (lambda t: belady_misses(t, 0), "capacity"),
    (lambda t: belady_misses(t, 2.5), "capacity"),
    (lambda t: belady_misses(t, 1), "capacity"),                       # a request needs 2 slots
    (lambda t: belady_misses(t[0], 4), "trace"),                       # 3-D
    (lambda t: belady_misses(t.astype(np.float32), 4), "trace"),
    (lambda t: belady_misses(-t - 1, 4), "trace"),
    (lambda t: belady_misses(t, 4, experts=2), "trace"),
    (lambda t: belady_misses(t, 4, experts=0), "experts"),
    (lambda t: belady_misses(t, 4, pinned=[(0, 9)], experts=4), "pinned"),
    (lambda t: belady_misses(t, 4, pinned=[3]), "pinned"),
    (lambda t: belady_misses(t, 3, pinned=[(0, 0), (0, 1), (0, 2)]), "capacity"),
    (lambda t: belady_misses(t, 4, order="random"), "order"),
    (lambda t: lru_misses(t, 0), "capacity"),
    (lambda t: lrfu_misses(t, 4, lam=-1.0), "lam"),
    (lambda t: prefill_floor(t), "trace"),
])
def test_cache_bad_arguments(call, match):
    trace = np.array([[0, 1], [2, 3], [0, 1]]).reshape(3, 1, 1, 2)
    with pytest.raises(ValueError, match=match):
        call(trace)


# ------------------------------------------------------------------------------------------------
# generator on a synthetic model


def _synthetic_model(layers=4, experts=32, top_k=4, seed=0):
    rng = np.random.default_rng(seed)
    pop = rng.lognormal(0, np.linspace(0.4, 1.0, layers)[:, None], (layers, experts))
    pop /= pop.sum(1, keepdims=True)
    c = len(rr.kTaus)
    w = np.zeros((layers, c + 2))
    w[:, 0] = np.linspace(0.1, 0.6, layers)  # fast part
    w[:, 1] = 0.1
    w[:, c] = 0.1                            # persistent
    w[:, c + 1] = 1 - w.sum(1)
    return rr.RoutingModel(pop, pop ** 1.2 / (pop ** 1.2).sum(1, keepdims=True), w, top_k,
                           calibration_samples=3000)


@pytest.fixture(scope="module")
def synth():
    return _synthetic_model()


def test_calibration_hits_target_inclusion():
    rng = np.random.default_rng(3)
    p = rng.lognormal(0, 0.5, 24)
    p /= p.sum()
    b = rr.calibrate_bias(p, 3, samples=4000)
    z = rng.standard_normal((60000, 24)) + b
    freq = np.bincount(np.argpartition(-z, 2, axis=1)[:, :3].ravel(), minlength=24) / 60000
    assert np.max(np.abs(freq / (3 * p) - 1)) < 0.08  # MC noise of the check: ~2% at the smallest
    assert abs(rr.norm_sf(1.0) - 0.158655254) < 2e-7 and abs(rr.norm_isf(0.025) - 1.959963985) < 1e-5
    with pytest.raises(ValueError, match="popularity"):
        rr.calibrate_bias(np.r_[10.0, np.ones(9)], 3)  # 3 · 10/19 > 1


def test_decode_trace_shape_dtype_distinct_and_seeds(synth):
    t = synth.decode_trace(37, 3, layers=4, experts=32, top_k=4, seed=5)
    assert t.shape == (37, 4, 3, 4) and t.dtype == np.int32
    assert t.min() >= 0 and t.max() < 32
    s = np.sort(t, -1)
    assert np.all(s[..., 1:] != s[..., :-1])  # a token's ids are distinct
    assert np.array_equal(t, synth.decode_trace(37, 3, layers=4, experts=32, top_k=4, seed=5))
    assert not np.array_equal(t, synth.decode_trace(37, 3, layers=4, experts=32, top_k=4, seed=6))
    # a layer subset, a smaller batch and fewer steps are the matching slice of the larger trace
    sub = synth.decode_trace(20, 2, layers=2, experts=32, top_k=4, seed=5, layers_subset=[1, 3])
    assert np.array_equal(sub, t[:20, [1, 3], :2])
    p = synth.prefill_trace(50, layers=4, experts=32, top_k=4, seed=1)
    assert p.shape == (4, 50, 4) and p.dtype == np.int32
    s = np.sort(p, -1)
    assert np.all(s[..., 1:] != s[..., :-1])


def test_generator_reproduces_popularity(synth):
    # many independent sequences: the pooled selection rate is the calibrated marginal
    t = synth.decode_trace(16, 600, layers=4, experts=32, top_k=4, seed=0)
    counts = np.stack([np.bincount(t[:, i].ravel(), minlength=32) for i in range(4)])
    freq = counts / counts.sum(1, keepdims=True)
    want = rr.skew_stats(synth.decode_popularity)
    got = rr.skew_stats(counts)
    assert np.max(np.abs(freq - synth.decode_popularity)) < 0.01
    np.testing.assert_allclose(got["max_over_mean"], want["max_over_mean"], rtol=0.08)
    np.testing.assert_allclose(got["top10_share"], want["top10_share"], atol=0.015)


def test_generator_reuse_follows_the_latent_correlation(synth):
    # more correlated layers reuse more; reuse falls with distance towards the persistent floor
    st = rr.trace_stats(synth.decode_trace(300, 16, layers=4, experts=32, top_k=4), 32)
    r1 = np.asarray(st["layers"]["reuse"])
    assert np.all(np.diff(r1) > 0)
    r = st["summary"]["reuse_at"]
    assert r["1"] > r["4"] > r["64"] > 4 / 32


def test_other_shapes_keep_the_skew(synth):
    t = synth.decode_trace(16, 400, layers=2, experts=16, top_k=2, seed=0, layers_subset="first")
    assert t.shape == (16, 2, 400, 2) and t.max() < 16
    got = rr.skew_stats(np.stack([np.bincount(t[:, i].ravel(), minlength=16) for i in range(2)]))
    want = rr.skew_stats(synth.popularity("decode", 16)[:2])
    np.testing.assert_allclose(got["top10_share"], want["top10_share"], atol=0.02)
    assert abs(rr._quantile_map(synth.decode_popularity[0], 16).sum() - 1) < 1e-9


def test_select_layers(synth):
    m = _synthetic_model(layers=20, experts=16, top_k=2)
    assert m.select_layers(4, "first").tolist() == [0, 1, 2, 3]
    assert m.select_layers(4, "spread").tolist() == [2, 7, 12, 17]
    rep = m.select_layers(4, "representative")
    assert len(set(rep.tolist())) == 4 and all(lo <= i < lo + 5 for i, lo in zip(rep, (0, 5, 10, 15)))
    stats = m.layer_statistics()
    scale = stats.std(0)

    def err(ids):
        return float(np.sum(((stats[ids].mean(0) - stats.mean(0)) / scale) ** 2))

    assert err(rep) <= err(m.select_layers(4, "spread")) + 1e-12
    assert err(rep) < err(m.select_layers(4, "first"))
    assert m.select_layers(20).tolist() == list(range(20))
    assert rr.layer_names([0, 57]) == [3, 60]


def test_trace_stats_hand_cases():
    same = np.zeros((5, 1, 2, 2), np.int64)
    same[..., 1] = 1                       # every token uses experts 0 and 1
    st = rr.trace_stats(same, experts=4)
    assert st["layers"]["reuse"] == [1.0] and st["layers"]["distinct_per_step"] == [2.0]
    assert st["layers"]["max_over_mean"] == [2.0] and st["layers"]["top10_share"] == [0.5]
    alt = np.array([[0, 1], [2, 3]] * 3).reshape(6, 1, 1, 2)
    st = rr.trace_stats(alt, experts=4)
    assert st["layers"]["reuse"] == [0.0] and st["layers"]["reuse_at"]["2"] == [1.0]
    pre = rr.trace_stats(alt[:, :, 0, :].transpose(1, 0, 2), experts=4)  # [layers, tokens, k]
    assert pre["shape"]["steps"] == 6 and pre["layers"]["reuse"] == [0.0]


@pytest.mark.parametrize("call, match", [
    (lambda m: m.decode_trace(0, 1), "steps"),
    (lambda m: m.decode_trace(4, 0), "batch"),
    (lambda m: m.decode_trace(4, 1, layers=9, experts=32, top_k=4), "layers"),
    (lambda m: m.decode_trace(4, 1, layers=4, experts=1), "experts"),
    (lambda m: m.decode_trace(4, 1, layers=4, experts=32, top_k=32), "top_k"),
    (lambda m: m.decode_trace(4, 1, layers=4, experts=32, top_k=4, seed=-1), "seed"),
    (lambda m: m.decode_trace(4, 1, layers=2, experts=32, top_k=4, layers_subset="middle"), "layers_subset"),
    (lambda m: m.decode_trace(4, 1, layers=2, experts=32, top_k=4, layers_subset=[1, 1]), "layers_subset"),
    (lambda m: m.decode_trace(4, 1, layers=2, experts=32, top_k=4, layers_subset=[0, 4]), "layers_subset"),
    (lambda m: m.prefill_trace(0, layers=4, experts=32, top_k=4), "tokens"),
    (lambda m: m.popularity("train"), "phase"),
    (lambda m: rr.trace_stats(np.zeros((3, 2), np.int64)), "trace"),
    (lambda m: rr.trace_stats(np.zeros((3, 1, 1, 2), np.int64), distances=(2, 4)), "distances"),
])
def test_generator_bad_arguments(synth, call, match):
    with pytest.raises(ValueError, match=match):
        call(synth)


def test_model_save_load_roundtrip(synth, tmp_path):
    synth.meta["note"] = "synthetic"
    path = tmp_path / "m.npz"
    synth.decode_trace(3, 1, layers=4, experts=32, top_k=4)  # calibrates the decode biases
    synth.save(path)
    back = rr.RoutingModel.load(path)
    assert back.meta["note"] == "synthetic" and back.top_k == 4 and back.taus == synth.taus
    np.testing.assert_array_equal(back.weights, synth.weights)
    np.testing.assert_array_equal(back.bias("decode", 32, 4), synth.bias("decode", 32, 4))
    assert np.array_equal(back.decode_trace(9, 2, layers=4, experts=32, top_k=4),
                          synth.decode_trace(9, 2, layers=4, experts=32, top_k=4))
    with pytest.raises(FileNotFoundError, match="derive_routing_traces"):
        rr.RoutingModel.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="source statistics"):
        synth.source_stats()


def test_fit_weights_recovers_known_parts():
    d = rf.kFitDistances
    true = np.array([0.3, 0.1, 0.05, 0.1, 0.45])
    corr = rr.component_weights_to_corr(true[None], rr.kTaus, d)[0]
    got = rf.fit_weights(corr, d, np.ones(len(d)))
    np.testing.assert_allclose(got, true, atol=1e-6)
    assert np.all(rf.fit_weights(np.full(len(d), -0.1), d, np.ones(len(d)))[:-1] == 0)  # nothing to fit


# ------------------------------------------------------------------------------------------------
# the fit end to end on synthetic sources written in the real formats


def _write_sources(tmp_path, r1_pop, truth: rr.RoutingModel, prompts=60, seed=0):
    """Serving counts (R1 layout: 3 all-zero dense rows) of ``r1_pop`` and V2-Lite-style CSVs
    (BOS row first, tokens with commas) generated by ``truth``."""
    sg = tmp_path / "sglang" / "attachment_ep_statistics"
    sg.mkdir(parents=True)
    for phase, scale in (("decode", 1.0), ("prefill", 1.1)):
        for name in ("a", "b"):
            pop = r1_pop ** scale / (r1_pop ** scale).sum(1, keepdims=True)
            counts = np.vstack([np.zeros((3, r1_pop.shape[1])), np.round(pop * 4e6)])
            (sg / f"{phase}_{name}.json").write_text(json.dumps({"logical_count": counts.tolist()}))
    v2 = tmp_path / "v2" / "expert_activation_scripts" / "training_data_eamc"
    v2.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for n in range(1000, 1000 + prompts):
        length = int(rng.integers(20, 200))
        t = truth.decode_trace(length, 1, layers=truth.layers, experts=truth.experts, top_k=truth.top_k,
                               seed=n)[:, :, 0]  # [T, L, k]
        rows = ["Layer ID,Batch Number,Token,Activated Expert IDs"]
        for layer in range(truth.layers):
            bos = ", ".join(str(x) for x in rng.permutation(truth.experts)[:truth.top_k])
            rows.append(f'{layer + 1},0,{rf.kBos},"[{bos}]"')
            for tok in range(length):
                ids = ", ".join(str(int(x)) for x in t[tok, layer])
                rows.append(f'{layer + 1},0,"tok,{tok}","[{ids}]"')
        (v2 / f"prompt_{n}_data.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path / "sglang", tmp_path / "v2"


def test_fit_end_to_end_on_synthetic_sources(tmp_path):
    truth = _synthetic_model(layers=3, experts=16, top_k=3, seed=4)
    r1_pop = _synthetic_model(layers=4, experts=32, top_k=4, seed=5).decode_popularity
    sg, v2 = _write_sources(tmp_path, r1_pop, truth)
    m = rf.fit_routing_model(sg, v2, top_k=4, v2_experts=16, corr_grid=25, pairs=3000,
                             calibration_samples=2000, stats_steps=64, stats_batch=8, stats_prefill=256)
    src = m.source_model
    assert (src.layers, src.experts, src.top_k) == (3, 16, 3) and (m.layers, m.experts, m.top_k) == (4, 32, 4)
    np.testing.assert_allclose(m.decode_popularity, r1_pop, atol=1e-6)
    # the latent correlation recovered from reuse alone (30 even prompts: loose)
    d = [1, 4, 16]
    got = rr.component_weights_to_corr(src.weights, src.taus, d)
    want = rr.component_weights_to_corr(truth.weights, truth.taus, d)
    assert np.max(np.abs(got - want)) < 0.08, (got, want)
    # mapped by relative depth: 3 source layers onto 4
    np.testing.assert_allclose(m.weights[0], src.weights[0], atol=1e-12)  # above the first: clamped
    between = src.weights[0] + (src.weights[1] - src.weights[0]) * 0.625  # depth 3/8 between 1/6 and 3/6
    np.testing.assert_allclose(m.weights[1], between, atol=1e-12)
    stats = m.source_stats()
    assert set(stats) == {"r1_decode", "r1_prefill", "v2_lite_even", "v2_lite_odd"}
    assert stats["v2_lite_even"]["files"] == 30 and stats["v2_lite_odd"]["files"] == 30
    np.testing.assert_allclose(stats["r1_decode"]["layers"]["max_over_mean"],
                               rr.skew_stats(r1_pop)["max_over_mean"], rtol=1e-5)
    # the source-shape generator reproduces the even files' reuse it was fitted on
    gen = rr.trace_stats(src.decode_trace(200, 16, layers=3, experts=16, top_k=3), 16)
    np.testing.assert_allclose(gen["layers"]["reuse"], stats["v2_lite_even"]["layers"]["reuse"], atol=0.04)
    assert "decode" in m.meta["generator_stats"] and "source_shape" in m.meta["generator_stats"]


def _derive_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "derive_routing_traces.py"
    spec = importlib.util.spec_from_file_location("derive_routing_traces", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_derive_script_from_folders_and_a_bare_repository(tmp_path, capsys):
    import shutil
    import subprocess

    truth = _synthetic_model(layers=3, experts=16, top_k=3, seed=6)
    r1_pop = _synthetic_model(layers=4, experts=32, top_k=4, seed=5).decode_popularity
    sg, v2 = _write_sources(tmp_path, r1_pop, truth, prompts=20)
    script = _derive_script()
    v2_arg = v2
    if shutil.which("git"):  # the V2-Lite side from a bare repository, read with git archive
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
        subprocess.run([*git, "init", "-q", str(v2)], check=True)
        subprocess.run([*git, "-C", str(v2), "add", "."], check=True)
        subprocess.run([*git, "-C", str(v2), "commit", "-q", "-m", "data"], check=True)
        subprocess.run([*git, "clone", "-q", "--bare", str(v2), str(tmp_path / "v2.git")], check=True)
        v2_arg = tmp_path / "v2.git"
    # the serving counts as a plain folder holding the files themselves
    out = tmp_path / "out" / "model.npz"
    with pytest.raises(ValueError, match="does not exist"):
        script.main(["--sglang", str(tmp_path / "nowhere"), "--v2-lite", str(v2_arg), "--out", str(out)])
    args = ["--sglang", str(sg / "attachment_ep_statistics"), "--v2-lite", str(v2_arg), "--out", str(out),
            "--cache-eval-steps", "0", "--top-k", "4", "--v2-lite-experts", "16"]
    assert script.main(args) == 0
    m = rr.RoutingModel.load(out)
    assert (m.layers, m.experts, m.top_k) == (4, 32, 4)
    src = m.meta["sources"]
    assert src["sglang"]["commit"].startswith("unknown")
    if v2_arg != v2:
        assert len(src["v2_lite"]["commit"]) == 40
    stats = json.loads((out.parent / "routing_stats.json").read_text())
    assert set(stats["source_stats"]) == {"r1_decode", "r1_prefill", "v2_lite_even", "v2_lite_odd"}
    assert "| reuse d=1 |" in capsys.readouterr().out


@pytest.mark.parametrize("text, match", [
    ("Layer,Batch,Token,Ids\n", "header"),
    ('Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,a,"[1, 1, 2]"\n', "distinct"),
    ('Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,a,"[1, 2, 99]"\n', "distinct"),
    ('Layer ID,Batch Number,Token,Activated Expert IDs\n2,0,a,"[1, 2, 3]"\n', "layers"),
    ('Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,a,"[1, 2, x]"\n', "parse"),
    ('Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,a,"[1, 2, 3]"\n2,0,a,"[1, 2, 3]"\n'
     '2,0,b,"[1, 2, 3]"\n', "token counts"),
])
def test_v2_reader_rejects_bad_files(tmp_path, text, match):
    f = tmp_path / "prompt_2_data.csv"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as e:
        rf.read_v2_lite_csv(f, experts=64)
    assert "prompt_2_data.csv" in str(e.value)


def test_counts_reader_rejects_bad_files(tmp_path):
    (tmp_path / "decode_x.json").write_text(json.dumps({"logical_count": [[1.0] * 8] * 5}))
    with pytest.raises(ValueError, match="dense"):
        rf.load_sglang_counts(tmp_path)
    (tmp_path / "decode_x.json").write_text(json.dumps({"counts": []}))
    with pytest.raises(ValueError, match="decode_x.json"):
        rf.load_sglang_counts(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .*json"):
        rf.load_sglang_counts(empty)


# ------------------------------------------------------------------------------------------------
# the fitted model against the public sources (needs the derived model; see docs/routing_data.md)

try:
    _FITTED = rr.RoutingModel.load()
except FileNotFoundError:
    _FITTED = None
needs_fitted = pytest.mark.skipif(
    _FITTED is None, reason="derived routing model not present (scripts/derive_routing_traces.py; "
    "the sources carry no license to commit it)")


@needs_fitted
def test_fitted_skew_matches_r1_counts():
    """Per layer, on 8 layers spread over depth: max/mean within 12% and top-10% share within 0.01 of
    the serving counts' (decode), from 8,192 tokens of 512 independent sequences."""
    ids = _FITTED.select_layers(8, "spread")
    t = _FITTED.decode_trace(16, 512, layers=8, layers_subset=ids)
    got = rr.trace_stats(t)["layers"]
    src = _FITTED.source_stats()["r1_decode"]["layers"]
    np.testing.assert_allclose(got["max_over_mean"], np.asarray(src["max_over_mean"])[ids], rtol=0.12)
    np.testing.assert_allclose(got["top10_share"], np.asarray(src["top10_share"])[ids], atol=0.01)


@needs_fitted
def test_fitted_reuse_matches_v2_lite_even_files_and_odd_loosely():
    """At V2-Lite's shape, reuse at distance 1 per layer within 0.03 of the even (fit) files, its
    mean within 0.01, and the means at distances 2, 4, 16 within 0.015; the odd (evaluation) files:
    the mean at distance 1 within 0.02, at 4 and 16 within 0.03."""
    src = _FITTED.source_model
    t = src.decode_trace(128, 48, layers=src.layers, experts=src.experts, top_k=src.top_k)
    got = rr.trace_stats(t, src.experts, distances=(1, 2, 4, 16))
    even = _FITTED.source_stats()["v2_lite_even"]
    odd = _FITTED.source_stats()["v2_lite_odd"]
    np.testing.assert_allclose(got["layers"]["reuse"], even["layers"]["reuse"], atol=0.03)
    assert abs(got["summary"]["reuse"]["mean"] - even["summary"]["reuse"]["mean"]) < 0.01
    for d in ("2", "4", "16"):
        assert abs(got["summary"]["reuse_at"][d] - even["summary"]["reuse_at"][d]) < 0.015, d
    print("reuse mean d=1: even %.4f odd %.4f generator %.4f" % (
        even["summary"]["reuse"]["mean"], odd["summary"]["reuse"]["mean"], got["summary"]["reuse"]["mean"]))
    assert abs(got["summary"]["reuse"]["mean"] - odd["summary"]["reuse"]["mean"]) < 0.02
    for d in ("4", "16"):
        assert abs(got["summary"]["reuse_at"][d] - odd["summary"]["reuse_at"][d]) < 0.03, d


@needs_fitted
def test_fitted_representative_layers_stand_for_full_depth():
    """Batch 1, the full-depth share (120 slots for 58 layers): Belady's misses per token per layer on
    the 6 representative layers with equivalent_capacity slots within 5% of all 58 layers'."""
    full = _FITTED.decode_trace(300, 1)
    ids = _FITTED.select_layers(6)
    want = belady_misses(full, 120).total_misses / (300 * 58)
    got = belady_misses(full[:, ids], equivalent_capacity(120, 58, 6, 8.0)).total_misses / (300 * 6)
    assert abs(got / want - 1) < 0.05, (got, want)


@needs_fitted
def test_fitted_model_shape_and_layers():
    assert (_FITTED.layers, _FITTED.experts, _FITTED.top_k) == (58, 256, 8)
    rep = _FITTED.select_layers(6)
    assert len(rep) == 6 and np.all(np.diff(rep) > 0)
    t = _FITTED.decode_trace(4, 2, layers=6)
    assert t.shape == (4, 6, 2, 8) and t.dtype == np.int32


def test_min_misses_requests_equals_exhaustive_search():
    """The benchmark's decode floor (a missed key may be used without being cached) against an
    exhaustive search over every cache state after every request, on small random traces: multi-key
    requests, requests larger than the cache, keys of several layers, warm-up requests not counted."""
    import itertools
    import random

    from deepseek_fp4_plugin.cache_floor import min_misses_requests

    def exhaustive(reqs, cap, counted):
        best = [1 << 30]

        def go(i, cache, m):
            if m >= best[0]:
                return
            if i == len(reqs):
                best[0] = m
                return
            miss = sum(k not in cache for k in reqs[i]) if counted[i] else 0
            pool = sorted(set(cache) | set(reqs[i]))
            for r in range(min(cap, len(pool)) + 1):
                for keep in itertools.combinations(pool, r):
                    go(i + 1, frozenset(keep), m + miss)

        go(0, frozenset(), 0)
        return best[0]

    rnd = random.Random(3)
    for _ in range(60):
        reqs = [[(rnd.randint(0, 1), e) for e in rnd.sample(range(4), rnd.randint(1, 3))] for _ in range(7)]
        cap = rnd.randint(0, 4)
        counted = [i >= 2 or rnd.random() < 0.5 for i in range(len(reqs))]
        assert min_misses_requests(reqs, cap, counted) == exhaustive(reqs, cap, counted), (reqs, cap, counted)
    with pytest.raises(ValueError, match="capacity"):
        min_misses_requests([[1]], -1)
    with pytest.raises(ValueError, match="counted"):
        min_misses_requests([[1], [2]], 1, [True])


def test_min_misses_requests_is_never_above_belady():
    from deepseek_fp4_plugin.cache_floor import belady_misses, min_misses_requests

    rng = np.random.default_rng(4)
    trace = np.stack([[[rng.choice(32, 4, replace=False) for _ in range(2)] for _ in range(3)]
                      for _ in range(40)]).astype(np.int32)               # [steps, layers, batch, k]
    reqs = [[(l, int(e)) for e in np.unique(trace[s, l])] for s in range(40) for l in range(3)]
    for cap in (8, 12, 30):
        assert min_misses_requests(reqs, cap) <= int(belady_misses(trace, cap, experts=32).misses.sum())
