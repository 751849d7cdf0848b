// ExpertStore: GPU slots ← pinned host cache ← checkpoint files, one expert unit at a time.
// The ordering rules are in store_state.h; the decode pipeline's thread in store_pipeline.cpp.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>

#include "paging/store_state.h"

namespace dsfp4 {
namespace paging {

// ---------------------------------------------------------------------------------------
// thread pool, staging

ThreadPool::ThreadPool(int n) {
  for (int i = 0; i < n; ++i) workers_.emplace_back([this] { loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::submit(std::function<void()> fn, bool urgent) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    (urgent ? urgent_ : q_).push_back(std::move(fn));
  }
  cv_.notify_one();
}

void ThreadPool::loop() {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return stop_ || !q_.empty() || !urgent_.empty(); });
      if (stop_ && q_.empty() && urgent_.empty()) return;
      std::deque<std::function<void()>>& from = urgent_.empty() ? q_ : urgent_;
      fn = std::move(from.front());
      from.pop_front();
    }
    fn();
  }
}

Status Staging::init(size_t block_bytes, int blocks, bool on_device) {
  block_ = block_bytes;
  blocks_ = blocks;
  on_device_ = on_device;
  DSFP4_RETURN_IF_ERROR(HostBuffer::create(block_bytes * blocks, on_device, &buf_));
  ev_.assign(static_cast<size_t>(blocks), nullptr);
  used_.assign(static_cast<size_t>(blocks), false);
  for (void*& e : ev_) DSFP4_RETURN_IF_ERROR(dev::event_create(&e, on_device));
  return Status::Ok();
}

Staging::~Staging() {
  for (void* e : ev_) dev::event_destroy(e, on_device_);
}

