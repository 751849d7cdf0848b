// LayerRing: per-layer units streamed through a fixed ring of GPU slots.
#include <string>

#include "dsfp4/paging.h"
#include "paging/device_ops.h"

namespace dsfp4 {
namespace paging {

Status LayerRing::create(const LayerRingOptions& opt, bool pinned, std::unique_ptr<LayerRing>* out) {
  if (opt.units <= 0 || opt.slots <= 0 || opt.unit_bytes <= 0)
    return InvalidArgument("LayerRing: units, slots and unit_bytes must be positive");
  if (opt.gpu_base == nullptr) return InvalidArgument("LayerRing: gpu_base is null");
  if (opt.prefetch < 0 || opt.prefetch > opt.slots - 1)
    return InvalidArgument("LayerRing: prefetch (" + std::to_string(opt.prefetch) + ") must be in [0, slots - 1 = " +
                           std::to_string(opt.slots - 1) + "]");
  if (opt.on_device && !dev::device_present()) return Unsupported("LayerRing: on_device needs a CUDA device");
  std::unique_ptr<LayerRing> r(new LayerRing());
  r->opt_ = opt;
  DSFP4_RETURN_IF_ERROR(
      HostBuffer::create(static_cast<size_t>(opt.units) * static_cast<size_t>(opt.unit_bytes), pinned && opt.on_device,
                         &r->host_));
  r->slot_rank_.assign(static_cast<size_t>(opt.slots), -1);
  r->slot_ready_.assign(static_cast<size_t>(opt.slots), nullptr);
  for (void*& e : r->slot_ready_) DSFP4_RETURN_IF_ERROR(dev::event_create(&e, opt.on_device));
  DSFP4_RETURN_IF_ERROR(dev::event_create(&r->compute_mark_, opt.on_device));
  *out = std::move(r);
  return Status::Ok();
}

LayerRing::~LayerRing() {
  for (void* e : slot_ready_) dev::event_destroy(e, opt_.on_device);
  dev::event_destroy(compute_mark_, opt_.on_device);
}

uint8_t* LayerRing::host_unit(int rank) const {
  if (rank < 0 || rank >= opt_.units) return nullptr;
  return host_->data() + static_cast<size_t>(rank) * static_cast<size_t>(opt_.unit_bytes);
}

Status LayerRing::copy_into_slot(int rank, Stream compute, Stream copy, bool prefetch) {
  const int slot = rank % opt_.slots;
  Stream s = opt_.async_copy ? copy : compute;
  // the slot's previous rank was launched before the mark recorded by this acquire, and its
  // previous copy may have run on the other copy stream
  if (opt_.async_copy) {
    DSFP4_RETURN_IF_ERROR(dev::stream_wait(s, compute_mark_, opt_.on_device));
    DSFP4_RETURN_IF_ERROR(dev::stream_wait(s, slot_ready_[static_cast<size_t>(slot)], opt_.on_device));
  }
  uint8_t* dst = static_cast<uint8_t*>(opt_.gpu_base) + static_cast<size_t>(slot) * static_cast<size_t>(opt_.unit_bytes);
  DSFP4_RETURN_IF_ERROR(dev::copy_async(dst, host_unit(rank), static_cast<size_t>(opt_.unit_bytes), s, opt_.on_device));
  DSFP4_RETURN_IF_ERROR(dev::event_record(slot_ready_[static_cast<size_t>(slot)], s, opt_.on_device));
  slot_rank_[static_cast<size_t>(slot)] = rank;
  ++counters_.copies;
  counters_.h2d_bytes += static_cast<uint64_t>(opt_.unit_bytes);
  if (prefetch) ++counters_.prefetch_copies;
  return Status::Ok();
}

Status LayerRing::acquire(int rank, Stream compute, Stream transfer, Stream prefetch) {
  if (rank < 0 || rank >= opt_.units) return InvalidArgument("LayerRing: rank " + std::to_string(rank) + " out of range");
  DSFP4_RETURN_IF_ERROR(dev::event_record(compute_mark_, compute, opt_.on_device));
  ++counters_.requests;
  const int slot = rank % opt_.slots;
  if (slot_rank_[static_cast<size_t>(slot)] == rank) {
    ++counters_.hits;
  } else {
    DSFP4_RETURN_IF_ERROR(copy_into_slot(rank, compute, transfer, false));
  }
  if (opt_.async_copy)
    DSFP4_RETURN_IF_ERROR(dev::stream_wait(compute, slot_ready_[static_cast<size_t>(slot)], opt_.on_device));
  for (int d = 1; d <= opt_.prefetch; ++d) {
    const int next = (rank + d) % opt_.units;  // wraps to the next step's first layers
    // wrapping can map a rank onto the slot in use now: leave that one for its own acquire
    if (next % opt_.slots == slot || slot_rank_[static_cast<size_t>(next % opt_.slots)] == next) continue;
    DSFP4_RETURN_IF_ERROR(copy_into_slot(next, compute, prefetch, true));
  }
  return Status::Ok();
}

Status LayerRing::set_prefetch(int prefetch) {
  if (prefetch < 0 || prefetch > opt_.slots - 1)
    return InvalidArgument("LayerRing: prefetch (" + std::to_string(prefetch) + ") must be in [0, slots - 1 = " +
                           std::to_string(opt_.slots - 1) + "]");
  opt_.prefetch = prefetch;
  return Status::Ok();
}

LayerCounters LayerRing::counters() const { return counters_; }
void LayerRing::reset_counters() { counters_ = LayerCounters(); }

}  // namespace paging
}  // namespace dsfp4
