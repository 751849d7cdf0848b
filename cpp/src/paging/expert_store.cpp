// ExpertStore: GPU slots ← pinned host cache ← checkpoint files, one expert unit at a time.
//
// Ordering. Every resolve() gets a sequence number s and first records a compute-stream event
// C[s]: all compute launched so far (which includes every kernel of earlier resolves) is
// behind it. A GPU slot last used by resolve u < s may be refilled once the copy stream waits
// C[s]; a host unit last read in place (zero-copy) by u < s may be overwritten once the host
// waits C[s]. Copies are recorded on the copy stream with their own events, and compute waits
// for the newest copy of any slot it reads. Experts of the latest resolve are "held": they
// are never evicted until the next resolve, so the GPU never reads a slot being refilled.
// All cache state is owned by the calling thread; I/O threads only fill host units.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>

#include "dsfp4/paging.h"
#include "paging/device_ops.h"

namespace dsfp4 {
namespace paging {

namespace {
constexpr int kEvents = 256;  // ring of events per stream

class ThreadPool {
 public:
  explicit ThreadPool(int n) {
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  // Demand work (a layer waits for it) runs before speculative work.
  void submit(std::function<void()> fn, bool urgent) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      (urgent ? urgent_ : q_).push_back(std::move(fn));
    }
    cv_.notify_one();
  }

