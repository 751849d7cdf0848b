// Bindings for the CPU experts (cpu_experts.h). Tensors cross as raw host addresses; the
// Python wrapper (deepseek_fp4_plugin.cpu_experts) checks dtypes and shapes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "dsfp4/cpu_experts.h"
#include "dsfp4/moe_experts.h"
#include "status.h"

namespace py = pybind11;

namespace dsfp4 {
namespace py_bind {

namespace {

// A layout as paging.expert_unit_layout returns it (per-tile global scales unless told).
ExpertUnitLayout layout_from_dict(const py::dict& d) {
  ExpertUnitLayout l;
  auto get = [&](const char* key) {
    if (!d.contains(key)) throw py::value_error(std::string("expert unit layout: missing key '") + key + "'");
    return d[key].cast<int64_t>();
  };
  l.hidden = get("hidden");
  l.inter = get("inter");
  l.gate_up_qweight = get("gate_up_qweight");
  l.gate_up_qscale = get("gate_up_qscale");
  l.gate_up_global_scale = get("gate_up_scale");
  l.down_qweight = get("down_qweight");
  l.down_qscale = get("down_qscale");
  l.down_global_scale = get("down_scale");
  l.bytes = get("bytes");
  l.gate_up_scale_per_tile = d.contains("gate_up_scale_per_tile") ? d["gate_up_scale_per_tile"].cast<bool>() : true;
  l.down_scale_per_tile = d.contains("down_scale_per_tile") ? d["down_scale_per_tile"].cast<bool>() : true;
  return l;
}

py::dict features_dict(const CpuFeatures& f) {
  py::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512_bf16"] = f.avx512_bf16;
  d["avx512_vnni"] = f.avx512_vnni;
  d["amx_tile"] = f.amx_tile;
  d["amx_bf16"] = f.amx_bf16;
  d["os_avx"] = f.os_avx;
  d["os_avx512"] = f.os_avx512;
  return d;
}

CpuFeatures features_from_dict(const py::dict& d) {
  CpuFeatures f;
  auto get = [&](const char* key) { return d.contains(key) && d[key].cast<bool>(); };
  f.avx2 = get("avx2");
  f.fma = get("fma");
  f.f16c = get("f16c");
  f.avx512f = get("avx512f");
  f.avx512bw = get("avx512bw");
  f.avx512vl = get("avx512vl");
  f.avx512_bf16 = get("avx512_bf16");
  f.avx512_vnni = get("avx512_vnni");
  f.amx_tile = get("amx_tile");
  f.amx_bf16 = get("amx_bf16");
  f.os_avx = get("os_avx");
  f.os_avx512 = get("os_avx512");
  return f;
}

py::dict stats_dict(const CpuExpertsStats& s) {
  py::dict d;
  d["experts"] = s.experts;
  d["weight_bytes"] = s.weight_bytes;
  d["start_ms"] = s.start_ms;
  d["run_ms"] = s.run_ms;
  return d;
}

// (expert, unit address, rows address or 0, tokens, y address, ldy)
using JobTuple = std::tuple<int, std::uintptr_t, std::uintptr_t, int64_t, std::uintptr_t, int64_t>;

std::vector<CpuExpertJob> make_jobs(const std::vector<JobTuple>& jobs) {
  std::vector<CpuExpertJob> out;
  for (const auto& t : jobs) {
    CpuExpertJob j;
    j.expert = std::get<0>(t);
    j.unit = ptr<const uint8_t>(std::get<1>(t));
    j.rows = ptr<const int32_t>(std::get<2>(t));
    j.tokens = std::get<3>(t);
    j.y = ptr<void>(std::get<4>(t));
    j.ldy = std::get<5>(t);
    out.push_back(j);
  }
  return out;
}

CpuExpertsCall make_call(int layer, const py::dict& layout, std::uintptr_t x, int64_t x_rows, int64_t ldx,
                         const std::vector<CpuExpertJob>& jobs) {
  CpuExpertsCall c;
  c.layer = layer;
  c.layout = layout_from_dict(layout);
  c.x = ptr<const void>(x);
  c.x_rows = x_rows;
  c.ldx = ldx;
  c.jobs = jobs.data();
  c.count = static_cast<int>(jobs.size());
  return c;
}
}  // namespace

void bind_cpu_experts(py::module_& m) {
  py::module_ c = m.def_submodule("cpu_experts", "routed experts on the CPU (cpu_experts.h)");
  c.def("features", [] { return features_dict(cpu_features()); }, "cpuid/XCR0 features of this CPU");
  c.def(
      "resolve_isa",
      [](const std::string& name, const py::object& features) {
        const CpuFeatures f = features.is_none() ? cpu_features() : features_from_dict(features.cast<py::dict>());
        CpuIsa isa;
        throw_if_error(cpu_isa_resolve(name, f, &isa));
        return std::string(cpu_isa_name(isa));
      },
      py::arg("name") = "auto", py::arg("features") = py::none(),
      "The instruction set a pool would use (features: this CPU's, or a dict of booleans).");
  c.def(
      "reference",
      [](const py::dict& layout, std::uintptr_t unit, std::uintptr_t x, int64_t tokens, std::uintptr_t y) {
        // moe_experts_units_cpu with one expert, top_k 1 and weight 1: out = the expert's y.
        const ExpertUnitLayout l = layout_from_dict(layout);
        const uint64_t addr = unit;
        ExpertTable table;
        table.unit_addr = &addr;
        table.num_experts = 1;
        table.layout = l;
        MoeExpertsParams p{tokens, l.hidden, l.inter, 1, 1};
        std::vector<float> w(static_cast<size_t>(tokens), 1.0f);
        std::vector<int32_t> ids(static_cast<size_t>(tokens), 0);
        Status st;
        {
          py::gil_scoped_release release;
          st = moe_experts_units_cpu(p, table, ptr<const void>(x), w.data(), ids.data(), ptr<void>(y));
        }
        throw_if_error(st);
      },
      py::arg("layout"), py::arg("unit"), py::arg("x"), py::arg("tokens"), py::arg("y"),
      "C++ reference of one expert over a unit: x, y bf16 [tokens, hidden], contiguous.");

  py::class_<CpuExpertsHandle, std::shared_ptr<CpuExpertsHandle>>(c, "Handle")
      .def("wait",
           [](CpuExpertsHandle& h) {
             CpuExpertsStats s;
             Status st;
             {
               py::gil_scoped_release release;
               st = h.wait(&s);
             }
             throw_if_error(st);
             return stats_dict(s);
           })
      .def("done", &CpuExpertsHandle::done);

  py::class_<CpuExpertPool, std::shared_ptr<CpuExpertPool>>(c, "Pool")
      .def(py::init([](const std::string& isa, int threads, const std::vector<int>& cores,
                       const std::vector<int>& reserved_cores, bool pin, int spin_us, int prefetch_bytes,
                       bool prefetch_l2, int gate_up_tiles, int down_tiles) {
             CpuExpertsOptions o;
             o.isa = isa;
             o.threads = threads;
             o.cores = cores;
             o.reserved_cores = reserved_cores;
             o.pin = pin;
             o.spin_us = spin_us;
             o.prefetch_bytes = prefetch_bytes;
             o.prefetch_l2 = prefetch_l2;
             o.gate_up_tiles = gate_up_tiles;
             o.down_tiles = down_tiles;
             std::unique_ptr<CpuExpertPool> p;
             throw_if_error(CpuExpertPool::create(o, &p));
             // Joining the workers must not hold the GIL: a finishing call may be running a
             // Python callback.
             return std::shared_ptr<CpuExpertPool>(p.release(), [](CpuExpertPool* q) {
               if (PyGILState_Check()) {
                 py::gil_scoped_release release;
                 delete q;
               } else {
                 delete q;
               }
             });
           }),
           py::arg("isa") = "auto", py::arg("threads") = 0, py::arg("cores") = std::vector<int>(),
           py::arg("reserved_cores") = std::vector<int>(), py::arg("pin") = true, py::arg("spin_us") = 500,
           py::arg("prefetch_bytes") = CpuExpertsOptions().prefetch_bytes,
           py::arg("prefetch_l2") = CpuExpertsOptions().prefetch_l2,
           py::arg("gate_up_tiles") = CpuExpertsOptions().gate_up_tiles,
           py::arg("down_tiles") = CpuExpertsOptions().down_tiles)
      .def_property_readonly("isa", [](const CpuExpertPool& p) { return std::string(cpu_isa_name(p.isa())); })
      .def_property_readonly("threads", &CpuExpertPool::threads)
      .def_property_readonly("cores", &CpuExpertPool::cores)
      .def(
          "submit",
          [](CpuExpertPool& p, int layer, const py::dict& layout, std::uintptr_t x, int64_t x_rows, int64_t ldx,
             const std::vector<JobTuple>& jobs, const py::object& on_done) {
            const std::vector<CpuExpertJob> js = make_jobs(jobs);
            const CpuExpertsCall call = make_call(layer, layout, x, x_rows, ldx, js);
            std::function<void(const Status&)> cb;
            if (!on_done.is_none()) {
              // The call may be dropped on a worker thread: the Python callable is released with the GIL.
              std::shared_ptr<py::function> fn(new py::function(on_done.cast<py::function>()), [](py::function* f) {
                py::gil_scoped_acquire gil;
                delete f;
              });
              cb = [fn](const Status& st) {
                py::gil_scoped_acquire gil;
                try {
                  (*fn)(st.message());
                } catch (py::error_already_set& e) {
                  e.discard_as_unraisable(__func__);
                }
              };
            }
            std::shared_ptr<CpuExpertsHandle> h;
            throw_if_error(p.submit(call, &h, std::move(cb)));
            return h;
          },
          py::arg("layer"), py::arg("layout"), py::arg("x"), py::arg("x_rows"), py::arg("ldx"), py::arg("jobs"),
          py::arg("on_done") = py::none(),
          "Queues one layer's experts; jobs are (expert, unit, rows or 0, tokens, y, ldy). on_done(message) "
          "runs on a worker thread with the GIL (message empty on success).")
      .def(
          "run",
          [](CpuExpertPool& p, int layer, const py::dict& layout, std::uintptr_t x, int64_t x_rows, int64_t ldx,
             const std::vector<JobTuple>& jobs) {
            const std::vector<CpuExpertJob> js = make_jobs(jobs);
            const CpuExpertsCall call = make_call(layer, layout, x, x_rows, ldx, js);
            CpuExpertsStats s;
            Status st;
            {
              py::gil_scoped_release release;
              st = p.run(call, &s);
            }
            throw_if_error(st);
            return stats_dict(s);
          },
          py::arg("layer"), py::arg("layout"), py::arg("x"), py::arg("x_rows"), py::arg("ldx"), py::arg("jobs"))
      .def(
          "read_bandwidth",
          [](CpuExpertPool& p, std::uintptr_t data, size_t bytes, int reps) {
            double gbs = 0.0;
            Status st;
            {
              py::gil_scoped_release release;
              st = p.read_bandwidth(ptr<const void>(data), bytes, reps, &gbs);
            }
            throw_if_error(st);
            return gbs;
          },
          py::arg("data"), py::arg("bytes"), py::arg("reps") = 3)
      .def("inject_fault", &CpuExpertPool::inject_fault, py::arg("layer"), py::arg("expert"));
}

}  // namespace py_bind
}  // namespace dsfp4
