// Bindings for the paging tiers (paging.h) and the grouped GEMM over paged units.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <tuple>

#include "dsfp4/fp4_gemm.h"
#include "dsfp4/paging.h"
#include "status.h"

namespace py = pybind11;

namespace dsfp4 {
namespace py_bind {

namespace {
using namespace dsfp4::paging;

py::dict layout_dict(const ExpertUnitLayout& l) {
  py::dict d;
  d["hidden"] = l.hidden;
  d["inter"] = l.inter;
  d["gate_up_qweight"] = l.gate_up_qweight;
  d["gate_up_qscale"] = l.gate_up_qscale;
  d["gate_up_scale"] = l.gate_up_global_scale;  // per 16-row tile, as the units GEMM reads it
  d["down_qweight"] = l.down_qweight;
  d["down_qscale"] = l.down_qscale;
  d["down_scale"] = l.down_global_scale;
  d["bytes"] = l.bytes;
  return d;
}

py::dict counters_dict(const ExpertCounters& c) {
  py::dict d;
  d["requests"] = c.requests;
  d["gpu_hits"] = c.gpu_hits;
  d["prefetch_hits"] = c.prefetch_hits;
  d["host_hits"] = c.host_hits;
  d["ssd_reads"] = c.ssd_reads;
  d["demand_ssd_reads"] = c.demand_ssd_reads;
  d["copies"] = c.copies;
  d["zero_copy"] = c.zero_copy;
  d["h2d_bytes"] = c.h2d_bytes;
  d["zero_copy_bytes"] = c.zero_copy_bytes;
  d["ssd_bytes"] = c.ssd_bytes;
  d["prefetch_copies"] = c.prefetch_copies;
  d["prefetch_wasted"] = c.prefetch_wasted;
  d["predicted"] = c.predicted;
  d["predicted_used"] = c.predicted_used;
  d["used_after_prediction"] = c.used_after_prediction;
  d["evictions"] = c.evictions;
  d["skipped"] = c.skipped;
  d["wait_ms"] = c.wait_ms;
  return d;
}

py::dict read_counters_dict(const ReadCounters& c) {
  py::dict d;
  d["bytes"] = c.bytes;
  d["device_bytes"] = c.device_bytes;
  d["reads"] = c.reads;
  d["direct_reads"] = c.direct_reads;
  d["seconds"] = c.seconds;
  return d;
}

// Runs a Status-returning call without the GIL (it may block on disk reads or events).
template <typename Fn>
void nogil(Fn fn) {
  Status st;
  {
    py::gil_scoped_release release;
    st = fn();
  }
  throw_if_error(st);
}
}  // namespace

void bind_paging(py::module_& m) {
  py::module_ p = m.def_submodule("paging", "tiered weight paging (paging.h)");

  p.def("expert_unit_layout", [](int64_t hidden, int64_t inter) {
    ExpertUnitLayout l;
    throw_if_error(expert_unit_layout(hidden, inter, &l));
    return layout_dict(l);
  });
  p.def(
      "expert_unit_from_modelopt",
      [](int64_t hidden, int64_t inter, std::uintptr_t gw, std::uintptr_t gs, float g2, std::uintptr_t uw,
         std::uintptr_t us, float u2, std::uintptr_t dw, std::uintptr_t ds, float d2, std::uintptr_t unit, int threads) {
        ExpertUnitLayout l;
        throw_if_error(expert_unit_layout(hidden, inter, &l));
        const ModeloptLinear gate{ptr<const uint8_t>(gw), ptr<const uint8_t>(gs), g2};
        const ModeloptLinear up{ptr<const uint8_t>(uw), ptr<const uint8_t>(us), u2};
        const ModeloptLinear down{ptr<const uint8_t>(dw), ptr<const uint8_t>(ds), d2};
        nogil([&] { return expert_unit_from_modelopt(l, gate, up, down, ptr<uint8_t>(unit), threads); });
      },
      py::arg("hidden"), py::arg("inter"), py::arg("gate_weight"), py::arg("gate_scale"), py::arg("gate_scale_2"),
      py::arg("up_weight"), py::arg("up_scale"), py::arg("up_scale_2"), py::arg("down_weight"), py::arg("down_scale"),
      py::arg("down_scale_2"), py::arg("unit"), py::arg("threads") = 1);

  py::class_<CheckpointFiles, std::shared_ptr<CheckpointFiles>>(p, "CheckpointFiles")
      .def(py::init([](const std::vector<std::string>& paths, bool direct_io) {
             std::unique_ptr<CheckpointFiles> f;
             throw_if_error(CheckpointFiles::open(paths, direct_io, &f));
             return std::shared_ptr<CheckpointFiles>(std::move(f));
           }),
           py::arg("paths"), py::arg("direct_io") = true)
      .def(
          "read",
          [](CheckpointFiles& f, int file, int64_t offset, int64_t nbytes, const std::string& name,
             std::uintptr_t dst) {
            TensorRange r;
            r.file = file;
            r.offset = offset;
            r.nbytes = nbytes;
            r.name = name;
            nogil([&] { return f.read(r, ptr<void>(dst)); });
          },
          py::arg("file"), py::arg("offset"), py::arg("nbytes"), py::arg("name"), py::arg("dst"))
      .def("inject_fault", &CheckpointFiles::inject_fault, py::arg("file"), py::arg("offset"), py::arg("err") = 5)
      .def_property_readonly("direct_io", &CheckpointFiles::direct_io)
      .def_property_readonly("num_files", &CheckpointFiles::num_files)
      .def("path", [](const CheckpointFiles& f, int i) { return f.path(i); })
      .def("reset_counters", &CheckpointFiles::reset_counters)
      .def("counters", [](const CheckpointFiles& f) { return read_counters_dict(f.counters()); });

  py::enum_<CachePolicy>(p, "CachePolicy").value("lru", CachePolicy::kLru).value("lrfu", CachePolicy::kLrfu);
  py::enum_<MissMode>(p, "MissMode")
      .value("copy", MissMode::kCopy)
      .value("zero_copy", MissMode::kZeroCopy)
      .value("auto", MissMode::kAuto);

  py::class_<SlotCache>(p, "SlotCache")
      .def(py::init<int64_t, int, CachePolicy, double>(), py::arg("num_keys"), py::arg("capacity"), py::arg("policy"),
           py::arg("lam") = 0.05)
      .def("touch", &SlotCache::touch)
      .def("tick", &SlotCache::tick)
      .def("slot_of", &SlotCache::slot_of)
      .def("insert",
           [](SlotCache& c, int64_t key) {
             int64_t ev = -1;
             const int s = c.insert(key, &ev);
             return std::make_tuple(s, ev);
           })
      .def("erase", &SlotCache::erase)
      .def("victim", &SlotCache::victim)
      .def("priority", &SlotCache::priority)
      .def("hold", &SlotCache::hold)
      .def("release_holds", &SlotCache::release_holds)
      .def("set_pinned", &SlotCache::set_pinned)
      .def("pinned", &SlotCache::pinned)
      .def_property_readonly("size", &SlotCache::size)
      .def_property_readonly("capacity", &SlotCache::capacity);

  py::class_<ExpertStore>(p, "ExpertStore")
      .def(py::init([](py::dict o, std::shared_ptr<CheckpointFiles> files,
                       const std::vector<std::vector<std::tuple<int, int64_t, int64_t, std::string>>>& stored) {
             // keys left out keep ExpertStoreOptions' defaults
             ExpertStoreOptions opt;
             auto get = [&o](const char* key, auto& field) {
               if (o.contains(key)) field = o[key].cast<std::decay_t<decltype(field)>>();
             };
             std::uintptr_t gpu_base = 0;
             get("layers", opt.layers);
             get("experts", opt.experts);
             get("hidden", opt.hidden);
             get("inter", opt.inter);
             get("gpu_slots", opt.gpu_slots);
             get("gpu_base", gpu_base);
             opt.gpu_base = ptr<void>(gpu_base);
             get("host_slots", opt.host_slots);
             get("pinned", opt.pinned);
             get("on_device", opt.on_device);
             get("gpu_policy", opt.gpu_policy);
             get("host_policy", opt.host_policy);
             get("lam", opt.lambda);
             get("miss_mode", opt.miss_mode);
             get("io_threads", opt.io_threads);
             get("repack_threads", opt.repack_threads);
             get("direct_io", opt.direct_io);
             get("async_copy", opt.async_copy);
             get("max_prefetch_units", opt.max_prefetch_units);
             get("prefetch_min_accuracy", opt.prefetch_min_accuracy);
             get("max_step_copies", opt.max_step_copies);
             for (auto item : o) {
               static const char* known[] = {"layers", "experts", "hidden", "inter", "gpu_slots", "gpu_base",
                                              "host_slots", "pinned", "on_device", "gpu_policy", "host_policy",
                                              "lam", "miss_mode", "io_threads", "repack_threads", "direct_io",
                                              "async_copy", "max_prefetch_units", "prefetch_min_accuracy",
                                              "max_step_copies"};
               const std::string k = py::str(item.first);
               if (std::find(std::begin(known), std::end(known), k) == std::end(known))
                 throw py::value_error("ExpertStore: unknown option '" + k + "'");
             }
             std::vector<StoredExpert> ex;
             ex.reserve(stored.size());
             for (const auto& parts : stored) {
               if (parts.size() != 9) throw py::value_error("ExpertStore: each stored expert needs 9 tensor ranges");
               StoredExpert e;
               for (int i = 0; i < 9; ++i) {
                 e.part[i].file = std::get<0>(parts[i]);
                 e.part[i].offset = std::get<1>(parts[i]);
                 e.part[i].nbytes = std::get<2>(parts[i]);
                 e.part[i].name = std::get<3>(parts[i]);
               }
               ex.push_back(std::move(e));
             }
             std::unique_ptr<ExpertStore> s;
             Status st;
             {
               py::gil_scoped_release release;
               st = ExpertStore::create(opt, std::move(files), std::move(ex), &s);
             }
             throw_if_error(st);
             return s;
           }),
           py::arg("options"), py::arg("files"), py::arg("stored"))
      .def_property_readonly("layout", [](const ExpertStore& s) { return layout_dict(s.layout()); })
      .def("set_device_tables",
           [](ExpertStore& s, std::uintptr_t p) { s.set_device_tables(ptr<uint64_t>(p)); })
      .def_property_readonly("host_tables",
                             [](const ExpertStore& s) { return reinterpret_cast<std::uintptr_t>(s.host_tables()); })
      .def("begin_step", &ExpertStore::begin_step)
      .def(
          "resolve",
          [](ExpertStore& s, int layer, std::uintptr_t ids, int64_t count, std::uintptr_t compute, std::uintptr_t copy) {
            nogil([&] { return s.resolve(layer, ptr<const int32_t>(ids), count, stream(compute), stream(copy)); });
          },
          py::arg("layer"), py::arg("ids"), py::arg("count"), py::arg("compute"), py::arg("copy"))
      .def(
          "prefetch",
          [](ExpertStore& s, int layer, std::uintptr_t ids, int64_t count, std::uintptr_t compute, std::uintptr_t copy) {
            nogil([&] { return s.prefetch(layer, ptr<const int32_t>(ids), count, stream(compute), stream(copy)); });
          },
          py::arg("layer"), py::arg("ids"), py::arg("count"), py::arg("compute"), py::arg("copy"))
      .def(
          "reconfigure",
          [](ExpertStore& s, CachePolicy policy, double lam, MissMode mode, int max_prefetch_units,
             double min_accuracy, std::uintptr_t compute) {
            nogil([&] {
              return s.reconfigure(policy, lam, mode, max_prefetch_units, min_accuracy, stream(compute));
            });
          },
          py::arg("policy"), py::arg("lam"), py::arg("miss_mode"), py::arg("max_prefetch_units"),
          py::arg("prefetch_min_accuracy"), py::arg("compute"))
      .def(
          "load_host",
          [](ExpertStore& s, int layer, std::uintptr_t ids, int64_t count) {
            nogil([&] { return s.load_host(layer, ptr<const int32_t>(ids), count); });
          },
          py::arg("layer"), py::arg("ids"), py::arg("count"))
      .def(
          "set_pinned",
          [](ExpertStore& s, int layer, int expert, bool pinned, std::uintptr_t compute, std::uintptr_t copy) {
            nogil([&] { return s.set_pinned(layer, expert, pinned, stream(compute), stream(copy)); });
          },
          py::arg("layer"), py::arg("expert"), py::arg("pinned"), py::arg("compute"), py::arg("copy"))
      .def("gpu_address", &ExpertStore::gpu_address)
      .def("host_address", &ExpertStore::host_address)
      .def("host_unit",
           [](const ExpertStore& s, int layer, int expert) {
             return reinterpret_cast<std::uintptr_t>(s.host_unit(layer, expert));
           })
      .def("counters", [](const ExpertStore& s, int layer) { return counters_dict(s.counters(layer)); },
           py::arg("layer") = -1)
      .def("reset_counters", &ExpertStore::reset_counters)
      .def("add_skipped", &ExpertStore::add_skipped)
      .def_property_readonly("gpu_cached", &ExpertStore::gpu_cached)
      .def_property_readonly("host_cached", &ExpertStore::host_cached)
      .def("files_counters", [](ExpertStore& s) { return read_counters_dict(s.files().counters()); });

  // The store as a dsfp4::ExpertSource, e.g. for Dsfp4MoeExperts plugins: `address` is the
  // ExpertSource* to pass to dsfp4_trt_set_expert_source (the object stays owned here).
  py::class_<ExpertStoreSource>(p, "ExpertStoreSource")
      .def(py::init([](ExpertStore& store) {
             std::unique_ptr<ExpertStoreSource> s;
             throw_if_error(ExpertStoreSource::create(&store, &s));
             return s;
           }),
           py::arg("store"), py::keep_alive<1, 2>())
      .def_property_readonly(
          "address",
          [](ExpertStoreSource& s) { return reinterpret_cast<std::uintptr_t>(static_cast<ExpertSource*>(&s)); })
      .def_property_readonly("acquired", &ExpertStoreSource::acquired)
      .def(
          "acquire",
          [](ExpertStoreSource& s, int layer, std::uintptr_t ids, int64_t count, std::uintptr_t stream_) {
            ExpertTable t;
            nogil([&] { return s.acquire(layer, ptr<const int32_t>(ids), count, stream(stream_), &t); });
            return reinterpret_cast<std::uintptr_t>(t.unit_addr);
          },
          py::arg("layer"), py::arg("ids"), py::arg("count"), py::arg("stream"))
      .def(
          "release",
          [](ExpertStoreSource& s, int layer, std::uintptr_t stream_) {
            throw_if_error(s.release(layer, stream(stream_)));
          },
          py::arg("layer"), py::arg("stream"));

  py::class_<LayerRing>(p, "LayerRing")
      .def(py::init([](int units, int slots, int64_t unit_bytes, std::uintptr_t gpu_base, bool on_device,
                       bool async_copy, int prefetch, bool pinned) {
             LayerRingOptions o;
             o.units = units;
             o.slots = slots;
             o.unit_bytes = unit_bytes;
             o.gpu_base = ptr<void>(gpu_base);
             o.on_device = on_device;
             o.async_copy = async_copy;
             o.prefetch = prefetch;
             std::unique_ptr<LayerRing> r;
             throw_if_error(LayerRing::create(o, pinned, &r));
             return r;
           }),
           py::arg("units"), py::arg("slots"), py::arg("unit_bytes"), py::arg("gpu_base"), py::arg("on_device"),
           py::arg("async_copy"), py::arg("prefetch"), py::arg("pinned"))
      .def("host_unit", [](const LayerRing& r, int rank) { return reinterpret_cast<std::uintptr_t>(r.host_unit(rank)); })
      .def(
          "acquire",
          [](LayerRing& r, int rank, std::uintptr_t compute, std::uintptr_t transfer, std::uintptr_t prefetch) {
            throw_if_error(r.acquire(rank, stream(compute), stream(transfer), stream(prefetch)));
          },
          py::arg("rank"), py::arg("compute"), py::arg("transfer"), py::arg("prefetch"))
      .def("set_prefetch", [](LayerRing& r, int n) { throw_if_error(r.set_prefetch(n)); })
      .def("reset_counters", &LayerRing::reset_counters)
      .def("counters", [](const LayerRing& r) {
        const LayerCounters c = r.counters();
        py::dict d;
        d["requests"] = c.requests;
        d["hits"] = c.hits;
        d["copies"] = c.copies;
        d["h2d_bytes"] = c.h2d_bytes;
        d["prefetch_copies"] = c.prefetch_copies;
        return d;
      });

  // On the CPU (on_cuda false) the addresses are host addresses, num_slots bounds slot_of_group
  // and rows bounds row_offsets; on the GPU max_rows_per_group sizes the grid.
  m.def(
      "fp4_grouped_gemm_units",
      [](std::uintptr_t unit_addr, int64_t off_qweight, int64_t off_qscale, int64_t off_scale, int64_t n, int64_t k,
         int num_slots, int num_groups, std::uintptr_t slot_of_group, std::uintptr_t row_offsets, int64_t rows,
         int64_t max_rows_per_group, std::uintptr_t x, int64_t ldx, std::uintptr_t y, int64_t ldy, int tile_tokens,
         bool on_cuda, std::uintptr_t s) {
        Fp4GroupedWeight w;
        w.unit_addr = ptr<const uint64_t>(unit_addr);
        w.unit_qweight = off_qweight;
        w.unit_qscale = off_qscale;
        w.unit_scale = off_scale;
        w.global_scale_per_tile = true;
        w.n = n;
        w.k = k;
        if (on_cuda) {
          throw_if_error(fp4_grouped_gemm_cuda(w, num_groups, ptr<const int32_t>(slot_of_group),
                                               ptr<const int32_t>(row_offsets), max_rows_per_group,
                                               ptr<const void>(x), ldx, ptr<void>(y), ldy, tile_tokens, stream(s)));
          return;
        }
        nogil([&] {
          return fp4_grouped_gemm_cpu(w, num_slots, num_groups, ptr<const int32_t>(slot_of_group),
                                      ptr<const int32_t>(row_offsets), rows, ptr<const void>(x), ldx, ptr<void>(y), ldy);
        });
      },
      py::arg("unit_addr"), py::arg("unit_qweight"), py::arg("unit_qscale"), py::arg("unit_scale"), py::arg("n"),
      py::arg("k"), py::arg("num_slots"), py::arg("num_groups"), py::arg("slot_of_group"), py::arg("row_offsets"),
      py::arg("rows"), py::arg("max_rows_per_group"), py::arg("x"), py::arg("ldx"), py::arg("y"), py::arg("ldy"),
      py::arg("tile_tokens"), py::arg("on_cuda"), py::arg("stream"));
}

}  // namespace py_bind
}  // namespace dsfp4
