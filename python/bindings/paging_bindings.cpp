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
#define DSFP4_COUNTER_ITEM(type, name) d[#name] = c.name;
  DSFP4_EXPERT_COUNTERS(DSFP4_COUNTER_ITEM)
#undef DSFP4_COUNTER_ITEM
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
  // The counters of a store that pages nothing: every key, zero.
  p.def("zero_expert_counters", [] { return counters_dict(ExpertCounters()); });
  p.def("zero_read_counters", [] { return read_counters_dict(ReadCounters()); });

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
  py::enum_<ExpertFormat>(p, "ExpertFormat")
      .value("nvfp4", ExpertFormat::kNvfp4)
      .value("fp8_block", ExpertFormat::kFp8Block);
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
      .def("demote", &SlotCache::demote)
      .def_property_readonly("available", &SlotCache::available)
      .def("pinned", &SlotCache::pinned)
      .def_property_readonly("size", &SlotCache::size)
      .def_property_readonly("capacity", &SlotCache::capacity);

  py::enum_<Lane>(p, "Lane")
      .value("gpu", Lane::kGpu)
      .value("copy", Lane::kCopy)
      .value("mapped", Lane::kMapped)
      .value("cpu", Lane::kCpu)
      .value("failed", Lane::kFailed);

  // The option structs are bound as they are: a setting is declared once, in paging.h.
  py::class_<ExpertStoreOptions>(p, "ExpertStoreOptions")
      .def(py::init<>())
      .def_readwrite("layers", &ExpertStoreOptions::layers)
      .def_readwrite("experts", &ExpertStoreOptions::experts)
      .def_readwrite("hidden", &ExpertStoreOptions::hidden)
      .def_readwrite("inter", &ExpertStoreOptions::inter)
      .def_readwrite("gpu_slots", &ExpertStoreOptions::gpu_slots)
      .def_property(
          "gpu_base", [](const ExpertStoreOptions& o) { return reinterpret_cast<std::uintptr_t>(o.gpu_base); },
          [](ExpertStoreOptions& o, std::uintptr_t v) { o.gpu_base = ptr<void>(v); })
      .def_readwrite("host_slots", &ExpertStoreOptions::host_slots)
      .def_readwrite("pinned", &ExpertStoreOptions::pinned)
      .def_readwrite("on_device", &ExpertStoreOptions::on_device)
      .def_readwrite("gpu_policy", &ExpertStoreOptions::gpu_policy)
      .def_readwrite("host_policy", &ExpertStoreOptions::host_policy)
      .def_readwrite("lam", &ExpertStoreOptions::lambda)
      .def_readwrite("miss_mode", &ExpertStoreOptions::miss_mode)
      .def_readwrite("io_threads", &ExpertStoreOptions::io_threads)
      .def_readwrite("repack_threads", &ExpertStoreOptions::repack_threads)
      .def_readwrite("direct_io", &ExpertStoreOptions::direct_io)
      .def_readwrite("async_copy", &ExpertStoreOptions::async_copy)
      .def_readwrite("max_prefetch_units", &ExpertStoreOptions::max_prefetch_units)
      .def_readwrite("prefetch_min_accuracy", &ExpertStoreOptions::prefetch_min_accuracy)
      .def_readwrite("max_step_copies", &ExpertStoreOptions::max_step_copies)
      .def_readwrite("spec_chunk_bytes", &ExpertStoreOptions::spec_chunk_bytes)
      .def_readwrite("pipeline_max_ids", &ExpertStoreOptions::pipeline_max_ids)
      .def_readwrite("pipeline_max_pred", &ExpertStoreOptions::pipeline_max_pred)
      .def_readwrite("wait_timeout_ms", &ExpertStoreOptions::wait_timeout_ms)
      .def_readwrite("sim_copy_delay_us", &ExpertStoreOptions::sim_copy_delay_us)
      .def_readwrite("format", &ExpertStoreOptions::format);

  py::class_<CpuLaneOptions>(p, "CpuLaneOptions")
      .def(py::init<>())
      .def_readwrite("threads", &CpuLaneOptions::threads)
      .def_readwrite("isa", &CpuLaneOptions::isa)
      .def_readwrite("reserved_cores", &CpuLaneOptions::reserved_cores)
      .def_readwrite("max_rows", &CpuLaneOptions::max_rows)
      .def_readwrite("top_k", &CpuLaneOptions::top_k)
      .def_readwrite("bus_gbs", &CpuLaneOptions::bus_gbs)
      .def_readwrite("cpu_gbs", &CpuLaneOptions::cpu_gbs)
      .def_readwrite("decoder_layers", &CpuLaneOptions::decoder_layers);
  py::class_<CpuLaneView>(p, "CpuLaneView")
      .def_readonly("x", &CpuLaneView::x)
      .def_readonly("y_dev", &CpuLaneView::y_dev)
      .def_readonly("done_dev", &CpuLaneView::done_dev)
      .def_readonly("ok_dev", &CpuLaneView::ok_dev)
      .def_readonly("max_rows", &CpuLaneView::max_rows)
      .def_readonly("top_k", &CpuLaneView::top_k)
      .def_readonly("threads", &CpuLaneView::threads)
      .def_readonly("isa", &CpuLaneView::isa)
      .def_readonly("bus_gbs", &CpuLaneView::bus_gbs)
      .def_readonly("cpu_gbs", &CpuLaneView::cpu_gbs);

  py::class_<MissInfo>(p, "MissInfo")
      .def(py::init([](bool keep, int tokens) { return MissInfo{keep, tokens}; }), py::arg("keep") = false,
           py::arg("tokens") = 1)
      .def_readwrite("keep", &MissInfo::keep)
      .def_readwrite("tokens", &MissInfo::tokens);
  py::class_<MissPolicyOptions>(p, "MissPolicyOptions")
      .def(py::init<>())
      .def_readwrite("mode", &MissPolicyOptions::mode)
      .def_readwrite("max_copies", &MissPolicyOptions::max_copies)
      .def_readwrite("free_slots", &MissPolicyOptions::free_slots)
      .def_readwrite("mapped_ok", &MissPolicyOptions::mapped_ok)
      .def_readwrite("cpu_ok", &MissPolicyOptions::cpu_ok)
      .def_readwrite("bus_gbs", &MissPolicyOptions::bus_gbs)
      .def_readwrite("cpu_gbs", &MissPolicyOptions::cpu_gbs)
      .def_readwrite("unit_bytes", &MissPolicyOptions::unit_bytes);
  p.def("choose_lanes", &choose_lanes, py::arg("misses"), py::arg("options"));
  p.def("pipeline_sync_words", &pipeline_sync_words, py::arg("layers"), py::arg("experts"));

  py::class_<PipelineView>(p, "PipelineView")
      .def_readonly("ring", &PipelineView::ring)
      .def_readonly("max_ids", &PipelineView::max_ids)
      .def_readonly("max_pred", &PipelineView::max_pred)
      .def_property_readonly("mailbox", [](const PipelineView& v) { return v.mailbox; })
      .def_property_readonly("wait_failed",
                             [](const PipelineView& v) { return reinterpret_cast<std::uintptr_t>(v.wait_failed); })
      .def_readonly("wait_timeout_ns", &PipelineView::wait_timeout_ns)
      .def("ready", [](const PipelineView& v, int layer) { return reinterpret_cast<std::uintptr_t>(v.ready(layer)); })
      .def("epoch", [](const PipelineView& v, int layer) { return reinterpret_cast<std::uintptr_t>(v.epoch(layer)); });
  p.def(
      "publish_route",
      [](const PipelineView& v, int layer, int next_layer, std::uintptr_t ids, int64_t n_ids, std::uintptr_t pred,
         int64_t n_pred, std::uintptr_t s) {
        throw_if_error(publish_route(v, layer, next_layer, ptr<const int32_t>(ids), n_ids, ptr<const int32_t>(pred),
                                     n_pred, stream(s)));
      },
      py::arg("view"), py::arg("layer"), py::arg("next_layer"), py::arg("ids"), py::arg("n_ids"), py::arg("pred"),
      py::arg("n_pred"), py::arg("stream"));

  p.def(
      "cpu_lane_join",
      [](std::uintptr_t y_perm, std::uintptr_t row_offsets, std::uintptr_t table, int experts, int64_t hidden,
         std::uintptr_t epoch, std::uintptr_t done, std::uintptr_t ok, std::uintptr_t y_cpu, int64_t y_cpu_rows,
         std::uintptr_t wait_failed, uint64_t timeout_ns, bool on_device, std::uintptr_t s) {
        CpuLaneJoin j;
        j.y_perm = ptr<void>(y_perm);
        j.row_offsets = ptr<const int32_t>(row_offsets);
        j.table = ptr<const uint64_t>(table);
        j.experts = experts;
        j.hidden = hidden;
        j.epoch = ptr<const uint32_t>(epoch);
        j.done = ptr<const uint32_t>(done);
        j.ok = ptr<const uint32_t>(ok);
        j.y_cpu = ptr<const void>(y_cpu);
        j.y_cpu_rows = y_cpu_rows;
        j.wait_failed = ptr<uint32_t>(wait_failed);
        j.timeout_ns = timeout_ns;
        j.on_device = on_device;
        nogil([&] { return cpu_lane_join(j, stream(s)); });
      },
      py::arg("y_perm"), py::arg("row_offsets"), py::arg("table"), py::arg("experts"), py::arg("hidden"),
      py::arg("epoch"), py::arg("done"), py::arg("ok"), py::arg("y_cpu"), py::arg("y_cpu_rows"), py::arg("wait_failed"),
      py::arg("timeout_ns"), py::arg("on_device"), py::arg("stream"));

  py::class_<ExpertStore>(p, "ExpertStore")
      .def(py::init([](const ExpertStoreOptions& opt, std::shared_ptr<CheckpointFiles> files,
                       const std::vector<std::vector<std::tuple<int, int64_t, int64_t, std::string>>>& stored) {
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
      .def_property_readonly("options", [](const ExpertStore& s) { return s.options(); })
      .def(
          "set_device_tables",
          [](ExpertStore& s, std::uintptr_t tables, std::uintptr_t sync) {
            s.set_device_tables(ptr<uint64_t>(tables), ptr<uint32_t>(sync));
          },
          py::arg("tables"), py::arg("sync") = 0)
      .def_property_readonly("host_tables",
                             [](const ExpertStore& s) { return reinterpret_cast<std::uintptr_t>(s.host_tables()); })
      .def_property_readonly("copy_stream",
                             [](const ExpertStore& s) { return reinterpret_cast<std::uintptr_t>(s.copy_stream()); })
      .def("begin_step", &ExpertStore::begin_step, py::arg("prefill") = false)
      .def(
          "resolve",
          [](ExpertStore& s, int layer, std::uintptr_t ids, int64_t count, std::uintptr_t compute) {
            std::vector<std::pair<int32_t, Lane>> lanes;
            nogil([&] { return s.resolve(layer, ptr<const int32_t>(ids), count, stream(compute), &lanes); });
            return lanes;
          },
          py::arg("layer"), py::arg("ids"), py::arg("count"), py::arg("compute"))
      .def(
          "resolve_ready",
          [](ExpertStore& s, int layer, std::uintptr_t ids, int64_t count, uint32_t epoch, std::uintptr_t compute,
             bool whole_routing) {
            std::vector<std::pair<int32_t, Lane>> lanes;
            // a failed expert is still placed (address 0: NaN rows), then the error is raised
            nogil([&] { return s.resolve_ready(layer, ptr<const int32_t>(ids), count, epoch, stream(compute), &lanes,
                                               whole_routing); });
            return lanes;
          },
          py::arg("layer"), py::arg("ids"), py::arg("count"), py::arg("epoch"), py::arg("compute"),
          py::arg("whole_routing") = false)
      .def(
          "prefetch",
          [](ExpertStore& s, int layer, std::uintptr_t ids, int64_t count, std::uintptr_t compute) {
            nogil([&] { return s.prefetch(layer, ptr<const int32_t>(ids), count, stream(compute)); });
          },
          py::arg("layer"), py::arg("ids"), py::arg("count"), py::arg("compute"))
      .def("start_pipeline", [](ExpertStore& s) { nogil([&] { return s.start_pipeline(); }); })
      .def(
          "begin_pipeline_step",
          [](ExpertStore& s, std::uintptr_t compute) { nogil([&] { return s.begin_pipeline_step(stream(compute)); }); },
          py::arg("compute"))
      .def("end_pipeline_step", [](ExpertStore& s) { nogil([&] { return s.end_pipeline_step(); }); })
      .def(
          "check_copy_stream",
          [](ExpertStore& s, const std::vector<std::uintptr_t>& computes, int max_tries) {
            std::vector<Stream> streams;
            for (std::uintptr_t c : computes) streams.push_back(stream(c));
            bool ok = true;
            int tries = 0;
            nogil([&] { return s.check_copy_stream(streams, max_tries, &ok, &tries); });
            return py::make_tuple(ok, tries);
          },
          py::arg("computes"), py::arg("max_tries"),
          "Probes each compute stream against the copy stream (replacing it as needed) → (ok, probes)")
      .def_property_readonly("pipeline_running", &ExpertStore::pipeline_running)
      .def_property_readonly("pipeline_view", &ExpertStore::pipeline_view)
      .def("take_error", [](ExpertStore& s) { throw_if_error(s.take_error()); })
      .def("sync_copies", [](ExpertStore& s) { nogil([&] { return s.sync_copies(); }); })
      .def(
          "reconfigure",
          [](ExpertStore& s, CachePolicy policy, double lam, MissMode mode, int max_prefetch_units,
             double min_accuracy, std::uintptr_t compute, int active_slots) {
            nogil([&] {
              return s.reconfigure(policy, lam, mode, max_prefetch_units, min_accuracy, stream(compute),
                                   active_slots);
            });
          },
          py::arg("policy"), py::arg("lam"), py::arg("miss_mode"), py::arg("max_prefetch_units"),
          py::arg("prefetch_min_accuracy"), py::arg("compute"), py::arg("active_slots") = -1)
      .def("record_routing", &ExpertStore::record_routing, py::arg("on"))
      .def("take_routing", &ExpertStore::take_routing)
      .def(
          "load_host",
          [](ExpertStore& s, int layer, std::uintptr_t ids, int64_t count) {
            nogil([&] { return s.load_host(layer, ptr<const int32_t>(ids), count); });
          },
          py::arg("layer"), py::arg("ids"), py::arg("count"))
      .def(
          "set_pinned",
          [](ExpertStore& s, int layer, int expert, bool pinned, std::uintptr_t compute) {
            nogil([&] { return s.set_pinned(layer, expert, pinned, stream(compute)); });
          },
          py::arg("layer"), py::arg("expert"), py::arg("pinned"), py::arg("compute"))
      .def(
          "enable_cpu_lane", [](ExpertStore& s, const CpuLaneOptions& o) { nogil([&] { return s.enable_cpu_lane(o); }); },
          py::arg("options"))
      .def_property_readonly("cpu_lane", [](const ExpertStore& s) { return s.cpu_lane(); })
      .def_property_readonly("cpu_lane_view", &ExpertStore::cpu_lane_view)
      .def("set_cpu_lane_active", &ExpertStore::set_cpu_lane_active, py::arg("active"))
      .def("inject_cpu_fault", &ExpertStore::inject_cpu_fault, py::arg("layer"), py::arg("expert"))
      .def("demote_layers_before", &ExpertStore::demote_layers_before)
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
         bool on_cuda, std::uintptr_t s, std::uintptr_t ready, std::uintptr_t epoch, std::uintptr_t wait_failed,
         uint64_t wait_timeout_ns) {
        Fp4GroupedWeight w;
        w.unit_addr = ptr<const uint64_t>(unit_addr);
        w.unit_ready = ptr<const uint32_t>(ready);
        w.ready_epoch = ptr<const uint32_t>(epoch);
        w.wait_failed = ptr<uint32_t>(wait_failed);
        w.wait_timeout_ns = wait_timeout_ns;
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
      py::arg("tile_tokens"), py::arg("on_cuda"), py::arg("stream"), py::arg("ready") = 0, py::arg("epoch") = 0,
      py::arg("wait_failed") = 0, py::arg("wait_timeout_ns") = 0);
}

}  // namespace py_bind
}  // namespace dsfp4
