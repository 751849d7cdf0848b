// Test helpers: random NVFP4 experts (stacked tiled slots plus dense copies), a plain
// token-by-token expert FFN, and (CUDA builds) an ExpertSource serving experts from device
// memory, as a paging store would.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "dsfp4/expert_source.h"
#include "dsfp4/fp4_gemm.h"
#include "dsfp4/nvfp4.h"

#if defined(DSFP4_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace dsfp4_test {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// E experts, gate_up [2I, H] (gate and up quantized apart: one global scale per 16-row tile)
// and down [H, I] (one global scale), stacked in slots; dense float copies from the ModelOpt
// layout for the plain reference.
struct Experts {
  int experts = 0;
  int64_t hidden = 0, inter = 0;
  int64_t gu_words = 0, gu_sbytes = 0, dn_words = 0, dn_sbytes = 0, gu_tiles = 0;
  std::vector<uint32_t> gu_qw, dn_qw;
  std::vector<uint8_t> gu_qs, dn_qs;
  std::vector<float> gu_gs, dn_gs;        // [E][gu_tiles], [E]
  std::vector<float> gu_dense, dn_dense;  // [E][2I][H], [E][H][I]
  // The ModelOpt tensors (what a checkpoint stores), [E·3 + part] for part gate, up, down.
  std::vector<std::vector<uint8_t>> mo_packed, mo_scale;
  std::vector<float> mo_global;

  dsfp4::Fp4GroupedWeight gate_up() const {
    dsfp4::Fp4GroupedWeight w;
    w.qweight = gu_qw.data();
    w.qscale = gu_qs.data();
    w.global_scale = gu_gs.data();
    w.global_scale_per_tile = true;
    w.qweight_slot_stride = gu_words;
    w.qscale_slot_stride = gu_sbytes;
    w.n = 2 * inter;
    w.k = hidden;
    return w;
  }
  dsfp4::Fp4GroupedWeight down() const {
    dsfp4::Fp4GroupedWeight w;
    w.qweight = dn_qw.data();
    w.qscale = dn_qs.data();
    w.global_scale = dn_gs.data();
    w.qweight_slot_stride = dn_words;
    w.qscale_slot_stride = dn_sbytes;
    w.n = hidden;
    w.k = inter;
    return w;
  }
};

// Quantizes w [rows, cols] into its tiled form and dense copy, keeping the ModelOpt tensors in
// packed and scale; returns false on error.
inline bool quantize_into(const std::vector<float>& w, int64_t rows, int64_t cols, uint32_t* qw, uint8_t* qs,
                          float* gs, float* dense, std::vector<uint8_t>& packed, std::vector<uint8_t>& scale) {
  dsfp4::MatrixSource src;
  src.data = w.data();
  packed.assign(rows * cols / 2, 0);
  scale.assign(rows * cols / 16, 0);
  if (!dsfp4::nvfp4_quantize_cpu(src, rows, cols, nullptr, packed.data(), scale.data(), gs).ok()) return false;
  if (!dsfp4::nvfp4_repack_cpu(packed.data(), scale.data(), rows, cols, qw, qs).ok()) return false;
  return dsfp4::nvfp4_dequantize_cpu(packed.data(), scale.data(), *gs, rows, cols, dense, dsfp4::DType::kFloat32).ok();
}

