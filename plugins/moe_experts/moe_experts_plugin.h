// Dsfp4MoeExperts: the routed expert FFN of one MoE layer over NVFP4 experts
// (moe_experts_cuda / moe_experts_units_cuda: moe_permute, moe_compact_groups,
// fp4_grouped_gemm, silu_mul, moe_combine). Weights as fields, as inputs, or from a store
// (ExpertSource) named by store_handle.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "dsfp4/moe_experts.h"
#include "plugin_common.h"

namespace dsfp4 {
namespace trt {

class MoeExpertsPlugin : public PluginBase<MoeExpertsPlugin> {
 public:
  static constexpr const char* kName = "Dsfp4MoeExperts";
  enum class Source { kFields, kInputs, kStore };

  static std::vector<FieldSpec> field_specs();
  static std::unique_ptr<MoeExpertsPlugin> create(FieldReader& fields);
  void write_fields(FieldWriter& w) const;

  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, const nvinfer1::DataType* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs, const nvinfer1::DimsExprs* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                          const nvinfer1::DynamicPluginTensorDesc* outputs, int32_t nbOutputs) const noexcept override;
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs, const nvinfer1::PluginTensorDesc* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* inputDesc, const nvinfer1::PluginTensorDesc* outputDesc,
                  const void* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;

 private:
  int32_t nb_inputs() const { return source_ == Source::kInputs ? 9 : 3; }
  MoeExpertsParams params(int64_t tokens) const { return {tokens, hidden_, inter_, experts_, top_k_}; }
  std::string check_io(const nvinfer1::PluginTensorDesc* in, const nvinfer1::PluginTensorDesc* out) const;

  int32_t experts_ = 0, hidden_ = 0, inter_ = 0, top_k_ = 0;
  Source source_ = Source::kFields;
  std::string source_name_ = "fields";
  int64_t store_handle_ = 0;
  int32_t layer_ = 0;
  // Sizes of one expert's parts: words of qweight, bytes of qscale, tiles (global scales).
  int64_t gu_words_ = 0, gu_bytes_ = 0, gu_tiles_ = 0, dn_words_ = 0, dn_bytes_ = 0, dn_tiles_ = 0;
  bool gu_per_tile_ = false, dn_per_tile_ = false;
  std::shared_ptr<DeviceArray> gu_qw_, gu_qs_, gu_gs_, dn_qw_, dn_qs_, dn_gs_;  // weights as fields
};

}  // namespace trt
}  // namespace dsfp4
