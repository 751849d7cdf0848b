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
  Fp8ExpertUnitLayout fp8;
  if (opt.format == ExpertFormat::kFp8Block) {
    DSFP4_RETURN_IF_ERROR(fp8_expert_unit_layout(opt.hidden, opt.inter, &fp8));
    ExpertUnitLayout l;             // the unit size every tier moves; no NVFP4 offsets to misread
    l.hidden = opt.hidden;
    l.inter = opt.inter;
    l.bytes = fp8.bytes;
    s->layout_ = l;
  }
  for (const StoredExpert& e : experts)
    for (const TensorRange& r : e.part)
      if (r.file < 0 || r.file >= files->num_files()) return InvalidArgument("ExpertStore: tensor " + r.name + " has no file");
  if (opt.on_device) DSFP4_RETURN_IF_ERROR(dev::set_device(0));
  const int64_t keys = static_cast<int64_t>(opt.layers) * opt.experts;
  s->impl_.reset(new Impl(keys, opt));
  Impl& m = *s->impl_;
  m.fp8 = fp8;
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
  if (m.cpu && m.cpu->call) m.cpu->call->wait();
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

// ---------------------------------------------------------------------------------------
// the CPU lane

namespace {
uint32_t* cpu_words(const CpuLane& L) { return reinterpret_cast<uint32_t*>(L.words->data()); }
uint64_t kernel_address(const HostBuffer& b, bool on_device) {
  return on_device ? b.device_address(0) : reinterpret_cast<uint64_t>(b.data());
}
}  // namespace

// Queues the CPU experts of one resolve: each writes its rows of the permuted output (as
// moe_permute places them: by expert, pairs in order) into the lane's y; when the call is
// done the layer's ok word (on success) and done word get the epoch.
Status submit_cpu_call(const Ctx& c, int layer, const int32_t* ids, int64_t count, uint32_t epoch,
                       const std::vector<std::pair<int32_t, int>>& experts, const std::vector<int>& tokens) {
  ExpertStore::Impl& m = *c.m;
  CpuLane& L = *m.cpu;
  const int E = c.opt->experts;
  const int K = L.opt.top_k;
  uint32_t* done = cpu_words(L) + layer;
  uint32_t* ok = cpu_words(L) + c.opt->layers + layer;
  std::vector<int64_t> off(static_cast<size_t>(E) + 1, 0);
  for (int64_t i = 0; i < count; ++i)
    if (ids[i] >= 0 && ids[i] < E) ++off[static_cast<size_t>(ids[i]) + 1];
  for (int e = 0; e < E; ++e) off[e + 1] += off[e];
  L.jobs.clear();
  L.rows.clear();
  std::vector<size_t> start;
  double equiv = 0;
  for (const auto& je : experts) {
    start.push_back(L.rows.size());
    for (int64_t i = 0; i < count; ++i)
      if (ids[i] == je.first) L.rows.push_back(static_cast<int32_t>(i / K));
    equiv += static_cast<double>(c.layout->bytes) * std::sqrt(std::max(1, tokens[static_cast<size_t>(je.first)]));
  }
  auto* y = reinterpret_cast<uint16_t*>(L.y->data());
  for (size_t j = 0; j < experts.size(); ++j) {
    const int32_t e = experts[j].first;
    CpuExpertJob job;
    job.expert = e;
    job.unit = host_unit_ptr(c, experts[j].second);
    job.rows = L.rows.data() + start[j];
    job.tokens = tokens[static_cast<size_t>(e)];
    job.y = y + off[static_cast<size_t>(e)] * c.opt->hidden;
    job.ldy = c.opt->hidden;
    L.jobs.push_back(job);
  }
  CpuExpertsCall call;
  call.layer = layer < static_cast<int>(L.opt.decoder_layers.size()) ? L.opt.decoder_layers[layer] : layer;
  call.layout = *c.layout;
  call.x = L.x->data();
  call.x_rows = count / K;
  call.ldx = c.opt->hidden;
  call.jobs = L.jobs.data();
  call.count = static_cast<int>(L.jobs.size());
  std::shared_ptr<CpuExpertsHandle> handle;
  Status st = L.pool->submit(call, &handle, [done, ok, epoch](const Status& r) {
    if (r.ok()) __atomic_store_n(ok, epoch, __ATOMIC_RELEASE);
    __atomic_store_n(done, epoch, __ATOMIC_RELEASE);
  });
  if (!st.ok()) {
    __atomic_store_n(done, epoch, __ATOMIC_RELEASE);  // nothing to wait for: the rows stay NaN
    return Status(st.code(), "MoE layer " + std::to_string(layer) + ": the CPU lane: " + st.message());
  }
  for (const auto& je : experts) m.hslot[static_cast<size_t>(je.second)].cpu_reader = handle;
  L.call = handle;
  L.call_layer = layer;
  L.call_equiv_bytes = equiv;
  return Status::Ok();
}

