#include "moe_experts_plugin.h"

#include <string>

#include "dsfp4/nvfp4.h"
#include "expert_sources.h"

namespace dsfp4 {
namespace trt {

using nvinfer1::DataType;
using nvinfer1::PluginFieldType;

namespace {
const char* const kWeightNames[6] = {"gate_up_qweight", "gate_up_qscale", "gate_up_global_scale",
                                     "down_qweight",    "down_qscale",    "down_global_scale"};
}  // namespace

std::vector<FieldSpec> MoeExpertsPlugin::field_specs() {
  return {{"num_experts", PluginFieldType::kINT32, 1},
          {"hidden", PluginFieldType::kINT32, 1},
          {"inter", PluginFieldType::kINT32, 1},
          {"top_k", PluginFieldType::kINT32, 1},
          {"weight_source", PluginFieldType::kCHAR, 0},
          {"gate_up_qweight", PluginFieldType::kINT32, 0},
          {"gate_up_qscale", PluginFieldType::kINT8, 0},
          {"gate_up_global_scale", PluginFieldType::kFLOAT32, 0},
          {"down_qweight", PluginFieldType::kINT32, 0},
          {"down_qscale", PluginFieldType::kINT8, 0},
          {"down_global_scale", PluginFieldType::kFLOAT32, 0},
          {"store_handle", PluginFieldType::kINT64, 1},
          {"layer", PluginFieldType::kINT32, 1}};
}

std::unique_ptr<MoeExpertsPlugin> MoeExpertsPlugin::create(FieldReader& f) {
  auto p = std::make_unique<MoeExpertsPlugin>();
  f.get("num_experts", &p->experts_);
  f.get("hidden", &p->hidden_);
  f.get("inter", &p->inter_);
  f.get("top_k", &p->top_k_);
  f.get_string("weight_source", &p->source_name_, false);
  if (!f.ok()) return nullptr;
  if (p->experts_ < 1 || p->experts_ > 1024)
    f.fail("field 'num_experts' = " + std::to_string(p->experts_) + " must be in [1, 1024]");
  else if (p->hidden_ <= 0 || p->hidden_ % 16 != 0)
    f.fail("field 'hidden' = " + std::to_string(p->hidden_) + " must be a positive multiple of 16");
  else if (p->inter_ <= 0 || p->inter_ % 16 != 0)
    f.fail("field 'inter' = " + std::to_string(p->inter_) + " must be a positive multiple of 16");
  else if (p->top_k_ < 1 || p->top_k_ > p->experts_)
    f.fail("field 'top_k' = " + std::to_string(p->top_k_) + " must be in [1, num_experts]");
  if (p->source_name_ == "fields")
    p->source_ = Source::kFields;
  else if (p->source_name_ == "inputs")
    p->source_ = Source::kInputs;
  else if (p->source_name_ == "store")
    p->source_ = Source::kStore;
  else
    f.fail("field 'weight_source' = '" + p->source_name_ + "' must be 'fields', 'inputs' or 'store'");
  if (!f.ok()) return nullptr;

  const int64_t E = p->experts_, H = p->hidden_, I = p->inter_;
  p->gu_words_ = static_cast<int64_t>(tiled_weight_bytes(2 * I, H) / 4);
  p->gu_bytes_ = static_cast<int64_t>(tiled_scale_bytes(2 * I, H));
  p->gu_tiles_ = (2 * I + 15) / 16;
  p->dn_words_ = static_cast<int64_t>(tiled_weight_bytes(H, I) / 4);
  p->dn_bytes_ = static_cast<int64_t>(tiled_scale_bytes(H, I));
  p->dn_tiles_ = (H + 15) / 16;

  const bool fields = p->source_ == Source::kFields, store = p->source_ == Source::kStore;
  for (const char* name : kWeightNames)
    if (!fields && f.has(name)) f.fail(std::string("field '") + name + "' is given but weight_source = '" +
                                       p->source_name_ + "'");
  for (const char* name : {"store_handle", "layer"})
    if (!store && f.has(name)) f.fail(std::string("field '") + name + "' is given but weight_source = '" +
                                      p->source_name_ + "'");
  if (!f.ok()) return nullptr;

  if (store) {
    f.get("store_handle", &p->store_handle_);
    f.get("layer", &p->layer_);
    if (f.ok() && p->store_handle_ == 0) f.fail("field 'store_handle' must be non-zero");
    if (f.ok() && p->layer_ < 0) f.fail("field 'layer' = " + std::to_string(p->layer_) + " must be non-negative");
  } else if (fields) {
    std::vector<int32_t> gu_qw, dn_qw;
    std::vector<int8_t> gu_qs, dn_qs;
    std::vector<float> gu_gs, dn_gs;
    f.get_array("gate_up_qweight", &gu_qw);
    f.get_array("gate_up_qscale", &gu_qs);
    f.get_array("gate_up_global_scale", &gu_gs);
    f.get_array("down_qweight", &dn_qw);
    f.get_array("down_qscale", &dn_qs);
    f.get_array("down_global_scale", &dn_gs);
    if (!f.ok()) return nullptr;
    const std::string shape = " for num_experts = " + std::to_string(E) + ", hidden = " + std::to_string(H) +
                              ", inter = " + std::to_string(I);
    auto check_len = [&](const char* name, size_t got, int64_t want) {
      if (f.ok() && static_cast<int64_t>(got) != want)
        f.fail(std::string("field '") + name + "' has length " + std::to_string(got) + ", expected " +
               std::to_string(want) + shape);
    };
    check_len("gate_up_qweight", gu_qw.size(), E * p->gu_words_);
    check_len("gate_up_qscale", gu_qs.size(), E * p->gu_bytes_);
    check_len("down_qweight", dn_qw.size(), E * p->dn_words_);
    check_len("down_qscale", dn_qs.size(), E * p->dn_bytes_);
    auto check_scales = [&](const char* name, size_t got, int64_t tiles, bool* per_tile) {
      if (!f.ok()) return;
      if (static_cast<int64_t>(got) == E * tiles && tiles > 1)
        *per_tile = true;
      else if (static_cast<int64_t>(got) != E)
        f.fail(std::string("field '") + name + "' has length " + std::to_string(got) + ", expected " +
               std::to_string(E) + " or " + std::to_string(E * tiles) + " (one per 16-row tile)" + shape);
    };
    check_scales("gate_up_global_scale", gu_gs.size(), p->gu_tiles_, &p->gu_per_tile_);
    check_scales("down_global_scale", dn_gs.size(), p->dn_tiles_, &p->dn_per_tile_);
    if (!f.ok()) return nullptr;
    p->gu_qw_ = make_device_array(gu_qw);
    p->gu_qs_ = make_device_array(gu_qs);
    p->gu_gs_ = make_device_array(gu_gs);
    p->dn_qw_ = make_device_array(dn_qw);
    p->dn_qs_ = make_device_array(dn_qs);
    p->dn_gs_ = make_device_array(dn_gs);
  }
  if (!f.ok()) return nullptr;
  return p;
}

void MoeExpertsPlugin::write_fields(FieldWriter& w) const {
  w.add("num_experts", &experts_);
  w.add("hidden", &hidden_);
  w.add("inter", &inter_);
  w.add("top_k", &top_k_);
  w.add("weight_source", source_name_);
  if (source_ == Source::kStore) {
    w.add("store_handle", &store_handle_);
    w.add("layer", &layer_);
  } else if (source_ == Source::kFields) {
    auto i32 = [](const std::shared_ptr<DeviceArray>& a) { return reinterpret_cast<const int32_t*>(a->host().data()); };
    auto i8 = [](const std::shared_ptr<DeviceArray>& a) { return reinterpret_cast<const int8_t*>(a->host().data()); };
    auto f32 = [](const std::shared_ptr<DeviceArray>& a) { return reinterpret_cast<const float*>(a->host().data()); };
    auto n = [](const std::shared_ptr<DeviceArray>& a, int size) { return static_cast<int32_t>(a->host().size() / size); };
    w.add("gate_up_qweight", i32(gu_qw_), n(gu_qw_, 4));
    w.add("gate_up_qscale", i8(gu_qs_), n(gu_qs_, 1));
    w.add("gate_up_global_scale", f32(gu_gs_), n(gu_gs_, 4));
    w.add("down_qweight", i32(dn_qw_), n(dn_qw_, 4));
    w.add("down_qscale", i8(dn_qs_), n(dn_qs_, 1));
    w.add("down_global_scale", f32(dn_gs_), n(dn_gs_, 4));
  }
}

int32_t MoeExpertsPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                             int32_t nbInputs) const noexcept {
  if (nbInputs != nb_inputs() || nbOutputs != 1)
    return fail("expects " + std::to_string(nb_inputs()) + " inputs and 1 output, got " + std::to_string(nbInputs) +
                " and " + std::to_string(nbOutputs));
  if (inputTypes[0] != DataType::kBF16)
    return fail(std::string("input 0 (hidden_states) must be BF16, got ") + data_type_name(inputTypes[0]));
  if (inputTypes[1] != DataType::kFLOAT)
    return fail(std::string("input 1 (topk_weights) must be FLOAT, got ") + data_type_name(inputTypes[1]));
  if (inputTypes[2] != DataType::kINT32)
    return fail(std::string("input 2 (topk_ids) must be INT32, got ") + data_type_name(inputTypes[2]));
  outputTypes[0] = DataType::kBF16;
  return 0;
}

int32_t MoeExpertsPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                                          const nvinfer1::DimsExprs*, int32_t, nvinfer1::DimsExprs* outputs,
                                          int32_t nbOutputs, nvinfer1::IExprBuilder&) noexcept {
  if (nbInputs != nb_inputs() || nbOutputs != 1)
    return fail("expects " + std::to_string(nb_inputs()) + " inputs and 1 output, got " + std::to_string(nbInputs) +
                " and " + std::to_string(nbOutputs));
  auto constant_is = [](const nvinfer1::IDimensionExpr* d, int64_t v) { return !d->isConstant() || d->getConstantValue() == v; };
  const nvinfer1::DimsExprs& x = inputs[0];
  if (x.nbDims != 2 || !constant_is(x.d[1], hidden_))
    return fail("input 0 (hidden_states) must be [tokens, hidden = " + std::to_string(hidden_) + "]");
  for (int i = 1; i <= 2; ++i)
    if (inputs[i].nbDims != 2 || !constant_is(inputs[i].d[1], top_k_))
      return fail(std::string("input ") + std::to_string(i) + (i == 1 ? " (topk_weights)" : " (topk_ids)") +
                  " must be [tokens, top_k = " + std::to_string(top_k_) + "]");
  if (source_ == Source::kInputs) {
    const int64_t per_expert[6] = {gu_words_, gu_bytes_, gu_tiles_, dn_words_, dn_bytes_, dn_tiles_};
    for (int i = 0; i < 6; ++i) {
      const nvinfer1::DimsExprs& d = inputs[3 + i];
      const bool scales = i == 2 || i == 5;
      const std::string what = "input " + std::to_string(3 + i) + " (" + kWeightNames[i] + ")";
      if (d.nbDims < 1 || d.nbDims > 2 || !constant_is(d.d[0], experts_))
        return fail(what + " must be [num_experts = " + std::to_string(experts_) + ", ...]");
      if (!scales && (d.nbDims != 2 || !constant_is(d.d[1], per_expert[i])))
        return fail(what + " must be [" + std::to_string(experts_) + ", " + std::to_string(per_expert[i]) + "]");
      if (scales && d.nbDims == 2 && !constant_is(d.d[1], per_expert[i]))
        return fail(what + " must be [" + std::to_string(experts_) + "] or [" + std::to_string(experts_) + ", " +
                    std::to_string(per_expert[i]) + "]");
    }
  }
  outputs[0] = x;
  return 0;
}

