// ExpertStoreSource: the paging store (GPU slots ← host cache ← a safetensors checkpoint written
// here) serving the expert runner. Over several steps with changing routings and fewer GPU
// slots than experts, the paged runner must equal the runner over resident experts bit for
// bit: in CPU mode against the CPU reference, on a GPU (when present) against the CUDA runner
// over resident experts (same kernels) and, within bf16 rounding, against the CPU reference.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "dsfp4/moe_experts.h"
#include "dsfp4/paging.h"
#include "moe_test_util.h"
#include "safetensors_util.h"

namespace {

namespace pg = dsfp4::paging;

int g_failures = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                 \
    }                                                                               \
  } while (0)

bool check_ok(const dsfp4::Status& st, const char* what) {
  if (!st.ok()) std::fprintf(stderr, "%s: %s\n", what, st.message().c_str());
  return st.ok();
}

constexpr int kLayers = 2, kExperts = 12, kTopK = 2, kGpuSlots = 4, kHostSlots = 7;
constexpr int64_t kHidden = 128, kInter = 64;

// One step of one layer: tokens routed to at most `distinct` experts (chosen per step, so the
// set moves across steps), one dropped pair (-1).
struct Step {
  int64_t tokens;
  std::vector<uint16_t> x;
  std::vector<float> w;
  std::vector<int32_t> ids;
};

Step make_step(std::mt19937& rng, int64_t tokens, int distinct) {
  std::normal_distribution<float> n01(0.0f, 1.0f);
  std::uniform_real_distribution<float> u01(0.1f, 1.0f);
  std::vector<int32_t> pool(kExperts);
  for (int e = 0; e < kExperts; ++e) pool[e] = e;
  std::shuffle(pool.begin(), pool.end(), rng);
  pool.resize(static_cast<size_t>(distinct));
  Step s;
  s.tokens = tokens;
  s.x.resize(tokens * kHidden);
  for (auto& v : s.x) v = dsfp4_test::float_to_bf16(n01(rng));
  s.w.resize(tokens * kTopK);
  for (auto& v : s.w) v = u01(rng);
  s.ids.resize(tokens * kTopK);
  for (int64_t t = 0; t < tokens; ++t) {  // a token picks distinct experts
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int j = 0; j < kTopK; ++j) s.ids[t * kTopK + j] = pool[j];
  }
  if (tokens > 1) s.ids[kTopK] = -1;
  return s;
}

struct Fixture {
  std::string dir, path;
  std::vector<dsfp4_test::Experts> layers;
  std::vector<pg::StoredExpert> stored;
  dsfp4::ExpertUnitLayout layout;
};

bool make_fixture(Fixture* f) {
  char tmpl[] = "/tmp/dsfp4_store_source_XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return false;
  f->dir = tmpl;
  f->path = f->dir + "/model-00001-of-00001.safetensors";
  f->layers.resize(kLayers);
  for (int l = 0; l < kLayers; ++l)
    if (!dsfp4_test::make_experts(f->layers[l], kExperts, kHidden, kInter, 40 + l)) return false;
  return dsfp4_test::write_expert_checkpoint(f->path, f->layers, 3, &f->stored) &&
         check_ok(pg::expert_unit_layout(kHidden, kInter, &f->layout), "expert_unit_layout");
}

std::unique_ptr<pg::ExpertStore> make_store(const Fixture& f, bool on_device, pg::MissMode miss, void* gpu_base) {
  std::unique_ptr<pg::CheckpointFiles> files;
  if (!check_ok(pg::CheckpointFiles::open({f.path}, true, &files), "CheckpointFiles::open")) return nullptr;
  pg::ExpertStoreOptions o;
  o.layers = kLayers;
  o.experts = kExperts;
  o.hidden = kHidden;
  o.inter = kInter;
  o.gpu_slots = kGpuSlots;
  o.gpu_base = gpu_base;
  o.host_slots = kHostSlots;
  o.pinned = on_device;
  o.on_device = on_device;
  o.miss_mode = miss;
  o.io_threads = 2;
  o.repack_threads = 1;
  std::unique_ptr<pg::ExpertStore> store;
  if (!check_ok(pg::ExpertStore::create(o, std::shared_ptr<pg::CheckpointFiles>(std::move(files)), f.stored, &store),
                "ExpertStore::create"))
    return nullptr;
  return store;
}

