"""FP8 block GEMM ops on the CPU (the C++ references the CUDA kernels are tested against):
float64 references on odd shapes, NaN-poisoned outputs, the block and activation
quantization against NumPy, stacked weights, grouped and unit-based GEMMs, opcheck."""

import numpy as np
import pytest
import torch

import deepseek_fp4_plugin  # noqa: F401
from deepseek_fp4_plugin import Fp8Weight
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.fp8_ops import fp8_expert_unit, fp8_expert_unit_layout, scale_shape

BLOCK = 128


def random_fp8(n, k, seed, split=0):
    """Random e4m3 codes (no NaN) and positive block scales for a [n, k] weight."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32)
    codes = torch.where((codes & 0x7F) == 0x7F, torch.full_like(codes, 0x38), codes)
    w = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    s = torch.rand(*scale_shape(n, k, split), generator=g) * 0.05 + 1e-3
    return w, s


def dequant64(w, s, split=0):
    """float64 [n, k] of e4m3 × its block's scale (float32 product, as the format defines it)."""
    n, k = w.shape
    rows = torch.arange(n)
    srow = rows // BLOCK
    if split:
        srow = torch.where(rows < split, srow, -(-split // BLOCK) + (rows - split) // BLOCK)
    sf = s[srow][:, torch.arange(k) // BLOCK]
    return (w.float() * sf).double()


def bf16_close(y, ref, rtol=2 ** -7):
    y = y.double()
    assert not torch.isnan(y).any()
    err = (y - ref).abs()
    assert bool((err <= ref.abs() * rtol + 1e-6).all()), float((err / (ref.abs() + 1e-6)).max())


@pytest.mark.parametrize("n,k,split", [(1, 1, 0), (77, 200, 0), (130, 144, 0), (257, 384, 0), (200, 48, 70),
                                       (300, 272, 128), (129, 16, 1)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gemm_matches_float64(n, k, split, m):
    w, s = random_fp8(n, k, n + k + m, split)
    x = torch.randn(m, k).to(torch.bfloat16)
    y = torch.ops.dsfp4.fp8_gemm(x, w, s, split)
    bf16_close(y, x.double() @ dequant64(w, s, split).t())


def test_raw_gemm_writes_exactly_its_outputs():
    """Strided x and y, NaN-poisoned: every output written, padding columns untouched."""
    n, k, m = 70, 96, 6
    w, s = random_fp8(n, k, 1)
    big = torch.randn(m, k + 24).to(torch.bfloat16)
    x = big[:, 8:8 + k]
    y = torch.full((m, n + 10), float("nan"), dtype=torch.bfloat16)
    _C.fp8_gemm_cpu(w.data_ptr(), s.data_ptr(), n, k, 0, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                    m)
    bf16_close(y[:, :n], x.double() @ dequant64(w, s).t())
    assert torch.isnan(y[:, n:]).all()


def test_blockscaled_reference_quantizes_activations():
    """Path 2: x quantized per token and 128 columns (DeepSeek's act_quant), both scales per block."""
    n, k, m = 140, 300, 7
    w, s = random_fp8(n, k, 4)
    x = torch.randn(m, k).to(torch.bfloat16)
    xq, sx = torch.ops.dsfp4.fp8_act_quant(x)
    assert xq.shape == (m, k) and sx.shape == (m, 3)
    y = torch.ops.dsfp4.fp8_gemm(x, w, s, 0, [2, 0, 0, 0, 0])
    xd = xq.double() * sx.double()[:, torch.arange(k) // BLOCK]
    bf16_close(y, xd @ dequant64(w, s).t(), rtol=2 ** -6)
    exact = x.double() @ dequant64(w, s).t()
    rel = float((y.double() - exact).norm() / exact.norm())
    assert 1e-4 < rel < 0.05   # it is the lossy path, and not wildly so


def test_default_tactic_keeps_cutlass_paths_to_storable_outputs():
    """The heuristic assumes ldy = N and the CUTLASS paths store 16-byte rows of y: N % 8 != 0
    stays fused. (A CUDA build without a GPU plans for an sm_90 device; CPU-only builds: no-op.)"""
    cutlass = (_C.Fp8GemmPath.blockscaled, _C.Fp8GemmPath.dequant)
    for m in (128, 600, 4096):
        for n in (130, 1001):
            assert _C.fp8_gemm_default_tactic(m, n, 256).path not in cutlass
            assert all(t.path not in cutlass for t in _C.fp8_gemm_candidate_tactics(m, n, 256))


def _np_e4m3_round(v: np.ndarray) -> np.ndarray:
    """float32 → nearest e4m3 value (ties to even), saturating at ±448: an independent NumPy model."""
    v = v.astype(np.float32)
    a = np.abs(v)
    exp = np.floor(np.log2(np.where(a > 0, a, 1.0))).astype(np.int32)
    exp = np.maximum(exp, -6)                                     # subnormals share the 2^-9 step
    quantum = np.ldexp(np.float32(1.0), exp - 3).astype(np.float32)
    r = np.round(a / quantum) * quantum                           # np.round: half to even; exact scaling
    return np.copysign(np.minimum(r, 448.0), v).astype(np.float32)   # -0 stays -0


def _np_block_quantize(w: np.ndarray):
    n, k = w.shape
    q = np.zeros((n, k), np.float32)
    s = np.zeros((-(-n // BLOCK), -(-k // BLOCK)), np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].astype(np.float32)
            amax = np.float32(np.abs(blk).max())
            sc = amax / np.float32(448.0) if amax > 0 else np.float32(1.0)
            s[i, j] = sc
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = _np_e4m3_round(blk / sc)
    return q, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_quantize_bit_exact_with_numpy(dtype):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(300, 200, generator=g) * torch.logspace(-4, 1, 200)).to(dtype)
    w[:128, 128:] = 0                                            # an all-zero block: scale 1, zeros
    w[5, 7] = 1e-30                                              # an e4m3 subnormal after scaling
    q, s = torch.ops.dsfp4.fp8_block_quantize(w)
    qn, sn = _np_block_quantize(w.float().numpy())
    assert np.array_equal(s.numpy(), sn)
    want = torch.from_numpy(qn).to(torch.float8_e4m3fn)          # exactly representable: exact cast
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert float(s[0, 1]) == 1.0 and not q.float()[:128, 128:].any()
    # the tiny-model maker's torch formula gives the same bytes
    from deepseek_fp4_plugin.tiny import fp8_block_quantize
    tq, ts = fp8_block_quantize(w)
    assert torch.equal(tq.view(torch.uint8), q.view(torch.uint8)) and torch.equal(ts, s)


def test_act_quant_bit_exact_with_numpy():
    x = (torch.randn(9, 272) * torch.logspace(-3, 2, 272)).to(torch.bfloat16)
    x[3, 128:256] = 0
    q, s = torch.ops.dsfp4.fp8_act_quant(x)
    xf = x.float().numpy()
    for r in range(9):
        for j in range(3):
            g = xf[r, j * BLOCK:(j + 1) * BLOCK]
            amax = np.float32(np.abs(g).max())
            sc = amax / np.float32(448.0) if amax > 0 else np.float32(1.0)
            assert s[r, j].item() == sc
            want = torch.from_numpy(_np_e4m3_round(g / sc)).to(torch.float8_e4m3fn)
            assert torch.equal(q[r, j * BLOCK:(j + 1) * BLOCK].view(torch.uint8), want.view(torch.uint8))


def test_dequantize_and_wrapper():
    w, s = random_fp8(200, 96, 3, split=72)
    W = Fp8Weight(w, s, 72)
    assert torch.equal(W.dequantize(torch.float32).double(), dequant64(w, s, 72))
    assert W.nbytes == 200 * 96 + s.numel() * 4
    d = torch.randn(100, 160)
    Q = Fp8Weight.from_float(d)
    assert Q.n == 100 and Q.k == 160 and Q.split_rows == 0
    rel = float((Q.dequantize() - d).norm() / d.norm())
    assert rel < 0.05


@pytest.mark.parametrize("na,nb", [(64, 40), (128, 72), (200, 300)])
def test_concat_rows_is_exact(na, nb):
    a, b = Fp8Weight(*random_fp8(na, 144, na)), Fp8Weight(*random_fp8(nb, 144, nb + 1))
    ab = Fp8Weight.concat_rows([a, b])
    assert ab.split_rows == (0 if na % BLOCK == 0 else na)
    x = torch.randn(5, 144).to(torch.bfloat16)
    assert torch.equal(ab(x), torch.cat([a(x), b(x)], dim=1))
    assert torch.equal(ab.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


def test_grouped_gemm_and_units():
    H, I, S = 144, 80, 4
    gates = [Fp8Weight(*random_fp8(I, H, 10 + e)) for e in range(S)]
    ups = [Fp8Weight(*random_fp8(I, H, 20 + e)) for e in range(S)]
    downs = [Fp8Weight(*random_fp8(H, I, 30 + e)) for e in range(S)]
    gu = [Fp8Weight.concat_rows([g, u]) for g, u in zip(gates, ups)]
    w = torch.stack([x.weight for x in gu])
    sc = torch.stack([x.scale for x in gu])
    rows = [3, 0, 5, 2, 1]
    slot_of_group = torch.tensor([2, 0, 1, -1, 3], dtype=torch.int32)
    offs = torch.tensor([0] + np.cumsum(rows).tolist(), dtype=torch.int32)
    x = torch.randn(int(offs[-1]), H).to(torch.bfloat16)
    y = torch.ops.dsfp4.fp8_grouped_gemm(x, offs, slot_of_group, w, sc, max(rows), I)
    for gi, slot in enumerate(slot_of_group.tolist()):
        lo, hi = int(offs[gi]), int(offs[gi + 1])
        if slot < 0:
            assert not y[lo:hi].any()
        elif hi > lo:
            assert torch.equal(y[lo:hi], gu[slot](x[lo:hi]))
    # the same through FP8 expert units in host memory (unit_table holds host addresses here)
    lay = fp8_expert_unit_layout(H, I)
    units = [fp8_expert_unit(gates[e], ups[e], downs[e]) for e in range(S)]
    assert all(u.numel() == lay["bytes"] for u in units)
    table = torch.tensor([u.data_ptr() for u in units], dtype=torch.int64)
    yu = torch.ops.dsfp4.fp8_grouped_gemm_units(x, offs, slot_of_group, table, lay["gate_up_weight"],
                                                lay["gate_up_scale"], 2 * I, H, max(rows), I)
    assert torch.equal(yu, y)
    h = torch.randn(x.shape[0], I).to(torch.bfloat16)
    yd = torch.ops.dsfp4.fp8_grouped_gemm_units(h, offs, slot_of_group, table, lay["down_weight"],
                                                lay["down_scale"], H, I, max(rows))
    for gi, slot in enumerate(slot_of_group.tolist()):
        lo, hi = int(offs[gi]), int(offs[gi + 1])
        if slot >= 0 and hi > lo:
            assert torch.equal(yd[lo:hi], downs[slot](h[lo:hi]))
    table[2] = 0   # an unreadable unit: its group's rows are NaN (never a silently wrong sum)
    ys = torch.ops.dsfp4.fp8_grouped_gemm_units(x, offs, slot_of_group, table, lay["gate_up_weight"],
                                                lay["gate_up_scale"], 2 * I, H, max(rows), I)
    assert torch.isnan(ys[:3]).all() and torch.equal(ys[3:], y[3:])


def test_bad_inputs_name_the_argument():
    w, s = random_fp8(64, 128, 0)
    x = torch.randn(2, 128).to(torch.bfloat16)
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        torch.ops.dsfp4.fp8_gemm(x, w, s[:, :0])
    with pytest.raises(ValueError, match="split_rows"):
        torch.ops.dsfp4.fp8_gemm(x, w, s, 64)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        torch.ops.dsfp4.fp8_gemm(x, w.float(), s)
    with pytest.raises(ValueError, match="bfloat16"):
        torch.ops.dsfp4.fp8_gemm(x.float(), w, s)
    with pytest.raises(ValueError, match="last dimension K = 128"):
        torch.ops.dsfp4.fp8_gemm(x[:, :64], w, s)
    with pytest.raises(ValueError, match="tactic"):
        torch.ops.dsfp4.fp8_gemm(x, w, s, 0, [7, 0, 0, 0, 0])
    offs = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.dsfp4.fp8_grouped_gemm(x, offs, torch.tensor([3], dtype=torch.int32), w[None], s[None], 2)
    with pytest.raises(ValueError, match="row_offsets"):
        torch.ops.dsfp4.fp8_grouped_gemm(x, offs[:1], torch.tensor([0], dtype=torch.int32), w[None], s[None],
                                         2)
    with pytest.raises(ValueError, match="hidden .* and inter"):
        fp8_expert_unit_layout(100, 64)
    bad = s.clone()
    bad[0, 0] = float("nan")
    g = Fp8Weight(w, bad)
    with pytest.raises(ValueError, match="gate_proj"):
        fp8_expert_unit(g, Fp8Weight(w, s), Fp8Weight(*random_fp8(128, 64, 1)))


def test_opcheck():
    # test_schema compares tensors with ops float8 lacks on the CPU; the other checks run
    no_schema = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    w, s = random_fp8(96, 160, 5)
    x = torch.randn(3, 160).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.dsfp4.fp8_gemm.default, (x, w, s, 0, None), test_utils=no_schema)
    torch.library.opcheck(torch.ops.dsfp4.fp8_act_quant.default, (x,), test_utils=no_schema)
    torch.library.opcheck(torch.ops.dsfp4.fp8_block_quantize.default, (torch.randn(130, 70),),
                          test_utils=no_schema)
    torch.library.opcheck(torch.ops.dsfp4.fp8_dequantize.default, (w, s, 0, torch.float32),
                          test_utils=no_schema)
    offs = torch.tensor([0, 1, 3], dtype=torch.int32)
    sog = torch.tensor([1, 0], dtype=torch.int32)
    torch.library.opcheck(torch.ops.dsfp4.fp8_grouped_gemm.default,
                          (x, offs, sog, torch.stack([w, w]), torch.stack([s, s]), 2, 0, 0),
                          test_utils=no_schema)
    lay = fp8_expert_unit_layout(160, 96)
    a, b, c = Fp8Weight(w, s), Fp8Weight(*random_fp8(96, 160, 6)), Fp8Weight(*random_fp8(160, 96, 7))
    unit = fp8_expert_unit(a, b, c)
    table = torch.tensor([unit.data_ptr(), unit.data_ptr()], dtype=torch.int64)
    # no float8 tensor among its arguments: every check runs
    torch.library.opcheck(torch.ops.dsfp4.fp8_grouped_gemm_units.default,
                          (x, offs, sog, table, lay["gate_up_weight"], lay["gate_up_scale"], 192, 160, 2, 96,
                           0))
