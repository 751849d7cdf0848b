"""NVFP4 numerics on the CPU: the ops against an independent NumPy implementation."""

import numpy as np
import pytest
import torch

import deepseek_fp4_plugin  # noqa: F401  (registers the ops)
from deepseek_fp4_plugin import Fp4Weight, ops

from nvfp4_reference import E2M1, tiled_decode, tiled_repack
from nvfp4_reference import dequantize as ref_dequantize
from nvfp4_reference import quantize as ref_quantize

SHAPES = [(1, 16), (3, 48), (37, 80), (64, 256), (129, 1040)]


def _random_weight(shape, dtype, gen):
    w = torch.randn(shape, generator=gen) * 0.05
    # heavy tails, exact zeros, a dead block and a tiny block exercise the scale clamps
    w[0, : min(16, shape[1])] *= 40.0
    if shape[0] > 2:
        w[1, :16] = 0.0
        w[2, :16] *= 1e-6
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_bit_exact(shape, dtype):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    w = _random_weight(shape, dtype, gen)
    packed, scale, gs = torch.ops.dsfp4.nvfp4_quantize(w)
    rp, rs, rg = ref_quantize(w.float().numpy())
    assert gs.dtype == torch.float32 and gs.dim() == 0
    assert np.float32(gs.item()) == rg
    np.testing.assert_array_equal(scale.view(torch.uint8).numpy(), rs)
    np.testing.assert_array_equal(packed.numpy(), rp)


def test_quantize_ties_round_to_even_code():
    # block amax 6 → block scale 6/(6·gs): elements land exactly on E2M1 midpoints
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = torch.tensor([6.0] + mids + [-m for m in mids] + [0.0], dtype=torch.float32)
    gs = torch.tensor(1.0 / 448.0)  # block scale 448 → decoded exactly, q = value
    w = (row * (448.0 * gs.item())).reshape(1, 16)
    packed, scale, _ = torch.ops.dsfp4.nvfp4_quantize(w, gs)
    rp, _, _ = ref_quantize(w.numpy(), gs.item())
    np.testing.assert_array_equal(packed.numpy(), rp)
    codes = np.stack([packed.numpy() & 0xF, packed.numpy() >> 4], -1).reshape(-1)
    # 0.25→0, 0.75→1.0, 1.25→1.0, 1.75→2.0, 2.5→2.0, 3.5→4.0, 5→4.0 (codes 0,2,2,4,4,6,6)
    np.testing.assert_array_equal(codes[1:8], [0, 2, 2, 4, 4, 6, 6])
    np.testing.assert_array_equal(codes[8:15], [8, 10, 10, 12, 12, 14, 14])


def test_nibble_order_low_nibble_first():
    w = torch.zeros(1, 16)
    w[0, 0] = 6.0   # code 7
    w[0, 1] = -1.0  # code 8 + 2
    packed, _, _ = torch.ops.dsfp4.nvfp4_quantize(w)
    assert packed[0, 0].item() == (0xA << 4) | 0x7


def test_scale_clamps():
    w = torch.zeros(2, 32)
    w[0, 0] = 1000.0          # sets the global amax
    w[1, 16] = 1e-12          # block far below 2^-9 of the global scale
    _, scale, gs = torch.ops.dsfp4.nvfp4_quantize(w)
    s = scale.float()
    assert s[0, 0].item() == 448.0                    # block with the global amax
    assert s[1, 1].item() == 2.0 ** -9                # clamped up from ~1e-15
    assert s[0, 1].item() == 1.0 and s[1, 0].item() == 1.0  # all-zero blocks get scale 1
    assert gs.item() == np.float32(1000.0) / np.float32(2688.0)


