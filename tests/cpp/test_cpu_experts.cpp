// CPU experts (cpu_experts.h): every instruction set this CPU can run, forced by name, against
// the C++ reference of the expert runner over units (moe_experts_units_cpu with one expert per
// token); odd token counts and sizes, several experts per call, gathered rows, poisoned
// outputs, async calls, faults that name layer and expert, refusals. Paths this CPU lacks are
// reported as skipped (the AVX-512 ones run on AVX-512 machines).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dsfp4/cpu_experts.h"
#include "dsfp4/moe_experts.h"
#include "dsfp4/paging.h"
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

using dsfp4_test::bf16_to_float;
using dsfp4_test::float_to_bf16;

constexpr uint16_t kPoison = 0xFFFF;  // bf16 NaN
// Tolerance against the reference: |got − want| ≤ kTol·(|want| + 0.01·rms(want)) everywhere.
// The kernels sum in float32 in another order than the reference, so a gate_up or h value can
// land one bf16 step away and move y by a few steps at most.
constexpr double kTol = 1.0 / 32;

// E experts as paging-store units (expert_unit_from_modelopt) or, with store_layout false,
// the test layout with one down global scale (pack_units).
struct Units {
  dsfp4_test::Experts ex;
  dsfp4::ExpertUnitLayout layout;
  std::vector<uint8_t> storage;  // units back to back, 256-byte aligned
  std::vector<uint8_t*> unit;
};

bool make_units(Units& u, int experts, int64_t hidden, int64_t inter, uint32_t seed, bool store_layout) {
  if (!dsfp4_test::make_experts(u.ex, experts, hidden, inter, seed)) return false;
  if (store_layout) {
    if (!dsfp4::paging::expert_unit_layout(hidden, inter, &u.layout).ok()) return false;
  } else {
    u.storage = dsfp4_test::pack_units(u.ex, &u.layout);
  }
  const int64_t bytes = u.layout.bytes;
  std::vector<uint8_t> host(bytes * experts + 256, 0);
  uint8_t* base = host.data() + (256 - reinterpret_cast<uintptr_t>(host.data()) % 256) % 256;
  for (int e = 0; e < experts; ++e) {
    uint8_t* dst = base + e * bytes;
    if (store_layout) {
      using dsfp4::paging::ModeloptLinear;
      const ModeloptLinear gate{u.ex.mo_packed[e * 3].data(), u.ex.mo_scale[e * 3].data(), u.ex.mo_global[e * 3]};
      const ModeloptLinear up{u.ex.mo_packed[e * 3 + 1].data(), u.ex.mo_scale[e * 3 + 1].data(),
                              u.ex.mo_global[e * 3 + 1]};
      const ModeloptLinear down{u.ex.mo_packed[e * 3 + 2].data(), u.ex.mo_scale[e * 3 + 2].data(),
                                u.ex.mo_global[e * 3 + 2]};
      if (!dsfp4::paging::expert_unit_from_modelopt(u.layout, gate, up, down, dst, 2).ok()) return false;
    } else {
      std::memcpy(dst, u.storage.data() + e * bytes, bytes);
    }
  }
  const size_t offset = base - host.data();
  u.storage = std::move(host);
  u.unit.clear();
  for (int e = 0; e < experts; ++e) u.unit.push_back(u.storage.data() + offset + e * bytes);
  return true;
}

// The reference: rows of x through expert e with moe_experts_units_cpu (top_k 1, weight 1).
std::vector<uint16_t> reference(const Units& u, int e, const std::vector<uint16_t>& x, int64_t ldx,
                                const std::vector<int32_t>& rows) {
  const int64_t H = u.layout.hidden, T = static_cast<int64_t>(rows.size());
  std::vector<uint16_t> xe(T * H), out(T * H, kPoison);
  for (int64_t t = 0; t < T; ++t) std::memcpy(&xe[t * H], &x[rows[t] * ldx], H * 2);
  std::vector<uint64_t> addr(u.unit.size());
  for (size_t i = 0; i < addr.size(); ++i) addr[i] = reinterpret_cast<uint64_t>(u.unit[i]);
  dsfp4::ExpertTable table;
  table.unit_addr = addr.data();
  table.num_experts = static_cast<int>(addr.size());
  table.layout = u.layout;
  dsfp4::MoeExpertsParams p{T, H, u.layout.inter, table.num_experts, 1};
  std::vector<float> w(T, 1.0f);
  std::vector<int32_t> ids(T, e);
  CHECK(dsfp4::moe_experts_units_cpu(p, table, xe.data(), w.data(), ids.data(), out.data()).ok());
  return out;
}

