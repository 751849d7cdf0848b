// A DeepSeek-style MoE layer (noaux_tc routing + routed NVFP4 experts) through the dsfp4 C++
// API, linked from the installed package.
//   CPU references, checked against a plain loop written here.
//   Paged experts: the experts are written to a safetensors checkpoint (ModelOpt NVFP4 layout)
//   in a temporary folder and served by the paging store (dsfp4::paging::ExpertStore) through
//   an ExpertStoreSource, with fewer expert slots than experts; on a GPU the slots are device
//   memory, without one the store runs in CPU mode. Checked against the CPU reference.
//   With a GPU: the CUDA entry points (experts resident and paged), plus the TensorRT plugins
//   when built with them (Dsfp4MoeExperts also in store mode, over the same paging store).
// Exits non-zero on any mismatch.
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "dsfp4/expert_source.h"
#include "dsfp4/fp4_gemm.h"
#include "dsfp4/moe.h"
#include "dsfp4/moe_experts.h"
#include "dsfp4/nvfp4.h"
#include "dsfp4/paging.h"

#if defined(DSFP4_WITH_CUDA)
#include <cuda_runtime.h>
#endif
#if defined(DSFP4_EXAMPLE_WITH_PLUGINS)
#include <NvInferRuntime.h>

#include "dsfp4/trt/dsfp4_trt_plugins.h"
extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
#endif

namespace {

// Layer shape: T tokens, hidden H, expert intermediate I, E experts in G groups, top-K of the
// TG best groups (DeepSeek-V3 is E=256, G=8, TG=4, K=8, H=7168, I=2048).
constexpr int64_t T = 6, H = 256, I = 128;
constexpr int E = 16, G = 4, TG = 2, K = 4;
constexpr float kScale = 2.5f;

int g_failures = 0;
void check(bool ok, const std::string& what) {
  std::printf("  %-58s %s\n", what.c_str(), ok ? "ok" : "MISMATCH");
  if (!ok) ++g_failures;
}
bool ok(const dsfp4::Status& st, const char* what) {
  if (!st.ok()) {
    std::printf("  %s failed: %s\n", what, st.message().c_str());
    ++g_failures;
  }
  return st.ok();
}

float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// True when every element is within tol·(|want| + 1% of want's rms).
bool close(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, double tol) {
  double ss = 0;
  for (uint16_t v : want) ss += double(bf16_to_float(v)) * bf16_to_float(v);
  const double floor = 1e-2 * std::sqrt(ss / want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const double a = bf16_to_float(got[i]), b = bf16_to_float(want[i]);
    if (!(std::fabs(a - b) <= tol * (std::fabs(b) + floor))) return false;
  }
  return true;
}

// The layer's weights: router, correction bias, and E experts quantized to NVFP4, stacked in
// slots in the kernels' tiled layout (plus dense copies for the plain check).
struct Layer {
  std::vector<float> router, bias;  // [E, H], [E]
  int64_t gu_words = 0, gu_bytes = 0, dn_words = 0, dn_bytes = 0;
  std::vector<uint32_t> gu_qw, dn_qw;
  std::vector<uint8_t> gu_qs, dn_qs;
  std::vector<float> gu_gs, dn_gs;        // [E] each: one global scale per weight
  std::vector<float> gu_dense, dn_dense;  // [E][2I][H], [E][H][I]
  std::vector<uint8_t> gu_packed, gu_scale, dn_packed, dn_scale;  // the ModelOpt tensors, [E][...]

