#include "paging/device_ops.h"

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

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

namespace {
// CPU mode: events and (optionally) asynchronous streams simulated on the host.
struct SimEvent {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0, completed = 0;
  void complete(uint64_t gen) {
    // notified under the lock: a waiter that sees `completed` may destroy the event at once
    // (stream_sync's lives on its stack)
    std::lock_guard<std::mutex> lk(mu);
    if (gen > completed) completed = gen;
    cv.notify_all();
  }
  uint64_t record() {
    std::lock_guard<std::mutex> lk(mu);
    return ++recorded;
  }
  uint64_t latest() {
    std::lock_guard<std::mutex> lk(mu);
    return recorded;
  }
  void wait(uint64_t gen) {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return completed >= gen; });
  }
  bool done(uint64_t gen) {
    std::lock_guard<std::mutex> lk(mu);
    return completed >= gen;
  }
};

struct SimStream {
  explicit SimStream(int delay) : delay_us(delay) { worker = std::thread([this] { loop(); }); }
  ~SimStream() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    cv.notify_all();
    worker.join();
  }
  void push(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lk(mu);
      q.push_back(std::move(fn));
    }
    cv.notify_all();
  }
  void loop() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return stop || !q.empty(); });
        if (q.empty()) return;
        fn = std::move(q.front());
        q.pop_front();
      }
      fn();
    }
  }
  int delay_us;
  std::thread worker;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> q;
  bool stop = false;
};

SimStream* sim(Stream s) { return static_cast<SimStream*>(s); }
SimEvent* sev(void* e) { return static_cast<SimEvent*>(e); }

// A copy in CPU mode. Ready words and table rows (small, word-aligned) are stored word by word
// with release, as their waiters acquire-load them: what was copied before them is then visible.
void host_copy(void* dst, const void* src, size_t bytes) {
  const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (bytes <= (64u << 10) && bytes % 8 == 0 && d % 8 == 0 && s % 8 == 0) {
    for (size_t i = 0; i < bytes / 8; ++i)
      __atomic_store_n(static_cast<uint64_t*>(dst) + i, static_cast<const uint64_t*>(src)[i], __ATOMIC_RELEASE);
  } else if (bytes <= (64u << 10) && bytes % 4 == 0 && d % 4 == 0 && s % 4 == 0) {
    for (size_t i = 0; i < bytes / 4; ++i)
      __atomic_store_n(static_cast<uint32_t*>(dst) + i, static_cast<const uint32_t*>(src)[i], __ATOMIC_RELEASE);
  } else {
    std::memcpy(dst, src, bytes);
  }
}
}  // namespace

Status copy_async(void* dst, const void* src, size_t bytes, Stream stream, bool on_device) {
  if (!on_device) {
    if (stream != nullptr) {
      const int delay = sim(stream)->delay_us;
      sim(stream)->push([dst, src, bytes, delay] {
        std::this_thread::sleep_for(std::chrono::microseconds(delay));
        host_copy(dst, src, bytes);
      });
      return Status::Ok();
    }
    host_copy(dst, src, bytes);
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
  if (!on_device) {
    *event = new SimEvent();
    return Status::Ok();
  }
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
  if (event == nullptr) return;
  if (!on_device) {
    delete sev(event);
    return;
  }
#if defined(DSFP4_WITH_CUDA)
  cudaEventDestroy(static_cast<cudaEvent_t>(event));
#endif
}

Status event_record(void* event, Stream stream, bool on_device) {
  if (!on_device) {
    if (event == nullptr) return Status::Ok();
    SimEvent* e = sev(event);
    const uint64_t gen = e->record();
    if (stream == nullptr)
      e->complete(gen);
    else
      sim(stream)->push([e, gen] { e->complete(gen); });
    return Status::Ok();
  }
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
  if (!on_device) {
    if (event == nullptr) return Status::Ok();
    SimEvent* e = sev(event);
    const uint64_t gen = e->latest();
    if (stream == nullptr)
      e->wait(gen);
    else
      sim(stream)->push([e, gen] { e->wait(gen); });
    return Status::Ok();
  }
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
  if (!on_device) {
    if (event != nullptr) sev(event)->wait(sev(event)->latest());
    return Status::Ok();
  }
#if defined(DSFP4_WITH_CUDA)
  return cuda_error(cudaEventSynchronize(static_cast<cudaEvent_t>(event)), "cudaEventSynchronize");
#else
  (void)event;
  return Status::Ok();
#endif
}

bool event_done(void* event, bool on_device) {
  if (event == nullptr) return true;
  if (!on_device) return sev(event)->done(sev(event)->latest());
#if defined(DSFP4_WITH_CUDA)
  const cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(event));
  if (e == cudaErrorNotReady) return false;
  if (e != cudaSuccess) cudaGetLastError();
  return true;
#else
  return true;
#endif
}

Status stream_create(Stream* stream, bool on_device, int sim_delay_us) {
  *stream = nullptr;
  if (!on_device) {
    if (sim_delay_us > 0) *stream = new SimStream(sim_delay_us);
    return Status::Ok();
  }
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
  if (stream == nullptr) return;
  if (!on_device) {
    delete sim(stream);
    return;
  }
#if defined(DSFP4_WITH_CUDA)
  cudaStreamDestroy(static_cast<cudaStream_t>(stream));
#endif
}

Status stream_sync(Stream stream, bool on_device) {
  if (!on_device) {
    if (stream == nullptr) return Status::Ok();
    SimEvent e;
    const uint64_t gen = e.record();
    sim(stream)->push([&e, gen] { e.complete(gen); });
    e.wait(gen);
    return Status::Ok();
  }
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
