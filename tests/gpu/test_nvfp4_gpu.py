"""CUDA NVFP4 kernels against the CPU reference: bit-exact."""

import numpy as np
import pytest
import torch

import deepseek_fp4_plugin  # noqa: F401
from deepseek_fp4_plugin import ops
from nvfp4_reference import tiled_repack

SHAPES = [(1, 16), (37, 80), (129, 1040), (1000, 7168)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_cuda_equals_cpu(shape, dtype):
    w = (torch.randn(shape) * 0.03).to(dtype)
    w[0, :16] *= 50
    cpu = torch.ops.dsfp4.nvfp4_quantize(w)
    gpu = torch.ops.dsfp4.nvfp4_quantize(w.cuda())
    assert torch.equal(gpu[0].cpu(), cpu[0])
    assert torch.equal(gpu[1].cpu().view(torch.uint8), cpu[1].view(torch.uint8))
    assert gpu[2].item() == cpu[2].item()
    gs = torch.tensor(0.002)
    a = torch.ops.dsfp4.nvfp4_quantize(w, gs)
    b = torch.ops.dsfp4.nvfp4_quantize(w.cuda(), gs.cuda())
    assert torch.equal(b[0].cpu(), a[0])


def test_fp8_block_dequantize_cuda_equals_cpu():
    n, k = 300, 400
    w8 = (torch.randn(n, k) * 50).to(torch.float8_e4m3fn)
    sinv = torch.rand(3, 4) * 1e-3 + 1e-5
    full = w8.float() * sinv.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    assert torch.equal(ops.fp8_block_dequantize(w8.cuda(), sinv.cuda()).cpu(), full)


def test_fp8_block_cuda_equals_cpu():
    n, k = 300, 400
    w8 = (torch.randn(n, k) * 50).to(torch.float8_e4m3fn)
    sinv = torch.rand(3, 4) * 1e-3 + 1e-5
    cpu = torch.ops.dsfp4.fp8_block_to_nvfp4(w8, sinv)
    gpu = torch.ops.dsfp4.fp8_block_to_nvfp4(w8.cuda(), sinv.cuda())
    assert torch.equal(gpu[0].cpu(), cpu[0])
    assert torch.equal(gpu[1].cpu().view(torch.uint8), cpu[1].view(torch.uint8))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_and_repack_cuda_equal_cpu(shape, dtype):
    p, s, g = torch.ops.dsfp4.nvfp4_quantize(torch.randn(shape))
    out = torch.ops.dsfp4.nvfp4_dequantize(p.cuda(), s.cuda(), g.cuda(), dtype)
    assert torch.equal(out.cpu(), torch.ops.dsfp4.nvfp4_dequantize(p, s, g, dtype))
    # the CUDA repack against the layout written independently from the kernel's decoder
    rw, rs = tiled_repack(p.numpy(), s.view(torch.uint8).numpy(), *shape)
    qw2, qs2 = torch.ops.dsfp4.nvfp4_repack(p.cuda(), s.cuda())
    assert np.array_equal(qw2.cpu().numpy().view(np.uint32), rw) and np.array_equal(qs2.cpu().numpy(), rs)
    t = torch.ops.dsfp4.fp4_dequantize_tiled(qw2, qs2, g.cuda(), shape[0], shape[1], torch.bfloat16)
    ref = torch.ops.dsfp4.nvfp4_dequantize(p, s, g, torch.float32)
    # one bf16 rounding of the same product, computed in another order: within half an ulp
    torch.testing.assert_close(t.cpu().float(), ref, rtol=2.0 ** -8, atol=0)