  dsfp4::Fp4GroupedWeight gate_up() const { return grouped(gu_qw.data(), gu_qs.data(), gu_gs.data(), gu_words, gu_bytes, 2 * I, H); }
  dsfp4::Fp4GroupedWeight down() const { return grouped(dn_qw.data(), dn_qs.data(), dn_gs.data(), dn_words, dn_bytes, H, I); }
  static dsfp4::Fp4GroupedWeight grouped(const uint32_t* qw, const uint8_t* qs, const float* gs, int64_t words,
                                         int64_t bytes, int64_t n, int64_t k) {
    dsfp4::Fp4GroupedWeight w;
    w.qweight = qw;
    w.qscale = qs;
    w.global_scale = gs;
    w.qweight_slot_stride = words;
    w.qscale_slot_stride = bytes;
    w.n = n;
    w.k = k;
    return w;
  }
};

// ModelOpt tensors (packed, scale, *gs), the tiled form (qw, qs) and a dense copy of w.
bool quantize(const std::vector<float>& w, int64_t rows, int64_t cols, uint8_t* packed, uint8_t* scale, uint32_t* qw,
              uint8_t* qs, float* gs, float* dense) {
  dsfp4::MatrixSource src;
  src.data = w.data();
  return ok(dsfp4::nvfp4_quantize_cpu(src, rows, cols, nullptr, packed, scale, gs), "quantize") &&
         ok(dsfp4::nvfp4_repack_cpu(packed, scale, rows, cols, qw, qs), "repack") &&
         ok(dsfp4::nvfp4_dequantize_cpu(packed, scale, *gs, rows, cols, dense, dsfp4::DType::kFloat32), "dequantize");
}

Layer make_layer(std::mt19937& rng) {
  std::normal_distribution<float> n01(0.0f, 1.0f);
  Layer L;
  L.router.resize(E * H);
  for (auto& v : L.router) v = n01(rng) * 0.06f;
  L.bias.resize(E);
  for (auto& v : L.bias) v = n01(rng) * 0.05f;
  L.gu_words = static_cast<int64_t>(dsfp4::tiled_weight_bytes(2 * I, H) / 4);
  L.gu_bytes = static_cast<int64_t>(dsfp4::tiled_scale_bytes(2 * I, H));
  L.dn_words = static_cast<int64_t>(dsfp4::tiled_weight_bytes(H, I) / 4);
  L.dn_bytes = static_cast<int64_t>(dsfp4::tiled_scale_bytes(H, I));
  L.gu_qw.resize(E * L.gu_words);
  L.gu_qs.resize(E * L.gu_bytes);
  L.dn_qw.resize(E * L.dn_words);
  L.dn_qs.resize(E * L.dn_bytes);
  L.gu_gs.resize(E);
  L.dn_gs.resize(E);
  L.gu_dense.resize(E * 2 * I * H);
  L.dn_dense.resize(E * H * I);
  L.gu_packed.resize(E * 2 * I * H / 2);
  L.gu_scale.resize(E * 2 * I * H / 16);
  L.dn_packed.resize(E * H * I / 2);
  L.dn_scale.resize(E * H * I / 16);
  for (int e = 0; e < E; ++e) {
    std::vector<float> gu(2 * I * H), dn(H * I);
    for (auto& v : gu) v = n01(rng) * 0.05f;
    for (auto& v : dn) v = n01(rng) * 0.05f;
    quantize(gu, 2 * I, H, &L.gu_packed[e * I * H], &L.gu_scale[e * I * H / 8], &L.gu_qw[e * L.gu_words],
             &L.gu_qs[e * L.gu_bytes], &L.gu_gs[e], &L.gu_dense[e * 2 * I * H]);
    quantize(dn, H, I, &L.dn_packed[e * H * I / 2], &L.dn_scale[e * H * I / 16], &L.dn_qw[e * L.dn_words],
             &L.dn_qs[e * L.dn_bytes], &L.dn_gs[e], &L.dn_dense[e * H * I]);
  }
  return L;
}

// ---- the experts as a checkpoint, paged -----------------------------------------------------

// Writes the layer's experts as one safetensors file (8-byte little-endian header length, JSON
// header, data) under the names a DeepSeek-V3 NVFP4 checkpoint uses, for MoE layer 3:
// model.layers.3.mlp.experts.<e>.{gate,up,down}_proj.{weight, weight_scale, weight_scale_2}.
// gate and up are the two halves of gate_up, sharing its global scale. Fills where each
// expert's tensors lie, in the order the store reads them.
bool write_checkpoint(const Layer& L, const std::string& path, std::vector<dsfp4::paging::StoredExpert>* stored) {
  struct Tensor {
    std::string name, dtype, shape;
    const void* data;
    int64_t nbytes;
  };
  std::vector<Tensor> tensors;
  for (int e = 0; e < E; ++e) {
    const std::string base = "model.layers.3.mlp.experts." + std::to_string(e) + ".";
    for (int part = 0; part < 3; ++part) {  // gate, up, down
      const char* proj = part == 0 ? "gate_proj." : part == 1 ? "up_proj." : "down_proj.";
      const int64_t rows = part < 2 ? I : H, cols = part < 2 ? H : I;
      const uint8_t* packed = part < 2 ? &L.gu_packed[(e * 2 + part) * I * H / 2] : &L.dn_packed[e * H * I / 2];
      const uint8_t* scale = part < 2 ? &L.gu_scale[(e * 2 + part) * I * H / 16] : &L.dn_scale[e * H * I / 16];
      const float* gs = part < 2 ? &L.gu_gs[e] : &L.dn_gs[e];
      const std::string r = std::to_string(rows) + ",";
      tensors.push_back({base + proj + "weight", "U8", r + std::to_string(cols / 2), packed, rows * cols / 2});
      tensors.push_back({base + proj + "weight_scale", "F8_E4M3", r + std::to_string(cols / 16), scale, rows * cols / 16});
      tensors.push_back({base + proj + "weight_scale_2", "F32", "", gs, 4});
    }
  }
  std::string header = "{";
  int64_t at = 0;
  for (const Tensor& t : tensors) {
    header += (at ? ",\"" : "\"") + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[" + t.shape +
              "],\"data_offsets\":[" + std::to_string(at) + "," + std::to_string(at + t.nbytes) + "]}";
    at += t.nbytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(header.size()) >> (8 * i));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  bool written = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(header.data(), 1, header.size(), f) == header.size();
  for (const Tensor& t : tensors)
    written = written && std::fwrite(t.data, 1, t.nbytes, f) == static_cast<size_t>(t.nbytes);
  written = std::fclose(f) == 0 && written;
  stored->assign(E, dsfp4::paging::StoredExpert());
  int64_t offset = 8 + static_cast<int64_t>(header.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    dsfp4::paging::TensorRange& r = (*stored)[i / 9].part[i % 9];
    r.file = 0;
    r.offset = offset;
    r.nbytes = tensors[i].nbytes;
    r.name = tensors[i].name;
    offset += tensors[i].nbytes;
  }
  return written;
}

// The paging store over that checkpoint: kSlots expert slots (device memory on a GPU, host
// memory in CPU mode) and a host cache; missed experts that do not win a slot are read in
// place from the host cache (zero-copy). The source hands the store's tables to the runner.
constexpr int kSlots = 4;
struct PagedExperts {
  std::unique_ptr<dsfp4::paging::ExpertStore> store;
  std::unique_ptr<dsfp4::paging::ExpertStoreSource> source;
  std::vector<uint8_t> host_slots;  // CPU mode: the "device" memory
  std::vector<uint64_t> host_tables;
  void* device_memory = nullptr;    // GPU: slots, then the expert table

  bool open(const std::string& path, std::vector<dsfp4::paging::StoredExpert> stored, bool on_device) {
    namespace pg = dsfp4::paging;
    dsfp4::ExpertUnitLayout layout;
    if (!ok(pg::expert_unit_layout(H, I, &layout), "expert_unit_layout")) return false;
    std::unique_ptr<pg::CheckpointFiles> files;
    if (!ok(pg::CheckpointFiles::open({path}, true, &files), "CheckpointFiles::open")) return false;
    pg::ExpertStoreOptions o;
    o.layers = 1;
    o.experts = E;
    o.hidden = H;
    o.inter = I;
    o.gpu_slots = kSlots;
    o.host_slots = E;  // a step may use every expert; host memory holds them all here
    o.on_device = on_device;
    o.pinned = on_device;
    o.miss_mode = pg::MissMode::kAuto;
    o.io_threads = 2;
    uint64_t* tables = nullptr;
    if (on_device) {
#if defined(DSFP4_WITH_CUDA)
      if (cudaMalloc(&device_memory, kSlots * layout.bytes + E * 8) != cudaSuccess) return false;
      o.gpu_base = device_memory;
      tables = reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(device_memory) + kSlots * layout.bytes);
#endif
    } else {
      host_slots.resize(kSlots * layout.bytes + 256);
      o.gpu_base = host_slots.data() + (256 - reinterpret_cast<uintptr_t>(host_slots.data()) % 256) % 256;
      host_tables.assign(E, 0);
      tables = host_tables.data();
    }
    if (!ok(pg::ExpertStore::create(o, std::shared_ptr<pg::CheckpointFiles>(std::move(files)), std::move(stored),
                                    &store),
            "ExpertStore::create"))
      return false;
    store->set_device_tables(tables);
    return ok(pg::ExpertStoreSource::create(store.get(), &source), "ExpertStoreSource::create");
  }
  ~PagedExperts() {
    source.reset();
    store.reset();
#if defined(DSFP4_WITH_CUDA)
    if (device_memory) cudaFree(device_memory);
#endif
  }
  void report() const {
    const dsfp4::paging::ExpertCounters c = store->counters(-1);
    std::printf("  store: %llu expert requests, %llu slot hits, %llu copies into %d slots, %llu read in place,\n"
                "         %llu evictions, %llu units read from the checkpoint\n",
                static_cast<unsigned long long>(c.requests), static_cast<unsigned long long>(c.gpu_hits),
                static_cast<unsigned long long>(c.copies), kSlots, static_cast<unsigned long long>(c.zero_copy),
                static_cast<unsigned long long>(c.evictions), static_cast<unsigned long long>(c.ssd_reads));
  }
};

// A scratch folder for the checkpoint, removed on exit.
struct TempDir {
  std::string path;
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/dsfp4_moe_layer_XXXXXX";
    if (mkdtemp(&tmpl[0]) != nullptr) path = tmpl;
  }
  ~TempDir() {
    if (!path.empty()) {
      std::remove((path + "/experts.safetensors").c_str());
      rmdir(path.c_str());
    }
  }
};

