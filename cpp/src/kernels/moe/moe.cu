// MoE CUDA kernels: noaux_tc routing (one warp per token), permutation by expert (stable,
// deterministic), weighted combine, SiLU·mul.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "dsfp4/moe.h"
#include "kernels/cuda_check.h"

namespace dsfp4 {

namespace {

constexpr int kRouteWarps = 4;
constexpr int kMaxExperts = 1024;

__device__ __forceinline__ float load_logit(const void* p, bool bf16, int64_t i) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Warp argmax of (v, idx): larger v wins, ties go to the lower idx.
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, off);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
}

__global__ void __launch_bounds__(32 * kRouteWarps)
    route_kernel(const void* logits, bool bf16, const float* __restrict__ bias, MoeRouteParams p,
                 float* __restrict__ topk_weights, int32_t* __restrict__ topk_ids) {
  __shared__ float s_all[kRouteWarps][kMaxExperts];
  __shared__ float c_all[kRouteWarps][kMaxExperts];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= p.tokens) return;  // warp-uniform; no block barrier below
  float* s = s_all[warp];
  float* c = c_all[warp];
  const int e = p.experts, gs = e / p.n_group;
  const float neg_inf = -__int_as_float(0x7f800000);
  for (int i = lane; i < e; i += 32) {
    const float x = load_logit(logits, bf16, t * e + i);
    const float sv = 1.0f / (1.0f + expf(-x));
    s[i] = sv;
    c[i] = sv + bias[i];
  }
  __syncwarp();
  // Lane g scores group g: sum of its two largest biased scores.
  float gscore = neg_inf;
  if (lane < p.n_group) {
    float m1 = neg_inf, m2 = neg_inf;
    for (int i = lane * gs; i < (lane + 1) * gs; ++i) {
      const float v = c[i];
      if (v > m1) {
        m2 = m1;
        m1 = v;
      } else if (v > m2) {
        m2 = v;
      }
    }
    gscore = m1 + m2;
  }
  unsigned keep = 0;  // bit g: group g kept
  for (int r = 0; r < p.topk_group; ++r) {
    float v = neg_inf;
    int idx = 1 << 30;
    if (lane < p.n_group && !((keep >> lane) & 1u)) {
      v = gscore;
      idx = lane;
    }
    warp_argmax(v, idx);
    keep |= 1u << idx;
  }
  // Top-k experts among kept groups; lane l owns experts l, l+32, ... (bit j of taken: l+32j).
  unsigned taken = 0;
  float sum = 0.0f;
  float my_w = 0.0f;
  int my_id = 0;
  for (int r = 0; r < p.top_k; ++r) {
    float v = neg_inf;
    int idx = 1 << 30;
    for (int j = 0, i = lane; i < e; ++j, i += 32) {
      if (!((keep >> (i / gs)) & 1u) || ((taken >> j) & 1u)) continue;
      if (c[i] > v || idx == (1 << 30)) {
        v = c[i];
        idx = i;
      }
    }
    warp_argmax(v, idx);
    if ((idx & 31) == lane) taken |= 1u << (idx >> 5);
    const float w = s[idx];
    sum += w;
    if (lane == r) {
      my_w = w;
      my_id = idx;
    }
  }
  if (lane < p.top_k) {
    float w = my_w;
    if (p.norm_topk_prob) w = w / (sum + 1e-20f);
    topk_weights[t * p.top_k + lane] = w * p.routed_scaling_factor;
    topk_ids[t * p.top_k + lane] = my_id;
  }
}

// One block: per-expert counts (ballot scans in pair order), exclusive scan, stable placement.
__global__ void __launch_bounds__(1024)
    permute_index_kernel(const int32_t* __restrict__ ids, int64_t pairs, int experts, int32_t* __restrict__ row_offsets,
                         int32_t* __restrict__ perm) {
  __shared__ int counts[kMaxExperts + 1];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int ex = warp; ex < experts; ex += nwarps) {
    int n = 0;
    for (int64_t base = 0; base < pairs; base += 32) {
      const int64_t pi = base + lane;
      const bool hit = pi < pairs && ids[pi] == ex;
      n += __popc(__ballot_sync(0xffffffffu, hit));
    }
    if (lane == 0) counts[ex] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int ex = 0; ex < experts; ++ex) {
      const int c = counts[ex];
      counts[ex] = run;
      row_offsets[ex] = run;
      run += c;
    }
    row_offsets[experts] = run;
  }
  __syncthreads();
  for (int ex = warp; ex < experts; ex += nwarps) {
    int pos = counts[ex];
    for (int64_t base = 0; base < pairs; base += 32) {
      const int64_t pi = base + lane;
      const bool hit = pi < pairs && ids[pi] == ex;
      const unsigned mask = __ballot_sync(0xffffffffu, hit);
      if (hit) perm[pos + __popc(mask & ((1u << lane) - 1u))] = static_cast<int32_t>(pi);
      pos += __popc(mask);
    }
  }
}

