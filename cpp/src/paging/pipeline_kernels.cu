// publish_route on the GPU: one block bumps the layer's epoch and the publish count, writes the
// ids into the mailbox entry in mapped host memory, then (after a system-wide fence) its sequence
// number, which the store's thread polls.
#include <cuda_runtime.h>

#include <string>

#include "kernels/unit_wait.h"
#include "paging/pipeline.h"

namespace dsfp4 {
namespace paging {

namespace {
__global__ void publish_kernel(PipelineView v, int layer, int next_layer, const int32_t* __restrict__ ids,
                               int n_ids, const int32_t* __restrict__ pred, int n_pred) {
  __shared__ uint32_t seq, epoch;
  if (threadIdx.x == 0) {
    // ready words start at 0: after the wrap, epoch 0 would match the words never written
    epoch = *v.epoch(layer) + 1;
    if (epoch == 0) epoch = 1;
    *v.epoch(layer) = epoch;  // the layer's GEMMs, later on this stream, wait for this epoch
    seq = *v.publish_count() + 1;
    *v.publish_count() = seq;
  }
  __syncthreads();
  auto* e = reinterpret_cast<MailboxEntry*>(v.mailbox + static_cast<uint64_t>((seq - 1) % v.ring) * v.entry_bytes);
  int32_t* out = e->ids();
  for (int i = threadIdx.x; i < n_ids; i += blockDim.x) out[i] = ids[i];
  int32_t* pout = e->pred(v.max_ids);
  for (int i = threadIdx.x; i < n_pred; i += blockDim.x) pout[i] = pred[i];
  if (threadIdx.x == 0) {
    e->layer = static_cast<uint32_t>(layer);
    e->next_layer = static_cast<uint32_t>(next_layer);
    e->epoch = epoch;
    e->n_ids = static_cast<uint32_t>(n_ids);
    e->n_pred = static_cast<uint32_t>(n_pred);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    *reinterpret_cast<volatile uint32_t*>(&e->seq) = seq;
  }
}
// One block per expert: rows of an expert on the CPU lane come from the lane's mapped y once
// its call is done (and succeeded); every other expert's rows are left as the GEMM wrote them.
__global__ void cpu_join_kernel(CpuLaneJoin j) {
  const int e = blockIdx.x;
  const int lo = j.row_offsets[e], hi = j.row_offsets[e + 1];
  if (hi <= lo || hi > j.y_cpu_rows) return;  // no rows, or more than the CPU lane ever computes
  __shared__ int go;
  if (threadIdx.x == 0) {
    go = 0;
    if (*reinterpret_cast<const volatile uint64_t*>(j.table + e) == kCpuLaneAddress) {
      const uint32_t want = *reinterpret_cast<const volatile uint32_t*>(j.epoch);
      go = kernels::wait_word(j.done, want, j.timeout_ns, j.wait_failed) &&
           *reinterpret_cast<const volatile uint32_t*>(j.ok) == want;
    }
  }
  __syncthreads();
  if (!go) return;
  const int64_t n16 = static_cast<int64_t>(hi - lo) * j.hidden / 8;  // 16-byte pieces
  const auto* src = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(j.y_cpu) +
                                                  static_cast<int64_t>(lo) * j.hidden);
  auto* dst = reinterpret_cast<uint4*>(static_cast<uint16_t*>(j.y_perm) + static_cast<int64_t>(lo) * j.hidden);
  for (int64_t i = threadIdx.x; i < n16; i += blockDim.x) {
    dst[i] = __ldcv(src + i);  // host memory the CPU just wrote: not through a cache
  }
}
// The probe: a wait on `word` (as the expert GEMMs wait on ready words), then a kernel that is
// stream-ordered after it, so the compute stream has dependent work queued behind the waiter.
__global__ void probe_wait_kernel(const uint32_t* word, uint64_t timeout_ns, uint32_t* result) {
  *reinterpret_cast<volatile uint32_t*>(result) = kernels::wait_word(word, 1u, timeout_ns, nullptr) ? 1u : 2u;
}
__global__ void probe_after_kernel(const uint32_t* result, uint32_t* out) { *out = *result; }
}  // namespace

Status probe_copy_overtakes_cuda(Stream compute, Stream copy, uint64_t timeout_ns, bool* ok) {
  *ok = false;
  const auto cs = static_cast<cudaStream_t>(compute), xs = static_cast<cudaStream_t>(copy);
  uint32_t* d = nullptr;  // [0] the word, [1] the waiter's result, [2] the dependent kernel's copy
  uint32_t* h = nullptr;  // pinned: [0] the value the copy writes, [1] the result read back
  auto fail = [&](cudaError_t e, const char* what) {
    cudaFree(d);
    cudaFreeHost(h);
    return Status(StatusCode::kCudaError, std::string("copy stream probe: ") + what + ": " + cudaGetErrorString(e));
  };
  cudaError_t e = cudaMalloc(&d, 16);
  if (e != cudaSuccess) return fail(e, "cudaMalloc");
  e = cudaMallocHost(&h, 16);
  if (e != cudaSuccess) return fail(e, "cudaMallocHost");
  h[0] = 1u;
  h[1] = 0u;
  e = cudaMemsetAsync(d, 0, 16, cs);
  if (e != cudaSuccess) return fail(e, "cudaMemsetAsync");
  // the copy must land after the memset: the copy stream waits for it (not for the kernels)
  cudaEvent_t zeroed = nullptr;
  e = cudaEventCreateWithFlags(&zeroed, cudaEventDisableTiming);
  if (e != cudaSuccess) return fail(e, "cudaEventCreate");
  e = cudaEventRecord(zeroed, cs);
  if (e == cudaSuccess) e = cudaStreamWaitEvent(xs, zeroed, 0);
  cudaEventDestroy(zeroed);  // released once the wait is done
  if (e != cudaSuccess) return fail(e, "cudaStreamWaitEvent");
  probe_wait_kernel<<<1, 1, 0, cs>>>(d, timeout_ns, d + 1);
  probe_after_kernel<<<1, 1, 0, cs>>>(d + 1, d + 2);
  e = cudaGetLastError();
  if (e != cudaSuccess) return fail(e, "launch");
  // issued after the compute stream's queued work, as the store's thread issues expert copies
  e = cudaMemcpyAsync(d, h, 4, cudaMemcpyHostToDevice, xs);
  if (e != cudaSuccess) return fail(e, "cudaMemcpyAsync");
  e = cudaMemcpyAsync(h + 1, d + 2, 4, cudaMemcpyDeviceToHost, cs);
  if (e != cudaSuccess) return fail(e, "cudaMemcpyAsync");
  e = cudaStreamSynchronize(cs);
  if (e == cudaSuccess) e = cudaStreamSynchronize(xs);
  if (e != cudaSuccess) return fail(e, "cudaStreamSynchronize");
  *ok = h[1] == 1u;
  cudaFree(d);
  cudaFreeHost(h);
  return Status::Ok();
}

Status cpu_lane_join_cuda(const CpuLaneJoin& j, Stream stream) {
  if (reinterpret_cast<uintptr_t>(j.y_perm) % 16 != 0 || reinterpret_cast<uintptr_t>(j.y_cpu) % 16 != 0)
    return InvalidArgument("cpu_lane_join: y_perm and the lane's y must be 16-byte aligned");
  cpu_join_kernel<<<j.experts, 128, 0, static_cast<cudaStream_t>(stream)>>>(j);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return Status(StatusCode::kCudaError, std::string("cpu_lane_join: ") + cudaGetErrorString(e));
  return Status::Ok();
}

Status publish_route_cuda(const PipelineView& v, int layer, int next_layer, const int32_t* ids, int64_t n_ids,
                          const int32_t* pred, int64_t n_pred, Stream stream) {
  publish_kernel<<<1, 256, 0, static_cast<cudaStream_t>(stream)>>>(v, layer, next_layer, ids, static_cast<int>(n_ids),
                                                                    pred, static_cast<int>(n_pred));
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return Status(StatusCode::kCudaError, std::string("publish_route: ") + cudaGetErrorString(e));
  return Status::Ok();
}

}  // namespace paging
}  // namespace dsfp4
