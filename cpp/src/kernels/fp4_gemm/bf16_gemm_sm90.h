// bf16 GEMM y[M, N] = alpha · x[M, K] · w[N, K]ᵀ on Hopper through CUTLASS (TMA + wgmma),
// used by the FP4 GEMM's dequantize path. alpha is a device pointer. Internal header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "dsfp4/common.h"

namespace dsfp4 {
namespace kernels {

// True when this build contains the sm_90a kernel.
bool sm90_bf16_gemm_available();
size_t sm90_bf16_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k);
Status sm90_bf16_gemm(const void* x, int64_t ldx, const __nv_bfloat16* w, int64_t ldw, __nv_bfloat16* y,
                      int64_t ldy, int64_t m, int64_t n, int64_t k, const float* alpha, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream);

}  // namespace kernels
}  // namespace dsfp4
