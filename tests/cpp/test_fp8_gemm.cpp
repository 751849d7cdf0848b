// C++ tests of the FP8 block GEMM CPU references, activation and block quantization and the FP8
// expert unit, against float64 computed here from the raw bytes (run by ctest, no GPU needed).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dsfp4/fp8_gemm.h"
#include "dsfp4/nvfp4.h"

namespace {

int g_failures = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                 \
    }                                                                               \
  } while (0)

float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

struct Weight {
  int64_t n, k, split;
  std::vector<uint8_t> q;
  std::vector<float> s;
  dsfp4::Fp8Weight view() const {
    dsfp4::Fp8Weight w;
    w.weight = q.data();
    w.scale = s.data();
    w.n = n;
    w.k = k;
    w.split_rows = split;
    return w;
  }
  // dequantized element, as the format defines it (split: two stacked block grids)
  double at(int64_t r, int64_t c) const {
    const int64_t sc = (k + 127) / 128;
    int64_t sr = r / 128;
    if (split > 0 && r >= split) sr = (split + 127) / 128 + (r - split) / 128;
    return static_cast<double>(dsfp4::e4m3_to_float(q[r * k + c]) * s[sr * sc + c / 128]);
  }
};

Weight random_weight(int64_t n, int64_t k, int64_t split, std::mt19937& rng) {
  Weight w{n, k, split, {}, {}};
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.001f, 0.05f);
  w.q.resize(n * k);
  for (auto& b : w.q) {
    int v = byte(rng);
    if ((v & 0x7F) == 0x7F) v = 0x30;  // no NaN codes
    b = static_cast<uint8_t>(v);
  }
  w.s.resize(dsfp4::fp8_scale_rows(n, split) * dsfp4::fp8_scale_cols(k));
  for (auto& v : w.s) v = scale(rng);
  return w;
}

std::vector<uint16_t> random_x(int64_t m, int64_t ld, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<uint16_t> x(m * ld);
  for (auto& v : x) v = float_to_bf16(d(rng));
  return x;
}

bool close(uint16_t got, double want) {
  const double g = bf16_to_float(got);
  return std::isfinite(g) && std::fabs(g - want) <= std::fabs(want) * (1.0 / 128) + 1e-6;
}

void test_gemm_against_float64() {
  std::mt19937 rng(7);
  const int64_t shapes[][3] = {{1, 1, 0}, {77, 200, 0}, {130, 144, 0}, {300, 264, 0}, {200, 48, 70}, {260, 130, 128}};
  for (const auto& sh : shapes) {
    const int64_t n = sh[0], k = sh[1], split = sh[2];
    const Weight w = random_weight(n, k, split, rng);
    for (int64_t m : {1, 3, 17}) {
      const int64_t ldx = k + 5, ldy = n + 3;
      const auto x = random_x(m, ldx, rng);
      std::vector<uint16_t> y(m * ldy, 0xFFFFu);  // NaN-poisoned
      CHECK(dsfp4::fp8_gemm_cpu(w.view(), x.data(), ldx, y.data(), ldy, m).ok());
      int bad = 0;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = 0; r < n; ++r) {
          double acc = 0.0;
          for (int64_t c = 0; c < k; ++c) acc += static_cast<double>(bf16_to_float(x[i * ldx + c])) * w.at(r, c);
          bad += !close(y[i * ldy + r], acc);
        }
      for (int64_t i = 0; i < m; ++i)  // padding columns of y stay as they were
        for (int64_t r = n; r < ldy; ++r) bad += y[i * ldy + r] != 0xFFFFu;
      CHECK(bad == 0);
    }
  }
}

void test_act_quant_and_blockscaled() {
  std::mt19937 rng(11);
  const int64_t m = 5, k = 272, ldx = 280;
  auto x = random_x(m, ldx, rng);
  for (int64_t c = 128; c < 256; ++c) x[2 * ldx + c] = 0;  // an all-zero group: scale 1
  const int64_t groups = (k + 127) / 128, ld_s = m + 3;
  std::vector<uint8_t> xq(m * k, 0xAB);
  std::vector<float> s(groups * ld_s, -1.0f);
  CHECK(dsfp4::fp8_act_quant_cpu(x.data(), ldx, m, k, xq.data(), k, s.data(), ld_s).ok());
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < groups; ++j) {
      float amax = 0.0f;
      for (int64_t c = 128 * j; c < std::min<int64_t>(k, 128 * j + 128); ++c)
        amax = std::max(amax, std::fabs(bf16_to_float(x[r * ldx + c])));
      const float want = amax > 0 ? amax / 448.0f : 1.0f;
      CHECK(s[j * ld_s + r] == want);
      for (int64_t c = 128 * j; c < std::min<int64_t>(k, 128 * j + 128); ++c)
        CHECK(xq[r * k + c] == dsfp4::float_to_e4m3(bf16_to_float(x[r * ldx + c]) / want));
    }
  CHECK(s[1 * ld_s + 2] == 1.0f);

  // the block-scaled GEMM: quantized x times the weight, scales per 128 columns
  const Weight w = random_weight(140, k, 0, rng);
  std::vector<uint16_t> y(m * 140, 0xFFFFu);
  CHECK(dsfp4::fp8_gemm_blockscaled_cpu(w.view(), x.data(), ldx, y.data(), 140, m).ok());
  int bad = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < 140; ++r) {
      double acc = 0.0;
      for (int64_t c = 0; c < k; ++c)
        acc += static_cast<double>(dsfp4::e4m3_to_float(xq[i * k + c])) * s[(c / 128) * ld_s + i] * w.at(r, c);
      bad += !close(y[i * 140 + r], acc);
    }
  CHECK(bad == 0);
}