Status finish_cpu_call(const Ctx& c) {
  ExpertStore::Impl& m = *c.m;
  if (!m.cpu || !m.cpu->call) return Status::Ok();
  CpuLane& L = *m.cpu;
  CpuExpertsStats stats;
  Status st = L.call->wait(&stats);
  L.call.reset();
  ExpertCounters& ct = m.counters[static_cast<size_t>(L.call_layer)];
  ct.cpu_ms += stats.run_ms;
  if (st.ok() && stats.run_ms > 0 && L.call_equiv_bytes > 0) {
    // the rate at one token that this call showed (its experts' bytes, weighted as choose_lanes does)
    const double gbs = L.call_equiv_bytes / (stats.run_ms * 1e6);
    L.cpu_gbs = L.cpu_gbs > 0 ? 0.8 * L.cpu_gbs + 0.2 * gbs : gbs;
  }
  return st;
}

Status ExpertStore::enable_cpu_lane(const CpuLaneOptions& o) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  Impl& m = *impl_;
  if (m.cpu) return InvalidArgument("enable_cpu_lane: the CPU lane is already enabled");
  if (!opt_.async_copy) return InvalidArgument("enable_cpu_lane: needs async_copy (ready words order the GPU side)");
  if (opt_.format != ExpertFormat::kNvfp4)
    return Unsupported("enable_cpu_lane: the CPU expert kernels compute NVFP4 experts; these are FP8");
  if (o.max_rows <= 0 || o.top_k <= 0 || o.top_k > opt_.experts)
    return InvalidArgument("enable_cpu_lane: max_rows and top_k must be positive (top_k at most the experts)");
  if (!(o.bus_gbs > 0)) return InvalidArgument("enable_cpu_lane: bus_gbs (the measured host → device rate) must be positive");
  if (o.cpu_gbs < 0) return InvalidArgument("enable_cpu_lane: cpu_gbs must not be negative");
  if (!o.decoder_layers.empty() && static_cast<int>(o.decoder_layers.size()) != opt_.layers)
    return InvalidArgument("enable_cpu_lane: decoder_layers must name every MoE layer");
  auto L = std::make_unique<CpuLane>();
  L->opt = o;
  CpuExpertsOptions po;
  po.isa = o.isa;
  po.threads = o.threads;
  po.reserved_cores = o.reserved_cores;
  DSFP4_RETURN_IF_ERROR(CpuExpertPool::create(po, &L->pool));
  const bool pinned = opt_.on_device;
  const size_t row = static_cast<size_t>(opt_.hidden) * 2;
  DSFP4_RETURN_IF_ERROR(HostBuffer::create(static_cast<size_t>(o.max_rows) * row, pinned, &L->x));
  DSFP4_RETURN_IF_ERROR(HostBuffer::create(static_cast<size_t>(o.max_rows) * o.top_k * row, pinned, &L->y));
  DSFP4_RETURN_IF_ERROR(HostBuffer::create(static_cast<size_t>(opt_.layers) * 8, pinned, &L->words));
  if (opt_.on_device && (L->y->device_address(0) == 0 || L->words->device_address(0) == 0))
    return Unsupported("enable_cpu_lane: host memory could not be mapped for the GPU");
  std::memset(L->x->data(), 0, L->x->size());
  std::memset(L->words->data(), 0, L->words->size());
  L->bus_gbs = o.bus_gbs;
  L->cpu_gbs = o.cpu_gbs;
  if (L->cpu_gbs == 0) {
    // start value: this pool's one-token expert rate, measured on a zeroed scratch unit
    std::unique_ptr<HostBuffer> scratch;
    DSFP4_RETURN_IF_ERROR(HostBuffer::create(static_cast<size_t>(layout_.bytes), false, &scratch));
    std::memset(scratch->data(), 0, scratch->size());
    const int32_t row0 = 0;
    CpuExpertJob job;
    job.expert = 0;
    job.unit = scratch->data();
    job.rows = &row0;
    job.tokens = 1;
    job.y = L->y->data();
    job.ldy = opt_.hidden;
    CpuExpertsCall call;
    call.layout = layout_;
    call.x = L->x->data();
    call.x_rows = 1;
    call.ldx = opt_.hidden;
    call.jobs = &job;
    call.count = 1;
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      CpuExpertsStats st;
      DSFP4_RETURN_IF_ERROR(L->pool->run(call, &st));
      if (st.run_ms > 0) best = std::max(best, static_cast<double>(layout_.bytes) / (st.run_ms * 1e6));
    }
    L->cpu_gbs = best;
  }
  m.cpu = std::move(L);
  return Status::Ok();
}

