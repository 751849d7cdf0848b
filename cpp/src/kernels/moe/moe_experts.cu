// The expert FFN on the GPU: moe_permute → moe_compact_groups → grouped GEMM (gate_up) →
// silu_mul → grouped GEMM (down) → moe_combine, all queued on one stream without host sync.
#include <cuda_runtime.h>

#include <string>

#include "dsfp4/moe.h"
#include "dsfp4/moe_experts.h"
#include "kernels/cuda_check.h"
#include "kernels/moe/moe_experts_common.h"

namespace dsfp4 {

namespace {

Status check_common(const MoeExpertsParams& p, const void* x, const float* w, const int32_t* ids, void* out,
                    void* workspace, size_t workspace_bytes) {
  DSFP4_RETURN_IF_ERROR(moe_experts_check(p));
  if (p.tokens == 0) return Status::Ok();
  if (!x || !w || !ids || !out) return InvalidArgument("moe_experts: null pointer");
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return InvalidArgument("moe_experts: x must be 16-byte aligned");
  const size_t need = moe_experts_workspace_bytes(p);
  if (workspace == nullptr || workspace_bytes < need)
    return InvalidArgument("moe_experts: workspace of " + std::to_string(workspace_bytes) + " bytes is smaller than " +
                           std::to_string(need));
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0)
    return InvalidArgument("moe_experts: workspace must be 256-byte aligned");
  return Status::Ok();
}

template <typename T>
T* at(void* base, int64_t off) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + off);
}

// The pipeline over checked arguments. Group j runs expert gexp[j] from slot gexp[j] (a token
// picks an expert at most once). zero_y: clear the down GEMM's output first, for weights whose
// groups may be skipped (unit address 0) and must then contribute zero.
Status run_experts(const MoeExpertsParams& p, const Fp4GroupedWeight& gate_up, const Fp4GroupedWeight& down,
                   const void* x, const float* topk_weights, const int32_t* topk_ids, void* out, void* workspace,
                   bool zero_y, cudaStream_t s) {
  const auto ws = detail::experts_workspace(p);
  const int64_t P = ws.pairs, H = p.hidden, I = p.inter;
  const int G = static_cast<int>(ws.max_groups);
  auto* xp = at<void>(workspace, ws.x_perm);
  auto* offs = at<int32_t>(workspace, ws.row_offsets);
  auto* perm = at<int32_t>(workspace, ws.perm);
  auto* gexp = at<int32_t>(workspace, ws.group_expert);
  auto* goff = at<int32_t>(workspace, ws.group_offsets);
  auto* gu = at<void>(workspace, ws.gate_up);
  auto* h = at<void>(workspace, ws.h);
  auto* y = at<void>(workspace, ws.y_perm);
  DSFP4_RETURN_IF_ERROR(moe_permute_cuda(x, H * 2, topk_ids, p.tokens, p.top_k, p.experts, xp, offs, perm, nullptr, s));
  DSFP4_RETURN_IF_ERROR(moe_compact_groups_cuda(offs, p.experts, G, gexp, goff, s));
  // A skipped group's gate_up rows are left as they were; its down GEMM is skipped too (same
  // address), so only y needs clearing.
  if (zero_y) DSFP4_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(y, 0, P * H * 2, s), "moe_experts: memset"));
  DSFP4_RETURN_IF_ERROR(fp4_grouped_gemm_cuda(gate_up, G, gexp, goff, p.tokens, xp, H, gu, 2 * I, 0, s));
  DSFP4_RETURN_IF_ERROR(silu_mul_cuda(gu, DType::kBFloat16, P, I, h, s));
  DSFP4_RETURN_IF_ERROR(fp4_grouped_gemm_cuda(down, G, gexp, goff, p.tokens, h, I, y, H, 0, s));
  return moe_combine_cuda(y, DType::kBFloat16, perm, topk_weights, offs, p.experts, p.tokens, p.top_k, H, out,
                          at<void>(workspace, ws.combine), s);
}

}  // namespace

Status moe_experts_cuda(const MoeExpertsParams& p, const Fp4GroupedWeight& gate_up, const Fp4GroupedWeight& down,
                        const void* x, const float* topk_weights, const int32_t* topk_ids, void* out,
                        void* workspace, size_t workspace_bytes, Stream stream) {
  DSFP4_RETURN_IF_ERROR(check_common(p, x, topk_weights, topk_ids, out, workspace, workspace_bytes));
  if (gate_up.n != 2 * p.inter || gate_up.k != p.hidden || down.n != p.hidden || down.k != p.inter)
    return InvalidArgument("moe_experts: weights must be gate_up [2·inter, hidden] and down [hidden, inter]");
  if (p.tokens == 0) return Status::Ok();
  // Resident weights with unit addresses may skip groups as well.
  const bool skips = gate_up.unit_addr != nullptr || down.unit_addr != nullptr;
  return run_experts(p, gate_up, down, x, topk_weights, topk_ids, out, workspace, skips,
                     static_cast<cudaStream_t>(stream));
}

Status moe_experts_units_cuda(const MoeExpertsParams& p, const ExpertTable& table, const void* x,
                              const float* topk_weights, const int32_t* topk_ids, void* out, void* workspace,
                              size_t workspace_bytes, Stream stream) {
  DSFP4_RETURN_IF_ERROR(check_common(p, x, topk_weights, topk_ids, out, workspace, workspace_bytes));
  DSFP4_RETURN_IF_ERROR(detail::check_expert_table(p, table));
  if (p.tokens == 0) return Status::Ok();
  Fp4GroupedWeight gate_up, down;
  detail::unit_weights(p, table, &gate_up, &down);
  return run_experts(p, gate_up, down, x, topk_weights, topk_ids, out, workspace, true,
                     static_cast<cudaStream_t>(stream));
}

}  // namespace dsfp4