bool MoeExpertsPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut,
                                                 int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (nbInputs != nb_inputs() || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  const nvinfer1::PluginTensorDesc& d = inOut[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  if (pos == 0 || pos == nbInputs) return d.type == DataType::kBF16;  // hidden_states, output
  if (pos == 1) return d.type == DataType::kFLOAT;                    // topk_weights
  if (pos == 2) return d.type == DataType::kINT32;                    // topk_ids
  switch ((pos - 3) % 3) {                                            // weights as inputs
    case 0: return d.type == DataType::kINT32;                        // qweight
    case 1: return d.type == DataType::kINT8;                         // qscale (e4m3 bytes)
    default: return d.type == DataType::kFLOAT;                       // global scales
  }
}

size_t MoeExpertsPlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                          const nvinfer1::DynamicPluginTensorDesc*, int32_t) const noexcept {
  if (nbInputs < 1 || inputs[0].max.nbDims != 2) return 0;
  return moe_experts_workspace_bytes(params(inputs[0].max.d[0]));
}

std::string MoeExpertsPlugin::check_io(const nvinfer1::PluginTensorDesc* in, const nvinfer1::PluginTensorDesc* out) const {
  const nvinfer1::Dims& x = in[0].dims;
  if (x.nbDims != 2 || x.d[1] != hidden_)
    return "input 0 (hidden_states) has shape " + dims_string(x) + ", expected [tokens, " + std::to_string(hidden_) + "]";
  for (int i = 1; i <= 2; ++i)
    if (in[i].dims.nbDims != 2 || in[i].dims.d[0] != x.d[0] || in[i].dims.d[1] != top_k_)
      return "input " + std::to_string(i) + " has shape " + dims_string(in[i].dims) + ", expected [" +
             std::to_string(x.d[0]) + ", " + std::to_string(top_k_) + "]";
  if (in[0].type != DataType::kBF16 || in[1].type != DataType::kFLOAT || in[2].type != DataType::kINT32)
    return "inputs must be BF16 hidden_states, FLOAT topk_weights and INT32 topk_ids";
  if (out != nullptr && (out[0].dims.nbDims != 2 || out[0].dims.d[0] != x.d[0] || out[0].dims.d[1] != hidden_ ||
                         out[0].type != DataType::kBF16))
    return "output 0 has shape " + dims_string(out[0].dims) + ", expected BF16 " + dims_string(x);
  if (source_ == Source::kInputs) {
    const int64_t per_expert[6] = {gu_words_, gu_bytes_, gu_tiles_, dn_words_, dn_bytes_, dn_tiles_};
    for (int i = 0; i < 6; ++i) {
      const int64_t v = volume(in[3 + i].dims);
      const bool scales = i == 2 || i == 5;
      if (v != experts_ * per_expert[i] && !(scales && v == experts_))
        return "input " + std::to_string(3 + i) + " (" + kWeightNames[i] + ") has shape " + dims_string(in[3 + i].dims) +
               ", which does not match num_experts, hidden and inter";
    }
  }
  return "";
}

