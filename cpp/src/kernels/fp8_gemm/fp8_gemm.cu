// FP8 GEMM runner: argument checks, tactic heuristic, launches of the fused kernel, the
// activation-quantize + CUTLASS FP8 path and the dequantize + CUTLASS bf16 path; the block
// quantize and dequantize kernels.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "dsfp4/fp8_gemm.h"
#include "kernels/cuda_check.h"
#include "kernels/device_info.h"
#include "kernels/fp4_gemm/bf16_gemm_sm90.h"
#include "kernels/fp8_gemm/fp8_format.h"
#include "kernels/fp8_gemm/fp8_gemm_mma.cuh"
#include "kernels/fp8_gemm/fp8_gemm_sm90.h"

namespace dsfp4 {

namespace kernels {
namespace fp8 {

// One warp per (row, 128-column group): 4 columns per lane.
__global__ void act_quant_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int m, int m_pad, int k,
                                 uint8_t* __restrict__ xq, int64_t ldq, float* __restrict__ scale, int64_t ld_scale) {
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int groups = (k + kFp8Block - 1) / kFp8Block;
  if (warp_id >= static_cast<int64_t>(m_pad) * groups) return;  // warp-uniform
  const int r = static_cast<int>(warp_id / groups), j = static_cast<int>(warp_id % groups);
  if (r >= m) {  // padding rows of the scale table: defined values, never used
    if (lane == 0) scale[static_cast<int64_t>(j) * ld_scale + r] = 0.0f;
    return;
  }
  const int col = j * kFp8Block + 4 * lane;
  float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const bool ok = col < k;  // k % 16 == 0: a lane's 4 columns are all in or all out
  if (ok) {
    const uint2 raw = *reinterpret_cast<const uint2*>(x + static_cast<int64_t>(r) * ldx + col);
    v[0] = fmt::bf16_bits_to_float(static_cast<uint16_t>(raw.x & 0xFFFFu));
    v[1] = fmt::bf16_bits_to_float(static_cast<uint16_t>(raw.x >> 16));
    v[2] = fmt::bf16_bits_to_float(static_cast<uint16_t>(raw.y & 0xFFFFu));
    v[3] = fmt::bf16_bits_to_float(static_cast<uint16_t>(raw.y >> 16));
  }
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  const float s = fmt::fp8_scale_from_amax(amax);
  if (ok) {
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) packed |= static_cast<uint32_t>(fmt::fp8_quantize_value(v[i], s)) << (8 * i);
    *reinterpret_cast<uint32_t*>(xq + static_cast<int64_t>(r) * ldq + col) = packed;
  }
  if (lane == 0) scale[static_cast<int64_t>(j) * ld_scale + r] = s;
}

// One block of 256 threads per 128×128 weight block: amax, then quantize.
__global__ void block_quantize_kernel(MatrixSource src, int64_t rows, int64_t cols, uint8_t* __restrict__ q,
                                      float* __restrict__ scale_inv) {
  const int64_t bi = blockIdx.y, bj = blockIdx.x;
  const int64_t r0 = bi * kFp8Block, c0 = bj * kFp8Block;
  const int64_t nr = rows - r0 < kFp8Block ? rows - r0 : kFp8Block;
  const int64_t nc = cols - c0 < kFp8Block ? cols - c0 : kFp8Block;
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < nr * nc; i += blockDim.x)
    amax = fmaxf(amax, fabsf(fmt::load_value(src, cols, r0 + i / nc, c0 + i % nc)));
  __shared__ float part[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    amax = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    if (threadIdx.x == 0) part[0] = amax;
  }
  __syncthreads();
  const float s = fmt::fp8_scale_from_amax(part[0]);
  if (threadIdx.x == 0) scale_inv[bi * gridDim.x + bj] = s;
  for (int64_t i = threadIdx.x; i < nr * nc; i += blockDim.x) {
    const int64_t r = r0 + i / nc, c = c0 + i % nc;
    q[r * cols + c] = fmt::fp8_quantize_value(fmt::load_value(src, cols, r, c), s);
  }
}

