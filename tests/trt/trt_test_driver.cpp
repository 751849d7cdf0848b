// Test driver for libdsfp4_trt_plugins.so, called from pytest through ctypes: it does what
// TensorRT does with a plugin (find the creator, create from fields, ask the build-time
// questions with a test IExprBuilder, serialize and recreate, onShapeChange + enqueue on
// caller-owned buffers) and what a runtime does with a store (an ExpertSource over a device
// table), plus a check of TensorRT's own plugin registry (loadLibrary) from a dlopen'ed
// TensorRT runtime library.
#include <dlfcn.h>

#include <NvInferRuntime.h>

#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "dsfp4/expert_source.h"
#include "dsfp4_trt_plugins.h"

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder);

namespace {

using namespace nvinfer1;

std::string g_error;

int set_error(const std::string& e) {
  g_error = e;
  return -1;
}

void copy_out(const std::string& s, char* out, int len) {
  if (out == nullptr || len <= 0) return;
  std::strncpy(out, s.c_str(), static_cast<size_t>(len) - 1);
  out[len - 1] = '\0';
}

// ---- logger -------------------------------------------------------------------------------
class RecordingLogger : public ILogger {
 public:
  void log(Severity, const char* msg) noexcept override {
    messages += msg;
    messages += '\n';
  }
  std::string messages;
};
class RecordingFinder : public ILoggerFinder {
 public:
  ILogger* findLogger() override { return &logger; }
  RecordingLogger logger;
};
RecordingFinder g_finder;

// ---- symbolic dimensions ------------------------------------------------------------------
class ExprImpl : public apiv::VDimensionExpr {
 public:
  bool isConstant() const override { return constant; }
  int64_t getConstantValue() const override { return constant ? value : std::numeric_limits<int64_t>::min(); }
  bool isSizeTensor() const override { return false; }
  bool constant = false;
  int64_t value = 0;
  std::string text;
};
class Expr : public IDimensionExpr {
 public:
  Expr() { mImpl = &impl; }
  ~Expr() noexcept override = default;
  ExprImpl impl;
};
class BuilderImpl : public apiv::VExprBuilder {
 public:
  const IDimensionExpr* constant(int64_t v) override {
    Expr* e = make();
    e->impl.constant = true;
    e->impl.value = v;
    e->impl.text = std::to_string(v);
    return e;
  }
  const IDimensionExpr* operation(DimensionOperation op, const IDimensionExpr& a, const IDimensionExpr& b) override {
    static const char* const names[] = {"+", "*", "max", "min", "-", "==", "<", "floordiv", "ceildiv"};
    const auto& x = static_cast<const Expr&>(a).impl;
    const auto& y = static_cast<const Expr&>(b).impl;
    const int o = static_cast<int>(op);
    if (o < 0 || o > 8) return nullptr;
    if (x.constant && y.constant) {
      int64_t v = 0;
      switch (op) {
        case DimensionOperation::kSUM: v = x.value + y.value; break;
        case DimensionOperation::kPROD: v = x.value * y.value; break;
        case DimensionOperation::kMAX: v = std::max(x.value, y.value); break;
        case DimensionOperation::kMIN: v = std::min(x.value, y.value); break;
        case DimensionOperation::kSUB: v = x.value - y.value; break;
        case DimensionOperation::kEQUAL: v = x.value == y.value; break;
        case DimensionOperation::kLESS: v = x.value < y.value; break;
        case DimensionOperation::kFLOOR_DIV: v = y.value ? x.value / y.value : 0; break;
        case DimensionOperation::kCEIL_DIV: v = y.value ? (x.value + y.value - 1) / y.value : 0; break;
      }
      return constant(v);
    }
    Expr* e = make();
    e->impl.text = "(" + x.text + " " + names[o] + " " + y.text + ")";
    return e;
  }
  const IDimensionExpr* declareSizeTensor(int32_t, const IDimensionExpr&, const IDimensionExpr&) override {
    return nullptr;
  }
  const IDimensionExpr* symbol(const std::string& name) {
    Expr* e = make();
    e->impl.text = name;
    return e;
  }

