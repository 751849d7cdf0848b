// Bindings for NVFP4 quantize / dequantize / repack (CPU and CUDA).
#include <pybind11/pybind11.h>

#include "dsfp4/nvfp4.h"
#include "status.h"

namespace py = pybind11;

namespace dsfp4 {
namespace py_bind {

void bind_nvfp4(py::module_& m) {
  m.def("tiled_weight_bytes", &tiled_weight_bytes, py::arg("rows"), py::arg("cols"));
  m.def("tiled_scale_bytes", &tiled_scale_bytes, py::arg("rows"), py::arg("cols"));
  m.def("nvfp4_quantize_workspace_bytes", &nvfp4_quantize_workspace_bytes);

  m.def(
      "nvfp4_quantize",
      [](std::uintptr_t src, DType dtype, std::uintptr_t scale_inv, int block_rows, int block_cols, int64_t rows,
         int64_t cols, std::uintptr_t global_in, std::uintptr_t packed, std::uintptr_t block_scale,
         std::uintptr_t global_out, bool on_cuda, std::uintptr_t workspace, std::uintptr_t s) {
        MatrixSource ms;
        ms.data = ptr<const void>(src);
        ms.dtype = dtype;
        ms.block_scale_inv = ptr<const float>(scale_inv);
        ms.block_rows = block_rows;
        ms.block_cols = block_cols;
        Status st;
        {
          py::gil_scoped_release nogil;
          st = on_cuda ? nvfp4_quantize_cuda(ms, rows, cols, ptr<const float>(global_in), ptr<uint8_t>(packed),
                                             ptr<uint8_t>(block_scale), ptr<float>(global_out), ptr<void>(workspace),
                                             stream(s))
                       : nvfp4_quantize_cpu(ms, rows, cols, ptr<const float>(global_in), ptr<uint8_t>(packed),
                                            ptr<uint8_t>(block_scale), ptr<float>(global_out));
        }
        throw_if_error(st);
      },
      py::arg("src"), py::arg("dtype"), py::arg("scale_inv"), py::arg("block_rows"), py::arg("block_cols"),
      py::arg("rows"), py::arg("cols"), py::arg("global_scale_in"), py::arg("packed"), py::arg("block_scale"),
      py::arg("global_scale_out"), py::arg("on_cuda"), py::arg("workspace"), py::arg("stream"));

  m.def(
      "nvfp4_dequantize",
      [](std::uintptr_t packed, std::uintptr_t block_scale, std::uintptr_t global_scale, int64_t rows, int64_t cols,
         std::uintptr_t dst, DType dst_dtype, bool on_cuda, std::uintptr_t s) {
        Status st;
        {
          py::gil_scoped_release nogil;
          st = on_cuda ? nvfp4_dequantize_cuda(ptr<const uint8_t>(packed), ptr<const uint8_t>(block_scale),
                                               ptr<const float>(global_scale), rows, cols, ptr<void>(dst), dst_dtype,
                                               stream(s))
                       : nvfp4_dequantize_cpu(ptr<const uint8_t>(packed), ptr<const uint8_t>(block_scale),
                                              *ptr<const float>(global_scale), rows, cols, ptr<void>(dst), dst_dtype);
        }
        throw_if_error(st);
      },
      py::arg("packed"), py::arg("block_scale"), py::arg("global_scale"), py::arg("rows"), py::arg("cols"),
      py::arg("dst"), py::arg("dst_dtype"), py::arg("on_cuda"), py::arg("stream"));

  m.def(
      "fp8_block_dequantize",
      [](std::uintptr_t src, std::uintptr_t scale_inv, int block_rows, int block_cols, int64_t rows, int64_t cols,
         std::uintptr_t dst, bool on_cuda, std::uintptr_t s) {
        MatrixSource ms;
        ms.data = ptr<const void>(src);
        ms.dtype = DType::kFloat8E4M3;
        ms.block_scale_inv = ptr<const float>(scale_inv);
        ms.block_rows = block_rows;
        ms.block_cols = block_cols;
        Status st;
        {
          py::gil_scoped_release nogil;
          st = on_cuda ? fp8_block_dequantize_cuda(ms, rows, cols, ptr<float>(dst), stream(s))
                       : fp8_block_dequantize_cpu(ms, rows, cols, ptr<float>(dst));
        }
        throw_if_error(st);
      },
      py::arg("src"), py::arg("scale_inv"), py::arg("block_rows"), py::arg("block_cols"), py::arg("rows"),
      py::arg("cols"), py::arg("dst"), py::arg("on_cuda"), py::arg("stream"));

  m.def(
      "nvfp4_repack",
      [](std::uintptr_t packed, std::uintptr_t block_scale, int64_t rows, int64_t cols, std::uintptr_t qweight,
         std::uintptr_t qscale, bool on_cuda, std::uintptr_t s) {
        Status st;
        {
          py::gil_scoped_release nogil;
          st = on_cuda ? nvfp4_repack_cuda(ptr<const uint8_t>(packed), ptr<const uint8_t>(block_scale), rows, cols,
                                           ptr<uint32_t>(qweight), ptr<uint8_t>(qscale), stream(s))
                       : nvfp4_repack_cpu(ptr<const uint8_t>(packed), ptr<const uint8_t>(block_scale), rows, cols,
                                          ptr<uint32_t>(qweight), ptr<uint8_t>(qscale));
        }
        throw_if_error(st);
      },
      py::arg("packed"), py::arg("block_scale"), py::arg("rows"), py::arg("cols"), py::arg("qweight"),
      py::arg("qscale"), py::arg("on_cuda"), py::arg("stream"));

  m.def(
      "nvfp4_unpack",
      [](std::uintptr_t qweight, std::uintptr_t qscale, int64_t rows, int64_t cols, std::uintptr_t packed,
         std::uintptr_t block_scale) {
        throw_if_error(nvfp4_unpack_cpu(ptr<const uint32_t>(qweight), ptr<const uint8_t>(qscale), rows, cols,
                                        ptr<uint8_t>(packed), ptr<uint8_t>(block_scale)));
      },
      py::arg("qweight"), py::arg("qscale"), py::arg("rows"), py::arg("cols"), py::arg("packed"),
      py::arg("block_scale"));
}

}  // namespace py_bind
}  // namespace dsfp4