// ---- plain reference, written from the definitions ----------------------------------------

void plain_route(const std::vector<float>& logits, const std::vector<float>& bias, std::vector<float>& w,
                 std::vector<int32_t>& ids) {
  const int per_group = E / G;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> s(E), c(E);
    for (int e = 0; e < E; ++e) {
      s[e] = 1.0f / (1.0f + std::exp(-logits[t * E + e]));
      c[e] = s[e] + bias[e];
    }
    std::vector<std::pair<float, int>> groups;
    for (int g = 0; g < G; ++g) {
      std::vector<float> v(c.begin() + g * per_group, c.begin() + (g + 1) * per_group);
      std::sort(v.rbegin(), v.rend());
      groups.push_back({-(v[0] + v[1]), g});
    }
    std::sort(groups.begin(), groups.end());  // best first, ties to the lower group
    std::vector<std::pair<float, int>> cand;
    for (int r = 0; r < TG; ++r)
      for (int e = groups[r].second * per_group; e < (groups[r].second + 1) * per_group; ++e) cand.push_back({-c[e], e});
    std::sort(cand.begin(), cand.end());
    float sum = 0;
    for (int j = 0; j < K; ++j) sum += s[cand[j].second];
    for (int j = 0; j < K; ++j) {
      ids[t * K + j] = cand[j].second;
      w[t * K + j] = s[cand[j].second] / (sum + 1e-20f) * kScale;
    }
  }
}

