// Workspace carving and the unit-table weights shared by the CPU and CUDA expert runners.
// Internal header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "dsfp4/expert_source.h"
#include "dsfp4/fp4_gemm.h"
#include "dsfp4/moe.h"
#include "dsfp4/moe_experts.h"

namespace dsfp4 {
namespace detail {

inline int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

// Offsets (bytes) of the runner's buffers in the workspace.
struct ExpertsWorkspace {
  int64_t x_perm, row_offsets, perm, group_expert, group_offsets, gate_up, h, y_perm, combine;
  int64_t total;
  int64_t pairs, max_groups;
};

inline ExpertsWorkspace experts_workspace(const MoeExpertsParams& p) {
  ExpertsWorkspace w{};
  const int64_t P = p.tokens * p.top_k;
  w.pairs = P;
  w.max_groups = P < p.experts ? P : p.experts;
  if (w.max_groups < 1) w.max_groups = 1;
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off += align256(bytes > 0 ? bytes : 1);
    return at;
  };
  w.x_perm = take(P * p.hidden * 2);
  w.row_offsets = take((p.experts + 1) * 4);
  w.perm = take(P * 4);
  w.group_expert = take(w.max_groups * 4);
  w.group_offsets = take((w.max_groups + 1) * 4);
  w.gate_up = take(P * 2 * p.inter * 2);
  w.h = take(P * p.inter * 2);
  w.y_perm = take(P * p.hidden * 2);
  w.combine = take(static_cast<int64_t>(moe_combine_workspace_bytes(p.tokens, p.top_k)));
  w.total = off;
  return w;
}

// Checks a table against the layer (moe_experts_check(p) passed).
inline Status check_expert_table(const MoeExpertsParams& p, const ExpertTable& table) {
  if (table.unit_addr == nullptr) return InvalidArgument("moe_experts: expert table has no unit addresses");
  if (table.num_experts != p.experts)
    return InvalidArgument("moe_experts: expert table holds " + std::to_string(table.num_experts) +
                           " experts, the layer has " + std::to_string(p.experts));
  return check_expert_unit_layout(table.layout, p.hidden, p.inter);
}

// gate_up and down as grouped weights read through the table: expert e is slot e.
inline void unit_weights(const MoeExpertsParams& p, const ExpertTable& table, Fp4GroupedWeight* gate_up,
                         Fp4GroupedWeight* down) {
  const ExpertUnitLayout& L = table.layout;
  *gate_up = Fp4GroupedWeight();
  gate_up->unit_addr = table.unit_addr;
  gate_up->unit_qweight = L.gate_up_qweight;
  gate_up->unit_qscale = L.gate_up_qscale;
  gate_up->unit_scale = L.gate_up_global_scale;
  gate_up->unit_scale_per_tile = L.gate_up_scale_per_tile;
  gate_up->n = 2 * p.inter;
  gate_up->k = p.hidden;
  *down = Fp4GroupedWeight();
  down->unit_addr = table.unit_addr;
  down->unit_qweight = L.down_qweight;
  down->unit_qscale = L.down_qscale;
  down->unit_scale = L.down_global_scale;
  down->unit_scale_per_tile = L.down_scale_per_tile;
  down->n = p.hidden;
  down->k = p.inter;
}

}  // namespace detail
}  // namespace dsfp4