Status Staging::alloc(size_t bytes, Stream stream, uint8_t** out) {
  bytes = (bytes + 15) / 16 * 16;
  if (bytes > block_) return Status(StatusCode::kInternal, "staging: request larger than a block");
  if (off_ + bytes > block_) {
    // leave this block: its copies are all queued; the event behind them guards its reuse
    DSFP4_RETURN_IF_ERROR(dev::event_record(ev_[static_cast<size_t>(cur_)], stream, on_device_));
    used_[static_cast<size_t>(cur_)] = true;
    cur_ = (cur_ + 1) % blocks_;
    off_ = 0;
    if (used_[static_cast<size_t>(cur_)]) DSFP4_RETURN_IF_ERROR(dev::event_sync(ev_[static_cast<size_t>(cur_)], on_device_));
  }
  *out = buf_->data() + static_cast<size_t>(cur_) * block_ + off_;
  off_ += bytes;
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// helpers over the state (the caller holds m.mu)

namespace {

uint8_t* gpu_unit(const Ctx& c, int slot) {
  return static_cast<uint8_t*>(c.opt->gpu_base) + static_cast<int64_t>(slot) * c.layout->bytes;
}
uint8_t* host_unit_ptr(const Ctx& c, int slot) {
  return c.m->host_units->data() + static_cast<int64_t>(slot) * c.layout->bytes;
}
bool host_mapped(const Ctx& c) { return !c.opt->on_device || c.m->host_units->device_address(0) != 0; }
uint64_t host_unit_addr(const Ctx& c, int slot) {
  if (!c.opt->on_device) return reinterpret_cast<uint64_t>(host_unit_ptr(c, slot));
  return c.m->host_units->device_address(static_cast<size_t>(slot) * c.layout->bytes);
}
// What a kernel can read for `key` when it is not in a GPU slot: its host unit if filled and mapped.
uint64_t fallback_addr(const Ctx& c, int64_t key) {
  const int h = c.m->host.slot_of(key);
  if (h < 0 || c.m->hslot[h].job.valid() || !host_mapped(c)) return 0;
  return host_unit_addr(c, h);
}
void* cev(const Ctx& c, int64_t s) { return c.m->compute_ev[static_cast<size_t>(s % kComputeEvents)]; }
Stream copy_stream(const Ctx& c, Stream compute) { return c.opt->async_copy ? c.copy : compute; }

// Reads and repacks one expert into host unit `dst`; first waits until nothing reads the unit.
Status fill_host_unit(const Ctx& c, const StoredExpert& e, uint8_t* dst, const std::vector<void*>& waits) {
  for (void* ev : waits) DSFP4_RETURN_IF_ERROR(dev::event_sync(ev, c.opt->on_device));
  // per-thread staging for the stored (ModelOpt) bytes, reused across units
  thread_local std::unique_ptr<uint8_t[]> staging;
  thread_local size_t staging_bytes = 0;
  size_t need = 0;
  for (int p = 0; p < 9; ++p)
    if (p % 3 != 2) need += static_cast<size_t>(e.part[p].nbytes);
  if (need > staging_bytes) {
    staging.reset(new uint8_t[need]);
    staging_bytes = need;
  }
  uint8_t* raw[9] = {};
  float gs[3];
  size_t off = 0;
  for (int p = 0; p < 9; ++p) {
    const TensorRange& r = e.part[p];
    if (p % 3 == 2) {
      if (r.nbytes != 4) return InvalidArgument(c.files->path(r.file) + ": " + r.name + " must hold one float32");
      DSFP4_RETURN_IF_ERROR(c.files->read(r, &gs[p / 3]));
      continue;
    }
    raw[p] = staging.get() + off;
    off += static_cast<size_t>(r.nbytes);
    DSFP4_RETURN_IF_ERROR(c.files->read(r, raw[p]));
  }
  for (int i = 0; i < 3; ++i) {
    if (!(gs[i] > 0.0f) || !std::isfinite(gs[i]))
      return InvalidArgument(c.files->path(e.part[3 * i + 2].file) + ": " + e.part[3 * i + 2].name +
                             " must be finite and positive, got " + std::to_string(gs[i]));
  }
  // block scales are read here for the first time: NaN or negative ones would decode to wrong
  // values without any error (-0, which an all-zero block may store, is allowed)
  for (int i = 0; i < 3; ++i) {
    const TensorRange& r = e.part[3 * i + 1];
    const uint8_t* sc = raw[3 * i + 1];
    for (int64_t j = 0; j < r.nbytes; ++j) {
      const uint8_t b = sc[j];
      if ((b & 0x7F) == 0x7F || (b > 0x80))
        return InvalidArgument(c.files->path(r.file) + ": " + r.name + " holds a " +
                               ((b & 0x7F) == 0x7F ? "NaN" : "negative") + " block scale (byte " +
                               std::to_string(j) + " = 0x" + "0123456789abcdef"[b >> 4] +
                               "0123456789abcdef"[b & 15] + "): the file is corrupt");
    }
  }
  ModeloptLinear lin[3];
  for (int i = 0; i < 3; ++i) lin[i] = {raw[3 * i], raw[3 * i + 1], gs[i]};
  return expert_unit_from_modelopt(*c.layout, lin[0], lin[1], lin[2], dst, c.opt->repack_threads);
}

// Starts filling host unit `h` (already assigned to `key`). What must finish before the unit is
// overwritten is captured now, on the owning thread: copies out of it (its event, recorded
// behind each such copy) and kernels that read it in place.
void start_fill(const Ctx& c, int64_t key, int h, bool urgent, bool pipelined) {
  ExpertStore::Impl& m = *c.m;
  HostSlot& hs = m.hslot[h];
  std::vector<void*> waits{hs.out_ev};
  if (!pipelined && hs.last_read > m.synced_seq) waits.push_back(cev(c, hs.last_read + 1));
  hs.last_read = -1;
  // the unit stays pinned while its fill is in flight, so no other key is given the slot
  // (and no I/O thread ever waits for another job)
  m.host.set_pinned(key, true);
  m.pending.push_back(key);
  auto prom = std::make_shared<std::promise<Status>>();
  hs.job = prom->get_future().share();
  const StoredExpert* e = &m.stored[static_cast<size_t>(key)];
  uint8_t* dst = host_unit_ptr(c, h);
  const Ctx cc = c;
  m.pool->submit([cc, e, dst, waits, prom] { prom->set_value(fill_host_unit(cc, *e, dst, waits)); }, urgent);
}

// Waits for a pending host fill of `key`; on failure the key leaves the host cache.
Status finish_host(const Ctx& c, int64_t key) {
  ExpertStore::Impl& m = *c.m;
  const int h = m.host.slot_of(key);
  if (h < 0) return Status(StatusCode::kInternal, "expert not in the host cache");
  HostSlot& hs = m.hslot[h];
  if (!hs.job.valid()) return Status::Ok();
  Status st = hs.job.get();
  hs.job = std::shared_future<Status>();
  m.host.set_pinned(key, false);
  m.pending.erase(std::find(m.pending.begin(), m.pending.end(), key));
  if (!st.ok()) m.host.erase(key);
  return st;
}

// Finishes the fills that are done (errors surface when a layer needs that expert again).
void sweep_host(const Ctx& c) {
  ExpertStore::Impl& m = *c.m;
  std::vector<int64_t> done;
  for (int64_t key : m.pending) {
    const HostSlot& hs = m.hslot[m.host.slot_of(key)];
    if (hs.job.wait_for(std::chrono::seconds(0)) == std::future_status::ready) done.push_back(key);
  }
  for (int64_t key : done) finish_host(c, key);
}

// Puts `key` in the host cache (or finds it there). Returns false if no host slot is free.
bool ensure_host(const Ctx& c, int64_t key, bool demand, int layer, bool pipelined) {
  ExpertStore::Impl& m = *c.m;
  if (m.host.slot_of(key) >= 0) return true;
  if (!demand && m.host.size() == m.host.capacity()) {
    // a speculative read never displaces a unit used in this step
    const int64_t v = m.host.victim();
    if (v < 0 || m.host.priority(v) >= m.host.now()) return false;
  }
  int64_t ev = -1;
  int h = m.host.insert(key, &ev);
  while (h < 0 && demand && !m.pending.empty()) {
    // every unit is held or still being filled: a demand read waits for the oldest fill
    finish_host(c, m.pending.front());
    h = m.host.insert(key, &ev);
  }
  if (h < 0) return false;
  if (ev >= 0 && m.gpu.slot_of(ev) < 0) c.tables[ev] = 0;  // it was only readable in host memory
  start_fill(c, key, h, demand, pipelined);
  ExpertCounters& ct = m.counters[static_cast<size_t>(layer)];
  ++ct.ssd_reads;
  ct.ssd_bytes += static_cast<uint64_t>(c.layout->bytes);
  if (demand) ++ct.demand_ssd_reads;
  return true;
}

// A GPU slot for `key` (evicting the lowest-priority evictable key), with the copy stream
// ordered behind the slot's last readers. -1 when every slot is pinned or held.
int take_slot(const Ctx& c, int64_t key, Stream s, bool pipelined, Status* st) {
  ExpertStore::Impl& m = *c.m;
  int64_t ev = -1;
  const int g = m.gpu.insert(key, &ev);
  if (g < 0) return -1;
  GpuSlot& gs = m.gslot[g];
  if (ev >= 0) {
    c.tables[ev] = fallback_addr(c, ev);
    ++m.counters[static_cast<size_t>(ev / c.opt->experts)].evictions;
  }
  if (!pipelined && gs.last_use > m.synced_seq && s != nullptr && c.opt->async_copy) {
    // its readers were launched before resolve last_use + 1 began (see store_state.h)
    *st = dev::stream_wait(s, cev(c, gs.last_use + 1), c.opt->on_device);
    if (!st->ok()) {
      m.gpu.erase(key);
      return -1;
    }
  }
  gs.last_use = -1;
  gs.prefetched = false;
  gs.spec_bytes = -1;
  return g;
}

// Copies bytes [off, off + n) of key's host unit into GPU slot g on stream s; the events of the
// slot and the host unit are recorded right behind the copy.
Status copy_part(const Ctx& c, int64_t key, int g, int64_t off, int64_t n, Stream s) {
  ExpertStore::Impl& m = *c.m;
  const int h = m.host.slot_of(key);
  DSFP4_RETURN_IF_ERROR(dev::copy_async(gpu_unit(c, g) + off, host_unit_ptr(c, h) + off, static_cast<size_t>(n), s,
                                        c.opt->on_device));
  DSFP4_RETURN_IF_ERROR(dev::event_record(m.hslot[h].out_ev, s, c.opt->on_device));
  DSFP4_RETURN_IF_ERROR(dev::event_record(m.gslot[g].copy_ev, s, c.opt->on_device));
  ExpertCounters& ct = m.counters[static_cast<size_t>(key / c.opt->experts)];
  ct.h2d_bytes += static_cast<uint64_t>(n);
  return Status::Ok();
}

// Writes table entry and ready word of `key` behind everything queued on the copy stream.
Status write_ready(const Ctx& c, int64_t key, uint64_t addr, uint32_t epoch, Stream s) {
  ExpertStore::Impl& m = *c.m;
  c.tables[key] = addr;
  m.ready_mirror[static_cast<size_t>(key)] = epoch;
  if (c.device_tables == nullptr || c.sync == nullptr) return Status::Ok();
  uint8_t* st = nullptr;
  DSFP4_RETURN_IF_ERROR(m.copy_staging.alloc(16, s, &st));
  std::memcpy(st, &addr, 8);
  std::memcpy(st + 8, &epoch, 4);
  DSFP4_RETURN_IF_ERROR(dev::copy_async(c.device_tables + key, st, 8, s, c.opt->on_device));
  return dev::copy_async(c.sync + key, st + 8, 4, s, c.opt->on_device);
}

// The layer's row of addresses (and, with ready words, of ready words) from a snapshot.
Status write_rows(const Ctx& c, int layer, bool with_ready, Stream s, Staging& staging) {
  if (c.device_tables == nullptr) return Status::Ok();
  const int64_t off = static_cast<int64_t>(layer) * c.opt->experts;
  const size_t e = static_cast<size_t>(c.opt->experts);
  uint8_t* st = nullptr;
  DSFP4_RETURN_IF_ERROR(staging.alloc(e * 8, s, &st));
  std::memcpy(st, c.tables + off, e * 8);
  DSFP4_RETURN_IF_ERROR(dev::copy_async(c.device_tables + off, st, e * 8, s, c.opt->on_device));
  if (!with_ready || c.sync == nullptr) return Status::Ok();
  DSFP4_RETURN_IF_ERROR(staging.alloc(e * 4, s, &st));
  std::memcpy(st, c.m->ready_mirror.data() + off, e * 4);
  return dev::copy_async(c.sync + off, st, e * 4, s, c.opt->on_device);
}

// Issues every remaining chunk of the speculative copy into slot g (a demand now needs it).
Status finish_spec(const Ctx& c, int g, Stream s) {
  ExpertStore::Impl& m = *c.m;
  for (auto it = m.spec.begin(); it != m.spec.end(); ++it) {
    if (it->slot != g) continue;
    GpuSlot& gs = m.gslot[g];
    const int64_t left = c.layout->bytes - gs.spec_bytes;
    if (left > 0) DSFP4_RETURN_IF_ERROR(copy_part(c, it->key, g, gs.spec_bytes, left, s));
    gs.spec_bytes = -1;
    m.host.set_pinned(it->key, false);
    m.gpu.set_pinned(it->key, false);
    c.tables[it->key] = reinterpret_cast<uint64_t>(gpu_unit(c, g));
    m.spec.erase(it);
    return Status::Ok();
  }
  return Status::Ok();
}

// Stops a speculative copy that was not used: the slot is freed (its partial bytes are never
// read: nothing maps it), the host unit may be refilled again.
void cancel_spec(const Ctx& c, int64_t key, int layer) {
  ExpertStore::Impl& m = *c.m;
  for (auto it = m.spec.begin(); it != m.spec.end(); ++it) {
    if (it->key != key) continue;
    m.gslot[it->slot].spec_bytes = -1;
    m.gslot[it->slot].prefetched = false;
    m.host.set_pinned(key, false);
    m.gpu.set_pinned(key, false);
    m.gpu.erase(key);
    c.tables[key] = fallback_addr(c, key);
    ++m.counters[static_cast<size_t>(layer)].prefetch_cancelled;
    m.spec.erase(it);
    return;
  }
}

}  // namespace

bool issue_spec_chunk(const Ctx& c, Stream compute) {
  ExpertStore::Impl& m = *c.m;
  if (m.spec.empty()) return false;
  const SpecCopy sc = m.spec.front();
  GpuSlot& gs = m.gslot[sc.slot];
  const int64_t n = std::min<int64_t>(std::max<int64_t>(c.opt->spec_chunk_bytes, kUnitAlign),
                                      c.layout->bytes - gs.spec_bytes);
  Status st = copy_part(c, sc.key, sc.slot, gs.spec_bytes, n, copy_stream(c, compute));
  if (!st.ok()) {
    cancel_spec(c, sc.key, static_cast<int>(sc.key / c.opt->experts));
    if (m.error.ok()) m.error = st;
    return true;
  }
  gs.spec_bytes += n;
  if (gs.spec_bytes >= c.layout->bytes) {
    gs.spec_bytes = -1;
    m.host.set_pinned(sc.key, false);
    m.gpu.set_pinned(sc.key, false);
    m.gpu.hold(sc.key);  // kept until the layer it was predicted for resolves
    c.tables[sc.key] = reinterpret_cast<uint64_t>(gpu_unit(c, sc.slot));
    m.spec.pop_front();
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// creation

Status ExpertStore::create(const ExpertStoreOptions& opt, std::shared_ptr<CheckpointFiles> files,
                           std::vector<StoredExpert> experts, std::unique_ptr<ExpertStore>* out) {
  if (opt.layers <= 0 || opt.experts <= 0) return InvalidArgument("ExpertStore: layers and experts must be positive");
  if (opt.gpu_slots < 0 || opt.host_slots < 1)
    return InvalidArgument("ExpertStore: needs gpu_slots >= 0 and host_slots >= 1");
  if (opt.gpu_slots > 0 && opt.gpu_base == nullptr) return InvalidArgument("ExpertStore: gpu_base is null");
  if (static_cast<int64_t>(experts.size()) != static_cast<int64_t>(opt.layers) * opt.experts)
    return InvalidArgument("ExpertStore: expected " + std::to_string(opt.layers * opt.experts) +
                           " stored experts, got " + std::to_string(experts.size()));
  if (!files) return InvalidArgument("ExpertStore: files is null");
  if (opt.on_device && !dev::device_present())
    return Unsupported("ExpertStore: on_device needs a CUDA build and a visible GPU");
  if ((opt.miss_mode != MissMode::kCopy || opt.max_step_copies >= 0) && !opt.pinned && opt.on_device)
    return InvalidArgument("ExpertStore: reading experts in place (miss_mode zero_copy/auto, max_step_copies) needs "
                           "pinned host memory");
  if (opt.spec_chunk_bytes <= 0) return InvalidArgument("ExpertStore: spec_chunk_bytes must be positive");
  if (opt.sim_copy_delay_us < 0 || (opt.sim_copy_delay_us > 0 && opt.on_device))
    return InvalidArgument("ExpertStore: sim_copy_delay_us is for CPU mode only and must be non-negative");

  std::unique_ptr<ExpertStore> s(new ExpertStore());
  s->opt_ = opt;
  DSFP4_RETURN_IF_ERROR(expert_unit_layout(opt.hidden, opt.inter, &s->layout_));
  for (const StoredExpert& e : experts)
    for (const TensorRange& r : e.part)
      if (r.file < 0 || r.file >= files->num_files()) return InvalidArgument("ExpertStore: tensor " + r.name + " has no file");
  if (opt.on_device) DSFP4_RETURN_IF_ERROR(dev::set_device(0));
  const int64_t keys = static_cast<int64_t>(opt.layers) * opt.experts;
  s->impl_.reset(new Impl(keys, opt));
  Impl& m = *s->impl_;
  m.stored = std::move(experts);
  s->files_ = std::move(files);
  const bool pinned = opt.pinned && opt.on_device;
  DSFP4_RETURN_IF_ERROR(HostBuffer::create(static_cast<size_t>(opt.host_slots) * s->layout_.bytes, pinned, &m.host_units));
  if ((opt.miss_mode != MissMode::kCopy || opt.max_step_copies >= 0) && opt.on_device &&
      m.host_units->device_address(0) == 0)
    return Unsupported("ExpertStore: the host cache could not be mapped for zero-copy reads");
  DSFP4_RETURN_IF_ERROR(HostBuffer::create(static_cast<size_t>(keys) * 8, opt.on_device, &m.mirror));
  s->tables_ = reinterpret_cast<uint64_t*>(m.mirror->data());
  std::memset(s->tables_, 0, static_cast<size_t>(keys) * 8);
  m.ready_mirror.assign(static_cast<size_t>(keys), 0);
  m.gslot.resize(static_cast<size_t>(opt.gpu_slots));
  m.hslot.resize(static_cast<size_t>(opt.host_slots));
  for (GpuSlot& g : m.gslot) DSFP4_RETURN_IF_ERROR(dev::event_create(&g.copy_ev, opt.on_device));
  for (HostSlot& h : m.hslot) DSFP4_RETURN_IF_ERROR(dev::event_create(&h.out_ev, opt.on_device));
  m.compute_ev.assign(kComputeEvents, nullptr);
  for (void*& e : m.compute_ev) DSFP4_RETURN_IF_ERROR(dev::event_create(&e, opt.on_device));
  DSFP4_RETURN_IF_ERROR(dev::event_create(&m.step_mark, opt.on_device));
  const size_t row = static_cast<size_t>(opt.experts) * 12 + 64;
  const size_t block = std::max<size_t>(64 << 10, 2 * row);
  DSFP4_RETURN_IF_ERROR(m.compute_staging.init(block, 16, opt.on_device));
  DSFP4_RETURN_IF_ERROR(m.copy_staging.init(block, 16, opt.on_device));
  if (opt.async_copy) DSFP4_RETURN_IF_ERROR(dev::stream_create(&s->copy_, opt.on_device, opt.sim_copy_delay_us));
  m.pool.reset(new ThreadPool(std::max(1, opt.io_threads)));
  m.counters.resize(static_cast<size_t>(opt.layers));
  m.predicted.resize(static_cast<size_t>(opt.layers));
  m.prefetched.resize(static_cast<size_t>(opt.layers));
  for (auto& a : m.accuracy) a.assign(static_cast<size_t>(opt.layers), 1.0);  // optimistic until measured
  m.stamp.assign(static_cast<size_t>(opt.experts), 0);
  *out = std::move(s);
  return Status::Ok();
}

ExpertStore::~ExpertStore() {
  if (!impl_) return;
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lk(m.mu);
    m.stop = true;
  }
  m.cv.notify_all();
  if (m.thread.joinable()) m.thread.join();
  for (HostSlot& h : m.hslot)
    if (h.job.valid()) h.job.wait();
  m.pool.reset();
  dev::stream_sync(copy_, opt_.on_device);
  dev::stream_destroy(copy_, opt_.on_device);
  for (GpuSlot& g : m.gslot) dev::event_destroy(g.copy_ev, opt_.on_device);
  for (HostSlot& h : m.hslot) dev::event_destroy(h.out_ev, opt_.on_device);
  for (void* e : m.compute_ev) dev::event_destroy(e, opt_.on_device);
  dev::event_destroy(m.step_mark, opt_.on_device);
}

void ExpertStore::set_device_tables(uint64_t* device_tables, uint32_t* sync) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  device_tables_ = device_tables;
  sync_ = sync;
}

void ExpertStore::begin_step(bool prefill) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->phase = prefill ? 1 : 0;
  impl_->gpu.tick();
  impl_->host.tick();
}

