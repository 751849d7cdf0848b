// Dsfp4Fp4Gemm: y[..., N] = x[..., K] · dequant(W)ᵀ, x and y bf16, W NVFP4 in the tiled layout
// (fields or inputs). Calls fp4_gemm_cuda, as torch.ops.dsfp4.fp4_gemm does.
#pragma once

#include <memory>
#include <vector>

#include "plugin_common.h"

namespace dsfp4 {
namespace trt {

class Fp4GemmPlugin : public PluginBase<Fp4GemmPlugin> {
 public:
  static constexpr const char* kName = "Dsfp4Fp4Gemm";
  static std::vector<FieldSpec> field_specs();
  static std::unique_ptr<Fp4GemmPlugin> create(FieldReader& fields);
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
  int32_t nb_inputs() const { return weights_as_inputs_ ? 4 : 1; }

  int32_t n_ = 0, k_ = 0;
  int32_t weights_as_inputs_ = 0;
  std::vector<int32_t> tactic_;  // empty: the shape heuristic
  int64_t words_ = 0, scale_bytes_ = 0, scale_count_ = 0;
  std::shared_ptr<DeviceArray> qweight_, qscale_, global_scale_;  // weights as fields
};

}  // namespace trt
}  // namespace dsfp4
