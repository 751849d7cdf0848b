"""CUDA FP4 GEMM against a float64 reference: every path, odd sizes, poisoned outputs."""

import pytest
import torch

import deepseek_fp4_plugin  # noqa: F401
from deepseek_fp4_plugin import Fp4Weight, _C

M_VALUES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 128, 257, 512, 1000, 4096]
SHAPES = [(40, 48), (1000, 1040), (576, 7168)]


def make_weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return Fp4Weight.from_float(w).to("cuda")


def reference(w: Fp4Weight, x: torch.Tensor) -> torch.Tensor:
    wd = w.to("cpu").dequantize(torch.float32).to("cuda", torch.float64)
    return x.double() @ wd.t()


def run_raw(w: Fp4Weight, x: torch.Tensor, tactic=None, ldx=None):
    """Calls the runner directly into a NaN-poisoned output, so unwritten elements show."""
    m, k = x.shape[0], w.k
    y = torch.full((m, w.n), float("nan"), dtype=torch.bfloat16, device="cuda")
    tac = tactic if tactic is not None else _C.Fp4GemmTactic()
    ws_bytes = _C.fp4_gemm_workspace_bytes(m, w.n, k, tac)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")
    _C.fp4_gemm(w.qweight.data_ptr(), w.qscale.data_ptr(), w.global_scale.data_ptr(), w.global_scale.numel() > 1,
                w.n, k, x.data_ptr(), ldx or x.stride(0), y.data_ptr(), w.n, m, tac, ws.data_ptr(), ws_bytes,
                torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return y


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", M_VALUES)
def test_dense_default_tactic(shape, m, quick):
    n, k = shape
    if quick and (m > 64 or n * k > 1_100_000):
        pytest.skip("quick mode")
    if k >= 4096 and m > 512:
        pytest.skip("covered by the smaller shapes")
    w = make_weight(n, k, seed=n + k)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    y = run_raw(w, x)
    assert not torch.isnan(y).any(), "unwritten outputs"
    assert rel_err(y, reference(w, x)) < 1e-2
    # the op gives the same result as the raw runner
    assert torch.equal(w(x), y)


@pytest.mark.parametrize("m", [1, 5, 16, 40, 100, 300])
def test_every_tactic(m, quick):
    n, k = (1000, 1040) if not quick else (40, 48)
    w = make_weight(n, k, seed=3)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    ref = reference(w, x)
    tactics = _C.fp4_gemm_candidate_tactics(m, n, k)
    assert len(tactics) > 0
    for t in tactics:
        y = run_raw(w, x, tactic=t)
        assert not torch.isnan(y).any(), f"unwritten outputs with {t}"
        assert rel_err(y, ref) < 1e-2, f"{t}"


def test_strided_rows_and_per_tile_scale():
    gate = make_weight(64, 96, 1)
    up = Fp4Weight.from_float(torch.randn(48, 96) * 3).to("cuda")
    fused = Fp4Weight.concat_rows([gate, up])
    assert fused.global_scale.numel() > 1
    big = torch.randn(7, 200, device="cuda").to(torch.bfloat16)
    x = big[:, 8:104]  # row stride 200
    y = fused(x)
    ref = torch.cat([reference(gate, x.contiguous()), reference(up, x.contiguous())], 1)
    assert rel_err(y, ref) < 1e-2
    xm = torch.randn(2048, 96, device="cuda").to(torch.bfloat16)  # the dequantize path too
    assert rel_err(fused(xm), torch.cat([reference(gate, xm), reference(up, xm)], 1)) < 1e-2


@pytest.mark.parametrize("rows_per_group", [[0, 1, 3, 0, 2, 1], [5, 17, 0, 40, 2, 9], [130, 3, 0, 64, 1, 0]])
def test_grouped_gemm(rows_per_group):
    n, k, slots = 272, 320, 6
    ws = [Fp4Weight.from_float(torch.randn(n, k) * (0.02 * (i + 1))) for i in range(slots)]
    qw = torch.stack([w.qweight for w in ws]).cuda()
    qs = torch.stack([w.qscale for w in ws]).cuda()
    gs = torch.stack([w.global_scale for w in ws]).cuda()
    slot_of_group = torch.tensor([5, 0, 2, 1, -1, 3], dtype=torch.int32, device="cuda")
    offs = torch.tensor([0] + list(torch.tensor(rows_per_group).cumsum(0)), dtype=torch.int32, device="cuda")
    total = int(offs[-1])
    x = torch.randn(total, k, device="cuda").to(torch.bfloat16)
    y = torch.ops.dsfp4.fp4_grouped_gemm(x, offs, slot_of_group, qw, qs, gs, n, k, max(rows_per_group))
    for g, slot in enumerate(slot_of_group.tolist()):
        lo, hi = int(offs[g]), int(offs[g + 1])
        if hi == lo:
            continue
        if slot < 0:
            assert torch.all(y[lo:hi] == 0)
            continue
        ref = reference(ws[slot].to("cuda"), x[lo:hi])
        assert rel_err(y[lo:hi], ref) < 1e-2, f"group {g}"
    # the CPU implementation computes the same function
    ycpu = torch.ops.dsfp4.fp4_grouped_gemm(x.cpu(), offs.cpu(), slot_of_group.cpu(), qw.cpu(), qs.cpu(), gs.cpu(),
                                            n, k, max(rows_per_group))
    assert rel_err(y.cpu().cuda(), ycpu.cuda().double()) < 1e-2


def test_cuda_graph_capture_and_replay():
    w = make_weight(1000, 1040, 5)
    static_x = torch.randn(4, 1040, device="cuda").to(torch.bfloat16)
    w(static_x)  # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = w(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn(4, 1040, device="cuda").to(torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, w(static_x))
    # split-K (workspace + counters) under capture
    t = [int(_C.Fp4GemmPath.fused), 8, 1, 4, 4]
    with torch.cuda.graph(g2 := torch.cuda.CUDAGraph()):
        y2 = w(static_x, t)
    static_x.copy_(torch.randn(4, 1040, device="cuda").to(torch.bfloat16))
    g2.replay()
    torch.cuda.synchronize()
    assert rel_err(y2, reference(w, static_x)) < 1e-2


def test_bad_inputs_cuda():
    w = make_weight(32, 64, 0)
    with pytest.raises(ValueError, match="is on"):
        w(torch.randn(2, 64).to(torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        w(torch.randn(2, 3, 64, device="cuda").to(torch.bfloat16).transpose(0, 1))
    x = torch.randn(3, 72, device="cuda").to(torch.bfloat16)[:, 1:65]  # rows not 16-byte aligned
    with pytest.raises(ValueError, match="aligned"):
        w(x)
