// CPU reference of the FP4 GEMM on the tiled layout: what the CUDA kernels compute.
#include <algorithm>
#include <string>
#include <vector>

#include "dsfp4/fp4_gemm.h"
#include "dsfp4/nvfp4.h"
#include "kernels/nvfp4/nvfp4_format.h"

namespace dsfp4 {

Status fp4_dequantize_tiled_cpu(const Fp4Weight& w, float* dst) {
  if (w.n <= 0 || w.k <= 0 || w.k % 16 != 0)
    return InvalidArgument("fp4_dequantize_tiled: weight shape must be positive with K a multiple of 16");
  if (!w.qweight || !w.qscale || !w.global_scale || !dst) return InvalidArgument("fp4_dequantize_tiled: null pointer");
  std::vector<uint8_t> packed(static_cast<size_t>(w.n * w.k / 2));
  std::vector<uint8_t> scale(static_cast<size_t>(w.n * w.k / 16));
  DSFP4_RETURN_IF_ERROR(nvfp4_unpack_cpu(w.qweight, w.qscale, w.n, w.k, packed.data(), scale.data()));
  if (!w.global_scale_per_tile)
    return nvfp4_dequantize_cpu(packed.data(), scale.data(), *w.global_scale, w.n, w.k, dst, DType::kFloat32);
  // Tile by tile, so each element is computed exactly as with a per-tensor scale.
  for (int64_t r0 = 0; r0 < w.n; r0 += 16) {
    const int64_t rows = std::min<int64_t>(16, w.n - r0);
    DSFP4_RETURN_IF_ERROR(nvfp4_dequantize_cpu(packed.data() + r0 * (w.k / 2), scale.data() + r0 * (w.k / 16),
                                               w.global_scale[r0 / 16], rows, w.k, dst + r0 * w.k,
                                               DType::kFloat32));
  }
  return Status::Ok();
}

Status fp4_gemm_cpu(const Fp4Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t m) {
  if (m < 0) return InvalidArgument("fp4_gemm: M must be non-negative");
  if (!x || !y) return InvalidArgument("fp4_gemm: x or y is null");
  if (ldx < w.k) return InvalidArgument("fp4_gemm: ldx is smaller than K");
  if (ldy < w.n) return InvalidArgument("fp4_gemm: ldy is smaller than N");
  std::vector<float> wf(static_cast<size_t>(w.n * w.k));
  DSFP4_RETURN_IF_ERROR(fp4_dequantize_tiled_cpu(w, wf.data()));
  const auto* xb = static_cast<const uint16_t*>(x);
  auto* yb = static_cast<uint16_t*>(y);
  std::vector<float> xrow(static_cast<size_t>(w.k));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < w.k; ++c) xrow[c] = fmt::bf16_bits_to_float(xb[i * ldx + c]);
    for (int64_t n = 0; n < w.n; ++n) {
      const float* wr = wf.data() + n * w.k;
      double acc = 0.0;
      for (int64_t c = 0; c < w.k; ++c) acc += static_cast<double>(xrow[c]) * wr[c];
      yb[i * ldy + n] = fmt::float_to_bf16_bits(static_cast<float>(acc));
    }
  }
  return Status::Ok();
}

}  // namespace dsfp4
