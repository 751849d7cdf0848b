// The miss policy: which lane computes each expert that missed the GPU cache.
#include <algorithm>
#include <cmath>

#include "dsfp4/paging.h"

namespace dsfp4 {
namespace paging {

const char* lane_name(Lane lane) {
  switch (lane) {
    case Lane::kGpu: return "gpu";
    case Lane::kCopy: return "copy";
    case Lane::kMapped: return "mapped";
    case Lane::kCpu: return "cpu";
    case Lane::kFailed: return "failed";
  }
  return "?";
}

std::vector<Lane> choose_lanes(const std::vector<MissInfo>& misses, const MissPolicyOptions& opt) {
  const size_t n = misses.size();
  std::vector<Lane> lane(n, Lane::kFailed);
  int copies = 0;
  int slots = std::max(0, opt.free_slots);
  const int cap = opt.max_copies < 0 ? 1 << 30 : opt.max_copies;
  for (size_t i = 0; i < n; ++i) {
    bool copy = opt.mode == MissMode::kCopy || (opt.mode == MissMode::kAuto && misses[i].keep);
    if (!opt.mapped_ok) copy = true;  // the only way to the GPU
    if (copy && copies < cap && copies < slots) {
      lane[i] = Lane::kCopy;
      ++copies;
    } else if (opt.mapped_ok) {
      lane[i] = Lane::kMapped;
    }
  }
  if (!opt.cpu_ok || opt.cpu_gbs <= 0 || opt.bus_gbs <= 0 || opt.unit_bytes <= 0) return lane;
  // Bus lane: copies and in-place reads both move a unit over PCIe. CPU lane: a unit per expert,
  // slower as the expert's tokens grow (cpu_gbs is the one-token rate; more tokens reuse the
  // decoded weights, so the cost grows sub-linearly: count √tokens). Move the experts used by the
  // fewest tokens (and not worth keeping) to the CPU while that lowers the slower lane's time.
  const double unit = static_cast<double>(opt.unit_bytes);
  auto cpu_cost = [&](const MissInfo& m) { return unit / (opt.cpu_gbs * 1e9) * std::sqrt(std::max(1, m.tokens)); };
  double bus = 0;
  for (size_t i = 0; i < n; ++i)
    if (lane[i] == Lane::kCopy || lane[i] == Lane::kMapped) bus += unit / (opt.bus_gbs * 1e9);
  std::vector<size_t> order;
  for (size_t i = 0; i < n; ++i)
    if (lane[i] != Lane::kFailed) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (misses[a].keep != misses[b].keep) return !misses[a].keep;
    return misses[a].tokens < misses[b].tokens;
  });
  double cpu = 0;
  for (size_t i : order) {
    const double nb = bus - unit / (opt.bus_gbs * 1e9), nc = cpu + cpu_cost(misses[i]);
    if (std::max(nb, nc) >= std::max(bus, cpu)) break;
    lane[i] = Lane::kCpu;
    bus = nb;
    cpu = nc;
  }
  return lane;
}

}  // namespace paging
}  // namespace dsfp4
