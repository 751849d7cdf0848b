"""torch.ops.dsfp4.*: NVFP4 numerics and the FP4 GEMM as torch custom ops.

Each op validates its arguments (a ``ValueError`` names the offending one), then calls the
C++ core with raw pointers on the current torch stream. Every op has a CPU implementation
(the C++ reference) and a CUDA one (the kernels), a fake registration for tracing, and is
safe to use under CUDA graph capture.

Layouts (see cpp/include/dsfp4/nvfp4.h):
  ModelOpt  packed uint8 [N, K/2], scale float8_e4m3fn [N, K/16], global_scale float32 []
  tiled     qweight int32 [tiled_weight_bytes/4], qscale uint8 [tiled_scale_bytes]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _ext
from ._ext import DTYPE_TO_C, _C, stream_of

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_tensor(t: Tensor, name: str, dtype=None, dim: Optional[int] = None, device=None) -> None:
    _check(isinstance(t, Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        _check(t.dtype in allowed, f"{name} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if dim is not None:
        _check(t.dim() == dim, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if device is not None:
        _check(t.device == device, f"{name} is on {t.device}, expected {device}")
    _check(t.is_contiguous(), f"{name} must be contiguous")


def _check_device(t: Tensor, name: str) -> None:
    if t.device.type == "cuda":
        _check(_ext.has_cuda_kernels(), f"{name} is a CUDA tensor but this build has no CUDA kernels")
    else:
        _check(t.device.type == "cpu", f"{name} must be on CPU or CUDA, got {t.device}")


def _global_scale_ptr(gs: Tensor, name: str, device) -> int:
    _check_tensor(gs, name, dtype=torch.float32, device=device)
    _check(gs.numel() == 1, f"{name} must hold one value, got shape {tuple(gs.shape)}")
    return gs.data_ptr()


def _weight_scale_arg(gs: Tensor, n: int, name: str, device) -> Tuple[int, bool]:
    """Global scale of a tiled weight: one value, or one per 16-row tile (fused weights whose
    parts had different scales). Returns (pointer, per_tile)."""
    _check_tensor(gs, name, dtype=torch.float32, device=device)
    tiles = -(-n // 16)
    if gs.numel() == 1:
        return gs.data_ptr(), False
    _check(gs.dim() == 1 and gs.numel() == tiles,
           f"{name} must hold one value or one per 16-row tile ({tiles}), got shape {tuple(gs.shape)}")
    return gs.data_ptr(), True


def tiled_sizes(n: int, k: int) -> Tuple[int, int]:
    """(qweight int32 elements, qscale bytes) of the tiled layout for a [n, k] weight."""
    return _C.tiled_weight_bytes(n, k) // 4, _C.tiled_scale_bytes(n, k)


# ---------------------------------------------------------------------------------------
# quantize / dequantize


def _quantize_impl(src: Tensor, scale_inv: Optional[Tensor], block: Tuple[int, int],
                   global_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    rows, cols = src.shape
    dev = src.device
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=dev)
    scale = torch.empty(rows, cols // 16, dtype=torch.float8_e4m3fn, device=dev)
    gs_out = torch.empty((), dtype=torch.float32, device=dev)
    gs_in = 0
    if global_scale is not None:
        gs_in = _global_scale_ptr(global_scale, "global_scale", dev)
        if dev.type == "cpu":
            _check(float(global_scale) > 0, "global_scale must be positive")
    ws = None
    if dev.type == "cuda":
        ws = torch.empty(_C.nvfp4_quantize_workspace_bytes(), dtype=torch.uint8, device=dev)
    _C.nvfp4_quantize(src.data_ptr(), DTYPE_TO_C[src.dtype], scale_inv.data_ptr() if scale_inv is not None else 0,
                      block[0], block[1], rows, cols, gs_in, packed.data_ptr(), scale.data_ptr(),
                      gs_out.data_ptr(), dev.type == "cuda", ws.data_ptr() if ws is not None else 0,
                      stream_of(src))
    return packed, scale, gs_out


@torch.library.custom_op("dsfp4::nvfp4_quantize", mutates_args=())
def nvfp4_quantize(w: Tensor, global_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantizes w [N, K] (float32/float16/bfloat16, K % 16 == 0) to NVFP4 as ModelOpt does.

    Returns (packed uint8 [N, K/2], scale float8_e4m3fn [N, K/16], global_scale float32 []).
    ``global_scale`` overrides amax/(6·448), e.g. to share one scale between gate and up.
    """
    _check_tensor(w, "w", dtype=_FLOAT_DTYPES, dim=2)
    _check_device(w, "w")
    _check(w.shape[1] % 16 == 0, f"w: K = {w.shape[1]} (last dimension) is not a multiple of 16")
    _check(w.shape[0] > 0, "w: must have at least one row")
    return _quantize_impl(w, None, (128, 128), global_scale)