void test_block_quantize() {
  std::mt19937 rng(3);
  const int64_t rows = 200, cols = 300;
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::vector<float> src(rows * cols);
  for (auto& v : src) v = d(rng);
  for (int64_t r = 128; r < 200; ++r)
    for (int64_t c = 0; c < 128; ++c) src[r * cols + c] = 0.0f;  // block (1, 0) all zero
  dsfp4::MatrixSource ms;
  ms.data = src.data();
  ms.dtype = dsfp4::DType::kFloat32;
  std::vector<uint8_t> q(rows * cols);
  std::vector<float> s(2 * 3);
  CHECK(dsfp4::fp8_block_quantize_cpu(ms, rows, cols, q.data(), s.data()).ok());
  for (int64_t bi = 0; bi < 2; ++bi)
    for (int64_t bj = 0; bj < 3; ++bj) {
      float amax = 0.0f;
      for (int64_t r = 128 * bi; r < std::min<int64_t>(rows, 128 * bi + 128); ++r)
        for (int64_t c = 128 * bj; c < std::min<int64_t>(cols, 128 * bj + 128); ++c)
          amax = std::max(amax, std::fabs(src[r * cols + c]));
      const float want = amax > 0 ? amax / 448.0f : 1.0f;
      CHECK(s[bi * 3 + bj] == want);
      for (int64_t r = 128 * bi; r < std::min<int64_t>(rows, 128 * bi + 128); ++r)
        for (int64_t c = 128 * bj; c < std::min<int64_t>(cols, 128 * bj + 128); ++c) {
          CHECK(q[r * cols + c] == dsfp4::float_to_e4m3(src[r * cols + c] / want));
          const float back = dsfp4::e4m3_to_float(q[r * cols + c]) * want;
          CHECK(std::fabs(back - src[r * cols + c]) <= std::fabs(src[r * cols + c]) / 16 + want / 512);
        }
    }
  CHECK(s[1 * 3 + 0] == 1.0f);
}

