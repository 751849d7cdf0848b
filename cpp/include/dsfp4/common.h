// Shared types of the dsfp4 public C++ API: status codes, dtypes, stream handle.
//
// The public API takes raw pointers, explicit shapes and dtypes, and a CUDA stream
// given as an opaque handle, so that it is usable from torch, TensorRT plugins and
// plain C++ alike. No torch or TensorRT type appears in any header under dsfp4/.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

namespace dsfp4 {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // bad shape, dtype, pointer or alignment
  kUnsupported = 2,      // valid request this build or device cannot serve
  kCudaError = 3,        // a CUDA runtime call or kernel launch failed
  kOutOfMemory = 4,
  kInternal = 5,
};

// Result of every fallible API call. The message names the offending argument.
class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return Status(); }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string msg) {
  return Status(StatusCode::kInvalidArgument, std::move(msg));
}
inline Status Unsupported(std::string msg) { return Status(StatusCode::kUnsupported, std::move(msg)); }

enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat8E4M3 = 3,  // float8_e4m3fn: no infinities, max 448
  kUInt8 = 4,
  kInt32 = 5,
};

const char* dtype_name(DType dtype);
int dtype_size(DType dtype);

// cudaStream_t without including CUDA headers; nullptr is the legacy default stream.
using Stream = void*;

// True when this build contains CUDA kernels (the library was compiled with nvcc).
bool built_with_cuda();

}  // namespace dsfp4

#define DSFP4_RETURN_IF_ERROR(expr)        \
  do {                                     \
    ::dsfp4::Status _st = (expr);          \
    if (!_st.ok()) return _st;             \
  } while (0)
