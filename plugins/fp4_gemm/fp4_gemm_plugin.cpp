#include "fp4_gemm_plugin.h"

#include <algorithm>
#include <string>

#include "dsfp4/fp4_gemm.h"
#include "dsfp4/nvfp4.h"

namespace dsfp4 {
namespace trt {

using nvinfer1::DataType;
using nvinfer1::PluginFieldType;

std::vector<FieldSpec> Fp4GemmPlugin::field_specs() {
  return {{"n", PluginFieldType::kINT32, 1},           {"k", PluginFieldType::kINT32, 1},
          {"weights_as_inputs", PluginFieldType::kINT32, 1}, {"qweight", PluginFieldType::kINT32, 0},
          {"qscale", PluginFieldType::kINT8, 0},        {"global_scale", PluginFieldType::kFLOAT32, 0},
          {"tactic", PluginFieldType::kINT32, 5}};
}

std::unique_ptr<Fp4GemmPlugin> Fp4GemmPlugin::create(FieldReader& f) {
  auto p = std::make_unique<Fp4GemmPlugin>();
  f.get("n", &p->n_);
  f.get("k", &p->k_);
  f.get("weights_as_inputs", &p->weights_as_inputs_, false);
  if (!f.ok()) return nullptr;
  if (p->n_ <= 0) f.fail("field 'n' = " + std::to_string(p->n_) + " must be positive");
  if (p->k_ <= 0 || p->k_ % 16 != 0) f.fail("field 'k' = " + std::to_string(p->k_) + " must be a positive multiple of 16");
  if (p->weights_as_inputs_ != 0 && p->weights_as_inputs_ != 1)
    f.fail("field 'weights_as_inputs' = " + std::to_string(p->weights_as_inputs_) + " must be 0 or 1");
  if (!f.ok()) return nullptr;
  p->words_ = static_cast<int64_t>(tiled_weight_bytes(p->n_, p->k_) / 4);
  p->scale_bytes_ = static_cast<int64_t>(tiled_scale_bytes(p->n_, p->k_));
  const int64_t tiles = (p->n_ + 15) / 16;
  if (p->weights_as_inputs_) {
    for (const char* name : {"qweight", "qscale", "global_scale"})
      if (f.has(name)) f.fail(std::string("field '") + name + "' is given but weights_as_inputs = 1");
  } else {
    std::vector<int32_t> qw;
    std::vector<int8_t> qs;
    std::vector<float> gs;
    f.get_array("qweight", &qw);
    f.get_array("qscale", &qs);
    f.get_array("global_scale", &gs);
    if (!f.ok()) return nullptr;
    const std::string shape = " for n = " + std::to_string(p->n_) + ", k = " + std::to_string(p->k_);
    if (static_cast<int64_t>(qw.size()) != p->words_)
      f.fail("field 'qweight' has length " + std::to_string(qw.size()) + ", expected " + std::to_string(p->words_) + shape);
    else if (static_cast<int64_t>(qs.size()) != p->scale_bytes_)
      f.fail("field 'qscale' has length " + std::to_string(qs.size()) + ", expected " +
             std::to_string(p->scale_bytes_) + shape);
    else if (gs.size() != 1 && static_cast<int64_t>(gs.size()) != tiles)
      f.fail("field 'global_scale' has length " + std::to_string(gs.size()) + ", expected 1 or " +
             std::to_string(tiles) + " (one per 16-row tile)" + shape);
    if (!f.ok()) return nullptr;
    p->scale_count_ = static_cast<int64_t>(gs.size());
    p->qweight_ = make_device_array(qw);
    p->qscale_ = make_device_array(qs);
    p->global_scale_ = make_device_array(gs);
  }
  if (f.has("tactic")) {
    f.get_array("tactic", &p->tactic_);
    if (!f.ok()) return nullptr;
    const auto& t = p->tactic_;
    if (t.size() != 5) {
      f.fail("field 'tactic' has length " + std::to_string(t.size()) + ", expected 5");
    } else if (t[0] < 0 || t[0] > 2) {
      f.fail("field 'tactic': path " + std::to_string(t[0]) + " must be 0 (auto), 1 (fused) or 2 (dequant)");
    } else if (t[0] == 1) {
      const bool tile_ok = t[1] == 8 || t[1] == 16 || t[1] == 32 || t[1] == 64;
      const bool wn_ok = t[2] == 1 || t[2] == 2 || t[2] == 4;
      const bool wk_ok = t[3] == 1 || t[3] == 2 || t[3] == 4 || t[3] == 8;
      if (!tile_ok || !wn_ok || !wk_ok || t[4] < 1 || t[4] > 64)
        f.fail("field 'tactic' = [path, tile_tokens, warps_n, warps_k, split_k] needs tile_tokens in {8, 16, 32, 64}, "
               "warps_n in {1, 2, 4}, warps_k in {1, 2, 4, 8}, split_k in [1, 64]");
    }
  }
  if (!f.ok()) return nullptr;
  return p;
}

void Fp4GemmPlugin::write_fields(FieldWriter& w) const {
  w.add("n", &n_);
  w.add("k", &k_);
  w.add("weights_as_inputs", &weights_as_inputs_);
  if (!weights_as_inputs_) {
    w.add("qweight", reinterpret_cast<const int32_t*>(qweight_->host().data()), static_cast<int32_t>(words_));
    w.add("qscale", reinterpret_cast<const int8_t*>(qscale_->host().data()), static_cast<int32_t>(scale_bytes_));
    w.add("global_scale", reinterpret_cast<const float*>(global_scale_->host().data()),
          static_cast<int32_t>(scale_count_));
  }
  if (!tactic_.empty()) w.add("tactic", tactic_.data(), 5);
}

int32_t Fp4GemmPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                          int32_t nbInputs) const noexcept {
  if (nbOutputs != 1 || nbInputs != nb_inputs())
    return fail("expects " + std::to_string(nb_inputs()) + " inputs and 1 output, got " + std::to_string(nbInputs) +
                " and " + std::to_string(nbOutputs));
  if (inputTypes[0] != DataType::kBF16)
    return fail(std::string("input 0 (x) must be BF16, got ") + data_type_name(inputTypes[0]));
  outputTypes[0] = DataType::kBF16;
  return 0;
}

int32_t Fp4GemmPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs, const nvinfer1::DimsExprs*,
                                       int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                       nvinfer1::IExprBuilder& eb) noexcept {
  if (nbInputs != nb_inputs() || nbOutputs != 1)
    return fail("expects " + std::to_string(nb_inputs()) + " inputs and 1 output, got " + std::to_string(nbInputs) +
                " and " + std::to_string(nbOutputs));
  const nvinfer1::DimsExprs& x = inputs[0];
  if (x.nbDims < 1) return fail("input 0 (x) must have at least one dimension");
  const nvinfer1::IDimensionExpr* kd = x.d[x.nbDims - 1];
  if (kd->isConstant() && kd->getConstantValue() != k_)
    return fail("input 0 (x) has K = " + std::to_string(kd->getConstantValue()) + ", field 'k' is " +
                std::to_string(k_));
  if (weights_as_inputs_) {
    const int64_t want[3] = {words_, scale_bytes_, -1};
    const char* names[3] = {"qweight", "qscale", "global_scale"};
    for (int i = 0; i < 3; ++i) {
      const nvinfer1::DimsExprs& d = inputs[1 + i];
      if (d.nbDims != 1) return fail("input " + std::to_string(1 + i) + " (" + names[i] + ") must be 1-D");
      if (!d.d[0]->isConstant()) continue;
      const int64_t v = d.d[0]->getConstantValue();
      const int64_t tiles = (n_ + 15) / 16;
      const bool good = i < 2 ? v == want[i] : (v == 1 || v == tiles);
      if (!good)
        return fail("input " + std::to_string(1 + i) + " (" + names[i] + ") has " + std::to_string(v) +
                    " elements, which does not match n = " + std::to_string(n_) + ", k = " + std::to_string(k_));
    }
  }
  outputs[0].nbDims = x.nbDims;
  for (int i = 0; i + 1 < x.nbDims; ++i) outputs[0].d[i] = x.d[i];
  outputs[0].d[x.nbDims - 1] = eb.constant(n_);
  return 0;
}

