// The expert FFN runner: CPU reference against a plain token-by-token loop (bit-exact), the
// CPU runner over units against it (bit-exact), and where a GPU is present the CUDA runner
// (resident and from an ExpertSource) against the CPU.
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "dsfp4/moe.h"
#include "dsfp4/moe_experts.h"
#include "moe_test_util.h"

namespace {

int g_failures = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                 \
    }                                                                               \
  } while (0)

struct Case {
  int64_t tokens, hidden, inter;
  int experts, top_k;
};

struct Inputs {
  std::vector<uint16_t> x;
  std::vector<float> w;
  std::vector<int32_t> ids;
};

Inputs make_inputs(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Inputs in;
  in.x.resize(c.tokens * c.hidden);
  for (auto& v : in.x) v = dsfp4_test::float_to_bf16(dist(rng));
  std::vector<float> logits(c.tokens * c.experts), bias(c.experts, 0.0f);
  for (auto& v : logits) v = dist(rng);
  in.w.resize(c.tokens * c.top_k);
  in.ids.resize(c.tokens * c.top_k);
  dsfp4::MoeRouteParams rp;
  rp.tokens = c.tokens;
  rp.experts = c.experts;
  rp.top_k = c.top_k;
  rp.n_group = 1;
  rp.topk_group = 1;
  rp.routed_scaling_factor = 2.5f;
  CHECK(dsfp4::moe_route_cpu(logits.data(), dsfp4::DType::kFloat32, bias.data(), rp, in.w.data(), in.ids.data()).ok());
  if (c.tokens > 1) in.ids[1] = -1;  // a dropped pair contributes nothing
  return in;
}

void test_cpu_equals_plain(const Case& c) {
  dsfp4_test::Experts ex;
  CHECK(dsfp4_test::make_experts(ex, c.experts, c.hidden, c.inter, 11));
  const Inputs in = make_inputs(c, 5);
  dsfp4::MoeExpertsParams p{c.tokens, c.hidden, c.inter, c.experts, c.top_k};
  std::vector<uint16_t> out(c.tokens * c.hidden, 0xFFFF);
  const auto st = dsfp4::moe_experts_cpu(p, ex.gate_up(), ex.down(), in.x.data(), in.w.data(), in.ids.data(), out.data());
  CHECK(st.ok());
  const auto want = dsfp4_test::plain_experts(ex, in.x, in.w, in.ids, c.tokens, c.top_k);
  CHECK(dsfp4_test::count_mismatches(out, want, 0.0) == 0);
}

