#include "dsfp4/common.h"

namespace dsfp4 {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
  }
  return "unknown";
}

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat8E4M3: return 1;
    case DType::kUInt8: return 1;
    case DType::kInt32: return 4;
  }
  return 0;
}

bool built_with_cuda() {
#if defined(DSFP4_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace dsfp4