std::vector<uint16_t> plain_experts(const Layer& L, const std::vector<uint16_t>& x, const std::vector<float>& w,
                                    const std::vector<int32_t>& ids) {
  std::vector<uint16_t> out(T * H);
  std::vector<float> g(2 * I), a(I), acc(H);
  for (int64_t t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int j = 0; j < K; ++j) {
      const int e = ids[t * K + j];
      for (int64_t r = 0; r < 2 * I; ++r) {  // gate_up, rounded to bf16 as the layer stores it
        double s = 0;
        for (int64_t h = 0; h < H; ++h) s += bf16_to_float(x[t * H + h]) * double(L.gu_dense[(e * 2 * I + r) * H + h]);
        g[r] = round_bf16(static_cast<float>(s));
      }
      for (int64_t i = 0; i < I; ++i) a[i] = round_bf16(g[i] / (1.0f + std::exp(-g[i])) * g[I + i]);
      for (int64_t h = 0; h < H; ++h) {
        double s = 0;
        for (int64_t i = 0; i < I; ++i) s += a[i] * double(L.dn_dense[(e * H + h) * I + i]);
        acc[h] += w[t * K + j] * round_bf16(static_cast<float>(s));
      }
    }
    for (int64_t h = 0; h < H; ++h) out[t * H + h] = float_to_bf16(acc[h]);
  }
  return out;
}

