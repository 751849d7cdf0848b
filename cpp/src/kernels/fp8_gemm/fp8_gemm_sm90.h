// FP8 × FP8 GEMM with DeepSeek's block scales on Hopper through CUTLASS (TMA + wgmma, QGMMA),
// used by the FP8 GEMM's kBlockScaled path. Internal header.
//
// y[M, N] (bf16, row stride ldy) = Σ_j sx[j][r] · sw[n/128][j] · Σ_{k in block j} xq[r, k] · w[n, k]
// xq e4m3 [M, K] (row stride ldq), sx float32 [ceil(K/128)][ld_sx] (ld_sx = M rounded up to
// 4), w e4m3 [N, K] (row stride ldw), sw float32 [ceil(N/128), ceil(K/128)].
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "dsfp4/common.h"

namespace dsfp4 {
namespace kernels {

// True when this build contains the sm_90a kernel.
bool sm90_fp8_blockwise_available();
// The activation scale stride the kernel expects for M rows.
inline int64_t sm90_fp8_scale_ld(int64_t m) {
  return (m + 3) / 4 * 4;
}
// False when the shape or strides cannot run (alignment); the caller falls back.
bool sm90_fp8_blockwise_can_run(int64_t m, int64_t n, int64_t k, int64_t ldq, int64_t ldw, int64_t ldy);
size_t sm90_fp8_blockwise_workspace_bytes(int64_t m, int64_t n, int64_t k);
Status sm90_fp8_blockwise_gemm(const uint8_t* xq, int64_t ldq, const float* sx, const uint8_t* w, int64_t ldw,
                               const float* sw, __nv_bfloat16* y, int64_t ldy, int64_t m, int64_t n, int64_t k,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace kernels
}  // namespace dsfp4