// ---------------------------------------------------------------------------------------
// resolve

Status resolve_core(const Ctx& c, int layer, const int32_t* ids, int64_t count, const ResolveMode& mode,
                    std::vector<std::pair<int32_t, Lane>>* lanes) {
  ExpertStore::Impl& m = *c.m;
  const ExpertStoreOptions& opt = *c.opt;
  if (layer < 0 || layer >= opt.layers) return InvalidArgument("resolve: layer " + std::to_string(layer) + " out of range");
  if (count > 0 && ids == nullptr) return InvalidArgument("resolve: ids is null");
  const int64_t seq = ++m.seq;
  if (!mode.pipelined) DSFP4_RETURN_IF_ERROR(dev::event_record(cev(c, seq), mode.compute, opt.on_device));
  m.gpu.release_holds();
  m.host.release_holds();
  sweep_host(c);
  ExpertCounters& ct = m.counters[static_cast<size_t>(layer)];
  const Stream s = copy_stream(c, mode.compute);

  // the distinct experts, in ascending order
  std::vector<int32_t> used;
  if (++m.stamp_gen == INT32_MAX) {
    std::fill(m.stamp.begin(), m.stamp.end(), 0);
    m.stamp_gen = 1;
  }
  std::vector<int> tokens(static_cast<size_t>(opt.experts), 0);
  for (int64_t i = 0; i < count; ++i) {
    const int32_t e = ids[i];
    if (e < 0 || e >= opt.experts) continue;
    ++tokens[static_cast<size_t>(e)];
    if (m.stamp[e] == m.stamp_gen) continue;
    m.stamp[e] = m.stamp_gen;
    used.push_back(e);
  }
  std::sort(used.begin(), used.end());
  const int64_t base = static_cast<int64_t>(layer) * opt.experts;
  if (m.record) m.recorded.emplace_back(layer, used);

  // prediction accounting (the prefetch made for this layer); speculative copies of experts
  // the layer does not use stop here
  std::vector<int32_t>& pred = m.predicted[static_cast<size_t>(layer)];
  if (!pred.empty()) {
    ct.used_after_prediction += used.size();
    uint64_t hit = 0;
    for (int32_t e : pred)
      if (m.stamp[e] == m.stamp_gen) ++hit;
    ct.predicted_used += hit;
    if (!used.empty()) {
      double& a = m.accuracy[m.phase][static_cast<size_t>(layer)];
      a = 0.8 * a + 0.2 * static_cast<double>(hit) / static_cast<double>(used.size());
    }
    for (int32_t e : m.prefetched[static_cast<size_t>(layer)]) {
      if (m.stamp[e] == m.stamp_gen) continue;
      ++ct.prefetch_wasted;
      cancel_spec(c, base + e, layer);
    }
    pred.clear();
    m.prefetched[static_cast<size_t>(layer)].clear();
  }

  // pass 1: hits, host hits, disk reads
  std::vector<int64_t> miss;
  std::vector<std::pair<int32_t, Lane>> placed;
  Status first_error;
  for (int32_t e : used) {
    const int64_t key = base + e;
    ++ct.requests;
    m.gpu.touch(key);
    m.host.touch(key);
    const int g = m.gpu.slot_of(key);
    if (g >= 0) {
      m.gpu.hold(key);
      ++ct.gpu_hits;
      if (m.gslot[g].prefetched) ++ct.prefetch_hits;
      m.gslot[g].prefetched = false;
      if (m.gslot[g].spec_bytes >= 0) DSFP4_RETURN_IF_ERROR(finish_spec(c, g, s));
      m.gslot[g].last_use = seq;
      placed.emplace_back(e, Lane::kGpu);
      continue;
    }
    miss.push_back(key);
    if (m.host.slot_of(key) >= 0) {
      if (!m.hslot[m.host.slot_of(key)].job.valid()) ++ct.host_hits;
      m.host.hold(key);
      continue;
    }
    if (!ensure_host(c, key, true, layer, mode.pipelined)) {
      if (first_error.ok())
        first_error = Status(StatusCode::kOutOfMemory, "expert host cache too small: all " +
                                                           std::to_string(opt.host_slots) +
                                                           " units are held by this step (raise cpu_cache_size)");
      if (!mode.ready) return first_error;
      continue;  // placed as failed below
    }
    m.host.hold(key);
  }

  // with ready words the hits (and their addresses) go first, so they compute while misses copy
  if (mode.ready) {
    for (const auto& p : placed) {
      const int64_t key = base + p.first;
      c.tables[key] = reinterpret_cast<uint64_t>(gpu_unit(c, m.gpu.slot_of(key)));
      m.ready_mirror[static_cast<size_t>(key)] = mode.epoch;
    }
    DSFP4_RETURN_IF_ERROR(write_rows(c, layer, true, s, m.copy_staging));
  }

  // lanes of the misses (one policy), then each miss as soon as its disk read is done
  std::vector<MissInfo> info;
  int avail = m.gpu.available();
  for (int64_t key : miss) {
    MissInfo mi;
    const int64_t v = m.gpu.victim();
    mi.keep = m.gpu.size() < m.gpu.capacity() || (v >= 0 && m.gpu.priority(key) > m.gpu.priority(v));
    mi.tokens = tokens[static_cast<size_t>(key - base)];
    info.push_back(mi);
  }
  MissPolicyOptions po;
  po.mode = opt.miss_mode;
  po.max_copies = opt.max_step_copies;
  po.free_slots = avail;
  po.mapped_ok = host_mapped(c) && (opt.miss_mode != MissMode::kCopy || opt.max_step_copies >= 0 || mode.ready);
  po.unit_bytes = c.layout->bytes;
  const std::vector<Lane> lane = choose_lanes(info, po);

  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < miss.size(); ++i) {
    const int64_t key = miss[i];
    const int32_t e = static_cast<int32_t>(key - base);
    Lane ln = lane[i];
    Status st;
    if (m.host.slot_of(key) < 0) {
      st = first_error;  // never reached the host cache
    } else {
      st = finish_host(c, key);
    }
    if (st.ok() && ln == Lane::kFailed)
      st = Status(StatusCode::kOutOfMemory, "expert GPU cache too small: " + std::to_string(opt.gpu_slots) +
                                                " slots, all held by the " + std::to_string(used.size()) +
                                                " experts of this step (raise memory_limit or max_experts, or "
                                                "allow zero-copy)");
    if (st.ok() && ln == Lane::kCopy) {
      const int g = take_slot(c, key, s, mode.pipelined, &st);
      if (g >= 0 && st.ok()) {
        st = copy_part(c, key, g, 0, c.layout->bytes, s);
        if (st.ok()) {
          m.gpu.hold(key);
          m.gslot[g].last_use = seq;
          ++ct.copies;
          const uint64_t addr = reinterpret_cast<uint64_t>(gpu_unit(c, g));
          c.tables[key] = addr;
          if (mode.ready) st = write_ready(c, key, addr, mode.epoch, s);
        } else {
          m.gpu.erase(key);
        }
      } else if (st.ok()) {
        ln = host_mapped(c) && mode.ready ? Lane::kMapped : Lane::kFailed;
        if (ln == Lane::kFailed)
          st = Status(StatusCode::kOutOfMemory, "expert GPU cache too small: every slot is held by this step");
      }
    }
    if (st.ok() && ln == Lane::kMapped) {
      const int h = m.host.slot_of(key);
      const uint64_t addr = host_unit_addr(c, h);
      m.hslot[h].last_read = seq;
      ++ct.zero_copy;
      ct.zero_copy_bytes += static_cast<uint64_t>(c.layout->bytes);
      c.tables[key] = addr;
      if (mode.ready) st = write_ready(c, key, addr, mode.epoch, s);
    }
    if (!st.ok()) {
      ln = Lane::kFailed;
      ++ct.failed;
      if (first_error.ok()) first_error = st;
      if (!mode.ready) break;
      c.tables[key] = 0;
      Status w = write_ready(c, key, 0, mode.epoch, s);  // the GEMM writes NaN rows for it
      if (!w.ok()) return w;
    }
    placed.emplace_back(e, ln);
  }
  ct.wait_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (lanes != nullptr) {
    std::sort(placed.begin(), placed.end());
    *lanes = std::move(placed);
  }
  if (mode.ready) {
    if (first_error.ok()) return first_error;
    Status st(first_error.code(), "MoE layer " + std::to_string(layer) + ": " + first_error.message());
    if (mode.pipelined && m.error.ok()) m.error = st;  // the thread's caller learns it at the step's end
    return st;
  }
  if (!first_error.ok()) return first_error;

  // blocking: compute waits for the copies of the slots it reads, then reads the table row
  if (opt.async_copy) {
    for (int32_t e : used) {
      const int g = m.gpu.slot_of(base + e);
      if (g >= 0) DSFP4_RETURN_IF_ERROR(dev::stream_wait(mode.compute, m.gslot[g].copy_ev, opt.on_device));
    }
  }
  return write_rows(c, layer, false, mode.compute, m.compute_staging);
}

