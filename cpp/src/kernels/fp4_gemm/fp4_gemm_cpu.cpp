// CPU reference of the FP4 GEMM on the tiled layout: what the CUDA kernels compute.
#include <algorithm>
#include <string>
#include <vector>

#include "dsfp4/fp4_gemm.h"
#include "dsfp4/nvfp4.h"
#include "kernels/cpu_parallel.h"
#include "kernels/nvfp4/nvfp4_format.h"
#include "kernels/unit_wait.h"

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
  if (m == 0) return Status::Ok();
  const auto* xb = static_cast<const uint16_t*>(x);
  auto* yb = static_cast<uint16_t*>(y);
  std::vector<float> xf(static_cast<size_t>(m * w.k));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < w.k; ++c) xf[i * w.k + c] = fmt::bf16_bits_to_float(xb[i * ldx + c]);
  // Threads over output features, each with at least ~256K multiply-adds.
  const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, m * w.k));
  detail::parallel_rows(
      w.n,
      [&](int64_t nb, int64_t ne) {
        for (int64_t n = nb; n < ne; ++n) {
          const float* wr = wf.data() + n * w.k;
          for (int64_t i = 0; i < m; ++i) {
            const float* xr = xf.data() + i * w.k;
            double acc = 0.0;
            for (int64_t c = 0; c < w.k; ++c) acc += static_cast<double>(xr[c]) * wr[c];
            yb[i * ldy + n] = fmt::float_to_bf16_bits(static_cast<float>(acc));
          }
        }
      },
      min_rows);
  return Status::Ok();
}

namespace {
// The CPU twin of the kernel's wait (unit_wait.h): unit_ready and unit_addr live in host memory
// that another thread (the paging store's pipeline) writes.
uint64_t wait_for_unit(const Fp4GroupedWeight& w, int32_t slot) {
  return kernels::wait_for_unit(w.unit_ready, w.ready_epoch, w.unit_addr, slot, w.wait_timeout_ns, w.wait_failed);
}
}  // namespace

Status fp4_grouped_gemm_cpu(const Fp4GroupedWeight& w, int num_slots, int num_groups, const int32_t* slot_of_group,
                            const int32_t* row_offsets, int64_t rows, const void* x, int64_t ldx, void* y,
                            int64_t ldy) {
  if (w.n <= 0 || w.k <= 0 || w.k % 16 != 0)
    return InvalidArgument("fp4_grouped_gemm: weight shape must be positive with K a multiple of 16");
  const bool units = w.unit_addr != nullptr;  // paged units: slot s is the unit at unit_addr[s]
  if (!units && (!w.qweight || !w.qscale || !w.global_scale))
    return InvalidArgument("fp4_grouped_gemm: weight pointer is null");
  if (num_groups <= 0 || !slot_of_group || !row_offsets)
    return InvalidArgument("fp4_grouped_gemm: num_groups must be positive, slot_of_group and row_offsets non-null");
  if (rows < 0 || (rows > 0 && (!x || !y))) return InvalidArgument("fp4_grouped_gemm: x or y is null");
  if (!units && (w.qweight_slot_stride * 4 < static_cast<int64_t>(tiled_weight_bytes(w.n, w.k)) ||
                 w.qscale_slot_stride < static_cast<int64_t>(tiled_scale_bytes(w.n, w.k))))
    return InvalidArgument("fp4_grouped_gemm: slot strides are smaller than one weight");
  const int64_t tiles = (w.n + 15) / 16;
  const auto* xb = static_cast<const uint16_t*>(x);
  auto* yb = static_cast<uint16_t*>(y);
  for (int g = 0; g < num_groups; ++g) {
    const int32_t slot = slot_of_group[g];
    const int64_t lo = row_offsets[g], hi = row_offsets[g + 1];
    if (slot < 0 || hi <= lo) continue;
    if (slot >= num_slots)
      return InvalidArgument("fp4_grouped_gemm: slot_of_group[" + std::to_string(g) + "] = " + std::to_string(slot) +
                             " is out of range [0, " + std::to_string(num_slots) + ")");
    if (lo < 0 || hi > rows)
      return InvalidArgument("fp4_grouped_gemm: row_offsets[" + std::to_string(g) + ":" + std::to_string(g + 2) +
                             "] = " + std::to_string(lo) + ", " + std::to_string(hi) + " out of range [0, " +
                             std::to_string(rows) + "]");
    Fp4Weight sw;
    if (units) {
      const uint64_t unit = w.unit_ready != nullptr ? wait_for_unit(w, slot) : w.unit_addr[slot];
      if (unit == 0 || unit % 16 != 0) {  // no weights to read: NaN rows, as on the GPU
        kernels::nan_rows(yb, lo, hi, w.n, ldy);
        continue;
      }
      sw.qweight = reinterpret_cast<const uint32_t*>(unit + w.unit_qweight);
      sw.qscale = reinterpret_cast<const uint8_t*>(unit + w.unit_qscale);
      sw.global_scale = reinterpret_cast<const float*>(unit + w.unit_scale);
      sw.global_scale_per_tile = w.unit_scale_per_tile;
    } else {
      sw.qweight = w.qweight + slot * w.qweight_slot_stride;
      sw.qscale = w.qscale + slot * w.qscale_slot_stride;
      sw.global_scale = w.global_scale + slot * (w.global_scale_per_tile ? tiles : 1);
      sw.global_scale_per_tile = w.global_scale_per_tile;
    }
    sw.n = w.n;
    sw.k = w.k;
    DSFP4_RETURN_IF_ERROR(fp4_gemm_cpu(sw, xb + lo * ldx, ldx, yb + lo * ldy, ldy, hi - lo));
  }
  return Status::Ok();
}

}  // namespace dsfp4