bool Fp4GemmPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut,
                                              int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (nbInputs != nb_inputs() || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  const nvinfer1::PluginTensorDesc& d = inOut[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  if (pos == 0 || pos == nbInputs) return d.type == DataType::kBF16;  // x, y
  if (pos == 1) return d.type == DataType::kINT32;                    // qweight
  if (pos == 2) return d.type == DataType::kINT8;                     // qscale (e4m3 bytes)
  return d.type == DataType::kFLOAT;                                  // global_scale
}

static Fp4GemmTactic to_tactic(const std::vector<int32_t>& t) {
  Fp4GemmTactic tac;
  if (t.size() == 5) {
    tac.path = static_cast<Fp4GemmPath>(t[0]);
    tac.tile_tokens = t[1];
    tac.warps_n = t[2];
    tac.warps_k = t[3];
    tac.split_k = t[4];
  }
  return tac;
}

size_t Fp4GemmPlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                       const nvinfer1::DynamicPluginTensorDesc*, int32_t) const noexcept {
  if (nbInputs < 1 || inputs[0].max.nbDims < 1) return 0;
  const int64_t max_m = volume(inputs[0].max, 0, inputs[0].max.nbDims - 1);
  const Fp4GemmTactic tac = to_tactic(tactic_);
  // The heuristic may pick split-K (which needs workspace) for any M up to the maximum.
  size_t need = 0;
  for (int64_t m = 1; m <= std::min<int64_t>(max_m, 2048); ++m)
    need = std::max(need, fp4_gemm_workspace_bytes(m, n_, k_, tac));
  if (max_m > 2048) need = std::max(need, fp4_gemm_workspace_bytes(max_m, n_, k_, tac));
  return need;
}