// x [rows, ldx]: N(0, 1) in the first `hidden` columns, NaN past them (never read).
std::vector<uint16_t> fill_x(int64_t rows, int64_t hidden, int64_t ldx, uint32_t seed) {
  std::vector<uint16_t> x(rows * ldx, kPoison);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < hidden; ++c) x[r * ldx + c] = float_to_bf16(dist(rng));
  return x;
}

std::vector<std::string> isas_to_test() {
  std::vector<std::string> out;
  const dsfp4::CpuFeatures f = dsfp4::cpu_features();
  for (const char* name : {"avx2", "avx512", "avx512_bf16"}) {
    dsfp4::CpuIsa isa;
    const dsfp4::Status st = dsfp4::cpu_isa_resolve(name, f, &isa);
    if (st.ok())
      out.push_back(name);
    else
      std::printf("skipped isa %s: %s\n", name, st.message().c_str());
  }
  return out;
}

std::unique_ptr<dsfp4::CpuExpertPool> make_pool(const std::string& isa, int threads = 2) {
  dsfp4::CpuExpertsOptions o;
  o.isa = isa;
  o.threads = threads;
  o.spin_us = 50;
  std::unique_ptr<dsfp4::CpuExpertPool> pool;
  const dsfp4::Status st = dsfp4::CpuExpertPool::create(o, &pool);
  if (!st.ok()) std::fprintf(stderr, "pool %s: %s\n", isa.c_str(), st.message().c_str());
  CHECK(st.ok());
  if (pool) CHECK(std::string(dsfp4::cpu_isa_name(pool->isa())) == isa);
  return pool;
}

int cores_here() {
  dsfp4::CpuExpertsOptions o;
  std::unique_ptr<dsfp4::CpuExpertPool> p;
  return dsfp4::CpuExpertPool::create(o, &p).ok() ? p->threads() : 1;
}

// Several experts with different token sets in one call, each against the reference.
void test_against_reference(const std::string& isa, int64_t hidden, int64_t inter, bool store_layout,
                            const std::vector<int64_t>& token_counts, int threads) {
  Units u;
  const int E = 4;
  CHECK(make_units(u, E, hidden, inter, 31 + static_cast<uint32_t>(hidden), store_layout));
  auto pool = make_pool(isa, threads);
  if (!pool) return;
  const int64_t x_rows = 20, ldx = hidden + 8, ldy = hidden + 16;
  const std::vector<uint16_t> x = fill_x(x_rows, hidden, ldx, 5);
  std::mt19937 rng(17);
  std::vector<std::vector<int32_t>> rows(token_counts.size());
  std::vector<std::vector<uint16_t>> y(token_counts.size());
  std::vector<dsfp4::CpuExpertJob> jobs(token_counts.size());
  for (size_t j = 0; j < token_counts.size(); ++j) {
    for (int64_t t = 0; t < token_counts[j]; ++t) rows[j].push_back(static_cast<int32_t>(rng() % x_rows));
    y[j].assign(std::max<int64_t>(1, token_counts[j]) * ldy, kPoison);
    jobs[j].expert = static_cast<int>(j % E);
    jobs[j].unit = u.unit[j % E];
    jobs[j].rows = rows[j].data();
    jobs[j].tokens = token_counts[j];
    jobs[j].y = y[j].data();
    jobs[j].ldy = ldy;
  }
  dsfp4::CpuExpertsCall call;
  call.layer = 3;
  call.layout = u.layout;
  call.x = x.data();
  call.x_rows = x_rows;
  call.ldx = ldx;
  call.jobs = jobs.data();
  call.count = static_cast<int>(jobs.size());
  dsfp4::CpuExpertsStats stats;
  const dsfp4::Status st = pool->run(call, &stats);
  if (!st.ok()) std::fprintf(stderr, "%s\n", st.message().c_str());
  CHECK(st.ok());
  int64_t nonzero = 0;
  for (auto t : token_counts) nonzero += t > 0;
  CHECK(stats.experts == nonzero);
  int64_t equal = 0, total = 0;
  double worst = 0.0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const std::vector<uint16_t> want = reference(u, jobs[j].expert, x, ldx, rows[j]);
    std::vector<uint16_t> got(want.size());
    for (int64_t t = 0; t < jobs[j].tokens; ++t) {
      std::memcpy(&got[t * hidden], &y[j][t * ldy], hidden * 2);
      for (int64_t c = hidden; c < ldy; ++c) CHECK(y[j][t * ldy + c] == kPoison);  // nothing past hidden
    }
    const int64_t bad = dsfp4_test::count_mismatches(got, want, kTol);
    if (bad) std::fprintf(stderr, "%s %lldx%lld job %zu: %lld of %zu outside tolerance\n", isa.c_str(),
                          (long long)hidden, (long long)inter, j, (long long)bad, got.size());
    CHECK(bad == 0);
    double ss = 0.0;
    for (uint16_t v : want) ss += double(bf16_to_float(v)) * bf16_to_float(v);
    const double rms = want.empty() ? 1.0 : std::sqrt(ss / want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      equal += got[i] == want[i];
      worst = std::max(worst, std::fabs(double(bf16_to_float(got[i])) - bf16_to_float(want[i])) / rms);
    }
    total += static_cast<int64_t>(got.size());
  }
  // Most outputs are bit-equal: a wrong scale, row or column would change nearly all of them.
  CHECK(total == 0 || equal * 10 >= total * 7);
  std::printf("%-12s hidden %4lld inter %4lld %s threads %d: %lld/%lld outputs bit-equal, max |diff|/rms %.2e\n",
              isa.c_str(), (long long)hidden, (long long)inter, store_layout ? "store units" : "test units ", threads,
              (long long)equal, (long long)total, worst);
}

