"""CUDA MoE kernels against their CPU references."""

import pytest
import torch

import deepseek_fp4_plugin  # noqa: F401


@pytest.mark.parametrize("tokens", [1, 7, 300, 4096])
@pytest.mark.parametrize("e,g,tg,k", [(256, 8, 4, 8), (64, 8, 3, 6), (16, 4, 2, 4), (1024, 32, 8, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_cuda_equals_cpu(tokens, e, g, tg, k, dtype):
    logits = (torch.randn(tokens, e) * 2).to(dtype)
    bias = torch.randn(e) * 0.05
    w, ids = torch.ops.dsfp4.moe_route(logits.cuda(), bias.cuda(), k, g, tg, 2.5, True)
    rw, rids = torch.ops.dsfp4.moe_route(logits, bias, k, g, tg, 2.5, True)  # the C++ CPU reference
    ids, w = ids.cpu(), w.cpu()
    # CUDA and CPU sigmoids may differ in the last bit, which can swap experts whose biased
    # scores tie to within that bit; anything else is a bug.
    diff = (ids != rids).any(1)
    assert diff.float().mean().item() <= 2e-3
    c = torch.sigmoid(logits.double()) + bias.double()
    for t in diff.nonzero().flatten().tolist():
        mine = c[t, ids[t].long()].sort().values
        ref = c[t, rids[t].long()].sort().values
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(w[~diff], rw[~diff], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,k,e,h", [(1, 8, 256, 7168), (13, 3, 6, 64), (512, 8, 256, 256)])
def test_permute_combine_cuda_equal_cpu(t, k, e, h):
    x = torch.randn(t, h).to(torch.bfloat16)
    ids = torch.randint(0, e, (t, k), dtype=torch.int32)
    ids[0, 0] = -1
    xp, offs, perm = torch.ops.dsfp4.moe_permute(x.cuda(), ids.cuda(), e)
    rxp, roffs, rperm = torch.ops.dsfp4.moe_permute(x, ids, e)
    valid = int(roffs[-1])
    assert torch.equal(offs.cpu(), roffs)
    assert torch.equal(perm.cpu()[:valid], rperm[:valid])
    assert torch.equal(xp.cpu()[:valid], rxp[:valid])
    w = torch.rand(t, k)
    yp = torch.randn(t * k, h).to(torch.bfloat16)
    out = torch.ops.dsfp4.moe_combine(yp.cuda(), perm, w.cuda(), offs)
    ref = torch.ops.dsfp4.moe_combine(yp, rperm, w, roffs)
    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_silu_mul_cuda():
    gu = torch.randn(33, 2 * 2048).to(torch.bfloat16)
    torch.testing.assert_close(torch.ops.dsfp4.silu_mul(gu.cuda()).cpu().float(),
                               torch.ops.dsfp4.silu_mul(gu).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("t,k,e", [(1, 8, 256), (64, 8, 256), (5, 3, 7)])
def test_compact_groups_cuda_equals_cpu(t, k, e):
    ids = torch.randint(0, e, (t, k), dtype=torch.int32)
    _, offs, _ = torch.ops.dsfp4.moe_permute(torch.randn(t, 8), ids, e)
    g = min(e, t * k)
    a = torch.ops.dsfp4.moe_compact_groups(offs.cuda(), g)
    b = torch.ops.dsfp4.moe_compact_groups(offs, g)
    assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])


def _combine_inputs(t=9, k=4, e=16, h=256):
    ids = torch.randint(0, e, (t, k), dtype=torch.int32)
    _, offs, perm = torch.ops.dsfp4.moe_permute(torch.randn(t, 16), ids, e)
    yp = torch.randn(t * k, h).to(torch.bfloat16)
    return yp, perm, torch.rand(t, k), offs


def _bad_perm(kind, perm, offs):
    perm, offs = perm.clone(), offs.clone()
    if kind == "out_of_range":
        perm[1] = 1 << 30
    elif kind == "negative":
        perm[0] = -5
    elif kind == "duplicate":
        perm[2] = perm[3]
    elif kind == "row_count":
        offs[-1] = perm.numel() + 100
    return perm, offs


@pytest.mark.parametrize("kind", ["out_of_range", "negative", "duplicate", "row_count"])
def test_combine_invalid_perm_cuda_is_nan_not_a_crash(kind):
    """An invalid permutation on CUDA is never followed out of bounds (run under compute-sanitizer);
    it turns the whole output into NaN, and the next valid call is unaffected."""
    yp, perm, w, offs = _combine_inputs()
    bad_perm, bad_offs = _bad_perm(kind, perm, offs)
    with pytest.raises(ValueError, match="moe_combine"):
        torch.ops.dsfp4.moe_combine(yp, bad_perm, w, bad_offs)          # the CPU refuses it
    out = torch.ops.dsfp4.moe_combine(yp.cuda(), bad_perm.cuda(), w.cuda(), bad_offs.cuda())
    torch.cuda.synchronize()
    assert torch.isnan(out.float()).all()
    good = torch.ops.dsfp4.moe_combine(yp.cuda(), perm.cuda(), w.cuda(), offs.cuda())
    ref = torch.ops.dsfp4.moe_combine(yp, perm, w, offs)
    torch.testing.assert_close(good.cpu().float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_combine_invalid_perm_under_cuda_graph():
    """The check lives on the device: a graph replayed with a bad permutation in its static
    buffer gives NaN, and with a good one again the right values (the flag is reset each replay)."""
    yp, perm, w, offs = (x.cuda() for x in _combine_inputs())
    ref = torch.ops.dsfp4.moe_combine(yp, perm, w, offs).clone()
    s_perm, s_offs = perm.clone(), offs.clone()
    torch.ops.dsfp4.moe_combine(yp, s_perm, w, s_offs)   # warm-up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.dsfp4.moe_combine(yp, s_perm, w, s_offs)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    bad_perm, _ = _bad_perm("out_of_range", perm, offs)
    s_perm.copy_(bad_perm)
    g.replay()
    torch.cuda.synchronize()
    assert torch.isnan(out.float()).all()
    s_perm.copy_(perm)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