// dequant(W) rounded to bf16 for rows [row0, row0 + count): 16 columns per thread. Also writes
// *alpha = 1 for the GEMM epilogue when alpha is set.
__global__ void dequant_bf16_kernel(const uint8_t* __restrict__ w, const float* __restrict__ scale, int64_t n,
                                    int64_t k, int64_t split, int64_t row0, int64_t count,
                                    __nv_bfloat16* __restrict__ dst, int64_t ldd, float* alpha) {
  if (alpha != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *alpha = 1.0f;
  const int64_t per_row = k / 16;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= count * per_row) return;
  const int64_t r = row0 + idx / per_row, c = 16 * (idx % per_row);
  if (r >= n) return;
  const float s = scale[fmt::fp8_scale_row(r, split) * ((k + kFp8Block - 1) / kFp8Block) + c / kFp8Block];
  const uint4 raw = *reinterpret_cast<const uint4*>(w + r * k + c);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t out[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t word = words[i >> 1];
    const int sh = (i & 1) * 16;
    const float lo = fmt::e4m3_to_float(static_cast<uint8_t>(word >> sh)) * s;
    const float hi = fmt::e4m3_to_float(static_cast<uint8_t>(word >> (sh + 8))) * s;
    out[i] = fmt::float_to_bf16_bits(lo) | (static_cast<uint32_t>(fmt::float_to_bf16_bits(hi)) << 16);
  }
  uint4* d = reinterpret_cast<uint4*>(dst + (r - row0) * ldd + c);
  d[0] = make_uint4(out[0], out[1], out[2], out[3]);
  d[1] = make_uint4(out[4], out[5], out[6], out[7]);
}

}  // namespace fp8
}  // namespace kernels