#if defined(DSFP4_WITH_CUDA)
// ---- GPU ----------------------------------------------------------------------------------

template <typename T_>
struct DeviceBuffer {
  T_* p = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) { cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T_)); }
  explicit DeviceBuffer(const std::vector<T_>& v) : DeviceBuffer(v.size()) {
    cudaMemcpy(p, v.data(), v.size() * sizeof(T_), cudaMemcpyHostToDevice);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(p); }
  std::vector<T_> host() const {
    std::vector<T_> v(n);
    cudaMemcpy(v.data(), p, n * sizeof(T_), cudaMemcpyDeviceToHost);
    return v;
  }
};

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
#endif

}  // namespace

int main() {
  std::mt19937 rng(2024);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  const Layer L = make_layer(rng);
  std::vector<uint16_t> x(T * H);
  for (auto& v : x) v = float_to_bf16(n01(rng));
  std::vector<float> logits(T * E);  // the router GEMM, in float32 as DeepSeek runs it
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) {
      float s = 0;
      for (int64_t h = 0; h < H; ++h) s += bf16_to_float(x[t * H + h]) * L.router[e * H + h];
      logits[t * E + e] = s;
    }
  dsfp4::MoeRouteParams rp;
  rp.tokens = T;
  rp.experts = E;
  rp.top_k = K;
  rp.n_group = G;
  rp.topk_group = TG;
  rp.routed_scaling_factor = kScale;
  const dsfp4::MoeExpertsParams mp{T, H, I, E, K};

  std::printf("MoE layer: %lld tokens, hidden %lld, %d experts (top-%d of %d groups), expert inter %lld\n",
              static_cast<long long>(T), static_cast<long long>(H), E, K, G, static_cast<long long>(I));
  std::printf("CPU references:\n");
  std::vector<float> w(T * K), pw(T * K);
  std::vector<int32_t> ids(T * K), pids(T * K);
  std::vector<uint16_t> out_cpu(T * H);
  ok(dsfp4::moe_route_cpu(logits.data(), dsfp4::DType::kFloat32, L.bias.data(), rp, w.data(), ids.data()), "moe_route_cpu");
  ok(dsfp4::moe_experts_cpu(mp, L.gate_up(), L.down(), x.data(), w.data(), ids.data(), out_cpu.data()), "moe_experts_cpu");
  plain_route(logits, L.bias, pw, pids);
  bool weights_close = true;
  for (size_t i = 0; i < w.size(); ++i) weights_close = weights_close && std::fabs(w[i] - pw[i]) <= 1e-6f * kScale;
  check(ids == pids && weights_close, "routing equals the plain loop");
  check(close(out_cpu, plain_experts(L, x, w, ids), 1e-2), "experts equal the plain loop");

  // The experts as a checkpoint, for the paging store.
  TempDir tmp;
  const std::string ckpt = tmp.path + "/experts.safetensors";
  std::vector<dsfp4::paging::StoredExpert> stored;
  const bool wrote = !tmp.path.empty() && write_checkpoint(L, ckpt, &stored);
  check(wrote, "experts written to a safetensors checkpoint");
  bool gpu = false;
#if defined(DSFP4_WITH_CUDA)
  gpu = have_gpu();
