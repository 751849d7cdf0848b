// Stand-in when the build has no sm_90a target: the dequantize path reports itself absent.
#include "kernels/fp4_gemm/bf16_gemm_sm90.h"

namespace dsfp4 {
namespace kernels {

bool sm90_bf16_gemm_available() { return false; }
size_t sm90_bf16_gemm_workspace_bytes(int64_t, int64_t, int64_t) { return 0; }
Status sm90_bf16_gemm(const void*, int64_t, const __nv_bfloat16*, int64_t, __nv_bfloat16*, int64_t, int64_t, int64_t,
                      int64_t, const float*, void*, size_t, cudaStream_t) {
  return Unsupported("bf16 GEMM: this build has no sm_90a kernels");
}

}  // namespace kernels
}  // namespace dsfp4
