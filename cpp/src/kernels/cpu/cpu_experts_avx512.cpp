// CPU expert tile kernel for AVX512F/BW/VL: bf16 decode by word permutes, float32 FMA.
// Compiled with -mavx512f -mavx512bw -mavx512vl (CMakeLists.txt); called only after cpuid.
#include "kernels/cpu/cpu_experts_avx512_impl.h"

namespace dsfp4 {
namespace cpu {

const IsaKernels& avx512_kernels() {
  static const IsaKernels k{XFormat::kF32, &run_tile<Avx512Block<false>>, &read_avx512};
  return k;
}

}  // namespace cpu
}  // namespace dsfp4
