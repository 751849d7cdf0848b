// Element-level FP8 block formulas shared by the CPU references and the CUDA kernels, so both
// compute the same function bit for bit. Internal header (not public API).
#pragma once

#include <cstdint>

#include "dsfp4/fp8_gemm.h"
#include "kernels/nvfp4/nvfp4_format.h"

namespace dsfp4 {
namespace fmt {

// Scale row of weight row r (see split_rows in fp8_gemm.h).
DSFP4_HD int64_t fp8_scale_row(int64_t r, int64_t split_rows) {
  if (split_rows <= 0 || r < split_rows) return r / kFp8Block;
  return (split_rows + kFp8Block - 1) / kFp8Block + (r - split_rows) / kFp8Block;
}

// The scale of a group or block with the given amax: amax / 448, or 1 for an all-zero one.
DSFP4_HD float fp8_scale_from_amax(float amax) {
  return amax > 0.0f ? amax / 448.0f : 1.0f;
}

// One value quantized with its group's scale: e4m3(v / s), nearest even, saturating.
DSFP4_HD uint8_t fp8_quantize_value(float v, float s) {
  return float_to_e4m3(v / s);
}

}  // namespace fmt
}  // namespace dsfp4
