"""The decode pipeline and the paging store's ordering on the GPU: ready words in the units GEMM,
the race stress case (a host cache smaller than the experts, speculative copies always on,
routing that changes every step), paged equal to resident under routing replay for 1,000 steps,
and no growth of GPU memory."""

import numpy as np
import pytest
import torch

from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.ops import Fp4Weight
from deepseek_fp4_plugin.paged import PagedWeightStore
from deepseek_fp4_plugin.replay import RoutingReplay
from deepseek_fp4_plugin.tiny import make_tiny

KW = dict(device="cuda", max_batch_size=4, max_seq_len=1280, prefill_chunk=64, verbose=False)
E, K, LAYERS = 128, 6, 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline_tiny")
    make_tiny(d, seed=2, hidden_size=512, moe_intermediate_size=256, n_routed_experts=E, num_hidden_layers=LAYERS,
              n_group=8, topk_group=4, num_experts_per_tok=K)
    return d


def _trace(moe_layers, steps=97, batch=4, seed=0):
    """Skewed routing that changes every step (each layer its own popularity)."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(E, 0.2), size=moe_layers)
    dec = np.stack([[[rng.choice(E, K, replace=False, p=pop[l]) for _ in range(batch)] for l in range(moe_layers)]
                    for _ in range(steps)]).astype(np.int32)
    pre = np.stack([[rng.choice(E, K, replace=False, p=pop[l]) for _ in range(300)]
                    for l in range(moe_layers)]).astype(np.int32)
    return dec, pre


def _teacher_forced_logits(eng, prompt, feed, batch):
    """Logits of every decode step when the same tokens are fed (no sampling drift)."""
    tokens = torch.tensor([prompt] * batch, device="cuda")
    out = [eng.prefill(tokens, [len(prompt)] * batch)]
    pos = len(prompt)
    for t in feed:
        out.append(eng.decode_one_token(torch.full((batch,), t, device="cuda"), torch.full((batch,), pos, device="cuda"),
                                        pos + 1))
        pos += 1
    return torch.stack(out)


def test_copy_stream_gets_a_queue_apart_from_the_compute_stream(model_dir):
    """The pipeline's GEMMs wait on the compute stream for copies issued later on the store's copy
    stream: the engine's probe keeps a copy stream that overtakes the compute stream's queued
    work (else every wait would time out), and the pipeline stays on; after probes that may have
    replaced the copy stream, the pipeline thread issues its copies on the one finally kept (same
    tokens, no failed expert)."""
    prompt = list(range(3, 30))
    eng = Engine.from_pretrained(model_dir, memory_limit=0.125, paging=dict(cpu_cache_size=0.03), **KW)
    eng.set_use_cuda_graph(True)
    want = [o.token_ids for o in eng.generate([prompt], max_tokens=12, ignore_eos=True)]
    st = eng.store
    assert st.pipeline and st.pipeline_off_reason is None
    compute = st.compute_stream.cuda_stream
    ok, tries = st.experts.check_copy_stream([compute], 1)
    assert ok and tries == 1
    # many streams: if one shares the copy stream's queue, the copy stream is replaced (on the H100
    # with 8 connections none did: the driver does not hand queues out strictly in turn)
    crowd = [torch.cuda.Stream() for _ in range(40)]
    ok, tries = st.experts.check_copy_stream([s.cuda_stream for s in crowd], 3)
    assert (ok and tries == 1) or (not ok and tries == 3)
    ok, tries = st.experts.check_copy_stream([compute], 33)
    assert ok
    got = [o.token_ids for o in eng.generate([prompt], max_tokens=12, ignore_eos=True)]
    assert got == want and st.counters()["experts"]["failed"] == 0


def test_one_hardware_queue_decodes_without_the_pipeline(model_dir):
    """CUDA_DEVICE_MAX_CONNECTIONS=1 (set by some training stacks) puts every stream on one
    queue: the engine turns the pipeline off, says why, and decodes the same tokens. The probe
    itself, run past the engine's shortcut, must see the copy stuck behind the compute stream."""
    import json
    import os
    import subprocess
    import sys
    prompt = list(range(3, 30))
    res = Engine.from_pretrained(model_dir, **KW)
    want = [o.token_ids for o in res.generate([prompt], max_tokens=8, ignore_eos=True)]
    del res
    script = f"""
import json, warnings
from deepseek_fp4_plugin import Engine
eng = Engine.from_pretrained({str(model_dir)!r}, memory_limit=0.125, paging=dict(cpu_cache_size=0.03), **{KW!r})
st = eng.store
probe = st.experts.check_copy_stream([st.compute_stream.cuda_stream], 2)
eng.set_use_cuda_graph(True)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    out = eng.generate([{prompt!r}], max_tokens=8, ignore_eos=True)
print(json.dumps(dict(probe=list(probe), pipeline=st.pipeline, reason=st.pipeline_off_reason,
                      tokens=[o.token_ids for o in out], failed=st.counters()["experts"]["failed"])))
"""
    r = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1"),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["probe"][0] is False, "the probe did not see the copy queue behind the compute stream's work"
    assert got["pipeline"] is False and "hardware queue" in got["reason"]
    assert got["tokens"] == want and got["failed"] == 0


