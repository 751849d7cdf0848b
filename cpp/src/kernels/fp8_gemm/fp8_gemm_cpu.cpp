// CPU references of the FP8 block GEMM, activation quantization, block quantization and the
// FP8 expert unit: what the CUDA kernels compute.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "dsfp4/fp8_gemm.h"
#include "kernels/cpu_parallel.h"
#include "kernels/fp8_gemm/fp8_format.h"
#include "kernels/unit_wait.h"

namespace dsfp4 {

namespace {

Status check_weight(const Fp8Weight& w, const char* fn) {
  if (w.n <= 0 || w.k <= 0)
    return InvalidArgument(std::string(fn) + ": weight shape [" + std::to_string(w.n) + ", " + std::to_string(w.k) +
                           "] must be positive");
  if (w.split_rows < 0 || w.split_rows >= w.n)
    return InvalidArgument(std::string(fn) + ": split_rows = " + std::to_string(w.split_rows) + " must be in [0, " +
                           std::to_string(w.n) + ")");
  if (!w.weight || !w.scale) return InvalidArgument(std::string(fn) + ": weight or scale is null");
  return Status::Ok();
}

// Row r of dequant(W) in float32 (e4m3 × scale, one float32 rounding).
void dequant_row(const Fp8Weight& w, int64_t r, float* out) {
  const int64_t sc = fp8_scale_cols(w.k);
  const float* srow = w.scale + fmt::fp8_scale_row(r, w.split_rows) * sc;
  const uint8_t* q = w.weight + r * w.k;
  for (int64_t c = 0; c < w.k; ++c) out[c] = fmt::e4m3_to_float(q[c]) * srow[c / kFp8Block];
}

void act_quant_row(const uint16_t* x, int64_t k, uint8_t* xq, float* scale, int64_t scale_stride) {
  for (int64_t c0 = 0, j = 0; c0 < k; c0 += kFp8Block, ++j) {
    const int64_t c1 = std::min<int64_t>(k, c0 + kFp8Block);
    float amax = 0.0f;
    for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(fmt::bf16_bits_to_float(x[c])));
    const float s = fmt::fp8_scale_from_amax(amax);
    for (int64_t c = c0; c < c1; ++c) xq[c] = fmt::fp8_quantize_value(fmt::bf16_bits_to_float(x[c]), s);
    scale[j * scale_stride] = s;
  }
}

}  // namespace

int64_t fp8_scale_rows(int64_t n, int64_t split_rows) {
  if (split_rows <= 0) return (n + kFp8Block - 1) / kFp8Block;
  return (split_rows + kFp8Block - 1) / kFp8Block + (n - split_rows + kFp8Block - 1) / kFp8Block;
}

Status fp8_dequantize_cpu(const Fp8Weight& w, float* dst) {
  DSFP4_RETURN_IF_ERROR(check_weight(w, "fp8_dequantize"));
  if (!dst) return InvalidArgument("fp8_dequantize: dst is null");
  detail::parallel_rows(w.n, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) dequant_row(w, r, dst + r * w.k);
  });
  return Status::Ok();
}

Status fp8_gemm_cpu(const Fp8Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t m) {
  DSFP4_RETURN_IF_ERROR(check_weight(w, "fp8_gemm"));
  if (m < 0) return InvalidArgument("fp8_gemm: M must be non-negative");
  if (m == 0) return Status::Ok();
  if (!x || !y) return InvalidArgument("fp8_gemm: x or y is null");
  if (ldx < w.k) return InvalidArgument("fp8_gemm: ldx is smaller than K");
  if (ldy < w.n) return InvalidArgument("fp8_gemm: ldy is smaller than N");
  const auto* xb = static_cast<const uint16_t*>(x);
  auto* yb = static_cast<uint16_t*>(y);
  std::vector<double> xd(static_cast<size_t>(m * w.k));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < w.k; ++c) xd[i * w.k + c] = fmt::bf16_bits_to_float(xb[i * ldx + c]);
  const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, m * w.k));
  detail::parallel_rows(
      w.n,
      [&](int64_t nb, int64_t ne) {
        std::vector<float> wr(static_cast<size_t>(w.k));
        for (int64_t n = nb; n < ne; ++n) {
          dequant_row(w, n, wr.data());
          for (int64_t i = 0; i < m; ++i) {
            const double* xr = xd.data() + i * w.k;
            double acc = 0.0;
            for (int64_t c = 0; c < w.k; ++c) acc += xr[c] * wr[c];
            yb[i * ldy + n] = fmt::float_to_bf16_bits(static_cast<float>(acc));
          }
        }
      },
      min_rows);
  return Status::Ok();
}