#endif
  if (wrote && !gpu) {
    std::printf("Paged experts, CPU mode (%d slots for %d experts):\n", kSlots, E);
    PagedExperts paged;
    if (paged.open(ckpt, stored, false)) {
      // Decode (one token per step), then the whole batch as one step.
      auto step = [&](int64_t t0, int64_t n, std::vector<uint16_t>& out) {
        paged.store->begin_step();
        dsfp4::ExpertTable table;
        const dsfp4::MoeExpertsParams p{n, H, I, E, K};
        return ok(paged.source->acquire(0, &ids[t0 * K], n * K, nullptr, &table), "acquire") &&
               ok(dsfp4::moe_experts_units_cpu(p, table, &x[t0 * H], &w[t0 * K], &ids[t0 * K], &out[t0 * H]),
                  "moe_experts_units_cpu") &&
               ok(paged.source->release(0, nullptr), "release");
      };
      std::vector<uint16_t> decode(T * H, 0xFFFF), batch(T * H, 0xFFFF);  // NaN-poisoned
      bool ran = true;
      for (int64_t t = 0; t < T; ++t) ran = ran && step(t, 1, decode);
      check(ran && decode == out_cpu, "paged, one token per step, equals the CPU reference");
      check(step(0, T, batch) && batch == out_cpu, "paged, the whole batch, equals the CPU reference");
      paged.report();
    }
  }

