"""MoE ops on the CPU (the C++ references): routing, permutation, combine, SiLU·mul against plain loops."""

import math

import pytest
import torch
import torch.nn.functional as F

import deepseek_fp4_plugin  # noqa: F401

ROUTE_CASES = [  # experts, n_group, topk_group, top_k
    (16, 4, 2, 4),
    (64, 8, 4, 8),
    (256, 8, 4, 8),
    (20, 5, 3, 6),
    (8, 1, 1, 2),
]


def route_loop(logits, bias, top_k, n_group, topk_group, scale, norm):
    """Token-by-token Python version of the documented noaux_tc rule."""
    t_count, e = logits.shape
    gsz = e // n_group
    weights, ids = [], []
    for t in range(t_count):
        s = [1.0 / (1.0 + math.exp(-float(v))) for v in logits[t]]
        c = [s[i] + float(bias[i]) for i in range(e)]
        gscore = []
        for g in range(n_group):
            vals = sorted(c[g * gsz:(g + 1) * gsz], reverse=True)
            gscore.append(vals[0] + vals[1])
        groups = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
        cand = [i for i in range(e) if i // gsz in groups]
        chosen = sorted(cand, key=lambda i: (-c[i], i))[:top_k]
        w = [s[i] for i in chosen]
        if norm:
            tot = sum(w) + 1e-20
            w = [v / tot for v in w]
        weights.append([v * scale for v in w])
        ids.append(chosen)
    return torch.tensor(weights), torch.tensor(ids, dtype=torch.int32)


@pytest.mark.parametrize("e,g,tg,k", ROUTE_CASES)
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_loop_and_cpp(e, g, tg, k, norm):
    gen = torch.Generator().manual_seed(e * 7 + k)
    logits = torch.randn(19, e, generator=gen) * 2
    bias = torch.randn(e, generator=gen) * 0.05
    w, ids = torch.ops.dsfp4.moe_route(logits, bias, k, g, tg, 2.5, norm)
    lw, lids = route_loop(logits, bias, k, g, tg, 2.5, norm)
    assert torch.equal(ids, lids)
    torch.testing.assert_close(w, lw.float(), rtol=1e-6, atol=1e-7)
    # bfloat16 logits are read as they are (widened exactly)
    lb = logits.to(torch.bfloat16)
    bw, bids = torch.ops.dsfp4.moe_route(lb, bias, k, g, tg, 2.5, norm)
    lw, lids = route_loop(lb.float(), bias, k, g, tg, 2.5, norm)
    assert torch.equal(bids, lids)
    torch.testing.assert_close(bw, lw.float(), rtol=1e-6, atol=1e-7)


def test_route_bias_steers_choice_not_weights():
    logits = torch.zeros(1, 8)
    bias = torch.zeros(8)
    bias[5] = 1.0
    w, ids = torch.ops.dsfp4.moe_route(logits, bias, 1, 1, 1, 1.0, False)
    assert ids.item() == 5
    assert w.item() == pytest.approx(0.5)  # sigmoid(0), the bias is not in the weight


def test_route_only_kept_groups():
    # group 1 holds the single best expert but loses on its top-2 sum
    logits = torch.full((1, 8), -4.0)
    logits[0, 4] = 5.0                 # group 1 = experts 4..7
    logits[0, 0] = logits[0, 1] = 3.0  # group 0 = experts 0..3
    _, ids = torch.ops.dsfp4.moe_route(logits, torch.zeros(8), 2, 2, 1, 1.0, True)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_route_bad_inputs():
    with pytest.raises(ValueError, match="n_group"):
        torch.ops.dsfp4.moe_route(torch.randn(2, 10), torch.zeros(10), 2, 3, 1, 1.0, True)
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.dsfp4.moe_route(torch.randn(2, 8), torch.zeros(8), 9, 2, 1, 1.0, True)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        torch.ops.dsfp4.moe_route(torch.randn(2, 8), torch.zeros(7), 2, 2, 1, 1.0, True)
    with pytest.raises(ValueError, match="router_logits"):
        torch.ops.dsfp4.moe_route(torch.randn(2, 8).half(), torch.zeros(8), 2, 2, 1, 1.0, True)


def test_permute_combine_against_loops():
    gen = torch.Generator().manual_seed(11)
    t, k, e, h = 13, 3, 6, 32
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, e, (t, k), generator=gen, dtype=torch.int32)
    ids[2, 1] = -1  # dropped pair
    xp, offsets, perm = torch.ops.dsfp4.moe_permute(x, ids, e)
    assert offsets[-1].item() == t * k - 1
    # rows of each expert are its pairs in pair order
    for ex in range(e):
        rows = perm[offsets[ex]:offsets[ex + 1]].tolist()
        want = [p for p in range(t * k) if ids.view(-1)[p].item() == ex]
        assert rows == want
        for r in range(offsets[ex].item(), offsets[ex + 1].item()):
            assert torch.equal(xp[r], x[perm[r] // k])
    w = torch.rand(t, k, generator=gen)
    y_perm = torch.randn(t * k, h, generator=gen).to(torch.bfloat16)
    out = torch.ops.dsfp4.moe_combine(y_perm, perm, w, offsets)
    ref = torch.zeros(t, h)
    for r in range(offsets[-1].item()):
        p = perm[r].item()
        ref[p // k] += w[p // k, p % k] * y_perm[r].float()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    assert out.dtype == torch.bfloat16


def _combine_args(t=5, k=2, e=4, h=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, e, (t, k), generator=gen, dtype=torch.int32)
    _, offsets, perm = torch.ops.dsfp4.moe_permute(torch.randn(t, h), ids, e)
    return torch.randn(t * k, h, generator=gen), perm, torch.rand(t, k, generator=gen), offsets


@pytest.mark.parametrize("edit,msg", [
    (lambda p, o: p.__setitem__(3, 10), r"perm\[3\] = 10 is outside \[0, T·k = 10\)"),
    (lambda p, o: p.__setitem__(0, -1), r"perm\[0\] = -1 is outside"),
    (lambda p, o: p.__setitem__(4, int(p[5])), r"perm names pair \d+ twice \(rows 4 and 5\)"),
    (lambda p, o: o.__setitem__(-1, 11), r"row_offsets\[experts\] = 11 is outside \[0, T·k = 10\]"),
    (lambda p, o: o.__setitem__(-1, -2), r"row_offsets\[experts\] = -2 is outside"),
])
def test_combine_rejects_an_invalid_permutation(edit, msg):
    """Before, an out-of-range entry was an IndexError (CPU) or an out-of-bounds access (CUDA)."""
    y, perm, w, offsets = _combine_args()
    perm, offsets = perm.clone(), offsets.clone()
    edit(perm, offsets)
    with pytest.raises(ValueError, match=rf"moe_combine: {msg}"):
        torch.ops.dsfp4.moe_combine(y, perm, w, offsets)


def test_combine_needs_row_offsets():
    y, perm, w, _ = _combine_args()
    with pytest.raises(ValueError, match=r"row_offsets needs at least 2 entries"):
        torch.ops.dsfp4.moe_combine(y, perm, w, torch.tensor([10], dtype=torch.int32))


def test_silu_mul():
    gu = torch.randn(7, 2 * 48).to(torch.bfloat16)
    out = torch.ops.dsfp4.silu_mul(gu)
    ref = F.silu(gu[:, :48].float()) * gu[:, 48:].float()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="odd"):
        torch.ops.dsfp4.silu_mul(torch.randn(2, 5))


def test_opcheck():
    logits = torch.randn(5, 16)
    torch.library.opcheck(torch.ops.dsfp4.moe_route.default, (logits, torch.zeros(16), 4, 4, 2, 2.5, True))
    x = torch.randn(5, 16)
    ids = torch.randint(0, 4, (5, 2), dtype=torch.int32)
    torch.library.opcheck(torch.ops.dsfp4.moe_permute.default, (x, ids, 4))
    _, offs, perm = torch.ops.dsfp4.moe_permute(x, ids, 4)
    torch.library.opcheck(torch.ops.dsfp4.moe_combine.default, (torch.randn(10, 16), perm, torch.rand(5, 2), offs))
    torch.library.opcheck(torch.ops.dsfp4.silu_mul.default, (torch.randn(3, 8),))


def test_compact_groups_feeds_the_grouped_gemm():
    from deepseek_fp4_plugin import Fp4Weight

    gen = torch.Generator().manual_seed(5)
    t, k, e, h, n = 3, 2, 8, 32, 48
    ids = torch.tensor([[6, 1], [1, 3], [6, 6]], dtype=torch.int32)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    xp, offs, perm = torch.ops.dsfp4.moe_permute(x, ids, e)
    ge, go = torch.ops.dsfp4.moe_compact_groups(offs, min(e, t * k))
    assert ge.tolist() == [1, 3, 6, -1, -1, -1]
    assert go.tolist() == [0, 2, 3, 6, 6, 6, 6]
    experts = [Fp4Weight.from_float(torch.randn(n, h, generator=gen)) for _ in range(e)]
    qw = torch.stack([w.qweight for w in experts])
    qs = torch.stack([w.qscale for w in experts])
    gs = torch.stack([w.global_scale for w in experts])
    y_all = torch.ops.dsfp4.fp4_grouped_gemm(xp, offs, torch.arange(e, dtype=torch.int32), qw, qs, gs, n, h, t * k)
    y_cmp = torch.ops.dsfp4.fp4_grouped_gemm(xp, go, ge, qw, qs, gs, n, h, t * k)
    assert torch.equal(y_all, y_cmp)


def test_permute_cpu_fills_dropped_rows_last():
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # rows of 12 bytes: no alignment needed on CPU
    ids = torch.tensor([[1, -1], [0, 5], [1, 0], [2, 1]], dtype=torch.int32)
    xp, offs, perm = torch.ops.dsfp4.moe_permute(x, ids, 3)
    assert offs.tolist() == [0, 2, 5, 6]
    assert perm.tolist() == [2, 5, 0, 4, 7, 6, 1, 3]  # experts 0, 1, 2, then the dropped pairs
    assert torch.equal(xp, x[perm.long() // 2])


# ---- noaux_tc: TensorRT-LLM's noaux_tc_op signature and semantics -----------------------


@pytest.mark.parametrize("e,g,tg,k", ROUTE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_noaux_tc_against_loop(e, g, tg, k, dtype):
    gen = torch.Generator().manual_seed(e + k)
    scores = (torch.randn(11, e, generator=gen) * 2).to(dtype)   # raw router logits
    bias = (torch.randn(e, generator=gen) * 0.05).to(dtype)
    w, ids = torch.ops.dsfp4.noaux_tc(scores, bias, g, tg, k, 2.5)
    assert w.dtype == dtype and ids.dtype == torch.int32 and w.shape == (11, k) == ids.shape
    lw, lids = route_loop(scores.float(), bias.float(), k, g, tg, 2.5, True)  # sigmoid inside, normalized
    assert torch.equal(ids, lids)
    torch.testing.assert_close(w, lw.to(dtype), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-7)
    # weights sum to the scaling factor: normalized before scaling
    torch.testing.assert_close(w.float().sum(1), torch.full((11,), 2.5), rtol=1e-2, atol=1e-2)


def test_noaux_tc_equals_moe_route_normalized():
    scores = torch.randn(7, 64)
    bias = torch.randn(64) * 0.1
    w, ids = torch.ops.dsfp4.noaux_tc(scores, bias, 8, 4, 8, 1.5)
    rw, rids = torch.ops.dsfp4.moe_route(scores, bias, 8, 8, 4, 1.5, True)
    assert torch.equal(ids, rids) and torch.equal(w, rw)


def test_noaux_tc_bad_inputs_name_the_argument():
    s, b = torch.randn(2, 16), torch.zeros(16)
    with pytest.raises(ValueError, match="scores"):
        torch.ops.dsfp4.noaux_tc(s.to(torch.int32), b, 4, 2, 4, 1.0)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.dsfp4.noaux_tc(s, torch.zeros(15), 4, 2, 4, 1.0)
    with pytest.raises(ValueError, match="n_group"):
        torch.ops.dsfp4.noaux_tc(s, b, 3, 2, 4, 1.0)
    with pytest.raises(ValueError, match="topk_group"):
        torch.ops.dsfp4.noaux_tc(s, b, 4, 5, 4, 1.0)
    with pytest.raises(ValueError, match="topk"):
        torch.ops.dsfp4.noaux_tc(s, b, 4, 2, 9, 1.0)


def test_noaux_tc_opcheck():
    torch.library.opcheck(torch.ops.dsfp4.noaux_tc.default, (torch.randn(5, 16), torch.zeros(16), 4, 2, 4, 2.5))
    torch.library.opcheck(torch.ops.dsfp4.noaux_tc.default,
                          (torch.randn(3, 32).to(torch.bfloat16), torch.zeros(32).to(torch.bfloat16), 1, 1, 6, 1.0))