namespace {

using kernels::fp8::FusedArgs;

constexpr int64_t kDequantChunkBytes = 64ll << 20;  // bf16 rows per chunk on the kDequant path

using kernels::DeviceInfo;
using kernels::device_info;

int64_t block_rows(const Fp8GemmTactic& t) {
  return 16ll * t.warps_n;
}
int64_t kblocks(int64_t k) {
  return fp8_scale_cols(k);
}
int64_t round_up(int64_t v, int64_t a) {
  return (v + a - 1) / a * a;
}

bool hopper() {
  return device_info().cc_major == 9;
}

// The FP8 tensor-core path: sm_90a build, Hopper device, aligned shape, uniform block grid.
bool blockscaled_available(int64_t m, int64_t n, int64_t k, int64_t split_rows) {
  return kernels::sm90_fp8_blockwise_available() && hopper() && split_rows % kFp8Block == 0 &&
         kernels::sm90_fp8_blockwise_can_run(m, n, k, k, k, n);
}

bool dequant_available(int64_t n, int64_t k) {
  return kernels::sm90_bf16_gemm_available() && hopper() && k % 16 == 0 && n >= 128;
}

int64_t dequant_chunk_rows(int64_t n, int64_t k) {
  int64_t rows = kDequantChunkBytes / (2 * k);
  rows = std::max<int64_t>(256, rows / 256 * 256);
  return std::min(rows, round_up(n, 16));
}

Status check_tactic(const Fp8GemmTactic& t) {
  if (t.path == Fp8GemmPath::kFused) {
    if (t.tile_tokens != 8 && t.tile_tokens != 16 && t.tile_tokens != 32 && t.tile_tokens != 64)
      return InvalidArgument("fp8_gemm: tactic.tile_tokens must be 8, 16, 32 or 64");
    if (t.warps_k != 1 && t.warps_k != 2 && t.warps_k != 4 && t.warps_k != 8)
      return InvalidArgument("fp8_gemm: tactic.warps_k must be 1, 2, 4 or 8");
    if (t.warps_n != 1 && t.warps_n != 2 && t.warps_n != 4)
      return InvalidArgument("fp8_gemm: tactic.warps_n must be 1, 2 or 4");
    if (t.split_k < 1 || t.split_k > 64) return InvalidArgument("fp8_gemm: tactic.split_k must be in [1, 64]");
  } else if (t.path != Fp8GemmPath::kBlockScaled && t.path != Fp8GemmPath::kDequant) {
    return InvalidArgument("fp8_gemm: unknown tactic.path");
  }
  return Status::Ok();
}

template <int NT8, int WN, int KW, int UC>
cudaError_t launch_fused(const FusedArgs& a, dim3 grid, cudaStream_t stream) {
  kernels::fp8::fused_fp8_gemm_kernel<NT8, WN, KW, UC><<<grid, 32 * WN * KW, 0, stream>>>(a);
  return cudaGetLastError();
}

// The compiled fused kernels: the one table behind dispatch and candidate_tactics.
struct FusedKernel {
  int tile_tokens, warps_n, warps_k;
  cudaError_t (*launch)(const FusedArgs&, dim3, cudaStream_t);
};
constexpr FusedKernel kFusedKernels[] = {
    {8, 1, 8, launch_fused<1, 1, 8, 4>},  {8, 1, 4, launch_fused<1, 1, 4, 4>},  {8, 2, 2, launch_fused<1, 2, 2, 4>},
    {8, 4, 1, launch_fused<1, 4, 1, 4>},  {16, 1, 8, launch_fused<2, 1, 8, 2>}, {16, 1, 4, launch_fused<2, 1, 4, 2>},
    {16, 2, 2, launch_fused<2, 2, 2, 2>}, {32, 2, 1, launch_fused<4, 2, 1, 2>}, {32, 4, 1, launch_fused<4, 4, 1, 2>},
    {64, 2, 1, launch_fused<8, 2, 1, 1>}, {64, 4, 1, launch_fused<8, 4, 1, 1>},
};

const FusedKernel* find_fused(int tile_tokens, int warps_n, int warps_k) {
  for (const FusedKernel& f : kFusedKernels)
    if (f.tile_tokens == tile_tokens && f.warps_n == warps_n && f.warps_k == warps_k) return &f;
  return nullptr;
}

Status dispatch_fused(const Fp8GemmTactic& t, const FusedArgs& a, dim3 grid, cudaStream_t s) {
  const FusedKernel* f = find_fused(t.tile_tokens, t.warps_n, t.warps_k);
  if (f == nullptr)
    return Unsupported("fp8_gemm: no kernel for tile_tokens=" + std::to_string(t.tile_tokens) +
                       " warps_n=" + std::to_string(t.warps_n) + " warps_k=" + std::to_string(t.warps_k));
  return cuda_status(f->launch(a, grid, s), "fp8_gemm: fused kernel launch");
}

FusedArgs base_args(int64_t n, int64_t k, int64_t split) {
  FusedArgs a{};
  a.n = static_cast<int>(n);
  a.k = static_cast<int>(k);
  a.split_rows = static_cast<int>(split);
  a.nt = static_cast<int>((n + 15) / 16);
  a.kb = static_cast<int>(kblocks(k));
  a.split_k = 1;
  return a;
}

Status check_dims(int64_t n, int64_t k, int64_t split, const char* fn) {
  if (n <= 0 || k <= 0)
    return InvalidArgument(std::string(fn) + ": weight shape [" + std::to_string(n) + ", " + std::to_string(k) +
                           "] must be positive");
  if (k % 16 != 0) return InvalidArgument(std::string(fn) + ": K = " + std::to_string(k) + " is not a multiple of 16");
  if (n > (1ll << 30) || k > (1ll << 30)) return InvalidArgument(std::string(fn) + ": weight too large");
  if (split < 0 || split >= n)
    return InvalidArgument(std::string(fn) + ": split_rows = " + std::to_string(split) + " must be in [0, " +
                           std::to_string(n) + ")");
  return Status::Ok();
}

Status check_activation(const void* p, int64_t ld, int64_t min_ld, const char* fn, const char* name) {
  if (p == nullptr) return InvalidArgument(std::string(fn) + ": " + name + " is null");
  if (ld < min_ld)
    return InvalidArgument(std::string(fn) + ": leading dimension of " + name + " (" + std::to_string(ld) +
                           ") is smaller than " + std::to_string(min_ld));
  return Status::Ok();
}

// Byte offsets of the kBlockScaled workspace: xq, then the activation scales, then CUTLASS's.
struct BlockScaledWorkspace {
  int64_t scale_offset, cutlass_offset, total;
};
BlockScaledWorkspace blockscaled_workspace(int64_t m, int64_t n, int64_t k) {
  BlockScaledWorkspace w;
  w.scale_offset = round_up(m * k, 256);
  w.cutlass_offset = w.scale_offset + round_up(4 * kblocks(k) * kernels::sm90_fp8_scale_ld(m), 256);
  w.total = w.cutlass_offset + static_cast<int64_t>(kernels::sm90_fp8_blockwise_workspace_bytes(m, n, k));
  return w;
}

}  // namespace