inline bool make_experts(Experts& ex, int experts, int64_t hidden, int64_t inter, uint32_t seed) {
  ex.experts = experts;
  ex.hidden = hidden;
  ex.inter = inter;
  ex.gu_words = static_cast<int64_t>(dsfp4::tiled_weight_bytes(2 * inter, hidden) / 4);
  ex.gu_sbytes = static_cast<int64_t>(dsfp4::tiled_scale_bytes(2 * inter, hidden));
  ex.dn_words = static_cast<int64_t>(dsfp4::tiled_weight_bytes(hidden, inter) / 4);
  ex.dn_sbytes = static_cast<int64_t>(dsfp4::tiled_scale_bytes(hidden, inter));
  ex.gu_tiles = (2 * inter + 15) / 16;
  ex.gu_qw.assign(experts * ex.gu_words, 0);
  ex.gu_qs.assign(experts * ex.gu_sbytes, 0);
  ex.dn_qw.assign(experts * ex.dn_words, 0);
  ex.dn_qs.assign(experts * ex.dn_sbytes, 0);
  ex.gu_gs.assign(experts * ex.gu_tiles, 0.0f);
  ex.dn_gs.assign(experts, 0.0f);
  ex.gu_dense.assign(experts * 2 * inter * hidden, 0.0f);
  ex.dn_dense.assign(experts * hidden * inter, 0.0f);
  ex.mo_packed.assign(experts * 3, {});
  ex.mo_scale.assign(experts * 3, {});
  ex.mo_global.assign(experts * 3, 0.0f);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const int64_t part_words = ex.gu_words / 2, part_sbytes = ex.gu_sbytes / 2;  // I % 16 == 0: whole tiles
  for (int e = 0; e < experts; ++e) {
    for (int part = 0; part < 2; ++part) {  // gate, then up, each with its own global scale
      std::vector<float> w(inter * hidden);
      const float spread = 0.05f * (1 + e % 3) * (part ? 3.0f : 1.0f);
      for (auto& v : w) v = dist(rng) * spread;
      float& gs = ex.mo_global[e * 3 + part];
      if (!quantize_into(w, inter, hidden, ex.gu_qw.data() + e * ex.gu_words + part * part_words,
                         ex.gu_qs.data() + e * ex.gu_sbytes + part * part_sbytes, &gs,
                         ex.gu_dense.data() + (e * 2 + part) * inter * hidden, ex.mo_packed[e * 3 + part],
                         ex.mo_scale[e * 3 + part]))
        return false;
      for (int64_t t = 0; t < inter / 16; ++t) ex.gu_gs[e * ex.gu_tiles + part * (inter / 16) + t] = gs;
    }
    std::vector<float> w(hidden * inter);
    for (auto& v : w) v = dist(rng) * 0.05f;
    if (!quantize_into(w, hidden, inter, ex.dn_qw.data() + e * ex.dn_words, ex.dn_qs.data() + e * ex.dn_sbytes,
                       &ex.dn_gs[e], ex.dn_dense.data() + e * hidden * inter, ex.mo_packed[e * 3 + 2],
                       ex.mo_scale[e * 3 + 2]))
      return false;
    ex.mo_global[e * 3 + 2] = ex.dn_gs[e];
  }
  return true;
}

// The expert FFN token by token from the dense weights, rounding to bf16 where the pipeline
// stores bf16 (after each GEMM and after SiLU·mul); the combine sums in float32.
inline std::vector<uint16_t> plain_experts(const Experts& ex, const std::vector<uint16_t>& x,
                                           const std::vector<float>& w, const std::vector<int32_t>& ids,
                                           int64_t tokens, int top_k) {
  const int64_t H = ex.hidden, I = ex.inter;
  std::vector<uint16_t> out(tokens * H);
  std::vector<float> g(2 * I), a(I), acc(H);
  for (int64_t t = 0; t < tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int j = 0; j < top_k; ++j) {
      const int e = ids[t * top_k + j];
      if (e < 0 || e >= ex.experts) continue;
      for (int64_t c = 0; c < 2 * I; ++c) {
        double s = 0.0;
        for (int64_t h = 0; h < H; ++h) s += bf16_to_float(x[t * H + h]) * double(ex.gu_dense[(e * 2 * I + c) * H + h]);
        g[c] = round_bf16(static_cast<float>(s));
      }
      for (int64_t i = 0; i < I; ++i) a[i] = round_bf16(g[i] / (1.0f + std::exp(-g[i])) * g[I + i]);
      for (int64_t h = 0; h < H; ++h) {
        double s = 0.0;
        for (int64_t i = 0; i < I; ++i) s += a[i] * double(ex.dn_dense[(e * H + h) * I + i]);
        acc[h] += w[t * top_k + j] * round_bf16(static_cast<float>(s));
      }
    }
    for (int64_t h = 0; h < H; ++h) out[t * H + h] = float_to_bf16(acc[h]);
  }
  return out;
}

// Elements of `got` further than tol·(|want| + 1e-2·rms(want)) from `want`.
inline int64_t count_mismatches(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, double tol) {
  double ss = 0.0;
  for (uint16_t v : want) ss += double(bf16_to_float(v)) * bf16_to_float(v);
  const double rms = want.empty() ? 0.0 : std::sqrt(ss / want.size());
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double a = bf16_to_float(got[i]), b = bf16_to_float(want[i]);
    if (!(std::fabs(a - b) <= tol * (std::fabs(b) + 1e-2 * rms))) ++bad;
  }
  return bad;
}

