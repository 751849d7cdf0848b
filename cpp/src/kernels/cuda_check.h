// CUDA error → Status conversion for the kernel runners. Internal header.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "dsfp4/common.h"

namespace dsfp4 {

inline Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  const StatusCode code = err == cudaErrorMemoryAllocation ? StatusCode::kOutOfMemory : StatusCode::kCudaError;
  return Status(code, std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

}  // namespace dsfp4
