// CPU expert tile kernel for AVX2 + FMA, the fallback below AVX-512. Compiled with -mavx2
// -mfma (CMakeLists.txt); called only after cpuid.
//
// Each dword of a weight line holds 8 E2M1 codes (rows g, g+8 × columns 4w..4w+3, bit places
// as in cpu_experts_avx512_impl.h). Per (row, column) a 32-bit shift brings the magnitude to
// bits 0-2, vpermps looks up its float value (× 2^96, kValueScale), and the sign bit, shifted to
// bit 31, is xor-ed in. Activations are float32 [4 kk][16 w] per k-block (XFormat::kF32).
#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/cpu_tile_driver.h"

namespace dsfp4 {
namespace cpu {
namespace {

// Bit places of the E2M1 codes in a word (nvfp4_format.h: mag_base, sign_pos), restated here
// so that this file includes nothing compiled elsewhere without AVX2.
constexpr int mag_base(int reg) { return reg == 0 ? 6 : reg == 1 ? 3 : reg == 2 ? 0 : 9; }
constexpr int sign_pos(int reg) { return reg == 0 ? 15 : reg == 1 ? 12 : reg == 2 ? 14 : 13; }

constexpr uint32_t kScaleCtrl[16] = {
    0x00808080u, 0x01808080u, 0x02808080u, 0x03808080u, 0x04808080u, 0x05808080u, 0x06808080u, 0x07808080u,
    0x08808080u, 0x09808080u, 0x0A808080u, 0x0B808080u, 0x0C808080u, 0x0D808080u, 0x0E808080u, 0x0F808080u};

struct Avx2Block {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kXBytes = 256;
  static constexpr int kMaxTokens = 4;
  static constexpr int group(int nt) { return nt == 1 ? 4 : nt == 2 ? 2 : 1; }

  struct State {
    __m256 lut;
    __m256i sign, v7f, bad;
  };
  static void init(State& st) {
    const float k = 7.922816251426434e+28f;  // 2^96 (kValueScale)
    st.lut = _mm256_setr_ps(0.0f, 0.5f * k, 1.0f * k, 1.5f * k, 2.0f * k, 3.0f * k, 4.0f * k, 6.0f * k);
    st.sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    st.v7f = _mm256_set1_epi8(0x7F);
    st.bad = _mm256_setzero_si256();
  }
  static bool ok(const State& st) { return _mm256_testz_si256(st.bad, st.bad) != 0; }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_load_ps(p); }
  static void store(float* p, Vec v) { _mm256_store_ps(p, v); }
  static float hsum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // e4m3 byte i of each 128-bit lane → its four dwords, as the float32 scale × 2^-120 (see the
  // AVX-512 file).
  static __m256 scale(__m256i s, int i) {
    const __m256i d = _mm256_shuffle_epi8(s, _mm256_set1_epi32(static_cast<int>(kScaleCtrl[i])));
    return _mm256_castsi256_ps(_mm256_srli_epi32(d, 4));
  }

  // Value of the code of (register R, half H) in each dword: R = 2·(kk/2) + row, H = kk % 2.
  template <int R, int H>
  static __m256 value(const State& st, __m256i w) {
    constexpr int mb = mag_base(R) + 16 * H, sp = sign_pos(R) + 16 * H;
    const __m256 v = _mm256_permutevar8x32_ps(st.lut, _mm256_srli_epi32(w, mb));
    const __m256i sg = _mm256_and_si256(_mm256_slli_epi32(w, 31 - sp), st.sign);
    return _mm256_xor_ps(v, _mm256_castsi256_ps(sg));
  }

  template <int Row, int Half, int NT>
  static void row(const State& st, __m256i w, __m256 sc, const uint8_t* x, int64_t xs, Vec (&acc)[NT]) {
    auto xv = [&](int t, int kk) {
      return _mm256_load_ps(reinterpret_cast<const float*>(x + t * xs) + kk * 16 + Half * 8);
    };
    Vec p[NT];
    const __m256 v0 = value<Row, 0>(st, w);
    for (int t = 0; t < NT; ++t) p[t] = _mm256_mul_ps(v0, xv(t, 0));
    const __m256 v1 = value<Row, 1>(st, w);
    for (int t = 0; t < NT; ++t) p[t] = _mm256_fmadd_ps(v1, xv(t, 1), p[t]);
    const __m256 v2 = value<2 + Row, 0>(st, w);
    for (int t = 0; t < NT; ++t) p[t] = _mm256_fmadd_ps(v2, xv(t, 2), p[t]);
    const __m256 v3 = value<2 + Row, 1>(st, w);
    for (int t = 0; t < NT; ++t) p[t] = _mm256_fmadd_ps(v3, xv(t, 3), p[t]);
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(p[t], sc, acc[t]);
  }

  template <int Half, int NT>
  static void half(State& st, const uint8_t* wp, const uint8_t* sp, int kbi, const uint8_t* x, int64_t xs,
                   Vec (&acc)[2][NT]) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * Half));
    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + 32 * Half));
    if (kbi == 0)  // bytes >= 0x7F: NaN or negative
      st.bad = _mm256_or_si256(st.bad, _mm256_cmpeq_epi8(_mm256_max_epu8(s, st.v7f), s));
    row<0, Half, NT>(st, w, scale(s, 2 * kbi), x, xs, acc[0]);
    row<1, Half, NT>(st, w, scale(s, 2 * kbi + 1), x, xs, acc[1]);
  }

  template <int NT>
  static void block(State& st, const uint8_t* wp, const uint8_t* sp, int kbi, const uint8_t* x, int64_t xs,
                    Vec (&acc)[2][NT]) {
    half<0, NT>(st, wp, sp, kbi, x, xs, acc);
    half<1, NT>(st, wp, sp, kbi, x, xs, acc);
  }
};

uint64_t read_avx2(const uint8_t* p, size_t bytes) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (size_t i = 0; i < bytes; i += 256) {
    const auto* q = reinterpret_cast<const __m256i*>(p + i);
    a = _mm256_xor_si256(a, _mm256_xor_si256(_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)));
    b = _mm256_xor_si256(b, _mm256_xor_si256(_mm256_loadu_si256(q + 2), _mm256_loadu_si256(q + 3)));
    c = _mm256_xor_si256(c, _mm256_xor_si256(_mm256_loadu_si256(q + 4), _mm256_loadu_si256(q + 5)));
    d = _mm256_xor_si256(d, _mm256_xor_si256(_mm256_loadu_si256(q + 6), _mm256_loadu_si256(q + 7)));
  }
  const __m256i v = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
  return static_cast<uint64_t>(_mm256_extract_epi64(v, 0) ^ _mm256_extract_epi64(v, 1) ^ _mm256_extract_epi64(v, 2) ^
                               _mm256_extract_epi64(v, 3));
}

}  // namespace

const IsaKernels& avx2_kernels() {
  static const IsaKernels k{XFormat::kF32, &run_tile<Avx2Block>, &read_avx2};
  return k;
}

}  // namespace cpu
}  // namespace dsfp4
