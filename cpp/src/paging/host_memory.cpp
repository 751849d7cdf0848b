#include "dsfp4/paging.h"
#include "paging/device_ops.h"

namespace dsfp4 {
namespace paging {

Status HostBuffer::create(size_t bytes, bool pinned, std::unique_ptr<HostBuffer>* out) {
  std::unique_ptr<HostBuffer> b(new HostBuffer());
  pinned = pinned && dev::device_present();
  DSFP4_RETURN_IF_ERROR(dev::host_alloc(bytes, pinned, &b->host_, &b->device_));
  b->bytes_ = bytes;
  b->pinned_ = pinned;
  *out = std::move(b);
  return Status::Ok();
}

HostBuffer::~HostBuffer() { dev::host_free(host_, pinned_); }

}  // namespace paging
}  // namespace dsfp4
