#include "moe_routing_plugin.h"

#include <string>

namespace dsfp4 {
namespace trt {

using nvinfer1::DataType;
using nvinfer1::PluginFieldType;

std::vector<FieldSpec> MoeRoutingPlugin::field_specs() {
  return {{"num_experts", PluginFieldType::kINT32, 1},
          {"n_group", PluginFieldType::kINT32, 1},
          {"topk_group", PluginFieldType::kINT32, 1},
          {"top_k", PluginFieldType::kINT32, 1},
          {"routed_scaling_factor", PluginFieldType::kFLOAT32, 1},
          {"norm_topk_prob", PluginFieldType::kINT32, 1}};
}

std::unique_ptr<MoeRoutingPlugin> MoeRoutingPlugin::create(FieldReader& f) {
  auto p = std::make_unique<MoeRoutingPlugin>();
  f.get("num_experts", &p->experts_);
  f.get("n_group", &p->n_group_);
  f.get("topk_group", &p->topk_group_);
  f.get("top_k", &p->top_k_);
  f.get("routed_scaling_factor", &p->routed_scaling_factor_);
  f.get("norm_topk_prob", &p->norm_topk_prob_, false);
  if (!f.ok()) return nullptr;
  if (p->norm_topk_prob_ != 0 && p->norm_topk_prob_ != 1)
    f.fail("field 'norm_topk_prob' = " + std::to_string(p->norm_topk_prob_) + " must be 0 or 1");
  const int32_t e = p->experts_, g = p->n_group_, tg = p->topk_group_, k = p->top_k_;
  if (e < 1 || e > 1024)
    f.fail("field 'num_experts' = " + std::to_string(e) + " must be in [1, 1024]");
  else if (g < 1 || g > 32 || e % g != 0 || e / g < 2)
    f.fail("field 'n_group' = " + std::to_string(g) + " must be in [1, 32], divide num_experts = " + std::to_string(e) +
           " and leave at least 2 experts per group");
  else if (tg < 1 || tg > g)
    f.fail("field 'topk_group' = " + std::to_string(tg) + " must be in [1, n_group = " + std::to_string(g) + "]");
  else if (k < 1 || k > 32 || k > tg * (e / g))
    f.fail("field 'top_k' = " + std::to_string(k) + " must be in [1, min(32, " + std::to_string(tg * (e / g)) +
           ")] (the experts of the kept groups)");
  if (!f.ok()) return nullptr;
  MoeRouteParams rp;
  rp.experts = p->experts_;
  rp.n_group = p->n_group_;
  rp.topk_group = p->topk_group_;
  rp.top_k = p->top_k_;
  const Status st = moe_route_check(rp);  // its messages name n_group, topk_group, top_k, experts
  if (!st.ok()) f.fail("fields: " + st.message());
  if (!f.ok()) return nullptr;
  return p;
}

void MoeRoutingPlugin::write_fields(FieldWriter& w) const {
  w.add("num_experts", &experts_);
  w.add("n_group", &n_group_);
  w.add("topk_group", &topk_group_);
  w.add("top_k", &top_k_);
  w.add("routed_scaling_factor", &routed_scaling_factor_);
  w.add("norm_topk_prob", &norm_topk_prob_);
}

int32_t MoeRoutingPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                             int32_t nbInputs) const noexcept {
  if (nbInputs != 2 || nbOutputs != 2) return fail("expects 2 inputs (scores, bias) and 2 outputs (weights, ids)");
  if (inputTypes[0] != DataType::kFLOAT && inputTypes[0] != DataType::kBF16)
    return fail(std::string("input 0 (scores) must be FLOAT or BF16, got ") + data_type_name(inputTypes[0]));
  if (inputTypes[1] != DataType::kFLOAT)
    return fail(std::string("input 1 (bias) must be FLOAT, got ") + data_type_name(inputTypes[1]));
  outputTypes[0] = DataType::kFLOAT;
  outputTypes[1] = DataType::kINT32;
  return 0;
}

int32_t MoeRoutingPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                                          const nvinfer1::DimsExprs*, int32_t, nvinfer1::DimsExprs* outputs,
                                          int32_t nbOutputs, nvinfer1::IExprBuilder& eb) noexcept {
  if (nbInputs != 2 || nbOutputs != 2) return fail("expects 2 inputs (scores, bias) and 2 outputs (weights, ids)");
  if (inputs[0].nbDims != 2) return fail("input 0 (scores) must be 2-D [tokens, experts]");
  if (inputs[1].nbDims != 1) return fail("input 1 (bias) must be 1-D [experts]");
  const nvinfer1::IDimensionExpr* e0 = inputs[0].d[1];
  const nvinfer1::IDimensionExpr* e1 = inputs[1].d[0];
  if (e0->isConstant() && e0->getConstantValue() != experts_)
    return fail("input 0 (scores) has " + std::to_string(e0->getConstantValue()) + " experts, field 'num_experts' is " +
                std::to_string(experts_));
  if (e1->isConstant() && e1->getConstantValue() != experts_)
    return fail("input 1 (bias) has " + std::to_string(e1->getConstantValue()) + " entries, field 'num_experts' is " +
                std::to_string(experts_));
  for (int o = 0; o < 2; ++o) {
    outputs[o].nbDims = 2;
    outputs[o].d[0] = inputs[0].d[0];
    outputs[o].d[1] = eb.constant(top_k_);
  }
  return 0;
}