@nvfp4_quantize.register_fake
def _(w, global_scale=None):
    n, k = w.shape
    return (w.new_empty(n, k // 2, dtype=torch.uint8), w.new_empty(n, k // 16, dtype=torch.float8_e4m3fn),
            w.new_empty((), dtype=torch.float32))


@torch.library.custom_op("dsfp4::fp8_block_to_nvfp4", mutates_args=())
def fp8_block_to_nvfp4(w: Tensor, scale_inv: Tensor, block_rows: int = 128, block_cols: int = 128,
                       global_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Converts a DeepSeek FP8 block weight (float8_e4m3fn [N, K] with float32 weight_scale_inv
    [ceil(N/128), ceil(K/128)]) to NVFP4: dequantized in float32, then quantized as ModelOpt does."""
    _check_tensor(w, "weight", dtype=torch.float8_e4m3fn, dim=2)
    _check_device(w, "weight")
    _check_tensor(scale_inv, "weight_scale_inv", dtype=torch.float32, dim=2, device=w.device)
    _check(block_rows > 0 and block_cols > 0, "block size must be positive")
    rows, cols = w.shape
    want = (-(-rows // block_rows), -(-cols // block_cols))
    _check(tuple(scale_inv.shape) == want,
           f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for weight {tuple(w.shape)}")
    _check(cols % 16 == 0, f"weight: K = {cols} is not a multiple of 16")
    return _quantize_impl(w, scale_inv, (block_rows, block_cols), global_scale)


@fp8_block_to_nvfp4.register_fake
def _(w, scale_inv, block_rows=128, block_cols=128, global_scale=None):
    n, k = w.shape
    return (w.new_empty(n, k // 2, dtype=torch.uint8), w.new_empty(n, k // 16, dtype=torch.float8_e4m3fn),
            w.new_empty((), dtype=torch.float32))


def fp8_block_dequantize(w: Tensor, scale_inv: Tensor, block_rows: int = 128, block_cols: int = 128) -> Tensor:
    """DeepSeek FP8 block weight → float32 (value = fp8 × scale_inv of its block), on w's device."""
    _check_tensor(w, "weight", dtype=torch.float8_e4m3fn, dim=2)
    _check_device(w, "weight")
    _check_tensor(scale_inv, "weight_scale_inv", dtype=torch.float32, dim=2, device=w.device)
    _check(block_rows > 0 and block_cols > 0, "block size must be positive")
    rows, cols = w.shape
    want = (-(-rows // block_rows), -(-cols // block_cols))
    _check(tuple(scale_inv.shape) == want,
           f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for weight {tuple(w.shape)}")
    out = torch.empty(rows, cols, dtype=torch.float32, device=w.device)
    if out.numel() > 0:
        _C.fp8_block_dequantize(w.data_ptr(), scale_inv.data_ptr(), block_rows, block_cols, rows, cols,
                                out.data_ptr(), w.device.type == "cuda", stream_of(w))
    return out


def _check_modelopt(packed: Tensor, scale: Tensor, global_scale: Tensor) -> Tuple[int, int]:
    _check_tensor(packed, "weight (packed)", dtype=torch.uint8, dim=2)
    _check_device(packed, "weight (packed)")
    _check_tensor(scale, "weight_scale", dtype=torch.float8_e4m3fn, dim=2, device=packed.device)
    n, half = packed.shape
    k = 2 * half
    _check(k % 16 == 0, f"weight (packed): K = {k} is not a multiple of 16")
    _check(tuple(scale.shape) == (n, k // 16),
           f"weight_scale has shape {tuple(scale.shape)}, expected {(n, k // 16)} for packed {tuple(packed.shape)}")
    _global_scale_ptr(global_scale, "weight_scale_2", packed.device)
    return n, k


@torch.library.custom_op("dsfp4::nvfp4_dequantize", mutates_args=())
def nvfp4_dequantize(packed: Tensor, scale: Tensor, global_scale: Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """ModelOpt NVFP4 → dense [N, K] of ``dtype`` (float32, float16 or bfloat16)."""
    n, k = _check_modelopt(packed, scale, global_scale)
    _check(dtype in _FLOAT_DTYPES, f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    if packed.device.type == "cpu":
        gs = global_scale.reshape(1)
    else:
        gs = global_scale
    _C.nvfp4_dequantize(packed.data_ptr(), scale.data_ptr(), gs.data_ptr(), n, k, out.data_ptr(),
                        DTYPE_TO_C[dtype], packed.device.type == "cuda", stream_of(packed))
    return out


@nvfp4_dequantize.register_fake
def _(packed, scale, global_scale, dtype=torch.bfloat16):
    return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype)


# ---------------------------------------------------------------------------------------
# tiled (kernel) layout


@torch.library.custom_op("dsfp4::nvfp4_repack", mutates_args=())
def nvfp4_repack(packed: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """ModelOpt layout → tiled kernel layout (qweight int32, qscale uint8), both 1-D."""
    _check_tensor(packed, "weight (packed)", dtype=torch.uint8, dim=2)
    _check_device(packed, "weight (packed)")
    _check_tensor(scale, "weight_scale", dtype=torch.float8_e4m3fn, dim=2, device=packed.device)
    n, k = packed.shape[0], packed.shape[1] * 2
    _check(k % 16 == 0, f"weight (packed): K = {k} is not a multiple of 16")
    _check(tuple(scale.shape) == (n, k // 16),
           f"weight_scale has shape {tuple(scale.shape)}, expected {(n, k // 16)}")
    nw, ns = tiled_sizes(n, k)
    qweight = torch.empty(nw, dtype=torch.int32, device=packed.device)
    qscale = torch.empty(ns, dtype=torch.uint8, device=packed.device)
    _C.nvfp4_repack(packed.data_ptr(), scale.data_ptr(), n, k, qweight.data_ptr(), qscale.data_ptr(),
                    packed.device.type == "cuda", stream_of(packed))
    return qweight, qscale


@nvfp4_repack.register_fake
def _(packed, scale):
    n, k = packed.shape[0], packed.shape[1] * 2
    nw, ns = tiled_sizes(n, k)
    return packed.new_empty(nw, dtype=torch.int32), packed.new_empty(ns, dtype=torch.uint8)


def nvfp4_unpack(qweight: Tensor, qscale: Tensor, n: int, k: int) -> Tuple[Tensor, Tensor]:
    """Tiled layout → ModelOpt layout (packed, scale); runs on the CPU, returns CPU tensors."""
    _check_tiled(qweight, qscale, n, k)
    qw, qs = qweight.cpu(), qscale.cpu()
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scale = torch.empty(n, k // 16, dtype=torch.float8_e4m3fn)
    _C.nvfp4_unpack(qw.data_ptr(), qs.data_ptr(), n, k, packed.data_ptr(), scale.data_ptr())
    return packed, scale


def _check_tiled(qweight: Tensor, qscale: Tensor, n: int, k: int, name: str = "qweight") -> None:
    _check(isinstance(n, int) and isinstance(k, int) and n > 0 and k > 0, f"n and k must be positive ints")
    _check(k % 16 == 0, f"K = {k} is not a multiple of 16")
    nw, ns = tiled_sizes(n, k)
    _check_tensor(qweight, name, dtype=torch.int32, dim=1)
    _check_device(qweight, name)
    _check_tensor(qscale, "qscale", dtype=torch.uint8, dim=1, device=qweight.device)
    _check(qweight.numel() == nw, f"{name} has {qweight.numel()} elements, expected {nw} for a [{n}, {k}] weight")
    _check(qscale.numel() == ns, f"qscale has {qscale.numel()} bytes, expected {ns} for a [{n}, {k}] weight")


@torch.library.custom_op("dsfp4::fp4_dequantize_tiled", mutates_args=())
def fp4_dequantize_tiled(qweight: Tensor, qscale: Tensor, global_scale: Tensor, n: int, k: int,
                         dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Tiled NVFP4 weight → dense [n, k] (what fp4_gemm multiplies by)."""
    _check_tiled(qweight, qscale, n, k)
    gs, per_tile = _weight_scale_arg(global_scale, n, "global_scale", qweight.device)
    _check(dtype in _FLOAT_DTYPES, f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if qweight.device.type == "cpu":
        out = torch.empty(n, k, dtype=torch.float32)
        _C.fp4_dequantize_tiled(qweight.data_ptr(), qscale.data_ptr(), gs, per_tile, n, k, out.data_ptr(), k, False, 0)
        return out.to(dtype)
    out = torch.empty(n, k, dtype=torch.bfloat16, device=qweight.device)
    _C.fp4_dequantize_tiled(qweight.data_ptr(), qscale.data_ptr(), gs, per_tile, n, k, out.data_ptr(), k, True,
                            stream_of(qweight))
    return out if dtype == torch.bfloat16 else out.to(dtype)


@fp4_dequantize_tiled.register_fake
def _(qweight, qscale, global_scale, n, k, dtype=torch.bfloat16):
    return qweight.new_empty(n, k, dtype=dtype)


# ---------------------------------------------------------------------------------------
# GEMM


def _tactic(t: Optional[List[int]]):
    if t is None:
        return _C.Fp4GemmTactic()
    _check(len(t) == 5, "tactic must be [path, tile_tokens, warps_n, warps_k, split_k]")
    return _C.Fp4GemmTactic(_C.Fp4GemmPath(int(t[0])), int(t[1]), int(t[2]), int(t[3]), int(t[4]))


def _as_rows(x: Tensor, k: int) -> Tuple[Tensor, int]:
    """x [..., K] → 2-D view with unit column stride, and its row stride."""
    _check(x.dim() >= 1 and x.shape[-1] == k, f"x has shape {tuple(x.shape)}, expected last dimension K = {k}")
    if x.dim() == 2 and x.stride(1) == 1 and x.stride(0) >= k:
        return x, x.stride(0)
    _check(x.is_contiguous(), "x must be contiguous (or 2-D with unit column stride)")
    return x.reshape(-1, k), k


@torch.library.custom_op("dsfp4::fp4_gemm", mutates_args=())
def fp4_gemm(x: Tensor, qweight: Tensor, qscale: Tensor, global_scale: Tensor, n: int, k: int,
             tactic: Optional[List[int]] = None) -> Tensor:
    """y[..., N] = x[..., K] · dequant(W)ᵀ, x and y bfloat16, W NVFP4 in the tiled layout.

    ``tactic`` = [path, tile_tokens, warps_n, warps_k, split_k] picks a kernel configuration
    (CUDA only; None uses the shape heuristic).
    """
    _check_tiled(qweight, qscale, n, k)
    _check(isinstance(x, Tensor), "x must be a torch.Tensor")
    _check(x.dtype == torch.bfloat16, f"x must have dtype torch.bfloat16, got {x.dtype}")
    _check(x.device == qweight.device, f"x is on {x.device}, weight is on {qweight.device}")
    gs, per_tile = _weight_scale_arg(global_scale, n, "global_scale", qweight.device)
    x2, ldx = _as_rows(x, k)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return y.reshape(out_shape)
    if x.device.type == "cpu":
        _C.fp4_gemm_cpu(qweight.data_ptr(), qscale.data_ptr(), gs, per_tile, n, k, x2.data_ptr(), ldx, y.data_ptr(), n, m)
        return y.reshape(out_shape)
    tac = _tactic(tactic)
    ws_bytes = _C.fp4_gemm_workspace_bytes(m, n, k, tac)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=x.device)
    _C.fp4_gemm(qweight.data_ptr(), qscale.data_ptr(), gs, per_tile, n, k, x2.data_ptr(), ldx, y.data_ptr(), n, m, tac,
                ws.data_ptr(), ws_bytes, stream_of(x))
    return y.reshape(out_shape)


@fp4_gemm.register_fake
def _(x, qweight, qscale, global_scale, n, k, tactic=None):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("dsfp4::fp4_grouped_gemm", mutates_args=())
def fp4_grouped_gemm(x: Tensor, row_offsets: Tensor, slot_of_group: Tensor, qweight: Tensor, qscale: Tensor,
                     global_scale: Tensor, n: int, k: int, max_rows_per_group: int,
                     tile_tokens: int = 0) -> Tensor:
    """All experts of a layer in one launch.

    x [R, K] bf16; row_offsets int32 [G+1] (rows of group g: row_offsets[g]:row_offsets[g+1]);
    slot_of_group int32 [G] (negative: skip); qweight int32 [S, words], qscale uint8 [S, bytes],
    global_scale float32 [S] (or [S, ceil(n/16)], one per row tile) hold S stacked tiled
    weights of shape [n, k]. Returns y [R, n] with
    the rows of skipped groups, and rows outside every group, set to zero.
    """
    _check(isinstance(x, Tensor) and x.dtype == torch.bfloat16, "x must be a bfloat16 tensor")
    _check_tensor(x, "x", dim=2)
    _check(x.shape[1] == k, f"x has shape {tuple(x.shape)}, expected [rows, {k}]")
    _check_device(x, "x")
    dev = x.device
    _check_tensor(row_offsets, "row_offsets", dtype=torch.int32, dim=1, device=dev)
    _check_tensor(slot_of_group, "slot_of_group", dtype=torch.int32, dim=1, device=dev)
    g = slot_of_group.numel()
    _check(g > 0, "slot_of_group must not be empty")
    _check(row_offsets.numel() == g + 1, f"row_offsets has {row_offsets.numel()} entries, expected {g + 1}")
    _check_tensor(qweight, "qweight", dtype=torch.int32, dim=2, device=dev)
    _check_tensor(qscale, "qscale", dtype=torch.uint8, dim=2, device=dev)
    _check_tensor(global_scale, "global_scale", dtype=torch.float32, device=dev)
    nw, ns = tiled_sizes(n, k)
    slots = qweight.shape[0]
    tiles = -(-n // 16)
    per_tile = global_scale.dim() == 2
    _check(global_scale.dim() == 1 or (per_tile and global_scale.shape[1] == tiles),
           f"global_scale must be [{slots}] or [{slots}, {tiles}], got {tuple(global_scale.shape)}")
    _check(qweight.shape[1] >= nw, f"qweight rows hold {qweight.shape[1]} words, a [{n}, {k}] weight needs {nw}")
    _check(qscale.shape[0] == slots and qscale.shape[1] >= ns,
           f"qscale has shape {tuple(qscale.shape)}, expected [{slots}, >= {ns}]")
    _check(global_scale.shape[0] == slots, f"global_scale has {global_scale.shape[0]} slots, expected {slots}")
    _check(max_rows_per_group >= 0, "max_rows_per_group must be non-negative")
    y = torch.zeros(x.shape[0], n, dtype=torch.bfloat16, device=dev)
    if x.shape[0] == 0:
        return y
    if dev.type == "cpu":
        _C.fp4_grouped_gemm_cpu(qweight.data_ptr(), qscale.data_ptr(), global_scale.data_ptr(), per_tile,
                                qweight.shape[1], qscale.shape[1], n, k, slots, g, slot_of_group.data_ptr(),
                                row_offsets.data_ptr(), x.shape[0], x.data_ptr(), k, y.data_ptr(), n)
        return y
    _C.fp4_grouped_gemm(qweight.data_ptr(), qscale.data_ptr(), global_scale.data_ptr(), per_tile, qweight.shape[1],
                        qscale.shape[1], n, k, g, slot_of_group.data_ptr(), row_offsets.data_ptr(),
                        max_rows_per_group, x.data_ptr(), k, y.data_ptr(), n, tile_tokens, stream_of(x))
    return y


@fp4_grouped_gemm.register_fake
def _(x, row_offsets, slot_of_group, qweight, qscale, global_scale, n, k, max_rows_per_group, tile_tokens=0):
    return x.new_empty(x.shape[0], n)


# ---------------------------------------------------------------------------------------
# convenience wrapper


@dataclass
class Fp4Weight:
    """One NVFP4 linear weight [n, k] in the tiled kernel layout."""

    qweight: Tensor       # int32 [words]
    qscale: Tensor        # uint8 [bytes]
    global_scale: Tensor  # float32 [] (or [ceil(n/16)]: one per 16-row tile)
    n: int
    k: int

    @classmethod
    def from_modelopt(cls, packed: Tensor, scale: Tensor, global_scale: Tensor) -> "Fp4Weight":
        n, k = _check_modelopt(packed, scale, global_scale)
        qw, qs = torch.ops.dsfp4.nvfp4_repack(packed, scale)
        return cls(qw, qs, global_scale.reshape(()).to(torch.float32), n, k)

    @classmethod
    def from_float(cls, w: Tensor, global_scale: Optional[Tensor] = None) -> "Fp4Weight":
        packed, scale, gs = torch.ops.dsfp4.nvfp4_quantize(w.contiguous(), global_scale)
        return cls.from_modelopt(packed, scale, gs)

    @classmethod
    def concat_rows(cls, parts: List["Fp4Weight"]) -> "Fp4Weight":
        """Stacks weights along N (e.g. gate and up into one gate_up GEMM), exactly: the tiled
        layout concatenates tile by tile, and each part keeps its own global scale per tile."""
        _check(len(parts) >= 1, "concat_rows needs at least one weight")
        k, dev = parts[0].k, parts[0].device
        scales = []
        for i, p in enumerate(parts):
            _check(p.k == k, f"part {i} has K = {p.k}, part 0 has {k}")
            _check(p.device == dev, f"part {i} is on {p.device}, part 0 on {dev}")
            _check(i == len(parts) - 1 or p.n % 16 == 0, f"part {i} has N = {p.n}, not a multiple of 16")
            tiles = -(-p.n // 16)
            gs = p.global_scale.reshape(-1)
            scales.append(gs.expand(tiles) if gs.numel() == 1 else gs)
        gs = torch.cat(scales)
        if bool((gs == gs[0]).all()):
            gs = gs[:1].reshape(())
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.qscale for p in parts]), gs.contiguous(),
                   sum(p.n for p in parts), k)

    def to(self, device) -> "Fp4Weight":
        return Fp4Weight(self.qweight.to(device), self.qscale.to(device), self.global_scale.to(device), self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * 4 + self.qscale.numel() + 4

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        return torch.ops.dsfp4.fp4_dequantize_tiled(self.qweight, self.qscale, self.global_scale, self.n, self.k,
                                                    dtype)

    def __call__(self, x: Tensor, tactic: Optional[List[int]] = None) -> Tensor:
        return torch.ops.dsfp4.fp4_gemm(x, self.qweight, self.qscale, self.global_scale, self.n, self.k, tactic)