// The runner over units (host memory here) equals the runner over stacked experts bit for bit;
// a token routed to an expert whose address is 0 or misaligned gets a NaN row (never a silently
// wrong one), and the other tokens are unchanged.
void test_units_cpu_equals_resident(const Case& c) {
  dsfp4_test::Experts ex;
  CHECK(dsfp4_test::make_experts(ex, c.experts, c.hidden, c.inter, 13));
  const Inputs in = make_inputs(c, 7);
  dsfp4::MoeExpertsParams p{c.tokens, c.hidden, c.inter, c.experts, c.top_k};
  dsfp4::ExpertTable table;
  const std::vector<uint8_t> units = dsfp4_test::pack_units(ex, &table.layout);
  std::vector<uint64_t> addr(c.experts);
  for (int e = 0; e < c.experts; ++e) addr[e] = reinterpret_cast<uint64_t>(units.data() + e * table.layout.bytes);
  table.unit_addr = addr.data();
  table.num_experts = c.experts;
  std::vector<uint16_t> want(c.tokens * c.hidden), got(want.size(), 0xFFFF);  // NaN-poisoned
  CHECK(dsfp4::moe_experts_cpu(p, ex.gate_up(), ex.down(), in.x.data(), in.w.data(), in.ids.data(), want.data()).ok());
  CHECK(dsfp4::moe_experts_units_cpu(p, table, in.x.data(), in.w.data(), in.ids.data(), got.data()).ok());
  CHECK(got == want);

  const int gone = in.ids[0];                                            // token 0's first expert
  const int skewed = c.tokens > 1 && in.ids[c.top_k] != gone ? in.ids[c.top_k] : -1;  // token 1's first
  addr[gone] = 0;
  if (skewed >= 0) addr[skewed] += 8;
  std::fill(got.begin(), got.end(), 0);
  CHECK(dsfp4::moe_experts_units_cpu(p, table, in.x.data(), in.w.data(), in.ids.data(), got.data()).ok());
  int nan_rows = 0;
  for (int t = 0; t < c.tokens; ++t) {
    bool hit = false;
    for (int k = 0; k < c.top_k; ++k) {
      const int id = in.ids[t * c.top_k + k];
      hit = hit || id == gone || (skewed >= 0 && id == skewed);
    }
    for (int h = 0; h < c.hidden; ++h) {
      const uint16_t v = got[t * c.hidden + h];
      const bool is_nan = (v & 0x7F80) == 0x7F80 && (v & 0x7F) != 0;
      if (hit) CHECK(is_nan);
      else CHECK(v == want[t * c.hidden + h]);
    }
    nan_rows += hit;
  }
  CHECK(nan_rows >= 1 + (skewed >= 0 ? 1 : 0));
  addr[gone] = reinterpret_cast<uint64_t>(units.data() + gone * table.layout.bytes);
  if (skewed >= 0) addr[skewed] -= 8;

  table.num_experts = c.experts + 1;
  auto st = dsfp4::moe_experts_units_cpu(p, table, in.x.data(), in.w.data(), in.ids.data(), got.data());
  CHECK(!st.ok() && st.message().find("expert table holds") != std::string::npos);
  table.num_experts = c.experts;
  table.layout.bytes = table.layout.down_global_scale;  // the down scale would lie past the unit
  st = dsfp4::moe_experts_units_cpu(p, table, in.x.data(), in.w.data(), in.ids.data(), got.data());
  CHECK(!st.ok() && st.message().find("down_global_scale ends at byte") != std::string::npos);
}

void test_bad_arguments() {
  dsfp4::MoeExpertsParams p{4, 40, 32, 8, 2};  // hidden not a multiple of 16
  auto st = dsfp4::moe_experts_check(p);
  CHECK(!st.ok() && st.message().find("hidden") != std::string::npos);
  p.hidden = 32;
  p.top_k = 9;
  st = dsfp4::moe_experts_check(p);
  CHECK(!st.ok() && st.message().find("top_k") != std::string::npos);
  dsfp4::ExpertUnitLayout l;
  l.hidden = 32;
  l.inter = 16;
  l.down_qscale = 8;  // not 16-byte aligned
  st = dsfp4::check_expert_unit_layout(l, 32, 16);
  CHECK(!st.ok() && st.message().find("down_qscale") != std::string::npos);
  st = dsfp4::check_expert_unit_layout(l, 64, 16);
  CHECK(!st.ok() && st.message().find("hidden") != std::string::npos);
}

#if defined(DSFP4_WITH_CUDA)
template <typename T>
T* upload(const std::vector<T>& v) {
  void* p = nullptr;
  if (cudaMalloc(&p, v.size() * sizeof(T) + 16) != cudaSuccess) return nullptr;
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(p);
}

