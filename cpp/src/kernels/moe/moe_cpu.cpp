// CPU references of the MoE kernels (what moe.cu computes).
#include <cmath>
#include <cstring>
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

Status moe_permute_cpu(const void* x, int64_t row_bytes, const int32_t* topk_ids, int64_t tokens, int top_k,
                       int experts, void* x_perm, int32_t* row_offsets, int32_t* perm) {
  if (experts <= 0 || experts > 1024) return InvalidArgument("moe_permute: experts must be in [1, 1024]");
  if (top_k <= 0 || tokens < 0) return InvalidArgument("moe_permute: top_k must be positive, tokens non-negative");
  if (row_bytes <= 0) return InvalidArgument("moe_permute: rows of x must have a positive size");
  if (!row_offsets || (tokens > 0 && (!x || !topk_ids || !x_perm || !perm)))
    return InvalidArgument("moe_permute: null pointer");
  const int64_t pairs = tokens * top_k;
  std::vector<int64_t> count(static_cast<size_t>(experts) + 1, 0);  // the last bin: dropped pairs
  auto bin = [&](int64_t pi) {
    const int32_t id = topk_ids[pi];
    return (id >= 0 && id < experts) ? id : experts;
  };
  for (int64_t pi = 0; pi < pairs; ++pi) ++count[bin(pi)];
  std::vector<int64_t> next(static_cast<size_t>(experts) + 1, 0);
  for (int e = 0; e < experts; ++e) next[e + 1] = next[e] + count[e];
  for (int e = 0; e <= experts; ++e) row_offsets[e] = static_cast<int32_t>(next[e]);
  const auto* src = static_cast<const uint8_t*>(x);
  auto* dst = static_cast<uint8_t*>(x_perm);
  for (int64_t pi = 0; pi < pairs; ++pi) {  // pair order within a bin: a stable sort
    const int64_t r = next[bin(pi)]++;
    perm[r] = static_cast<int32_t>(pi);
    std::memcpy(dst + r * row_bytes, src + (pi / top_k) * row_bytes, static_cast<size_t>(row_bytes));
  }
  return Status::Ok();
}

Status moe_compact_groups_cpu(const int32_t* row_offsets, int experts, int max_groups, int32_t* group_expert,
                              int32_t* group_offsets) {
  if (experts <= 0 || max_groups <= 0) return InvalidArgument("moe_compact_groups: experts and max_groups must be positive");
  if (!row_offsets || !group_expert || !group_offsets) return InvalidArgument("moe_compact_groups: null pointer");
  int j = 0;
  for (int e = 0; e < experts && j < max_groups; ++e) {
    if (row_offsets[e + 1] > row_offsets[e]) {
      group_expert[j] = e;
      group_offsets[j] = row_offsets[e];
      ++j;
    }
  }
  for (; j < max_groups; ++j) {
    group_expert[j] = -1;
    group_offsets[j] = row_offsets[experts];
  }
  group_offsets[max_groups] = row_offsets[experts];
  return Status::Ok();
}

Status moe_combine_cpu(const void* y_perm, DType dtype, const int32_t* perm, const float* topk_weights,
                       const int32_t* row_offsets, int experts, int64_t tokens, int top_k, int64_t hidden, void* out) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat32)
    return InvalidArgument("moe_combine: y_perm must be bfloat16 or float32");
  if (experts <= 0 || top_k <= 0 || hidden <= 0 || tokens < 0) return InvalidArgument("moe_combine: bad sizes");
  if (!row_offsets || (tokens > 0 && (!y_perm || !perm || !topk_weights || !out)))
    return InvalidArgument("moe_combine: null pointer");
  const int64_t pairs = tokens * top_k;
  const int64_t valid = row_offsets[experts];
  const std::string bound = "T·k = " + std::to_string(pairs);
  if (valid < 0 || valid > pairs)
    return InvalidArgument("moe_combine: row_offsets[experts] = " + std::to_string(valid) + " is outside [0, " +
                           bound + "]");
  std::vector<int64_t> row_of(static_cast<size_t>(pairs), -1);
  for (int64_t r = 0; r < valid; ++r) {
    const int64_t p = perm[r];
    if (p < 0 || p >= pairs)
      return InvalidArgument("moe_combine: perm[" + std::to_string(r) + "] = " + std::to_string(p) +
                             " is outside [0, " + bound + ")");
    if (row_of[p] >= 0)  // the CUDA kernel flags this too: a pair held by two rows is not a permutation
      return InvalidArgument("moe_combine: perm names pair " + std::to_string(p) + " twice (rows " +
                             std::to_string(row_of[p]) + " and " + std::to_string(r) + ")");
    row_of[p] = r;
  }
  const bool bf16 = dtype == DType::kBFloat16;
  auto load = [&](int64_t i) {
    return bf16 ? fmt::bf16_bits_to_float(static_cast<const uint16_t*>(y_perm)[i]) : static_cast<const float*>(y_perm)[i];
  };
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < hidden; ++h) {
      float acc = 0.0f;  // slot order j = 0..top_k-1, as the kernel
      for (int j = 0; j < top_k; ++j) {
        const int64_t r = row_of[t * top_k + j];
        if (r >= 0) acc += topk_weights[t * top_k + j] * load(r * hidden + h);
      }
      if (bf16)
        static_cast<uint16_t*>(out)[t * hidden + h] = fmt::float_to_bf16_bits(acc);
      else
        static_cast<float*>(out)[t * hidden + h] = acc;
    }
  return Status::Ok();
}

Status silu_mul_cpu(const void* gate_up, DType dtype, int64_t rows, int64_t inter, void* out) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat32)
    return InvalidArgument("silu_mul: gate_up must be bfloat16 or float32");
  if (rows < 0 || inter <= 0) return InvalidArgument("silu_mul: bad sizes");
  if (rows > 0 && (!gate_up || !out)) return InvalidArgument("silu_mul: null pointer");
  const bool bf16 = dtype == DType::kBFloat16;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < inter; ++c) {
      const int64_t gi = r * 2 * inter + c, ui = gi + inter;
      const float g = bf16 ? fmt::bf16_bits_to_float(static_cast<const uint16_t*>(gate_up)[gi])
                           : static_cast<const float*>(gate_up)[gi];
      const float u = bf16 ? fmt::bf16_bits_to_float(static_cast<const uint16_t*>(gate_up)[ui])
                           : static_cast<const float*>(gate_up)[ui];
      const float v = g / (1.0f + std::exp(-g)) * u;
      if (bf16)
        static_cast<uint16_t*>(out)[r * inter + c] = fmt::float_to_bf16_bits(v);
      else
        static_cast<float*>(out)[r * inter + c] = v;
    }
  return Status::Ok();
}

}  // namespace dsfp4
