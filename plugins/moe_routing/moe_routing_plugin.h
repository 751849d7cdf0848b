// Dsfp4MoeRouting: DeepSeek noaux_tc routing (moe_route_cuda, as torch.ops.dsfp4.moe_route).
#pragma once

#include <memory>
#include <vector>

#include "dsfp4/moe.h"
#include "plugin_common.h"

namespace dsfp4 {
namespace trt {

class MoeRoutingPlugin : public PluginBase<MoeRoutingPlugin> {
 public:
  static constexpr const char* kName = "Dsfp4MoeRouting";
  static std::vector<FieldSpec> field_specs();
  static std::unique_ptr<MoeRoutingPlugin> create(FieldReader& fields);
  void write_fields(FieldWriter& w) const;

  int32_t getNbOutputs() const noexcept override { return 2; }
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, const nvinfer1::DataType* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs, const nvinfer1::DimsExprs* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* inputDesc, const nvinfer1::PluginTensorDesc* outputDesc,
                  const void* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;

 private:
  int32_t experts_ = 0, n_group_ = 1, topk_group_ = 1, top_k_ = 0;
  float routed_scaling_factor_ = 1.0f;
  int32_t norm_topk_prob_ = 1;
};

}  // namespace trt
}  // namespace dsfp4
