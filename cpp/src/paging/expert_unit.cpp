// Expert units: layout and the ModelOpt → tiled repack that fills one.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "dsfp4/nvfp4.h"
#include "dsfp4/paging.h"
#include "kernels/nvfp4/nvfp4_format.h"

namespace dsfp4 {
namespace paging {

namespace {
int64_t align_up(int64_t v) { return (v + kUnitAlign - 1) / kUnitAlign * kUnitAlign; }
int64_t tiles(int64_t rows) { return (rows + 15) / 16; }

// Word bits contributed by one packed byte (two E2M1 codes, columns kk and kk+1 of a lane's
// 4-column group) of row r (0: the tile's upper 8 rows, 1: the lower): the bit placement of
// nvfp4_format.h (mag_base / sign_pos) tabulated once, so a word is four lookups.
struct RepackTables {
  uint32_t lut[2][2][256];  // [r][byte pair: columns 0-1 or 2-3][byte]
  RepackTables() {
    for (int r = 0; r < 2; ++r)
      for (int pair = 0; pair < 2; ++pair)
        for (int b = 0; b < 256; ++b) {
          uint32_t w = 0;
          for (int half = 0; half < 2; ++half) {
            const uint32_t code = half ? (b >> 4) : (b & 15);
            const int kk = 2 * pair + half;
            const int reg = 2 * (kk / 2) + r, h = kk % 2;
            w |= (code & 7u) << (fmt::mag_base(reg) + 16 * h);
            w |= (code >> 3) << (fmt::sign_pos(reg) + 16 * h);
          }
          lut[r][pair][b] = w;
        }
  }
};
const RepackTables& tables() {
  static const RepackTables t;
  return t;
}

// Rows [row0, row0 + count) of a ModelOpt weight, repacked into their tiles of the tiled
// layout. Tiles are independent and stored tile-major, so a 16-row-aligned slice repacks into
// the matching slice of the output. Full tiles with K a multiple of 64 take the table path;
// anything else the reference repack (the same layout, checked bit for bit in the tests).
Status repack_rows(const ModeloptLinear& w, int64_t rows, int64_t cols, int64_t row0, int64_t count,
                   uint8_t* qweight, uint8_t* qscale) {
  const int64_t wt = static_cast<int64_t>(tiled_weight_bytes(16, cols));  // bytes per row tile
  const int64_t st = static_cast<int64_t>(tiled_scale_bytes(16, cols));
  const int64_t n = std::min(count, rows - row0);
  const uint8_t* packed = w.packed + row0 * (cols / 2);
  const uint8_t* scale = w.scale + row0 * (cols / 16);
  uint32_t* qw = reinterpret_cast<uint32_t*>(qweight + (row0 / 16) * wt);
  uint8_t* qs = qscale + (row0 / 16) * st;
  if (n % 16 != 0 || cols % 64 != 0) return nvfp4_repack_cpu(packed, scale, n, cols, qw, qs);
  const auto d = fmt::tiled_dims(16, cols);
  const RepackTables& T = tables();
  const int64_t half = cols / 2, groups = cols / 16;
  for (int64_t t = 0; t < n / 16; ++t) {
    for (int64_t kb = 0; kb < d.kb; ++kb) {
      uint32_t* out = qw + (t * d.kb + kb) * 128;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, c = lane % 4;
        const uint8_t* p0 = packed + (16 * t + g) * half + 32 * kb + 8 * c;  // row g, 16 columns
        const uint8_t* p1 = p0 + 8 * half;                                    // row g + 8
        for (int j = 0; j < 4; ++j)
          out[lane * 4 + j] = T.lut[0][0][p0[2 * j]] | T.lut[0][1][p0[2 * j + 1]] | T.lut[1][0][p1[2 * j]] |
                              T.lut[1][1][p1[2 * j + 1]];
      }
    }
    for (int64_t kc = 0; kc < d.kc; ++kc) {
      uint8_t* out = qs + (t * d.kc + kc) * 512;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, c = lane % 4;
        for (int kbi = 0; kbi < 8; ++kbi) {
          const int64_t group = 4 * (8 * kc + kbi) + c;
          for (int r = 0; r < 2; ++r)
            out[lane * 16 + kbi * 2 + r] = group < groups ? scale[(16 * t + g + 8 * r) * groups + group] : 0;
        }
      }
    }
  }
  return Status::Ok();
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
  l.gate_up_global_scale = off;
  l.gate_up_scale_per_tile = true;
  off = align_up(off + 4 * tiles(2 * inter));
  l.down_qweight = off;
  off = align_up(off + static_cast<int64_t>(tiled_weight_bytes(hidden, inter)));
  l.down_qscale = off;
  off = align_up(off + static_cast<int64_t>(tiled_scale_bytes(hidden, inter)));
  l.down_global_scale = off;
  l.down_scale_per_tile = true;
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

  float* gs = reinterpret_cast<float*>(unit + l.gate_up_global_scale);
  for (int64_t t = 0; t < tiles(I); ++t) gs[t] = gate.global_scale;
  for (int64_t t = 0; t < tiles(I); ++t) gs[tiles(I) + t] = up.global_scale;
  float* ds = reinterpret_cast<float*>(unit + l.down_global_scale);
  for (int64_t t = 0; t < tiles(H); ++t) ds[t] = down.global_scale;
  // the alignment gaps too, so that a unit's bytes depend on its expert alone (not on what a
  // reused host or GPU slot held before)
  const int64_t ends[6][2] = {
      {l.gate_up_qweight + static_cast<int64_t>(tiled_weight_bytes(2 * I, H)), l.gate_up_qscale},
      {l.gate_up_qscale + static_cast<int64_t>(tiled_scale_bytes(2 * I, H)), l.gate_up_global_scale},
      {l.gate_up_global_scale + 4 * tiles(2 * I), l.down_qweight},
      {l.down_qweight + static_cast<int64_t>(tiled_weight_bytes(H, I)), l.down_qscale},
      {l.down_qscale + static_cast<int64_t>(tiled_scale_bytes(H, I)), l.down_global_scale},
      {l.down_global_scale + 4 * tiles(H), l.bytes}};
  for (const auto& gap : ends)
    if (gap[1] > gap[0]) std::memset(unit + gap[0], 0, static_cast<size_t>(gap[1] - gap[0]));
  return Status::Ok();
}

}  // namespace paging
}  // namespace dsfp4