Status ExpertStore::resolve(int layer, const int32_t* ids, int64_t count, Stream compute,
                            std::vector<std::pair<int32_t, Lane>>* lanes) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const Ctx c{impl_.get(), &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  ResolveMode mode;
  mode.compute = compute;
  return resolve_core(c, layer, ids, count, mode, lanes);
}

Status ExpertStore::resolve_ready(int layer, const int32_t* ids, int64_t count, uint32_t epoch, Stream compute,
                                  std::vector<std::pair<int32_t, Lane>>* lanes) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  if (!opt_.async_copy) return InvalidArgument("resolve_ready: needs async_copy (the store's own copy stream)");
  if (sync_ == nullptr) return InvalidArgument("resolve_ready: set_device_tables was given no ready words");
  const Ctx c{impl_.get(), &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  ResolveMode mode;
  mode.ready = true;
  mode.epoch = epoch;
  mode.compute = compute;
  return resolve_core(c, layer, ids, count, mode, lanes);
}

// ---------------------------------------------------------------------------------------
// prefetch

Status prefetch_core(const Ctx& c, int layer, const int32_t* ids, int64_t count, bool pipelined, Stream compute) {
  ExpertStore::Impl& m = *c.m;
  const ExpertStoreOptions& opt = *c.opt;
  if (layer < 0 || layer >= opt.layers) return InvalidArgument("prefetch: layer " + std::to_string(layer) + " out of range");
  if (count > 0 && ids == nullptr) return InvalidArgument("prefetch: ids is null");
  sweep_host(c);
  std::vector<int32_t>& pred = m.predicted[static_cast<size_t>(layer)];
  pred.clear();
  if (++m.stamp_gen == INT32_MAX) {
    std::fill(m.stamp.begin(), m.stamp.end(), 0);
    m.stamp_gen = 1;
  }
  for (int64_t i = 0; i < count; ++i) {
    const int32_t e = ids[i];
    if (e < 0 || e >= opt.experts || m.stamp[e] == m.stamp_gen) continue;
    m.stamp[e] = m.stamp_gen;
    pred.push_back(e);
  }
  ExpertCounters& ct = m.counters[static_cast<size_t>(layer)];
  ct.predicted += pred.size();
  const int64_t base = static_cast<int64_t>(layer) * opt.experts;
  const Stream s = copy_stream(c, compute);
  int issued = 0;
  Status st;
  for (int32_t e : pred) {
    const int64_t key = base + e;
    if (m.gpu.slot_of(key) >= 0) continue;
    const int h = m.host.slot_of(key);
    if (h < 0) {
      ensure_host(c, key, false, layer, pipelined);  // no free host slot: skip, the demand path will retry
      continue;
    }
    HostSlot& hs = m.hslot[h];
    if (hs.job.valid()) {
      if (hs.job.wait_for(std::chrono::seconds(0)) != std::future_status::ready) continue;  // still reading
      if (!finish_host(c, key).ok()) continue;  // the demand path reports the error if it needs it
    }
    if (opt.miss_mode == MissMode::kZeroCopy) continue;  // nothing to gain
    // a wrong guess costs bus time: copy only while guesses are good enough
    if (m.accuracy[m.phase][static_cast<size_t>(layer)] < opt.prefetch_min_accuracy) continue;
    if (opt.max_prefetch_units >= 0 && issued >= opt.max_prefetch_units) continue;
    const int g = take_slot(c, key, s, pipelined, &st);
    if (!st.ok()) return st;
    if (g < 0) break;  // every slot is held
    GpuSlot& gs = m.gslot[g];
    gs.prefetched = true;
    gs.spec_bytes = 0;
    // while chunks are left, neither the host unit they read nor the slot they fill may change
    m.host.set_pinned(key, true);
    m.gpu.set_pinned(key, true);
    m.spec.push_back({key, g});
    m.prefetched[static_cast<size_t>(layer)].push_back(e);
    ++ct.prefetch_copies;
    ++ct.copies;
    ++issued;
  }
  // without the pipeline's thread nobody issues chunks later: issue them now
  if (!pipelined)
    while (issue_spec_chunk(c, compute)) {
    }
  return Status::Ok();
}

