/* C entry points of libdsfp4_trt_plugins.so (besides getCreators and setLoggerFinder, which
 * TensorRT's IPluginRegistry::loadLibrary and trtexec --dynamicPlugins look up). Plain C so
 * that ctypes and dlsym can call them. */
#ifndef DSFP4_TRT_PLUGINS_H
#define DSFP4_TRT_PLUGINS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Registers every dsfp4 plugin creator (namespace "dsfp4", version "1") with plugin_registry,
 * an nvinfer1::IPluginRegistry*; when it is null, with the registry of the TensorRT library
 * already loaded in the process (its getPluginRegistry()). Returns the number of creators
 * registered, or -1 (dsfp4_trt_last_error() says why). */
int32_t dsfp4_trt_register_plugins(void* plugin_registry);

/* Connects store_handle (the Dsfp4MoeExperts field) to expert_source, a dsfp4::ExpertSource*
 * owned by the caller, for the plugins of this library; a null source removes the handle.
 * Returns 0, or -1 when the handle is 0. */
int32_t dsfp4_trt_set_expert_source(int64_t store_handle, void* expert_source);

/* The last error message the plugins of this library logged on the calling thread ("" when
 * none). */
const char* dsfp4_trt_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* DSFP4_TRT_PLUGINS_H */
