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
                    void* workspace, size_t workspace_bytes, bool from_units) {
  DSFP4_RETURN_IF_ERROR(moe_experts_check(p));
  if (p.tokens == 0) return Status::Ok();
  if (!x || !w || !ids || !out) return InvalidArgument("moe_experts: null pointer");
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return InvalidArgument("moe_experts: x must be 16-byte aligned");
  const size_t need = moe_experts_workspace_bytes(p, from_units);
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

// Stage the experts of groups [0, count) of this chunk into slots: block b copies the part of
// expert group_expert[b] (if any) and writes slot_of_group[b] (b, or -1 for none).
__global__ void stage_experts_kernel(const uint64_t* __restrict__ unit_addr, int num_experts,
                                     const int32_t* __restrict__ group_expert, int count, int64_t qweight_off,
                                     int64_t qweight_bytes, int64_t qscale_off, int64_t qscale_bytes, int64_t gs_off,
                                     int gs_count, int64_t slot_bytes, int64_t tiles, char* __restrict__ slots,
                                     float* __restrict__ scales, int32_t* __restrict__ slot_of_group) {
  const int b = blockIdx.x;
  if (b >= count) return;
  const int e = group_expert[b];
  uint64_t unit = (e >= 0 && e < num_experts) ? unit_addr[e] : 0;
  if (unit % 16 != 0) unit = 0;
  if (threadIdx.x == 0) slot_of_group[b] = unit != 0 ? b : -1;
  if (unit == 0) return;
  const char* u = reinterpret_cast<const char*>(unit);
  const uint4* qw = reinterpret_cast<const uint4*>(u + qweight_off);
  const uint4* qs = reinterpret_cast<const uint4*>(u + qscale_off);
  uint4* dst = reinterpret_cast<uint4*>(slots + b * slot_bytes);
  const int64_t nw = qweight_bytes / 16, ns = qscale_bytes / 16;
  for (int64_t i = threadIdx.x; i < nw; i += blockDim.x) dst[i] = qw[i];
  for (int64_t i = threadIdx.x; i < ns; i += blockDim.x) dst[nw + i] = qs[i];
  const float* gs = reinterpret_cast<const float*>(u + gs_off);
  for (int64_t t = threadIdx.x; t < tiles; t += blockDim.x) scales[b * tiles + t] = gs[gs_count == 1 ? 0 : t];
}

}  // namespace

Status moe_experts_cuda(const MoeExpertsParams& p, const Fp4GroupedWeight& gate_up, const Fp4GroupedWeight& down,
                        const void* x, const float* topk_weights, const int32_t* topk_ids, void* out,
                        void* workspace, size_t workspace_bytes, Stream stream) {
  DSFP4_RETURN_IF_ERROR(check_common(p, x, topk_weights, topk_ids, out, workspace, workspace_bytes, false));
  if (gate_up.n != 2 * p.inter || gate_up.k != p.hidden || down.n != p.hidden || down.k != p.inter)
    return InvalidArgument("moe_experts: weights must be gate_up [2·inter, hidden] and down [hidden, inter]");
  if (p.tokens == 0) return Status::Ok();
  const auto ws = detail::experts_workspace(p, false);
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
  DSFP4_RETURN_IF_ERROR(
      moe_permute_cuda(x, H * 2, topk_ids, p.tokens, p.top_k, p.experts, xp, offs, perm, nullptr, stream));
  DSFP4_RETURN_IF_ERROR(moe_compact_groups_cuda(offs, p.experts, G, gexp, goff, stream));
  // Group j runs expert gexp[j] from slot gexp[j]; a token picks an expert at most once.
  DSFP4_RETURN_IF_ERROR(fp4_grouped_gemm_cuda(gate_up, G, gexp, goff, p.tokens, xp, H, gu, 2 * I, 0, stream));
  DSFP4_RETURN_IF_ERROR(silu_mul_cuda(gu, DType::kBFloat16, P, I, h, stream));
  DSFP4_RETURN_IF_ERROR(fp4_grouped_gemm_cuda(down, G, gexp, goff, p.tokens, h, I, y, H, 0, stream));
  return moe_combine_cuda(y, DType::kBFloat16, perm, topk_weights, offs, p.experts, p.tokens, p.top_k, H, out,
                          at<void>(workspace, ws.combine), stream);
}

