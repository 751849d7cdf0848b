// FP4 GEMM runner: argument checks, tactic heuristic, launches of the fused kernel and the
// dequantize + CUTLASS path.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "dsfp4/fp4_gemm.h"
#include "dsfp4/nvfp4.h"
#include "kernels/cuda_check.h"
#include "kernels/device_info.h"
#include "kernels/fp4_gemm/bf16_gemm_sm90.h"
#include "kernels/fp4_gemm/fp4_gemm_mma.cuh"
#include "kernels/nvfp4/nvfp4_format.h"

namespace dsfp4 {

namespace {

using kernels::FusedGemmArgs;

// Rows of the dequantized weight per chunk on the kDequant path (bounded workspace).
constexpr int64_t kDequantChunkBytes = 64ll << 20;

using kernels::DeviceInfo;
using kernels::device_info;

// Rows per warp for a token tile: more rows amortize x loads once tiles are wide.
int rows_tiles_per_warp(int tile_tokens) { return tile_tokens >= 32 ? 2 : 1; }

int64_t block_rows(const Fp4GemmTactic& t) { return 16ll * rows_tiles_per_warp(t.tile_tokens) * t.warps_n; }

bool dequant_path_available(int64_t n, int64_t k) {
  const DeviceInfo d = device_info();
  return kernels::sm90_bf16_gemm_available() && d.cc_major == 9 && k % 8 == 0 && n >= 128;
}

int64_t dequant_chunk_rows(int64_t n, int64_t k) {
  int64_t rows = kDequantChunkBytes / (2 * k);
  rows = std::max<int64_t>(256, rows / 256 * 256);
  const int64_t np = (n + 15) / 16 * 16;
  return std::min(rows, np);
}

Status check_tactic(const Fp4GemmTactic& t) {
  if (t.path == Fp4GemmPath::kFused) {
    if (t.tile_tokens != 8 && t.tile_tokens != 16 && t.tile_tokens != 32 && t.tile_tokens != 64)
      return InvalidArgument("fp4_gemm: tactic.tile_tokens must be 8, 16, 32 or 64");
    if (t.warps_k != 1 && t.warps_k != 2 && t.warps_k != 4 && t.warps_k != 8)
      return InvalidArgument("fp4_gemm: tactic.warps_k must be 1, 2, 4 or 8");
    if (t.warps_n != 1 && t.warps_n != 2 && t.warps_n != 4)
      return InvalidArgument("fp4_gemm: tactic.warps_n must be 1, 2 or 4");
    if (t.split_k < 1 || t.split_k > 64) return InvalidArgument("fp4_gemm: tactic.split_k must be in [1, 64]");
  }
  return Status::Ok();
}

template <int NT8, int WR, int WN, int KW, int U>
cudaError_t launch_fused(const FusedGemmArgs& a, dim3 grid, cudaStream_t stream) {
  kernels::fused_fp4_gemm_kernel<NT8, WR, WN, KW, U><<<grid, 32 * WN * KW, 0, stream>>>(a);
  return cudaGetLastError();
}

// The compiled fused kernels: the one table behind dispatch and is_compiled.
struct FusedKernel {
  int tile_tokens, warps_n, warps_k;
  cudaError_t (*launch)(const FusedGemmArgs&, dim3, cudaStream_t);
};
constexpr FusedKernel kFusedKernels[] = {
    {8, 1, 8, launch_fused<1, 1, 1, 8, 4>},  {8, 1, 4, launch_fused<1, 1, 1, 4, 4>},
    {8, 2, 2, launch_fused<1, 1, 2, 2, 4>},  {16, 1, 8, launch_fused<2, 1, 1, 8, 4>},
    {16, 1, 4, launch_fused<2, 1, 1, 4, 4>}, {16, 2, 2, launch_fused<2, 1, 2, 2, 4>},
    {32, 2, 1, launch_fused<4, 2, 2, 1, 2>}, {32, 4, 1, launch_fused<4, 2, 4, 1, 2>},
    {64, 2, 1, launch_fused<8, 2, 2, 1, 1>}, {64, 4, 1, launch_fused<8, 2, 4, 1, 1>},
};

const FusedKernel* find_fused(int tile_tokens, int warps_n, int warps_k) {
  for (const FusedKernel& f : kFusedKernels)
    if (f.tile_tokens == tile_tokens && f.warps_n == warps_n && f.warps_k == warps_k) return &f;
  return nullptr;
}

bool is_compiled(int tile_tokens, int warps_n, int warps_k) {
  return find_fused(tile_tokens, warps_n, warps_k) != nullptr;
}

Status dispatch_fused(const Fp4GemmTactic& t, const FusedGemmArgs& a, dim3 grid, cudaStream_t s) {
  const FusedKernel* f = find_fused(t.tile_tokens, t.warps_n, t.warps_k);
  if (f == nullptr)
    return Unsupported("fp4_gemm: no kernel for tile_tokens=" + std::to_string(t.tile_tokens) +
                       " warps_n=" + std::to_string(t.warps_n) + " warps_k=" + std::to_string(t.warps_k));
  return cuda_status(f->launch(a, grid, s), "fp4_gemm: fused kernel launch");
}

FusedGemmArgs base_args(int64_t n, int64_t k) {
  FusedGemmArgs a{};
  const auto d = fmt::tiled_dims(n, k);
  a.n = static_cast<int>(n);
  a.k = static_cast<int>(k);
  a.nt = static_cast<int>(d.nt);
  a.kb = static_cast<int>(d.kb);
  a.kc = static_cast<int>(d.kc);
  a.split_k = 1;
  return a;
}

Status check_weight_dims(int64_t n, int64_t k, const char* fn) {
  if (n <= 0 || k <= 0)
    return InvalidArgument(std::string(fn) + ": weight shape [" + std::to_string(n) + ", " + std::to_string(k) +
                           "] must be positive");
  if (k % 16 != 0)
    return InvalidArgument(std::string(fn) + ": K = " + std::to_string(k) + " is not a multiple of 16");
  if (n > (1ll << 30) || k > (1ll << 30)) return InvalidArgument(std::string(fn) + ": weight too large");
  return Status::Ok();
}

Status check_activation(const void* p, int64_t ld, int64_t min_ld, const char* fn, const char* name) {
  if (p == nullptr) return InvalidArgument(std::string(fn) + ": " + name + " is null");
  if (ld < min_ld)
    return InvalidArgument(std::string(fn) + ": leading dimension of " + name + " (" + std::to_string(ld) +
                           ") is smaller than " + std::to_string(min_ld));
  return Status::Ok();
}

}  // namespace

// Shape heuristic, set from the tactic sweeps of benchmarks/bench_fp4_gemm.py --tune on H100.
Fp4GemmTactic fp4_gemm_default_tactic(int64_t m, int64_t n, int64_t k) {
  Fp4GemmTactic t;
  const DeviceInfo d = device_info();
  if (m >= 512 && dequant_path_available(n, k)) {
    t.path = Fp4GemmPath::kDequant;
    return t;
  }
  t.path = Fp4GemmPath::kFused;
  t.split_k = 1;
  const auto dims = fmt::tiled_dims(n, k);
  const bool wide = n >= 16384;  // enough row tiles to fill the GPU without splitting K
  if (m <= 16) {
    t.tile_tokens = m <= 8 ? 8 : 16;
    if (dims.kb <= 24) {  // short K: two row tiles per block, K split in two
      t.warps_n = 2;
      t.warps_k = 2;
    } else {
      t.warps_n = 1;
      t.warps_k = 4;
    }
  } else if (wide || m > 128) {
    t.tile_tokens = 32;
    t.warps_n = m > 128 ? 2 : 4;
    t.warps_k = 1;
  } else {
    t.tile_tokens = 16;
    t.warps_n = 2;
    t.warps_k = 2;
  }
  // Few row tiles (q_a, kv_a): split K across blocks until the grid covers the GPU.
  const int64_t row_blocks = (dims.nt * 16 + block_rows(t) - 1) / block_rows(t);
  const int64_t blocks = row_blocks * ((m + t.tile_tokens - 1) / t.tile_tokens);
  while (blocks * t.split_k < d.sm_count && dims.kb / (2 * t.split_k * t.warps_k) >= 4) t.split_k *= 2;
  return t;
}

std::vector<Fp4GemmTactic> fp4_gemm_candidate_tactics(int64_t m, int64_t n, int64_t k) {
  std::vector<Fp4GemmTactic> out;
  const auto dims = fmt::tiled_dims(n, k);
  const int tiles[] = {8, 16, 32, 64};
  const int wns[] = {1, 2, 4};
  const int wks[] = {1, 2, 4, 8};
  for (int tt : tiles) {
    if (tt >= 2 * std::max<int64_t>(m, 8) && tt > 8) continue;  // tiles far wider than M waste work
    for (int wn : wns)
      for (int wk : wks) {
        if (!is_compiled(tt, wn, wk)) continue;
        for (int split = 1; split <= 16; split *= 2) {
          if (split > 1 && dims.kb / (split * wk) < 2) break;
          Fp4GemmTactic t;
          t.path = Fp4GemmPath::kFused;
          t.tile_tokens = tt;
          t.warps_n = wn;
          t.warps_k = wk;
          t.split_k = split;
          out.push_back(t);
        }
      }
  }
  if (dequant_path_available(n, k) && m >= 64) {
    Fp4GemmTactic t;
    t.path = Fp4GemmPath::kDequant;
    out.push_back(t);
  }
  return out;
}

size_t fp4_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, const Fp4GemmTactic& tactic_in) {
  if (m <= 0 || n <= 0 || k <= 0) return 0;
  Fp4GemmTactic t = tactic_in;
  if (t.path == Fp4GemmPath::kAuto) t = fp4_gemm_default_tactic(m, n, k);
  if (t.path == Fp4GemmPath::kDequant) {
    const int64_t rows = dequant_chunk_rows(n, k);
    return static_cast<size_t>(rows * k * 2) + 256 + kernels::sm90_bf16_gemm_workspace_bytes(m, rows, k);
  }
  if (t.split_k <= 1) return 0;
  const auto dims = fmt::tiled_dims(n, k);
  const int64_t brows = block_rows(t);
  const int64_t row_blocks = (dims.nt * 16 + brows - 1) / brows;
  const int64_t token_tiles = (m + t.tile_tokens - 1) / t.tile_tokens;
  const int64_t tiles = row_blocks * token_tiles;
  const int64_t partial = t.split_k * tiles * brows * t.tile_tokens * 4;
  return static_cast<size_t>(partial + tiles * 4 + 256);
}

