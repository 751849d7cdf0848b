// The one list of the library's plugin creators, and the library's exported entry points.
#include <dlfcn.h>

#include <NvInferRuntime.h>

#include "dsfp4_trt_plugins.h"
#include "expert_sources.h"
#include "fp4_gemm_plugin.h"
#include "moe_experts_plugin.h"
#include "moe_routing_plugin.h"
#include "plugin_common.h"

namespace dsfp4 {
namespace trt {
namespace {

nvinfer1::IPluginCreatorInterface* const* creators(int32_t* count) {
  static CreatorBase<Fp4GemmPlugin> fp4_gemm;
  static CreatorBase<MoeRoutingPlugin> moe_routing;
  static CreatorBase<MoeExpertsPlugin> moe_experts;
  static nvinfer1::IPluginCreatorInterface* const list[] = {&fp4_gemm, &moe_routing, &moe_experts};
  *count = static_cast<int32_t>(sizeof(list) / sizeof(list[0]));
  return list;
}

}  // namespace
}  // namespace trt
}  // namespace dsfp4

#define DSFP4_EXPORT extern "C" __attribute__((visibility("default")))

// Looked up by IPluginRegistry::loadLibrary and trtexec --dynamicPlugins.
DSFP4_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  return dsfp4::trt::creators(&nbCreators);
}

DSFP4_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { dsfp4::trt::set_logger_finder(finder); }

DSFP4_EXPORT int32_t dsfp4_trt_register_plugins(void* plugin_registry) {
  auto* registry = static_cast<nvinfer1::IPluginRegistry*>(plugin_registry);
  if (registry == nullptr) {
    using GetRegistry = nvinfer1::IPluginRegistry* (*)();
    auto get = reinterpret_cast<GetRegistry>(dlsym(RTLD_DEFAULT, "getPluginRegistry"));
    // A TensorRT loaded privately (e.g. by Python's tensorrt module) is found by name.
    for (const char* lib : {"libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer_lean.so.11", "libnvinfer_lean.so.10"}) {
      if (get != nullptr) break;
      if (void* h = dlopen(lib, RTLD_NOW | RTLD_NOLOAD)) get = reinterpret_cast<GetRegistry>(dlsym(h, "getPluginRegistry"));
    }
    if (get == nullptr) {
      dsfp4::trt::log_error("dsfp4_trt_register_plugins: no registry given and no TensorRT library is loaded");
      return -1;
    }
    registry = get();
  }
  if (registry == nullptr) {
    dsfp4::trt::log_error("dsfp4_trt_register_plugins: TensorRT returned no plugin registry");
    return -1;
  }
  int32_t n = 0, done = 0;
  nvinfer1::IPluginCreatorInterface* const* list = dsfp4::trt::creators(&n);
  for (int32_t i = 0; i < n; ++i)
    if (registry->registerCreator(*list[i], dsfp4::trt::kPluginNamespace)) ++done;
  return done;
}

DSFP4_EXPORT int32_t dsfp4_trt_set_expert_source(int64_t store_handle, void* expert_source) {
  if (store_handle == 0) {
    dsfp4::trt::log_error("dsfp4_trt_set_expert_source: store_handle must be non-zero");
    return -1;
  }
  dsfp4::trt::set_expert_source(store_handle, static_cast<dsfp4::ExpertSource*>(expert_source));
  return 0;
}

DSFP4_EXPORT const char* dsfp4_trt_last_error(void) { return dsfp4::trt::last_error().c_str(); }
