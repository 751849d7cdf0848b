// The routed expert FFN of one MoE layer over NVFP4 experts, composed of the MoE entry points
// (moe.h) and the grouped FP4 GEMM (fp4_gemm.h):
//   x_perm, row_offsets, perm = moe_permute(x, topk_ids)
//   group_expert, group_offsets = moe_compact_groups(row_offsets, min(E, T·k))
//   h   = silu_mul(fp4_grouped_gemm(gate_up, x_perm))        gate_up: [2I, H] per expert
//   y   = fp4_grouped_gemm(down, h)                           down: [H, I] per expert
//   out = moe_combine(y, perm, topk_weights)
// x, every intermediate and out are bfloat16; the combine accumulates in float32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dsfp4/common.h"
#include "dsfp4/expert_source.h"
#include "dsfp4/fp4_gemm.h"

namespace dsfp4 {

struct MoeExpertsParams {
  int64_t tokens = 0;  // T
  int64_t hidden = 0;  // H, a multiple of 16
  int64_t inter = 0;   // I, a multiple of 16
  int experts = 0;     // E, at most 1024
  int top_k = 0;       // experts per token
};

Status moe_experts_check(const MoeExpertsParams& p);

// Workspace of moe_experts_cuda and moe_experts_units_cuda for T = p.tokens (enough for any
// smaller T); 0 when p is invalid.
size_t moe_experts_workspace_bytes(const MoeExpertsParams& p);

// Resident experts: expert e in slot e of gate_up (n = 2I, k = H) and down (n = H, k = I).
// x [T, H] bf16, topk_weights [T, top_k] float32, topk_ids [T, top_k] int32 (ids outside
// [0, E) contribute nothing), out [T, H] bf16. Device pointers; queued on `stream`, no host
// sync, safe under CUDA graph capture.
Status moe_experts_cuda(const MoeExpertsParams& p, const Fp4GroupedWeight& gate_up, const Fp4GroupedWeight& down,
                        const void* x, const float* topk_weights, const int32_t* topk_ids, void* out,
                        void* workspace, size_t workspace_bytes, Stream stream);

// Experts read from units (ExpertSource): the same pipeline, each grouped GEMM reading the
// experts in place through table.unit_addr (expert e is slot e). An expert whose unit address
// is zero or not 16-byte aligned contributes zero. The table must not change while the work
// queued here runs (both GEMMs must see the same addresses).
Status moe_experts_units_cuda(const MoeExpertsParams& p, const ExpertTable& table, const void* x,
                              const float* topk_weights, const int32_t* topk_ids, void* out, void* workspace,
                              size_t workspace_bytes, Stream stream);

// CPU reference of moe_experts_cuda (the same composition of the CPU references); host pointers.
Status moe_experts_cpu(const MoeExpertsParams& p, const Fp4GroupedWeight& gate_up, const Fp4GroupedWeight& down,
                       const void* x, const float* topk_weights, const int32_t* topk_ids, void* out);

// CPU reference of moe_experts_units_cuda; host pointers, table.unit_addr a host array of host
// addresses (a paging store in CPU mode serves such tables).
Status moe_experts_units_cpu(const MoeExpertsParams& p, const ExpertTable& table, const void* x,
                             const float* topk_weights, const int32_t* topk_ids, void* out);

}  // namespace dsfp4