Status fp4_gemm_cuda(const Fp4Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t m,
                     const Fp4GemmTactic& tactic_in, void* workspace, size_t workspace_bytes, Stream stream) {
  const char* fn = "fp4_gemm";
  DSFP4_RETURN_IF_ERROR(check_weight_dims(w.n, w.k, fn));
  if (!w.qweight || !w.qscale || !w.global_scale) return InvalidArgument("fp4_gemm: weight pointer is null");
  if (m < 0) return InvalidArgument("fp4_gemm: M must be non-negative");
  if (m == 0) return Status::Ok();
  if (m > (1ll << 30)) return InvalidArgument("fp4_gemm: M too large");
  DSFP4_RETURN_IF_ERROR(check_activation(x, ldx, w.k, fn, "x"));
  DSFP4_RETURN_IF_ERROR(check_activation(y, ldy, w.n, fn, "y"));
  if (ldx % 8 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return InvalidArgument("fp4_gemm: rows of x must be 16-byte aligned (ldx multiple of 8)");

  Fp4GemmTactic t = tactic_in;
  if (t.path == Fp4GemmPath::kAuto) t = fp4_gemm_default_tactic(m, w.n, w.k);
  DSFP4_RETURN_IF_ERROR(check_tactic(t));
  const size_t need = fp4_gemm_workspace_bytes(m, w.n, w.k, t);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need))
    return InvalidArgument("fp4_gemm: workspace of " + std::to_string(workspace_bytes) + " bytes is smaller than the " +
                           std::to_string(need) + " this tactic needs");
  auto s = static_cast<cudaStream_t>(stream);

  if (t.path == Fp4GemmPath::kDequant) {
    if (!dequant_path_available(w.n, w.k))
      return Unsupported("fp4_gemm: the dequantize + CUTLASS path needs an sm_90 device and an sm_90a build");
    if (ldy % 8 != 0 || reinterpret_cast<uintptr_t>(y) % 16 != 0)
      return InvalidArgument("fp4_gemm: the dequantize path needs 16-byte aligned rows of y (ldy multiple of 8)");
    const int64_t chunk = dequant_chunk_rows(w.n, w.k);
    auto* base = static_cast<char*>(workspace);
    auto* alpha = reinterpret_cast<float*>(base);
    auto* wdq = reinterpret_cast<__nv_bfloat16*>(base + 256);
    void* gemm_ws = base + 256 + chunk * w.k * 2;
    const size_t gemm_ws_bytes = need - 256 - static_cast<size_t>(chunk * w.k * 2);
    const auto d = fmt::tiled_dims(w.n, w.k);
    for (int64_t r0 = 0; r0 < w.n; r0 += chunk) {
      const int64_t rows = std::min(chunk, w.n - r0);
      const int64_t words = (rows + 15) / 16 * d.kb * 128;
      const int threads = 256;
      kernels::dequant_tiled_kernel<<<static_cast<unsigned>((words + threads - 1) / threads), threads, 0, s>>>(
          w.qweight, w.qscale, w.global_scale, w.global_scale_per_tile, static_cast<int>(w.n), static_cast<int>(w.k),
          static_cast<int>(d.nt), static_cast<int>(d.kb), static_cast<int>(d.kc), static_cast<int>(r0),
          static_cast<int>(rows), wdq, w.k, alpha, w.global_scale_per_tile);
      DSFP4_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "fp4_gemm: dequantize kernel launch"));
      DSFP4_RETURN_IF_ERROR(kernels::sm90_bf16_gemm(x, ldx, wdq, w.k, static_cast<__nv_bfloat16*>(y) + r0, ldy, m,
                                                    rows, w.k, alpha, gemm_ws, gemm_ws_bytes, s));
    }
    return Status::Ok();
  }

  FusedGemmArgs a = base_args(w.n, w.k);
  a.qweight = reinterpret_cast<const uint4*>(w.qweight);
  a.qscale = w.qscale;
  a.global_scale = w.global_scale;
  a.gs_per_tile = w.global_scale_per_tile ? 1 : 0;
  a.x = static_cast<const __nv_bfloat16*>(x);
  a.ldx = ldx;
  a.y = static_cast<__nv_bfloat16*>(y);
  a.ldy = ldy;
  a.m = static_cast<int>(m);
  const int64_t brows = block_rows(t);
  const int64_t row_blocks = (static_cast<int64_t>(a.nt) * 16 + brows - 1) / brows;
  const int64_t token_tiles = (m + t.tile_tokens - 1) / t.tile_tokens;
  if (token_tiles * t.split_k > (1ll << 30)) return InvalidArgument("fp4_gemm: M too large for the fused path");
  a.token_tiles = static_cast<int>(token_tiles);
  a.split_k = t.split_k;
  if (t.split_k > 1) {
    auto* base = static_cast<char*>(workspace);
    a.counters = reinterpret_cast<int*>(base);
    const int64_t counter_bytes = (row_blocks * token_tiles * 4 + 255) / 256 * 256;
    a.partial = reinterpret_cast<float*>(base + counter_bytes);
    DSFP4_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(base, 0, row_blocks * token_tiles * 4, s),
                                      "fp4_gemm: clearing split-K counters"));
  }
  if (row_blocks > 65535) return InvalidArgument("fp4_gemm: N too large for the fused path");
  dim3 grid(static_cast<unsigned>(token_tiles * t.split_k), static_cast<unsigned>(row_blocks), 1);
  return dispatch_fused(t, a, grid, s);
}

