// C++ tests of the NVFP4 CPU reference and the tiled layout (run by ctest, no GPU needed).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "dsfp4/fp4_gemm.h"
#include "dsfp4/nvfp4.h"
#include "kernels/nvfp4/nvfp4_format.h"

namespace {

int g_failures = 0;

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                     \
    }                                                                   \
  } while (0)

void test_e4m3_codes() {
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7F) == 0x7F) continue;  // NaN
    const float v = dsfp4::e4m3_to_float(static_cast<uint8_t>(b));
    CHECK(dsfp4::float_to_e4m3(v) == b);
  }
  CHECK(dsfp4::e4m3_to_float(0x7E) == 448.0f);
  CHECK(dsfp4::e4m3_to_float(0x01) == 0.001953125f);  // 2^-9
  CHECK(dsfp4::float_to_e4m3(1000.0f) == 0x7E);        // saturates
  // Ties between neighbouring codes go to the even code.
  for (int b = 0; b < 0x7D; ++b) {
    const float lo = dsfp4::e4m3_to_float(static_cast<uint8_t>(b));
    const float hi = dsfp4::e4m3_to_float(static_cast<uint8_t>(b + 1));
    const uint8_t even = (b % 2 == 0) ? b : b + 1;
    CHECK(dsfp4::float_to_e4m3(0.5f * (lo + hi)) == even);
  }
}

void test_e2m1_codes() {
  const float values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int c = 0; c < 16; ++c) {
    const float v = dsfp4::e2m1_to_float(static_cast<uint8_t>(c));
    CHECK(std::fabs(v) == values[c & 7]);
    CHECK((c & 8) == 0 || v <= 0.0f);
    if (c != 8) CHECK(dsfp4::float_to_e2m1(v) == c);
  }
  CHECK(dsfp4::float_to_e2m1(0.25f) == 0);   // tie → even code 0
  CHECK(dsfp4::float_to_e2m1(0.75f) == 2);   // tie → 1.0
  CHECK(dsfp4::float_to_e2m1(2.5f) == 4);    // tie → 2.0
  CHECK(dsfp4::float_to_e2m1(5.0f) == 6);    // tie → 4.0
  CHECK(dsfp4::float_to_e2m1(100.0f) == 7);  // saturates at 6
  CHECK(dsfp4::float_to_e2m1(-3.4f) == 8 + 5);
}

void test_quantize_roundtrip_and_repack() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  const int64_t rows = 37, cols = 80;  // odd rows, cols not a multiple of 64
  std::vector<float> w(rows * cols);
  for (auto& v : w) v = dist(rng);
  dsfp4::MatrixSource src;
  src.data = w.data();
  src.dtype = dsfp4::DType::kFloat32;
  std::vector<uint8_t> packed(rows * cols / 2), scale(rows * cols / 16);
  float gs = 0.0f;
  CHECK(dsfp4::nvfp4_quantize_cpu(src, rows, cols, nullptr, packed.data(), scale.data(), &gs).ok());
  float amax = 0.0f;
  for (float v : w) amax = std::max(amax, std::fabs(v));
  CHECK(gs == amax / 2688.0f);

  std::vector<float> back(rows * cols);
  CHECK(dsfp4::nvfp4_dequantize_cpu(packed.data(), scale.data(), gs, rows, cols, back.data(),
                                    dsfp4::DType::kFloat32).ok());
  double err = 0.0, ref = 0.0;
  for (size_t i = 0; i < w.size(); ++i) {
    err += (back[i] - w[i]) * (back[i] - w[i]);
    ref += w[i] * w[i];
  }
  CHECK(std::sqrt(err / ref) < 0.15);  // 4-bit round trip of Gaussian data: ~0.1

  std::vector<uint32_t> qw(dsfp4::tiled_weight_bytes(rows, cols) / 4, 0xdeadbeefu);
  std::vector<uint8_t> qs(dsfp4::tiled_scale_bytes(rows, cols), 0xAB);
  CHECK(dsfp4::nvfp4_repack_cpu(packed.data(), scale.data(), rows, cols, qw.data(), qs.data()).ok());
  std::vector<uint8_t> packed2(packed.size(), 0x55), scale2(scale.size(), 0x55);
  CHECK(dsfp4::nvfp4_unpack_cpu(qw.data(), qs.data(), rows, cols, packed2.data(), scale2.data()).ok());
  CHECK(packed == packed2);
  CHECK(scale == scale2);

  // The bit placement decodes to E2M1 × 2^-126 in each bf16 half (what the kernel relies on).
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col = 0; col < cols; ++col) {
      const int64_t t = row / 16, g = row % 8, r = (row % 16) / 8;
      const int64_t kb = col / 64, c = (col % 64) / 16, j = (col % 16) / 4, kk = col % 4;
      const auto d = dsfp4::fmt::tiled_dims(rows, cols);
      const uint32_t word = qw[((t * d.kb + kb) * 32 + (4 * g + c)) * 4 + j];
      uint32_t regs[4];
      regs[0] = word & 0x81C081C0u;
      regs[1] = (word << 3) & 0x81C081C0u;
      regs[2] = ((word << 6) & 0x01C001C0u) | ((word << 1) & 0x80008000u);
      regs[3] = ((word >> 3) & 0x01C001C0u) | ((word << 2) & 0x80008000u);
      const int reg = static_cast<int>(2 * (kk / 2) + r);
      const uint16_t half = static_cast<uint16_t>(regs[reg] >> (16 * (kk % 2)));
      const uint8_t byte = packed[row * (cols / 2) + col / 2];
      const uint8_t code = (col & 1) ? (byte >> 4) : (byte & 0xF);
      const float expect = dsfp4::e2m1_to_float(code) * std::ldexp(1.0f, -126);
      CHECK(dsfp4::fmt::bf16_bits_to_float(half) == expect);
    }
  }
}

