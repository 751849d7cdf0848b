// CPU reference for NVFP4 quantize / dequantize / repack. Defines what the CUDA kernels
// compute; also the implementation used on machines without a GPU.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "dsfp4/nvfp4.h"
#include "kernels/cpu_parallel.h"
#include "kernels/nvfp4/nvfp4_checks.h"
#include "kernels/nvfp4/nvfp4_format.h"

namespace dsfp4 {

using detail::parallel_rows;

uint8_t float_to_e4m3(float v) { return fmt::float_to_e4m3(v); }
float e4m3_to_float(uint8_t bits) { return fmt::e4m3_to_float(bits); }
uint8_t float_to_e2m1(float v) { return fmt::float_to_e2m1(v); }
float e2m1_to_float(uint8_t code) { return fmt::e2m1_to_float(code); }

Status nvfp4_quantize_cpu(const MatrixSource& src, int64_t rows, int64_t cols,
                          const float* global_scale_in, uint8_t* packed, uint8_t* block_scale,
                          float* global_scale_out) {
  DSFP4_RETURN_IF_ERROR(detail::check_shape(rows, cols, "nvfp4_quantize"));
  DSFP4_RETURN_IF_ERROR(detail::check_source(src, "nvfp4_quantize"));
  if (!packed || !block_scale || !global_scale_out)
    return InvalidArgument("nvfp4_quantize: output pointer is null");

  float gs;
  if (global_scale_in != nullptr) {
    gs = *global_scale_in;
    if (!(gs > 0.0f) || !std::isfinite(gs))
      return InvalidArgument("nvfp4_quantize: global_scale must be finite and positive");
  } else {
    std::vector<float> row_amax(rows, 0.0f);
    parallel_rows(rows, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        float m = 0.0f;
        for (int64_t c = 0; c < cols; ++c) m = std::max(m, std::fabs(fmt::load_value(src, cols, r, c)));
        row_amax[r] = m;
      }
    });
    float amax = 0.0f;
    for (float m : row_amax) amax = std::max(amax, m);
    gs = fmt::global_scale_from_amax(amax);
  }
  *global_scale_out = gs;

  const int64_t groups = cols / kNvfp4BlockSize;
  parallel_rows(rows, [&](int64_t b, int64_t e) {
    float vals[kNvfp4BlockSize];
    for (int64_t r = b; r < e; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        float bmax = 0.0f;
        for (int i = 0; i < kNvfp4BlockSize; ++i) {
          vals[i] = fmt::load_value(src, cols, r, g * kNvfp4BlockSize + i);
          bmax = std::max(bmax, std::fabs(vals[i]));
        }
        const uint8_t sc = fmt::block_scale_code(bmax, gs);
        block_scale[r * groups + g] = sc;
        const float s = fmt::e4m3_to_float(sc);
        uint8_t* out = packed + r * (cols / 2) + g * (kNvfp4BlockSize / 2);
        for (int i = 0; i < kNvfp4BlockSize; i += 2) {
          const uint8_t lo = fmt::quantize_element(vals[i], s, gs);
          const uint8_t hi = fmt::quantize_element(vals[i + 1], s, gs);
          out[i / 2] = static_cast<uint8_t>(lo | (hi << 4));
        }
      }
    }
  });
  return Status::Ok();
}

Status nvfp4_dequantize_cpu(const uint8_t* packed, const uint8_t* block_scale,
                            float global_scale, int64_t rows, int64_t cols, void* dst,
                            DType dst_dtype) {
  DSFP4_RETURN_IF_ERROR(detail::check_shape(rows, cols, "nvfp4_dequantize"));
  if (!packed || !block_scale || !dst) return InvalidArgument("nvfp4_dequantize: null pointer");
  if (dst_dtype != DType::kFloat32 && dst_dtype != DType::kBFloat16 && dst_dtype != DType::kFloat16)
    return InvalidArgument(std::string("nvfp4_dequantize: output dtype ") + dtype_name(dst_dtype) +
                           " is not float32, float16 or bfloat16");
  const int64_t groups = cols / kNvfp4BlockSize;
  parallel_rows(rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const uint8_t byte = packed[r * (cols / 2) + c / 2];
        const uint8_t code = (c & 1) ? (byte >> 4) : (byte & 0xF);
        // ModelOpt's order: (block scale × global scale), then × the E2M1 value.
        const float s = fmt::e4m3_to_float(block_scale[r * groups + c / kNvfp4BlockSize]) * global_scale;
        const float v = fmt::e2m1_to_float(code) * s;
        const int64_t i = r * cols + c;
        if (dst_dtype == DType::kFloat32)
          static_cast<float*>(dst)[i] = v;
        else if (dst_dtype == DType::kBFloat16)
          static_cast<uint16_t*>(dst)[i] = fmt::float_to_bf16_bits(v);
        else
          static_cast<uint16_t*>(dst)[i] = fmt::float_to_half_bits(v);
      }
    }
  });
  return Status::Ok();
}