bool MoeRoutingPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut,
                                                 int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (nbInputs != 2 || nbOutputs != 2 || pos < 0 || pos >= 4) return false;
  const nvinfer1::PluginTensorDesc& d = inOut[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  switch (pos) {
    case 0: return d.type == DataType::kFLOAT || d.type == DataType::kBF16;  // scores
    case 1: return d.type == DataType::kFLOAT;                               // bias
    case 2: return d.type == DataType::kFLOAT;                               // weights
    default: return d.type == DataType::kINT32;                              // ids
  }
}

int32_t MoeRoutingPlugin::enqueue(const nvinfer1::PluginTensorDesc* inputDesc,
                                  const nvinfer1::PluginTensorDesc* outputDesc, const void* const* inputs,
                                  void* const* outputs, void*, cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
      return fail("enqueue: null descriptor or pointer array");
    const nvinfer1::Dims& sd = inputDesc[0].dims;
    if (sd.nbDims != 2 || sd.d[1] != experts_)
      return fail("enqueue: input 0 (scores) has shape " + dims_string(sd) + ", expected [tokens, " +
                  std::to_string(experts_) + "]");
    if (volume(inputDesc[1].dims) != experts_) return fail("enqueue: input 1 (bias) must hold num_experts values");
    const int64_t t = sd.d[0];
    for (int o = 0; o < 2; ++o) {
      const nvinfer1::Dims& od = outputDesc[o].dims;
      if (od.nbDims != 2 || od.d[0] != t || od.d[1] != top_k_)
        return fail("enqueue: output " + std::to_string(o) + " has shape " + dims_string(od) + ", expected [" +
                    std::to_string(t) + ", " + std::to_string(top_k_) + "]");
    }
    if (inputDesc[0].type != DataType::kFLOAT && inputDesc[0].type != DataType::kBF16)
      return fail("enqueue: input 0 (scores) must be FLOAT or BF16");
    if (t == 0) return 0;
    if (!inputs[0] || !inputs[1] || !outputs[0] || !outputs[1]) return fail("enqueue: null tensor pointer");
    MoeRouteParams rp;
    rp.tokens = t;
    rp.experts = experts_;
    rp.n_group = n_group_;
    rp.topk_group = topk_group_;
    rp.top_k = top_k_;
    rp.routed_scaling_factor = routed_scaling_factor_;
    rp.norm_topk_prob = norm_topk_prob_ != 0;
    const DType dt = inputDesc[0].type == DataType::kBF16 ? DType::kBFloat16 : DType::kFloat32;
    const Status st = moe_route_cuda(inputs[0], dt, static_cast<const float*>(inputs[1]), rp,
                                     static_cast<float*>(outputs[0]), static_cast<int32_t*>(outputs[1]), stream);
    return st.ok() ? 0 : fail(st);
  } catch (const std::exception& e) {
    return fail(std::string("enqueue: ") + e.what());
  }
}

}  // namespace trt
}  // namespace dsfp4
