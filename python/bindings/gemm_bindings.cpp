// Bindings for the FP4 GEMM runner (dense, grouped, tiled dequantize).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "dsfp4/fp4_gemm.h"
#include "status.h"

namespace py = pybind11;

namespace dsfp4 {
namespace py_bind {

namespace {
Fp4Weight make_weight(std::uintptr_t qweight, std::uintptr_t qscale, std::uintptr_t global_scale, bool per_tile,
                      int64_t n, int64_t k) {
  Fp4Weight w;
  w.global_scale_per_tile = per_tile;
  w.qweight = ptr<const uint32_t>(qweight);
  w.qscale = ptr<const uint8_t>(qscale);
  w.global_scale = ptr<const float>(global_scale);
  w.n = n;
  w.k = k;
  return w;
}
}  // namespace

void bind_gemm(py::module_& m) {
  py::enum_<Fp4GemmPath>(m, "Fp4GemmPath")
      .value("auto", Fp4GemmPath::kAuto)
      .value("fused", Fp4GemmPath::kFused)
      .value("dequant", Fp4GemmPath::kDequant);
  py::class_<Fp4GemmTactic>(m, "Fp4GemmTactic")
      .def(py::init<>())
      .def(py::init([](Fp4GemmPath path, int tile_tokens, int warps_n, int warps_k, int split_k) {
             Fp4GemmTactic t;
             t.path = path;
             t.tile_tokens = tile_tokens;
             t.warps_n = warps_n;
             t.warps_k = warps_k;
             t.split_k = split_k;
             return t;
           }),
           py::arg("path"), py::arg("tile_tokens") = 0, py::arg("warps_n") = 0, py::arg("warps_k") = 0,
           py::arg("split_k") = 0)
      .def_readwrite("path", &Fp4GemmTactic::path)
      .def_readwrite("tile_tokens", &Fp4GemmTactic::tile_tokens)
      .def_readwrite("warps_n", &Fp4GemmTactic::warps_n)
      .def_readwrite("warps_k", &Fp4GemmTactic::warps_k)
      .def_readwrite("split_k", &Fp4GemmTactic::split_k)
      .def("__repr__", [](const Fp4GemmTactic& t) {
        return "Fp4GemmTactic(path=" + std::to_string(static_cast<int>(t.path)) +
               ", tile_tokens=" + std::to_string(t.tile_tokens) + ", warps_n=" + std::to_string(t.warps_n) +
               ", warps_k=" + std::to_string(t.warps_k) + ", split_k=" + std::to_string(t.split_k) + ")";
      });

  m.def("fp4_gemm_default_tactic", &fp4_gemm_default_tactic, py::arg("m"), py::arg("n"), py::arg("k"));
  m.def("fp4_gemm_candidate_tactics", &fp4_gemm_candidate_tactics, py::arg("m"), py::arg("n"), py::arg("k"));
  m.def("fp4_gemm_workspace_bytes", &fp4_gemm_workspace_bytes, py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("tactic"));

  m.def(
      "fp4_gemm",
      [](std::uintptr_t qweight, std::uintptr_t qscale, std::uintptr_t global_scale, bool gs_per_tile, int64_t n,
         int64_t k, std::uintptr_t x, int64_t ldx, std::uintptr_t y, int64_t ldy, int64_t rows, const Fp4GemmTactic& tactic,
         std::uintptr_t workspace, size_t workspace_bytes, std::uintptr_t s) {
        throw_if_error(fp4_gemm_cuda(make_weight(qweight, qscale, global_scale, gs_per_tile, n, k), ptr<const void>(x), ldx,
                                     ptr<void>(y), ldy, rows, tactic, ptr<void>(workspace), workspace_bytes,
                                     stream(s)));
      },
      py::arg("qweight"), py::arg("qscale"), py::arg("global_scale"), py::arg("gs_per_tile"), py::arg("n"),
      py::arg("k"), py::arg("x"), py::arg("ldx"), py::arg("y"), py::arg("ldy"), py::arg("m"), py::arg("tactic"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"));

  m.def(
      "fp4_grouped_gemm",
      [](std::uintptr_t qweight, std::uintptr_t qscale, std::uintptr_t global_scale, bool gs_per_tile,
         int64_t qweight_slot_stride,
         int64_t qscale_slot_stride, int64_t n, int64_t k, int num_groups, std::uintptr_t slot_of_group,
         std::uintptr_t row_offsets, int64_t max_rows_per_group, std::uintptr_t x, int64_t ldx, std::uintptr_t y,
         int64_t ldy, int tile_tokens, std::uintptr_t s) {
        Fp4GroupedWeight w;
        w.qweight = ptr<const uint32_t>(qweight);
        w.qscale = ptr<const uint8_t>(qscale);
        w.global_scale = ptr<const float>(global_scale);
        w.global_scale_per_tile = gs_per_tile;
        w.qweight_slot_stride = qweight_slot_stride;
        w.qscale_slot_stride = qscale_slot_stride;
        w.n = n;
        w.k = k;
        throw_if_error(fp4_grouped_gemm_cuda(w, num_groups, ptr<const int32_t>(slot_of_group),
                                             ptr<const int32_t>(row_offsets), max_rows_per_group,
                                             ptr<const void>(x), ldx, ptr<void>(y), ldy, tile_tokens, stream(s)));
      },
      py::arg("qweight"), py::arg("qscale"), py::arg("global_scale"), py::arg("gs_per_tile"),
      py::arg("qweight_slot_stride"),
      py::arg("qscale_slot_stride"), py::arg("n"), py::arg("k"), py::arg("num_groups"), py::arg("slot_of_group"),
      py::arg("row_offsets"), py::arg("max_rows_per_group"), py::arg("x"), py::arg("ldx"), py::arg("y"),
      py::arg("ldy"), py::arg("tile_tokens"), py::arg("stream"));

  m.def(
      "fp4_gemm_cpu",
      [](std::uintptr_t qweight, std::uintptr_t qscale, std::uintptr_t global_scale, bool gs_per_tile, int64_t n,
         int64_t k, std::uintptr_t x, int64_t ldx, std::uintptr_t y, int64_t ldy, int64_t rows) {
        Status st;
        {
          py::gil_scoped_release nogil;
          st = fp4_gemm_cpu(make_weight(qweight, qscale, global_scale, gs_per_tile, n, k), ptr<const void>(x), ldx,
                            ptr<void>(y), ldy, rows);
        }
        throw_if_error(st);
      },
      py::arg("qweight"), py::arg("qscale"), py::arg("global_scale"), py::arg("gs_per_tile"), py::arg("n"),
      py::arg("k"), py::arg("x"), py::arg("ldx"), py::arg("y"), py::arg("ldy"), py::arg("m"));

  m.def(
      "fp4_grouped_gemm_cpu",
      [](std::uintptr_t qweight, std::uintptr_t qscale, std::uintptr_t global_scale, bool gs_per_tile,
         int64_t qweight_slot_stride, int64_t qscale_slot_stride, int64_t n, int64_t k, int num_slots, int num_groups,
         std::uintptr_t slot_of_group, std::uintptr_t row_offsets, int64_t rows, std::uintptr_t x, int64_t ldx,
         std::uintptr_t y, int64_t ldy) {
        Fp4GroupedWeight w;
        w.qweight = ptr<const uint32_t>(qweight);
        w.qscale = ptr<const uint8_t>(qscale);
        w.global_scale = ptr<const float>(global_scale);
        w.global_scale_per_tile = gs_per_tile;
        w.qweight_slot_stride = qweight_slot_stride;
        w.qscale_slot_stride = qscale_slot_stride;
        w.n = n;
        w.k = k;
        Status st;
        {
          py::gil_scoped_release nogil;
          st = fp4_grouped_gemm_cpu(w, num_slots, num_groups, ptr<const int32_t>(slot_of_group),
                                    ptr<const int32_t>(row_offsets), rows, ptr<const void>(x), ldx, ptr<void>(y), ldy);
        }
        throw_if_error(st);
      },
      py::arg("qweight"), py::arg("qscale"), py::arg("global_scale"), py::arg("gs_per_tile"),
      py::arg("qweight_slot_stride"), py::arg("qscale_slot_stride"), py::arg("n"), py::arg("k"),
      py::arg("num_slots"), py::arg("num_groups"), py::arg("slot_of_group"), py::arg("row_offsets"),
      py::arg("rows"), py::arg("x"), py::arg("ldx"), py::arg("y"), py::arg("ldy"));

  m.def(
      "fp4_dequantize_tiled",
      [](std::uintptr_t qweight, std::uintptr_t qscale, std::uintptr_t global_scale, bool gs_per_tile, int64_t n,
         int64_t k, std::uintptr_t dst, int64_t ldw, bool on_cuda, std::uintptr_t s) {
        const Fp4Weight w = make_weight(qweight, qscale, global_scale, gs_per_tile, n, k);
        if (on_cuda) {
          throw_if_error(fp4_dequantize_tiled_cuda(w, ptr<void>(dst), ldw, stream(s)));
        } else {
          if (ldw != k) throw py::value_error("fp4_dequantize_tiled: the CPU path writes a packed [n, k] float32");
          Status st;
          {
            py::gil_scoped_release nogil;
            st = fp4_dequantize_tiled_cpu(w, ptr<float>(dst));
          }
          throw_if_error(st);
        }
      },
      py::arg("qweight"), py::arg("qscale"), py::arg("global_scale"), py::arg("gs_per_tile"), py::arg("n"),
      py::arg("k"), py::arg("dst"),
      py::arg("ldw"), py::arg("on_cuda"), py::arg("stream"));
}

}  // namespace py_bind
}  // namespace dsfp4
