// CUDA entry points of a build without nvcc: each reports that CUDA is not available, so the
// public API links the same way on every machine.
#include "dsfp4/fp4_gemm.h"
#include "dsfp4/fp8_gemm.h"
#include "dsfp4/moe.h"
#include "dsfp4/moe_experts.h"
#include "dsfp4/nvfp4.h"

#include <string>

namespace dsfp4 {

namespace {
Status no_cuda(const char* fn) { return Unsupported(std::string(fn) + ": this build has no CUDA kernels"); }
}  // namespace

size_t nvfp4_quantize_workspace_bytes() { return 0; }
Status nvfp4_quantize_cuda(const MatrixSource&, int64_t, int64_t, const float*, uint8_t*, uint8_t*, float*, void*,
                           Stream) {
  return no_cuda("nvfp4_quantize_cuda");
}
Status nvfp4_dequantize_cuda(const uint8_t*, const uint8_t*, const float*, int64_t, int64_t, void*, DType, Stream) {
  return no_cuda("nvfp4_dequantize_cuda");
}
Status fp8_block_dequantize_cuda(const MatrixSource&, int64_t, int64_t, float*, Stream) {
  return no_cuda("fp8_block_dequantize_cuda");
}
Status nvfp4_repack_cuda(const uint8_t*, const uint8_t*, int64_t, int64_t, uint32_t*, uint8_t*, Stream) {
  return no_cuda("nvfp4_repack_cuda");
}

Fp4GemmTactic fp4_gemm_default_tactic(int64_t, int64_t, int64_t) { return Fp4GemmTactic{}; }
std::vector<Fp4GemmTactic> fp4_gemm_candidate_tactics(int64_t, int64_t, int64_t) { return {}; }
size_t fp4_gemm_workspace_bytes(int64_t, int64_t, int64_t, const Fp4GemmTactic&) { return 0; }
Status fp4_gemm_cuda(const Fp4Weight&, const void*, int64_t, void*, int64_t, int64_t, const Fp4GemmTactic&, void*,
                     size_t, Stream) {
  return no_cuda("fp4_gemm_cuda");
}
Status fp4_grouped_gemm_cuda(const Fp4GroupedWeight&, int, const int32_t*, const int32_t*, int64_t, const void*,
                             int64_t, void*, int64_t, int, Stream) {
  return no_cuda("fp4_grouped_gemm_cuda");
}
Status fp4_dequantize_tiled_cuda(const Fp4Weight&, void*, int64_t, Stream) {
  return no_cuda("fp4_dequantize_tiled_cuda");
}

Fp8GemmTactic fp8_gemm_default_tactic(int64_t, int64_t, int64_t, int64_t) { return Fp8GemmTactic{}; }
std::vector<Fp8GemmTactic> fp8_gemm_candidate_tactics(int64_t, int64_t, int64_t, int64_t) { return {}; }
size_t fp8_gemm_workspace_bytes(int64_t, int64_t, int64_t, const Fp8GemmTactic&, int64_t) { return 0; }
Status fp8_gemm_cuda(const Fp8Weight&, const void*, int64_t, void*, int64_t, int64_t, const Fp8GemmTactic&, void*,
                     size_t, Stream) {
  return no_cuda("fp8_gemm_cuda");
}
Status fp8_grouped_gemm_cuda(const Fp8GroupedWeight&, int, const int32_t*, const int32_t*, int64_t, const void*,
                             int64_t, void*, int64_t, int, Stream) {
  return no_cuda("fp8_grouped_gemm_cuda");
}
Status fp8_act_quant_cuda(const void*, int64_t, int64_t, int64_t, uint8_t*, int64_t, float*, int64_t, Stream) {
  return no_cuda("fp8_act_quant_cuda");
}
Status fp8_block_quantize_cuda(const MatrixSource&, int64_t, int64_t, uint8_t*, float*, Stream) {
  return no_cuda("fp8_block_quantize_cuda");
}
Status fp8_dequantize_bf16_cuda(const Fp8Weight&, void*, int64_t, Stream) {
  return no_cuda("fp8_dequantize_bf16_cuda");
}

Status moe_route_cuda(const void*, DType, const float*, const MoeRouteParams&, float*, int32_t*, Stream) {
  return no_cuda("moe_route_cuda");
}
size_t moe_permute_workspace_bytes(int) { return 0; }
Status moe_permute_cuda(const void*, int64_t, const int32_t*, int64_t, int, int, void*, int32_t*, int32_t*, void*,
                        Stream) {
  return no_cuda("moe_permute_cuda");
}
Status moe_compact_groups_cuda(const int32_t*, int, int, int32_t*, int32_t*, Stream) {
  return no_cuda("moe_compact_groups_cuda");
}
size_t moe_combine_workspace_bytes(int64_t, int) { return 0; }
Status moe_combine_cuda(const void*, DType, const int32_t*, const float*, const int32_t*, int, int64_t, int, int64_t,
                        void*, void*, Stream) {
  return no_cuda("moe_combine_cuda");
}
Status silu_mul_cuda(const void*, DType, int64_t, int64_t, void*, Stream) { return no_cuda("silu_mul_cuda"); }
Status moe_experts_cuda(const MoeExpertsParams&, const Fp4GroupedWeight&, const Fp4GroupedWeight&, const void*,
                        const float*, const int32_t*, void*, void*, size_t, Stream) {
  return no_cuda("moe_experts_cuda");
}
Status moe_experts_units_cuda(const MoeExpertsParams&, const ExpertTable&, const void*, const float*, const int32_t*,
                              void*, void*, size_t, Stream) {
  return no_cuda("moe_experts_units_cuda");
}

}  // namespace dsfp4