def test_race_stress_small_host_cache_prefetch_always_changing_routing(model_dir):
    """The races of the old store (a host unit refilled while its copy was in flight, events reused
    across streams, a table copied from a mirror that changed) would show here as logits that
    differ from the resident engine's: the host cache holds a sixth of the experts, speculative
    copies are never gated, routing changes every step, 1,000 steps."""
    n_moe = LAYERS - 1
    dec, pre = _trace(n_moe)
    prompt = list(range(3, 40))
    feed = [(7 * i) % 500 + 3 for i in range(1000)]
    res = Engine.from_pretrained(model_dir, **KW)
    res.set_routing_replay(RoutingReplay(dec, pre))
    res.set_use_cuda_graph(True)
    want = _teacher_forced_logits(res, prompt, feed, 4)
    del res
    eng = Engine.from_pretrained(model_dir, memory_limit=0.125, paging=dict(cpu_cache_size=0.03, prefetch_min_accuracy=0.0),
                                 **KW)
    assert isinstance(eng.store, PagedWeightStore) and eng.store.pipeline
    assert eng.memory_plan.host_expert_slots < eng.memory_plan.total_experts
    eng.set_routing_replay(RoutingReplay(dec, pre))
    eng.set_use_cuda_graph(True)
    torch.cuda.synchronize()
    got = _teacher_forced_logits(eng, prompt, feed, 4)
    assert torch.isfinite(got).all()
    err = (got - want).abs().amax(dim=(1, 2))
    assert err.max().item() < 1e-3, f"step {int(err.argmax())} differs by {err.max().item()}"
    c = eng.store.counters()["experts"]
    assert c["prefetch_copies"] > 100 and c["ssd_reads"] > 1000 and c["failed"] == 0
    assert c["publishes"] >= 1000 * n_moe


def test_pipeline_1000_steps_replay_no_memory_growth(model_dir):
    n_moe = LAYERS - 1
    dec, pre = _trace(n_moe, seed=1)
    eng = Engine.from_pretrained(model_dir, memory_limit=0.125, paging=dict(cpu_cache_size=0.04), **KW)
    eng.set_routing_replay(RoutingReplay(dec, pre))
    eng.set_use_cuda_graph(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    eng.generate([list(range(3, 40))] * 2, max_tokens=40, ignore_eos=True)   # captures and warms
    torch.cuda.synchronize()
    reserved0, allocated0 = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    out = eng.generate([list(range(5, 30))] * 2, max_tokens=1000, ignore_eos=True)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 1000 for o in out)
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() == reserved0
    assert torch.cuda.memory_allocated() <= allocated0
    assert torch.cuda.max_memory_allocated() - base <= eng.memory_plan.budget


