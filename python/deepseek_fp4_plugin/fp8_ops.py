"""torch.ops.dsfp4.* for DeepSeek FP8 block weights: the FP8 GEMM and its helpers.

Format (cpp/include/dsfp4/fp8_gemm.h): weight float8_e4m3fn [N, K] row-major and float32 block
scales ``weight_scale_inv`` [ceil(N/128), ceil(K/128)], dequant(W)[n, k] = W[n, k] × S[n/128, k/128].
Two weights stacked along N keep their own block grids: ``split_rows`` = s > 0 says rows [s, N)
use scale rows ceil(s/128) + (n - s)/128 (the two scale tensors concatenated).

Each op validates its arguments (a ``ValueError`` names the offending one), then calls the C++
core on the current torch stream; the CPU implementation is the C++ reference. Every op has a
fake registration and is safe under CUDA graph capture (no host sync; buffers come from torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._ext import DTYPE_TO_C, _C, stream_of
from .ops import _check, _check_device, _check_tensor

BLOCK = 128
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATHS = {"auto": 0, "fused": 1, "blockscaled": 2, "dequant": 3}


def scale_shape(n: int, k: int, split_rows: int = 0) -> Tuple[int, int]:
    """Shape of the block-scale tensor of a [n, k] weight (with ``split_rows``)."""
    return _C.fp8_scale_rows(n, split_rows), -(-k // BLOCK)


def _check_weight(weight: Tensor, scale: Tensor, split_rows: int, name: str = "weight") -> Tuple[int, int]:
    _check_tensor(weight, name, dtype=torch.float8_e4m3fn, dim=2)
    _check_device(weight, name)
    _check_tensor(scale, f"{name}_scale_inv", dtype=torch.float32, dim=2, device=weight.device)
    n, k = weight.shape
    _check(n > 0 and k > 0, f"{name} has shape {tuple(weight.shape)}: both dimensions must be positive")
    _check(isinstance(split_rows, int) and 0 <= split_rows < n,
           f"split_rows = {split_rows!r} must be an int in [0, {n})")
    want = scale_shape(n, k, split_rows)
    _check(tuple(scale.shape) == want,
           f"{name}_scale_inv has shape {tuple(scale.shape)}, expected {want} for {name} "
           f"{tuple(weight.shape)}" + (f" split at row {split_rows}" if split_rows else ""))
    if weight.device.type == "cuda":
        _check(k % 16 == 0, f"{name}: K = {k} is not a multiple of 16 (the CUDA kernels read 16-byte rows)")
        _check(weight.data_ptr() % 16 == 0, f"{name} must be 16-byte aligned")
    return n, k


def _tactic(t: Optional[List[int]]):
    if t is None:
        return _C.Fp8GemmTactic()
    _check(len(t) == 5, "tactic must be [path, tile_tokens, warps_n, warps_k, split_k]")
    _check(int(t[0]) in PATHS.values(), f"tactic path must be one of {sorted(PATHS.values())}, got {t[0]}")
    return _C.Fp8GemmTactic(_C.Fp8GemmPath(int(t[0])), int(t[1]), int(t[2]), int(t[3]), int(t[4]))


def _as_rows(x: Tensor, k: int) -> Tuple[Tensor, int]:
    """x [..., K] → 2-D view with unit column stride, and its row stride."""
    _check(x.dim() >= 1 and x.shape[-1] == k,
           f"x has shape {tuple(x.shape)}, expected last dimension K = {k}")
    if x.dim() == 2 and x.stride(1) == 1 and x.stride(0) >= k:
        return x, x.stride(0)
    _check(x.is_contiguous(), "x must be contiguous (or 2-D with unit column stride)")
    return x.reshape(-1, k), k


# ---------------------------------------------------------------------------------------
# GEMM


@torch.library.custom_op("dsfp4::fp8_gemm", mutates_args=())
def fp8_gemm(x: Tensor, weight: Tensor, scale: Tensor, split_rows: int = 0,
             tactic: Optional[List[int]] = None) -> Tensor:
    """y[..., N] = x[..., K] · dequant(W)ᵀ, x and y bfloat16, W float8_e4m3fn [N, K] with block
    scales ``scale`` float32 [rows, ceil(K/128)].

    ``tactic`` = [path, tile_tokens, warps_n, warps_k, split_k] picks a kernel configuration
    (None: the shape heuristic). Path 2 ("blockscaled") quantizes x per token and 128 columns
    to e4m3 first (the FP8 tensor-core path); on the CPU it selects that path's reference.
    """
    n, k = _check_weight(weight, scale, split_rows)
    _check(isinstance(x, Tensor), "x must be a torch.Tensor")
    _check(x.dtype == torch.bfloat16, f"x must have dtype torch.bfloat16, got {x.dtype}")
    _check(x.device == weight.device, f"x is on {x.device}, weight is on {weight.device}")
    x2, ldx = _as_rows(x, k)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return y.reshape(out_shape)
    tac = _tactic(tactic)
    if x.device.type == "cpu":
        blockscaled = tac.path == _C.Fp8GemmPath.blockscaled
        _C.fp8_gemm_cpu(weight.data_ptr(), scale.data_ptr(), n, k, split_rows, x2.data_ptr(), ldx,
                        y.data_ptr(), n, m, blockscaled)
        return y.reshape(out_shape)
    ws_bytes = _C.fp8_gemm_workspace_bytes(m, n, k, tac, split_rows)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=x.device)
    _C.fp8_gemm(weight.data_ptr(), scale.data_ptr(), n, k, split_rows, x2.data_ptr(), ldx, y.data_ptr(), n, m,
                tac, ws.data_ptr(), ws_bytes, stream_of(x))
    return y.reshape(out_shape)


@fp8_gemm.register_fake
def _(x, weight, scale, split_rows=0, tactic=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _check_groups(x: Tensor, row_offsets: Tensor, slot_of_group: Tensor, k: int) -> int:
    _check(isinstance(x, Tensor) and x.dtype == torch.bfloat16, "x must be a bfloat16 tensor")
    _check_tensor(x, "x", dim=2)
    _check(x.shape[1] == k, f"x has shape {tuple(x.shape)}, expected [rows, {k}]")
    _check_device(x, "x")
    _check_tensor(row_offsets, "row_offsets", dtype=torch.int32, dim=1, device=x.device)
    _check_tensor(slot_of_group, "slot_of_group", dtype=torch.int32, dim=1, device=x.device)
    g = slot_of_group.numel()
    _check(g > 0, "slot_of_group must not be empty")
    _check(row_offsets.numel() == g + 1, f"row_offsets has {row_offsets.numel()} entries, expected {g + 1}")
    return g


@torch.library.custom_op("dsfp4::fp8_grouped_gemm", mutates_args=())
def fp8_grouped_gemm(x: Tensor, row_offsets: Tensor, slot_of_group: Tensor, weight: Tensor, scale: Tensor,
                     max_rows_per_group: int, split_rows: int = 0, tile_tokens: int = 0) -> Tensor:
    """All experts of a layer in one launch.

    x [R, K] bf16; row_offsets int32 [G+1] (rows of group g: row_offsets[g]:row_offsets[g+1]);
    slot_of_group int32 [G] (negative: skip); weight float8_e4m3fn [S, N, K] and scale float32
    [S, rows, ceil(K/128)] hold S weights (a slot may be any stride apart: views of a larger
    tensor work). Returns y [R, N]; rows of skipped groups and rows outside every group are zero.
    """
    _check(isinstance(weight, Tensor) and weight.dtype == torch.float8_e4m3fn and weight.dim() == 3,
           "weight must be a float8_e4m3fn tensor [slots, N, K]")
    _check(isinstance(scale, Tensor) and scale.dtype == torch.float32 and scale.dim() == 3,
           "scale must be a float32 tensor [slots, rows, ceil(K/128)]")
    slots, n, k = weight.shape
    g = _check_groups(x, row_offsets, slot_of_group, k)
    dev = x.device
    _check(weight.device == dev and scale.device == dev, f"weight and scale must be on {dev}")
    _check(slots > 0 and n > 0 and k > 0, f"weight has shape {tuple(weight.shape)}")
    _check(weight.stride(2) == 1 and weight.stride(1) == k and (slots == 1 or weight.stride(0) >= n * k),
           "each slot of weight must be a row-major [N, K] block")
    want = scale_shape(n, k, split_rows) if 0 <= split_rows < n else None
    _check(want is not None, f"split_rows = {split_rows} must be in [0, {n})")
    _check(scale.shape[0] == slots and tuple(scale.shape[1:]) == want,
           f"scale has shape {tuple(scale.shape)}, expected [{slots}, {want[0]}, {want[1]}]")
    _check(scale.stride(2) == 1 and scale.stride(1) == want[1],
           "each slot of scale must be a row-major block")
    _check(max_rows_per_group >= 0, "max_rows_per_group must be non-negative")
    w_stride = weight.stride(0) if slots > 1 else n * k
    s_stride = scale.stride(0) if slots > 1 else want[0] * want[1]
    if dev.type == "cuda":
        _check(k % 16 == 0 and weight.data_ptr() % 16 == 0 and w_stride % 16 == 0,
               "weight: K, the slot stride and the address must be multiples of 16 bytes on CUDA")
    y = torch.zeros(x.shape[0], n, dtype=torch.bfloat16, device=dev)
    if x.shape[0] == 0:
        return y
    _C.fp8_grouped_gemm(weight.data_ptr(), scale.data_ptr(), w_stride, s_stride, n, k, split_rows, 0, 0, 0,
                        slots, g, slot_of_group.data_ptr(), row_offsets.data_ptr(), x.shape[0],
                        max_rows_per_group, x.data_ptr(), k, y.data_ptr(), n, tile_tokens, dev.type == "cuda",
                        stream_of(x))
    return y


@fp8_grouped_gemm.register_fake
def _(x, row_offsets, slot_of_group, weight, scale, max_rows_per_group, split_rows=0, tile_tokens=0):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("dsfp4::fp8_grouped_gemm_units", mutates_args=())
def fp8_grouped_gemm_units(x: Tensor, row_offsets: Tensor, slot_of_group: Tensor, unit_table: Tensor,
                           unit_weight: int, unit_scale: int, n: int, k: int, max_rows_per_group: int,
                           split_rows: int = 0, tile_tokens: int = 0, ready: int = 0, epoch: int = 0,
                           wait_failed: int = 0, wait_timeout_ns: int = 0) -> Tensor:
    """The grouped FP8 GEMM over expert units: group g's weight lies at byte address
    ``unit_table[slot_of_group[g]]`` + ``unit_weight``, its scales at + ``unit_scale`` (device
    memory or mapped pinned host memory; 0 or a misaligned address gives the group NaN rows). See
    ``fp8_expert_unit_layout``. On the CPU the addresses are host addresses. ``ready`` / ``epoch``
    (addresses of uint32 words, 0: none): each group first waits until ``ready[slot] == *epoch``
    (the paging store's ready words, written after the unit's copy); past ``wait_timeout_ns`` its
    rows become NaN and the word at ``wait_failed`` is set to 1."""
    g = _check_groups(x, row_offsets, slot_of_group, k)
    dev = x.device
    _check_tensor(unit_table, "unit_table", dtype=torch.int64, dim=1, device=dev)
    _check(n > 0 and k > 0 and k % 16 == 0,
           f"weight shape [{n}, {k}] must be positive with K a multiple of 16")
    _check(0 <= split_rows < n, f"split_rows = {split_rows} must be in [0, {n})")
    _check(unit_weight >= 0 and unit_weight % 16 == 0,
           f"unit_weight = {unit_weight} must be a multiple of 16")
    _check(unit_scale >= 0 and unit_scale % 4 == 0, f"unit_scale = {unit_scale} must be a multiple of 4")
    _check(max_rows_per_group >= 0, "max_rows_per_group must be non-negative")
    y = torch.zeros(x.shape[0], n, dtype=torch.bfloat16, device=dev)
    if x.shape[0] == 0:
        return y
    _C.fp8_grouped_gemm(0, 0, 0, 0, n, k, split_rows, unit_table.data_ptr(), unit_weight, unit_scale,
                        unit_table.numel(), g, slot_of_group.data_ptr(), row_offsets.data_ptr(), x.shape[0],
                        max_rows_per_group, x.data_ptr(), k, y.data_ptr(), n, tile_tokens, dev.type == "cuda",
                        stream_of(x), ready, epoch, wait_failed, wait_timeout_ns)
    return y


@fp8_grouped_gemm_units.register_fake
def _(x, row_offsets, slot_of_group, unit_table, unit_weight, unit_scale, n, k, max_rows_per_group,
      split_rows=0, tile_tokens=0, ready=0, epoch=0, wait_failed=0, wait_timeout_ns=0):
    return x.new_empty(x.shape[0], n)


# ---------------------------------------------------------------------------------------
# quantization


@torch.library.custom_op("dsfp4::fp8_act_quant", mutates_args=())
def fp8_act_quant(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-token, per-128-column quantization of x [M, K] bf16 (K % 16 == 0 on CUDA):
    s = amax/448 of each group (1 when all zero), q = e4m3(x / s). Returns (q float8_e4m3fn
    [M, K], s float32 [M, ceil(K/128)])."""
    _check_tensor(x, "x", dtype=torch.bfloat16, dim=2)
    _check_device(x, "x")
    m, k = x.shape
    _check(k > 0, "x must have at least one column")
    if x.device.type == "cuda":
        _check(k % 16 == 0, f"x: K = {k} is not a multiple of 16")
    kb = -(-k // BLOCK)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(kb, max(m, 1), dtype=torch.float32, device=x.device)   # groups-major, as the GEMM reads
    if m > 0:
        _C.fp8_act_quant(x.data_ptr(), k, m, k, q.data_ptr(), k, s.data_ptr(), max(m, 1),
                         x.device.type == "cuda", stream_of(x))
    return q, s[:, :m].t().contiguous()


@fp8_act_quant.register_fake
def _(x):
    m, k = x.shape
    return x.new_empty(m, k, dtype=torch.float8_e4m3fn), x.new_empty(m, -(-k // BLOCK), dtype=torch.float32)


@torch.library.custom_op("dsfp4::fp8_block_quantize", mutates_args=())
def fp8_block_quantize(w: Tensor) -> Tuple[Tensor, Tensor]:
    """DeepSeek FP8 block quantization of w [N, K] (float32/float16/bfloat16): per 128×128
    block s = amax/448 in float32 (1 for an all-zero block), q = e4m3(w / s) rounded to nearest
    even, saturating. Returns (q float8_e4m3fn [N, K], weight_scale_inv float32
    [ceil(N/128), ceil(K/128)])."""
    _check_tensor(w, "w", dtype=_FLOAT_DTYPES, dim=2)
    _check_device(w, "w")
    n, k = w.shape
    _check(n > 0 and k > 0, f"w has shape {tuple(w.shape)}: both dimensions must be positive")
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(-(-n // BLOCK), -(-k // BLOCK), dtype=torch.float32, device=w.device)
    _C.fp8_block_quantize(w.data_ptr(), DTYPE_TO_C[w.dtype], n, k, q.data_ptr(), s.data_ptr(),
                          w.device.type == "cuda", stream_of(w))
    return q, s


@fp8_block_quantize.register_fake
def _(w):
    n, k = w.shape
    return w.new_empty(n, k, dtype=torch.float8_e4m3fn), w.new_empty(-(-n // BLOCK), -(-k // BLOCK),
                                                                     dtype=torch.float32)


@torch.library.custom_op("dsfp4::fp8_dequantize", mutates_args=())
def fp8_dequantize(weight: Tensor, scale: Tensor, split_rows: int = 0,
                   dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """dequant(W) [N, K] in ``dtype``: float32 holds e4m3 × scale exactly as the CPU reference
    computes it (one float32 rounding); bfloat16 on CUDA is what the dequantize path multiplies."""
    n, k = _check_weight(weight, scale, split_rows)
    _check(dtype in _FLOAT_DTYPES, f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if weight.device.type == "cuda" and dtype == torch.bfloat16:
        out = torch.empty(n, k, dtype=torch.bfloat16, device=weight.device)
        _C.fp8_dequantize(weight.data_ptr(), scale.data_ptr(), n, k, split_rows, out.data_ptr(), k, True,
                          stream_of(weight))
        return out
    if weight.device.type == "cpu":
        out = torch.empty(n, k, dtype=torch.float32)
        _C.fp8_dequantize(weight.data_ptr(), scale.data_ptr(), n, k, split_rows, out.data_ptr(), k, False, 0)
        return out.to(dtype)
    rows = torch.arange(n, device=weight.device)
    srow = rows // BLOCK
    if split_rows:
        srow = torch.where(rows < split_rows, srow, -(-split_rows // BLOCK) + (rows - split_rows) // BLOCK)
    s = scale[srow].repeat_interleave(BLOCK, dim=1)[:, :k]                              # [N, K]
    return (weight.float() * s).to(dtype)


@fp8_dequantize.register_fake
def _(weight, scale, split_rows=0, dtype=torch.bfloat16):
    return weight.new_empty(weight.shape, dtype=dtype)


# ---------------------------------------------------------------------------------------
# convenience wrapper


@dataclass
class Fp8Weight:
    """One FP8 block linear weight [n, k]: float8_e4m3fn values and float32 block scales."""

    weight: Tensor        # float8_e4m3fn [n, k]
    scale: Tensor         # float32 [fp8 scale rows, ceil(k/128)]
    split_rows: int = 0   # rows of the first of two stacked weights (see the module docstring)

    def __post_init__(self):
        _check_weight(self.weight, self.scale, self.split_rows)

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def from_float(cls, w: Tensor) -> "Fp8Weight":
        q, s = torch.ops.dsfp4.fp8_block_quantize(w.contiguous())
        return cls(q, s)

    @classmethod
    def concat_rows(cls, parts: List["Fp8Weight"]) -> "Fp8Weight":
        """Two weights stacked along N (gate + up, q_a + kv_a), exactly: each keeps its block grid."""
        _check(len(parts) in (1, 2), "concat_rows takes one or two FP8 weights")
        if len(parts) == 1:
            return parts[0]
        a, b = parts
        _check(a.split_rows == 0 and b.split_rows == 0, "concat_rows: the parts must not be split themselves")
        _check(a.k == b.k, f"part 1 has K = {b.k}, part 0 has {a.k}")
        _check(a.device == b.device, f"part 1 is on {b.device}, part 0 on {a.device}")
        split = 0 if a.n % BLOCK == 0 else a.n   # whole blocks: one uniform grid
        return cls(torch.cat([a.weight, b.weight]), torch.cat([a.scale, b.scale]), split)

    def to(self, device) -> "Fp8Weight":
        return Fp8Weight(self.weight.to(device), self.scale.to(device), self.split_rows)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.ops.dsfp4.fp8_dequantize(self.weight, self.scale, self.split_rows, dtype)

    def __call__(self, x: Tensor, tactic: Optional[List[int]] = None) -> Tensor:
        return torch.ops.dsfp4.fp8_gemm(x, self.weight, self.scale, self.split_rows, tactic)


def fp8_expert_unit_layout(hidden: int, inter: int) -> dict:
    """Byte offsets of an FP8 expert unit (cpp/include/dsfp4/fp8_gemm.h: Fp8ExpertUnitLayout)."""
    return dict(_C.fp8_expert_unit_layout(hidden, inter))


def fp8_expert_unit(gate: Fp8Weight, up: Fp8Weight, down: Fp8Weight) -> Tensor:
    """One FP8 expert unit as a CPU uint8 tensor (what a paging store keeps per expert)."""
    inter, hidden = gate.n, gate.k
    _check(up.n == inter and up.k == hidden and down.n == hidden and down.k == inter,
           f"expert shapes disagree: gate {tuple(gate.weight.shape)}, up {tuple(up.weight.shape)}, "
           f"down {tuple(down.weight.shape)}")
    lay = fp8_expert_unit_layout(hidden, inter)
    unit = torch.empty(lay["bytes"], dtype=torch.uint8)
    parts = (gate.weight, gate.scale, up.weight, up.scale, down.weight, down.scale)
    t = [p.contiguous().cpu() for p in parts]
    _C.fp8_expert_unit_fill(hidden, inter, *(x.data_ptr() for x in t), unit.data_ptr())
    return unit