void test_gemm_reference() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const int64_t n = 19, k = 48, m = 3;
  std::vector<float> w(n * k);
  for (auto& v : w) v = dist(rng);
  dsfp4::MatrixSource src;
  src.data = w.data();
  std::vector<uint8_t> packed(n * k / 2), scale(n * k / 16);
  float gs = 0.0f;
  CHECK(dsfp4::nvfp4_quantize_cpu(src, n, k, nullptr, packed.data(), scale.data(), &gs).ok());
  std::vector<uint32_t> qw(dsfp4::tiled_weight_bytes(n, k) / 4);
  std::vector<uint8_t> qs(dsfp4::tiled_scale_bytes(n, k));
  CHECK(dsfp4::nvfp4_repack_cpu(packed.data(), scale.data(), n, k, qw.data(), qs.data()).ok());
  std::vector<float> wdq(n * k);
  CHECK(dsfp4::nvfp4_dequantize_cpu(packed.data(), scale.data(), gs, n, k, wdq.data(), dsfp4::DType::kFloat32).ok());

  std::vector<uint16_t> x(m * k), y(m * n, 0xFFFF);
  for (auto& v : x) v = dsfp4::fmt::float_to_bf16_bits(dist(rng));
  dsfp4::Fp4Weight fw;
  fw.qweight = qw.data();
  fw.qscale = qs.data();
  fw.global_scale = &gs;
  fw.n = n;
  fw.k = k;
  CHECK(dsfp4::fp4_gemm_cpu(fw, x.data(), k, y.data(), n, m).ok());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t o = 0; o < n; ++o) {
      double acc = 0.0;
      for (int64_t c = 0; c < k; ++c) acc += dsfp4::fmt::bf16_bits_to_float(x[i * k + c]) * double(wdq[o * k + c]);
      const float got = dsfp4::fmt::bf16_bits_to_float(y[i * n + o]);
      CHECK(std::fabs(got - acc) <= 1e-2 * std::fabs(acc) + 1e-3);
    }
}

void test_bad_input() {
  float w[20] = {};
  dsfp4::MatrixSource src;
  src.data = w;
  uint8_t packed[10], scale[2];
  float gs;
  const auto st = dsfp4::nvfp4_quantize_cpu(src, 1, 20, nullptr, packed, scale, &gs);
  CHECK(!st.ok());
  CHECK(st.code() == dsfp4::StatusCode::kInvalidArgument);
  CHECK(st.message().find("multiple of 16") != std::string::npos);
  src.dtype = dsfp4::DType::kFloat8E4M3;  // without block scales
  CHECK(!dsfp4::nvfp4_quantize_cpu(src, 1, 16, nullptr, packed, scale, &gs).ok());
}

}  // namespace

int main() {
  test_e4m3_codes();
  test_e2m1_codes();
  test_quantize_roundtrip_and_repack();
  test_gemm_reference();
  test_bad_input();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all NVFP4 C++ tests passed\n");
  return 0;
}