int32_t Fp4GemmPlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs,
                                     const nvinfer1::PluginTensorDesc*, int32_t nbOutputs) noexcept {
  if (nbInputs != nb_inputs() || nbOutputs != 1) return fail("wrong number of inputs or outputs");
  if (in[0].dims.nbDims < 1 || in[0].dims.d[in[0].dims.nbDims - 1] != k_)
    return fail("input 0 (x) has shape " + dims_string(in[0].dims) + ", its last dimension must be k = " +
                std::to_string(k_));
  if (!weights_as_inputs_) {  // upload now, outside any stream capture
    std::string err;
    if (!qweight_->device(&err) || !qscale_->device(&err) || !global_scale_->device(&err)) return fail(err);
  }
  return 0;
}

int32_t Fp4GemmPlugin::enqueue(const nvinfer1::PluginTensorDesc* inputDesc, const nvinfer1::PluginTensorDesc* outputDesc,
                               const void* const* inputs, void* const* outputs, void* workspace,
                               cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
      return fail("enqueue: null descriptor or pointer array");
    const nvinfer1::Dims& xd = inputDesc[0].dims;
    if (xd.nbDims < 1 || xd.d[xd.nbDims - 1] != k_)
      return fail("enqueue: input 0 (x) has shape " + dims_string(xd) + ", expected [..., " + std::to_string(k_) + "]");
    if (inputDesc[0].type != DataType::kBF16 || outputDesc[0].type != DataType::kBF16)
      return fail("enqueue: x and y must be BF16");
    const nvinfer1::Dims& yd = outputDesc[0].dims;
    const int64_t m = volume(xd, 0, xd.nbDims - 1);
    if (yd.nbDims != xd.nbDims || yd.d[yd.nbDims - 1] != n_ || volume(yd, 0, yd.nbDims - 1) != m)
      return fail("enqueue: output 0 (y) has shape " + dims_string(yd) + ", expected x's leading dimensions and " +
                  std::to_string(n_));
    if (m == 0) return 0;
    if (inputs[0] == nullptr || outputs[0] == nullptr) return fail("enqueue: x or y is null");

    Fp4Weight w;
    w.n = n_;
    w.k = k_;
    if (weights_as_inputs_) {
      const int64_t tiles = (n_ + 15) / 16;
      if (volume(inputDesc[1].dims) != words_ || volume(inputDesc[2].dims) != scale_bytes_)
        return fail("enqueue: inputs 1 (qweight) and 2 (qscale) must hold " + std::to_string(words_) + " words and " +
                    std::to_string(scale_bytes_) + " bytes");
      const int64_t gsn = volume(inputDesc[3].dims);
      if (gsn != 1 && gsn != tiles)
        return fail("enqueue: input 3 (global_scale) must hold 1 or " + std::to_string(tiles) + " values");
      if (!inputs[1] || !inputs[2] || !inputs[3]) return fail("enqueue: a weight input is null");
      w.qweight = static_cast<const uint32_t*>(inputs[1]);
      w.qscale = static_cast<const uint8_t*>(inputs[2]);
      w.global_scale = static_cast<const float*>(inputs[3]);
      w.global_scale_per_tile = gsn > 1;
    } else {
      std::string err;
      w.qweight = static_cast<const uint32_t*>(qweight_->device(&err));
      w.qscale = static_cast<const uint8_t*>(qscale_->device(&err));
      w.global_scale = static_cast<const float*>(global_scale_->device(&err));
      if (!w.qweight || !w.qscale || !w.global_scale) return fail("enqueue: " + err);
      w.global_scale_per_tile = scale_count_ > 1;
    }
    const Fp4GemmTactic tac = to_tactic(tactic_);
    const size_t need = fp4_gemm_workspace_bytes(m, n_, k_, tac);
    if (need > 0 && workspace == nullptr) return fail("enqueue: workspace is null");
    const Status st = fp4_gemm_cuda(w, inputs[0], k_, outputs[0], n_, m, tac, workspace, need, stream);
    return st.ok() ? 0 : fail(st);
  } catch (const std::exception& e) {
    return fail(std::string("enqueue: ") + e.what());
  }
}

}  // namespace trt
}  // namespace dsfp4
