// The current device's SM count and compute capability, read once per device (the GEMMs'
// tactic heuristics ask on every call).
#pragma once

#include <cuda_runtime.h>

#include <mutex>

namespace dsfp4 {
namespace kernels {

struct DeviceInfo {
  int sm_count = 132;
  int cc_major = 9;
  int cc_minor = 0;
};

inline DeviceInfo device_info() {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool filled[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return DeviceInfo{};
  std::lock_guard<std::mutex> lock(mu);
  if (!filled[dev]) {
    DeviceInfo d;
    cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, dev);
    cache[dev] = d;
    filled[dev] = true;
  }
  return cache[dev];
}

}  // namespace kernels
}  // namespace dsfp4
