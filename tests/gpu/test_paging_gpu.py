"""Paging on the GPU: the same generation resident, host-paged and SSD-paged; graphs; churn;
the grouped GEMM over unit addresses (GPU slots and mapped host memory)."""

import numpy as np
import pytest
import torch

from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.ops import Fp4Weight
from deepseek_fp4_plugin.paged import PagedWeightStore
from deepseek_fp4_plugin.tiny import make_tiny

KW = dict(device="cuda", max_batch_size=2, max_seq_len=256, prefill_chunk=64, verbose=False)
PROMPTS = [list(range(3, 40)), [7, 9, 11, 13, 200, 201, 5]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("paged_tiny")
    # ~140 MB of experts; the 0.1 GiB budget below holds a sixth of them (64 MiB of it are the
    # cuBLAS workspaces of two streams)
    make_tiny(d, seed=1, hidden_size=512, moe_intermediate_size=256, n_routed_experts=128, num_hidden_layers=6,
              n_group=8, topk_group=4, num_experts_per_tok=6)
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    eng = Engine.from_pretrained(model_dir, **KW)
    assert not isinstance(eng.store, PagedWeightStore)
    out = eng.generate(PROMPTS, max_tokens=24, ignore_eos=True)
    return eng, [o.token_ids for o in out], eng.logits(PROMPTS[0])


def _paged(model_dir, **paging):
    eng = Engine.from_pretrained(model_dir, memory_limit=0.1, paging=paging, **KW)
    assert isinstance(eng.store, PagedWeightStore)
    assert eng.memory_plan.expert_slots < eng.memory_plan.total_experts
    return eng


CASES = {
    "host_paged": dict(cpu_cache_size=1.0),                       # every expert fits the host cache
    "ssd_paged": dict(cpu_cache_size=0.04),                       # most experts come from the files
    "ssd_paged_layers": dict(cpu_cache_size=0.04, max_gpu_layers=3),
    "zero_copy": dict(cpu_cache_size=1.0, miss_mode="zero_copy"),
    "auto_lru_no_prefetch": dict(cpu_cache_size=0.04, miss_mode="auto", cache_policy="lru", prefetch_layers=0),
    "sync_copies": dict(cpu_cache_size=0.04, enable_async_copy=False, streams={"prefetch": False}),
    # decode resolved by Python at each MoE layer (host points) instead of the store's thread
    "host_paged_no_pipeline": dict(cpu_cache_size=1.0, decode_pipeline=False),
    "ssd_paged_no_pipeline": dict(cpu_cache_size=0.04, decode_pipeline=False, prefetch_min_accuracy=0.0),
}


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_equals_resident(model_dir, reference, case, graph):
    _, ref_tokens, ref_logits = reference
    eng = _paged(model_dir, **CASES[case])
    eng.set_use_cuda_graph(graph)
    out = eng.generate(PROMPTS, max_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in out] == ref_tokens
    if graph:   # replays of the captured graphs after another prefill (which may have run in waves)
        out = eng.generate(PROMPTS, max_tokens=24, ignore_eos=True)
        assert [o.token_ids for o in out] == ref_tokens
    logits = eng.logits(PROMPTS[0])
    assert torch.isfinite(logits).all()
    assert (logits - ref_logits).abs().max().item() < 1e-3
    c = eng.store.counters()
    assert c["experts"]["requests"] > 0
    if "ssd" in case:
        assert c["experts"]["ssd_reads"] > eng.memory_plan.host_expert_slots   # the host cache churned
    if case == "zero_copy":
        assert c["experts"]["zero_copy"] > 0 and c["experts"]["copies"] == 0
    if "layers" in case:
        assert c["layers"]["copies"] > 0


def test_churn_does_not_grow_gpu_memory(model_dir):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kw = dict(KW, max_seq_len=1100)
    eng = Engine.from_pretrained(model_dir, memory_limit=0.1, paging=dict(cpu_cache_size=0.04), **kw)
    assert isinstance(eng.store, PagedWeightStore)
    eng.set_use_cuda_graph(True)
    # captures a graph per attended-length bucket and warms the caches
    eng.generate(PROMPTS[0], max_tokens=1050, ignore_eos=True)
    torch.cuda.synchronize()
    reserved0, allocated0 = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    before = eng.store.counters()["experts"]
    eng.generate(PROMPTS[1], max_tokens=1000, ignore_eos=True)
    torch.cuda.synchronize()
    after = eng.store.counters()["experts"]
    assert after["evictions"] - before["evictions"] > 1000                  # real churn
    assert after["ssd_reads"] - before["ssd_reads"] > 1000
    assert torch.cuda.memory_reserved() == reserved0                     # nothing allocated per token
    assert torch.cuda.memory_allocated() <= allocated0
    assert torch.cuda.max_memory_allocated() - base <= eng.memory_plan.budget   # the plan holds


def test_read_error_mid_generation(model_dir, reference):
    _, ref_tokens, _ = reference
    eng = _paged(model_dir, cpu_cache_size=0.04, prefetch_layers=0)
    eng.set_use_cuda_graph(True)
    files = eng.store.files
    for i in range(files.num_files):
        files.inject_fault(i, 0)
    with pytest.raises(RuntimeError, match=r"safetensors.*(reading tensor|injected)"):
        eng.generate(PROMPTS[0], max_tokens=24, ignore_eos=True)
    for i in range(files.num_files):
        files.inject_fault(i, -1)
    out = eng.generate(PROMPTS, max_tokens=24, ignore_eos=True)            # usable, cache consistent
    assert [o.token_ids for o in out] == ref_tokens


def _units(n_units, hidden, inter, seed):
    """Random experts as units (host) and as Fp4Weight pairs (the reference)."""
    g = torch.Generator().manual_seed(seed)
    lay = _C.paging.expert_unit_layout(hidden, inter)
    units, ref = [], []
    for _ in range(n_units):
        parts = []
        for n, k in ((inter, hidden), (inter, hidden), (hidden, inter)):
            w = torch.randn(n, k, generator=g) * 0.05
            parts.append(torch.ops.dsfp4.nvfp4_quantize(w))
        u = torch.empty(lay["bytes"], dtype=torch.uint8)
        (gw, gs, g2), (uw, us, u2), (dw, ds, d2) = parts
        _C.paging.expert_unit_from_modelopt(hidden, inter, gw.data_ptr(), gs.data_ptr(), float(g2), uw.data_ptr(),
                                            us.data_ptr(), float(u2), dw.data_ptr(), ds.data_ptr(), float(d2),
                                            u.data_ptr())
        gu = Fp4Weight.concat_rows([Fp4Weight.from_modelopt(gw, gs, g2), Fp4Weight.from_modelopt(uw, us, u2)])
        units.append(u)
        ref.append((gu, Fp4Weight.from_modelopt(dw, ds, d2)))
    return lay, units, ref


@pytest.mark.parametrize("rows_per_group", [1, 3, 17, 70])
def test_grouped_gemm_units_gpu_and_host_memory(rows_per_group):
    hidden, inter, E = 256, 128, 6
    lay, units, ref = _units(E, hidden, inter, seed=rows_per_group)
    dev = torch.empty(E * lay["bytes"], dtype=torch.uint8, device="cuda")
    pinned = torch.empty(E * lay["bytes"], dtype=torch.uint8, pin_memory=True)   # mapped (UVA)
    table = []
    for e, u in enumerate(units):
        if e % 2 == 0:   # even experts in GPU slots, odd ones read in place from host memory
            dev[e * lay["bytes"]:(e + 1) * lay["bytes"]].copy_(u)
            table.append(dev.data_ptr() + e * lay["bytes"])
        else:
            pinned[e * lay["bytes"]:(e + 1) * lay["bytes"]].copy_(u)
            table.append(pinned.data_ptr() + e * lay["bytes"])
    table[E - 1] = 0   # no weights: NaN rows, never a silently wrong row
    table = torch.tensor(table, dtype=torch.int64, device="cuda")
    counts = [rows_per_group + (e % 3) for e in range(E)]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int32, device="cuda")
    slots = torch.arange(E, dtype=torch.int32, device="cuda")
    x = torch.randn(int(offsets[-1]), hidden, device="cuda").to(torch.bfloat16)
    y = torch.ops.dsfp4.fp4_grouped_gemm_units(x, offsets, slots, table, lay["gate_up_qweight"],
                                               lay["gate_up_qscale"], lay["gate_up_scale"], 2 * inter, hidden,
                                               max(counts))
    torch.cuda.synchronize()
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if e == E - 1:
            assert torch.isnan(y[lo:hi]).all()
            continue
        w = ref[e][0].to("cuda").dequantize(torch.float32).double()
        want = x[lo:hi].double() @ w.t()
        err = (y[lo:hi].double() - want).norm() / want.norm()
        assert err < 1e-2, (e, err)