// Steps of both layers. Every expert of a step must fit in the host cache, and with kCopy in
// a GPU slot too; zero-copy (kAuto) serves more experts than there are slots.
std::vector<std::vector<Step>> make_steps(pg::MissMode miss, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t tokens[] = {1, 5, 3, 9, 2, 7};
  std::vector<std::vector<Step>> steps;
  for (int64_t t : tokens) {
    std::vector<Step> per_layer;
    for (int l = 0; l < kLayers; ++l)
      per_layer.push_back(make_step(rng, t, miss == pg::MissMode::kCopy ? kGpuSlots : kHostSlots - 1));
    steps.push_back(per_layer);
  }
  return steps;
}

void check_paging_happened(const pg::ExpertStore& store, pg::MissMode miss) {
  const pg::ExpertCounters c = store.counters(-1);
  CHECK(c.evictions > 0);                                   // the slots were reused
  CHECK(c.ssd_reads > static_cast<uint64_t>(kHostSlots));  // the host cache too
  if (miss == pg::MissMode::kCopy) CHECK(c.copies > static_cast<uint64_t>(kGpuSlots));
  if (miss != pg::MissMode::kCopy) CHECK(c.zero_copy > 0);
}

// ---- CPU mode -------------------------------------------------------------------------------

void test_cpu(const Fixture& f, pg::MissMode miss) {
  std::vector<uint8_t> gpu(static_cast<size_t>(kGpuSlots * f.layout.bytes + 256));
  void* base = gpu.data() + (256 - reinterpret_cast<uintptr_t>(gpu.data()) % 256) % 256;
  auto store = make_store(f, false, miss, base);
  CHECK(store != nullptr);
  if (!store) return;
  std::unique_ptr<pg::ExpertStoreSource> src;
  CHECK(check_ok(pg::ExpertStoreSource::create(store.get(), &src), "ExpertStoreSource::create"));
  dsfp4::ExpertTable table;
  const int32_t one = 0;
  auto st = src->acquire(0, &one, 1, nullptr, &table);  // no device tables yet
  CHECK(!st.ok() && st.message().find("set_device_tables") != std::string::npos);
  std::vector<uint64_t> tables(kLayers * kExperts, 0);
  store->set_device_tables(tables.data());
  st = src->acquire(kLayers, &one, 1, nullptr, &table);
  CHECK(!st.ok() && st.message().find("layer 2") != std::string::npos);

  const auto steps = make_steps(miss, 7 + static_cast<uint32_t>(miss));
  int compared = 0;
  for (const auto& per_layer : steps) {
    store->begin_step();
    for (int l = 0; l < kLayers; ++l) {
      const Step& s = per_layer[l];
      const dsfp4::MoeExpertsParams p{s.tokens, kHidden, kInter, kExperts, kTopK};
      std::vector<uint16_t> want(s.tokens * kHidden), got(s.tokens * kHidden, 0xFFFF);  // NaN-poisoned
      CHECK(dsfp4::moe_experts_cpu(p, f.layers[l].gate_up(), f.layers[l].down(), s.x.data(), s.w.data(),
                                   s.ids.data(), want.data())
                .ok());
      if (!check_ok(src->acquire(l, s.ids.data(), s.tokens * kTopK, nullptr, &table), "acquire")) {
        ++g_failures;
        continue;
      }
      CHECK(table.unit_addr == tables.data() + l * kExperts && table.num_experts == kExperts);
      CHECK(table.layout.bytes == f.layout.bytes && table.layout.gate_up_scale_per_tile &&
            table.layout.down_scale_per_tile);
      CHECK(check_ok(dsfp4::moe_experts_units_cpu(p, table, s.x.data(), s.w.data(), s.ids.data(), got.data()),
                     "moe_experts_units_cpu"));
      CHECK(src->release(l, nullptr).ok());
      CHECK(got == want);
      ++compared;
      if (l == 1) {  // the comparison can fail: layer 0's experts do not give layer 1's output
        std::vector<uint16_t> wrong(s.tokens * kHidden);
        CHECK(dsfp4::moe_experts_cpu(p, f.layers[0].gate_up(), f.layers[0].down(), s.x.data(), s.w.data(),
                                     s.ids.data(), wrong.data())
                  .ok());
        CHECK(wrong != got);
      }
    }
  }
  CHECK(compared == static_cast<int>(steps.size()) * kLayers);
  CHECK(src->acquired() == compared);
  check_paging_happened(*store, miss);

  // A failing read is an error naming the file and tensor; the store stays consistent and
  // serves the expert once the file reads again.
  int32_t cold = -1;
  for (int e = 0; e < kExperts && cold < 0; ++e)
    if (store->host_unit(1, e) == nullptr) cold = e;
  CHECK(cold >= 0);
  if (cold < 0) return;
  const std::vector<int32_t> cold_ids = {cold, -1};
  store->files().inject_fault(0, 0);
  store->begin_step();
  st = src->acquire(1, cold_ids.data(), 2, nullptr, &table);
  CHECK(!st.ok() && st.message().find(f.path) != std::string::npos &&
        st.message().find("model.layers.4.mlp.experts." + std::to_string(cold) + ".") != std::string::npos);
  store->files().inject_fault(0, -1);
  std::mt19937 rng(5);
  Step s = make_step(rng, 1, kTopK);
  s.ids = cold_ids;
  const dsfp4::MoeExpertsParams p{1, kHidden, kInter, kExperts, kTopK};
  std::vector<uint16_t> want(kHidden), got(kHidden, 0xFFFF);
  CHECK(dsfp4::moe_experts_cpu(p, f.layers[1].gate_up(), f.layers[1].down(), s.x.data(), s.w.data(), s.ids.data(),
                               want.data())
            .ok());
  CHECK(check_ok(src->acquire(1, cold_ids.data(), 2, nullptr, &table), "acquire after the fault"));
  CHECK(dsfp4::moe_experts_units_cpu(p, table, s.x.data(), s.w.data(), s.ids.data(), got.data()).ok());
  CHECK(got == want);
}