Status ExpertStore::prefetch(int layer, const int32_t* ids, int64_t count, Stream compute) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const Ctx c{impl_.get(), &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  return prefetch_core(c, layer, ids, count, false, compute);
}

// ---------------------------------------------------------------------------------------
// knobs and queries

Status ExpertStore::sync_copies() { return dev::stream_sync(copy_, opt_.on_device); }

Status ExpertStore::reconfigure(CachePolicy gpu_policy, double lambda, MissMode miss_mode, int max_prefetch_units,
                                double prefetch_min_accuracy, Stream compute, int active_slots) {
  if (miss_mode != MissMode::kCopy && !opt_.pinned && opt_.on_device)
    return InvalidArgument("reconfigure: zero-copy needs pinned host memory");
  if (active_slots > static_cast<int>(impl_->gslot.size()))
    return InvalidArgument("reconfigure: active_slots " + std::to_string(active_slots) + " exceeds the " +
                           std::to_string(impl_->gslot.size()) + " GPU slots");
  if (active_slots < 0) active_slots = static_cast<int>(impl_->gslot.size());
  std::lock_guard<std::mutex> lk(impl_->mu);
  Impl& m = *impl_;
  if (m.step_active) return InvalidArgument("reconfigure: a pipeline step is running");
  DSFP4_RETURN_IF_ERROR(dev::event_record(m.step_mark, compute, opt_.on_device));
  DSFP4_RETURN_IF_ERROR(dev::event_sync(m.step_mark, opt_.on_device));
  const Ctx c0{&m, &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  while (!m.spec.empty()) cancel_spec(c0, m.spec.front().key, static_cast<int>(m.spec.front().key / opt_.experts));
  DSFP4_RETURN_IF_ERROR(dev::stream_sync(copy_, opt_.on_device));
  m.synced_seq = m.seq;
  opt_.gpu_policy = gpu_policy;
  opt_.lambda = lambda;
  opt_.miss_mode = miss_mode;
  opt_.max_prefetch_units = max_prefetch_units;
  opt_.prefetch_min_accuracy = prefetch_min_accuracy;
  const int64_t keys = static_cast<int64_t>(opt_.layers) * opt_.experts;
  opt_.gpu_slots = active_slots;
  m.gpu = SlotCache(keys, active_slots, gpu_policy, lambda);
  for (GpuSlot& g : m.gslot) {
    g.last_use = -1;
    g.prefetched = false;
    g.spec_bytes = -1;
  }
  for (auto& p : m.predicted) p.clear();
  for (auto& p : m.prefetched) p.clear();
  for (auto& a : m.accuracy) std::fill(a.begin(), a.end(), 1.0);
  const Ctx c{&m, &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  for (int64_t k = 0; k < keys; ++k) tables_[k] = fallback_addr(c, k);
  for (int l = 0; l < opt_.layers; ++l) DSFP4_RETURN_IF_ERROR(write_rows(c, l, false, compute, m.compute_staging));
  return Status::Ok();
}

Status ExpertStore::load_host(int layer, const int32_t* ids, int64_t count) {
  if (layer < 0 || layer >= opt_.layers) return InvalidArgument("load_host: layer out of range");
  std::lock_guard<std::mutex> lk(impl_->mu);
  Impl& m = *impl_;
  const Ctx c{&m, &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  const int64_t base = static_cast<int64_t>(layer) * opt_.experts;
  std::vector<int64_t> keys;
  for (int64_t i = 0; i < count; ++i) {
    if (ids[i] < 0 || ids[i] >= opt_.experts) return InvalidArgument("load_host: expert id out of range");
    const int64_t key = base + ids[i];
    if (!ensure_host(c, key, true, layer, false))
      return Status(StatusCode::kOutOfMemory, "load_host: the host cache is full of held units");
    keys.push_back(key);
  }
  Status first;
  for (int64_t key : keys) {
    Status st = finish_host(c, key);
    if (!st.ok() && first.ok()) first = st;
    if (st.ok() && m.gpu.slot_of(key) < 0) tables_[key] = fallback_addr(c, key);
  }
  return first;
}

Status ExpertStore::set_pinned(int layer, int expert, bool pinned, Stream compute) {
  if (layer < 0 || layer >= opt_.layers || expert < 0 || expert >= opt_.experts)
    return InvalidArgument("set_pinned: (layer, expert) out of range");
  const int64_t key = static_cast<int64_t>(layer) * opt_.experts + expert;
  if (!pinned) {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->gpu.set_pinned(key, false);
    return Status::Ok();
  }
  bool resident;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    resident = impl_->gpu.slot_of(key) >= 0;
  }
  if (!resident) {
    const MissMode keep = opt_.miss_mode;
    const int keep_cap = opt_.max_step_copies;
    opt_.miss_mode = MissMode::kCopy;  // pinning means a GPU copy
    opt_.max_step_copies = -1;
    const int32_t e = expert;
    Status st = resolve(layer, &e, 1, compute);
    opt_.miss_mode = keep;
    opt_.max_step_copies = keep_cap;
    DSFP4_RETURN_IF_ERROR(st);
  }
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->gpu.set_pinned(key, true);
  return Status::Ok();
}

void ExpertStore::record_routing(bool on) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->record = on;
}

std::vector<std::pair<int32_t, std::vector<int32_t>>> ExpertStore::take_routing() {
  std::lock_guard<std::mutex> lk(impl_->mu);
  std::vector<std::pair<int32_t, std::vector<int32_t>>> out;
  out.swap(impl_->recorded);
  return out;
}

void ExpertStore::demote_layers_before(int layer) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  Impl& m = *impl_;
  for (int g = 0; g < m.gpu.capacity(); ++g) {
    const int64_t key = m.gpu.key_of(g);
    if (key >= 0 && key / opt_.experts < layer) m.gpu.demote(key);
  }
}