Status fp8_act_quant_cpu(const void* x, int64_t ldx, int64_t m, int64_t k, uint8_t* xq, int64_t ldq, float* scale,
                         int64_t ld_scale) {
  if (m < 0 || k <= 0) return InvalidArgument("fp8_act_quant: M must be non-negative and K positive");
  if (m == 0) return Status::Ok();
  if (!x || !xq || !scale) return InvalidArgument("fp8_act_quant: null pointer");
  if (ldx < k || ldq < k || ld_scale < m)
    return InvalidArgument("fp8_act_quant: ldx and ldq must be ≥ K and ld_scale ≥ M");
  const auto* xb = static_cast<const uint16_t*>(x);
  for (int64_t r = 0; r < m; ++r) act_quant_row(xb + r * ldx, k, xq + r * ldq, scale + r, ld_scale);
  return Status::Ok();
}

Status fp8_gemm_blockscaled_cpu(const Fp8Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t m) {
  DSFP4_RETURN_IF_ERROR(check_weight(w, "fp8_gemm"));
  if (m < 0) return InvalidArgument("fp8_gemm: M must be non-negative");
  if (m == 0) return Status::Ok();
  if (!x || !y) return InvalidArgument("fp8_gemm: x or y is null");
  if (ldx < w.k || ldy < w.n) return InvalidArgument("fp8_gemm: ldx / ldy smaller than K / N");
  const int64_t kb = fp8_scale_cols(w.k);
  std::vector<uint8_t> xq(static_cast<size_t>(m * w.k));
  std::vector<float> sx(static_cast<size_t>(kb * m));
  DSFP4_RETURN_IF_ERROR(fp8_act_quant_cpu(x, ldx, m, w.k, xq.data(), w.k, sx.data(), m));
  std::vector<double> xv(xq.size());
  for (size_t i = 0; i < xq.size(); ++i) xv[i] = fmt::e4m3_to_float(xq[i]);
  auto* yb = static_cast<uint16_t*>(y);
  detail::parallel_rows(w.n, [&](int64_t nb, int64_t ne) {
    std::vector<double> wq(static_cast<size_t>(w.k));
    for (int64_t n = nb; n < ne; ++n) {
      const uint8_t* q = w.weight + n * w.k;
      for (int64_t c = 0; c < w.k; ++c) wq[c] = fmt::e4m3_to_float(q[c]);
      const float* srow = w.scale + fmt::fp8_scale_row(n, w.split_rows) * kb;
      for (int64_t i = 0; i < m; ++i) {
        double acc = 0.0;
        for (int64_t j = 0; j < kb; ++j) {
          double part = 0.0;
          const int64_t c1 = std::min<int64_t>(w.k, (j + 1) * kFp8Block);
          for (int64_t c = j * kFp8Block; c < c1; ++c) part += xv[i * w.k + c] * wq[c];
          acc += part * static_cast<double>(sx[j * m + i]) * static_cast<double>(srow[j]);
        }
        yb[i * ldy + n] = fmt::float_to_bf16_bits(static_cast<float>(acc));
      }
    }
  });
  return Status::Ok();
}

namespace {
// The CPU twin of the kernel's wait (unit_wait.h).
uint64_t wait_for_unit(const Fp8GroupedWeight& w, int32_t slot) {
  return kernels::wait_for_unit(w.unit_ready, w.ready_epoch, w.unit_addr, slot, w.wait_timeout_ns, w.wait_failed);
}
}  // namespace

