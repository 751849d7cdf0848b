// CPU expert tile kernel for AVX512F/BW/VL + AVX512_BF16: bf16 decode by word permutes,
// products by vdpbf16ps (float32 accumulation). Compiled with the AVX512_BF16 flags
// (CMakeLists.txt); called only after cpuid.
#include "kernels/cpu/cpu_experts_avx512_impl.h"

namespace dsfp4 {
namespace cpu {

const IsaKernels& avx512_bf16_kernels() {
  static const IsaKernels k{XFormat::kBf16Pairs, &run_tile<Avx512Block<true>>, &read_avx512};
  return k;
}

}  // namespace cpu
}  // namespace dsfp4
