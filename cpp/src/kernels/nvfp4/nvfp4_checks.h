// Argument checks shared by the CPU and CUDA NVFP4 entry points. Internal header.
#pragma once

#include <string>

#include "dsfp4/nvfp4.h"

namespace dsfp4 {
namespace detail {

inline Status check_source(const MatrixSource& src, const char* what) {
  if (src.data == nullptr) return InvalidArgument(std::string(what) + ": source pointer is null");
  switch (src.dtype) {
    case DType::kFloat32:
    case DType::kFloat16:
    case DType::kBFloat16: return Status::Ok();
    case DType::kFloat8E4M3:
      if (src.block_scale_inv == nullptr)
        return InvalidArgument(std::string(what) + ": float8 source needs block_scale_inv");
      if (src.block_rows <= 0 || src.block_cols <= 0)
        return InvalidArgument(std::string(what) + ": block size must be positive");
      return Status::Ok();
    default:
      return InvalidArgument(std::string(what) + ": source dtype " + dtype_name(src.dtype) +
                             " is not float32, float16, bfloat16 or float8_e4m3fn");
  }
}

inline Status check_shape(int64_t rows, int64_t cols, const char* what) {
  if (rows <= 0 || cols <= 0)
    return InvalidArgument(std::string(what) + ": shape [" + std::to_string(rows) + ", " +
                           std::to_string(cols) + "] must be positive");
  if (cols % kNvfp4BlockSize != 0)
    return InvalidArgument(std::string(what) + ": K (last dimension) = " + std::to_string(cols) +
                           " is not a multiple of 16");
  return Status::Ok();
}

}  // namespace detail
}  // namespace dsfp4