// x_perm[r] = x[perm[r] / top_k] for the rows that belong to an expert; 16-byte chunks.
__global__ void gather_rows_kernel(const uint4* __restrict__ x, int64_t row_chunks, const int32_t* __restrict__ perm,
                                   const int32_t* __restrict__ row_offsets, int experts, int top_k,
                                   uint4* __restrict__ x_perm) {
  const int64_t r = blockIdx.x;
  if (r >= row_offsets[experts]) return;
  const int64_t src = perm[r] / top_k;
  for (int64_t i = threadIdx.x; i < row_chunks; i += blockDim.x) x_perm[r * row_chunks + i] = x[src * row_chunks + i];
}

// One thread: experts are few (≤ 1024) and this runs once per layer.
__global__ void compact_groups_kernel(const int32_t* __restrict__ offsets, int experts, int max_groups,
                                      int32_t* __restrict__ group_expert, int32_t* __restrict__ group_offsets) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int j = 0;
  for (int e = 0; e < experts && j < max_groups; ++e) {
    if (offsets[e + 1] > offsets[e]) {
      group_expert[j] = e;
      group_offsets[j] = offsets[e];
      ++j;
    }
  }
  const int end = offsets[experts];
  for (; j < max_groups; ++j) {
    group_expert[j] = -1;
    group_offsets[j] = end;
  }
  group_offsets[max_groups] = end;
}

// inv[pair] = the row holding it. Never reads or writes out of bounds, whatever perm and
// row_offsets hold; a row count outside [0, pairs], a pair outside [0, pairs) or a pair named
// twice sets *bad (the memset leaves -1 for "none"), and combine_kernel then writes NaN: an
// error visible downstream without a host sync, so the op stays graph-safe.
__global__ void inverse_perm_kernel(const int32_t* __restrict__ perm, const int32_t* __restrict__ row_offsets,
                                    int experts, int64_t pairs, int32_t* __restrict__ inv, int32_t* bad) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t valid = row_offsets[experts];
  if (r == 0 && (valid < 0 || valid > pairs)) *bad = 1;
  if (r >= pairs || r >= valid) return;
  const int32_t p = perm[r];
  if (p < 0 || p >= pairs) {
    *bad = 1;
    return;
  }
  if (atomicExch(&inv[p], static_cast<int32_t>(r)) != -1) *bad = 1;
}

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One block per token; pairs summed in slot order j = 0..top_k-1 (deterministic).
template <typename T>
__global__ void combine_kernel(const T* __restrict__ y_perm, const int32_t* __restrict__ inv,
                               const int32_t* __restrict__ bad, const float* __restrict__ w, int top_k,
                               int64_t hidden, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const bool invalid = *bad != -1;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const int32_t r = inv[t * top_k + j];
      if (r >= 0) acc += w[t * top_k + j] * to_f(y_perm[static_cast<int64_t>(r) * hidden + h]);
    }
    out[t * hidden + h] = from_f<T>(invalid ? __int_as_float(0x7fc00000) : acc);
  }
}

template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gu, int64_t rows, int64_t inter, T* __restrict__ out) {
  const int64_t n = rows * inter;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / inter, c = i % inter;
    const float g = to_f(gu[r * 2 * inter + c]);
    const float u = to_f(gu[r * 2 * inter + inter + c]);
    out[i] = from_f<T>(g / (1.0f + expf(-g)) * u);
  }
}

}  // namespace

Status moe_route_cuda(const void* logits, DType logits_dtype, const float* bias, const MoeRouteParams& p,
                      float* topk_weights, int32_t* topk_ids, Stream stream) {
  DSFP4_RETURN_IF_ERROR(moe_route_check(p));
  if (logits_dtype != DType::kFloat32 && logits_dtype != DType::kBFloat16)
    return InvalidArgument("moe_route: router logits must be float32 or bfloat16");
  if (!logits || !bias || !topk_weights || !topk_ids) return InvalidArgument("moe_route: null pointer");
  if (p.tokens == 0) return Status::Ok();
  const unsigned blocks = static_cast<unsigned>((p.tokens + kRouteWarps - 1) / kRouteWarps);
  route_kernel<<<blocks, 32 * kRouteWarps, 0, static_cast<cudaStream_t>(stream)>>>(
      logits, logits_dtype == DType::kBFloat16, bias, p, topk_weights, topk_ids);
  return cuda_status(cudaGetLastError(), "moe_route: kernel launch");
}

size_t moe_permute_workspace_bytes(int) { return 0; }

