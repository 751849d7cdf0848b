// ExpertStore internals shared by expert_store.cpp (tiers, placement, resolve) and
// store_pipeline.cpp (the decode pipeline's thread).
//
// Ordering rules (one copy stream, one compute stream):
//  - Every resolve gets a sequence number. A GPU slot or host unit read by resolve u is "held"
//    until the next resolve; after that it may be refilled once its readers are done:
//      * readers launched before a blocking/Python resolve s are ordered by the compute event
//        C[s] recorded at its start, so a refill of something last read by u waits C[u+1]
//        (the copy stream waits on the GPU; a host refill waits on the host);
//      * everything up to `synced_seq` is known complete (the host synchronised with compute);
//      * inside a pipeline step, the GPU publishes layer l+1 only after layer l's GEMMs ran,
//        so when the thread handles a publish every earlier reader is done.
//  - Copies into a slot and out of a host unit are followed at once by an event record on the
//    copy stream (per slot, per host unit). Being on one stream, a later record also covers the
//    earlier copies, so "latest record" is always a safe thing to wait for.
//  - Table and ready words reach the device by copies from a staging ring whose blocks are
//    reused only after the event recorded behind their last copy completed.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dsfp4/cpu_experts.h"
#include "dsfp4/fp8_gemm.h"
#include "dsfp4/paging.h"
#include "paging/device_ops.h"

namespace dsfp4 {
namespace paging {

constexpr int kComputeEvents = 256;  // ring of compute-stream marks, indexed by resolve sequence

class ThreadPool {
 public:
  explicit ThreadPool(int n);
  ~ThreadPool();
  // Demand work (a layer waits for it) runs before speculative work.
  void submit(std::function<void()> fn, bool urgent);

 private:
  void loop();
  std::vector<std::thread> workers_;
  std::deque<std::function<void()>> q_, urgent_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

// Pinned bytes that copies read from, in blocks reused only after their last copy completed.
class Staging {
 public:
  Status init(size_t block_bytes, int blocks, bool on_device);
  ~Staging();
  // Room for `bytes` (≤ block size) that stays untouched until the copies issued from it on
  // `stream` have run; call done(stream) after issuing them... implicitly, by the next alloc
  // that switches blocks (which records the old block's event on `stream`).
  Status alloc(size_t bytes, Stream stream, uint8_t** out);
  void release_all();