Status fp8_grouped_gemm_cpu(const Fp8GroupedWeight& w, int num_slots, int num_groups, const int32_t* slot_of_group,
                            const int32_t* row_offsets, int64_t rows, const void* x, int64_t ldx, void* y,
                            int64_t ldy) {
  if (w.n <= 0 || w.k <= 0) return InvalidArgument("fp8_grouped_gemm: weight shape must be positive");
  if (w.split_rows < 0 || w.split_rows >= w.n) return InvalidArgument("fp8_grouped_gemm: split_rows must be in [0, N)");
  const bool units = w.unit_addr != nullptr;
  if (!units && (!w.weight || !w.scale)) return InvalidArgument("fp8_grouped_gemm: weight or scale is null");
  if (units && w.unit_ready != nullptr && w.ready_epoch == nullptr)
    return InvalidArgument("fp8_grouped_gemm: unit_ready needs ready_epoch");
  if (num_groups <= 0 || !slot_of_group || !row_offsets)
    return InvalidArgument("fp8_grouped_gemm: num_groups must be positive, slot_of_group and row_offsets non-null");
  if (rows < 0 || (rows > 0 && (!x || !y))) return InvalidArgument("fp8_grouped_gemm: x or y is null");
  if (!units && (w.weight_slot_stride < w.n * w.k ||
                 w.scale_slot_stride < fp8_scale_rows(w.n, w.split_rows) * fp8_scale_cols(w.k)))
    return InvalidArgument("fp8_grouped_gemm: slot strides are smaller than one weight");
  const auto* xb = static_cast<const uint16_t*>(x);
  auto* yb = static_cast<uint16_t*>(y);
  for (int g = 0; g < num_groups; ++g) {
    const int32_t slot = slot_of_group[g];
    const int64_t lo = row_offsets[g], hi = row_offsets[g + 1];
    if (slot < 0 || hi <= lo) continue;
    if (slot >= num_slots)
      return InvalidArgument("fp8_grouped_gemm: slot_of_group[" + std::to_string(g) + "] = " + std::to_string(slot) +
                             " is out of range [0, " + std::to_string(num_slots) + ")");
    if (lo < 0 || hi > rows)
      return InvalidArgument("fp8_grouped_gemm: row_offsets[" + std::to_string(g) + ":" + std::to_string(g + 2) +
                             "] = " + std::to_string(lo) + ", " + std::to_string(hi) + " out of range [0, " +
                             std::to_string(rows) + "]");
    Fp8Weight sw;
    if (units) {
      const uint64_t unit = w.unit_ready != nullptr ? wait_for_unit(w, slot) : w.unit_addr[slot];
      if (unit == 0 || unit % 16 != 0) {  // no weights to read: NaN rows, as on the GPU
        kernels::nan_rows(yb, lo, hi, w.n, ldy);
        continue;
      }
      sw.weight = reinterpret_cast<const uint8_t*>(unit + w.unit_weight);
      sw.scale = reinterpret_cast<const float*>(unit + w.unit_scale);
    } else {
      sw.weight = w.weight + slot * w.weight_slot_stride;
      sw.scale = w.scale + slot * w.scale_slot_stride;
    }
    sw.n = w.n;
    sw.k = w.k;
    sw.split_rows = w.split_rows;
    DSFP4_RETURN_IF_ERROR(fp8_gemm_cpu(sw, xb + lo * ldx, ldx, yb + lo * ldy, ldy, hi - lo));
  }
  return Status::Ok();
}

Status fp8_block_quantize_cpu(const MatrixSource& src, int64_t rows, int64_t cols, uint8_t* q, float* scale_inv) {
  if (rows <= 0 || cols <= 0) return InvalidArgument("fp8_block_quantize: shape must be positive");
  if (!src.data || !q || !scale_inv) return InvalidArgument("fp8_block_quantize: null pointer");
  if (src.dtype != DType::kFloat32 && src.dtype != DType::kFloat16 && src.dtype != DType::kBFloat16)
    return InvalidArgument("fp8_block_quantize: source must be float32, float16 or bfloat16");
  const int64_t rb = (rows + kFp8Block - 1) / kFp8Block, cb = fp8_scale_cols(cols);
  detail::parallel_rows(
      rb,
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t r0 = i * kFp8Block, r1 = std::min(rows, r0 + kFp8Block);
          for (int64_t j = 0; j < cb; ++j) {
            const int64_t c0 = j * kFp8Block, c1 = std::min(cols, c0 + kFp8Block);
            float amax = 0.0f;
            for (int64_t r = r0; r < r1; ++r)
              for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(fmt::load_value(src, cols, r, c)));
            const float s = fmt::fp8_scale_from_amax(amax);
            scale_inv[i * cb + j] = s;
            for (int64_t r = r0; r < r1; ++r)
              for (int64_t c = c0; c < c1; ++c)
                q[r * cols + c] = fmt::fp8_quantize_value(fmt::load_value(src, cols, r, c), s);
          }
        }
      },
      1);
  return Status::Ok();
}

