"""torch.ops.dsfp4 MoE ops: noaux_tc routing, token permutation, SiLU·mul, weighted combine.

Each op validates its arguments and calls the C++ core: the CPU references (moe_cpu.cpp) on CPU
tensors, the CUDA kernels on CUDA tensors.

Routing (DeepSeek-V3 ``noaux_tc``), per token t over E experts in ``n_group`` groups:
  s        = sigmoid(logits)                      (float32)
  c        = s + correction_bias                  (bias only steers the choice)
  group g  : score = sum of the 2 largest c in g; keep the ``topk_group`` best groups
  experts  : the ``top_k`` largest c among kept groups (others are -inf, as in DeepSeek's
             reference code; ties go to the lower index)
  weights  = s[experts], divided by their sum (+1e-20) if ``norm_topk_prob``,
             times ``routed_scaling_factor``
Outputs are ordered by descending c.

Permutation: the T·k (token, slot) pairs are sorted by expert (stable in pair order);
``row_offsets[e]:row_offsets[e+1]`` are the permuted rows of expert e and ``perm[r]`` is the
pair index t·k + j that row r holds.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _ext
from ._ext import _C, stream_of
from .ops import _check, _check_device, _check_tensor


def _check_route_args(logits: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int,
                      names: Tuple[str, str, str] = ("router_logits", "e_score_correction_bias", "top_k"),
                      dtypes=((torch.float32, torch.bfloat16), (torch.float32,))) -> None:
    logits_name, bias_name, k_name = names
    _check_tensor(logits, logits_name, dtype=dtypes[0], dim=2)
    _check_device(logits, logits_name)
    e = logits.shape[1]
    _check_tensor(bias, bias_name, dtype=dtypes[1], dim=1, device=logits.device)
    _check(bias.numel() == e, f"{bias_name} has {bias.numel()} entries, expected {e}")
    for name, v in ((k_name, top_k), ("n_group", n_group), ("topk_group", topk_group)):
        _check(isinstance(v, int), f"{name} must be an int, got {type(v).__name__}")
    _check(n_group >= 1 and e % n_group == 0, f"n_group = {n_group} must divide the {e} experts")
    _check(e // n_group >= 2, "each group needs at least 2 experts")
    _check(1 <= topk_group <= n_group, f"topk_group = {topk_group} must be in [1, n_group = {n_group}]")
    _check(1 <= top_k <= topk_group * (e // n_group),
           f"{k_name} = {top_k} must be in [1, {topk_group * (e // n_group)}] (experts in the kept groups)")
    _check(top_k <= 32, f"{k_name} must be at most 32")
    _check(e <= 1024, "at most 1024 experts are supported")
    _check(n_group <= 32, "at most 32 expert groups are supported")


@torch.library.custom_op("dsfp4::moe_route", mutates_args=())
def moe_route(router_logits: Tensor, correction_bias: Tensor, top_k: int, n_group: int, topk_group: int,
              routed_scaling_factor: float, norm_topk_prob: bool) -> Tuple[Tensor, Tensor]:
    """DeepSeek noaux_tc routing. Returns (weights float32 [T, top_k], expert ids int32 [T, top_k])."""
    _check_route_args(router_logits, correction_bias, top_k, n_group, topk_group)
    t, e = router_logits.shape
    w = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=router_logits.device)
    if t > 0:
        _C.moe_route(router_logits.data_ptr(), _ext.DTYPE_TO_C[router_logits.dtype], correction_bias.data_ptr(),
                     t, e, top_k, n_group, topk_group, float(routed_scaling_factor), bool(norm_topk_prob),
                     w.data_ptr(), ids.data_ptr(), router_logits.device.type == "cuda", stream_of(router_logits))
    return w, ids


@moe_route.register_fake
def _(router_logits, correction_bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob):
    t = router_logits.shape[0]
    return (router_logits.new_empty(t, top_k, dtype=torch.float32),
            router_logits.new_empty(t, top_k, dtype=torch.int32))


_NOAUX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("dsfp4::noaux_tc", mutates_args=())
def noaux_tc(scores: Tensor, bias: Tensor, n_group: int, topk_group: int, topk: int,
             routed_scaling_factor: float) -> Tuple[Tensor, Tensor]:
    """TensorRT-LLM's ``noaux_tc_op`` signature and semantics on the dsfp4 routing kernel.

    scores [T, E]: router logits (float32, bfloat16 or float16), not yet passed through a
    sigmoid (the op applies it); bias [E]: e_score_correction_bias (same dtypes). Returns
    (weights [T, topk] in scores' dtype, expert ids int32 [T, topk]): the sigmoid scores of
    the chosen experts divided by their sum (+1e-20), times routed_scaling_factor, in
    descending order of biased score. Same as moe_route with norm_topk_prob=True.
    """
    _check_route_args(scores, bias, topk, n_group, topk_group, ("scores", "bias", "topk"),
                      (_NOAUX_DTYPES, _NOAUX_DTYPES))
    # float16 logits and non-float32 biases widen exactly to what the kernel reads
    logits = scores if scores.dtype != torch.float16 else scores.float()
    w, ids = moe_route(logits, bias.float().contiguous(), topk, n_group, topk_group, routed_scaling_factor, True)
    return w.to(scores.dtype), ids


@noaux_tc.register_fake
def _(scores, bias, n_group, topk_group, topk, routed_scaling_factor):
    t = scores.shape[0]
    return scores.new_empty(t, topk), scores.new_empty(t, topk, dtype=torch.int32)


def _check_ids(topk_ids: Tensor, num_experts: int) -> None:
    _check_tensor(topk_ids, "topk_ids", dtype=torch.int32, dim=2)
    _check_device(topk_ids, "topk_ids")
    _check(num_experts >= 1, "num_experts must be positive")


@torch.library.custom_op("dsfp4::moe_permute", mutates_args=())
def moe_permute(x: Tensor, topk_ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Groups the rows of x [T, H] by expert: returns (x_perm [T·k, H], row_offsets int32 [E+1],
    perm int32 [T·k]) with x_perm[r] = x[perm[r] // k]. Ids outside [0, E) are dropped (their
    pairs land in no group and the combine ignores them)."""
    _check_tensor(x, "x", dim=2)
    _check_ids(topk_ids, num_experts)
    _check(topk_ids.shape[0] == x.shape[0], f"topk_ids has {topk_ids.shape[0]} rows, x has {x.shape[0]}")
    _check(topk_ids.device == x.device, "x and topk_ids must be on the same device")
    _check(num_experts <= 1024, "at most 1024 experts are supported")
    t, k = topk_ids.shape
    on_cuda = x.device.type == "cuda"
    x_perm = torch.empty(t * k, x.shape[1], dtype=x.dtype, device=x.device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=x.device)
    perm = torch.empty(t * k, dtype=torch.int32, device=x.device)
    _check(x.shape[1] > 0, "x must have at least one column")
    if on_cuda:
        _check((x.element_size() * x.shape[1]) % 16 == 0,
               f"rows of x must be a multiple of 16 bytes, got {tuple(x.shape)}")
    _C.moe_permute(x.data_ptr(), x.element_size() * x.shape[1], topk_ids.data_ptr(), t, k, num_experts,
                   x_perm.data_ptr(), offsets.data_ptr(), perm.data_ptr(), 0, on_cuda, stream_of(x))
    return x_perm, offsets, perm


@moe_permute.register_fake
def _(x, topk_ids, num_experts):
    t, k = topk_ids.shape
    return (x.new_empty(t * k, x.shape[1]), x.new_empty(num_experts + 1, dtype=torch.int32),
            x.new_empty(t * k, dtype=torch.int32))


@torch.library.custom_op("dsfp4::moe_compact_groups", mutates_args=())
def moe_compact_groups(row_offsets: Tensor, max_groups: int) -> Tuple[Tensor, Tensor]:
    """The experts that received rows, compacted for the grouped GEMM.

    row_offsets int32 [E+1] (from moe_permute) → (group_expert int32 [max_groups]: the experts
    with rows in ascending order, then -1; group_offsets int32 [max_groups+1]: their row ranges,
    empty past the last). max_groups = min(E, T·k) covers every case, so the grouped GEMM can
    launch that many groups instead of E, with no host sync.
    """
    _check_tensor(row_offsets, "row_offsets", dtype=torch.int32, dim=1)
    _check_device(row_offsets, "row_offsets")
    e = row_offsets.numel() - 1
    _check(e >= 1, "row_offsets needs at least 2 entries")
    _check(max_groups >= 1, "max_groups must be positive")
    ge = torch.empty(max_groups, dtype=torch.int32, device=row_offsets.device)
    go = torch.empty(max_groups + 1, dtype=torch.int32, device=row_offsets.device)
    _C.moe_compact_groups(row_offsets.data_ptr(), e, max_groups, ge.data_ptr(), go.data_ptr(),
                          row_offsets.device.type == "cuda", stream_of(row_offsets))
    return ge, go


@moe_compact_groups.register_fake
def _(row_offsets, max_groups):
    return (row_offsets.new_empty(max_groups, dtype=torch.int32),
            row_offsets.new_empty(max_groups + 1, dtype=torch.int32))


@torch.library.custom_op("dsfp4::moe_combine", mutates_args=())
def moe_combine(y_perm: Tensor, perm: Tensor, topk_weights: Tensor, row_offsets: Tensor) -> Tensor:
    """out[t] = Σ_j topk_weights[t, j] · y_perm[row of pair (t, j)], accumulated in float32,
    returned in y_perm's dtype. Pairs outside every group (dropped ids) contribute nothing.
    An invalid perm (row_offsets[-1] outside [0, T·k], an entry outside [0, T·k), an entry
    repeated) raises ValueError on the CPU; on CUDA, where checking would sync the host, the
    kernel never follows it out of bounds and returns all-NaN output instead."""
    _check_tensor(y_perm, "y_perm", dtype=(torch.bfloat16, torch.float32), dim=2)
    _check_device(y_perm, "y_perm")
    _check_tensor(perm, "perm", dtype=torch.int32, dim=1, device=y_perm.device)
    _check_tensor(topk_weights, "topk_weights", dtype=torch.float32, dim=2, device=y_perm.device)
    _check_tensor(row_offsets, "row_offsets", dtype=torch.int32, dim=1, device=y_perm.device)
    t, k = topk_weights.shape
    _check(perm.numel() == t * k and y_perm.shape[0] == t * k,
           f"y_perm has {y_perm.shape[0]} rows and perm {perm.numel()}, expected T·k = {t * k}")
    h = y_perm.shape[1]
    _check(h > 0, "y_perm must have at least one column")
    _check(row_offsets.numel() >= 2, "row_offsets needs at least 2 entries")
    on_cuda = y_perm.device.type == "cuda"
    out = torch.empty(t, h, dtype=y_perm.dtype, device=y_perm.device)
    if t > 0:
        ws = torch.empty(_C.moe_combine_workspace_bytes(t, k) if on_cuda else 1, dtype=torch.uint8,
                         device=y_perm.device)
        _C.moe_combine(y_perm.data_ptr(), _ext.DTYPE_TO_C[y_perm.dtype], perm.data_ptr(), topk_weights.data_ptr(),
                       row_offsets.data_ptr(), row_offsets.numel() - 1, t, k, h, out.data_ptr(), ws.data_ptr(),
                       on_cuda, stream_of(y_perm))
    return out


@moe_combine.register_fake
def _(y_perm, perm, topk_weights, row_offsets):
    return y_perm.new_empty(topk_weights.shape[0], y_perm.shape[1])


@torch.library.custom_op("dsfp4::silu_mul", mutates_args=())
def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [R, 2I] (gate first, then up) → silu(gate) · up [R, I], computed in float32."""
    _check_tensor(gate_up, "gate_up", dtype=(torch.bfloat16, torch.float32), dim=2)
    _check_device(gate_up, "gate_up")
    _check(gate_up.shape[1] % 2 == 0, f"gate_up has odd width {gate_up.shape[1]}")
    i = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], i, dtype=gate_up.dtype, device=gate_up.device)
    if gate_up.shape[0] > 0 and i > 0:
        _C.silu_mul(gate_up.data_ptr(), _ext.DTYPE_TO_C[gate_up.dtype], gate_up.shape[0], i, out.data_ptr(),
                    gate_up.device.type == "cuda", stream_of(gate_up))
    return out


@silu_mul.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
