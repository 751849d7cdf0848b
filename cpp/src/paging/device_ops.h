// The few CUDA runtime calls paging needs, behind one seam: with on_device = false (CPU mode,
// or a build without CUDA) copies are memcpy and events are no-ops, so the paging logic is the
// same code on both.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dsfp4/common.h"

namespace dsfp4 {
namespace paging {
namespace dev {

// True when the build has CUDA and a device is visible.
bool device_present();
Status set_device(int device);

Status host_alloc(size_t bytes, bool pinned, uint8_t** host, uint64_t* device_address);
void host_free(uint8_t* host, bool pinned);

// dst ← src (host → device, or any direction in CPU mode), queued on `stream`.
Status copy_async(void* dst, const void* src, size_t bytes, Stream stream, bool on_device);

// Events. In CPU mode they are real too (a record on a null stream completes at once; on a
// simulated stream when the stream reaches it), so ordering is the same code on both.
Status event_create(void** event, bool on_device);
void event_destroy(void* event, bool on_device);
Status event_record(void* event, Stream stream, bool on_device);
Status stream_wait(Stream stream, void* event, bool on_device);
Status event_sync(void* event, bool on_device);
// True when the event's latest record has completed (or it was never recorded).
bool event_done(void* event, bool on_device);

// A non-blocking stream, and a host wait for all work queued on one. In CPU mode the stream is
// null (work runs at once) unless sim_delay_us > 0: then it is a simulated asynchronous stream,
// a worker thread that runs its queue in order and delays each copy by sim_delay_us (tests of
// ordering between copies, host reads and events).
Status stream_create(Stream* stream, bool on_device, int sim_delay_us = 0);
void stream_destroy(Stream stream, bool on_device);
Status stream_sync(Stream stream, bool on_device);

}  // namespace dev
}  // namespace paging
}  // namespace dsfp4
