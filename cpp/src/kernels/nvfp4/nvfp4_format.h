// Element-level NVFP4 formulas shared by the CPU reference and the CUDA kernels, so that
// both compute the same function bit for bit. Internal header (not public API).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "dsfp4/common.h"
#include "dsfp4/nvfp4.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define DSFP4_HD __host__ __device__ __forceinline__
#else
#define DSFP4_HD inline
#endif

namespace dsfp4 {
namespace fmt {

DSFP4_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
#endif
}

DSFP4_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, 4);
  return v;
#endif
}

DSFP4_HD float round_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);  // default rounding mode: to nearest, ties to even
#endif
}

DSFP4_HD float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

DSFP4_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: man × 2^-24, exact in float
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (man << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// float → bfloat16 bits, round to nearest even (NaN stays NaN).
DSFP4_HD uint16_t float_to_bf16_bits(float v) {
  uint32_t u = float_bits(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// float → IEEE half bits, round to nearest even, subnormals kept, overflow to inf.
DSFP4_HD uint16_t float_to_half_bits(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const float a = fabsf(v);
  if (a != a) return static_cast<uint16_t>(sign | 0x7E00u);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7C00u);
  if (a < 6.103515625e-5f)  // subnormal half: steps of 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(round_even(a * 16777216.0f)));
  const int exp = static_cast<int>(float_bits(a) >> 23) - 127;
  const float scaled = a * bits_float(static_cast<uint32_t>(127 + 10 - exp) << 23);  // [1024, 2048)
  const uint32_t m = static_cast<uint32_t>(round_even(scaled));
  return static_cast<uint16_t>(sign | ((static_cast<uint32_t>(exp + 15) << 10) + (m - 1024)));
}

// float → float8_e4m3fn, round to nearest even, saturating at ±448; NaN → 0x7F.
DSFP4_HD uint8_t float_to_e4m3(float v) {
  const uint32_t u = float_bits(v);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t abs_bits = u & 0x7FFFFFFFu;
  if (abs_bits > 0x7F800000u) return 0x7F;
  const float a = bits_float(abs_bits);
  if (a >= 448.0f) return sign | 0x7E;
  const int exp = static_cast<int>(abs_bits >> 23) - 127;
  uint32_t code;
  if (exp < -6) {
    code = static_cast<uint32_t>(round_even(a * 512.0f));  // subnormal step 2^-9; 8 → 2^-6
  } else {
    const float scaled = a * bits_float(static_cast<uint32_t>(127 + 3 - exp) << 23);  // [8, 16)
    const uint32_t m = static_cast<uint32_t>(round_even(scaled));                    // 8..16
    code = (static_cast<uint32_t>(exp + 7) << 3) + (m - 8);  // m == 16 carries into exp
  }
  if (code > 0x7Eu) code = 0x7Eu;
  return static_cast<uint8_t>(sign | code);
}

DSFP4_HD float e4m3_to_float(uint8_t b) {
  const uint32_t exp = (b >> 3) & 0xFu;
  const uint32_t man = b & 0x7u;
  float v;
  if ((b & 0x7Fu) == 0x7Fu) {
    v = bits_float(0x7FC00000u);
  } else if (exp == 0) {
    v = static_cast<float>(man) * 0.001953125f;  // man × 2^-9
  } else {
    v = bits_float(((exp + 120u) << 23) | (man << 20));
  }
  return (b & 0x80u) ? -v : v;
}

// ModelOpt's E2M1 cast: the code counts the rounding bounds below |v|, plus one on the
// bounds 0.75, 1.75 and 3.5 (ties go to the even code); the sign is (v < 0).
DSFP4_HD uint8_t float_to_e2m1(float v) {
  const float a = fabsf(v);
  uint8_t ord = static_cast<uint8_t>((a > 0.25f) + (a > 0.75f) + (a > 1.25f) + (a > 1.75f) +
                                     (a > 2.5f) + (a > 3.5f) + (a > 5.0f));
  ord = static_cast<uint8_t>(ord + ((a == 0.75f) | (a == 1.75f) | (a == 3.5f)));
  return static_cast<uint8_t>(((v < 0.0f) ? 8 : 0) + ord);
}

DSFP4_HD float e2m1_to_float(uint8_t code) {
  // Magnitudes in half-units: {0, 1, 2, 3, 4, 6, 8, 12} / 2.
  const uint32_t mag = code & 7u;
  const float m = (mag < 4u) ? static_cast<float>(mag) * 0.5f
                             : static_cast<float>((mag & 1u) ? 3u << ((mag >> 1) - 2) : 2u << ((mag >> 1) - 2));
  return (code & 8u) ? -m : m;
}

// Global scale as ModelOpt computes it; 1.0 for an all-zero tensor (ModelOpt gives NaN).
DSFP4_HD float global_scale_from_amax(float amax) { return amax > 0.0f ? amax / 2688.0f : 1.0f; }

// E4M3 block scale for a block with the given amax.
DSFP4_HD uint8_t block_scale_code(float block_amax, float global_scale) {
  float s = block_amax / (6.0f * global_scale);
  if (s == 0.0f) s = 1.0f;
  s = fminf(fmaxf(s, 0.001953125f), 448.0f);
  return float_to_e4m3(s);
}

// E2M1 code of one element given its block's decoded scale.
DSFP4_HD uint8_t quantize_element(float v, float block_scale, float global_scale) {
  return float_to_e2m1(v / (block_scale * global_scale));
}

DSFP4_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element (r, c) of a MatrixSource with `cols` columns, as float32.
DSFP4_HD float load_value(const MatrixSource& src, int64_t cols, int64_t r, int64_t c) {
  const int64_t i = r * cols + c;
  switch (src.dtype) {
    case DType::kFloat32: return static_cast<const float*>(src.data)[i];
    case DType::kFloat16: return half_bits_to_float(static_cast<const uint16_t*>(src.data)[i]);
    case DType::kBFloat16: return bf16_bits_to_float(static_cast<const uint16_t*>(src.data)[i]);
    case DType::kFloat8E4M3: {
      const int64_t scols = ceil_div(cols, src.block_cols);
      const float s = src.block_scale_inv[(r / src.block_rows) * scols + c / src.block_cols];
      return e4m3_to_float(static_cast<const uint8_t*>(src.data)[i]) * s;
    }
    default: return 0.0f;
  }
}

// ---- tiled kernel layout -----------------------------------------------------------------
// Bit placement inside a qweight word. Element (rowsel r, column kk in 0..3 of the lane's
// four) goes to bf16x2 register reg = 2·(kk/2) + r, half h = kk % 2; its magnitude bits
// (code & 7) start at mag_base(reg) + 16h and its sign at sign_pos(reg) + 16h.
DSFP4_HD constexpr int mag_base(int reg) { return reg == 0 ? 6 : reg == 1 ? 3 : reg == 2 ? 0 : 9; }
DSFP4_HD constexpr int sign_pos(int reg) { return reg == 0 ? 15 : reg == 1 ? 12 : reg == 2 ? 14 : 13; }

struct TiledDims {
  int64_t nt;  // row tiles of 16
  int64_t kb;  // k-blocks of 64
  int64_t kc;  // scale chunks of 8 k-blocks
};

DSFP4_HD TiledDims tiled_dims(int64_t rows, int64_t cols) {
  TiledDims d;
  d.nt = ceil_div(rows, 16);
  d.kb = ceil_div(cols, 64);
  d.kc = ceil_div(d.kb, 8);
  return d;
}

// E2M1 code of ModelOpt element (row, col); zero outside the matrix (the layout's padding).
DSFP4_HD uint32_t packed_code(const uint8_t* packed, int64_t rows, int64_t cols, int64_t row, int64_t col) {
  if (row >= rows || col >= cols) return 0;
  const uint8_t byte = packed[row * (cols / 2) + col / 2];
  return (col & 1) ? (byte >> 4) : (byte & 0xFu);
}

// Word j of `lane` in row tile t, k-block kb: rows {16t+g, 16t+g+8} × columns
// {64kb + 16c + 4j + 0..3} (lane = 4g + c). The single definition of the bit placement,
// used by the CPU repack and the CUDA repack kernel.
DSFP4_HD uint32_t tiled_word(const uint8_t* packed, int64_t rows, int64_t cols, int64_t t, int64_t kb, int lane,
                             int j) {
  const int g = lane >> 2, c = lane & 3;
  uint32_t w = 0;
  for (int r = 0; r < 2; ++r) {
    const int64_t row = 16 * t + g + 8 * r;
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t code = packed_code(packed, rows, cols, row, 64 * kb + 16 * c + 4 * j + kk);
      const int reg = 2 * (kk / 2) + r, h = kk % 2;
      w |= (code & 7u) << (mag_base(reg) + 16 * h);
      w |= (code >> 3) << (sign_pos(reg) + 16 * h);
    }
  }
  return w;
}

// Inverse of tiled_word for one element: the code of (rowsel r, column kk of the lane's four).
DSFP4_HD uint32_t tiled_code(uint32_t w, int r, int kk) {
  const int reg = 2 * (kk / 2) + r, h = kk % 2;
  return ((w >> (mag_base(reg) + 16 * h)) & 7u) | (((w >> (sign_pos(reg) + 16 * h)) & 1u) << 3);
}

// qscale byte (lane, entry (kbi, r)) of row tile t, scale chunk kc: the e4m3 scale of row
// 16t+g+8r, group 4(8kc+kbi)+c; zero past the matrix.
DSFP4_HD uint8_t tiled_scale_byte(const uint8_t* block_scale, int64_t rows, int64_t cols, int64_t t, int64_t kc,
                                  int lane, int kbi, int r) {
  const int g = lane >> 2, c = lane & 3;
  const int64_t groups = cols / 16;
  const int64_t group = 4 * (8 * kc + kbi) + c;
  const int64_t row = 16 * t + g + 8 * r;
  return (row < rows && group < groups) ? block_scale[row * groups + group] : 0;
}

}  // namespace fmt
}  // namespace dsfp4
