// deepseek_fp4_plugin._C: thin bindings over the C++ core. Tensors cross as raw pointers
// (integers) with explicit shapes, dtypes and a CUDA stream handle; validation of tensors
// happens in deepseek_fp4_plugin.ops, the core re-checks what it can.
#include <pybind11/pybind11.h>

#include "dsfp4/common.h"
#include "status.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepseek-fp4 C++/CUDA core";
  m.def("built_with_cuda", &dsfp4::built_with_cuda, "True when the extension contains CUDA kernels.");
  pybind11::enum_<dsfp4::DType>(m, "DType")
      .value("float32", dsfp4::DType::kFloat32)
      .value("float16", dsfp4::DType::kFloat16)
      .value("bfloat16", dsfp4::DType::kBFloat16)
      .value("float8_e4m3fn", dsfp4::DType::kFloat8E4M3)
      .value("uint8", dsfp4::DType::kUInt8)
      .value("int32", dsfp4::DType::kInt32);
  dsfp4::py_bind::bind_nvfp4(m);
  dsfp4::py_bind::bind_gemm(m);
  dsfp4::py_bind::bind_fp8(m);
  dsfp4::py_bind::bind_moe(m);
  dsfp4::py_bind::bind_paging(m);
  dsfp4::py_bind::bind_cpu_experts(m);
}