namespace {

Fp8GemmTactic fused_default_tactic(int64_t m, int64_t n, int64_t k);

// Shape heuristic for a weight with the given split; bench_fp8_gemm.py --tune sweeps the rest.
// Like blockscaled_available, it assumes ldy = N: the CUTLASS paths need N % 8 == 0 then.
Fp8GemmTactic default_tactic(int64_t m, int64_t n, int64_t k, int64_t split_rows) {
  Fp8GemmTactic t;
  if (m >= 128 && blockscaled_available(m, n, k, split_rows)) {
    t.path = Fp8GemmPath::kBlockScaled;
    return t;
  }
  // a split weight whose grid the FP8 path cannot take
  if (m >= 512 && n % 8 == 0 && dequant_available(n, k)) {
    t.path = Fp8GemmPath::kDequant;
    return t;
  }
  return fused_default_tactic(m, n, k);
}

Fp8GemmTactic fused_default_tactic(int64_t m, int64_t n, int64_t k) {
  Fp8GemmTactic t;
  const DeviceInfo d = device_info();
  t.path = Fp8GemmPath::kFused;
  t.split_k = 1;
  const int64_t kb = kblocks(k);
  if (m <= 16) {
    t.tile_tokens = m <= 8 ? 8 : 16;
    if (kb <= 12) {  // short K: two row tiles per block, K split in two
      t.warps_n = 2;
      t.warps_k = 2;
    } else {
      t.warps_n = 1;
      t.warps_k = 4;
    }
  } else if (m <= 64) {
    t.tile_tokens = m <= 32 ? 16 : 32;
    t.warps_n = 2;
    t.warps_k = m <= 32 ? 2 : 1;
  } else {
    t.tile_tokens = 64;
    t.warps_n = n >= 16384 ? 4 : 2;
    t.warps_k = 1;
  }
  // Few row tiles (q_a, kv_a, expert shapes): split K across blocks until the grid covers the GPU.
  const int64_t row_blocks = (n + block_rows(t) - 1) / block_rows(t);
  const int64_t blocks = row_blocks * ((m + t.tile_tokens - 1) / t.tile_tokens);
  while (blocks * t.split_k < 2 * d.sm_count && kb / (2 * t.split_k * t.warps_k) >= 2) t.split_k *= 2;
  return t;
}

}  // namespace

Fp8GemmTactic fp8_gemm_default_tactic(int64_t m, int64_t n, int64_t k, int64_t split_rows) {
  return default_tactic(m, n, k, split_rows);
}

std::vector<Fp8GemmTactic> fp8_gemm_candidate_tactics(int64_t m, int64_t n, int64_t k, int64_t split_rows) {
  std::vector<Fp8GemmTactic> out;
  const int64_t kb = kblocks(k);
  for (const FusedKernel& f : kFusedKernels) {
    if (f.tile_tokens >= 2 * std::max<int64_t>(m, 8) && f.tile_tokens > 8) continue;  // far wider than M
    for (int split = 1; split <= 16; split *= 2) {
      if (split > 1 && kb / (split * f.warps_k) < 1) break;
      Fp8GemmTactic t;
      t.path = Fp8GemmPath::kFused;
      t.tile_tokens = f.tile_tokens;
      t.warps_n = f.warps_n;
      t.warps_k = f.warps_k;
      t.split_k = split;
      out.push_back(t);
    }
  }
  if (m >= 64 && blockscaled_available(m, n, k, split_rows)) {
    Fp8GemmTactic t;
    t.path = Fp8GemmPath::kBlockScaled;
    out.push_back(t);
  }
  if (m >= 64 && n % 8 == 0 && dequant_available(n, k)) {  // ldy = N, as above
    Fp8GemmTactic t;
    t.path = Fp8GemmPath::kDequant;
    out.push_back(t);
  }
  return out;
}

