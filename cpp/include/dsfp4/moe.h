// MoE building blocks: DeepSeek noaux_tc routing, token permutation by expert, SiLU·mul and
// the weighted combine. The grouped expert GEMM is fp4_grouped_gemm_cuda (fp4_gemm.h); the
// whole expert FFN is moe_experts_cuda (moe_experts.h). Each *_cuda entry point has a *_cpu
// reference that defines what it computes.
//
// Routing of token t over E experts in n_group groups:
//   s = sigmoid(logit), c = s + correction_bias (the bias only steers the choice);
//   group score = sum of the 2 largest c of the group; the topk_group best groups are kept;
//   the top_k largest c among kept groups are selected (ties: lower index first), in
//   descending order of c; weight = s, divided by the sum of the selected s (+1e-20) when
//   norm_topk_prob, times routed_scaling_factor.
// Permutation: the T·top_k (token, slot) pairs are sorted by expert, stably in pair order;
//   rows row_offsets[e]..row_offsets[e+1] of x_perm belong to expert e, and perm[r] is the
//   pair index t·top_k + j held by row r. Pairs whose id is outside [0, E) are dropped.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dsfp4/common.h"

namespace dsfp4 {

struct MoeRouteParams {
  int64_t tokens = 0;
  int experts = 0;     // ≤ 1024, a multiple of n_group, ≥ 2 experts per group
  int top_k = 0;       // ≤ 32
  int n_group = 1;
  int topk_group = 1;
  float routed_scaling_factor = 1.0f;
  bool norm_topk_prob = true;
};

Status moe_route_check(const MoeRouteParams& p);

// logits [tokens, experts] (float32 or bfloat16), bias [experts] float32 →
// topk_weights [tokens, top_k] float32, topk_ids [tokens, top_k] int32.
Status moe_route_cpu(const void* logits, DType logits_dtype, const float* bias, const MoeRouteParams& p,
                     float* topk_weights, int32_t* topk_ids);
Status moe_route_cuda(const void* logits, DType logits_dtype, const float* bias, const MoeRouteParams& p,
                      float* topk_weights, int32_t* topk_ids, Stream stream);

// x [tokens, row_bytes] (any dtype, rows 16-byte aligned), topk_ids [tokens, top_k] →
// x_perm [tokens·top_k, row_bytes], row_offsets [experts+1], perm [tokens·top_k]. Rows past
// row_offsets[experts] (dropped pairs) are left unwritten.
size_t moe_permute_workspace_bytes(int experts);
Status moe_permute_cuda(const void* x, int64_t row_bytes, const int32_t* topk_ids, int64_t tokens, int top_k,
                        int experts, void* x_perm, int32_t* row_offsets, int32_t* perm, void* workspace,
                        Stream stream);
// CPU: also fills the rows past row_offsets[experts] (dropped pairs, in pair order); rows need
// no alignment.
Status moe_permute_cpu(const void* x, int64_t row_bytes, const int32_t* topk_ids, int64_t tokens, int top_k,
                       int experts, void* x_perm, int32_t* row_offsets, int32_t* perm);

// The experts that received rows, compacted: group_expert[j] is the j-th expert with rows
// (ascending; -1 past the last) and group_offsets[j]..group_offsets[j+1] its rows of x_perm.
// With max_groups = min(experts, tokens·top_k) the grouped GEMM launches only that many groups.
Status moe_compact_groups_cuda(const int32_t* row_offsets, int experts, int max_groups, int32_t* group_expert,
                               int32_t* group_offsets, Stream stream);
Status moe_compact_groups_cpu(const int32_t* row_offsets, int experts, int max_groups, int32_t* group_expert,
                              int32_t* group_offsets);

// out[t] = Σ_j topk_weights[t, j] · y_perm[row of pair (t, j)], accumulated in float32.
// y_perm, out: bfloat16 or float32 [., hidden]. workspace: moe_combine_workspace_bytes().
// Rows r < row_offsets[experts] hold pair perm[r]. An invalid permutation (a row count outside
// [0, tokens·top_k], a pair outside [0, tokens·top_k), a pair named twice) is kInvalidArgument
// on the CPU; the CUDA kernel never follows it out of bounds and makes every output NaN instead
// (checking it on the host would need a sync).
size_t moe_combine_workspace_bytes(int64_t tokens, int top_k);
Status moe_combine_cuda(const void* y_perm, DType dtype, const int32_t* perm, const float* topk_weights,
                        const int32_t* row_offsets, int experts, int64_t tokens, int top_k, int64_t hidden,
                        void* out, void* workspace, Stream stream);
Status moe_combine_cpu(const void* y_perm, DType dtype, const int32_t* perm, const float* topk_weights,
                       const int32_t* row_offsets, int experts, int64_t tokens, int top_k, int64_t hidden, void* out);

// gate_up [rows, 2·inter] (gate then up) → out [rows, inter] = silu(gate)·up, float32 math;
// bfloat16 or float32.
Status silu_mul_cuda(const void* gate_up, DType dtype, int64_t rows, int64_t inter, void* out, Stream stream);
Status silu_mul_cpu(const void* gate_up, DType dtype, int64_t rows, int64_t inter, void* out);

}  // namespace dsfp4