def _unit_pair(hidden, inter, g):
    lay = _C.paging.expert_unit_layout(hidden, inter)
    q = [torch.ops.dsfp4.nvfp4_quantize(torch.randn(n, k, generator=g) * 0.05)
         for n, k in ((inter, hidden), (inter, hidden), (hidden, inter))]
    u = torch.empty(lay["bytes"], dtype=torch.uint8)
    _C.paging.expert_unit_from_modelopt(hidden, inter, q[0][0].data_ptr(), q[0][1].data_ptr(), float(q[0][2]),
                                        q[1][0].data_ptr(), q[1][1].data_ptr(), float(q[1][2]), q[2][0].data_ptr(),
                                        q[2][1].data_ptr(), float(q[2][2]), u.data_ptr())
    return lay, u, Fp4Weight.concat_rows([Fp4Weight.from_modelopt(*q[0]), Fp4Weight.from_modelopt(*q[1])])


@pytest.mark.parametrize("graph", [False, True])
def test_units_gemm_computes_each_expert_as_its_copy_lands(graph):
    """Units copied on another stream after the GEMM was launched (a sleep kernel holds the copies
    back), each followed by its table entry and ready word: the GEMM waits for them per expert and
    computes the same as over resident weights; under a CUDA graph too."""
    hidden, inter, n = 512, 256, 6
    g = torch.Generator().manual_seed(4)
    pairs = [_unit_pair(hidden, inter, g) for _ in range(n)]
    lay = pairs[0][0]
    host = torch.stack([p[1] for p in pairs]).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    table = torch.zeros(n, dtype=torch.int64, device="cuda")
    ready = torch.zeros(n, dtype=torch.int32, device="cuda")
    epoch = torch.full((1,), 5, dtype=torch.int32, device="cuda")
    failed = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    addr = torch.tensor([dev[e].data_ptr() for e in range(n)], dtype=torch.int64).pin_memory()
    fives = torch.full((n,), 5, dtype=torch.int32).pin_memory()
    counts = [1, 4, 2, 7, 1, 3]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int32, device="cuda")
    slots = torch.arange(n, dtype=torch.int32, device="cuda")
    x = torch.randn(int(offsets[-1]), hidden, device="cuda").to(torch.bfloat16)
    copy = torch.cuda.Stream()
    # the sleep kernel is loaded before the GEMM spins: under lazy module loading, loading a
    # kernel waits for the running ones, and the copies behind it would never start
    torch.cuda._sleep(1)
    torch.cuda.synchronize()

    def gemm():
        return torch.ops.dsfp4.fp4_grouped_gemm_units(
            x, offsets, slots, table, lay["gate_up_qweight"], lay["gate_up_qscale"], lay["gate_up_scale"],
            2 * inter, hidden, max(counts), 0, ready.data_ptr(), epoch.data_ptr(), failed.data_ptr(), 10 ** 10)

    if graph:
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):   # capture runs nothing: the replay below waits for real
            y = gemm()
        torch.cuda.synchronize()
        gr.replay()
    else:
        y = gemm()
    with torch.cuda.stream(copy):
        torch.cuda._sleep(50_000_000)               # the GEMM is waiting by now
        for e in (3, 0, 5, 1, 4, 2):
            dev[e].copy_(host[e], non_blocking=True)
            table[e:e + 1].copy_(addr[e:e + 1], non_blocking=True)
            ready[e:e + 1].copy_(fives[e:e + 1], non_blocking=True)
    torch.cuda.synchronize()
    assert int(failed) == 0
    for e in range(n):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        w = pairs[e][2].to("cuda").dequantize(torch.float32).double()
        want = x[lo:hi].double() @ w.t()
        err = (y[lo:hi].double() - want).norm() / want.norm()
        assert err < 1e-2, (e, err)