size_t fp8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, const Fp8GemmTactic& tactic_in, int64_t split_rows) {
  if (m <= 0 || n <= 0 || k <= 0) return 0;
  Fp8GemmTactic t = tactic_in;
  if (t.path == Fp8GemmPath::kAuto) t = default_tactic(m, n, k, split_rows);
  if (t.path == Fp8GemmPath::kBlockScaled) return static_cast<size_t>(blockscaled_workspace(m, n, k).total);
  if (t.path == Fp8GemmPath::kDequant) {
    const int64_t rows = dequant_chunk_rows(n, k);
    return static_cast<size_t>(rows * k * 2 + 256) + kernels::sm90_bf16_gemm_workspace_bytes(m, rows, k);
  }
  if (t.split_k <= 1 || t.warps_n <= 0 || t.tile_tokens <= 0) return 0;
  const int64_t brows = block_rows(t);
  const int64_t row_blocks = (round_up(n, 16) + brows - 1) / brows;
  const int64_t token_tiles = (m + t.tile_tokens - 1) / t.tile_tokens;
  const int64_t tiles = row_blocks * token_tiles;
  const int64_t partial = t.split_k * tiles * brows * t.tile_tokens * 4;
  return static_cast<size_t>(round_up(tiles * 4, 256) + partial);
}