// ---- CUDA -----------------------------------------------------------------------------------

#if defined(DSFP4_WITH_CUDA)
template <typename T>
T* upload(const std::vector<T>& v) {
  void* p = nullptr;
  if (cudaMalloc(&p, v.size() * sizeof(T) + 16) != cudaSuccess) return nullptr;
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(p);
}

template <typename T>
std::vector<T> download(const T* p, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

void test_cuda(const Fixture& f, pg::MissMode miss) {
  void *gpu = nullptr, *tables = nullptr;
  CHECK(cudaMalloc(&gpu, kGpuSlots * f.layout.bytes) == cudaSuccess);
  CHECK(cudaMalloc(&tables, kLayers * kExperts * 8) == cudaSuccess);
  cudaMemset(tables, 0, kLayers * kExperts * 8);
  auto store = make_store(f, true, miss, gpu);
  CHECK(store != nullptr);
  if (!store) return;
  store->set_device_tables(static_cast<uint64_t*>(tables));
  std::unique_ptr<pg::ExpertStoreSource> src;
  CHECK(check_ok(pg::ExpertStoreSource::create(store.get(), &src), "ExpertStoreSource::create"));
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream) == cudaSuccess);

  // resident copies of both layers' experts for the CUDA runner over resident weights
  std::vector<std::vector<void*>> owned(kLayers);
  std::vector<dsfp4::Fp4GroupedWeight> gu(kLayers), dn(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    const auto& ex = f.layers[l];
    gu[l] = ex.gate_up();
    dn[l] = ex.down();
    gu[l].qweight = upload(ex.gu_qw);
    gu[l].qscale = upload(ex.gu_qs);
    gu[l].global_scale = upload(ex.gu_gs);
    dn[l].qweight = upload(ex.dn_qw);
    dn[l].qscale = upload(ex.dn_qs);
    dn[l].global_scale = upload(ex.dn_gs);
    owned[l] = {const_cast<uint32_t*>(gu[l].qweight), const_cast<uint8_t*>(gu[l].qscale),
                const_cast<float*>(gu[l].global_scale), const_cast<uint32_t*>(dn[l].qweight),
                const_cast<uint8_t*>(dn[l].qscale), const_cast<float*>(dn[l].global_scale)};
  }
  const auto steps = make_steps(miss, 70 + static_cast<uint32_t>(miss));
  for (const auto& per_layer : steps) {
    store->begin_step();
    for (int l = 0; l < kLayers; ++l) {
      const Step& s = per_layer[l];
      const dsfp4::MoeExpertsParams p{s.tokens, kHidden, kInter, kExperts, kTopK};
      const size_t n = static_cast<size_t>(s.tokens * kHidden);
      std::vector<uint16_t> want(n);
      CHECK(dsfp4::moe_experts_cpu(p, f.layers[l].gate_up(), f.layers[l].down(), s.x.data(), s.w.data(),
                                   s.ids.data(), want.data())
                .ok());
      auto* dx = upload(s.x);
      auto* dw = upload(s.w);
      auto* dids = upload(s.ids);
      const size_t ws_bytes = dsfp4::moe_experts_workspace_bytes(p);
      void *ws = nullptr, *resident = nullptr, *paged = nullptr;
      CHECK(cudaMalloc(&ws, ws_bytes) == cudaSuccess);
      CHECK(cudaMalloc(&resident, n * 2) == cudaSuccess);
      CHECK(cudaMalloc(&paged, n * 2) == cudaSuccess);
      cudaMemsetAsync(resident, 0xFF, n * 2, stream);  // NaN-poisoned
      cudaMemsetAsync(paged, 0xFF, n * 2, stream);
      CHECK(dsfp4::moe_experts_cuda(p, gu[l], dn[l], dx, dw, dids, resident, ws, ws_bytes, stream).ok());
      dsfp4::ExpertTable table;
      if (check_ok(src->acquire(l, dids, s.tokens * kTopK, stream, &table), "acquire")) {
        CHECK(check_ok(dsfp4::moe_experts_units_cuda(p, table, dx, dw, dids, paged, ws, ws_bytes, stream),
                       "moe_experts_units_cuda"));
        CHECK(src->release(l, stream).ok());
      } else {
        ++g_failures;
      }
      CHECK(cudaStreamSynchronize(stream) == cudaSuccess);
      const auto got = download(static_cast<uint16_t*>(paged), n);
      CHECK(got == download(static_cast<uint16_t*>(resident), n));
      CHECK(dsfp4_test::count_mismatches(got, want, 2e-2) == 0);
      for (void* q : {static_cast<void*>(dx), static_cast<void*>(dw), static_cast<void*>(dids), ws, resident, paged})
        cudaFree(q);
    }
  }
  check_paging_happened(*store, miss);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  src.reset();
  store.reset();
  cudaStreamDestroy(stream);
  for (auto& v : owned)
    for (void* q : v) cudaFree(q);
  cudaFree(gpu);
  cudaFree(tables);
}

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
#endif

}  // namespace

int main() {
  Fixture f;
  if (!make_fixture(&f)) {
    std::fprintf(stderr, "could not write the test checkpoint\n");
    return 1;
  }
  std::unique_ptr<pg::ExpertStoreSource> none;
  CHECK(!pg::ExpertStoreSource::create(nullptr, &none).ok());
  for (pg::MissMode miss : {pg::MissMode::kCopy, pg::MissMode::kAuto}) test_cpu(f, miss);
  std::printf("CPU mode: paged experts compared with the resident CPU reference\n");
#if defined(DSFP4_WITH_CUDA)
  if (have_gpu()) {
    for (pg::MissMode miss : {pg::MissMode::kCopy, pg::MissMode::kAuto}) test_cuda(f, miss);
    std::printf("GPU: paged experts compared with the resident CUDA runner\n");
  } else {
    std::printf("no GPU: the CUDA store is not run\n");
  }
#endif
  std::remove(f.path.c_str());
  rmdir(f.dir.c_str());
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all expert store source tests passed\n");
  return 0;
}
