// ExpertStoreSource: the paging store behind the ExpertSource interface.
#include <string>

#include "dsfp4/paging.h"
#include "paging/device_ops.h"

namespace dsfp4 {
namespace paging {

Status ExpertStoreSource::create(ExpertStore* store, std::unique_ptr<ExpertStoreSource>* out) {
  if (store == nullptr) return InvalidArgument("ExpertStoreSource: store is null");
  if (out == nullptr) return InvalidArgument("ExpertStoreSource: out is null");
  if (store->options().format != ExpertFormat::kNvfp4)
    return Unsupported("ExpertStoreSource: the TensorRT expert plugin reads NVFP4 units; this store holds FP8 experts");
  std::unique_ptr<ExpertStoreSource> s(new ExpertStoreSource());
  s->store_ = store;
  *out = std::move(s);
  return Status::Ok();
}

ExpertStoreSource::~ExpertStoreSource() {
  // copies queued by the last resolve may still run; let them finish
  if (store_ != nullptr) store_->sync_copies();
}

Status ExpertStoreSource::acquire(int layer, const int32_t* expert_ids, int64_t count, Stream stream,
                                  ExpertTable* table) {
  const ExpertStoreOptions& opt = store_->options();
  if (table == nullptr) return InvalidArgument("ExpertStoreSource::acquire: table is null");
  if (layer < 0 || layer >= opt.layers)
    return InvalidArgument("ExpertStoreSource::acquire: layer " + std::to_string(layer) + " is outside the store's " +
                           std::to_string(opt.layers) + " MoE layers");
  if (count < 0) return InvalidArgument("ExpertStoreSource::acquire: count must be non-negative");
  if (count > 0 && expert_ids == nullptr) return InvalidArgument("ExpertStoreSource::acquire: expert_ids is null");
  uint64_t* tables = store_->device_tables();
  if (tables == nullptr)
    return InvalidArgument(
        "ExpertStoreSource::acquire: the store has no device tables (ExpertStore::set_device_tables)");
  const int32_t* ids = expert_ids;
  if (opt.on_device && count > 0) {
    // The store decides residency on the host: the ids are needed there.
    ids_.resize(static_cast<size_t>(count));
    DSFP4_RETURN_IF_ERROR(dev::copy_async(ids_.data(), expert_ids, static_cast<size_t>(count) * 4, stream, true));
    DSFP4_RETURN_IF_ERROR(dev::stream_sync(stream, true));
    ids = ids_.data();
  }
  DSFP4_RETURN_IF_ERROR(store_->resolve(layer, ids, count, stream));
  table->unit_addr = tables + static_cast<int64_t>(layer) * opt.experts;
  table->num_experts = opt.experts;
  table->layout = store_->layout();
  ++acquired_;
  return Status::Ok();
}

Status ExpertStoreSource::release(int layer, Stream) {
  if (layer < 0 || layer >= store_->options().layers)
    return InvalidArgument("ExpertStoreSource::release: layer " + std::to_string(layer) + " is out of range");
  return Status::Ok();
}

}  // namespace paging
}  // namespace dsfp4