Status fp8_gemm_cuda(const Fp8Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t m,
                     const Fp8GemmTactic& tactic_in, void* workspace, size_t workspace_bytes, Stream stream) {
  const char* fn = "fp8_gemm";
  DSFP4_RETURN_IF_ERROR(check_dims(w.n, w.k, w.split_rows, fn));
  if (!w.weight || !w.scale) return InvalidArgument("fp8_gemm: weight or scale is null");
  if (reinterpret_cast<uintptr_t>(w.weight) % 16 != 0)
    return InvalidArgument("fp8_gemm: weight must be 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(w.scale) % 4 != 0) return InvalidArgument("fp8_gemm: scale must be 4-byte aligned");
  if (m < 0) return InvalidArgument("fp8_gemm: M must be non-negative");
  if (m == 0) return Status::Ok();
  if (m > (1ll << 30)) return InvalidArgument("fp8_gemm: M too large");
  DSFP4_RETURN_IF_ERROR(check_activation(x, ldx, w.k, fn, "x"));
  DSFP4_RETURN_IF_ERROR(check_activation(y, ldy, w.n, fn, "y"));
  if (ldx % 8 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return InvalidArgument("fp8_gemm: rows of x must be 16-byte aligned (ldx multiple of 8)");

  Fp8GemmTactic t = tactic_in;
  if (t.path == Fp8GemmPath::kAuto) {
    t = default_tactic(m, w.n, w.k, w.split_rows);
    // The heuristic assumed ldy = N and an aligned y; an output the CUTLASS paths cannot store
    // takes the fused path without split-K (no workspace: the caller sized it for the heuristic).
    if (t.path != Fp8GemmPath::kFused && (ldy % 8 != 0 || reinterpret_cast<uintptr_t>(y) % 16 != 0)) {
      t = fused_default_tactic(m, w.n, w.k);
      t.split_k = 1;
    }
  }
  DSFP4_RETURN_IF_ERROR(check_tactic(t));
  const size_t need = fp8_gemm_workspace_bytes(m, w.n, w.k, t, w.split_rows);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need))
    return InvalidArgument("fp8_gemm: workspace of " + std::to_string(workspace_bytes) + " bytes is smaller than the " +
                           std::to_string(need) + " this tactic needs");
  auto s = static_cast<cudaStream_t>(stream);
  auto* yb = static_cast<__nv_bfloat16*>(y);

  if (t.path == Fp8GemmPath::kBlockScaled) {
    if (!kernels::sm90_fp8_blockwise_available() || !hopper())
      return Unsupported("fp8_gemm: the FP8 tensor-core path needs an sm_90 device and an sm_90a build");
    if (w.split_rows % kFp8Block != 0)
      return InvalidArgument("fp8_gemm: the FP8 tensor-core path needs split_rows to be a multiple of 128");
    if (!kernels::sm90_fp8_blockwise_can_run(m, w.n, w.k, w.k, w.k, ldy) || reinterpret_cast<uintptr_t>(y) % 16 != 0)
      return InvalidArgument("fp8_gemm: the FP8 tensor-core path needs N and ldy multiples of 8 and aligned rows of y");
    const BlockScaledWorkspace lay = blockscaled_workspace(m, w.n, w.k);
    auto* base = static_cast<uint8_t*>(workspace);
    auto* xq = base;
    auto* sx = reinterpret_cast<float*>(base + lay.scale_offset);
    const int64_t m_pad = kernels::sm90_fp8_scale_ld(m);
    const int64_t warps = m_pad * kblocks(w.k);
    kernels::fp8::act_quant_kernel<<<static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, s>>>(
        static_cast<const __nv_bfloat16*>(x), ldx, static_cast<int>(m), static_cast<int>(m_pad), static_cast<int>(w.k),
        xq, w.k, sx, m_pad);
    DSFP4_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "fp8_gemm: activation quantize launch"));
    return kernels::sm90_fp8_blockwise_gemm(xq, w.k, sx, w.weight, w.k, w.scale, yb, ldy, m, w.n, w.k,
                                            base + lay.cutlass_offset, need - lay.cutlass_offset, s);
  }

  if (t.path == Fp8GemmPath::kDequant) {
    if (!dequant_available(w.n, w.k))
      return Unsupported("fp8_gemm: the dequantize + CUTLASS path needs an sm_90 device, an sm_90a build and N >= 128");
    if (ldy % 8 != 0 || reinterpret_cast<uintptr_t>(y) % 16 != 0)
      return InvalidArgument("fp8_gemm: the dequantize path needs 16-byte aligned rows of y (ldy multiple of 8)");
    const int64_t chunk = dequant_chunk_rows(w.n, w.k);
    auto* base = static_cast<char*>(workspace);
    auto* alpha = reinterpret_cast<float*>(base);
    auto* wdq = reinterpret_cast<__nv_bfloat16*>(base + 256);
    void* gemm_ws = base + 256 + chunk * w.k * 2;
    const size_t gemm_ws_bytes = need - 256 - static_cast<size_t>(chunk * w.k * 2);
    for (int64_t r0 = 0; r0 < w.n; r0 += chunk) {
      const int64_t rows = std::min(chunk, w.n - r0);
      const int64_t threads = rows * (w.k / 16);
      kernels::fp8::dequant_bf16_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, s>>>(
          w.weight, w.scale, w.n, w.k, w.split_rows, r0, rows, wdq, w.k, alpha);
      DSFP4_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "fp8_gemm: dequantize kernel launch"));
      DSFP4_RETURN_IF_ERROR(
          kernels::sm90_bf16_gemm(x, ldx, wdq, w.k, yb + r0, ldy, m, rows, w.k, alpha, gemm_ws, gemm_ws_bytes, s));
    }
    return Status::Ok();
  }

  FusedArgs a = base_args(w.n, w.k, w.split_rows);
  a.weight = w.weight;
  a.scale = w.scale;
  a.x = static_cast<const __nv_bfloat16*>(x);
  a.ldx = ldx;
  a.y = yb;
  a.ldy = ldy;
  a.m = static_cast<int>(m);
  const int64_t brows = block_rows(t);
  const int64_t row_blocks = (static_cast<int64_t>(a.nt) * 16 + brows - 1) / brows;
  const int64_t token_tiles = (m + t.tile_tokens - 1) / t.tile_tokens;
  if (token_tiles * t.split_k > (1ll << 30)) return InvalidArgument("fp8_gemm: M too large for the fused path");
  if (row_blocks > 65535) return InvalidArgument("fp8_gemm: N too large for the fused path");
  a.token_tiles = static_cast<int>(token_tiles);
  a.split_k = t.split_k;
  if (t.split_k > 1) {
    auto* base = static_cast<char*>(workspace);
    a.counters = reinterpret_cast<int*>(base);
    a.partial = reinterpret_cast<float*>(base + round_up(row_blocks * token_tiles * 4, 256));
    DSFP4_RETURN_IF_ERROR(
        cuda_status(cudaMemsetAsync(base, 0, row_blocks * token_tiles * 4, s), "fp8_gemm: clearing split-K counters"));
  }
  dim3 grid(static_cast<unsigned>(token_tiles * t.split_k), static_cast<unsigned>(row_blocks), 1);
  return dispatch_fused(t, a, grid, s);
}

