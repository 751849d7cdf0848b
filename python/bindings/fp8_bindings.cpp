// Bindings for the FP8 block GEMM runner, activation and block quantization, FP8 expert units.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "dsfp4/fp8_gemm.h"
#include "status.h"

namespace py = pybind11;

namespace dsfp4 {
namespace py_bind {

namespace {
Fp8Weight make_weight(std::uintptr_t weight, std::uintptr_t scale, int64_t n, int64_t k, int64_t split) {
  Fp8Weight w;
  w.weight = ptr<const uint8_t>(weight);
  w.scale = ptr<const float>(scale);
  w.n = n;
  w.k = k;
  w.split_rows = split;
  return w;
}

py::dict unit_dict(const Fp8ExpertUnitLayout& l) {
  py::dict d;
  d["hidden"] = l.hidden;
  d["inter"] = l.inter;
  d["gate_up_weight"] = l.gate_up_weight;
  d["gate_up_scale"] = l.gate_up_scale;
  d["down_weight"] = l.down_weight;
  d["down_scale"] = l.down_scale;
  d["bytes"] = l.bytes;
  return d;
}

// Runs a CPU reference without the GIL (they take long on big shapes).
template <typename Fn>
void cpu_call(Fn fn) {
  Status st;
  {
    py::gil_scoped_release nogil;
    st = fn();
  }
  throw_if_error(st);
}
}  // namespace

void bind_fp8(py::module_& m) {
  py::enum_<Fp8GemmPath>(m, "Fp8GemmPath")
      .value("auto", Fp8GemmPath::kAuto)
      .value("fused", Fp8GemmPath::kFused)
      .value("blockscaled", Fp8GemmPath::kBlockScaled)
      .value("dequant", Fp8GemmPath::kDequant);
  py::class_<Fp8GemmTactic>(m, "Fp8GemmTactic")
      .def(py::init<>())
      .def(py::init([](Fp8GemmPath path, int tile_tokens, int warps_n, int warps_k, int split_k) {
             Fp8GemmTactic t;
             t.path = path;
             t.tile_tokens = tile_tokens;
             t.warps_n = warps_n;
             t.warps_k = warps_k;
             t.split_k = split_k;
             return t;
           }),
           py::arg("path"), py::arg("tile_tokens") = 0, py::arg("warps_n") = 0, py::arg("warps_k") = 0,
           py::arg("split_k") = 0)
      .def_readwrite("path", &Fp8GemmTactic::path)
      .def_readwrite("tile_tokens", &Fp8GemmTactic::tile_tokens)
      .def_readwrite("warps_n", &Fp8GemmTactic::warps_n)
      .def_readwrite("warps_k", &Fp8GemmTactic::warps_k)
      .def_readwrite("split_k", &Fp8GemmTactic::split_k)
      .def("__repr__", [](const Fp8GemmTactic& t) {
        return "Fp8GemmTactic(path=" + std::to_string(static_cast<int>(t.path)) +
               ", tile_tokens=" + std::to_string(t.tile_tokens) + ", warps_n=" + std::to_string(t.warps_n) +
               ", warps_k=" + std::to_string(t.warps_k) + ", split_k=" + std::to_string(t.split_k) + ")";
      });

  m.def("fp8_scale_rows", &fp8_scale_rows, py::arg("n"), py::arg("split_rows"));
  m.def("fp8_gemm_default_tactic", &fp8_gemm_default_tactic, py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("split_rows") = 0);
  m.def("fp8_gemm_candidate_tactics", &fp8_gemm_candidate_tactics, py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("split_rows") = 0);
  m.def("fp8_gemm_workspace_bytes", &fp8_gemm_workspace_bytes, py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("tactic"), py::arg("split_rows") = 0);

  m.def(
      "fp8_gemm",
      [](std::uintptr_t weight, std::uintptr_t scale, int64_t n, int64_t k, int64_t split, std::uintptr_t x,
         int64_t ldx, std::uintptr_t y, int64_t ldy, int64_t rows, const Fp8GemmTactic& tactic,
         std::uintptr_t workspace, size_t workspace_bytes, std::uintptr_t s) {
        throw_if_error(fp8_gemm_cuda(make_weight(weight, scale, n, k, split), ptr<const void>(x), ldx, ptr<void>(y),
                                     ldy, rows, tactic, ptr<void>(workspace), workspace_bytes, stream(s)));
      },
      py::arg("weight"), py::arg("scale"), py::arg("n"), py::arg("k"), py::arg("split_rows"), py::arg("x"),
      py::arg("ldx"), py::arg("y"), py::arg("ldy"), py::arg("m"), py::arg("tactic"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"));

  m.def(
      "fp8_gemm_cpu",
      [](std::uintptr_t weight, std::uintptr_t scale, int64_t n, int64_t k, int64_t split, std::uintptr_t x,
         int64_t ldx, std::uintptr_t y, int64_t ldy, int64_t rows, bool blockscaled) {
        const Fp8Weight w = make_weight(weight, scale, n, k, split);
        cpu_call([&] {
          return blockscaled ? fp8_gemm_blockscaled_cpu(w, ptr<const void>(x), ldx, ptr<void>(y), ldy, rows)
                             : fp8_gemm_cpu(w, ptr<const void>(x), ldx, ptr<void>(y), ldy, rows);
        });
      },
      py::arg("weight"), py::arg("scale"), py::arg("n"), py::arg("k"), py::arg("split_rows"), py::arg("x"),
      py::arg("ldx"), py::arg("y"), py::arg("ldy"), py::arg("m"), py::arg("blockscaled") = false);

  m.def(
      "fp8_grouped_gemm",
      [](std::uintptr_t weight, std::uintptr_t scale, int64_t weight_slot_stride, int64_t scale_slot_stride, int64_t n,
         int64_t k, int64_t split, std::uintptr_t unit_table, int64_t unit_weight, int64_t unit_scale, int num_slots,
         int num_groups, std::uintptr_t slot_of_group, std::uintptr_t row_offsets, int64_t rows,
         int64_t max_rows_per_group, std::uintptr_t x, int64_t ldx, std::uintptr_t y, int64_t ldy, int tile_tokens,
         bool on_cuda, std::uintptr_t s, std::uintptr_t ready, std::uintptr_t epoch, std::uintptr_t wait_failed,
         uint64_t wait_timeout_ns) {
        Fp8GroupedWeight w;
        w.unit_ready = ptr<const uint32_t>(ready);
        w.ready_epoch = ptr<const uint32_t>(epoch);
        w.wait_failed = ptr<uint32_t>(wait_failed);
        w.wait_timeout_ns = wait_timeout_ns;
        w.weight = ptr<const uint8_t>(weight);
        w.scale = ptr<const float>(scale);
        w.weight_slot_stride = weight_slot_stride;
        w.scale_slot_stride = scale_slot_stride;
        w.n = n;
        w.k = k;
        w.split_rows = split;
        w.unit_addr = ptr<const uint64_t>(unit_table);
        w.unit_weight = unit_weight;
        w.unit_scale = unit_scale;
        if (on_cuda) {
          throw_if_error(fp8_grouped_gemm_cuda(w, num_groups, ptr<const int32_t>(slot_of_group),
                                               ptr<const int32_t>(row_offsets), max_rows_per_group, ptr<const void>(x),
                                               ldx, ptr<void>(y), ldy, tile_tokens, stream(s)));
          return;
        }
        cpu_call([&] {
          return fp8_grouped_gemm_cpu(w, num_slots, num_groups, ptr<const int32_t>(slot_of_group),
                                      ptr<const int32_t>(row_offsets), rows, ptr<const void>(x), ldx, ptr<void>(y),
                                      ldy);
        });
      },
      py::arg("weight"), py::arg("scale"), py::arg("weight_slot_stride"), py::arg("scale_slot_stride"), py::arg("n"),
      py::arg("k"), py::arg("split_rows"), py::arg("unit_table"), py::arg("unit_weight"), py::arg("unit_scale"),
      py::arg("num_slots"), py::arg("num_groups"), py::arg("slot_of_group"), py::arg("row_offsets"), py::arg("rows"),
      py::arg("max_rows_per_group"), py::arg("x"), py::arg("ldx"), py::arg("y"), py::arg("ldy"), py::arg("tile_tokens"),
      py::arg("on_cuda"), py::arg("stream"), py::arg("ready") = 0, py::arg("epoch") = 0, py::arg("wait_failed") = 0,
      py::arg("wait_timeout_ns") = 0);

  m.def(
      "fp8_act_quant",
      [](std::uintptr_t x, int64_t ldx, int64_t rows, int64_t k, std::uintptr_t xq, int64_t ldq, std::uintptr_t scale,
         int64_t ld_scale, bool on_cuda, std::uintptr_t s) {
        if (on_cuda) {
          throw_if_error(fp8_act_quant_cuda(ptr<const void>(x), ldx, rows, k, ptr<uint8_t>(xq), ldq, ptr<float>(scale),
                                            ld_scale, stream(s)));
          return;
        }
        cpu_call([&] {
          return fp8_act_quant_cpu(ptr<const void>(x), ldx, rows, k, ptr<uint8_t>(xq), ldq, ptr<float>(scale),
                                   ld_scale);
        });
      },
      py::arg("x"), py::arg("ldx"), py::arg("m"), py::arg("k"), py::arg("xq"), py::arg("ldq"), py::arg("scale"),
      py::arg("ld_scale"), py::arg("on_cuda"), py::arg("stream"));

  m.def(
      "fp8_block_quantize",
      [](std::uintptr_t src, DType dtype, int64_t rows, int64_t cols, std::uintptr_t q, std::uintptr_t scale_inv,
         bool on_cuda, std::uintptr_t s) {
        MatrixSource ms;
        ms.data = ptr<const void>(src);
        ms.dtype = dtype;
        if (on_cuda) {
          throw_if_error(fp8_block_quantize_cuda(ms, rows, cols, ptr<uint8_t>(q), ptr<float>(scale_inv), stream(s)));
          return;
        }
        cpu_call([&] { return fp8_block_quantize_cpu(ms, rows, cols, ptr<uint8_t>(q), ptr<float>(scale_inv)); });
      },
      py::arg("src"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("q"), py::arg("scale_inv"),
      py::arg("on_cuda"), py::arg("stream"));

  m.def(
      "fp8_dequantize",
      [](std::uintptr_t weight, std::uintptr_t scale, int64_t n, int64_t k, int64_t split, std::uintptr_t dst,
         int64_t ldd, bool on_cuda, std::uintptr_t s) {
        const Fp8Weight w = make_weight(weight, scale, n, k, split);
        if (on_cuda) {  // bf16
          throw_if_error(fp8_dequantize_bf16_cuda(w, ptr<void>(dst), ldd, stream(s)));
          return;
        }
        if (ldd != k) throw py::value_error("fp8_dequantize: the CPU path writes a packed [n, k] float32");
        cpu_call([&] { return fp8_dequantize_cpu(w, ptr<float>(dst)); });
      },
      py::arg("weight"), py::arg("scale"), py::arg("n"), py::arg("k"), py::arg("split_rows"), py::arg("dst"),
      py::arg("ldd"), py::arg("on_cuda"), py::arg("stream"));

  m.def(
      "fp8_expert_unit_layout",
      [](int64_t hidden, int64_t inter) {
        Fp8ExpertUnitLayout l;
        throw_if_error(fp8_expert_unit_layout(hidden, inter, &l));
        return unit_dict(l);
      },
      py::arg("hidden"), py::arg("inter"));

  m.def(
      "fp8_expert_unit_fill",
      [](int64_t hidden, int64_t inter, std::uintptr_t gate, std::uintptr_t gate_scale, std::uintptr_t up,
         std::uintptr_t up_scale, std::uintptr_t down, std::uintptr_t down_scale, std::uintptr_t unit) {
        Fp8ExpertUnitLayout l;
        throw_if_error(fp8_expert_unit_layout(hidden, inter, &l));
        cpu_call([&] {
          return fp8_expert_unit_fill(l, ptr<const uint8_t>(gate), ptr<const float>(gate_scale), ptr<const uint8_t>(up),
                                      ptr<const float>(up_scale), ptr<const uint8_t>(down),
                                      ptr<const float>(down_scale), ptr<uint8_t>(unit));
        });
      },
      py::arg("hidden"), py::arg("inter"), py::arg("gate"), py::arg("gate_scale"), py::arg("up"), py::arg("up_scale"),
      py::arg("down"), py::arg("down_scale"), py::arg("unit"));
}

}  // namespace py_bind
}  // namespace dsfp4