// submit() returns at once; handles complete in any order; callbacks run once; the pool keeps
// working after a fault, which names layer and expert and leaves that job's y untouched.
void test_async_and_faults(const std::string& isa) {
  Units u;
  const int64_t H = 128, I = 64;
  CHECK(make_units(u, 3, H, I, 77, true));
  auto pool = make_pool(isa);
  if (!pool) return;
  const int64_t T = 5;
  const std::vector<uint16_t> x = fill_x(T, H, H, 9);
  std::vector<int32_t> rows = {0, 1, 2, 3, 4};
  const int kCalls = 6;
  std::vector<std::vector<uint16_t>> y(kCalls * 3, std::vector<uint16_t>(T * H, kPoison));
  std::vector<std::vector<dsfp4::CpuExpertJob>> jobs(kCalls);
  std::vector<std::shared_ptr<dsfp4::CpuExpertsHandle>> handles(kCalls);
  std::vector<int> callbacks(kCalls, 0);
  std::vector<std::string> callback_msg(kCalls);
  pool->inject_fault(7, 1);  // layer 7, expert 1: call 2's second job
  for (int c = 0; c < kCalls; ++c) {
    for (int e = 0; e < 3; ++e) {
      dsfp4::CpuExpertJob j;
      j.expert = e;
      j.unit = u.unit[e];
      j.rows = rows.data();
      j.tokens = T;
      j.y = y[c * 3 + e].data();
      j.ldy = H;
      jobs[c].push_back(j);
    }
    dsfp4::CpuExpertsCall call;
    call.layer = c == 2 ? 7 : c;
    call.layout = u.layout;
    call.x = x.data();
    call.x_rows = T;
    call.ldx = H;
    call.jobs = jobs[c].data();
    call.count = 3;
    CHECK(pool->submit(call, &handles[c], [&callbacks, &callback_msg, c](const dsfp4::Status& st) {
                ++callbacks[c];
                callback_msg[c] = st.message();
              }).ok());
  }
  for (int c = kCalls - 1; c >= 0; --c) {
    const dsfp4::Status st = handles[c]->wait();
    CHECK(handles[c]->done());
    CHECK(callbacks[c] == 1);
    if (c == 2) {
      CHECK(!st.ok());
      CHECK(st.message().find("layer 7 expert 1") != std::string::npos);
      CHECK(st.message().find("injected") != std::string::npos);
      CHECK(callback_msg[c] == st.message());
    } else {
      CHECK(st.ok());
    }
    for (int e = 0; e < 3; ++e) {
      const std::vector<uint16_t> want = reference(u, e, x, H, rows);
      if (c == 2 && e == 1) {
        for (uint16_t v : y[c * 3 + e]) CHECK(v == kPoison);  // the failed job's y is untouched
      } else {
        CHECK(dsfp4_test::count_mismatches(y[c * 3 + e], want, kTol) == 0);
      }
    }
  }

  // A NaN or negative block scale and a NaN global scale: the job fails, naming it.
  std::vector<uint8_t> bad(u.layout.bytes + 256);
  uint8_t* unit = bad.data() + (256 - reinterpret_cast<uintptr_t>(bad.data()) % 256) % 256;
  std::vector<uint16_t> yb(T * H, kPoison);
  for (int which = 0; which < 4; ++which) {
    std::memcpy(unit, u.unit[0], u.layout.bytes);
    if (which == 0) unit[u.layout.gate_up_qscale + 3] = 0x7F;
    if (which == 3) unit[u.layout.gate_up_qscale + 700] = 0xB8;  // negative: never written by the repack
    if (which == 1) unit[u.layout.down_qscale + 1] = 0xFF;
    if (which == 2) {
      const float nan = std::nanf("");
      std::memcpy(unit + u.layout.down_global_scale, &nan, 4);
    }
    dsfp4::CpuExpertJob j;
    j.expert = 42;
    j.unit = unit;
    j.tokens = T;
    j.y = yb.data();
    j.ldy = H;
    dsfp4::CpuExpertsCall call;
    call.layer = 11;
    call.layout = u.layout;
    call.x = x.data();
    call.x_rows = T;
    call.ldx = H;
    call.jobs = &j;
    call.count = 1;
    const dsfp4::Status st = pool->run(call);
    CHECK(!st.ok());
    CHECK(st.message().find("layer 11 expert 42") != std::string::npos);
    CHECK(st.message().find(which == 2 ? "global scale" : "block scale") != std::string::npos);
    for (uint16_t v : yb) CHECK(v == kPoison);
  }

  // NaN in x: a non-finite output is refused rather than handed on.
  {
    std::vector<uint16_t> xn = x;
    xn[H + 3] = 0x7FC0;
    dsfp4::CpuExpertJob j;
    j.expert = 2;
    j.unit = u.unit[2];
    j.tokens = T;
    j.y = yb.data();
    j.ldy = H;
    dsfp4::CpuExpertsCall call;
    call.layer = 12;
    call.layout = u.layout;
    call.x = xn.data();
    call.x_rows = T;
    call.ldx = H;
    call.jobs = &j;
    call.count = 1;
    const dsfp4::Status st = pool->run(call);
    CHECK(!st.ok() && st.message().find("layer 12 expert 2") != std::string::npos &&
          st.message().find("not finite") != std::string::npos);
  }

  // Bad arguments are refused before anything runs.
  {
    std::vector<uint16_t> yc(T * H, kPoison);
    dsfp4::CpuExpertJob j;
    j.expert = 5;
    j.unit = u.unit[0];
    j.rows = rows.data();
    j.tokens = T;
    j.y = yc.data();
    j.ldy = H;
    dsfp4::CpuExpertsCall call;
    call.layer = 1;
    call.layout = u.layout;
    call.x = x.data();
    call.x_rows = T;
    call.ldx = H;
    call.jobs = &j;
    call.count = 1;
    auto refused = [&](const char* what) {
      const dsfp4::Status st = pool->run(call);
      const bool ok = !st.ok() && st.code() == dsfp4::StatusCode::kInvalidArgument &&
                      st.message().find(what) != std::string::npos;
      if (!ok) std::fprintf(stderr, "expected a refusal naming '%s', got '%s'\n", what, st.message().c_str());
      CHECK(ok);
    };
    j.unit = u.unit[0] + 8;
    refused("16-byte aligned");
    j.unit = u.unit[0];
    std::vector<int32_t> bad_rows = {0, 1, 5, 2, 3};
    j.rows = bad_rows.data();
    refused("rows[2] = 5");
    j.rows = rows.data();
    j.ldy = H - 1;
    refused("ldy");
    j.ldy = H;
    call.layout.inter = 40;
    refused("multiples of 16");
    call.layout = u.layout;
    for (uint16_t v : yc) CHECK(v == kPoison);
    // an empty call and a job without tokens finish at once
    j.tokens = 0;
    std::shared_ptr<dsfp4::CpuExpertsHandle> h;
    CHECK(pool->submit(call, &h).ok() && h->done() && h->wait().ok());
    CHECK(pool->run(call).ok());
  }

  // The pool still works.
  {
    std::vector<uint16_t> yc(T * H, kPoison);
    dsfp4::CpuExpertJob j;
    j.expert = 1;
    j.unit = u.unit[1];
    j.rows = rows.data();
    j.tokens = T;
    j.y = yc.data();
    j.ldy = H;
    dsfp4::CpuExpertsCall call;
    call.layer = 7;
    call.layout = u.layout;
    call.x = x.data();
    call.x_rows = T;
    call.ldx = H;
    call.jobs = &j;
    call.count = 1;
    CHECK(pool->run(call).ok());
    CHECK(dsfp4_test::count_mismatches(yc, reference(u, 1, x, H, rows), kTol) == 0);
  }

  std::vector<uint8_t> buf(8 << 20, 1);
  double gbs = 0.0;
  CHECK(pool->read_bandwidth(buf.data(), buf.size(), 2, &gbs).ok() && gbs > 0.0);
}