// The experts as units in host memory: gate_up with per-tile global scales, down with one
// (a layout other than the paging store's); returns the E units back to back.
inline std::vector<uint8_t> pack_units(const Experts& ex, dsfp4::ExpertUnitLayout* layout) {
  auto al = [](int64_t v) { return (v + 255) / 256 * 256; };
  dsfp4::ExpertUnitLayout& L = *layout;
  L = dsfp4::ExpertUnitLayout();
  L.hidden = ex.hidden;
  L.inter = ex.inter;
  L.gate_up_scale_per_tile = true;
  L.gate_up_qweight = 0;
  L.gate_up_qscale = al(ex.gu_words * 4);
  L.gate_up_global_scale = L.gate_up_qscale + al(ex.gu_sbytes);
  L.down_qweight = L.gate_up_global_scale + al(ex.gu_tiles * 4);
  L.down_qscale = L.down_qweight + al(ex.dn_words * 4);
  L.down_global_scale = L.down_qscale + al(ex.dn_sbytes);
  L.bytes = L.down_global_scale + 256;
  std::vector<uint8_t> host(L.bytes * ex.experts, 0);
  for (int e = 0; e < ex.experts; ++e) {
    uint8_t* u = host.data() + e * L.bytes;
    std::memcpy(u + L.gate_up_qweight, ex.gu_qw.data() + e * ex.gu_words, ex.gu_words * 4);
    std::memcpy(u + L.gate_up_qscale, ex.gu_qs.data() + e * ex.gu_sbytes, ex.gu_sbytes);
    std::memcpy(u + L.gate_up_global_scale, ex.gu_gs.data() + e * ex.gu_tiles, ex.gu_tiles * 4);
    std::memcpy(u + L.down_qweight, ex.dn_qw.data() + e * ex.dn_words, ex.dn_words * 4);
    std::memcpy(u + L.down_qscale, ex.dn_qs.data() + e * ex.dn_sbytes, ex.dn_sbytes);
    std::memcpy(u + L.down_global_scale, &ex.dn_gs[e], 4);
  }
  return host;
}

#if defined(DSFP4_WITH_CUDA)
// Serves experts from one device buffer of units, as a paging store serves resident ones.
// acquire() reads the requested ids back (a store decides residency on the host) and records them.
class DeviceExpertSource : public dsfp4::ExpertSource {
 public:
  bool init(const Experts& ex) {
    experts_ = ex.experts;
    const std::vector<uint8_t> host = pack_units(ex, &layout_);
    unit_bytes_ = layout_.bytes;
    if (cudaMalloc(&units_, host.size()) != cudaSuccess) return false;
    if (cudaMalloc(&table_, experts_ * 8) != cudaSuccess) return false;
    std::vector<uint64_t> addr(experts_);
    for (int e = 0; e < experts_; ++e) addr[e] = reinterpret_cast<uint64_t>(static_cast<char*>(units_) + e * unit_bytes_);
    return cudaMemcpy(units_, host.data(), host.size(), cudaMemcpyHostToDevice) == cudaSuccess &&
           cudaMemcpy(table_, addr.data(), addr.size() * 8, cudaMemcpyHostToDevice) == cudaSuccess;
  }
  ~DeviceExpertSource() override {
    if (units_) cudaFree(units_);
    if (table_) cudaFree(table_);
  }
  // Makes expert e look missing (address 0) to later steps.
  void drop(int e) {
    const uint64_t zero = 0;
    cudaMemcpy(table_ + e, &zero, 8, cudaMemcpyHostToDevice);
  }

  dsfp4::Status acquire(int layer, const int32_t* expert_ids, int64_t count, dsfp4::Stream stream,
                        dsfp4::ExpertTable* table) override {
    std::vector<int32_t> ids(count);
    auto s = static_cast<cudaStream_t>(stream);
    if (count > 0 && (cudaMemcpyAsync(ids.data(), expert_ids, count * 4, cudaMemcpyDeviceToHost, s) != cudaSuccess ||
                      cudaStreamSynchronize(s) != cudaSuccess))
      return dsfp4::Status(dsfp4::StatusCode::kCudaError, "DeviceExpertSource: reading expert ids failed");
    requested.assign(ids.begin(), ids.end());
    last_layer = layer;
    ++acquired;
    table->unit_addr = table_;
    table->num_experts = experts_;
    table->layout = layout_;
    return dsfp4::Status::Ok();
  }
  dsfp4::Status release(int layer, dsfp4::Stream) override {
    if (layer != last_layer) return dsfp4::InvalidArgument("DeviceExpertSource: release of a layer not acquired");
    ++released;
    return dsfp4::Status::Ok();
  }

  std::vector<int32_t> requested;
  int last_layer = -1, acquired = 0, released = 0;

 private:
  int experts_ = 0;
  int64_t unit_bytes_ = 0;
  dsfp4::ExpertUnitLayout layout_;
  void* units_ = nullptr;
  uint64_t* table_ = nullptr;
};
#endif

}  // namespace dsfp4_test