bool ExpertStore::cpu_lane() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->cpu != nullptr;
}

void ExpertStore::set_cpu_lane_active(bool active) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  if (impl_->cpu) impl_->cpu->active = active;
}

CpuLaneView ExpertStore::cpu_lane_view() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  CpuLaneView v;
  const CpuLane* L = impl_->cpu.get();
  if (L == nullptr) return v;
  v.x = reinterpret_cast<uint64_t>(L->x->data());
  v.y_dev = kernel_address(*L->y, opt_.on_device);
  v.done_dev = kernel_address(*L->words, opt_.on_device);
  v.ok_dev = v.done_dev + static_cast<uint64_t>(opt_.layers) * 4;
  v.max_rows = L->opt.max_rows;
  v.top_k = L->opt.top_k;
  v.threads = L->pool->threads();
  v.isa = cpu_isa_name(L->pool->isa());
  v.bus_gbs = L->bus_gbs;
  v.cpu_gbs = L->cpu_gbs;
  return v;
}

void ExpertStore::inject_cpu_fault(int layer, int expert) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  if (!impl_->cpu) return;
  const auto& names = impl_->cpu->opt.decoder_layers;
  impl_->cpu->pool->inject_fault(layer >= 0 && layer < static_cast<int>(names.size()) ? names[layer] : layer, expert);
}

// ---------------------------------------------------------------------------------------

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
  {
    // the last CPU call was joined by the GPU before this layer's routing was published
    Status cst = finish_cpu_call(c);
    if (!cst.ok() && m.error.ok()) m.error = cst;
  }
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
  CpuLane* cpu = m.cpu.get();
  // decode only: a prefill's experts have many tokens each, where streaming them to the GPU wins
  if (cpu != nullptr && cpu->active && mode.ready && mode.cpu_ok && m.phase == 0 && count % cpu->opt.top_k == 0 &&
      count / cpu->opt.top_k <= cpu->opt.max_rows) {
    po.cpu_ok = true;
    po.bus_gbs = cpu->bus_gbs;
    po.cpu_gbs = cpu->cpu_gbs;
  }
  const std::vector<Lane> lane = choose_lanes(info, po);
  std::vector<std::pair<int32_t, int>> cpu_jobs;  // (expert, host slot)

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
    if (st.ok() && ln == Lane::kCpu) {
      st = write_ready(c, key, kCpuLaneAddress, mode.epoch, s);  // the GEMM skips it (NaN rows, replaced)
      if (st.ok()) {
        cpu_jobs.emplace_back(e, m.host.slot_of(key));
        ++ct.cpu_experts;
        ct.cpu_bytes += static_cast<uint64_t>(c.layout->bytes);
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
      if (!w.ok()) {
        if (!cpu_jobs.empty())  // the join must not wait for a call that never comes: its rows stay NaN
          __atomic_store_n(reinterpret_cast<uint32_t*>(m.cpu->words->data()) + layer, mode.epoch, __ATOMIC_RELEASE);
        return w;
      }
    }
    placed.emplace_back(e, ln);
  }
  ct.wait_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (!cpu_jobs.empty()) {
    Status st = submit_cpu_call(c, layer, ids, count, mode.epoch, cpu_jobs, tokens);
    if (!st.ok() && first_error.ok()) first_error = st;
  }
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
                                  std::vector<std::pair<int32_t, Lane>>* lanes, bool whole_routing) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  if (!opt_.async_copy) return InvalidArgument("resolve_ready: needs async_copy (the store's own copy stream)");
  if (sync_ == nullptr) return InvalidArgument("resolve_ready: set_device_tables was given no ready words");
  const Ctx c{impl_.get(), &opt_, &layout_, files_.get(), tables_, device_tables_, sync_, copy_};
  ResolveMode mode;
  mode.ready = true;
  mode.epoch = epoch;
  mode.compute = compute;
  mode.cpu_ok = whole_routing;
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
