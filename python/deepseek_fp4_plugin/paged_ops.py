"""torch.ops.dsfp4.fp4_grouped_gemm_units: the grouped FP4 GEMM over paged expert units.

Like ``fp4_grouped_gemm``, but group g's weight is the expert unit at byte address
``unit_table[slot_of_group[g]]`` (a GPU slot, or pinned host memory the kernel reads in place),
its parts at the given byte offsets (the store's ExpertUnitLayout, expert_source.h), with one
global scale per 16-row tile. A group whose address is 0 (or misaligned) has no weights: its
rows are NaN, so a missing expert surfaces instead of leaving a silently wrong row. On the CPU
the addresses are host addresses.

Readiness (the paging store's ready words): with ``ready`` (address of uint32 [S]) and
``epoch`` (address of one uint32), group g first waits until ready[slot] == *epoch, then reads
its address; copies still in flight when the GEMM starts land while other groups compute. A
wait longer than ``wait_timeout_ns`` gives up with NaN rows and sets the word at ``wait_failed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ext import _C, stream_of
from .ops import _check, _check_device, _check_tensor


@torch.library.custom_op("dsfp4::fp4_grouped_gemm_units", mutates_args=())
def fp4_grouped_gemm_units(x: Tensor, row_offsets: Tensor, slot_of_group: Tensor, unit_table: Tensor,
                           unit_qweight: int, unit_qscale: int, unit_scale: int, n: int, k: int,
                           max_rows_per_group: int, tile_tokens: int = 0, ready: int = 0, epoch: int = 0,
                           wait_failed: int = 0, wait_timeout_ns: int = 0) -> Tensor:
    """x [R, k] bf16, row_offsets int32 [G+1], slot_of_group int32 [G] (negative: skip),
    unit_table int64 [S] unit addresses → y [R, n] bf16 (rows of groups with a negative slot are
    zero, of groups whose unit address is 0 NaN)."""
    _check(isinstance(x, Tensor) and x.dtype == torch.bfloat16, "x must be a bfloat16 tensor")
    _check_tensor(x, "x", dim=2)
    _check(x.shape[1] == k, f"x has shape {tuple(x.shape)}, expected [rows, {k}]")
    _check_device(x, "x")
    dev = x.device
    _check_tensor(row_offsets, "row_offsets", dtype=torch.int32, dim=1, device=dev)
    _check_tensor(slot_of_group, "slot_of_group", dtype=torch.int32, dim=1, device=dev)
    _check_tensor(unit_table, "unit_table", dtype=torch.int64, dim=1, device=dev)
    g = slot_of_group.numel()
    _check(g > 0, "slot_of_group must not be empty")
    _check(row_offsets.numel() == g + 1, f"row_offsets has {row_offsets.numel()} entries, expected {g + 1}")
    _check(n > 0 and k > 0 and k % 16 == 0, f"weight shape [{n}, {k}] must be positive with K a multiple of 16")
    for name, off, align in (("unit_qweight", unit_qweight, 16), ("unit_qscale", unit_qscale, 16),
                             ("unit_scale", unit_scale, 4)):
        _check(off >= 0 and off % align == 0, f"{name} = {off} must be a non-negative multiple of {align}")
    _check(max_rows_per_group >= 0, "max_rows_per_group must be non-negative")
    _check((ready == 0) == (epoch == 0), "ready and epoch are given together")
    y = torch.zeros(x.shape[0], n, dtype=torch.bfloat16, device=dev)
    if x.shape[0] == 0:
        return y
    # one C++ entry point for both devices: the CPU branch is the reference the kernel is tested against
    _C.fp4_grouped_gemm_units(unit_table.data_ptr(), unit_qweight, unit_qscale, unit_scale, n, k, unit_table.numel(),
                              g, slot_of_group.data_ptr(), row_offsets.data_ptr(), x.shape[0], max_rows_per_group,
                              x.data_ptr(), k, y.data_ptr(), n, tile_tokens, dev.type == "cuda", stream_of(x),
                              ready, epoch, wait_failed, wait_timeout_ns)
    return y


@fp4_grouped_gemm_units.register_fake
def _(x, row_offsets, slot_of_group, unit_table, unit_qweight, unit_qscale, unit_scale, n, k, max_rows_per_group,
      tile_tokens=0, ready=0, epoch=0, wait_failed=0, wait_timeout_ns=0):
    return x.new_empty(x.shape[0], n)