def test_all_zero_weight():
    packed, scale, gs = torch.ops.dsfp4.nvfp4_quantize(torch.zeros(4, 32))
    assert gs.item() == 1.0
    assert torch.all(packed == 0)
    assert torch.all(torch.ops.dsfp4.nvfp4_dequantize(packed, scale, gs, torch.float32) == 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_reference_and_error_bound(shape):
    gen = torch.Generator().manual_seed(7)
    w = _random_weight(shape, torch.float32, gen)
    packed, scale, gs = torch.ops.dsfp4.nvfp4_quantize(w)
    dq = torch.ops.dsfp4.nvfp4_dequantize(packed, scale, gs, torch.float32)
    ref = ref_dequantize(packed.numpy(), scale.view(torch.uint8).numpy(), gs.item())
    np.testing.assert_allclose(dq.numpy(), ref, rtol=0, atol=0)
    # each element is within one E2M1 step (≤ 2 units of the block scale, half of it by
    # rounding) of its original, unless the block scale was clamped
    step = scale.float().repeat_interleave(16, 1) * gs
    assert torch.all((dq - w).abs() <= step * 1.0 + 1e-30)
    bf = torch.ops.dsfp4.nvfp4_dequantize(packed, scale, gs, torch.bfloat16)
    assert torch.equal(bf, dq.to(torch.bfloat16))
    hf = torch.ops.dsfp4.nvfp4_dequantize(packed, scale, gs, torch.float16)
    assert torch.equal(hf, dq.to(torch.float16))


def test_global_scale_override():
    w = torch.randn(8, 64)
    gs = torch.tensor(0.01)
    packed, scale, gs_out = torch.ops.dsfp4.nvfp4_quantize(w, gs)
    assert gs_out.item() == pytest.approx(0.01)
    rp, rs, _ = ref_quantize(w.numpy(), 0.01)
    np.testing.assert_array_equal(packed.numpy(), rp)
    np.testing.assert_array_equal(scale.view(torch.uint8).numpy(), rs)


def test_fp8_block_to_nvfp4():
    gen = torch.Generator().manual_seed(3)
    n, k = 200, 272  # not multiples of 128: partial scale blocks
    w8 = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    sinv = torch.rand(-(-n // 128), -(-k // 128), generator=gen) * 1e-3 + 1e-4
    packed, scale, gs = torch.ops.dsfp4.fp8_block_to_nvfp4(w8, sinv)
    # reference: dequantize the FP8 weight in float32, then quantize it
    full = w8.float() * sinv.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    assert torch.equal(ops.fp8_block_dequantize(w8, sinv), full)
    rp, rs, rg = ref_quantize(full.numpy())
    assert np.float32(gs.item()) == rg
    np.testing.assert_array_equal(scale.view(torch.uint8).numpy(), rs)
    np.testing.assert_array_equal(packed.numpy(), rp)


@pytest.mark.parametrize("shape", SHAPES)
def test_repack_roundtrip_and_tiled_dequantize(shape):
    w = torch.randn(shape)
    packed, scale, gs = torch.ops.dsfp4.nvfp4_quantize(w)
    qw, qs = torch.ops.dsfp4.nvfp4_repack(packed, scale)
    n, k = shape
    assert qw.numel() == ops.tiled_sizes(n, k)[0] and qs.numel() == ops.tiled_sizes(n, k)[1]
    p2, s2 = ops.nvfp4_unpack(qw, qs, n, k)
    assert torch.equal(p2, packed)
    assert torch.equal(s2.view(torch.uint8), scale.view(torch.uint8))
    a = torch.ops.dsfp4.fp4_dequantize_tiled(qw, qs, gs, n, k, torch.float32)
    b = torch.ops.dsfp4.nvfp4_dequantize(packed, scale, gs, torch.float32)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_repack_matches_independent_layout(shape):
    n, k = shape
    packed, scale, _ = torch.ops.dsfp4.nvfp4_quantize(torch.randn(shape))
    qw, qs = torch.ops.dsfp4.nvfp4_repack(packed, scale)
    rw, rs = tiled_repack(packed.numpy(), scale.view(torch.uint8).numpy(), n, k)
    np.testing.assert_array_equal(qw.numpy().view(np.uint32), rw)
    np.testing.assert_array_equal(qs.numpy(), rs)


def test_independent_layout_decodes_to_e2m1():
    # the reference's words, decoded as the kernel does, give each element's E2M1 value × 2^-126
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (16, 64), generator=gen, dtype=torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).numpy()
    words, _ = tiled_repack(packed, np.zeros((16, 4), np.uint8), 16, 64)
    vals = tiled_decode(words.reshape(32, 4))  # [lane, j, register, half]
    want = (E2M1[codes.numpy() & 7] * np.where(codes.numpy() & 8, -1.0, 1.0)) * 2.0 ** -126
    for lane in range(32):
        g, c = lane // 4, lane % 4
        for j in range(4):
            for reg, (r, kk0) in enumerate([(0, 0), (1, 0), (0, 2), (1, 2)]):
                for h in range(2):
                    assert vals[lane, j, reg, h] == want[g + 8 * r, 16 * c + 4 * j + kk0 + h]


@pytest.mark.parametrize("m,n,k", [(1, 1, 16), (3, 37, 80), (17, 100, 1040), (5, 129, 64)])
def test_gemm_cpu_against_float64(m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    w = Fp4Weight.from_float(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    y = w(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = x.double() @ w.dequantize(torch.float32).double().t()
    err = (y.double() - ref).norm() / ref.norm()
    assert err < 1e-2
    # leading dimensions are kept
    assert w(x.reshape(1, m, k)).shape == (1, m, n)


def test_concat_rows_keeps_each_global_scale():
    gen = torch.Generator().manual_seed(2)
    gate = Fp4Weight.from_float(torch.randn(32, 64, generator=gen))
    up = Fp4Weight.from_float(torch.randn(48, 64, generator=gen) * 7)
    fused = Fp4Weight.concat_rows([gate, up])
    assert fused.n == 80 and fused.global_scale.shape == (5,)
    assert torch.equal(fused.dequantize(torch.float32),
                       torch.cat([gate.dequantize(torch.float32), up.dequantize(torch.float32)]))
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    # BLAS blocks the two matmuls differently: equal up to the final bf16 rounding
    torch.testing.assert_close(fused(x), torch.cat([gate(x), up(x)], 1), rtol=2.0 ** -7, atol=1e-6)
    same = Fp4Weight.concat_rows([gate, gate])
    assert same.global_scale.dim() == 0


def test_bad_inputs_name_the_argument():
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        torch.ops.dsfp4.nvfp4_quantize(torch.randn(4, 40))
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.dsfp4.nvfp4_quantize(w.to(torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.dsfp4.nvfp4_quantize(torch.randn(32, 4).t())
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.dsfp4.nvfp4_quantize(torch.randn(32))
    fw = Fp4Weight.from_float(w)
    with pytest.raises(ValueError, match="x has shape"):
        fw(torch.randn(2, 16).to(torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16"):
        fw(torch.randn(2, 32))
    with pytest.raises(ValueError, match="qweight has"):
        torch.ops.dsfp4.fp4_gemm(torch.randn(2, 32).to(torch.bfloat16), fw.qweight[:-1], fw.qscale,
                                 fw.global_scale, 4, 32)
    with pytest.raises(ValueError, match="weight_scale has shape"):
        torch.ops.dsfp4.nvfp4_dequantize(torch.zeros(4, 16, dtype=torch.uint8),
                                         torch.zeros(4, 3, dtype=torch.float8_e4m3fn), torch.tensor(1.0))
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        torch.ops.dsfp4.fp8_block_to_nvfp4(torch.zeros(4, 32, dtype=torch.float8_e4m3fn), torch.ones(2, 2))


def test_opcheck():
    w = torch.randn(40, 64)
    # test_schema compares outputs with ops float8 lacks on the CPU; the other checks run
    no_schema = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.dsfp4.nvfp4_quantize.default, (w,), test_utils=no_schema)
    packed, scale, gs = torch.ops.dsfp4.nvfp4_quantize(w)
    torch.library.opcheck(torch.ops.dsfp4.nvfp4_dequantize.default, (packed, scale, gs, torch.float32),
                          test_utils=no_schema)
    torch.library.opcheck(torch.ops.dsfp4.nvfp4_repack.default, (packed, scale), test_utils=no_schema)
    qw, qs = torch.ops.dsfp4.nvfp4_repack(packed, scale)
    x = torch.randn(3, 64).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.dsfp4.fp4_gemm.default, (x, qw, qs, gs, 40, 64))
    torch.library.opcheck(torch.ops.dsfp4.fp4_dequantize_tiled.default, (qw, qs, gs, 40, 64, torch.float32))