Status fp8_grouped_gemm_cuda(const Fp8GroupedWeight& w, int num_groups, const int32_t* slot_of_group,
                             const int32_t* row_offsets, int64_t max_rows_per_group, const void* x, int64_t ldx,
                             void* y, int64_t ldy, int tile_tokens, Stream stream) {
  const char* fn = "fp8_grouped_gemm";
  DSFP4_RETURN_IF_ERROR(check_dims(w.n, w.k, w.split_rows, fn));
  const bool units = w.unit_addr != nullptr;
  if (!units && (!w.weight || !w.scale)) return InvalidArgument("fp8_grouped_gemm: weight or scale is null");
  if (units && (w.unit_weight % 16 != 0 || w.unit_scale % 4 != 0 || w.unit_weight < 0 || w.unit_scale < 0))
    return InvalidArgument(
        "fp8_grouped_gemm: unit offsets must be non-negative, the weight's 16-byte and the "
        "scales' 4-byte aligned");
  if (!units && (reinterpret_cast<uintptr_t>(w.weight) % 16 != 0 || w.weight_slot_stride % 16 != 0 ||
                 w.weight_slot_stride < w.n * w.k))
    return InvalidArgument(
        "fp8_grouped_gemm: weight must be 16-byte aligned with a slot stride that is a multiple of "
        "16 bytes covering a weight");
  if (!units && (reinterpret_cast<uintptr_t>(w.scale) % 4 != 0 ||
                 w.scale_slot_stride < fp8_scale_rows(w.n, w.split_rows) * fp8_scale_cols(w.k)))
    return InvalidArgument("fp8_grouped_gemm: scale_slot_stride must cover one weight's scales");
  if (num_groups <= 0 || num_groups > 65535)
    return InvalidArgument("fp8_grouped_gemm: num_groups must be in [1, 65535]");
  if (row_offsets == nullptr) return InvalidArgument("fp8_grouped_gemm: row_offsets is null");
  if (max_rows_per_group <= 0) return Status::Ok();
  DSFP4_RETURN_IF_ERROR(check_activation(x, ldx, w.k, fn, "x"));
  DSFP4_RETURN_IF_ERROR(check_activation(y, ldy, w.n, fn, "y"));
  if (ldx % 8 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return InvalidArgument("fp8_grouped_gemm: rows of x must be 16-byte aligned (ldx multiple of 8)");

  Fp8GemmTactic t;
  t.path = Fp8GemmPath::kFused;
  if (tile_tokens <= 0) tile_tokens = max_rows_per_group <= 8 ? 8 : max_rows_per_group <= 16 ? 16 : 64;
  t.tile_tokens = tile_tokens;
  t.warps_n = tile_tokens >= 32 ? 2 : 1;
  t.warps_k = tile_tokens >= 32 ? 1 : 4;
  t.split_k = 1;
  DSFP4_RETURN_IF_ERROR(check_tactic(t));

  FusedArgs a = base_args(w.n, w.k, w.split_rows);
  a.weight = w.weight;
  a.scale = w.scale;
  a.weight_slot_stride = w.weight_slot_stride;
  a.scale_slot_stride = w.scale_slot_stride;
  a.slot_of_group = slot_of_group;
  a.row_offsets = row_offsets;
  a.unit_addr = w.unit_addr;
  a.unit_weight = w.unit_weight;
  a.unit_scale = w.unit_scale;
  a.unit_ready = w.unit_addr != nullptr ? w.unit_ready : nullptr;
  a.ready_epoch = w.ready_epoch;
  a.wait_failed = w.wait_failed;
  a.wait_timeout_ns = w.wait_timeout_ns;
  if (a.unit_ready != nullptr && a.ready_epoch == nullptr)
    return InvalidArgument("fp8_grouped_gemm: unit_ready needs ready_epoch");
  a.x = static_cast<const __nv_bfloat16*>(x);
  a.ldx = ldx;
  a.y = static_cast<__nv_bfloat16*>(y);
  a.ldy = ldy;
  const int64_t brows = block_rows(t);
  const int64_t row_blocks = (static_cast<int64_t>(a.nt) * 16 + brows - 1) / brows;
  // Token tiles of a group beyond this many are visited by the same blocks in turn.
  const int64_t token_tiles = std::min<int64_t>((max_rows_per_group + tile_tokens - 1) / tile_tokens, 16);
  a.token_tiles = static_cast<int>(token_tiles);
  if (row_blocks > 65535) return InvalidArgument("fp8_grouped_gemm: N too large");
  dim3 grid(static_cast<unsigned>(token_tiles), static_cast<unsigned>(row_blocks), static_cast<unsigned>(num_groups));
  return dispatch_fused(t, a, grid, static_cast<cudaStream_t>(stream));
}

Status fp8_act_quant_cuda(const void* x, int64_t ldx, int64_t m, int64_t k, uint8_t* xq, int64_t ldq, float* scale,
                          int64_t ld_scale, Stream stream) {
  if (m < 0 || k <= 0 || k % 16 != 0) return InvalidArgument("fp8_act_quant: K must be a positive multiple of 16");
  if (m == 0) return Status::Ok();
  if (!x || !xq || !scale) return InvalidArgument("fp8_act_quant: null pointer");
  if (ldx < k || ldq < k || ld_scale < m || ldx % 4 != 0 || ldq % 4 != 0 || reinterpret_cast<uintptr_t>(x) % 8 != 0 ||
      reinterpret_cast<uintptr_t>(xq) % 4 != 0)
    return InvalidArgument(
        "fp8_act_quant: ldx, ldq must be multiples of 4 and ≥ K (x 8-byte, xq 4-byte aligned), "
        "ld_scale ≥ M");
  if (m > (1ll << 30)) return InvalidArgument("fp8_act_quant: M too large");
  const int64_t warps = m * kblocks(k);
  kernels::fp8::
      act_quant_kernel<<<static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const __nv_bfloat16*>(x), ldx, static_cast<int>(m), static_cast<int>(m), static_cast<int>(k), xq,
          ldq, scale, ld_scale);
  return cuda_status(cudaGetLastError(), "fp8_act_quant: kernel launch");
}

