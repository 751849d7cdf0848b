// AVX-512 block kernel of the CPU expert FFN, shared by the AVX512F/BW/VL file (float32 FMA)
// and the AVX512_BF16 file (vdpbf16ps). Internal header: include only from those two files.
//
// One 64-byte line = 16 dwords w, each holding 8 E2M1 codes of rows (g, g+8) × columns
// 4w..4w+3. Within each 16-bit half h (columns 4w+h and 4w+2+h) the bits are
//   0-2 |row g,   col 2+h|   3-5 |row g+8, col h|   6-8 |row g, col h|   9-11 |row g+8, col 2+h|
//   12 sign(row g+8, col h)  13 sign(row g+8, col 2+h)  14 sign(row g, col 2+h)  15 sign(row g, col h)
// (mag_base / sign_pos in nvfp4_format.h). A 16-bit shift brings a magnitude to bits 0-2 and
// vpermw looks up its bf16 value in a 32-entry table; the sign is or-ed into bit 15. Each of
// the four results is a vector of bf16 pairs (row, columns 4w+2q, 4w+2q+1) — the pairs of x
// that kBf16Pairs holds, ready for vdpbf16ps.
//
// Block scales: vpshufb broadcasts the e4m3 byte of (k-block, row) within each 128-bit lane
// (lane c = columns 16c..16c+15, dwords 4c..4c+3) to bits 24-31; a shift by 4 leaves the float32
// whose bits are the byte's exponent and mantissa, i.e. the scale × 2^-120 (exact, subnormals
// included with DAZ off). Bytes ≥ 0x7F (NaN, negative) are refused by the check.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/cpu_tile_driver.h"

namespace dsfp4 {
namespace cpu {
namespace {

// bf16 of E2M1 × 2^96 (kValueScale, cpu_experts_kernel.h).
alignas(64) constexpr uint16_t kMagBf16[32] = {
    0x0000, 0x6F00, 0x6F80, 0x6FC0, 0x7000, 0x7040, 0x7080, 0x70C0, 0x0000, 0x6F00, 0x6F80,
    0x6FC0, 0x7000, 0x7040, 0x7080, 0x70C0, 0x0000, 0x6F00, 0x6F80, 0x6FC0, 0x7000, 0x7040,
    0x7080, 0x70C0, 0x0000, 0x6F00, 0x6F80, 0x6FC0, 0x7000, 0x7040, 0x7080, 0x70C0};
// Index bit 4 is the sign (bit 3 is ignored).
alignas(64) constexpr uint16_t kSignedBf16[32] = {
    0x0000, 0x6F00, 0x6F80, 0x6FC0, 0x7000, 0x7040, 0x7080, 0x70C0, 0x0000, 0x6F00, 0x6F80,
    0x6FC0, 0x7000, 0x7040, 0x7080, 0x70C0, 0x8000, 0xEF00, 0xEF80, 0xEFC0, 0xF000, 0xF040,
    0xF080, 0xF0C0, 0x8000, 0xEF00, 0xEF80, 0xEFC0, 0xF000, 0xF040, 0xF080, 0xF0C0};
// vpshufb control that moves byte i of each 128-bit lane to bits 24-31 of its dwords.
constexpr uint32_t kScaleCtrl[16] = {
    0x00808080u, 0x01808080u, 0x02808080u, 0x03808080u, 0x04808080u, 0x05808080u, 0x06808080u, 0x07808080u,
    0x08808080u, 0x09808080u, 0x0A808080u, 0x0B808080u, 0x0C808080u, 0x0D808080u, 0x0E808080u, 0x0F808080u};

template <bool kBf16>
struct Avx512Block {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kXBytes = kBf16 ? 128 : 256;
  static constexpr int kMaxTokens = kBf16 ? 8 : 4;
  // 16 accumulators (2 rows × G lines × NT tokens) leave room for the decoded weights.
  static constexpr int group(int nt) { return nt == 1 ? 8 : nt == 2 ? 4 : nt == 4 ? 2 : 1; }

  struct State {
    __m512i mag, sgn, sign16, v7f;
    __mmask64 bad;
  };
  static void init(State& st) {
    st.mag = _mm512_load_si512(kMagBf16);
    st.sgn = _mm512_load_si512(kSignedBf16);
    st.sign16 = _mm512_set1_epi16(static_cast<short>(0x8000));
    st.v7f = _mm512_set1_epi8(0x7F);
    st.bad = 0;
  }
  static bool ok(const State& st) { return st.bad == 0; }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_load_ps(p); }
  static void store(float* p, Vec v) { _mm512_store_ps(p, v); }
  static float hsum(Vec v) { return _mm512_reduce_add_ps(v); }

  static __m512 scale(__m512i s, int i) {
    const __m512i d = _mm512_shuffle_epi8(s, _mm512_set1_epi32(static_cast<int>(kScaleCtrl[i])));
    return _mm512_castsi512_ps(_mm512_srli_epi32(d, 4));
  }

