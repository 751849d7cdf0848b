// The decode pipeline's mailbox layout, shared by the publishing kernel and the store's thread.
#pragma once

#include <cstdint>

#include "dsfp4/paging.h"

namespace dsfp4 {
namespace paging {

// One entry of the ring; `ids` follow the header, `pred` follow max_ids ids. Written by the
// publisher, seq last (after a fence); read by the store's thread.
struct MailboxEntry {
  uint32_t seq;         // publish sequence, 1-based
  uint32_t layer;       // MoE layer the ids are for
  uint32_t next_layer;  // MoE layer the predicted ids are for (-1: none)
  uint32_t epoch;       // the layer's epoch word after this publish
  uint32_t n_ids, n_pred;
  uint32_t pad[2];
  DSFP4_HOST_DEVICE int32_t* ids() { return reinterpret_cast<int32_t*>(this + 1); }
  DSFP4_HOST_DEVICE const int32_t* ids() const { return reinterpret_cast<const int32_t*>(this + 1); }
  DSFP4_HOST_DEVICE int32_t* pred(int max_ids) { return ids() + max_ids; }
  DSFP4_HOST_DEVICE const int32_t* pred(int max_ids) const { return ids() + max_ids; }
};

inline int64_t mailbox_entry_bytes(int max_ids, int max_pred) {
  const int64_t b = static_cast<int64_t>(sizeof(MailboxEntry)) + 4ll * (max_ids + max_pred);
  return (b + 127) / 128 * 128;
}

Status cpu_lane_join_cuda(const CpuLaneJoin& j, Stream stream);
// Whether a copy issued on `copy` after a kernel on `compute` that waits for it, with dependent
// work queued behind that kernel, still runs (*ok): false when the two streams share a hardware
// queue (CUDA_DEVICE_MAX_CONNECTIONS), where the decode pipeline's waits could only time out.
Status probe_copy_overtakes_cuda(Stream compute, Stream copy, uint64_t timeout_ns, bool* ok);
Status publish_route_cuda(const PipelineView& v, int layer, int next_layer, const int32_t* ids, int64_t n_ids,
                          const int32_t* pred, int64_t n_pred, Stream stream);

}  // namespace paging
}  // namespace dsfp4