Status fp8_block_quantize_cuda(const MatrixSource& src, int64_t rows, int64_t cols, uint8_t* q, float* scale_inv,
                               Stream stream) {
  if (rows <= 0 || cols <= 0) return InvalidArgument("fp8_block_quantize: shape must be positive");
  if (!src.data || !q || !scale_inv) return InvalidArgument("fp8_block_quantize: null pointer");
  if (src.dtype != DType::kFloat32 && src.dtype != DType::kFloat16 && src.dtype != DType::kBFloat16)
    return InvalidArgument("fp8_block_quantize: source must be float32, float16 or bfloat16");
  const int64_t rb = (rows + kFp8Block - 1) / kFp8Block, cb = fp8_scale_cols(cols);
  if (rb > 65535 || cb > (1ll << 30)) return InvalidArgument("fp8_block_quantize: matrix too large");
  kernels::fp8::block_quantize_kernel<<<dim3(static_cast<unsigned>(cb), static_cast<unsigned>(rb)), 256, 0,
                                        static_cast<cudaStream_t>(stream)>>>(src, rows, cols, q, scale_inv);
  return cuda_status(cudaGetLastError(), "fp8_block_quantize: kernel launch");
}

Status fp8_dequantize_bf16_cuda(const Fp8Weight& w, void* dst, int64_t ldd, Stream stream) {
  DSFP4_RETURN_IF_ERROR(check_dims(w.n, w.k, w.split_rows, "fp8_dequantize"));
  if (!w.weight || !w.scale || !dst) return InvalidArgument("fp8_dequantize: null pointer");
  if (reinterpret_cast<uintptr_t>(w.weight) % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0 || ldd % 8 != 0 ||
      ldd < w.k)
    return InvalidArgument("fp8_dequantize: weight and dst must be 16-byte aligned, ldd a multiple of 8 and ≥ K");
  const int64_t threads = w.n * (w.k / 16);
  kernels::fp8::
      dequant_bf16_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
          w.weight, w.scale, w.n, w.k, w.split_rows, 0, w.n, static_cast<__nv_bfloat16*>(dst), ldd, nullptr);
  return cuda_status(cudaGetLastError(), "fp8_dequantize: kernel launch");
}

}  // namespace dsfp4
