// CPU reference of the noaux_tc routing (what moe_route_cuda computes).
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "dsfp4/moe.h"
#include "kernels/nvfp4/nvfp4_format.h"

namespace dsfp4 {

Status moe_route_check(const MoeRouteParams& p) {
  if (p.tokens < 0) return InvalidArgument("moe_route: tokens must be non-negative");
  if (p.experts <= 0 || p.experts > 1024) return InvalidArgument("moe_route: experts must be in [1, 1024]");
  if (p.n_group <= 0 || p.experts % p.n_group != 0)
    return InvalidArgument("moe_route: n_group = " + std::to_string(p.n_group) + " must divide experts = " +
                           std::to_string(p.experts));
  if (p.experts / p.n_group < 2) return InvalidArgument("moe_route: each group needs at least 2 experts");
  if (p.n_group > 32) return InvalidArgument("moe_route: at most 32 groups are supported");
  if (p.topk_group < 1 || p.topk_group > p.n_group)
    return InvalidArgument("moe_route: topk_group must be in [1, n_group]");
  if (p.top_k < 1 || p.top_k > 32 || p.top_k > p.topk_group * (p.experts / p.n_group))
    return InvalidArgument("moe_route: top_k must be in [1, min(32, experts of the kept groups)]");
  return Status::Ok();
}

Status moe_route_cpu(const void* logits, DType logits_dtype, const float* bias, const MoeRouteParams& p,
                     float* topk_weights, int32_t* topk_ids) {
  DSFP4_RETURN_IF_ERROR(moe_route_check(p));
  if (logits_dtype != DType::kFloat32 && logits_dtype != DType::kBFloat16)
    return InvalidArgument("moe_route: router logits must be float32 or bfloat16");
  if (!logits || !bias || !topk_weights || !topk_ids) return InvalidArgument("moe_route: null pointer");
  const int e = p.experts, gs = e / p.n_group;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> s(e), c(e), gscore(p.n_group);
  std::vector<char> keep(p.n_group), taken(e);
  for (int64_t t = 0; t < p.tokens; ++t) {
    for (int i = 0; i < e; ++i) {
      const float x = logits_dtype == DType::kFloat32
                          ? static_cast<const float*>(logits)[t * e + i]
                          : fmt::bf16_bits_to_float(static_cast<const uint16_t*>(logits)[t * e + i]);
      s[i] = 1.0f / (1.0f + std::exp(-x));
      c[i] = s[i] + bias[i];
    }
    for (int g = 0; g < p.n_group; ++g) {
      float m1 = neg_inf, m2 = neg_inf;
      for (int i = g * gs; i < (g + 1) * gs; ++i) {
        if (c[i] > m1) {
          m2 = m1;
          m1 = c[i];
        } else if (c[i] > m2) {
          m2 = c[i];
        }
      }
      gscore[g] = m1 + m2;
      keep[g] = 0;
    }
    for (int r = 0; r < p.topk_group; ++r) {
      int best = -1;
      for (int g = 0; g < p.n_group; ++g)
        if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
      keep[best] = 1;
    }
    for (int i = 0; i < e; ++i) taken[i] = 0;
    float sum = 0.0f;
    for (int r = 0; r < p.top_k; ++r) {
      int best = -1;
      for (int i = 0; i < e; ++i)
        if (keep[i / gs] && !taken[i] && (best < 0 || c[i] > c[best])) best = i;
      taken[best] = 1;
      topk_ids[t * p.top_k + r] = best;
      topk_weights[t * p.top_k + r] = s[best];
      sum += s[best];
    }
    for (int r = 0; r < p.top_k; ++r) {
      float w = topk_weights[t * p.top_k + r];
      if (p.norm_topk_prob) w = w / (sum + 1e-20f);
      topk_weights[t * p.top_k + r] = w * p.routed_scaling_factor;
    }
  }
  return Status::Ok();
}

}  // namespace dsfp4
