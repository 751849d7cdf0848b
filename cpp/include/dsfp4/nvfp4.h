// NVFP4 numerics: quantize, dequantize, FP8-block conversion and the kernel layout.
//
// ModelOpt layout (what checkpoints hold), for a weight W[rows, cols] (y = x·Wᵀ, cols = K):
//   packed       uint8  [rows, cols/2]   byte i of a row: element 2i in the low nibble,
//                                        element 2i+1 in the high nibble
//   block_scale  e4m3   [rows, cols/16]  one scale per 16 consecutive elements of a row
//   global_scale float32 scalar
//   value = E2M1[nibble] × float(block_scale) × global_scale,
//   E2M1 = {0, 0.5, 1, 1.5, 2, 3, 4, 6}, bit 3 of the nibble is the sign.
//
// Quantization follows NVIDIA ModelOpt exactly (float32 arithmetic):
//   global_scale = amax(|W|) / (6·448)                (1.0 when W is all zeros)
//   s            = amax(|block|) / (6·global_scale);  s == 0 → 1; clamp to [2⁻⁹, 448]
//   block_scale  = e4m3(s)                            (round to nearest even)
//   q            = W / (float(block_scale)·global_scale), rounded to the nearest E2M1 value,
//                  ties to the even code, |q| > 6 saturating to 6.
//
// Kernel layout ("tiled"), produced by nvfp4_repack_*: rows padded to 16, cols to 64.
//   NT = ceil(rows/16) row tiles, KB = ceil(cols/64) k-blocks, KC = ceil(KB/8).
//   qweight uint32 [NT][KB][32 lanes][4]: lane l = 4g + c, word j holds the 8 elements
//     rows {16t+g, 16t+g+8} × cols {64kb + 16c + 4j + 0..3}, placed so that a few shifts
//     and masks turn a word into the four bf16x2 mma.m16n8k16 A registers (see
//     fp4_gemm_mma.cuh). Each lane's 16 columns of a k-block form one scale group.
//   qscale uint8 [NT][KC][32 lanes][8][2]: lane l, entry (kb', r) is the e4m3 scale of row
//     16t+g+8r, group 4(8kc+kb')+c; one 16-byte load gives a lane 8 k-blocks of scales.
//   Padding elements and scales are zero.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dsfp4/common.h"

namespace dsfp4 {

constexpr int kNvfp4BlockSize = 16;
constexpr float kE4M3Max = 448.0f;
constexpr float kE2M1Max = 6.0f;

// Host e4m3 (float8_e4m3fn) conversions. Rounding is to nearest even; values beyond 448
// saturate to 448 (ModelOpt clamps before casting, so this never changes its results).
uint8_t float_to_e4m3(float v);
float e4m3_to_float(uint8_t bits);
// E2M1 code (sign in bit 3) for a float already divided by its scales: ModelOpt rounding.
uint8_t float_to_e2m1(float v);
float e2m1_to_float(uint8_t code);

// Source of values to quantize: a row-major matrix of f32/f16/bf16, or an FP8 e4m3 matrix
// with DeepSeek block scales (value = fp8 × scale_inv[r / block_rows][c / block_cols]).
struct MatrixSource {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  const float* block_scale_inv = nullptr;  // only for kFloat8E4M3
  int block_rows = 128;
  int block_cols = 128;
};

// ---- CPU (reference) implementations; all pointers are host memory. -------------------

// Quantizes src[rows, cols] (cols % 16 == 0) to the ModelOpt layout. If global_scale_in is
// non-null its value is used instead of amax/(6·448) (to share one scale between tensors).
// Writes packed [rows, cols/2], block_scale [rows, cols/16] and *global_scale_out.
Status nvfp4_quantize_cpu(const MatrixSource& src, int64_t rows, int64_t cols,
                          const float* global_scale_in, uint8_t* packed, uint8_t* block_scale,
                          float* global_scale_out);

// Dequantizes the ModelOpt layout to dst[rows, cols] of dtype f32, f16 or bf16.
Status nvfp4_dequantize_cpu(const uint8_t* packed, const uint8_t* block_scale,
                            float global_scale, int64_t rows, int64_t cols, void* dst,
                            DType dst_dtype);

// Dequantizes a DeepSeek FP8 block-scaled matrix to float32 dst[rows, cols].
Status fp8_block_dequantize_cpu(const MatrixSource& src, int64_t rows, int64_t cols, float* dst);

// Sizes in bytes of the tiled kernel layout for a [rows, cols] weight.
size_t tiled_weight_bytes(int64_t rows, int64_t cols);
size_t tiled_scale_bytes(int64_t rows, int64_t cols);

// ModelOpt layout → tiled kernel layout, and back. cols % 16 == 0.
Status nvfp4_repack_cpu(const uint8_t* packed, const uint8_t* block_scale, int64_t rows,
                        int64_t cols, uint32_t* qweight, uint8_t* qscale);
Status nvfp4_unpack_cpu(const uint32_t* qweight, const uint8_t* qscale, int64_t rows,
                        int64_t cols, uint8_t* packed, uint8_t* block_scale);

// ---- CUDA implementations; pointers are device memory, work is queued on `stream`. ----

// As nvfp4_quantize_cpu. global_scale_in/global_scale_out are device pointers (in may be
// null). `workspace` needs nvfp4_quantize_workspace_bytes() bytes.
size_t nvfp4_quantize_workspace_bytes();
Status nvfp4_quantize_cuda(const MatrixSource& src, int64_t rows, int64_t cols,
                           const float* global_scale_in, uint8_t* packed, uint8_t* block_scale,
                           float* global_scale_out, void* workspace, Stream stream);
// global_scale is a device pointer to one float.
Status nvfp4_dequantize_cuda(const uint8_t* packed, const uint8_t* block_scale,
                             const float* global_scale, int64_t rows, int64_t cols, void* dst,
                             DType dst_dtype, Stream stream);
// As fp8_block_dequantize_cpu; src.data, src.block_scale_inv and dst are device pointers.
Status fp8_block_dequantize_cuda(const MatrixSource& src, int64_t rows, int64_t cols, float* dst, Stream stream);
Status nvfp4_repack_cuda(const uint8_t* packed, const uint8_t* block_scale, int64_t rows,
                         int64_t cols, uint32_t* qweight, uint8_t* qscale, Stream stream);

}  // namespace dsfp4
