// Bindings for the MoE kernels (routing, permute, combine, SiLU·mul), CPU and CUDA.
#include <pybind11/pybind11.h>

#include "dsfp4/moe.h"
#include "status.h"

namespace py = pybind11;

namespace dsfp4 {
namespace py_bind {

void bind_moe(py::module_& m) {
  m.def(
      "moe_route",
      [](std::uintptr_t logits, DType dtype, std::uintptr_t bias, int64_t tokens, int experts, int top_k, int n_group,
         int topk_group, float scale, bool norm, std::uintptr_t weights, std::uintptr_t ids, bool on_cuda,
         std::uintptr_t s) {
        MoeRouteParams p;
        p.tokens = tokens;
        p.experts = experts;
        p.top_k = top_k;
        p.n_group = n_group;
        p.topk_group = topk_group;
        p.routed_scaling_factor = scale;
        p.norm_topk_prob = norm;
        throw_if_error(on_cuda ? moe_route_cuda(ptr<const void>(logits), dtype, ptr<const float>(bias), p,
                                                ptr<float>(weights), ptr<int32_t>(ids), stream(s))
                               : moe_route_cpu(ptr<const void>(logits), dtype, ptr<const float>(bias), p,
                                               ptr<float>(weights), ptr<int32_t>(ids)));
      },
      py::arg("logits"), py::arg("dtype"), py::arg("bias"), py::arg("tokens"), py::arg("experts"), py::arg("top_k"),
      py::arg("n_group"), py::arg("topk_group"), py::arg("routed_scaling_factor"), py::arg("norm_topk_prob"),
      py::arg("topk_weights"), py::arg("topk_ids"), py::arg("on_cuda"), py::arg("stream"));
  m.def("moe_permute_workspace_bytes", &moe_permute_workspace_bytes, py::arg("experts"));
  m.def(
      "moe_permute",
      [](std::uintptr_t x, int64_t row_bytes, std::uintptr_t ids, int64_t tokens, int top_k, int experts,
         std::uintptr_t x_perm, std::uintptr_t offsets, std::uintptr_t perm, std::uintptr_t ws, bool on_cuda,
         std::uintptr_t s) {
        throw_if_error(on_cuda ? moe_permute_cuda(ptr<const void>(x), row_bytes, ptr<const int32_t>(ids), tokens, top_k,
                                                  experts, ptr<void>(x_perm), ptr<int32_t>(offsets),
                                                  ptr<int32_t>(perm), ptr<void>(ws), stream(s))
                               : moe_permute_cpu(ptr<const void>(x), row_bytes, ptr<const int32_t>(ids), tokens, top_k,
                                                 experts, ptr<void>(x_perm), ptr<int32_t>(offsets),
                                                 ptr<int32_t>(perm)));
      },
      py::arg("x"), py::arg("row_bytes"), py::arg("topk_ids"), py::arg("tokens"), py::arg("top_k"),
      py::arg("experts"), py::arg("x_perm"), py::arg("row_offsets"), py::arg("perm"), py::arg("workspace"),
      py::arg("on_cuda"), py::arg("stream"));
  m.def(
      "moe_compact_groups",
      [](std::uintptr_t offsets, int experts, int max_groups, std::uintptr_t group_expert,
         std::uintptr_t group_offsets, bool on_cuda, std::uintptr_t s) {
        throw_if_error(on_cuda ? moe_compact_groups_cuda(ptr<const int32_t>(offsets), experts, max_groups,
                                                         ptr<int32_t>(group_expert), ptr<int32_t>(group_offsets),
                                                         stream(s))
                               : moe_compact_groups_cpu(ptr<const int32_t>(offsets), experts, max_groups,
                                                        ptr<int32_t>(group_expert), ptr<int32_t>(group_offsets)));
      },
      py::arg("row_offsets"), py::arg("experts"), py::arg("max_groups"), py::arg("group_expert"),
      py::arg("group_offsets"), py::arg("on_cuda"), py::arg("stream"));
  m.def("moe_combine_workspace_bytes", &moe_combine_workspace_bytes, py::arg("tokens"), py::arg("top_k"));
  m.def(
      "moe_combine",
      [](std::uintptr_t y_perm, DType dtype, std::uintptr_t perm, std::uintptr_t weights, std::uintptr_t offsets,
         int experts, int64_t tokens, int top_k, int64_t hidden, std::uintptr_t out, std::uintptr_t ws, bool on_cuda,
         std::uintptr_t s) {
        throw_if_error(on_cuda ? moe_combine_cuda(ptr<const void>(y_perm), dtype, ptr<const int32_t>(perm),
                                                  ptr<const float>(weights), ptr<const int32_t>(offsets), experts,
                                                  tokens, top_k, hidden, ptr<void>(out), ptr<void>(ws), stream(s))
                               : moe_combine_cpu(ptr<const void>(y_perm), dtype, ptr<const int32_t>(perm),
                                                 ptr<const float>(weights), ptr<const int32_t>(offsets), experts,
                                                 tokens, top_k, hidden, ptr<void>(out)));
      },
      py::arg("y_perm"), py::arg("dtype"), py::arg("perm"), py::arg("topk_weights"), py::arg("row_offsets"),
      py::arg("experts"), py::arg("tokens"), py::arg("top_k"), py::arg("hidden"), py::arg("out"),
      py::arg("workspace"), py::arg("on_cuda"), py::arg("stream"));
  m.def(
      "silu_mul",
      [](std::uintptr_t gate_up, DType dtype, int64_t rows, int64_t inter, std::uintptr_t out, bool on_cuda,
         std::uintptr_t s) {
        throw_if_error(on_cuda ? silu_mul_cuda(ptr<const void>(gate_up), dtype, rows, inter, ptr<void>(out), stream(s))
                               : silu_mul_cpu(ptr<const void>(gate_up), dtype, rows, inter, ptr<void>(out)));
      },
      py::arg("gate_up"), py::arg("dtype"), py::arg("rows"), py::arg("inter"), py::arg("out"), py::arg("on_cuda"),
      py::arg("stream"));
}

}  // namespace py_bind
}  // namespace dsfp4