 private:
  void loop() {
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
  std::vector<std::thread> workers_;
  std::deque<std::function<void()>> q_, urgent_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

struct GpuSlot {
  int64_t last_use = -1;  // resolve sequence that last read it
  int64_t copy_tag = -1;  // copy event recorded after its latest copy
  int64_t waited_tag = -1;  // compute already waits for copies up to this tag
  bool prefetched = false;
};

struct HostSlot {
  int64_t last_copy_tag = -1;  // copy event after the latest copy out of it
  int64_t last_zero_copy = -1; // resolve sequence that last read it in place
  std::shared_future<Status> job;  // fill in flight (valid until consumed)
};
}  // namespace

struct ExpertStore::Impl {
  Impl(int64_t keys, const ExpertStoreOptions& o)
      : gpu(keys, o.gpu_slots, o.gpu_policy, o.lambda), host(keys, o.host_slots, o.host_policy, o.lambda) {}
  SlotCache gpu, host;
  std::unique_ptr<HostBuffer> host_units;
  std::unique_ptr<HostBuffer> mirror;
  std::vector<StoredExpert> stored;
  std::vector<GpuSlot> gslot;
  std::vector<HostSlot> hslot;
  std::vector<void*> compute_ev, copy_ev;
  int64_t seq = 0;       // resolve sequence
  int64_t copy_tag = 0;  // copy events recorded
  std::unique_ptr<ThreadPool> pool;
  std::vector<ExpertCounters> counters;
  std::vector<std::vector<int32_t>> predicted;   // per layer: experts predicted for its next resolve
  std::vector<std::vector<int32_t>> prefetched;  // per layer: experts copied speculatively
  std::vector<double> accuracy;                  // per layer: running prediction accuracy
  std::vector<int64_t> pending;                  // keys whose host fill is in flight (pinned), oldest first
  std::vector<int32_t> stamp;                    // dedupe scratch
  int32_t stamp_gen = 0;
};

// ---------------------------------------------------------------------------------------

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
  m.gslot.resize(static_cast<size_t>(opt.gpu_slots));
  m.hslot.resize(static_cast<size_t>(opt.host_slots));
  m.compute_ev.assign(kEvents, nullptr);
  m.copy_ev.assign(kEvents, nullptr);
  for (int i = 0; i < kEvents; ++i) {
    DSFP4_RETURN_IF_ERROR(dev::event_create(&m.compute_ev[i], opt.on_device));
    DSFP4_RETURN_IF_ERROR(dev::event_create(&m.copy_ev[i], opt.on_device));
  }
  m.pool.reset(new ThreadPool(std::max(1, opt.io_threads)));
  m.counters.resize(static_cast<size_t>(opt.layers));
  m.predicted.resize(static_cast<size_t>(opt.layers));
  m.prefetched.resize(static_cast<size_t>(opt.layers));
  m.accuracy.assign(static_cast<size_t>(opt.layers), 1.0);  // optimistic until measured
  m.stamp.assign(static_cast<size_t>(opt.experts), 0);
  *out = std::move(s);
  return Status::Ok();
}

ExpertStore::~ExpertStore() {
  if (!impl_) return;
  Impl& m = *impl_;
  for (HostSlot& h : m.hslot)
    if (h.job.valid()) h.job.wait();
  m.pool.reset();
  for (void* e : m.compute_ev) dev::event_destroy(e, opt_.on_device);
  for (void* e : m.copy_ev) dev::event_destroy(e, opt_.on_device);
}

void ExpertStore::begin_step() {
  impl_->gpu.tick();
  impl_->host.tick();
}

// ---------------------------------------------------------------------------------------
// helpers (file-local, over Impl)

namespace {

struct Ctx {
  ExpertStore::Impl* m;
  const ExpertStoreOptions* opt;
  const ExpertUnitLayout* layout;
  CheckpointFiles* files;
  uint64_t* tables;
};

uint8_t* gpu_unit(const Ctx& c, int slot) {
  return static_cast<uint8_t*>(c.opt->gpu_base) + static_cast<int64_t>(slot) * c.layout->bytes;
}
uint8_t* host_unit_ptr(const Ctx& c, int slot) { return c.m->host_units->data() + static_cast<int64_t>(slot) * c.layout->bytes; }
uint64_t host_unit_addr(const Ctx& c, int slot) {
  if (!c.opt->on_device) return reinterpret_cast<uint64_t>(host_unit_ptr(c, slot));
  return c.m->host_units->device_address(static_cast<size_t>(slot) * c.layout->bytes);
}
// What a kernel can read for `key` when it is not in a GPU slot: its host unit if mapped.
uint64_t fallback_addr(const Ctx& c, int64_t key) {
  const int h = c.m->host.slot_of(key);
  if (h < 0 || c.m->hslot[h].job.valid() || (c.opt->miss_mode == MissMode::kCopy && c.opt->max_step_copies < 0))
    return 0;
  return host_unit_addr(c, h);
}

void* cev(const Ctx& c, int64_t s) { return c.m->compute_ev[static_cast<size_t>(s % kEvents)]; }
void* kev(const Ctx& c, int64_t t) { return c.m->copy_ev[static_cast<size_t>(t % kEvents)]; }

// Reads and repacks one expert into host unit `slot`; first waits until nothing reads the slot.
Status fill_host_unit(const Ctx& c, const StoredExpert& e, uint8_t* dst, std::vector<void*> waits) {
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

}  // namespace

// Starts filling a host unit for `key` (the slot is already assigned). The events to wait for
// before writing are captured now, on the owning thread.
static void start_fill(const Ctx& c, int64_t key, int h, int64_t cur_seq, bool urgent) {
  ExpertStore::Impl& m = *c.m;
  HostSlot& hs = m.hslot[h];
  std::vector<void*> waits;
  if (hs.last_copy_tag >= 0) waits.push_back(kev(c, hs.last_copy_tag));
  if (hs.last_zero_copy >= 0 && hs.last_zero_copy < cur_seq) waits.push_back(cev(c, cur_seq));
  hs.last_copy_tag = -1;
  hs.last_zero_copy = -1;
  // the unit stays pinned while its fill is in flight, so no other key is given the slot
  // (and no I/O thread ever waits for another job)
  m.host.set_pinned(key, true);
  m.pending.push_back(key);
  auto prom = std::make_shared<std::promise<Status>>();
  hs.job = prom->get_future().share();
  const StoredExpert* e = &m.stored[static_cast<size_t>(key)];
  uint8_t* dst = host_unit_ptr(c, h);
  Ctx cc = c;
  m.pool->submit([cc, e, dst, waits, prom] { prom->set_value(fill_host_unit(cc, *e, dst, waits)); }, urgent);
}

// Waits for a pending host fill of `key`; on failure the key leaves the host cache.
static Status finish_host(const Ctx& c, int64_t key) {
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
static void sweep_host(const Ctx& c) {
  ExpertStore::Impl& m = *c.m;
  std::vector<int64_t> done;
  for (int64_t key : m.pending) {
    const HostSlot& hs = m.hslot[m.host.slot_of(key)];
    if (hs.job.wait_for(std::chrono::seconds(0)) == std::future_status::ready) done.push_back(key);
  }
  for (int64_t key : done) finish_host(c, key);
}

// Puts `key` in the host cache (or finds it there). Returns false if no host slot is free.
static bool ensure_host(const Ctx& c, int64_t key, int64_t cur_seq, bool demand, int layer) {
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
    const int64_t oldest = m.pending.front();
    finish_host(c, oldest);
    h = m.host.insert(key, &ev);
  }
  if (h < 0) return false;
  if (ev >= 0 && m.gpu.slot_of(ev) < 0) c.tables[ev] = 0;  // it was only readable in host memory
  start_fill(c, key, h, cur_seq, demand);
  ExpertCounters& ct = m.counters[static_cast<size_t>(layer)];
  ++ct.ssd_reads;
  ct.ssd_bytes += static_cast<uint64_t>(c.layout->bytes);
  if (demand) ++ct.demand_ssd_reads;
  return true;
}

// Copies host unit of `key` into a GPU slot. Returns the slot, or -1 if none can be freed.
static int copy_to_gpu(const Ctx& c, int64_t key, int64_t cur_seq, Stream compute, Stream copy, bool* waited,
                       Status* st) {
  ExpertStore::Impl& m = *c.m;
  int64_t ev = -1;
  const int g = m.gpu.insert(key, &ev);
  if (g < 0) return -1;
  GpuSlot& gs = m.gslot[g];
  const int layer = static_cast<int>(key / c.opt->experts);
  if (ev >= 0) {
    c.tables[ev] = fallback_addr(c, ev);
    ++m.counters[static_cast<size_t>(ev / c.opt->experts)].evictions;
  }
  Stream s = c.opt->async_copy ? copy : compute;
  if (gs.last_use >= 0 && !*waited && c.opt->async_copy) {
    // the slot's last reader was launched before this resolve began
    *st = dev::stream_wait(s, cev(c, cur_seq), c.opt->on_device);
    if (!st->ok()) return -1;
    *waited = true;
  }
  if (gs.copy_tag >= 0 && c.opt->async_copy) {
    // an earlier copy into this slot may still run on the other copy stream
    *st = dev::stream_wait(s, kev(c, gs.copy_tag), c.opt->on_device);
    if (!st->ok()) return -1;
  }
  const int h = m.host.slot_of(key);
  *st = dev::copy_async(gpu_unit(c, g), host_unit_ptr(c, h), static_cast<size_t>(c.layout->bytes), s, c.opt->on_device);
  if (!st->ok()) {
    m.gpu.erase(key);
    return -1;
  }
  gs.last_use = -1;
  gs.prefetched = false;
  gs.copy_tag = m.copy_tag + 1;  // the event recorded after this batch of copies
  m.hslot[h].last_copy_tag = gs.copy_tag;
  c.tables[key] = reinterpret_cast<uint64_t>(gpu_unit(c, g));
  ExpertCounters& ct = m.counters[static_cast<size_t>(layer)];
  ++ct.copies;
  ct.h2d_bytes += static_cast<uint64_t>(c.layout->bytes);
  return g;
}

static Status record_copies(const Ctx& c, Stream compute, Stream copy) {
  ExpertStore::Impl& m = *c.m;
  ++m.copy_tag;
  return dev::event_record(kev(c, m.copy_tag), c.opt->async_copy ? copy : compute, c.opt->on_device);
}

static Status write_table(const Ctx& c, uint64_t* device_tables, int layer, Stream compute) {
  if (device_tables == nullptr) return Status::Ok();
  const int64_t off = static_cast<int64_t>(layer) * c.opt->experts;
  return dev::copy_async(device_tables + off, c.tables + off, static_cast<size_t>(c.opt->experts) * 8, compute,
                         c.opt->on_device);
}

// ---------------------------------------------------------------------------------------

Status ExpertStore::resolve(int layer, const int32_t* ids, int64_t count, Stream compute, Stream copy) {
  if (layer < 0 || layer >= opt_.layers) return InvalidArgument("resolve: layer " + std::to_string(layer) + " out of range");
  if (count > 0 && ids == nullptr) return InvalidArgument("resolve: ids is null");
  Impl& m = *impl_;
  const Ctx c{&m, &opt_, &layout_, files_.get(), tables_};
  const int64_t seq = ++m.seq;
  DSFP4_RETURN_IF_ERROR(dev::event_record(cev(c, seq), compute, opt_.on_device));
  m.gpu.release_holds();
  m.host.release_holds();
  sweep_host(c);
  ExpertCounters& ct = m.counters[static_cast<size_t>(layer)];

  // the distinct experts, in ascending order
  std::vector<int32_t> used;
  if (++m.stamp_gen == INT32_MAX) {
    std::fill(m.stamp.begin(), m.stamp.end(), 0);
    m.stamp_gen = 1;
  }
  for (int64_t i = 0; i < count; ++i) {
    const int32_t e = ids[i];
    if (e < 0 || e >= opt_.experts || m.stamp[e] == m.stamp_gen) continue;
    m.stamp[e] = m.stamp_gen;
    used.push_back(e);
  }
  std::sort(used.begin(), used.end());

  // prediction accounting (the prefetch made for this layer)
  std::vector<int32_t>& pred = m.predicted[static_cast<size_t>(layer)];
  if (!pred.empty()) {
    ct.used_after_prediction += used.size();
    uint64_t hit = 0;
    for (int32_t e : pred)
      if (m.stamp[e] == m.stamp_gen) ++hit;
    ct.predicted_used += hit;
    if (!used.empty()) {
      double& a = m.accuracy[static_cast<size_t>(layer)];
      a = 0.8 * a + 0.2 * static_cast<double>(hit) / static_cast<double>(used.size());
    }
    for (int32_t e : m.prefetched[static_cast<size_t>(layer)])
      if (m.stamp[e] != m.stamp_gen) ++ct.prefetch_wasted;
    pred.clear();
    m.prefetched[static_cast<size_t>(layer)].clear();
  }

  // pass 1: hits, host hits, disk reads
  const int64_t base = static_cast<int64_t>(layer) * opt_.experts;
  std::vector<int64_t> miss;
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
      continue;
    }
    miss.push_back(key);
    if (m.host.slot_of(key) >= 0) {
      if (!m.hslot[m.host.slot_of(key)].job.valid()) ++ct.host_hits;
      m.host.hold(key);
      continue;
    }
    if (!ensure_host(c, key, seq, true, layer))
      return Status(StatusCode::kOutOfMemory, "expert host cache too small: all " + std::to_string(opt_.host_slots) +
                                                  " units are held by this step (raise cpu_cache_size)");
    m.host.hold(key);
  }
  // wait for the disk reads this layer needs (they ran in parallel on the I/O threads)
  const auto t0 = std::chrono::steady_clock::now();
  Status first_error;
  for (int64_t key : miss) {
    Status st = finish_host(c, key);
    if (!st.ok() && first_error.ok()) first_error = st;
  }
  ct.wait_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (!first_error.ok()) return first_error;

