// Store handles → ExpertSource objects, for Dsfp4MoeExperts plugins created with
// weight_source = "store". The runtime that owns the store registers it through
// dsfp4_trt_set_expert_source (plugins/api/dsfp4_trt_plugins.h) before running the engine.
#pragma once

#include <cstdint>

#include "dsfp4/expert_source.h"

namespace dsfp4 {
namespace trt {

void set_expert_source(int64_t handle, ExpertSource* source);  // null removes
ExpertSource* find_expert_source(int64_t handle);

}  // namespace trt
}  // namespace dsfp4