  // One line for NT tokens; acc[r][t] accumulates row g + 8r of token t.
  template <int NT>
  static void block(State& st, const uint8_t* wp, const uint8_t* sp, int kbi, const uint8_t* x, int64_t xs,
                    Vec (&acc)[2][NT]) {
    const __m512i w = _mm512_loadu_si512(wp);
    const __m512i s = _mm512_loadu_si512(sp);
    if (kbi == 0) st.bad |= _mm512_cmpge_epu8_mask(s, st.v7f);
    constexpr int kOr = 0xF8;  // a | (b & c)
    // row g, cols 4w+{0,1}: magnitude bits 6-8, sign bit 15
    const __m512i r0 = _mm512_ternarylogic_epi32(_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 6), st.mag), w,
                                                 st.sign16, kOr);
    // row g+8, cols 4w+{0,1}: bits 3-5, sign bit 12
    const __m512i r1 = _mm512_ternarylogic_epi32(_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 3), st.mag),
                                                 _mm512_slli_epi16(w, 3), st.sign16, kOr);
    // row g, cols 4w+{2,3}: bits 0-2, sign bit 14
    const __m512i r2 =
        _mm512_ternarylogic_epi32(_mm512_permutexvar_epi16(w, st.mag), _mm512_slli_epi16(w, 1), st.sign16, kOr);
    // row g+8, cols 4w+{2,3}: bits 9-11, sign bit 13 (bit 4 after the shift)
    const __m512i r3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 9), st.sgn);
    const __m512 s0 = scale(s, 2 * kbi), s1 = scale(s, 2 * kbi + 1);
    if constexpr (kBf16) {
      for (int t = 0; t < NT; ++t) {
        const __m512i xe = _mm512_load_si512(x + t * xs);
        const __m512i xo = _mm512_load_si512(x + t * xs + 64);
        __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)r0, (__m512bh)xe);
        __m512 p1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)r1, (__m512bh)xe);
        p0 = _mm512_dpbf16_ps(p0, (__m512bh)r2, (__m512bh)xo);
        p1 = _mm512_dpbf16_ps(p1, (__m512bh)r3, (__m512bh)xo);
        acc[0][t] = _mm512_fmadd_ps(p0, s0, acc[0][t]);
        acc[1][t] = _mm512_fmadd_ps(p1, s1, acc[1][t]);
      }
    } else {
      // bf16 pair → two float32 vectors: the low half is column 4w+2q, the high half 4w+2q+1
      const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
      const __m512 a0 = _mm512_castsi512_ps(_mm512_slli_epi32(r0, 16));
      const __m512 a1 = _mm512_castsi512_ps(_mm512_and_si512(r0, hi_mask));
      const __m512 a2 = _mm512_castsi512_ps(_mm512_slli_epi32(r2, 16));
      const __m512 a3 = _mm512_castsi512_ps(_mm512_and_si512(r2, hi_mask));
      const __m512 b0 = _mm512_castsi512_ps(_mm512_slli_epi32(r1, 16));
      const __m512 b1 = _mm512_castsi512_ps(_mm512_and_si512(r1, hi_mask));
      const __m512 b2 = _mm512_castsi512_ps(_mm512_slli_epi32(r3, 16));
      const __m512 b3 = _mm512_castsi512_ps(_mm512_and_si512(r3, hi_mask));
      for (int t = 0; t < NT; ++t) {
        const float* xf = reinterpret_cast<const float*>(x + t * xs);
        const __m512 x0 = _mm512_load_ps(xf), x1 = _mm512_load_ps(xf + 16);
        const __m512 x2 = _mm512_load_ps(xf + 32), x3 = _mm512_load_ps(xf + 48);
        __m512 p0 = _mm512_mul_ps(a0, x0);
        __m512 p1 = _mm512_mul_ps(b0, x0);
        p0 = _mm512_fmadd_ps(a1, x1, p0);
        p1 = _mm512_fmadd_ps(b1, x1, p1);
        p0 = _mm512_fmadd_ps(a2, x2, p0);
        p1 = _mm512_fmadd_ps(b2, x2, p1);
        p0 = _mm512_fmadd_ps(a3, x3, p0);
        p1 = _mm512_fmadd_ps(b3, x3, p1);
        acc[0][t] = _mm512_fmadd_ps(p0, s0, acc[0][t]);
        acc[1][t] = _mm512_fmadd_ps(p1, s1, acc[1][t]);
      }
    }
  }
};

uint64_t read_avx512(const uint8_t* p, size_t bytes) {
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
  for (size_t i = 0; i < bytes; i += 256) {
    a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
    b = _mm512_xor_si512(b, _mm512_loadu_si512(p + i + 64));
    c = _mm512_xor_si512(c, _mm512_loadu_si512(p + i + 128));
    d = _mm512_xor_si512(d, _mm512_loadu_si512(p + i + 192));
  }
  const __m512i v = _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, d));
  return static_cast<uint64_t>(_mm512_reduce_or_epi64(v));
}

}  // namespace
}  // namespace cpu
}  // namespace dsfp4