int32_t MoeExpertsPlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs,
                                        const nvinfer1::PluginTensorDesc* out, int32_t nbOutputs) noexcept {
  if (nbInputs != nb_inputs() || nbOutputs != 1) return fail("wrong number of inputs or outputs");
  const std::string err = check_io(in, out);
  if (!err.empty()) return fail(err);
  if (source_ == Source::kFields) {  // upload now, outside any stream capture
    std::string e;
    for (const auto* a : {&gu_qw_, &gu_qs_, &gu_gs_, &dn_qw_, &dn_qs_, &dn_gs_})
      if (!(*a)->device(&e)) return fail(e);
  }
  return 0;
}

int32_t MoeExpertsPlugin::enqueue(const nvinfer1::PluginTensorDesc* inputDesc,
                                  const nvinfer1::PluginTensorDesc* outputDesc, const void* const* inputs,
                                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
      return fail("enqueue: null descriptor or pointer array");
    const std::string err = check_io(inputDesc, outputDesc);
    if (!err.empty()) return fail("enqueue: " + err);
    const int64_t tokens = inputDesc[0].dims.d[0];
    if (tokens == 0) return 0;
    for (int i = 0; i < nb_inputs(); ++i)
      if (inputs[i] == nullptr) return fail("enqueue: input " + std::to_string(i) + " is null");
    if (outputs[0] == nullptr) return fail("enqueue: output 0 is null");
    const MoeExpertsParams p = params(tokens);
    const size_t ws_bytes = moe_experts_workspace_bytes(p);
    if (workspace == nullptr) return fail("enqueue: workspace is null");
    const auto* w = static_cast<const float*>(inputs[1]);
    const auto* ids = static_cast<const int32_t*>(inputs[2]);

    if (source_ == Source::kStore) {
      ExpertSource* src = find_expert_source(store_handle_);
      if (src == nullptr)
        return fail("enqueue: no expert source is registered for store_handle = " + std::to_string(store_handle_) +
                    " (dsfp4_trt_set_expert_source)");
      ExpertTable table;
      Status st = src->acquire(layer_, ids, tokens * top_k_, stream, &table);
      if (!st.ok()) return fail("enqueue: expert source: " + st.message());
      st = moe_experts_units_cuda(p, table, inputs[0], w, ids, outputs[0], workspace, ws_bytes, stream);
      const Status rel = src->release(layer_, stream);
      if (!st.ok()) return fail(st);
      return rel.ok() ? 0 : fail("enqueue: expert source: " + rel.message());
    }

    Fp4GroupedWeight gu, dn;
    gu.n = 2 * inter_;
    gu.k = hidden_;
    gu.qweight_slot_stride = gu_words_;
    gu.qscale_slot_stride = gu_bytes_;
    dn.n = hidden_;
    dn.k = inter_;
    dn.qweight_slot_stride = dn_words_;
    dn.qscale_slot_stride = dn_bytes_;
    if (source_ == Source::kInputs) {
      gu.qweight = static_cast<const uint32_t*>(inputs[3]);
      gu.qscale = static_cast<const uint8_t*>(inputs[4]);
      gu.global_scale = static_cast<const float*>(inputs[5]);
      gu.global_scale_per_tile = volume(inputDesc[5].dims) != experts_;
      dn.qweight = static_cast<const uint32_t*>(inputs[6]);
      dn.qscale = static_cast<const uint8_t*>(inputs[7]);
      dn.global_scale = static_cast<const float*>(inputs[8]);
      dn.global_scale_per_tile = volume(inputDesc[8].dims) != experts_;
    } else {
      std::string e;
      gu.qweight = static_cast<const uint32_t*>(gu_qw_->device(&e));
      gu.qscale = static_cast<const uint8_t*>(gu_qs_->device(&e));
      gu.global_scale = static_cast<const float*>(gu_gs_->device(&e));
      dn.qweight = static_cast<const uint32_t*>(dn_qw_->device(&e));
      dn.qscale = static_cast<const uint8_t*>(dn_qs_->device(&e));
      dn.global_scale = static_cast<const float*>(dn_gs_->device(&e));
      if (!gu.qweight || !gu.qscale || !gu.global_scale || !dn.qweight || !dn.qscale || !dn.global_scale)
        return fail("enqueue: " + e);
      gu.global_scale_per_tile = gu_per_tile_;
      dn.global_scale_per_tile = dn_per_tile_;
    }
    const Status st = moe_experts_cuda(p, gu, dn, inputs[0], w, ids, outputs[0], workspace, ws_bytes, stream);
    return st.ok() ? 0 : fail(st);
  } catch (const std::exception& e) {
    return fail(std::string("enqueue: ") + e.what());
  }
}

}  // namespace trt
}  // namespace dsfp4