Status fp4_grouped_gemm_cuda(const Fp4GroupedWeight& w, int num_groups, const int32_t* slot_of_group,
                             const int32_t* row_offsets, int64_t max_rows_per_group, const void* x, int64_t ldx,
                             void* y, int64_t ldy, int tile_tokens, Stream stream) {
  const char* fn = "fp4_grouped_gemm";
  DSFP4_RETURN_IF_ERROR(check_weight_dims(w.n, w.k, fn));
  const bool units = w.unit_addr != nullptr;
  if (!units && (!w.qweight || !w.qscale || !w.global_scale))
    return InvalidArgument("fp4_grouped_gemm: weight pointer is null");
  if (units && (w.unit_qweight % 16 != 0 || w.unit_qscale % 16 != 0 || w.unit_scale % 4 != 0 || w.unit_qweight < 0 ||
                w.unit_qscale < 0 || w.unit_scale < 0))
    return InvalidArgument("fp4_grouped_gemm: unit offsets must be non-negative and 16-byte (scales 4-byte) aligned");
  if (num_groups <= 0 || num_groups > 65535)
    return InvalidArgument("fp4_grouped_gemm: num_groups must be in [1, 65535]");
  if (row_offsets == nullptr) return InvalidArgument("fp4_grouped_gemm: row_offsets is null");
  if (max_rows_per_group <= 0) return Status::Ok();
  DSFP4_RETURN_IF_ERROR(check_activation(x, ldx, w.k, fn, "x"));
  DSFP4_RETURN_IF_ERROR(check_activation(y, ldy, w.n, fn, "y"));
  if (ldx % 8 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return InvalidArgument("fp4_grouped_gemm: rows of x must be 16-byte aligned (ldx multiple of 8)");
  const int64_t wbytes = static_cast<int64_t>(tiled_weight_bytes(w.n, w.k));
  if (!units && (w.qweight_slot_stride * 4 < wbytes || w.qweight_slot_stride % 4 != 0))
    return InvalidArgument("fp4_grouped_gemm: qweight_slot_stride must be a multiple of 4 words covering a weight");
  if (!units &&
      (w.qscale_slot_stride < static_cast<int64_t>(tiled_scale_bytes(w.n, w.k)) || w.qscale_slot_stride % 16 != 0))
    return InvalidArgument("fp4_grouped_gemm: qscale_slot_stride must be a multiple of 16 bytes covering the scales");

  Fp4GemmTactic t;
  t.path = Fp4GemmPath::kFused;
  if (tile_tokens <= 0) tile_tokens = max_rows_per_group <= 8 ? 8 : max_rows_per_group <= 16 ? 16 : 64;
  t.tile_tokens = tile_tokens;
  t.warps_n = tile_tokens >= 32 ? 2 : 1;
  t.warps_k = tile_tokens >= 32 ? 1 : 4;
  t.split_k = 1;
  DSFP4_RETURN_IF_ERROR(check_tactic(t));

  FusedGemmArgs a = base_args(w.n, w.k);
  a.qweight = reinterpret_cast<const uint4*>(w.qweight);
  a.qscale = w.qscale;
  a.global_scale = w.global_scale;
  a.gs_per_tile = w.global_scale_per_tile ? 1 : 0;
  a.qweight_slot_stride = w.qweight_slot_stride / 4;
  a.qscale_slot_stride = w.qscale_slot_stride;
  a.slot_of_group = slot_of_group;
  a.row_offsets = row_offsets;
  a.unit_addr = w.unit_addr;
  a.unit_qweight = w.unit_qweight;
  a.unit_qscale = w.unit_qscale;
  a.unit_scale = w.unit_scale;
  a.unit_ready = units ? w.unit_ready : nullptr;
  a.ready_epoch = w.ready_epoch;
  a.wait_failed = w.wait_failed;
  a.wait_timeout_ns = w.wait_timeout_ns;
  if (units && w.unit_ready != nullptr && w.ready_epoch == nullptr)
    return InvalidArgument("fp4_grouped_gemm: unit_ready needs ready_epoch");
  if (units) a.gs_per_tile = w.unit_scale_per_tile ? 1 : 0;
  a.x = static_cast<const __nv_bfloat16*>(x);
  a.ldx = ldx;
  a.y = static_cast<__nv_bfloat16*>(y);
  a.ldy = ldy;
  const int64_t brows = block_rows(t);
  const int64_t row_blocks = (static_cast<int64_t>(a.nt) * 16 + brows - 1) / brows;
  // Token tiles of a group beyond this many are visited by the same blocks in turn.
  const int64_t token_tiles = std::min<int64_t>((max_rows_per_group + tile_tokens - 1) / tile_tokens, 16);
  a.token_tiles = static_cast<int>(token_tiles);
  if (row_blocks > 65535) return InvalidArgument("fp4_grouped_gemm: N too large");
  dim3 grid(static_cast<unsigned>(token_tiles), static_cast<unsigned>(row_blocks), static_cast<unsigned>(num_groups));
  return dispatch_fused(t, a, grid, static_cast<cudaStream_t>(stream));
}

Status fp4_dequantize_tiled_cuda(const Fp4Weight& w, void* dst, int64_t ldw, Stream stream) {
  DSFP4_RETURN_IF_ERROR(check_weight_dims(w.n, w.k, "fp4_dequantize_tiled"));
  if (!w.qweight || !w.qscale || !w.global_scale || !dst)
    return InvalidArgument("fp4_dequantize_tiled: null pointer");
  if (ldw < w.k || ldw % 4 != 0)
    return InvalidArgument("fp4_dequantize_tiled: ldw must be a multiple of 4 and at least K");
  if (reinterpret_cast<uintptr_t>(dst) % 8 != 0) return InvalidArgument("fp4_dequantize_tiled: dst must be 8-byte aligned");
  const auto d = fmt::tiled_dims(w.n, w.k);
  const int64_t words = d.nt * d.kb * 128;
  const int threads = 256;
  kernels::dequant_tiled_kernel<<<static_cast<unsigned>((words + threads - 1) / threads), threads, 0,
                                  static_cast<cudaStream_t>(stream)>>>(
      w.qweight, w.qscale, w.global_scale, w.global_scale_per_tile, static_cast<int>(w.n), static_cast<int>(w.k),
      static_cast<int>(d.nt), static_cast<int>(d.kb), static_cast<int>(d.kc), 0, static_cast<int>(w.n),
      static_cast<__nv_bfloat16*>(dst), ldw, nullptr, true);
  return cuda_status(cudaGetLastError(), "fp4_dequantize_tiled: kernel launch");
}

namespace kernels {

__global__ void dequant_tiled_kernel(const uint32_t* __restrict__ qweight, const uint8_t* __restrict__ qscale,
                                     const float* __restrict__ global_scale, bool gs_per_tile, int n, int k, int nt,
                                     int kb, int kc, int row_begin, int row_count, __nv_bfloat16* __restrict__ dst,
                                     int64_t ldw, float* alpha, bool apply_global) {
  // Per-tile global scales are applied here, so the GEMM epilogue then multiplies by 1.
  if (alpha != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *alpha = apply_global ? 1.0f : global_scale[0] * 512.0f;
  // Word index within the chunk's row tiles: [tile][kb][lane][j].
  const int64_t tile_begin = row_begin / 16;
  const int64_t tiles = (row_count + 15) / 16;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= tiles * kb * 128) return;
  const int j = static_cast<int>(idx & 3);
  const int lane = static_cast<int>((idx >> 2) & 31);
  const int64_t tkb = idx >> 7;
  const int kbi = static_cast<int>(tkb % kb);
  const int64_t t = tile_begin + tkb / kb;
  if (t >= nt) return;
  const float gs = global_scale[gs_per_tile ? t : 0];
  const uint32_t w = qweight[idx + tile_begin * kb * 128];
  const int g = lane >> 2, c = lane & 3;
  const uint32_t sv =
      *reinterpret_cast<const uint16_t*>(qscale + ((t * kc + (kbi >> 3)) * 32 + lane) * 16 + (kbi & 7) * 2);
  const uint32_t s0 = e4m3_to_bf16_scaled(sv & 0xFFu), s1 = e4m3_to_bf16_scaled(sv >> 8);
  uint32_t r[4];
  decode_word(w, r);
  const uint32_t v[4] = {bf16x2_mul(r[0], s0 | (s0 << 16)), bf16x2_mul(r[1], s1 | (s1 << 16)),
                         bf16x2_mul(r[2], s0 | (s0 << 16)), bf16x2_mul(r[3], s1 | (s1 << 16))};
  const int col = 64 * kbi + 16 * c + 4 * j;
  if (col >= k) return;
#pragma unroll
  for (int rs = 0; rs < 2; ++rs) {
    const int64_t row = 16 * t + g + 8 * rs;
    if (row >= n || row >= row_begin + row_count) continue;
    // Columns col..col+3 of this row: registers rs (cols 0,1) and 2 + rs (cols 2,3).
    uint2 out;
    out.x = v[rs];
    out.y = v[2 + rs];
    if (apply_global) {
      __nv_bfloat162 lo = *reinterpret_cast<__nv_bfloat162*>(&out.x);
      __nv_bfloat162 hi = *reinterpret_cast<__nv_bfloat162*>(&out.y);
      const float f = gs * 512.0f;
      lo = __floats2bfloat162_rn(__low2float(lo) * f, __high2float(lo) * f);
      hi = __floats2bfloat162_rn(__low2float(hi) * f, __high2float(hi) * f);
      out.x = *reinterpret_cast<uint32_t*>(&lo);
      out.y = *reinterpret_cast<uint32_t*>(&hi);
    }
    *reinterpret_cast<uint2*>(dst + (row - row_begin) * ldw + col) = out;
  }
}

}  // namespace kernels

}  // namespace dsfp4
