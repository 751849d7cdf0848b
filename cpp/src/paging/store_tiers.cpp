// ExpertStore tiers: the I/O pool, the staging ring, host-cache fills, GPU slots and copies
// (the ordering rules are in store_state.h).
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
namespace {
// FP8 blocks: the stored weights and scales are copied into the unit as they are.
Status fill_fp8_unit(const Ctx& c, const StoredExpert& e, uint8_t* dst) {
  const Fp8ExpertUnitLayout& l = c.m->fp8;
  const int64_t I = l.inter, H = l.hidden;
  const int64_t gs = 4 * ((I + 127) / 128) * ((H + 127) / 128);  // float32 [ceil(I/128), ceil(H/128)]
  const int64_t want[6] = {I * H, gs, I * H, gs, H * I, gs};  // down's grid is the transpose: same count
  thread_local std::unique_ptr<uint8_t[]> staging;
  thread_local size_t staging_bytes = 0;
  size_t need = 0;
  for (int64_t w : want) need += static_cast<size_t>((w + 15) / 16 * 16);
  if (need > staging_bytes) {
    staging.reset(new uint8_t[need]);
    staging_bytes = need;
  }
  uint8_t* raw[6];
  size_t off = 0;
  for (int i = 0; i < 6; ++i) {
    const TensorRange& r = e.part[3 * (i / 2) + i % 2];
    if (r.nbytes != want[i])
      return InvalidArgument(c.files->path(r.file) + ": " + r.name + " holds " + std::to_string(r.nbytes) +
                             " bytes, expected " + std::to_string(want[i]));
    raw[i] = staging.get() + off;
    off += static_cast<size_t>((want[i] + 15) / 16 * 16);
    DSFP4_RETURN_IF_ERROR(c.files->read(r, raw[i]));
    if (i % 2 == 1) {  // scales are read here for the first time: a bad one would decode silently
      const float* sc = reinterpret_cast<const float*>(raw[i]);
      for (int64_t j = 0; j < want[i] / 4; ++j)
        if (!(sc[j] >= 0.0f) || !std::isfinite(sc[j]))
          return InvalidArgument(c.files->path(r.file) + ": " + r.name + " holds a non-finite or negative block "
                                 "scale (" + std::to_string(sc[j]) + " at " + std::to_string(j) + "): the file is corrupt");
    }
  }
  return fp8_expert_unit_fill(l, raw[0], reinterpret_cast<const float*>(raw[1]), raw[2],
                              reinterpret_cast<const float*>(raw[3]), raw[4], reinterpret_cast<const float*>(raw[5]), dst);
}

Status fill_host_unit(const Ctx& c, const StoredExpert& e, uint8_t* dst, const std::vector<void*>& waits) {
  for (void* ev : waits) DSFP4_RETURN_IF_ERROR(dev::event_sync(ev, c.opt->on_device));
  if (c.opt->format == ExpertFormat::kFp8Block) return fill_fp8_unit(c, e, dst);
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
}  // namespace

// Starts filling host unit `h` (already assigned to `key`). What must finish before the unit is
// overwritten is captured now, on the owning thread: copies out of it (its event, recorded
// behind each such copy) and kernels that read it in place.
void start_fill(const Ctx& c, int64_t key, int h, bool urgent, bool pipelined) {
  ExpertStore::Impl& m = *c.m;
  HostSlot& hs = m.hslot[h];
  std::vector<void*> waits{hs.out_ev};
  if (!pipelined && hs.last_read > m.synced_seq) waits.push_back(cev(c, hs.last_read + 1));
  hs.last_read = -1;
  std::shared_ptr<CpuExpertsHandle> cpu = std::move(hs.cpu_reader);  // a CPU call still reading it
  // the unit stays pinned while its fill is in flight, so no other key is given the slot
  // (and no I/O thread ever waits for another job)
  m.host.set_pinned(key, true);
  m.pending.push_back(key);
  auto prom = std::make_shared<std::promise<Status>>();
  hs.job = prom->get_future().share();
  const StoredExpert* e = &m.stored[static_cast<size_t>(key)];
  uint8_t* dst = host_unit_ptr(c, h);
  const Ctx cc = c;
  m.pool->submit(
      [cc, e, dst, waits, prom, cpu] {
        if (cpu) cpu->wait();  // its status is the lane's to report
        prom->set_value(fill_host_unit(cc, *e, dst, waits));
      },
      urgent);
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


}  // namespace paging
}  // namespace dsfp4