 private:
  Expr* make() {
    pool_.emplace_back(new Expr());
    return pool_.back().get();
  }
  std::deque<std::unique_ptr<Expr>> pool_;
};
class Builder : public IExprBuilder {
 public:
  Builder() { mImpl = &impl; }
  ~Builder() noexcept override = default;
  BuilderImpl impl;
};

// ---- creators -----------------------------------------------------------------------------
IPluginCreatorV3One* find_creator(const char* name) {
  int32_t n = 0;
  IPluginCreatorInterface* const* list = getCreators(n);
  for (int32_t i = 0; i < n; ++i) {
    if (std::strcmp(list[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) continue;
    auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
    if (std::strcmp(c->getPluginName(), name) == 0) return c;
  }
  return nullptr;
}

IPluginV3OneBuild* build_of(void* p) {
  return static_cast<IPluginV3OneBuild*>(static_cast<IPluginV3*>(p)->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
IPluginV3OneRuntime* runtime_of(void* p) {
  return static_cast<IPluginV3OneRuntime*>(
      static_cast<IPluginV3*>(p)->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}
IPluginV3OneCore* core_of(void* p) {
  return static_cast<IPluginV3OneCore*>(static_cast<IPluginV3*>(p)->getCapabilityInterface(PluginCapabilityType::kCORE));
}

Dims make_dims(int nb, const int64_t* d) {
  Dims r{};
  r.nbDims = nb;
  for (int i = 0; i < nb && i < Dims::MAX_DIMS; ++i) r.d[i] = d[i];
  return r;
}

std::vector<PluginTensorDesc> make_descs(int n, const int* nbdims, const int64_t* dims, const int* types) {
  std::vector<PluginTensorDesc> v(n);
  for (int i = 0; i < n; ++i) {
    v[i].dims = make_dims(nbdims[i], dims + 8 * i);
    v[i].type = static_cast<DataType>(types[i]);
    v[i].format = TensorFormat::kLINEAR;
    v[i].scale = -1.0f;
  }
  return v;
}

// ---- an ExpertSource over a caller-made device table ------------------------------------
class TableSource : public dsfp4::ExpertSource {
 public:
  dsfp4::Status acquire(int layer, const int32_t* ids, int64_t count, dsfp4::Stream,
                        dsfp4::ExpertTable* out) override {
    if (fail_acquire) return dsfp4::InvalidArgument("TableSource: acquire refused");
    if (ids == nullptr) return dsfp4::InvalidArgument("TableSource: null expert ids");
    last_layer = layer;
    last_count = count;
    ++acquired;
    *out = table;
    return dsfp4::Status::Ok();
  }
  dsfp4::Status release(int layer, dsfp4::Stream) override {
    if (layer != last_layer) return dsfp4::InvalidArgument("TableSource: release of another layer");
    ++released;
    return dsfp4::Status::Ok();
  }
  dsfp4::ExpertTable table;
  int acquired = 0, released = 0, last_layer = -1;
  int64_t last_count = 0;
  bool fail_acquire = false;
};

}  // namespace

#define DRV extern "C" __attribute__((visibility("default")))

DRV const char* drv_error() { return g_error.c_str(); }
DRV const char* drv_plugin_last_error() { return dsfp4_trt_last_error(); }

DRV void drv_capture_log(int on) { setLoggerFinder(on ? &g_finder : nullptr); }
DRV const char* drv_log() { return g_finder.logger.messages.c_str(); }
DRV void drv_clear_log() { g_finder.logger.messages.clear(); }

// Creator i: returns the number of creators; fills name, version, namespace, interface kind.
DRV int drv_creator_info(int i, char* name, char* version, char* ns, char* kind, int len) {
  int32_t n = 0;
  IPluginCreatorInterface* const* list = getCreators(n);
  if (i >= 0 && i < n) {
    copy_out(list[i]->getInterfaceInfo().kind, kind, len);
    auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
    copy_out(c->getPluginName(), name, len);
    copy_out(c->getPluginVersion(), version, len);
    copy_out(c->getPluginNamespace(), ns, len);
  }
  return n;
}

// "name:type:length;..." of the fields a creator advertises.
DRV int drv_field_names(const char* plugin, char* out, int len) {
  IPluginCreatorV3One* c = find_creator(plugin);
  if (c == nullptr) return set_error(std::string("no creator ") + plugin);
  const PluginFieldCollection* fc = c->getFieldNames();
  std::string s;
  for (int i = 0; i < fc->nbFields; ++i)
    s += std::string(fc->fields[i].name) + ":" + std::to_string(static_cast<int>(fc->fields[i].type)) + ":" +
         std::to_string(fc->fields[i].length) + ";";
  copy_out(s, out, len);
  return fc->nbFields;
}

DRV void* drv_create(const char* plugin, int n, const char** names, const void** data, const int* types,
                     const int* lengths, int phase) {
  IPluginCreatorV3One* c = find_creator(plugin);
  if (c == nullptr) {
    set_error(std::string("no creator ") + plugin);
    return nullptr;
  }
  std::vector<PluginField> fields;
  for (int i = 0; i < n; ++i) fields.emplace_back(names[i], data[i], static_cast<PluginFieldType>(types[i]), lengths[i]);
  PluginFieldCollection fc{n, fields.data()};
  return c->createPlugin("test", &fc, phase ? TensorRTPhase::kRUNTIME : TensorRTPhase::kBUILD);
}

DRV void drv_destroy(void* p) { delete static_cast<IPluginV3*>(p); }
DRV void* drv_clone(void* p) { return static_cast<IPluginV3*>(p)->clone(); }
DRV void* drv_attach(void* p) { return runtime_of(p)->attachToContext(nullptr); }

DRV int drv_names(void* p, char* name, char* version, char* ns, int len) {
  IPluginV3OneCore* c = core_of(p);
  copy_out(c->getPluginName(), name, len);
  copy_out(c->getPluginVersion(), version, len);
  copy_out(c->getPluginNamespace(), ns, len);
  return build_of(p)->getNbOutputs();
}

// Serializes p (getFieldsToSerialize) and recreates it through its creator in the runtime phase.
DRV void* drv_roundtrip(void* p) {
  const PluginFieldCollection* fc = runtime_of(p)->getFieldsToSerialize();
  IPluginCreatorV3One* c = find_creator(core_of(p)->getPluginName());
  if (fc == nullptr || c == nullptr) {
    set_error("no fields or no creator");
    return nullptr;
  }
  return c->createPlugin("roundtrip", fc, TensorRTPhase::kRUNTIME);
}

// 1 when a and b serialize to the same fields (names, types, lengths, bytes), else 0.
DRV int drv_same_fields(void* a, void* b) {
  auto element = [](PluginFieldType t) -> size_t {
    switch (t) {
      case PluginFieldType::kINT8:
      case PluginFieldType::kCHAR: return 1;
      case PluginFieldType::kINT64:
      case PluginFieldType::kFLOAT64: return 8;
      default: return 4;
    }
  };
  const PluginFieldCollection* fa = runtime_of(a)->getFieldsToSerialize();
  std::vector<PluginField> copy(fa->fields, fa->fields + fa->nbFields);  // b's call may reuse storage
  std::vector<std::vector<char>> bytes;
  for (const auto& f : copy) {
    const char* d = static_cast<const char*>(f.data);
    bytes.emplace_back(d, d + f.length * element(f.type));
  }
  const PluginFieldCollection* fb = runtime_of(b)->getFieldsToSerialize();
  if (fb->nbFields != static_cast<int32_t>(copy.size())) return 0;
  for (int i = 0; i < fb->nbFields; ++i) {
    const PluginField& f = fb->fields[i];
    if (std::strcmp(f.name, copy[i].name) != 0 || f.type != copy[i].type || f.length != copy[i].length) return 0;
    if (std::memcmp(f.data, bytes[i].data(), bytes[i].size()) != 0) return 0;
  }
  return 1;
}

DRV int drv_serialized_names(void* p, char* out, int len) {
  const PluginFieldCollection* fc = runtime_of(p)->getFieldsToSerialize();
  std::string s;
  for (int i = 0; i < fc->nbFields; ++i) s += std::string(fc->fields[i].name) + ";";
  copy_out(s, out, len);
  return fc->nbFields;
}

// Output shapes from input shapes; a dimension of -1 is symbolic ("s<input>_<dim>").
// Writes "out0=[a, b];out1=[...]" and returns getOutputShapes' result.
DRV int drv_output_shapes(void* p, int nin, const int* nbdims, const int64_t* dims, char* out, int len) {
  Builder eb;
  std::vector<DimsExprs> in(nin);
  for (int i = 0; i < nin; ++i) {
    in[i].nbDims = nbdims[i];
    for (int j = 0; j < nbdims[i]; ++j) {
      const int64_t v = dims[8 * i + j];
      in[i].d[j] = v >= 0 ? eb.impl.constant(v) : eb.impl.symbol("s" + std::to_string(i) + "_" + std::to_string(j));
    }
  }
  IPluginV3OneBuild* b = build_of(p);
  const int nout = b->getNbOutputs();
  std::vector<DimsExprs> o(nout);
  const int rc = b->getOutputShapes(in.data(), nin, nullptr, 0, o.data(), nout, eb);
  std::string s;
  if (rc == 0)
    for (int k = 0; k < nout; ++k) {
      s += "out" + std::to_string(k) + "=[";
      for (int j = 0; j < o[k].nbDims; ++j)
        s += (j ? ", " : "") + (o[k].d[j] ? static_cast<const Expr*>(o[k].d[j])->impl.text : std::string("null"));
      s += "];";
    }
  copy_out(s, out, len);
  return rc;
}

DRV int drv_output_types(void* p, int nin, const int* in_types, int* out_types) {
  IPluginV3OneBuild* b = build_of(p);
  std::vector<DataType> in(nin);
  for (int i = 0; i < nin; ++i) in[i] = static_cast<DataType>(in_types[i]);
  const int nout = b->getNbOutputs();
  std::vector<DataType> out(nout, DataType::kBOOL);
  const int rc = b->getOutputDataTypes(out.data(), nout, in.data(), nin);
  for (int k = 0; k < nout; ++k) out_types[k] = static_cast<int>(out[k]);
  return rc;
}

DRV int drv_supports(void* p, int pos, int nin, int nout, const int* types, const int* formats) {
  std::vector<DynamicPluginTensorDesc> io(nin + nout);
  for (int i = 0; i < nin + nout; ++i) {
    io[i].desc.type = static_cast<DataType>(types[i]);
    io[i].desc.format = static_cast<TensorFormat>(formats[i]);
  }
  return build_of(p)->supportsFormatCombination(pos, io.data(), nin, nout) ? 1 : 0;
}

DRV int64_t drv_workspace(void* p, int nin, const int* nbdims, const int64_t* max_dims, int nout) {
  std::vector<DynamicPluginTensorDesc> in(nin), out(nout);
  for (int i = 0; i < nin; ++i) in[i].max = in[i].opt = in[i].min = make_dims(nbdims[i], max_dims + 8 * i);
  return static_cast<int64_t>(build_of(p)->getWorkspaceSize(in.data(), nin, out.data(), nout));
}

// onShapeChange, then enqueue on the given device buffers; returns the first non-zero result.
DRV int drv_enqueue(void* p, int nin, const int* nbdims, const int64_t* dims, const int* types,
                    const void* const* inputs, int nout, const int* out_nbdims, const int64_t* out_dims,
                    const int* out_types, void* const* outputs, void* workspace, void* stream) {
  auto in = make_descs(nin, nbdims, dims, types);
  auto out = make_descs(nout, out_nbdims, out_dims, out_types);
  IPluginV3OneRuntime* r = runtime_of(p);
  const int rc = r->onShapeChange(in.data(), nin, out.data(), nout);
  if (rc != 0) return rc;
  return r->enqueue(in.data(), out.data(), inputs, outputs, workspace, static_cast<cudaStream_t>(stream));
}

// enqueue alone (after a successful onShapeChange), e.g. with bad pointers.
DRV int drv_enqueue_only(void* p, int nin, const int* nbdims, const int64_t* dims, const int* types,
                         const void* const* inputs, int nout, const int* out_nbdims, const int64_t* out_dims,
                         const int* out_types, void* const* outputs, void* workspace, void* stream) {
  auto in = make_descs(nin, nbdims, dims, types);
  auto out = make_descs(nout, out_nbdims, out_dims, out_types);
  return runtime_of(p)->enqueue(in.data(), out.data(), inputs, outputs, workspace, static_cast<cudaStream_t>(stream));
}

// ---- expert source ------------------------------------------------------------------------
// offsets: gate_up qweight, qscale, global scale, down qweight, qscale, global scale (bytes).
DRV void* drv_source_new(const void* unit_addr, int experts, int64_t hidden, int64_t inter, const int64_t* offsets,
                         int gu_per_tile, int dn_per_tile) {
  auto* s = new TableSource();
  s->table.unit_addr = static_cast<const uint64_t*>(unit_addr);
  s->table.num_experts = experts;
  auto& L = s->table.layout;
  L.hidden = hidden;
  L.inter = inter;
  L.gate_up_qweight = offsets[0];
  L.gate_up_qscale = offsets[1];
  L.gate_up_global_scale = offsets[2];
  L.down_qweight = offsets[3];
  L.down_qscale = offsets[4];
  L.down_global_scale = offsets[5];
  L.gate_up_scale_per_tile = gu_per_tile != 0;
  L.down_scale_per_tile = dn_per_tile != 0;
  return s;
}
DRV void drv_source_free(void* s) { delete static_cast<TableSource*>(s); }
DRV void drv_source_fail(void* s, int on) { static_cast<TableSource*>(s)->fail_acquire = on != 0; }
DRV void drv_source_stats(void* s, int* acquired, int* released, int* layer, int64_t* count) {
  auto* t = static_cast<TableSource*>(s);
  *acquired = t->acquired;
  *released = t->released;
  *layer = t->last_layer;
  *count = t->last_count;
}
DRV int drv_set_source(int64_t handle, void* s) { return dsfp4_trt_set_expert_source(handle, s); }

// ---- TensorRT's plugin registry -----------------------------------------------------------
// dlopens a TensorRT runtime library (e.g. libnvinfer_lean.so.11), loads plugin_lib through its
// registry's loadLibrary and looks every dsfp4 creator up by name, version and namespace; each
// found creator must create a plugin from valid fields (given for Dsfp4MoeRouting). Returns the
// number of creators found; report lists what happened.
DRV int drv_registry_check(const char* trt_lib, const char* plugin_lib, char* report, int len) {
  std::string rep;
  void* h = dlopen(trt_lib, RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) return set_error(std::string("dlopen ") + trt_lib + ": " + dlerror());
  using GetRegistry = IPluginRegistry* (*)();
  using Version = int32_t (*)();
  auto get = reinterpret_cast<GetRegistry>(dlsym(h, "getPluginRegistry"));
  auto major = reinterpret_cast<Version>(dlsym(h, "getInferLibMajorVersion"));
  auto minor = reinterpret_cast<Version>(dlsym(h, "getInferLibMinorVersion"));
  if (get == nullptr) return set_error("getPluginRegistry not exported by " + std::string(trt_lib));
  if (major && minor) rep += "TensorRT " + std::to_string(major()) + "." + std::to_string(minor()) + "; ";
  IPluginRegistry* reg = get();
  if (reg == nullptr) return set_error("getPluginRegistry returned null");
  IPluginRegistry::PluginLibraryHandle lib = reg->loadLibrary(plugin_lib);
  if (lib == nullptr) return set_error(std::string("loadLibrary failed for ") + plugin_lib);
  rep += "loadLibrary ok; ";
  int found = 0;
  for (const char* name : {"Dsfp4Fp4Gemm", "Dsfp4MoeRouting", "Dsfp4MoeExperts"}) {
    IPluginCreatorInterface* c = reg->getCreator(name, "1", "dsfp4");
    rep += std::string(name) + (c ? " found" : " MISSING");
    if (c != nullptr && std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0) {
      ++found;
      auto* v3 = static_cast<IPluginCreatorV3One*>(c);
      if (std::strcmp(name, "Dsfp4MoeRouting") == 0) {
        const int32_t e = 16, g = 4, tg = 2, k = 4;
        const float scale = 2.5f;
        std::vector<PluginField> f = {{"num_experts", &e, PluginFieldType::kINT32, 1},
                                      {"n_group", &g, PluginFieldType::kINT32, 1},
                                      {"topk_group", &tg, PluginFieldType::kINT32, 1},
                                      {"top_k", &k, PluginFieldType::kINT32, 1},
                                      {"routed_scaling_factor", &scale, PluginFieldType::kFLOAT32, 1}};
        PluginFieldCollection fc{static_cast<int32_t>(f.size()), f.data()};
        IPluginV3* p = v3->createPlugin("registry", &fc, TensorRTPhase::kBUILD);
        rep += p ? " (created " + std::string(core_of(p)->getPluginName()) + ")" : " (createPlugin FAILED)";
        if (p == nullptr) --found;
        delete p;
      }
    }
    rep += "; ";
  }
  reg->deregisterLibrary(lib);
  copy_out(rep, report, len);
  return found;
}