void test_grouped_and_units() {
  std::mt19937 rng(5);
  const int64_t H = 144, I = 80, slots = 3;
  dsfp4::Fp8ExpertUnitLayout lay;
  CHECK(dsfp4::fp8_expert_unit_layout(H, I, &lay).ok());
  CHECK(lay.gate_up_weight % 16 == 0 && lay.gate_up_scale % 16 == 0 && lay.down_weight % 16 == 0 &&
        lay.down_scale % 16 == 0 && lay.bytes % 256 == 0);
  CHECK(lay.bytes >= lay.down_scale + 4 * dsfp4::fp8_scale_rows(H, 0) * dsfp4::fp8_scale_cols(I));
  dsfp4::Fp8ExpertUnitLayout bad;
  CHECK(!dsfp4::fp8_expert_unit_layout(150, I, &bad).ok());  // not a multiple of 16
  CHECK(!dsfp4::fp8_expert_unit_layout(H, 0, &bad).ok());

  std::vector<Weight> gate, up, down;
  std::vector<std::vector<uint8_t>> units(slots);
  std::vector<uint64_t> table(slots);
  for (int e = 0; e < slots; ++e) {
    gate.push_back(random_weight(I, H, 0, rng));
    up.push_back(random_weight(I, H, 0, rng));
    down.push_back(random_weight(H, I, 0, rng));
    units[e].assign(lay.bytes + 16, 0xCD);
    uint8_t* base = units[e].data() + (16 - reinterpret_cast<uintptr_t>(units[e].data()) % 16) % 16;
    CHECK(dsfp4::fp8_expert_unit_fill(lay, gate[e].q.data(), gate[e].s.data(), up[e].q.data(), up[e].s.data(),
                                      down[e].q.data(), down[e].s.data(), base)
              .ok());
    table[e] = reinterpret_cast<uint64_t>(base);
  }
  table[1] = 0;  // an expert that is not readable: its group's rows are NaN, never a wrong sum
  // groups: expert 2 (3 rows), expert 1 (2 rows, NaN), expert 0 (4 rows), none (1 row, untouched)
  const int32_t slot_of_group[] = {2, 1, 0, -1};
  const int32_t offsets[] = {0, 3, 5, 9, 10};
  const int64_t rows = 10;
  const auto x = random_x(rows, H, rng);
  std::vector<uint16_t> y(rows * 2 * I, 0xFFFFu);
  const dsfp4::Fp8GroupedWeight gu = dsfp4::fp8_expert_unit_gate_up(lay, table.data());
  CHECK(dsfp4::fp8_grouped_gemm_cpu(gu, slots, 4, slot_of_group, offsets, rows, x.data(), H, y.data(), 2 * I).ok());
  int wrong = 0;
  for (int g = 0; g < 4; ++g) {
    for (int64_t i = offsets[g]; i < offsets[g + 1]; ++i)
      for (int64_t r = 0; r < 2 * I; ++r) {
        const uint16_t got = y[i * 2 * I + r];
        if (slot_of_group[g] < 0) {
          wrong += got != 0xFFFFu;  // untouched
          continue;
        }
        if (slot_of_group[g] == 1) {
          wrong += got != 0x7FC0u;  // the NaN the GEMM writes (the poison 0xFFFF is a NaN too)
          continue;
        }
        const Weight& w = r < I ? gate[slot_of_group[g]] : up[slot_of_group[g]];
        double acc = 0.0;
        for (int64_t c = 0; c < H; ++c) acc += static_cast<double>(bf16_to_float(x[i * H + c])) * w.at(r % I, c);
        wrong += !close(got, acc);
      }
  }
  CHECK(wrong == 0);

  // down through stacked slots equals down through units
  std::vector<uint8_t> stacked_w(slots * H * I);
  const int64_t ss = dsfp4::fp8_scale_rows(H, 0) * dsfp4::fp8_scale_cols(I);
  std::vector<float> stacked_s(slots * ss);
  for (int e = 0; e < slots; ++e) {
    std::memcpy(stacked_w.data() + e * H * I, down[e].q.data(), H * I);
    std::memcpy(stacked_s.data() + e * ss, down[e].s.data(), 4 * ss);
  }
  table[1] = table[0];
  const auto h = random_x(rows, I, rng);
  std::vector<uint16_t> y1(rows * H, 0), y2(rows * H, 0);
  dsfp4::Fp8GroupedWeight st;
  st.weight = stacked_w.data();
  st.scale = stacked_s.data();
  st.weight_slot_stride = H * I;
  st.scale_slot_stride = ss;
  st.n = H;
  st.k = I;
  const int32_t sg[] = {2, 0, 0, 0};
  CHECK(dsfp4::fp8_grouped_gemm_cpu(st, slots, 4, sg, offsets, rows, h.data(), I, y1.data(), H).ok());
  table[1] =
      reinterpret_cast<uint64_t>(units[0].data()) + (16 - reinterpret_cast<uintptr_t>(units[0].data()) % 16) % 16;
  const int32_t su[] = {2, 0, 1, 1};  // slot 1 is expert 0's unit now
  CHECK(dsfp4::fp8_grouped_gemm_cpu(dsfp4::fp8_expert_unit_down(lay, table.data()), slots, 4, su, offsets, rows,
                                    h.data(), I, y2.data(), H)
            .ok());
  CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * 2) == 0);

  // bad input names what is wrong
  const int32_t out_of_range[] = {5, 0, 0, 0};
  CHECK(!dsfp4::fp8_grouped_gemm_cpu(st, slots, 4, out_of_range, offsets, rows, h.data(), I, y1.data(), H).ok());
  std::vector<float> nan_scale = gate[0].s;
  nan_scale[0] = std::nanf("");
  std::vector<uint8_t> unit(lay.bytes + 16);
  const dsfp4::Status s = dsfp4::fp8_expert_unit_fill(lay, gate[0].q.data(), nan_scale.data(), up[0].q.data(),
                                                      up[0].s.data(), down[0].q.data(), down[0].s.data(), unit.data());
  CHECK(!s.ok() && s.message().find("gate_proj") != std::string::npos);
}

void test_bad_arguments() {
  std::mt19937 rng(1);
  Weight w = random_weight(40, 64, 0, rng);
  std::vector<uint16_t> x(64), y(40);
  dsfp4::Fp8Weight v = w.view();
  v.split_rows = 40;
  CHECK(!dsfp4::fp8_gemm_cpu(v, x.data(), 64, y.data(), 40, 1).ok());
  v.split_rows = 0;
  CHECK(!dsfp4::fp8_gemm_cpu(v, x.data(), 63, y.data(), 40, 1).ok());
  CHECK(!dsfp4::fp8_gemm_cpu(v, x.data(), 64, y.data(), 39, 1).ok());
  v.scale = nullptr;
  CHECK(!dsfp4::fp8_gemm_cpu(v, x.data(), 64, y.data(), 40, 1).ok());
}

}  // namespace

int main() {
  test_gemm_against_float64();
  test_act_quant_and_blockscaled();
  test_block_quantize();
  test_grouped_and_units();
  test_bad_arguments();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("fp8 gemm: all checks passed\n");
  return 0;
}