def test_units_gemm_wait_times_out_as_nan_and_flag():
    hidden, inter = 512, 256
    g = torch.Generator().manual_seed(5)
    lay, u, ref = _unit_pair(hidden, inter, g)
    dev = u.to("cuda")
    table = torch.tensor([dev.data_ptr(), dev.data_ptr()], dtype=torch.int64, device="cuda")
    ready = torch.tensor([9, 8], dtype=torch.int32, device="cuda")   # expert 1 never gets epoch 9
    epoch = torch.full((1,), 9, dtype=torch.int32, device="cuda")
    failed = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32, device="cuda")
    x = torch.randn(5, hidden, device="cuda").to(torch.bfloat16)
    y = torch.ops.dsfp4.fp4_grouped_gemm_units(
        x, offsets, torch.arange(2, dtype=torch.int32, device="cuda"), table, lay["gate_up_qweight"],
        lay["gate_up_qscale"], lay["gate_up_scale"], 2 * inter, hidden, 3, 0, ready.data_ptr(), epoch.data_ptr(),
        failed.data_ptr(), 20_000_000)
    torch.cuda.synchronize()
    assert int(failed) == 1
    assert torch.isfinite(y[:2]).all() and torch.isnan(y[2:]).all()


def test_cpu_lane_auto_equals_off_under_replay(model_dir):
    """cpu_experts="auto": decode misses split between the bus and CPU threads, whose rows join
    after the down GEMM inside the captured decode step. Teacher-forced logits equal the engine
    without the lane within 1e-3 at every step, and the lane did compute experts."""
    n_moe = LAYERS - 1
    dec, pre = _trace(n_moe, steps=97, seed=3)
    prompt = list(range(3, 40))
    feed = [(11 * i) % 500 + 3 for i in range(200)]
    got = {}
    for lane in ("off", "auto"):
        eng = Engine.from_pretrained(model_dir, memory_limit=0.125,
                                     paging=dict(cpu_cache_size=0.04, cpu_experts=lane, prefetch_min_accuracy=0.0), **KW)
        eng.set_routing_replay(RoutingReplay(dec, pre))
        eng.set_use_cuda_graph(True)
        got[lane] = _teacher_forced_logits(eng, prompt, feed, 4)
        c = eng.store.counters()
        assert c["experts"]["failed"] == 0
        if lane == "auto":
            assert c["experts"]["cpu_experts"] > 0 and c["cpu_lane"]["threads"] >= 1
        del eng
        torch.cuda.synchronize()
    assert torch.isfinite(got["auto"]).all()
    err = (got["auto"] - got["off"]).abs().amax(dim=(1, 2))
    assert err.max().item() < 1e-3, f"step {int(err.argmax())} differs by {err.max().item()}"


def test_pipeline_across_epoch_and_sequence_wrap(model_dir):
    """The publish kernel's count and the layers' epochs are uint32 words that wrap: the same
    generation, with both set a few publishes short of 2^32, gives the same tokens (the store's
    thread follows the mailbox across the wrap; an epoch skips 0, which ready words hold before
    their first write)."""
    import ctypes
    eng = Engine.from_pretrained(model_dir, memory_limit=0.125, paging=dict(cpu_cache_size=0.04), **KW)
    eng.set_use_cuda_graph(True)
    prompts = [list(range(3, 40))] * 2
    want = [o.token_ids for o in eng.generate(prompts, max_tokens=24, ignore_eos=True)]
    st = eng.store
    nm, off, v = len(st.moe_layers), st.view_epoch_offset, st.view
    count = 2 ** 32 - 40
    torch.cuda.synchronize()
    st.sync[off:off + nm] = -3                                  # epochs 2^32 - 3
    st.sync[off + nm] = count - 2 ** 32                         # publish count
    entry_bytes = (32 + 4 * (v.max_ids + v.max_pred) + 127) // 128 * 128
    for d in range(v.ring):   # the mailbox as those publishes leave it (mapped: one address under UVA)
        s = (count - d) % 2 ** 32
        ctypes.c_uint32.from_address(v.mailbox + ((s - 1) % v.ring) * entry_bytes).value = s
    torch.cuda.synchronize()
    got = [o.token_ids for o in eng.generate(prompts, max_tokens=24, ignore_eos=True)]
    assert got == want
    assert all(0 < int(st.sync[off + i]) < 2 ** 31 for i in range(nm))     # both wrapped
    assert 0 < int(st.sync[off + nm]) < 2 ** 31
    assert st.counters()["experts"]["failed"] == 0