Status moe_permute_cuda(const void* x, int64_t row_bytes, const int32_t* topk_ids, int64_t tokens, int top_k,
                        int experts, void* x_perm, int32_t* row_offsets, int32_t* perm, void*, Stream stream) {
  if (experts <= 0 || experts > kMaxExperts) return InvalidArgument("moe_permute: experts must be in [1, 1024]");
  if (top_k <= 0 || tokens < 0) return InvalidArgument("moe_permute: top_k must be positive, tokens non-negative");
  if (row_bytes <= 0 || row_bytes % 16 != 0)
    return InvalidArgument("moe_permute: rows of x must be a positive multiple of 16 bytes");
  if (!x || !topk_ids || !x_perm || !row_offsets || !perm) return InvalidArgument("moe_permute: null pointer");
  if (reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(x_perm) % 16)
    return InvalidArgument("moe_permute: x and x_perm must be 16-byte aligned");
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t pairs = tokens * top_k;
  permute_index_kernel<<<1, 1024, 0, s>>>(topk_ids, pairs, experts, row_offsets, perm);
  DSFP4_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "moe_permute: index kernel"));
  if (pairs == 0) return Status::Ok();
  gather_rows_kernel<<<static_cast<unsigned>(pairs), 128, 0, s>>>(
      static_cast<const uint4*>(x), row_bytes / 16, perm, row_offsets, experts, top_k, static_cast<uint4*>(x_perm));
  return cuda_status(cudaGetLastError(), "moe_permute: gather kernel");
}

Status moe_compact_groups_cuda(const int32_t* row_offsets, int experts, int max_groups, int32_t* group_expert,
                               int32_t* group_offsets, Stream stream) {
  if (experts <= 0 || max_groups <= 0) return InvalidArgument("moe_compact_groups: experts and max_groups must be positive");
  if (!row_offsets || !group_expert || !group_offsets) return InvalidArgument("moe_compact_groups: null pointer");
  compact_groups_kernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(row_offsets, experts, max_groups,
                                                                        group_expert, group_offsets);
  return cuda_status(cudaGetLastError(), "moe_compact_groups: kernel launch");
}

size_t moe_combine_workspace_bytes(int64_t tokens, int top_k) {
  return static_cast<size_t>((tokens * top_k + 1) * 4);   // inverse permutation + the "bad" flag
}

Status moe_combine_cuda(const void* y_perm, DType dtype, const int32_t* perm, const float* topk_weights,
                        const int32_t* row_offsets, int experts, int64_t tokens, int top_k, int64_t hidden,
                        void* out, void* workspace, Stream stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat32)
    return InvalidArgument("moe_combine: y_perm must be bfloat16 or float32");
  if (experts <= 0 || top_k <= 0 || hidden <= 0 || tokens < 0) return InvalidArgument("moe_combine: bad sizes");
  if (!y_perm || !perm || !topk_weights || !row_offsets || !out || (tokens > 0 && !workspace))
    return InvalidArgument("moe_combine: null pointer");
  if (tokens == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  auto* inv = static_cast<int32_t*>(workspace);
  const int64_t pairs = tokens * top_k;
  int32_t* bad = inv + pairs;
  DSFP4_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(inv, 0xFF, (pairs + 1) * 4, s), "moe_combine: memset"));
  inverse_perm_kernel<<<static_cast<unsigned>((pairs + 255) / 256), 256, 0, s>>>(perm, row_offsets, experts, pairs,
                                                                                  inv, bad);
  DSFP4_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "moe_combine: inverse kernel"));
  const int threads = hidden >= 1024 ? 256 : 128;
  if (dtype == DType::kBFloat16)
    combine_kernel<__nv_bfloat16><<<static_cast<unsigned>(tokens), threads, 0, s>>>(
        static_cast<const __nv_bfloat16*>(y_perm), inv, bad, topk_weights, top_k, hidden,
        static_cast<__nv_bfloat16*>(out));
  else
    combine_kernel<float><<<static_cast<unsigned>(tokens), threads, 0, s>>>(
        static_cast<const float*>(y_perm), inv, bad, topk_weights, top_k, hidden, static_cast<float*>(out));
  return cuda_status(cudaGetLastError(), "moe_combine: kernel launch");
}

Status silu_mul_cuda(const void* gate_up, DType dtype, int64_t rows, int64_t inter, void* out, Stream stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat32)
    return InvalidArgument("silu_mul: gate_up must be bfloat16 or float32");
  if (rows < 0 || inter <= 0) return InvalidArgument("silu_mul: bad sizes");
  if (!gate_up || !out) return InvalidArgument("silu_mul: null pointer");
  if (rows == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t n = rows * inter;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535));
  if (dtype == DType::kBFloat16)
    silu_mul_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(static_cast<const __nv_bfloat16*>(gate_up), rows, inter,
                                                          static_cast<__nv_bfloat16*>(out));
  else
    silu_mul_kernel<float><<<blocks, 256, 0, s>>>(static_cast<const float*>(gate_up), rows, inter,
                                                  static_cast<float*>(out));
  return cuda_status(cudaGetLastError(), "silu_mul: kernel launch");
}

}  // namespace dsfp4