  // pass 2: place the misses (copy into a GPU slot, or read in place)
  bool waited = false, copied = false;
  Status st;
  int step_copies = 0;
  for (int64_t key : miss) {
    bool do_copy = opt_.miss_mode == MissMode::kCopy;
    if (opt_.miss_mode == MissMode::kAuto) {
      const int64_t v = m.gpu.victim();
      const bool free_slot = m.gpu.size() < m.gpu.capacity();
      do_copy = free_slot || (v >= 0 && m.gpu.priority(key) > m.gpu.priority(v));
    }
    const bool capped = opt_.max_step_copies >= 0 && step_copies >= opt_.max_step_copies;
    int g = -1;
    if (do_copy && !capped) {
      g = copy_to_gpu(c, key, seq, compute, copy, &waited, &st);
      if (!st.ok()) return st;
      copied = copied || g >= 0;
    }
    if (g >= 0) {
      m.gpu.hold(key);
      ++step_copies;
      continue;
    }
    const int h = m.host.slot_of(key);
    const bool readable = opt_.miss_mode != MissMode::kCopy || capped;
    const uint64_t addr = readable ? host_unit_addr(c, h) : 0;
    if (addr == 0)
      return Status(StatusCode::kOutOfMemory,
                    "expert GPU cache too small: " + std::to_string(opt_.gpu_slots) + " slots, all held by the " +
                        std::to_string(used.size()) + " experts of this step (raise memory_limit or max_experts, or "
                        "allow zero-copy)");
    tables_[key] = addr;
    m.hslot[h].last_zero_copy = seq;
    ++ct.zero_copy;
    ct.zero_copy_bytes += static_cast<uint64_t>(layout_.bytes);
  }
  if (copied) DSFP4_RETURN_IF_ERROR(record_copies(c, compute, copy));

