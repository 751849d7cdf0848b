// publish_route on the GPU: one block bumps the layer's epoch and the publish count, writes the
// ids into the mailbox entry in mapped host memory, then (after a system-wide fence) its sequence
// number, which the store's thread polls.
#include <cuda_runtime.h>

#include <string>

#include "paging/pipeline.h"

namespace dsfp4 {
namespace paging {

namespace {
__global__ void publish_kernel(PipelineView v, int layer, int next_layer, const int32_t* __restrict__ ids,
                               int n_ids, const int32_t* __restrict__ pred, int n_pred) {
  __shared__ uint32_t seq, epoch;
  if (threadIdx.x == 0) {
    epoch = *v.epoch(layer) + 1;
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
}  // namespace

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
