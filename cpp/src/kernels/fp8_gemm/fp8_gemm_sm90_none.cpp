// Stand-in when the build has no sm_90a target: the FP8 tensor-core path reports itself absent.
#include "kernels/fp8_gemm/fp8_gemm_sm90.h"

namespace dsfp4 {
namespace kernels {

bool sm90_fp8_blockwise_available() {
  return false;
}
bool sm90_fp8_blockwise_can_run(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  return false;
}
size_t sm90_fp8_blockwise_workspace_bytes(int64_t, int64_t, int64_t) {
  return 0;
}
Status sm90_fp8_blockwise_gemm(const uint8_t*, int64_t, const float*, const uint8_t*, int64_t, const float*,
                               __nv_bfloat16*, int64_t, int64_t, int64_t, int64_t, void*, size_t, cudaStream_t) {
  return Unsupported("fp8_gemm: this build has no sm_90a kernels");
}

}  // namespace kernels
}  // namespace dsfp4
