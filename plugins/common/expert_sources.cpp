#include "expert_sources.h"

#include <mutex>
#include <unordered_map>

namespace dsfp4 {
namespace trt {

namespace {
std::mutex g_mu;
std::unordered_map<int64_t, ExpertSource*>& sources() {
  static std::unordered_map<int64_t, ExpertSource*> m;
  return m;
}
}  // namespace

void set_expert_source(int64_t handle, ExpertSource* source) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (source == nullptr)
    sources().erase(handle);
  else
    sources()[handle] = source;
}

ExpertSource* find_expert_source(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = sources().find(handle);
  return it == sources().end() ? nullptr : it->second;
}

}  // namespace trt
}  // namespace dsfp4
