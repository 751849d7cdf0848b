// The decode pipeline of the ExpertStore: a thread that resolves each MoE layer as soon as the
// GPU publishes its routed ids, while the GPU goes on (its expert GEMMs wait per expert on ready
// words, store_state.h and Fp4GroupedWeight::unit_ready).
//
// Mailbox: a ring of entries in mapped host memory. publish_route writes an entry's ids, then
// (after a system-wide fence) its sequence number; the thread expects sequence numbers in order.
// The GPU cannot run ahead by more than a layer: a layer's GEMMs wait for ready words the thread
// writes after reading that layer's entry, so an entry is never overwritten before it was read
// (the ring only has to cover layers with no expert to wait for).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "kernels/unit_wait.h"
#include "paging/pipeline.h"
#include "paging/store_state.h"

namespace dsfp4 {
namespace paging {

namespace {
constexpr int kRing = 64;

// Sequence numbers are uint32 and wrap as the kernel's publish count does; kRing divides 2^32, so
// seq s is always in entry (s - 1) % kRing, across the wrap too.
MailboxEntry* entry(ExpertStore::Impl& m, uint32_t seq) {
  const uint32_t i = (seq - 1u) % static_cast<uint32_t>(m.ring);
  return reinterpret_cast<MailboxEntry*>(m.mailbox->data() + static_cast<int64_t>(i) * m.entry_bytes);
}

// The latest publish in the ring: the entry whose successor does not hold its sequence + 1 (the
// largest sequence is wrong across the wrap). 0 when nothing was published.
uint32_t last_publish(ExpertStore::Impl& m) {
  for (uint32_t i = 0; i < static_cast<uint32_t>(m.ring); ++i) {
    const uint32_t s = __atomic_load_n(&entry(m, i + 1u)->seq, __ATOMIC_ACQUIRE);
    if ((s - 1u) % static_cast<uint32_t>(m.ring) != i) continue;  // never written (a 0 not in the last entry)
    if (__atomic_load_n(&entry(m, s + 1u)->seq, __ATOMIC_ACQUIRE) != s + 1u) return s;
  }
  return 0;
}
}  // namespace

Status ExpertStore::start_pipeline() {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lk(m.mu);
  if (m.thread.joinable()) return Status::Ok();
  if (!opt_.async_copy) return InvalidArgument("start_pipeline: needs async_copy (the store's own copy stream)");
  if (opt_.pipeline_max_ids <= 0 || opt_.pipeline_max_pred < 0)
    return InvalidArgument("start_pipeline: pipeline_max_ids must be positive and pipeline_max_pred non-negative");
  m.ring = kRing;
  m.entry_bytes = mailbox_entry_bytes(opt_.pipeline_max_ids, opt_.pipeline_max_pred);
  DSFP4_RETURN_IF_ERROR(HostBuffer::create(static_cast<size_t>(m.ring * m.entry_bytes), opt_.on_device, &m.mailbox));
  std::memset(m.mailbox->data(), 0, static_cast<size_t>(m.ring * m.entry_bytes));
  DSFP4_RETURN_IF_ERROR(HostBuffer::create(64, opt_.on_device, &m.wait_flag));
  std::memset(m.wait_flag->data(), 0, 64);
  if (opt_.on_device && (m.mailbox->device_address(0) == 0 || m.wait_flag->device_address(0) == 0))
    return Unsupported("start_pipeline: the mailbox could not be mapped into the device address space");
  m.stop = false;
  ExpertStore* self = this;
  m.thread = std::thread([self] { self->pipeline_loop(); });
  return Status::Ok();
}

bool ExpertStore::pipeline_running() const { return impl_->thread.joinable(); }

PipelineView ExpertStore::pipeline_view() const {
  const Impl& m = *impl_;
  PipelineView v;
  if (!m.mailbox) return v;
  v.mailbox = opt_.on_device ? m.mailbox->device_address(0) : reinterpret_cast<uint64_t>(m.mailbox->data());
  v.ring = m.ring;
  v.entry_bytes = static_cast<int32_t>(m.entry_bytes);
  v.max_ids = opt_.pipeline_max_ids;
  v.max_pred = opt_.pipeline_max_pred;
  v.sync = sync_;
  v.layers = opt_.layers;
  v.experts = opt_.experts;
  v.wait_failed = reinterpret_cast<uint32_t*>(opt_.on_device ? m.wait_flag->device_address(0)
                                                             : reinterpret_cast<uint64_t>(m.wait_flag->data()));
  v.wait_timeout_ns = opt_.wait_timeout_ms * 1000000ull;
  v.on_device = opt_.on_device;
  return v;
}

Status ExpertStore::begin_pipeline_step(Stream compute) {
  Impl& m = *impl_;
  if (!m.thread.joinable()) return InvalidArgument("begin_pipeline_step: start_pipeline() was not called");
  if (sync_ == nullptr) return InvalidArgument("begin_pipeline_step: set_device_tables was given no ready words");
  // everything launched before is done: earlier readers need no more waits (store_state.h)
  DSFP4_RETURN_IF_ERROR(dev::event_record(m.step_mark, compute, opt_.on_device));
  DSFP4_RETURN_IF_ERROR(dev::event_sync(m.step_mark, opt_.on_device));
  std::lock_guard<std::mutex> lk(m.mu);
  if (m.step_active) return InvalidArgument("begin_pipeline_step: a step is already running");
  m.synced_seq = m.seq;
  m.next_publish = last_publish(m) + 1u;  // publishes outside steps (prefill) also used the ring
  m.step_compute = compute;
  m.step_active = true;
  m.cv.notify_all();
  return Status::Ok();
}

Status ExpertStore::check_copy_stream(const std::vector<Stream>& computes, int max_tries, bool* ok, int* tries) {
  Impl& m = *impl_;
  *ok = true;
  *tries = 0;
  if (!opt_.on_device || copy_ == nullptr) return Status::Ok();  // CPU mode: copies run on threads
  {
    std::lock_guard<std::mutex> lk(m.mu);
    if (m.step_active) return InvalidArgument("check_copy_stream: a pipeline step is running");
  }
  constexpr uint64_t kProbeTimeoutNs = 50000000;  // the probe's copy lands in microseconds when it can
  DSFP4_RETURN_IF_ERROR(dev::stream_sync(copy_, true));  // no earlier copy delays the probe's
  for (int t = 0; t < max_tries; ++t) {
    *tries = t + 1;
    bool all = true;
    for (Stream compute : computes) {
      DSFP4_RETURN_IF_ERROR(probe_copy_overtakes_cuda(compute, copy_, kProbeTimeoutNs, &all));
      if (!all) break;
    }
    if (all) return Status::Ok();
    if (t + 1 == max_tries) break;
    // streams take hardware queues in turn as they are created: a new one lands on the next
    Stream fresh = nullptr;
    DSFP4_RETURN_IF_ERROR(dev::stream_create(&fresh, true));
    Stream old = copy_;
    {
      std::lock_guard<std::mutex> lk(m.mu);
      copy_ = fresh;  // the pipeline thread reads it under the lock, between steps only
    }
    dev::stream_destroy(old, true);  // idle: synced above, and the probe's copy was synced
  }
  *ok = false;
  return Status::Ok();
}

Status ExpertStore::end_pipeline_step() {
  Impl& m = *impl_;
  if (!m.thread.joinable()) return InvalidArgument("end_pipeline_step: start_pipeline() was not called");
  DSFP4_RETURN_IF_ERROR(dev::event_record(m.step_mark, m.step_compute, opt_.on_device));
  DSFP4_RETURN_IF_ERROR(dev::event_sync(m.step_mark, opt_.on_device));
  std::unique_lock<std::mutex> lk(m.mu);
  m.step_active = false;
  m.cv.wait(lk, [&] { return !m.in_step_work; });
  const Ctx c{&m, &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  // speculation for a layer after the last one has nothing to serve: stop it
  while (!m.spec.empty()) {
    const int64_t key = m.spec.front().key;
    m.gpu.set_pinned(key, false);
    m.host.set_pinned(key, false);
    m.gslot[m.spec.front().slot].spec_bytes = -1;
    m.gpu.erase(key);
    tables_[key] = 0;
    m.spec.pop_front();
  }
  m.synced_seq = m.seq;
  {
    Status cst = finish_cpu_call(c);
    if (!cst.ok() && m.error.ok()) m.error = cst;
  }
  auto* flag = reinterpret_cast<uint32_t*>(m.wait_flag->data());
  if (__atomic_load_n(flag, __ATOMIC_ACQUIRE) != 0) {
    __atomic_store_n(flag, 0u, __ATOMIC_RELEASE);
    if (m.error.ok())
      m.error = Status(StatusCode::kInternal, "an expert GEMM waited " + std::to_string(opt_.wait_timeout_ms) +
                                                  " ms for an expert that never arrived (its rows are NaN)");
  }
  Status st = m.error;
  m.error = Status::Ok();
  return st;
}

Status ExpertStore::take_error() {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const Ctx c{impl_.get(), &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  Status cst = finish_cpu_call(c);
  if (!cst.ok() && impl_->error.ok()) impl_->error = cst;
  if (impl_->wait_flag) {  // a GEMM or join that gave up waiting (the caller synchronised with compute)
    auto* flag = reinterpret_cast<uint32_t*>(impl_->wait_flag->data());
    if (__atomic_load_n(flag, __ATOMIC_ACQUIRE) != 0) {
      __atomic_store_n(flag, 0u, __ATOMIC_RELEASE);
      if (impl_->error.ok())
        impl_->error = Status(StatusCode::kInternal, "an expert GEMM waited " + std::to_string(opt_.wait_timeout_ms) +
                                                         " ms for an expert that never arrived (its rows are NaN)");
    }
  }
  Status st = impl_->error;
  impl_->error = Status::Ok();
  return st;
}

void ExpertStore::pipeline_loop() {
  Impl& m = *impl_;
  std::vector<int32_t> ids, pred;
  void* spec_ev = nullptr;
  dev::event_create(&spec_ev, opt_.on_device);
  std::unique_lock<std::mutex> lk(m.mu);
  auto idle_since = std::chrono::steady_clock::now();
  while (!m.stop) {
    if (!m.step_active) {
      m.cv.wait(lk, [&] { return m.stop || m.step_active; });
      idle_since = std::chrono::steady_clock::now();
      continue;
    }
    // copy_ read under the lock: check_copy_stream may replace it between steps
    const Ctx c{&m, &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
    const MailboxEntry* e = entry(m, m.next_publish);
    if (__atomic_load_n(&e->seq, __ATOMIC_ACQUIRE) == m.next_publish) {
      m.in_step_work = true;
      const auto t0 = std::chrono::steady_clock::now();
      const int layer = static_cast<int>(e->layer), next = static_cast<int>(e->next_layer);
      const uint32_t epoch = e->epoch;
      ids.assign(e->ids(), e->ids() + std::min<uint32_t>(e->n_ids, static_cast<uint32_t>(opt_.pipeline_max_ids)));
      const uint32_t np = std::min<uint32_t>(e->n_pred, static_cast<uint32_t>(opt_.pipeline_max_pred));
      pred.assign(e->pred(opt_.pipeline_max_ids), e->pred(opt_.pipeline_max_ids) + np);
      ++m.next_publish;
      Status st;
      if (layer < 0 || layer >= opt_.layers) {
        st = Status(StatusCode::kInternal, "pipeline: a publish named layer " + std::to_string(layer));
      } else {
        ResolveMode mode;
        mode.ready = true;
        mode.epoch = epoch;
        mode.pipelined = true;
        mode.cpu_ok = true;
        st = resolve_core(c, layer, ids.data(), static_cast<int64_t>(ids.size()), mode, nullptr);
        ExpertCounters& ct = m.counters[static_cast<size_t>(layer)];
        ct.publish_to_ready_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        ++ct.publishes;
        if (next >= 0 && next < opt_.layers && !pred.empty())
          prefetch_core(c, next, pred.data(), static_cast<int64_t>(pred.size()), true, nullptr);
      }
      if (!st.ok() && m.error.ok()) m.error = st;
      m.in_step_work = false;
      m.cv.notify_all();
      idle_since = std::chrono::steady_clock::now();
      continue;
    }
    // no publish waiting: one speculative chunk at a time, so a demand copy never queues behind
    // more than one chunk
    if (!m.spec.empty() && dev::event_done(spec_ev, opt_.on_device)) {
      m.in_step_work = true;
      issue_spec_chunk(c, nullptr);
      dev::event_record(spec_ev, c.copy, opt_.on_device);
      m.in_step_work = false;
      m.cv.notify_all();
      continue;
    }
    // spin while a step runs (a publish must be answered in microseconds), yielding the lock
    lk.unlock();
    if (std::chrono::steady_clock::now() - idle_since > std::chrono::milliseconds(50))
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    else
      std::this_thread::yield();
    lk.lock();
  }
  lk.unlock();
  dev::stream_sync(copy_, opt_.on_device);
  dev::event_destroy(spec_ev, opt_.on_device);
}

// ---------------------------------------------------------------------------------------
// publish (CPU twin of the kernel in pipeline_kernels.cu)

Status publish_route(const PipelineView& v, int layer, int next_layer, const int32_t* ids, int64_t n_ids,
                     const int32_t* pred, int64_t n_pred, Stream stream) {
  if (v.mailbox == 0 || v.sync == nullptr) return InvalidArgument("publish_route: the pipeline is not started");
  if (layer < 0 || layer >= v.layers) return InvalidArgument("publish_route: layer " + std::to_string(layer) + " out of range");
  if (n_ids < 0 || n_ids > v.max_ids)
    return InvalidArgument("publish_route: " + std::to_string(n_ids) + " ids exceed the mailbox's " +
                           std::to_string(v.max_ids));
  if (n_pred < 0 || n_pred > v.max_pred)
    return InvalidArgument("publish_route: " + std::to_string(n_pred) + " predicted ids exceed the mailbox's " +
                           std::to_string(v.max_pred));
  if ((n_ids > 0 && ids == nullptr) || (n_pred > 0 && pred == nullptr))
    return InvalidArgument("publish_route: ids is null");
  if (v.on_device) return publish_route_cuda(v, layer, next_layer, ids, n_ids, pred, n_pred, stream);
  uint32_t* epoch = v.epoch(layer);
  uint32_t ep = __atomic_load_n(epoch, __ATOMIC_RELAXED) + 1;
  if (ep == 0) ep = 1;  // as the kernel: 0 is what a ready word never written holds
  __atomic_store_n(epoch, ep, __ATOMIC_RELEASE);
  uint32_t* count = v.publish_count();
  const uint32_t seq = __atomic_load_n(count, __ATOMIC_RELAXED) + 1;
  __atomic_store_n(count, seq, __ATOMIC_RELAXED);
  auto* e = reinterpret_cast<MailboxEntry*>(v.mailbox + ((seq - 1) % static_cast<uint32_t>(v.ring)) *
                                                            static_cast<uint64_t>(v.entry_bytes));
  e->layer = static_cast<uint32_t>(layer);
  e->next_layer = static_cast<uint32_t>(next_layer);
  e->epoch = ep;
  e->n_ids = static_cast<uint32_t>(n_ids);
  e->n_pred = static_cast<uint32_t>(n_pred);
  if (n_ids > 0) std::memcpy(e->ids(), ids, static_cast<size_t>(n_ids) * 4);
  if (n_pred > 0) std::memcpy(e->pred(v.max_ids), pred, static_cast<size_t>(n_pred) * 4);
  __atomic_store_n(&e->seq, seq, __ATOMIC_RELEASE);
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// the CPU lane's join (CPU twin of the kernel in pipeline_kernels.cu)

Status cpu_lane_join(const CpuLaneJoin& j, Stream stream) {
  if (j.y_perm == nullptr || j.row_offsets == nullptr || j.table == nullptr || j.epoch == nullptr ||
      j.done == nullptr || j.ok == nullptr || j.y_cpu == nullptr)
    return InvalidArgument("cpu_lane_join: a pointer is null (is the CPU lane enabled?)");
  if (j.experts <= 0 || j.hidden <= 0 || j.hidden % 8 != 0)
    return InvalidArgument("cpu_lane_join: experts must be positive and hidden a positive multiple of 8");
  if (j.on_device) return cpu_lane_join_cuda(j, stream);
  const uint32_t want = __atomic_load_n(j.epoch, __ATOMIC_ACQUIRE);
  auto* y = static_cast<uint16_t*>(j.y_perm);
  const auto* src = static_cast<const uint16_t*>(j.y_cpu);
  for (int e = 0; e < j.experts; ++e) {
    const int64_t lo = j.row_offsets[e], hi = j.row_offsets[e + 1];
    if (hi <= lo || hi > j.y_cpu_rows || __atomic_load_n(j.table + e, __ATOMIC_ACQUIRE) != kCpuLaneAddress) continue;
    if (!kernels::wait_word(j.done, want, j.timeout_ns, j.wait_failed)) return Status::Ok();
    if (__atomic_load_n(j.ok, __ATOMIC_ACQUIRE) != want) continue;  // failed: the GEMM's NaN rows stay
    std::memcpy(y + lo * j.hidden, src + lo * j.hidden, static_cast<size_t>((hi - lo) * j.hidden) * 2);
  }
  return Status::Ok();
}

#if !defined(DSFP4_WITH_CUDA)
Status cpu_lane_join_cuda(const CpuLaneJoin&, Stream) {
  return Unsupported("cpu_lane_join: this build has no CUDA kernels");
}
Status publish_route_cuda(const PipelineView&, int, int, const int32_t*, int64_t, const int32_t*, int64_t, Stream) {
  return Unsupported("publish_route: this build has no CUDA kernels");
}
Status probe_copy_overtakes_cuda(Stream, Stream, uint64_t, bool*) {
  return Unsupported("copy stream probe: this build has no CUDA kernels");
}
#endif

}  // namespace paging
}  // namespace dsfp4