void test_cuda_equals_cpu(const Case& c) {
  dsfp4_test::Experts ex;
  CHECK(dsfp4_test::make_experts(ex, c.experts, c.hidden, c.inter, 12));
  const Inputs in = make_inputs(c, 6);
  dsfp4::MoeExpertsParams p{c.tokens, c.hidden, c.inter, c.experts, c.top_k};
  std::vector<uint16_t> want(c.tokens * c.hidden);
  CHECK(dsfp4::moe_experts_cpu(p, ex.gate_up(), ex.down(), in.x.data(), in.w.data(), in.ids.data(), want.data()).ok());

  auto* dx = upload(in.x);
  auto* dw = upload(in.w);
  auto* dids = upload(in.ids);
  dsfp4::Fp4GroupedWeight gu = ex.gate_up(), dn = ex.down();
  gu.qweight = upload(ex.gu_qw);
  gu.qscale = upload(ex.gu_qs);
  gu.global_scale = upload(ex.gu_gs);
  dn.qweight = upload(ex.dn_qw);
  dn.qscale = upload(ex.dn_qs);
  dn.global_scale = upload(ex.dn_gs);
  const size_t ws_bytes = dsfp4::moe_experts_workspace_bytes(p);
  void *ws = nullptr, *dout = nullptr;
  CHECK(cudaMalloc(&ws, ws_bytes) == cudaSuccess);
  CHECK(cudaMalloc(&dout, want.size() * 2) == cudaSuccess);
  std::vector<uint16_t> got(want.size());

  cudaMemset(dout, 0xFF, want.size() * 2);  // NaN-poisoned: unwritten outputs show
  auto st = dsfp4::moe_experts_cuda(p, gu, dn, dx, dw, dids, dout, ws, ws_bytes, nullptr);
  CHECK(st.ok());
  CHECK(cudaMemcpy(got.data(), dout, got.size() * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(dsfp4_test::count_mismatches(got, want, 2e-2) == 0);

  dsfp4_test::DeviceExpertSource src;
  CHECK(src.init(ex));
  dsfp4::ExpertTable table;
  CHECK(src.acquire(3, dids, c.tokens * c.top_k, nullptr, &table).ok());
  cudaMemset(dout, 0xFF, want.size() * 2);
  st = dsfp4::moe_experts_units_cuda(p, table, dx, dw, dids, dout, ws, ws_bytes, nullptr);
  CHECK(st.ok());
  CHECK(src.release(3, nullptr).ok());
  CHECK(cudaMemcpy(got.data(), dout, got.size() * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(dsfp4_test::count_mismatches(got, want, 2e-2) == 0);
  CHECK(src.requested == in.ids);

  // An expert the source cannot provide contributes zero.
  const int gone = in.ids[0];
  src.drop(gone);
  std::vector<int32_t> ids2 = in.ids;
  for (auto& id : ids2)
    if (id == gone) id = -1;
  std::vector<uint16_t> want2(want.size());
  CHECK(dsfp4::moe_experts_cpu(p, ex.gate_up(), ex.down(), in.x.data(), in.w.data(), ids2.data(), want2.data()).ok());
  CHECK(src.acquire(3, dids, c.tokens * c.top_k, nullptr, &table).ok());
  CHECK(dsfp4::moe_experts_units_cuda(p, table, dx, dw, dids, dout, ws, ws_bytes, nullptr).ok());
  CHECK(cudaMemcpy(got.data(), dout, got.size() * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(dsfp4_test::count_mismatches(got, want2, 2e-2) == 0);

  // Bad sizes and pointers are errors, not crashes.
  CHECK(!dsfp4::moe_experts_cuda(p, gu, dn, dx, dw, dids, dout, ws, 16, nullptr).ok());
  CHECK(!dsfp4::moe_experts_cuda(p, gu, dn, nullptr, dw, dids, dout, ws, ws_bytes, nullptr).ok());
  table.num_experts = c.experts + 1;
  CHECK(!dsfp4::moe_experts_units_cuda(p, table, dx, dw, dids, dout, ws, ws_bytes, nullptr).ok());
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  const void* bufs[] = {dx, dw, dids, gu.qweight, gu.qscale, gu.global_scale,
                        dn.qweight, dn.qscale, dn.global_scale, ws, dout};
  for (const void* q : bufs) cudaFree(const_cast<void*>(q));
}

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
#endif

}  // namespace

int main() {
  const Case cases[] = {{1, 64, 32, 8, 2}, {7, 96, 48, 16, 4}, {33, 128, 64, 12, 3}};
  for (const Case& c : cases) test_cpu_equals_plain(c);
  for (const Case& c : cases) test_units_cpu_equals_resident(c);
  test_bad_arguments();
#if defined(DSFP4_WITH_CUDA)
  if (have_gpu()) {
    const Case gpu_cases[] = {{1, 64, 32, 8, 2}, {7, 96, 48, 16, 4}, {33, 128, 64, 12, 3}, {200, 256, 128, 40, 8}};
    for (const Case& c : gpu_cases) test_cuda_equals_cpu(c);
    std::printf("CUDA expert runner checked against the CPU reference\n");
  } else {
    std::printf("no GPU: CUDA expert runner not run\n");
  }
#endif
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all expert FFN tests passed\n");
  return 0;
}
