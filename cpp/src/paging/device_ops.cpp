#include "paging/device_ops.h"

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(DSFP4_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace dsfp4 {
namespace paging {
namespace dev {

#if defined(DSFP4_WITH_CUDA)
namespace {
Status cuda_error(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  cudaGetLastError();  // clear the sticky-free error so later calls are not confused
  const StatusCode code = e == cudaErrorMemoryAllocation ? StatusCode::kOutOfMemory : StatusCode::kCudaError;
  return Status(code, std::string(what) + ": " + cudaGetErrorString(e));
}
}  // namespace

bool device_present() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

Status set_device(int device) { return cuda_error(cudaSetDevice(device), "cudaSetDevice"); }
#else
bool device_present() { return false; }
Status set_device(int) { return Status::Ok(); }
#endif

Status host_alloc(size_t bytes, bool pinned, uint8_t** host, uint64_t* device_address) {
  *host = nullptr;
  *device_address = 0;
  if (bytes == 0) bytes = 1;
#if defined(DSFP4_WITH_CUDA)
  if (pinned) {
    void* p = nullptr;
    DSFP4_RETURN_IF_ERROR(cuda_error(cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable),
                                     ("cudaHostAlloc of " + std::to_string(bytes) + " bytes").c_str()));
    void* d = nullptr;
    Status st = cuda_error(cudaHostGetDevicePointer(&d, p, 0), "cudaHostGetDevicePointer");
    if (!st.ok()) {
      cudaFreeHost(p);
      return st;
    }
    *host = static_cast<uint8_t*>(p);
    *device_address = reinterpret_cast<uint64_t>(d);
    return Status::Ok();
  }
#else
  if (pinned) return Unsupported("pinned host memory needs a CUDA build");
#endif
  const size_t rounded = (bytes + 4095) / 4096 * 4096;
  void* p = std::aligned_alloc(4096, rounded);
  if (p == nullptr)
    return Status(StatusCode::kOutOfMemory, "host allocation of " + std::to_string(bytes) + " bytes failed");
  *host = static_cast<uint8_t*>(p);
  return Status::Ok();
}

void host_free(uint8_t* host, bool pinned) {
  if (host == nullptr) return;
#if defined(DSFP4_WITH_CUDA)
  if (pinned) {
    cudaFreeHost(host);
    return;
  }
#endif
  (void)pinned;
  std::free(host);
}

Status copy_async(void* dst, const void* src, size_t bytes, Stream stream, bool on_device) {
  if (!on_device) {
    std::memcpy(dst, src, bytes);
    return Status::Ok();
  }
#if defined(DSFP4_WITH_CUDA)
  return cuda_error(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(stream)),
                    "cudaMemcpyAsync");
#else
  (void)stream;
  return Unsupported("paging: device copies need a CUDA build");
#endif
}

Status event_create(void** event, bool on_device) {
  *event = nullptr;
  if (!on_device) return Status::Ok();
#if defined(DSFP4_WITH_CUDA)
  cudaEvent_t e = nullptr;
  DSFP4_RETURN_IF_ERROR(cuda_error(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate"));
  *event = e;
  return Status::Ok();
#else
  return Unsupported("paging: events need a CUDA build");
#endif
}

void event_destroy(void* event, bool on_device) {
#if defined(DSFP4_WITH_CUDA)
  if (on_device && event != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(event));
#else
  (void)event;
  (void)on_device;
#endif
}

Status event_record(void* event, Stream stream, bool on_device) {
  if (!on_device) return Status::Ok();
#if defined(DSFP4_WITH_CUDA)
  return cuda_error(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)),
                    "cudaEventRecord");
#else
  (void)event;
  (void)stream;
  return Status::Ok();
#endif
}

Status stream_wait(Stream stream, void* event, bool on_device) {
  if (!on_device) return Status::Ok();
#if defined(DSFP4_WITH_CUDA)
  return cuda_error(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0),
                    "cudaStreamWaitEvent");
#else
  (void)stream;
  (void)event;
  return Status::Ok();
#endif
}

Status event_sync(void* event, bool on_device) {
  if (!on_device) return Status::Ok();
#if defined(DSFP4_WITH_CUDA)
  return cuda_error(cudaEventSynchronize(static_cast<cudaEvent_t>(event)), "cudaEventSynchronize");
#else
  (void)event;
  return Status::Ok();
#endif
}

Status stream_create(Stream* stream, bool on_device) {
  *stream = nullptr;
  if (!on_device) return Status::Ok();
#if defined(DSFP4_WITH_CUDA)
  cudaStream_t s = nullptr;
  DSFP4_RETURN_IF_ERROR(cuda_error(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
  *stream = s;
  return Status::Ok();
#else
  return Unsupported("paging: streams need a CUDA build");
#endif
}

void stream_destroy(Stream stream, bool on_device) {
#if defined(DSFP4_WITH_CUDA)
  if (on_device && stream != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
#else
  (void)stream;
  (void)on_device;
#endif
}

Status stream_sync(Stream stream, bool on_device) {
  if (!on_device) return Status::Ok();
#if defined(DSFP4_WITH_CUDA)
  return cuda_error(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
#else
  (void)stream;
  return Status::Ok();
#endif
}

}  // namespace dev
}  // namespace paging
}  // namespace dsfp4