#if defined(DSFP4_WITH_CUDA)
  if (have_gpu()) {
    std::printf("GPU:\n");
    DeviceBuffer<float> d_logits(logits), d_bias(L.bias), d_w(T * K);
    DeviceBuffer<int32_t> d_ids(T * K);
    DeviceBuffer<uint16_t> d_x(x), d_out(T * H);
    cudaStream_t s;
    cudaStreamCreate(&s);
    ok(dsfp4::moe_route_cuda(d_logits.p, dsfp4::DType::kFloat32, d_bias.p, rp, d_w.p, d_ids.p, s), "moe_route_cuda");
    cudaStreamSynchronize(s);
    const auto gw = d_w.host();
    bool wc = true;
    for (size_t i = 0; i < gw.size(); ++i) wc = wc && std::fabs(gw[i] - w[i]) <= 1e-5f * kScale;
    check(d_ids.host() == ids && wc, "moe_route_cuda equals the CPU reference");

    // Experts resident on the device, stacked in slots.
    DeviceBuffer<uint32_t> gu_qw(L.gu_qw), dn_qw(L.dn_qw);
    DeviceBuffer<uint8_t> gu_qs(L.gu_qs), dn_qs(L.dn_qs);
    DeviceBuffer<float> gu_gs(L.gu_gs), dn_gs(L.dn_gs);
    const auto gu = Layer::grouped(gu_qw.p, gu_qs.p, gu_gs.p, L.gu_words, L.gu_bytes, 2 * I, H);
    const auto dn = Layer::grouped(dn_qw.p, dn_qs.p, dn_gs.p, L.dn_words, L.dn_bytes, H, I);
    DeviceBuffer<uint8_t> ws(dsfp4::moe_experts_workspace_bytes(mp));
    ok(dsfp4::moe_experts_cuda(mp, gu, dn, d_x.p, d_w.p, d_ids.p, d_out.p, ws.p, ws.n, s), "moe_experts_cuda");
    cudaStreamSynchronize(s);
    const auto out_gpu = d_out.host();
    check(close(out_gpu, out_cpu, 2e-2), "moe_experts_cuda (resident) equals the CPU reference");

    // The same experts paged from the checkpoint through the store: decode (one token per
    // step), then the whole batch as one step.
    std::unique_ptr<PagedExperts> paged;
    if (wrote) {
      std::printf("Paged experts on the GPU (%d slots for %d experts):\n", kSlots, E);
      paged.reset(new PagedExperts());
      if (!paged->open(ckpt, stored, true)) paged.reset();
    }
    if (paged) {
      DeviceBuffer<uint16_t> d_paged(T * H);
      auto step = [&](int64_t t0, int64_t n) {
        paged->store->begin_step();
        dsfp4::ExpertTable table;
        const dsfp4::MoeExpertsParams p{n, H, I, E, K};
        return ok(paged->source->acquire(0, d_ids.p + t0 * K, n * K, s, &table), "acquire") &&
               ok(dsfp4::moe_experts_units_cuda(p, table, d_x.p + t0 * H, d_w.p + t0 * K, d_ids.p + t0 * K,
                                                d_paged.p + t0 * H, ws.p, ws.n, s),
                  "moe_experts_units_cuda") &&
               ok(paged->source->release(0, s), "release");
      };
      cudaMemsetAsync(d_paged.p, 0xFF, T * H * 2, s);  // NaN-poisoned
      bool ran = true;
      for (int64_t t = 0; t < T; ++t) ran = ran && step(t, 1);
      cudaStreamSynchronize(s);
      check(ran && close(d_paged.host(), out_cpu, 2e-2), "paged, one token per step, equals the CPU reference");
      cudaMemsetAsync(d_paged.p, 0xFF, T * H * 2, s);
      ran = step(0, T);
      cudaStreamSynchronize(s);
      check(ran && d_paged.host() == out_gpu, "paged, the whole batch, equals moe_experts_cuda (resident)");
      paged->report();
    }

#if defined(DSFP4_EXAMPLE_WITH_PLUGINS)
    // The same layer through the TensorRT plugins, invoked directly (no engine is built here).
    using namespace nvinfer1;
    int32_t ncreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(ncreators);
    auto creator = [&](const char* name) -> IPluginCreatorV3One* {
      for (int32_t i = 0; i < ncreators; ++i)
        if (std::strcmp(static_cast<IPluginCreatorV3One*>(creators[i])->getPluginName(), name) == 0)
          return static_cast<IPluginCreatorV3One*>(creators[i]);
      return nullptr;
    };
    auto desc = [](std::initializer_list<int64_t> d, DataType t) {
      PluginTensorDesc p{};
      p.dims.nbDims = static_cast<int32_t>(d.size());
      int i = 0;
      for (int64_t v : d) p.dims.d[i++] = v;
      p.type = t;
      p.format = TensorFormat::kLINEAR;
      return p;
    };
    const int32_t e = E, g = G, tg = TG, k = K, h = H, inter = I;
    const float scale = kScale;
    std::vector<PluginField> rf = {{"num_experts", &e, PluginFieldType::kINT32, 1},
                                   {"n_group", &g, PluginFieldType::kINT32, 1},
                                   {"topk_group", &tg, PluginFieldType::kINT32, 1},
                                   {"top_k", &k, PluginFieldType::kINT32, 1},
                                   {"routed_scaling_factor", &scale, PluginFieldType::kFLOAT32, 1}};
    const char* source = "fields";
    std::vector<PluginField> ef = {
        {"num_experts", &e, PluginFieldType::kINT32, 1},
        {"hidden", &h, PluginFieldType::kINT32, 1},
        {"inter", &inter, PluginFieldType::kINT32, 1},
        {"top_k", &k, PluginFieldType::kINT32, 1},
        {"weight_source", source, PluginFieldType::kCHAR, 7},
        {"gate_up_qweight", L.gu_qw.data(), PluginFieldType::kINT32, static_cast<int32_t>(L.gu_qw.size())},
        {"gate_up_qscale", L.gu_qs.data(), PluginFieldType::kINT8, static_cast<int32_t>(L.gu_qs.size())},
        {"gate_up_global_scale", L.gu_gs.data(), PluginFieldType::kFLOAT32, E},
        {"down_qweight", L.dn_qw.data(), PluginFieldType::kINT32, static_cast<int32_t>(L.dn_qw.size())},
        {"down_qscale", L.dn_qs.data(), PluginFieldType::kINT8, static_cast<int32_t>(L.dn_qs.size())},
        {"down_global_scale", L.dn_gs.data(), PluginFieldType::kFLOAT32, E}};
    PluginFieldCollection rfc{static_cast<int32_t>(rf.size()), rf.data()}, efc{static_cast<int32_t>(ef.size()), ef.data()};
    IPluginV3* routing = creator("Dsfp4MoeRouting")->createPlugin("router", &rfc, TensorRTPhase::kRUNTIME);
    IPluginV3* experts = creator("Dsfp4MoeExperts")->createPlugin("experts", &efc, TensorRTPhase::kRUNTIME);
    check(routing != nullptr && experts != nullptr, "plugins created from fields");
    if (routing && experts) {
      auto rt = [](IPluginV3* p) {
        return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
      };
      DeviceBuffer<float> p_w(T * K);
      DeviceBuffer<int32_t> p_ids(T * K);
      DeviceBuffer<uint16_t> p_out(T * H);
      PluginTensorDesc rin[2] = {desc({T, E}, DataType::kFLOAT), desc({E}, DataType::kFLOAT)};
      PluginTensorDesc rout[2] = {desc({T, K}, DataType::kFLOAT), desc({T, K}, DataType::kINT32)};
      const void* rin_p[2] = {d_logits.p, d_bias.p};
      void* rout_p[2] = {p_w.p, p_ids.p};
      PluginTensorDesc ein[3] = {desc({T, H}, DataType::kBF16), desc({T, K}, DataType::kFLOAT),
                                 desc({T, K}, DataType::kINT32)};
      PluginTensorDesc eout[1] = {desc({T, H}, DataType::kBF16)};
      const void* ein_p[3] = {d_x.p, p_w.p, p_ids.p};
      void* eout_p[1] = {p_out.p};
      const bool ran = rt(routing)->onShapeChange(rin, 2, rout, 2) == 0 &&
                       rt(routing)->enqueue(rin, rout, rin_p, rout_p, nullptr, s) == 0 &&
                       rt(experts)->onShapeChange(ein, 3, eout, 1) == 0 &&
                       rt(experts)->enqueue(ein, eout, ein_p, eout_p, ws.p, s) == 0;
      cudaStreamSynchronize(s);
      check(ran && p_ids.host() == d_ids.host() && p_w.host() == gw, "Dsfp4MoeRouting equals moe_route_cuda");
      check(ran && p_out.host() == out_gpu, "Dsfp4MoeExperts equals moe_experts_cuda");

      // Dsfp4MoeExperts in store mode, over the paging store registered under a handle.
      const int64_t handle = 7;
      const int32_t layer = 0;
      const char* store = "store";
      std::vector<PluginField> sf = {{"num_experts", &e, PluginFieldType::kINT32, 1},
                                     {"hidden", &h, PluginFieldType::kINT32, 1},
                                     {"inter", &inter, PluginFieldType::kINT32, 1},
                                     {"top_k", &k, PluginFieldType::kINT32, 1},
                                     {"weight_source", store, PluginFieldType::kCHAR, 6},
                                     {"store_handle", &handle, PluginFieldType::kINT64, 1},
                                     {"layer", &layer, PluginFieldType::kINT32, 1}};
      PluginFieldCollection sfc{static_cast<int32_t>(sf.size()), sf.data()};
      IPluginV3* paged_experts = creator("Dsfp4MoeExperts")->createPlugin("paged", &sfc, TensorRTPhase::kRUNTIME);
      if (paged && paged_experts && dsfp4_trt_set_expert_source(handle, paged->source.get()) == 0) {
        cudaMemsetAsync(p_out.p, 0xFF, T * H * 2, s);
        paged->store->begin_step();
        const bool ran_store = rt(paged_experts)->onShapeChange(ein, 3, eout, 1) == 0 &&
                               rt(paged_experts)->enqueue(ein, eout, ein_p, eout_p, ws.p, s) == 0;
        cudaStreamSynchronize(s);
        check(ran_store && p_out.host() == out_gpu, "Dsfp4MoeExperts (store: the paging store) equals it too");
        dsfp4_trt_set_expert_source(handle, nullptr);
      } else {
        check(false, "Dsfp4MoeExperts in store mode set up");
      }
      delete paged_experts;
    }
    delete routing;
    delete experts;
#endif
    cudaStreamDestroy(s);
  } else {
    std::printf("no GPU: the CUDA path is not run\n");
  }
#endif
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
