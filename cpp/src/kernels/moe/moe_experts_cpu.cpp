// CPU reference of the expert FFN: the same composition as moe_experts_cuda, over the CPU
// references of each step. Also the shared argument checks.
#include <string>
#include <vector>

#include "dsfp4/moe.h"
#include "dsfp4/moe_experts.h"
#include "dsfp4/nvfp4.h"
#include "kernels/moe/moe_experts_common.h"

namespace dsfp4 {

Status moe_experts_check(const MoeExpertsParams& p) {
  if (p.tokens < 0) return InvalidArgument("moe_experts: tokens must be non-negative");
  if (p.hidden <= 0 || p.hidden % 16 != 0)
    return InvalidArgument("moe_experts: hidden = " + std::to_string(p.hidden) + " must be a positive multiple of 16");
  if (p.inter <= 0 || p.inter % 16 != 0)
    return InvalidArgument("moe_experts: inter = " + std::to_string(p.inter) + " must be a positive multiple of 16");
  if (p.experts <= 0 || p.experts > 1024) return InvalidArgument("moe_experts: experts must be in [1, 1024]");
  if (p.top_k <= 0 || p.top_k > p.experts) return InvalidArgument("moe_experts: top_k must be in [1, experts]");
  return Status::Ok();
}

size_t moe_experts_workspace_bytes(const MoeExpertsParams& p) {
  if (!moe_experts_check(p).ok()) return 0;
  return static_cast<size_t>(detail::experts_workspace(p).total);
}

Status check_expert_unit_layout(const ExpertUnitLayout& l, int64_t hidden, int64_t inter) {
  if (l.hidden != hidden || l.inter != inter)
    return InvalidArgument("expert unit layout: experts are [hidden " + std::to_string(l.hidden) + ", inter " +
                           std::to_string(l.inter) + "], expected [" + std::to_string(hidden) + ", " +
                           std::to_string(inter) + "]");
  const struct {
    const char* name;
    int64_t off;
    int align;
  } parts[] = {{"gate_up_qweight", l.gate_up_qweight, 16}, {"gate_up_qscale", l.gate_up_qscale, 16},
               {"gate_up_global_scale", l.gate_up_global_scale, 4}, {"down_qweight", l.down_qweight, 16},
               {"down_qscale", l.down_qscale, 16}, {"down_global_scale", l.down_global_scale, 4}};
  for (const auto& part : parts)
    if (part.off < 0 || part.off % part.align != 0)
      return InvalidArgument(std::string("expert unit layout: ") + part.name + " offset " + std::to_string(part.off) +
                             " must be non-negative and " + std::to_string(part.align) + "-byte aligned");
  if (l.bytes < 0) return InvalidArgument("expert unit layout: bytes = " + std::to_string(l.bytes) + " is negative");
  if (l.bytes == 0) return Status::Ok();
  const int64_t gu_tiles = l.gate_up_scale_per_tile ? (2 * inter + 15) / 16 : 1;
  const int64_t dn_tiles = l.down_scale_per_tile ? (hidden + 15) / 16 : 1;
  const int64_t ends[6] = {l.gate_up_qweight + static_cast<int64_t>(tiled_weight_bytes(2 * inter, hidden)),
                           l.gate_up_qscale + static_cast<int64_t>(tiled_scale_bytes(2 * inter, hidden)),
                           l.gate_up_global_scale + 4 * gu_tiles,
                           l.down_qweight + static_cast<int64_t>(tiled_weight_bytes(hidden, inter)),
                           l.down_qscale + static_cast<int64_t>(tiled_scale_bytes(hidden, inter)),
                           l.down_global_scale + 4 * dn_tiles};
  for (int i = 0; i < 6; ++i)
    if (ends[i] > l.bytes)
      return InvalidArgument(std::string("expert unit layout: ") + parts[i].name + " ends at byte " +
                             std::to_string(ends[i]) + ", past the unit's " + std::to_string(l.bytes) + " bytes");
  return Status::Ok();
}

namespace {
// The pipeline over checked arguments. Rows of y that no group writes (a skipped unit) stay
// zero and so contribute nothing.
Status run_experts_cpu(const MoeExpertsParams& p, const Fp4GroupedWeight& gate_up, const Fp4GroupedWeight& down,
                       const void* x, const float* topk_weights, const int32_t* topk_ids, void* out) {
  const int64_t P = p.tokens * p.top_k, H = p.hidden, I = p.inter;
  const int G = static_cast<int>(P < p.experts ? P : p.experts);
  std::vector<uint16_t> x_perm(P * H), gu(P * 2 * I), h(P * I), y(P * H);
  std::vector<int32_t> offsets(p.experts + 1), perm(P), gexp(G), goff(G + 1);
  DSFP4_RETURN_IF_ERROR(moe_permute_cpu(x, H * 2, topk_ids, p.tokens, p.top_k, p.experts, x_perm.data(),
                                        offsets.data(), perm.data()));
  DSFP4_RETURN_IF_ERROR(moe_compact_groups_cpu(offsets.data(), p.experts, G, gexp.data(), goff.data()));
  DSFP4_RETURN_IF_ERROR(fp4_grouped_gemm_cpu(gate_up, p.experts, G, gexp.data(), goff.data(), P, x_perm.data(), H,
                                             gu.data(), 2 * I));
  DSFP4_RETURN_IF_ERROR(silu_mul_cpu(gu.data(), DType::kBFloat16, P, I, h.data()));
  DSFP4_RETURN_IF_ERROR(fp4_grouped_gemm_cpu(down, p.experts, G, gexp.data(), goff.data(), P, h.data(), I, y.data(), H));
  return moe_combine_cpu(y.data(), DType::kBFloat16, perm.data(), topk_weights, offsets.data(), p.experts, p.tokens,
                         p.top_k, H, out);
}
}  // namespace

Status moe_experts_cpu(const MoeExpertsParams& p, const Fp4GroupedWeight& gate_up, const Fp4GroupedWeight& down,
                       const void* x, const float* topk_weights, const int32_t* topk_ids, void* out) {
  DSFP4_RETURN_IF_ERROR(moe_experts_check(p));
  if (gate_up.n != 2 * p.inter || gate_up.k != p.hidden)
    return InvalidArgument("moe_experts: gate_up weights are [" + std::to_string(gate_up.n) + ", " +
                           std::to_string(gate_up.k) + "], expected [2·inter, hidden]");
  if (down.n != p.hidden || down.k != p.inter)
    return InvalidArgument("moe_experts: down weights are [" + std::to_string(down.n) + ", " + std::to_string(down.k) +
                           "], expected [hidden, inter]");
  if (p.tokens == 0) return Status::Ok();
  if (!x || !topk_weights || !topk_ids || !out) return InvalidArgument("moe_experts: null pointer");
  return run_experts_cpu(p, gate_up, down, x, topk_weights, topk_ids, out);
}

Status moe_experts_units_cpu(const MoeExpertsParams& p, const ExpertTable& table, const void* x,
                             const float* topk_weights, const int32_t* topk_ids, void* out) {
  DSFP4_RETURN_IF_ERROR(moe_experts_check(p));
  DSFP4_RETURN_IF_ERROR(detail::check_expert_table(p, table));
  if (p.tokens == 0) return Status::Ok();
  if (!x || !topk_weights || !topk_ids || !out) return InvalidArgument("moe_experts: null pointer");
  Fp4GroupedWeight gate_up, down;
  detail::unit_weights(p, table, &gate_up, &down);
  return run_experts_cpu(p, gate_up, down, x, topk_weights, topk_ids, out);
}

}  // namespace dsfp4