Status fp8_block_dequantize_cpu(const MatrixSource& src, int64_t rows, int64_t cols, float* dst) {
  if (rows <= 0 || cols <= 0) return InvalidArgument("fp8_block_dequantize: shape must be positive");
  if (src.dtype != DType::kFloat8E4M3)
    return InvalidArgument("fp8_block_dequantize: source dtype must be float8_e4m3fn");
  DSFP4_RETURN_IF_ERROR(detail::check_source(src, "fp8_block_dequantize"));
  if (!dst) return InvalidArgument("fp8_block_dequantize: output pointer is null");
  parallel_rows(rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = fmt::load_value(src, cols, r, c);
  });
  return Status::Ok();
}

size_t tiled_weight_bytes(int64_t rows, int64_t cols) {
  const auto d = fmt::tiled_dims(rows, cols);
  return static_cast<size_t>(d.nt * d.kb * 512);
}

size_t tiled_scale_bytes(int64_t rows, int64_t cols) {
  const auto d = fmt::tiled_dims(rows, cols);
  return static_cast<size_t>(d.nt * d.kc * 512);
}

Status nvfp4_repack_cpu(const uint8_t* packed, const uint8_t* block_scale, int64_t rows,
                        int64_t cols, uint32_t* qweight, uint8_t* qscale) {
  DSFP4_RETURN_IF_ERROR(detail::check_shape(rows, cols, "nvfp4_repack"));
  if (!packed || !block_scale || !qweight || !qscale) return InvalidArgument("nvfp4_repack: null pointer");
  const auto d = fmt::tiled_dims(rows, cols);
  parallel_rows(d.nt, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      for (int64_t kb = 0; kb < d.kb; ++kb) {
        for (int lane = 0; lane < 32; ++lane)
          for (int j = 0; j < 4; ++j)
            qweight[((t * d.kb + kb) * 32 + lane) * 4 + j] = fmt::tiled_word(packed, rows, cols, t, kb, lane, j);
      }
      for (int64_t kc = 0; kc < d.kc; ++kc)
        for (int lane = 0; lane < 32; ++lane)
          for (int kbi = 0; kbi < 8; ++kbi)
            for (int r = 0; r < 2; ++r)
              qscale[((t * d.kc + kc) * 32 + lane) * 16 + kbi * 2 + r] =
                  fmt::tiled_scale_byte(block_scale, rows, cols, t, kc, lane, kbi, r);
    }
  });
  return Status::Ok();
}

Status nvfp4_unpack_cpu(const uint32_t* qweight, const uint8_t* qscale, int64_t rows,
                        int64_t cols, uint8_t* packed, uint8_t* block_scale) {
  DSFP4_RETURN_IF_ERROR(detail::check_shape(rows, cols, "nvfp4_unpack"));
  if (!packed || !block_scale || !qweight || !qscale) return InvalidArgument("nvfp4_unpack: null pointer");
  const auto d = fmt::tiled_dims(rows, cols);
  const int64_t groups = cols / kNvfp4BlockSize;
  std::memset(packed, 0, static_cast<size_t>(rows * cols / 2));
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t t = row / 16, g = row % 8, r = (row % 16) / 8;
    for (int64_t col = 0; col < cols; ++col) {
      const int64_t kb = col / 64, c = (col % 64) / 16, j = (col % 16) / 4, kk = col % 4;
      const uint32_t w = qweight[((t * d.kb + kb) * 32 + (4 * g + c)) * 4 + j];
      const uint32_t code = fmt::tiled_code(w, static_cast<int>(r), static_cast<int>(kk));
      packed[row * (cols / 2) + col / 2] |= static_cast<uint8_t>(code << ((col & 1) ? 4 : 0));
    }
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t kb = gi / 4, c = gi % 4, kc = kb / 8, kbi = kb % 8;
      block_scale[row * groups + gi] = qscale[((t * d.kc + kc) * 32 + (4 * g + c)) * 16 + kbi * 2 + r];
    }
  }
  return Status::Ok();
}

}  // namespace dsfp4