Status moe_experts_units_cuda(const MoeExpertsParams& p, const ExpertTable& table, const void* x,
                              const float* topk_weights, const int32_t* topk_ids, void* out, void* workspace,
                              size_t workspace_bytes, Stream stream) {
  DSFP4_RETURN_IF_ERROR(check_common(p, x, topk_weights, topk_ids, out, workspace, workspace_bytes, true));
  if (table.unit_addr == nullptr) return InvalidArgument("moe_experts: expert table has no unit addresses");
  if (table.num_experts != p.experts)
    return InvalidArgument("moe_experts: expert table holds " + std::to_string(table.num_experts) +
                           " experts, the layer has " + std::to_string(p.experts));
  DSFP4_RETURN_IF_ERROR(check_expert_unit_layout(table.layout, p.hidden, p.inter));
  if (p.tokens == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const auto ws = detail::experts_workspace(p, true);
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
  auto* slots = at<char>(workspace, ws.staged_slots);
  auto* scales = at<float>(workspace, ws.staged_scales);
  auto* slot_of_group = at<int32_t>(workspace, ws.staged_slot_of_group);
  DSFP4_RETURN_IF_ERROR(
      moe_permute_cuda(x, H * 2, topk_ids, p.tokens, p.top_k, p.experts, xp, offs, perm, nullptr, s));
  DSFP4_RETURN_IF_ERROR(moe_compact_groups_cuda(offs, p.experts, G, gexp, goff, s));

  // Rows of experts the source failed to provide stay zero and so contribute nothing.
  DSFP4_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(gu, 0, P * 2 * I * 2, s), "moe_experts: memset"));
  DSFP4_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(y, 0, P * H * 2, s), "moe_experts: memset"));
  const ExpertUnitLayout& L = table.layout;
  const detail::PartSizes gu_sz = detail::part_sizes(2 * I, H), dn_sz = detail::part_sizes(H, I);
  const int64_t slot_bytes = gu_sz.slot() > dn_sz.slot() ? gu_sz.slot() : dn_sz.slot();
  // One pass per weight: stage up to kStagedExperts experts, run their groups, next chunk.
  auto pass = [&](const detail::PartSizes& sz, int64_t qw_off, int64_t qs_off, int64_t gs_off, bool per_tile,
                  const void* in, int64_t ld_in, void* result, int64_t ld_out) -> Status {
    Fp4GroupedWeight w;
    w.qweight = reinterpret_cast<const uint32_t*>(slots);
    w.qscale = reinterpret_cast<const uint8_t*>(slots + sz.qweight);
    w.global_scale = scales;
    w.global_scale_per_tile = true;  // staged per tile either way
    w.qweight_slot_stride = slot_bytes / 4;
    w.qscale_slot_stride = slot_bytes;
    w.n = sz.n;
    w.k = sz.k;
    for (int j0 = 0; j0 < G; j0 += detail::kStagedExperts) {
      const int count = G - j0 < detail::kStagedExperts ? G - j0 : detail::kStagedExperts;
      stage_experts_kernel<<<count, 256, 0, s>>>(table.unit_addr, table.num_experts, gexp + j0, count, qw_off,
                                                 sz.qweight, qs_off, sz.qscale, gs_off, per_tile ? 0 : 1,
                                                 slot_bytes, sz.tiles, slots, scales, slot_of_group);
      DSFP4_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "moe_experts: staging kernel launch"));
      DSFP4_RETURN_IF_ERROR(
          fp4_grouped_gemm_cuda(w, count, slot_of_group, goff + j0, p.tokens, in, ld_in, result, ld_out, 0, s));
    }
    return Status::Ok();
  };
  DSFP4_RETURN_IF_ERROR(pass(gu_sz, L.gate_up_qweight, L.gate_up_qscale, L.gate_up_global_scale,
                             L.gate_up_scale_per_tile, xp, H, gu, 2 * I));
  DSFP4_RETURN_IF_ERROR(silu_mul_cuda(gu, DType::kBFloat16, P, I, h, s));
  DSFP4_RETURN_IF_ERROR(
      pass(dn_sz, L.down_qweight, L.down_qscale, L.down_global_scale, L.down_scale_per_tile, h, I, y, H));
  return moe_combine_cuda(y, DType::kBFloat16, perm, topk_weights, offs, p.experts, p.tokens, p.top_k, H, out,
                          at<void>(workspace, ws.combine), s);
}

}  // namespace dsfp4