 private:
  std::unique_ptr<HostBuffer> buf_;
  std::vector<void*> ev_;
  std::vector<bool> used_;
  size_t block_ = 0, off_ = 0;
  int cur_ = 0, blocks_ = 0;
  bool on_device_ = true;
};

struct GpuSlot {
  int64_t last_use = -1;     // resolve sequence that last held it
  bool prefetched = false;   // filled by a speculative copy not yet used
  int64_t spec_bytes = -1;   // speculative copy in progress: bytes issued so far (-1: none)
  void* copy_ev = nullptr;   // recorded behind the latest copy into it
};

struct HostSlot {
  int64_t last_read = -1;    // resolve sequence that last read it in place (zero-copy)
  void* out_ev = nullptr;    // recorded behind the latest copy out of it
  std::shared_future<Status> job;  // fill in flight (valid until consumed)
  std::shared_ptr<CpuExpertsHandle> cpu_reader;  // the CPU lane's call that reads it in place
};

// The CPU lane (ExpertStore::enable_cpu_lane) and its call in flight.
struct CpuLane {
  CpuLaneOptions opt;
  std::unique_ptr<CpuExpertPool> pool;
  std::unique_ptr<HostBuffer> x, y, words;  // words: done [layers], ok [layers]
  double bus_gbs = 0, cpu_gbs = 0;
  bool active = true;
  std::shared_ptr<CpuExpertsHandle> call;   // the last call (its buffers below)
  int call_layer = -1;
  std::vector<CpuExpertJob> jobs;
  std::vector<int32_t> rows;
  double call_equiv_bytes = 0;              // the last call's unit bytes, weighted as choose_lanes does
};

struct SpecCopy {          // a speculative copy being issued chunk by chunk
  int64_t key;
  int slot;
};

struct ExpertStore::Impl {
  Impl(int64_t keys, const ExpertStoreOptions& o)
      : gpu(keys, o.gpu_slots, o.gpu_policy, o.lambda), host(keys, o.host_slots, o.host_policy, o.lambda) {}
  std::mutex mu;  // all state below (the Python thread and the pipeline thread both resolve)
  SlotCache gpu, host;
  std::unique_ptr<HostBuffer> host_units;
  std::unique_ptr<HostBuffer> mirror;
  std::vector<StoredExpert> stored;
  std::vector<GpuSlot> gslot;
  std::vector<HostSlot> hslot;
  std::vector<void*> compute_ev;  // ring, see kComputeEvents
  int64_t seq = 0;                // resolve sequence
  int64_t synced_seq = 0;         // readers of resolves ≤ this are known complete
  std::unique_ptr<ThreadPool> pool;
  std::vector<ExpertCounters> counters;
  std::vector<std::vector<int32_t>> predicted;   // per layer: experts predicted for its next resolve
  std::vector<std::vector<int32_t>> prefetched;  // per layer: experts copied speculatively
  std::vector<double> accuracy[2];               // [decode, prefill] per layer: running prediction accuracy
  int phase = 0;                                 // 1 while a prefill step runs
  std::vector<int64_t> pending;                  // keys whose host fill is in flight (pinned), oldest first
  std::vector<int32_t> stamp;                    // dedupe scratch
  int32_t stamp_gen = 0;
  std::vector<uint32_t> ready_mirror;            // value last written to each ready word
  std::deque<SpecCopy> spec;                     // speculative copies not fully issued
  Staging compute_staging, copy_staging;
  Status error;                                  // first error of the pipeline's thread in a step
  bool record = false;                           // record_routing
  std::vector<std::pair<int32_t, std::vector<int32_t>>> recorded;
  // pipeline
  std::unique_ptr<HostBuffer> mailbox;           // ring of publish entries (mapped)
  std::unique_ptr<HostBuffer> wait_flag;         // a timed-out kernel wait sets word 0
  int ring = 0;
  int64_t entry_bytes = 0;
  uint32_t next_publish = 1;                     // publish sequence the thread expects next (uint32, wraps)
  std::thread thread;
  std::condition_variable cv;
  bool stop = false, step_active = false, in_step_work = false;
  void* step_mark = nullptr;                     // compute-stream event for begin/end of a step
  Stream step_compute = nullptr;
  std::unique_ptr<CpuLane> cpu;                  // null until enable_cpu_lane
  Fp8ExpertUnitLayout fp8;                       // ExpertFormat::kFp8Block: the units' layout
};

// File-local helpers of expert_store.cpp that the pipeline also calls (mu held).
struct Ctx {
  ExpertStore::Impl* m;
  const ExpertStoreOptions* opt;
  const ExpertUnitLayout* layout;
  CheckpointFiles* files;
  uint64_t* tables;
  uint64_t* device_tables;
  uint32_t* sync;
  Stream copy;
};

// How a resolve treats ordering: blocking (compute waits for its copies) or ready words.
struct ResolveMode {
  bool ready = false;        // write ready words instead of making compute wait
  uint32_t epoch = 0;
  bool pipelined = false;    // called by the pipeline thread: earlier readers are done
  bool cpu_ok = false;       // ids are a whole layer's routing [rows, top_k]: the CPU lane may take misses
  Stream compute = nullptr;  // blocking, or ready from Python: the compute stream
};

// Tiers (store_tiers.cpp). Addresses of units: a GPU slot, a host unit (as kernels see it), or
// what a kernel can read for a key that is not in a GPU slot (its filled, mapped host unit; 0).
uint8_t* gpu_unit(const Ctx& c, int slot);
uint8_t* host_unit_ptr(const Ctx& c, int slot);
bool host_mapped(const Ctx& c);
uint64_t host_unit_addr(const Ctx& c, int slot);
uint64_t fallback_addr(const Ctx& c, int64_t key);
void* cev(const Ctx& c, int64_t s);
Stream copy_stream(const Ctx& c, Stream compute);
// Host cache: start a fill (captures what must finish before the unit is overwritten), wait for
// one, finish those done, or put a key in the cache (false: no slot free).
void start_fill(const Ctx& c, int64_t key, int h, bool urgent, bool pipelined);
Status finish_host(const Ctx& c, int64_t key);
void sweep_host(const Ctx& c);
bool ensure_host(const Ctx& c, int64_t key, bool demand, int layer, bool pipelined);
// GPU slots: take one for `key` with the copy stream ordered behind its last readers (-1: none);
// copy part of a unit into it (events recorded right behind); write a table entry and ready word
// behind everything queued, or a layer's rows from a snapshot.
int take_slot(const Ctx& c, int64_t key, Stream s, bool pipelined, Status* st);
Status copy_part(const Ctx& c, int64_t key, int g, int64_t off, int64_t n, Stream s);
Status write_ready(const Ctx& c, int64_t key, uint64_t addr, uint32_t epoch, Stream s);
Status write_rows(const Ctx& c, int layer, bool with_ready, Stream s, Staging& staging);
// Speculative copies: issue every remaining chunk (a demand needs it now), or stop one.
Status finish_spec(const Ctx& c, int g, Stream s);
void cancel_spec(const Ctx& c, int64_t key, int layer);

// The CPU lane: waits for its call in flight, adds its counters and rate, returns its status.
Status finish_cpu_call(const Ctx& c);

Status resolve_core(const Ctx& c, int layer, const int32_t* ids, int64_t count, const ResolveMode& mode,
                    std::vector<std::pair<int32_t, Lane>>* lanes);
Status prefetch_core(const Ctx& c, int layer, const int32_t* ids, int64_t count, bool pipelined, Stream compute);
// Issues the next chunk of speculative copies; returns false when none is left.
bool issue_spec_chunk(const Ctx& c, Stream compute);

}  // namespace paging
}  // namespace dsfp4
