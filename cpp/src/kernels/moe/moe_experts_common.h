// Workspace carving shared by the CPU and CUDA expert runners. Internal header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "dsfp4/moe.h"
#include "dsfp4/moe_experts.h"
#include "dsfp4/nvfp4.h"

namespace dsfp4 {
namespace detail {

inline int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

// Experts staged per grouped GEMM launch when reading from units.
constexpr int kStagedExperts = 8;

// One expert part (gate_up or down) as staged: qweight, qscale, then per-tile global scales.
struct PartSizes {
  int64_t n, k, qweight, qscale, tiles;
  int64_t slot() const { return align256(qweight + qscale); }
};
inline PartSizes part_sizes(int64_t n, int64_t k) {
  return {n, k, static_cast<int64_t>(tiled_weight_bytes(n, k)), static_cast<int64_t>(tiled_scale_bytes(n, k)),
          (n + 15) / 16};
}

// Offsets (bytes) of the runner's buffers in the workspace.
struct ExpertsWorkspace {
  int64_t x_perm, row_offsets, perm, group_expert, group_offsets, gate_up, h, y_perm, combine;
  int64_t staged_slots, staged_scales, staged_slot_of_group;  // units mode only
  int64_t total;
  int64_t pairs, max_groups;
};

inline ExpertsWorkspace experts_workspace(const MoeExpertsParams& p, bool from_units) {
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
  if (from_units) {
    const PartSizes gu = part_sizes(2 * p.inter, p.hidden), dn = part_sizes(p.hidden, p.inter);
    const int64_t slot = gu.slot() > dn.slot() ? gu.slot() : dn.slot();
    const int64_t tiles = gu.tiles > dn.tiles ? gu.tiles : dn.tiles;
    w.staged_slots = take(kStagedExperts * slot);
    w.staged_scales = take(kStagedExperts * tiles * 4);
    w.staged_slot_of_group = take(kStagedExperts * 4);
  }
  w.total = off;
  return w;
}

}  // namespace detail
}  // namespace dsfp4
