"""TensorRT plugins on the GPU: each created through its creator from fields (and recreated
from its serialized fields, as an engine would), enqueued on real device buffers, equals the
torch ops. Driven through the test driver (tests/trt), skipped when the plugins were not built."""

import numpy as np
import pytest
import torch

import deepseek_fp4_plugin  # noqa: F401
import trt_driver as td
from deepseek_fp4_plugin._ext import _C
from plugin_fixtures import Experts, expert_store, gemm_fields, gemm_weight, routing_fields
from trt_driver import BF16, FLOAT, INT8, INT32

drv = td.driver()
pytestmark = pytest.mark.skipif(drv is None, reason="TensorRT plugins not built (no TensorRT headers)")


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def workspace(plugin, max_shapes, nout) -> torch.Tensor:
    n = plugin.workspace(max_shapes, nout)
    return torch.empty(max(n, 256), dtype=torch.uint8, device="cuda")  # the caching allocator aligns to 512


def run(plugin, inputs, in_types, outputs, out_types, ws) -> None:
    drv.clear_log()
    rc = plugin.enqueue(inputs, in_types, outputs, out_types, ws.data_ptr(), stream())
    assert rc == 0, drv.log()
    torch.cuda.synchronize()


# ---- Dsfp4Fp4Gemm ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_tile", [False, True])
@pytest.mark.parametrize("m", [1, 5, 16, 100, 700])
def test_fp4_gemm_equals_torch_op(m, per_tile):
    n, k = 272, 320
    w = gemm_weight(n, k, seed=m, per_tile=per_tile)
    wc = w.to("cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    want = wc(x)  # torch.ops.dsfp4.fp4_gemm
    created = drv.create("Dsfp4Fp4Gemm", gemm_fields(w))
    assert created is not None, drv.log()
    for p in (created, created.roundtrip()):
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        run(p, [x], [BF16], [y], [BF16], workspace(p, [(m, k)], 1))
        assert torch.equal(y, want)
    # weights as inputs, and x with two leading dimensions
    p = drv.create("Dsfp4Fp4Gemm", gemm_fields(w, weights_as_inputs=True))
    x3 = x.reshape(1, m, k)
    y3 = torch.full((1, m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    gs = wc.global_scale.reshape(-1)
    run(p, [x3, wc.qweight, wc.qscale, gs], [BF16, INT32, INT8, FLOAT], [y3], [BF16], workspace(p, [(1, m, k)], 1))
    assert torch.equal(y3.reshape(m, n), want)


def test_fp4_gemm_explicit_tactic_split_k():
    n, k, m = 1000, 1040, 4
    w = gemm_weight(n, k, seed=9)
    f = gemm_fields(w)
    f["tactic"] = td.i32([1, 8, 1, 4, 4])  # fused, 8 tokens, split-K 4: needs workspace
    p = drv.create("Dsfp4Fp4Gemm", f)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    ws = workspace(p, [(m, k)], 1)
    assert ws.numel() > 256
    run(p, [x], [BF16], [y], [BF16], ws)
    assert torch.equal(y, torch.ops.dsfp4.fp4_gemm(x, *[t.cuda() for t in (w.qweight, w.qscale, w.global_scale)],
                                                   n, k, [1, 8, 1, 4, 4]))


# ---- Dsfp4MoeRouting ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e,g,tg,k,norm", [(256, 8, 4, 8, 1), (64, 8, 3, 6, 0), (16, 4, 2, 4, 1)])
def test_routing_equals_torch_op(e, g, tg, k, norm, dtype):
    t = 37
    scores = (torch.randn(t, e, device="cuda") * 2).to(dtype)
    bias = torch.randn(e, device="cuda") * 0.05
    created = drv.create("Dsfp4MoeRouting", routing_fields(e, g, tg, k, 2.5, norm))
    assert created is not None, drv.log()
    ww, wids = torch.ops.dsfp4.moe_route(scores, bias, k, g, tg, 2.5, bool(norm))
    for p in (created, created.roundtrip()):
        w = torch.full((t, k), float("nan"), device="cuda")
        ids = torch.full((t, k), -7, dtype=torch.int32, device="cuda")
        run(p, [scores, bias], [BF16 if dtype == torch.bfloat16 else FLOAT, FLOAT], [w, ids], [FLOAT, INT32],
            workspace(p, [(t, e), (e,)], 2))
        assert torch.equal(ids, wids) and torch.equal(w, ww)


# ---- Dsfp4MoeExperts ------------------------------------------------------------------------

CASES = [(8, 128, 64, 2, 1), (8, 128, 64, 2, 9), (20, 64, 32, 4, 40)]  # E, H, I, top_k, tokens


def routed(e, h, k, t, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, device="cuda", generator=g).to(torch.bfloat16)
    logits = torch.randn(t, e, device="cuda", generator=g)
    w, ids = torch.ops.dsfp4.moe_route(logits, torch.zeros(e, device="cuda"), k, 1, 1, 2.5, True)
    if t > 1:
        ids[1, 0] = -1  # a dropped pair contributes nothing
    return x, w, ids


@pytest.mark.parametrize("e,h,i,k,t", CASES)
def test_experts_equal_torch_ops(e, h, i, k, t):
    ex = Experts(e, h, i, seed=e + t)
    fields = ex.fields(k)
    ex.to("cuda")
    x, w, ids = routed(e, h, k, t, seed=t)
    want = ex.reference(x, w, ids)
    io_types = [BF16, FLOAT, INT32]
    created = drv.create("Dsfp4MoeExperts", fields)
    assert created is not None, drv.log()
    for p in (created, created.roundtrip()):
        out = torch.full((t, h), float("nan"), dtype=torch.bfloat16, device="cuda")
        run(p, [x, w, ids], io_types, [out], [BF16], workspace(p, [(t, h), (t, k), (t, k)], 1))
        assert torch.equal(out, want)
    p = drv.create("Dsfp4MoeExperts", ex.base_fields(k, "inputs"))
    out = torch.full((t, h), float("nan"), dtype=torch.bfloat16, device="cuda")
    run(p, [x, w, ids] + ex.tensors(), io_types + [INT32, INT8, FLOAT] * 2, [out], [BF16],
        workspace(p, [(t, h), (t, k), (t, k)], 1))
    assert torch.equal(out, want)
    # and the CPU reference agrees within bf16 rounding
    ref = Experts(e, h, i, seed=e + t).reference(x.cpu(), w.cpu(), ids.cpu())
    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=2e-2, atol=2e-2)


def make_units(ex: Experts):
    """One device unit per expert (as a store would hold it) and the table of their addresses."""
    parts = [t.contiguous().view(ex.e, -1).view(torch.uint8) for t in ex.tensors()]
    sizes = [p.shape[1] for p in parts]
    offsets, off = [], 0
    for s in sizes:
        offsets.append(off)
        off += -(-s // 256) * 256
    unit = -(-off // 256) * 256
    units = torch.zeros(ex.e, unit, dtype=torch.uint8, device="cuda")
    for p, o in zip(parts, offsets):
        units[:, o:o + p.shape[1]] = p
    table = units.data_ptr() + unit * torch.arange(ex.e, dtype=torch.int64, device="cuda")
    return units, table, offsets


@pytest.mark.parametrize("e,h,i,k,t", CASES)
def test_experts_from_store_handle(e, h, i, k, t):
    ex = Experts(e, h, i, seed=3 * e + t).to("cuda")
    x, w, ids = routed(e, h, k, t, seed=t + 1)
    want = ex.reference(x, w, ids)
    units, table, offsets = make_units(ex)
    src = drv.lib.drv_source_new(table.data_ptr(), e, h, i, (td.ctypes.c_int64 * 6)(*offsets), 1, 0)
    handle, layer = 4242 + t, 3
    assert drv.lib.drv_set_source(handle, src) == 0
    try:
        created = drv.create("Dsfp4MoeExperts", ex.store_fields(k, handle, layer))
        assert created is not None, drv.log()
        for p in (created, created.roundtrip()):
            out = torch.full((t, h), float("nan"), dtype=torch.bfloat16, device="cuda")
            run(p, [x, w, ids], [BF16, FLOAT, INT32], [out], [BF16], workspace(p, [(t, h), (t, k), (t, k)], 1))
            assert torch.equal(out, want)
        acq, rel, lay, cnt = (td.ctypes.c_int(), td.ctypes.c_int(), td.ctypes.c_int(), td.ctypes.c_int64())
        drv.lib.drv_source_stats(src, acq, rel, lay, cnt)
        assert (acq.value, rel.value, lay.value, cnt.value) == (2, 2, layer, t * k)
        # a source that cannot serve the step makes enqueue fail, not crash
        drv.lib.drv_source_fail(src, 1)
        out = torch.empty(t, h, dtype=torch.bfloat16, device="cuda")
        ws = workspace(created, [(t, h), (t, k), (t, k)], 1)
        drv.clear_log()
        assert created.enqueue([x, w, ids], [BF16, FLOAT, INT32], [out], [BF16], ws.data_ptr(), stream()) != 0
        assert "refused" in drv.log()
    finally:
        drv.lib.drv_set_source(handle, None)
        drv.lib.drv_source_free(src)
    # the handle is gone: an error naming it
    drv.clear_log()
    assert created.enqueue([x, w, ids], [BF16, FLOAT, INT32], [out], [BF16], ws.data_ptr(), stream()) != 0
    assert f"store_handle = {handle}" in drv.log()
    del units


def routed_to(subset, h, k, t, seed):
    """t tokens over the experts of `subset` in turn (k distinct per token), one pair dropped (-1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    n = len(subset)
    ids = torch.tensor([[subset[(j * k + m) % n] for m in range(k)] for j in range(t)], dtype=torch.int32)
    w = torch.rand(t, k, generator=g) + 0.1
    if t > 1:
        ids[1, 0] = -1
    return x.cuda(), w.cuda(), ids.cuda()


@pytest.mark.parametrize("miss_mode", ["copy", "auto"])
def test_experts_from_paging_store(tmp_path, miss_mode):
    """Store mode over the real paging store: experts read from a safetensors checkpoint into 4
    GPU slots of 16 experts (auto: the others read in place from pinned host memory), several
    steps with moving routings, each equal to the torch ops over resident experts."""
    e, h, i, k, slots = 16, 128, 64, 2, 4
    ex = Experts(e, h, i, seed=21)
    stored = ex.write_checkpoint(tmp_path / "experts.safetensors")
    ex.to("cuda")
    lay = _C.paging.expert_unit_layout(h, i)
    gpu = torch.empty(slots * lay["bytes"], dtype=torch.uint8, device="cuda")
    tables = torch.zeros(1, e, dtype=torch.int64, device="cuda")
    store = expert_store(tmp_path / "experts.safetensors", stored, ex, gpu.data_ptr(), slots, 10, miss_mode,
                         on_device=True)
    store.set_device_tables(tables.data_ptr())
    source = _C.paging.ExpertStoreSource(store)
    handle = 5150 + len(miss_mode)
    assert drv.lib.drv_set_source(handle, source.address) == 0
    try:
        p = drv.create("Dsfp4MoeExperts", ex.store_fields(k, handle, 0))
        assert p is not None, drv.log()
        ws = workspace(p, [(9, h), (9, k), (9, k)], 1)
        for step, t in enumerate([1, 6, 3, 9, 2, 7]):
            n = slots if miss_mode == "copy" else 8   # copy: every expert of a step needs a slot
            x, w, ids = routed_to([(5 * step + j) % e for j in range(n)], h, k, t, seed=step)
            store.begin_step()
            out = torch.full((t, h), float("nan"), dtype=torch.bfloat16, device="cuda")
            run(p, [x, w, ids], [BF16, FLOAT, INT32], [out], [BF16], ws)
            assert torch.equal(out, ex.reference(x, w, ids)), step
        assert source.acquired == 6
        c = store.counters()
        assert c["evictions"] > 0 and c["ssd_reads"] > 10     # slots and host cache both reused
        if miss_mode == "auto":
            assert c["zero_copy"] > 0
        else:  # more experts than slots: enqueue fails with the store's reason, and the store goes on
            x, w, ids = routed_to(list(range(slots + 2)), h, k, slots + 2, seed=9)
            store.begin_step()
            out = torch.empty(slots + 2, h, dtype=torch.bfloat16, device="cuda")
            drv.clear_log()
            assert p.enqueue([x, w, ids], [BF16, FLOAT, INT32], [out], [BF16], ws.data_ptr(), stream()) != 0
            assert "GPU cache too small" in drv.log()
            x, w, ids = routed_to([3, 7], h, k, 2, seed=10)
            store.begin_step()
            out = torch.full((2, h), float("nan"), dtype=torch.bfloat16, device="cuda")
            run(p, [x, w, ids], [BF16, FLOAT, INT32], [out], [BF16], ws)
            assert torch.equal(out, ex.reference(x, w, ids))
    finally:
        drv.lib.drv_set_source(handle, None)
    del source, store


def test_experts_enqueue_under_cuda_graph_capture():
    e, h, i, k, t = 8, 128, 64, 2, 4
    ex = Experts(e, h, i, seed=1)
    p = drv.create("Dsfp4MoeExperts", ex.fields(k))
    ex.to("cuda")
    x, w, ids = routed(e, h, k, t, seed=2)
    out = torch.empty(t, h, dtype=torch.bfloat16, device="cuda")
    ws = workspace(p, [(t, h), (t, k), (t, k)], 1)
    run(p, [x, w, ids], [BF16, FLOAT, INT32], [out], [BF16], ws)  # weights uploaded outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rc = p.enqueue([x, w, ids], [BF16, FLOAT, INT32], [out], [BF16], ws.data_ptr(), stream(), shape_change=False)
    assert rc == 0, drv.log()
    x.copy_(torch.randn(t, h, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ex.reference(x, w, ids))


def test_enqueue_with_null_device_pointers_fails_cleanly():
    p = drv.create("Dsfp4Fp4Gemm", gemm_fields(gemm_weight(48, 64)))
    x = torch.randn(2, 64, device="cuda").to(torch.bfloat16)
    y = torch.empty(2, 48, dtype=torch.bfloat16, device="cuda")
    ws = workspace(p, [(2, 64)], 1)
    run(p, [x], [BF16], [y], [BF16], ws)
    drv.clear_log()
    assert p.enqueue([((2, 64), 0)], [BF16], [y], [BF16], ws.data_ptr(), stream()) != 0
    assert "null" in drv.log()
    torch.cuda.synchronize()  # the context is still healthy
    assert np.isfinite(y.float().cpu().numpy()).all()