uint64_t ExpertStore::gpu_address(int layer, int expert) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const int g = impl_->gpu.slot_of(static_cast<int64_t>(layer) * opt_.experts + expert);
  if (g < 0 || impl_->gslot[g].spec_bytes >= 0) return 0;
  return reinterpret_cast<uint64_t>(static_cast<uint8_t*>(opt_.gpu_base) + g * layout_.bytes);
}

uint64_t ExpertStore::host_address(int layer, int expert) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const Ctx c{impl_.get(), &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  const int h = impl_->host.slot_of(static_cast<int64_t>(layer) * opt_.experts + expert);
  return h < 0 ? 0 : host_unit_addr(c, h);
}

const uint8_t* ExpertStore::host_unit(int layer, int expert) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const Ctx c{impl_.get(), &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  const int h = impl_->host.slot_of(static_cast<int64_t>(layer) * opt_.experts + expert);
  if (h < 0 || impl_->hslot[h].job.valid()) return nullptr;
  return host_unit_ptr(c, h);
}

ExpertCounters ExpertStore::counters(int layer) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const Impl& m = *impl_;
  if (layer >= 0) return m.counters[static_cast<size_t>(layer)];
  ExpertCounters t;
  for (const ExpertCounters& c : m.counters) t += c;
  return t;
}

void ExpertStore::reset_counters() {
  std::lock_guard<std::mutex> lk(impl_->mu);
  for (ExpertCounters& c : impl_->counters) c = ExpertCounters();
}

void ExpertStore::add_skipped(int layer, uint64_t n) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  if (layer >= 0 && layer < opt_.layers) impl_->counters[static_cast<size_t>(layer)].skipped += n;
}

int ExpertStore::gpu_cached() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->gpu.size();
}
int ExpertStore::host_cached() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->host.size();
}

}  // namespace paging
}  // namespace dsfp4