void test_isa_choice() {
  dsfp4::CpuFeatures none;
  dsfp4::CpuIsa isa;
  dsfp4::Status st = dsfp4::cpu_isa_resolve("auto", none, &isa);
  CHECK(st.code() == dsfp4::StatusCode::kUnsupported && st.message().find("AVX2") != std::string::npos &&
        st.message().find("off") != std::string::npos);
  dsfp4::CpuFeatures avx2;
  avx2.avx2 = avx2.fma = avx2.os_avx = true;
  CHECK(dsfp4::cpu_isa_resolve("auto", avx2, &isa).ok() && isa == dsfp4::CpuIsa::kAvx2);
  st = dsfp4::cpu_isa_resolve("avx512", avx2, &isa);
  CHECK(st.code() == dsfp4::StatusCode::kUnsupported && st.message().find("AVX512F") != std::string::npos);
  dsfp4::CpuFeatures wide = avx2;
  wide.avx512f = wide.avx512bw = wide.avx512vl = wide.os_avx512 = true;
  CHECK(dsfp4::cpu_isa_resolve("auto", wide, &isa).ok() && isa == dsfp4::CpuIsa::kAvx512);
  st = dsfp4::cpu_isa_resolve("avx512_bf16", wide, &isa);
  CHECK(st.code() == dsfp4::StatusCode::kUnsupported && st.message().find("AVX512_BF16") != std::string::npos);
  wide.os_avx512 = false;  // the OS does not save ZMM state
  CHECK(dsfp4::cpu_isa_resolve("auto", wide, &isa).ok() && isa == dsfp4::CpuIsa::kAvx2);
  CHECK(dsfp4::cpu_isa_resolve("sse2", avx2, &isa).code() == dsfp4::StatusCode::kInvalidArgument);

  dsfp4::CpuExpertsOptions o;
  std::unique_ptr<dsfp4::CpuExpertPool> pool;
  o.cores = {100000};
  CHECK(dsfp4::CpuExpertPool::create(o, &pool).code() == dsfp4::StatusCode::kInvalidArgument);
  o.cores = {};
  o.threads = 4096;
  CHECK(dsfp4::CpuExpertPool::create(o, &pool).code() == dsfp4::StatusCode::kInvalidArgument);
  o.threads = 0;
  o.isa = "bogus";
  CHECK(dsfp4::CpuExpertPool::create(o, &pool).code() == dsfp4::StatusCode::kInvalidArgument);
}

}  // namespace

int main() {
  test_isa_choice();
  const int threads = std::min(2, cores_here());
  for (const std::string& isa : isas_to_test()) {
    test_against_reference(isa, 256, 128, true, {1, 3, 5, 17}, threads);
    test_against_reference(isa, 96, 48, true, {1, 5, 0, 3}, threads);  // K not a multiple of 64
    test_against_reference(isa, 160, 208, false, {2, 17, 8, 4}, 1);    // one down global scale
    test_against_reference(isa, 512, 384, true, {16, 1}, threads);
    test_async_and_faults(isa);
  }
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("cpu experts: all checks passed\n");
  return 0;
}