// ---- expert units --------------------------------------------------------------------------

namespace {
int64_t align_unit(int64_t v) {
  return (v + 255) / 256 * 256;
}

Status check_scales(const float* s, int64_t count, const char* name) {
  for (int64_t i = 0; i < count; ++i)
    if (!std::isfinite(s[i]) || s[i] < 0.0f)
      return InvalidArgument(std::string("fp8 expert unit: ") + name + " has a non-finite or negative scale (" +
                             std::to_string(s[i]) + " at " + std::to_string(i) + ")");
  return Status::Ok();
}
}  // namespace

Status fp8_expert_unit_layout(int64_t hidden, int64_t inter, Fp8ExpertUnitLayout* out) {
  if (hidden <= 0 || inter <= 0 || hidden % 16 != 0 || inter % 16 != 0)
    return InvalidArgument("fp8_expert_unit_layout: hidden (" + std::to_string(hidden) + ") and inter (" +
                           std::to_string(inter) + ") must be positive multiples of 16");
  if (!out) return InvalidArgument("fp8_expert_unit_layout: out is null");
  Fp8ExpertUnitLayout l;
  l.hidden = hidden;
  l.inter = inter;
  int64_t off = 0;
  l.gate_up_weight = off;
  off = align_unit(off + 2 * inter * hidden);
  l.gate_up_scale = off;
  off = align_unit(off + 4 * fp8_scale_rows(2 * inter, inter) * fp8_scale_cols(hidden));
  l.down_weight = off;
  off = align_unit(off + hidden * inter);
  l.down_scale = off;
  off = align_unit(off + 4 * fp8_scale_rows(hidden, 0) * fp8_scale_cols(inter));
  l.bytes = off;
  *out = l;
  return Status::Ok();
}

Status fp8_expert_unit_fill(const Fp8ExpertUnitLayout& l, const uint8_t* gate, const float* gate_scale,
                            const uint8_t* up, const float* up_scale, const uint8_t* down, const float* down_scale,
                            uint8_t* unit) {
  if (!gate || !gate_scale || !up || !up_scale || !down || !down_scale || !unit)
    return InvalidArgument("fp8 expert unit: null pointer");
  const int64_t H = l.hidden, I = l.inter;
  const int64_t gs = fp8_scale_rows(I, 0) * fp8_scale_cols(H), ds = fp8_scale_rows(H, 0) * fp8_scale_cols(I);
  DSFP4_RETURN_IF_ERROR(check_scales(gate_scale, gs, "gate_proj.weight_scale_inv"));
  DSFP4_RETURN_IF_ERROR(check_scales(up_scale, gs, "up_proj.weight_scale_inv"));
  DSFP4_RETURN_IF_ERROR(check_scales(down_scale, ds, "down_proj.weight_scale_inv"));
  std::memset(unit, 0, static_cast<size_t>(l.bytes));  // padding stays defined
  std::memcpy(unit + l.gate_up_weight, gate, static_cast<size_t>(I * H));
  std::memcpy(unit + l.gate_up_weight + I * H, up, static_cast<size_t>(I * H));
  std::memcpy(unit + l.gate_up_scale, gate_scale, static_cast<size_t>(4 * gs));
  std::memcpy(unit + l.gate_up_scale + 4 * gs, up_scale, static_cast<size_t>(4 * gs));
  std::memcpy(unit + l.down_weight, down, static_cast<size_t>(H * I));
  std::memcpy(unit + l.down_scale, down_scale, static_cast<size_t>(4 * ds));
  return Status::Ok();
}

Fp8GroupedWeight fp8_expert_unit_gate_up(const Fp8ExpertUnitLayout& l, const uint64_t* unit_addr) {
  Fp8GroupedWeight w;
  w.n = 2 * l.inter;
  w.k = l.hidden;
  w.split_rows = l.inter;
  w.unit_addr = unit_addr;
  w.unit_weight = l.gate_up_weight;
  w.unit_scale = l.gate_up_scale;
  return w;
}

Fp8GroupedWeight fp8_expert_unit_down(const Fp8ExpertUnitLayout& l, const uint64_t* unit_addr) {
  Fp8GroupedWeight w;
  w.n = l.hidden;
  w.k = l.inter;
  w.unit_addr = unit_addr;
  w.unit_weight = l.down_weight;
  w.unit_scale = l.down_scale;
  return w;
}

}  // namespace dsfp4
