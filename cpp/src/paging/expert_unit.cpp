// Expert units: layout and the ModelOpt → tiled repack that fills one.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "dsfp4/nvfp4.h"
#include "dsfp4/paging.h"

namespace dsfp4 {
namespace paging {

namespace {
int64_t align_up(int64_t v) { return (v + kUnitAlign - 1) / kUnitAlign * kUnitAlign; }
int64_t tiles(int64_t rows) { return (rows + 15) / 16; }

// Rows [row0, row0 + count) of a ModelOpt weight, repacked into their tiles of the tiled
// layout. Tiles are independent and stored tile-major, so a 16-row-aligned slice repacks into
// the matching slice of the output.
Status repack_rows(const ModeloptLinear& w, int64_t rows, int64_t cols, int64_t row0, int64_t count,
                   uint8_t* qweight, uint8_t* qscale) {
  const int64_t wt = static_cast<int64_t>(tiled_weight_bytes(16, cols));  // bytes per row tile
  const int64_t st = static_cast<int64_t>(tiled_scale_bytes(16, cols));
  const int64_t n = std::min(count, rows - row0);
  return nvfp4_repack_cpu(w.packed + row0 * (cols / 2), w.scale + row0 * (cols / 16), n, cols,
                          reinterpret_cast<uint32_t*>(qweight + (row0 / 16) * wt), qscale + (row0 / 16) * st);
}
}  // namespace

Status expert_unit_layout(int64_t hidden, int64_t inter, ExpertUnitLayout* out) {
  if (hidden <= 0 || inter <= 0) return InvalidArgument("expert_unit_layout: hidden and inter must be positive");
  if (hidden % 16 != 0 || inter % 16 != 0)
    return InvalidArgument("expert_unit_layout: hidden (" + std::to_string(hidden) + ") and inter (" +
                           std::to_string(inter) + ") must be multiples of 16");
  ExpertUnitLayout l;
  l.hidden = hidden;
  l.inter = inter;
  int64_t off = 0;
  l.gate_up_qweight = off;
  off = align_up(off + static_cast<int64_t>(tiled_weight_bytes(2 * inter, hidden)));
  l.gate_up_qscale = off;
  off = align_up(off + static_cast<int64_t>(tiled_scale_bytes(2 * inter, hidden)));
  l.gate_up_scale = off;
  off = align_up(off + 4 * tiles(2 * inter));
  l.down_qweight = off;
  off = align_up(off + static_cast<int64_t>(tiled_weight_bytes(hidden, inter)));
  l.down_qscale = off;
  off = align_up(off + static_cast<int64_t>(tiled_scale_bytes(hidden, inter)));
  l.down_scale = off;
  off = align_up(off + 4 * tiles(hidden));
  l.bytes = off;
  *out = l;
  return Status::Ok();
}

Status expert_unit_from_modelopt(const ExpertUnitLayout& l, const ModeloptLinear& gate, const ModeloptLinear& up,
                                 const ModeloptLinear& down, uint8_t* unit, int threads) {
  for (const ModeloptLinear* w : {&gate, &up, &down}) {
    if (w->packed == nullptr || w->scale == nullptr) return InvalidArgument("expert unit: null tensor pointer");
    if (!(w->global_scale > 0.0f) || !std::isfinite(w->global_scale))
      return InvalidArgument("expert unit: weight_scale_2 must be finite and positive, got " +
                             std::to_string(w->global_scale));
  }
  if (unit == nullptr) return InvalidArgument("expert unit: destination is null");
  const int64_t H = l.hidden, I = l.inter;
  // Work items: 1024-row slices (64 tiles) of gate, up and down.
  struct Item {
    const ModeloptLinear* w;
    int64_t rows, cols, row0;
    uint8_t *qw, *qs;
  };
  std::vector<Item> items;
  const int64_t chunk = 1024;
  uint8_t* gqw = unit + l.gate_up_qweight;
  uint8_t* gqs = unit + l.gate_up_qscale;
  const int64_t up_w = static_cast<int64_t>(tiled_weight_bytes(I, H));
  const int64_t up_s = static_cast<int64_t>(tiled_scale_bytes(I, H));
  for (int64_t r = 0; r < I; r += chunk) items.push_back({&gate, I, H, r, gqw, gqs});
  for (int64_t r = 0; r < I; r += chunk) items.push_back({&up, I, H, r, gqw + up_w, gqs + up_s});
  for (int64_t r = 0; r < H; r += chunk)
    items.push_back({&down, H, I, r, unit + l.down_qweight, unit + l.down_qscale});

  std::vector<Status> results(items.size());
  auto run = [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      const Item& it = items[i];
      results[i] = repack_rows(*it.w, it.rows, it.cols, it.row0, chunk, it.qw, it.qs);
    }
  };
  const size_t nt = static_cast<size_t>(std::max(1, std::min<int>(threads, static_cast<int>(items.size()))));
  if (nt <= 1) {
    run(0, items.size());
  } else {
    std::vector<std::thread> pool;
    const size_t per = (items.size() + nt - 1) / nt;
    for (size_t t = 0; t < nt; ++t) {
      const size_t b = t * per, e = std::min(items.size(), b + per);
      if (b < e) pool.emplace_back(run, b, e);
    }
    for (auto& th : pool) th.join();
  }
  for (const Status& st : results) DSFP4_RETURN_IF_ERROR(st);

  float* gs = reinterpret_cast<float*>(unit + l.gate_up_scale);
  for (int64_t t = 0; t < tiles(I); ++t) gs[t] = gate.global_scale;
  for (int64_t t = 0; t < tiles(I); ++t) gs[tiles(I) + t] = up.global_scale;
  float* ds = reinterpret_cast<float*>(unit + l.down_scale);
  for (int64_t t = 0; t < tiles(H); ++t) ds[t] = down.global_scale;
  return Status::Ok();
}

}  // namespace paging
}  // namespace dsfp4