  // compute waits for the copies of the slots it reads (two copy streams: each distinct event)
  std::vector<int64_t> need;
  for (int32_t e : used) {
    const int g = m.gpu.slot_of(base + e);
    if (g < 0) continue;
    GpuSlot& gs = m.gslot[g];
    gs.last_use = seq;
    gs.prefetched = false;
    if (gs.copy_tag > gs.waited_tag) {
      need.push_back(gs.copy_tag);
      gs.waited_tag = gs.copy_tag;
    }
  }
  std::sort(need.begin(), need.end());
  need.erase(std::unique(need.begin(), need.end()), need.end());
  if (opt_.async_copy)
    for (int64_t t : need) DSFP4_RETURN_IF_ERROR(dev::stream_wait(compute, kev(c, t), opt_.on_device));
  return write_table(c, device_tables_, layer, compute);
}

Status ExpertStore::prefetch(int layer, const int32_t* ids, int64_t count, Stream compute, Stream copy) {
  if (layer < 0 || layer >= opt_.layers) return InvalidArgument("prefetch: layer " + std::to_string(layer) + " out of range");
  if (count > 0 && ids == nullptr) return InvalidArgument("prefetch: ids is null");
  Impl& m = *impl_;
  const Ctx c{&m, &opt_, &layout_, files_.get(), tables_};
  const int64_t seq = m.seq;
  if (seq == 0) DSFP4_RETURN_IF_ERROR(dev::event_record(cev(c, 0), compute, opt_.on_device));
  sweep_host(c);
  std::vector<int32_t>& pred = m.predicted[static_cast<size_t>(layer)];
  pred.clear();
  if (++m.stamp_gen == INT32_MAX) {
    std::fill(m.stamp.begin(), m.stamp.end(), 0);
    m.stamp_gen = 1;
  }
  for (int64_t i = 0; i < count; ++i) {
    const int32_t e = ids[i];
    if (e < 0 || e >= opt_.experts || m.stamp[e] == m.stamp_gen) continue;
    m.stamp[e] = m.stamp_gen;
    pred.push_back(e);
  }
  ExpertCounters& ct = m.counters[static_cast<size_t>(layer)];
  ct.predicted += pred.size();
  const int64_t base = static_cast<int64_t>(layer) * opt_.experts;
  bool waited = false, copied = false;
  int issued = 0;
  Status st;
  for (int32_t e : pred) {
    const int64_t key = base + e;
    if (m.gpu.slot_of(key) >= 0) continue;
    const int h = m.host.slot_of(key);
    if (h < 0) {
      ensure_host(c, key, seq, false, layer);  // no free host slot: skip, the demand path will retry
      continue;
    }
    HostSlot& hs = m.hslot[h];
    if (hs.job.valid()) {
      if (hs.job.wait_for(std::chrono::seconds(0)) != std::future_status::ready) continue;  // still reading
      if (!finish_host(c, key).ok()) continue;  // the demand path reports the error if it needs it
    }
    if (opt_.miss_mode == MissMode::kZeroCopy) continue;  // nothing to gain from a speculative copy
    // a wrong guess costs a whole unit of bus time: copy only while guesses are good enough
    if (m.accuracy[static_cast<size_t>(layer)] < opt_.prefetch_min_accuracy) continue;
    if (opt_.max_prefetch_units >= 0 && issued >= opt_.max_prefetch_units) continue;
    const int g = copy_to_gpu(c, key, seq, compute, copy, &waited, &st);
    if (!st.ok()) return st;
    if (g < 0) break;  // every slot is held
    m.gslot[g].prefetched = true;
    m.gpu.hold(key);  // kept until the layer it was predicted for resolves
    m.prefetched[static_cast<size_t>(layer)].push_back(e);
    ++ct.prefetch_copies;
    ++issued;
    copied = true;
  }
  if (copied) DSFP4_RETURN_IF_ERROR(record_copies(c, compute, copy));
  // the layer's table now shows the new GPU residents (the routing filter reads it)
  return write_table(c, device_tables_, layer, compute);
}

Status ExpertStore::reconfigure(CachePolicy gpu_policy, double lambda, MissMode miss_mode, int max_prefetch_units,
                                double prefetch_min_accuracy, Stream compute) {
  if (miss_mode != MissMode::kCopy && !opt_.pinned && opt_.on_device)
    return InvalidArgument("reconfigure: zero-copy needs pinned host memory");
  Impl& m = *impl_;
  const Ctx c0{&m, &opt_, &layout_, files_.get(), tables_};
  const int64_t seq = ++m.seq;
  DSFP4_RETURN_IF_ERROR(dev::event_record(cev(c0, seq), compute, opt_.on_device));
  DSFP4_RETURN_IF_ERROR(dev::event_sync(cev(c0, seq), opt_.on_device));
  for (int i = 0; i < kEvents; ++i) DSFP4_RETURN_IF_ERROR(dev::event_sync(m.copy_ev[i], opt_.on_device));
  opt_.gpu_policy = gpu_policy;
  opt_.lambda = lambda;
  opt_.miss_mode = miss_mode;
  opt_.max_prefetch_units = max_prefetch_units;
  opt_.prefetch_min_accuracy = prefetch_min_accuracy;
  const int64_t keys = static_cast<int64_t>(opt_.layers) * opt_.experts;
  m.gpu = SlotCache(keys, opt_.gpu_slots, gpu_policy, lambda);
  for (GpuSlot& g : m.gslot) g = GpuSlot();
  for (auto& p : m.predicted) p.clear();
  for (auto& p : m.prefetched) p.clear();
  std::fill(m.accuracy.begin(), m.accuracy.end(), 1.0);
  const Ctx c{&m, &opt_, &layout_, files_.get(), tables_};
  for (int64_t k = 0; k < keys; ++k) tables_[k] = fallback_addr(c, k);
  if (device_tables_ != nullptr)
    DSFP4_RETURN_IF_ERROR(dev::copy_async(device_tables_, tables_, static_cast<size_t>(keys) * 8, compute, opt_.on_device));
  return Status::Ok();
}

Status ExpertStore::load_host(int layer, const int32_t* ids, int64_t count) {
  if (layer < 0 || layer >= opt_.layers) return InvalidArgument("load_host: layer out of range");
  Impl& m = *impl_;
  const Ctx c{&m, &opt_, &layout_, files_.get(), tables_};
  const int64_t base = static_cast<int64_t>(layer) * opt_.experts;
  std::vector<int64_t> keys;
  for (int64_t i = 0; i < count; ++i) {
    if (ids[i] < 0 || ids[i] >= opt_.experts) return InvalidArgument("load_host: expert id out of range");
    const int64_t key = base + ids[i];
    if (!ensure_host(c, key, m.seq, true, layer))
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

Status ExpertStore::set_pinned(int layer, int expert, bool pinned, Stream compute, Stream copy) {
  if (layer < 0 || layer >= opt_.layers || expert < 0 || expert >= opt_.experts)
    return InvalidArgument("set_pinned: (layer, expert) out of range");
  const int64_t key = static_cast<int64_t>(layer) * opt_.experts + expert;
  if (!pinned) {
    impl_->gpu.set_pinned(key, false);
    return Status::Ok();
  }
  if (impl_->gpu.slot_of(key) < 0) {
    const MissMode keep = opt_.miss_mode;
    opt_.miss_mode = MissMode::kCopy;  // pinning means a GPU copy
    const int32_t e = expert;
    Status st = resolve(layer, &e, 1, compute, copy);
    opt_.miss_mode = keep;
    DSFP4_RETURN_IF_ERROR(st);
  }
  impl_->gpu.set_pinned(key, true);
  return Status::Ok();
}

uint64_t ExpertStore::gpu_address(int layer, int expert) const {
  const int g = impl_->gpu.slot_of(static_cast<int64_t>(layer) * opt_.experts + expert);
  return g < 0 ? 0 : reinterpret_cast<uint64_t>(static_cast<uint8_t*>(opt_.gpu_base) + g * layout_.bytes);
}

uint64_t ExpertStore::host_address(int layer, int expert) const {
  const Ctx c{impl_.get(), &opt_, &layout_, files_.get(), tables_};
  const int h = impl_->host.slot_of(static_cast<int64_t>(layer) * opt_.experts + expert);
  return h < 0 ? 0 : host_unit_addr(c, h);
}

const uint8_t* ExpertStore::host_unit(int layer, int expert) const {
  const Ctx c{impl_.get(), &opt_, &layout_, files_.get(), tables_};
  const int h = impl_->host.slot_of(static_cast<int64_t>(layer) * opt_.experts + expert);
  if (h < 0 || impl_->hslot[h].job.valid()) return nullptr;
  return host_unit_ptr(c, h);
}

ExpertCounters ExpertStore::counters(int layer) const {
  const Impl& m = *impl_;
  if (layer >= 0) return m.counters[static_cast<size_t>(layer)];
  ExpertCounters t;
  for (const ExpertCounters& c : m.counters) {
    t.requests += c.requests;
    t.gpu_hits += c.gpu_hits;
    t.prefetch_hits += c.prefetch_hits;
    t.host_hits += c.host_hits;
    t.ssd_reads += c.ssd_reads;
    t.demand_ssd_reads += c.demand_ssd_reads;
    t.copies += c.copies;
    t.zero_copy += c.zero_copy;
    t.h2d_bytes += c.h2d_bytes;
    t.zero_copy_bytes += c.zero_copy_bytes;
    t.ssd_bytes += c.ssd_bytes;
    t.prefetch_copies += c.prefetch_copies;
    t.prefetch_wasted += c.prefetch_wasted;
    t.predicted += c.predicted;
    t.predicted_used += c.predicted_used;
    t.used_after_prediction += c.used_after_prediction;
    t.evictions += c.evictions;
    t.skipped += c.skipped;
    t.wait_ms += c.wait_ms;
  }
  return t;
}

void ExpertStore::reset_counters() {
  for (ExpertCounters& c : impl_->counters) c = ExpertCounters();
}

void ExpertStore::add_skipped(int layer, uint64_t n) {
  if (layer >= 0 && layer < opt_.layers) impl_->counters[static_cast<size_t>(layer)].skipped += n;
}

int ExpertStore::gpu_cached() const { return impl_->gpu.size(); }
int ExpertStore::host_cached() const { return impl_->host.size(); }

}  // namespace paging
}  // namespace dsfp4
