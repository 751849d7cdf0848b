// Tiered weight paging: checkpoint files (SSD) → pinned host cache → GPU slots.
//
// Units. An MoE layer pages one expert at a time: gate, up and down of expert e with their
// scales, repacked into the tiled kernel layout (nvfp4.h) and laid out as one "expert unit"
// (ExpertUnitLayout). Other weights that do not stay resident (attention, dense MLP, shared
// expert) page one layer at a time through a ring of layer slots (LayerRing); their units are
// opaque byte blobs that the caller packs.
//
// Tiers.
//   CheckpointFiles  the model's safetensors shards, read with pread (O_DIRECT when the file
//                    system allows it) by a pool of I/O threads; no second copy on disk.
//   HostBuffer       page-locked host memory mapped into the device address space: the host
//                    cache of expert units (cpu_cache_size) and the layer units. A GPU kernel
//                    can read a unit straight from it ("zero-copy").
//   GPU slots        device memory the caller carved from its budget, one unit per slot.
//
// Expert resolution (ExpertStore::resolve) happens on the host between two pieces of GPU
// work, once per MoE layer and step: the selected experts are looked up, missing ones read
// from disk into the host cache, then either copied into a GPU slot (copy stream) or left in
// host memory for the GEMM to read in place; the layer's expert → unit-address table is
// written to the device on the compute stream, which waits only for the copies it needs.
// Prefetch takes the experts predicted for the next MoE layer and starts their copies (and
// disk reads) at once. Streams and events order everything; nothing here synchronises the
// device except for waits on specific events, and nothing allocates device memory.
//
// CPU mode (ExpertStoreOptions::on_device = false, or a build without CUDA): "device" memory
// is host memory and copies are memcpy, so the whole pipeline runs and is tested without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dsfp4/common.h"
#include "dsfp4/expert_source.h"

namespace dsfp4 {
namespace paging {

constexpr int64_t kUnitAlign = 256;  // byte alignment of every part of a unit

// ---------------------------------------------------------------------------------------
// expert units

// The store's expert unit (dsfp4::ExpertUnitLayout, expert_source.h): gate_up is the
// [2·inter, hidden] weight (gate rows, then up rows), down is [hidden, inter]; both in the
// tiled layout with one float32 global scale per 16-row tile (gate and up keep their own
// weight_scale_2), every part kUnitAlign-aligned, bytes a multiple of kUnitAlign.
Status expert_unit_layout(int64_t hidden, int64_t inter, ExpertUnitLayout* out);

// One NVFP4 linear as ModelOpt stores it: packed uint8 [n, k/2], scale e4m3 [n, k/16],
// global scale (weight_scale_2).
struct ModeloptLinear {
  const uint8_t* packed = nullptr;
  const uint8_t* scale = nullptr;
  float global_scale = 0.0f;
};

// Repacks gate [inter, hidden], up [inter, hidden] and down [hidden, inter] into an expert
// unit (host memory, layout.bytes, kUnitAlign-aligned). `threads` > 1 splits the work.
Status expert_unit_from_modelopt(const ExpertUnitLayout& layout, const ModeloptLinear& gate,
                                 const ModeloptLinear& up, const ModeloptLinear& down, uint8_t* unit,
                                 int threads = 1);

// ---------------------------------------------------------------------------------------
// host memory

// Page-locked host memory mapped into the device address space (cudaHostAlloc with
// cudaHostAllocMapped | cudaHostAllocPortable), or plain aligned memory when `pinned` is
// false or the build/machine has no CUDA device (device_address() is then 0).
class HostBuffer {
 public:
  static Status create(size_t bytes, bool pinned, std::unique_ptr<HostBuffer>* out);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  uint8_t* data() const { return host_; }
  size_t size() const { return bytes_; }
  bool pinned() const { return pinned_; }
  // Address of byte `offset` as device code sees it (0 when not mapped).
  uint64_t device_address(size_t offset) const { return device_ ? device_ + offset : 0; }

 private:
  HostBuffer() = default;
  uint8_t* host_ = nullptr;
  uint64_t device_ = 0;
  size_t bytes_ = 0;
  bool pinned_ = false;
};

// ---------------------------------------------------------------------------------------
// checkpoint files

// A byte range of one stored tensor; `name` is used in error messages.
struct TensorRange {
  int32_t file = -1;
  int64_t offset = 0;
  int64_t nbytes = 0;
  std::string name;
};

struct ReadCounters {
  uint64_t bytes = 0;        // bytes delivered to callers
  uint64_t device_bytes = 0; // bytes read from the files (with O_DIRECT alignment padding)
  uint64_t reads = 0;        // pread calls
  uint64_t direct_reads = 0; // of which through O_DIRECT
  double seconds = 0.0;      // summed over threads
};

// The checkpoint's shard files, opened once. Reads are pread loops (short reads and EINTR
// handled); with direct_io the file is also opened with O_DIRECT and aligned ranges are read
// through it into an aligned scratch buffer, bypassing the page cache; file systems that
// refuse O_DIRECT fall back to buffered reads. Each file's identity (device, inode, size,
// modification time) is recorded at open and checked (one fstat) after every read: a file
// changed since, in place or by truncation, fails the read with a Status naming it and how it
// changed, whatever bytes were read. Only regular files open. Thread-safe.
class CheckpointFiles {
 public:
  static Status open(const std::vector<std::string>& paths, bool direct_io, std::unique_ptr<CheckpointFiles>* out);
  ~CheckpointFiles();
  CheckpointFiles(const CheckpointFiles&) = delete;
  CheckpointFiles& operator=(const CheckpointFiles&) = delete;

  // Reads r.nbytes bytes at r.offset of file r.file into dst. Errors name the file and tensor
  // (kInternal: an I/O error, a short read, or a file changed since open).
  Status read(const TensorRange& r, void* dst);
  const std::string& path(int file) const { return paths_[file]; }
  int num_files() const { return static_cast<int>(paths_.size()); }
  bool direct_io() const { return direct_; }
  ReadCounters counters() const;
  void reset_counters();

  // Fault injection for tests: reads of `file` that touch bytes at or past `offset` fail with
  // errno `err` (EIO by default). offset < 0 removes the fault.
  void inject_fault(int file, int64_t offset, int err = 5);

 private:
  CheckpointFiles() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<std::string> paths_;
  bool direct_ = false;
};

// ---------------------------------------------------------------------------------------
// cache policy

enum class CachePolicy : int {
  kLru = 0,   // least recently used (the ablation)
  kLrfu = 1,  // frequency and recency: each key keeps a combined recency-frequency value
              //   crf ← 1 + crf · 2^(−λ·Δt) at every use (t counts steps); the key with the
              //   smallest current crf is evicted. λ → 0 is LFU, large λ is LRU. History is
              //   kept for keys that are not cached, so a returning hot key is recognised.
};

// Maps keys in [0, num_keys) to slots in [0, capacity) under a policy. Keys may be pinned
// (never evicted) or held for the current step (not evictable until released). Not
// thread-safe: one owner drives it.
class SlotCache {
 public:
  SlotCache(int64_t num_keys, int capacity, CachePolicy policy, double lambda);

  int slot_of(int64_t key) const { return key_slot_[key]; }
  int64_t key_of(int slot) const { return slot_key_[slot]; }
  int capacity() const { return static_cast<int>(slot_key_.size()); }
  int size() const { return used_; }

  // Records a use of `key` at the current time (cached or not: history is kept either way).
  void touch(int64_t key);
  // Advances time by one step.
  void tick() { ++now_; }
  double now() const { return now_; }
  // Priority of a key (higher = more worth keeping): its current crf under kLrfu, its last
  // use time under kLru.
  double priority(int64_t key) const;

  // A slot for `key`: a free one, else the slot of the lowest-priority key that is neither
  // pinned nor held (that key is evicted and returned in *evicted, else -1). -1 when every
  // slot is pinned or held. The key's slot mapping is set; the caller fills the slot.
  int insert(int64_t key, int64_t* evicted);
  // The key that insert() would evict now (-1 if a slot is free or none can be evicted).
  int64_t victim() const;
  void erase(int64_t key);
  // Slots insert() could fill now: free ones and those of evictable keys.
  int available() const;
  // Makes a cached key the first to be evicted (its history is forgotten).
  void demote(int64_t key);

  void hold(int64_t key);     // not evictable until release_holds()
  void release_holds();
  bool held(int64_t key) const;
  void set_pinned(int64_t key, bool pinned);
  bool pinned(int64_t key) const;

 private:
  void reindex(int64_t key);
  double score(int64_t key) const;  // static ordering key: log2(crf) + λ·t (LRFU), t (LRU)

  CachePolicy policy_;
  double lambda_;
  double now_ = 1.0;
  int used_ = 0;
  std::vector<int> key_slot_;
  std::vector<int64_t> slot_key_;
  std::vector<double> crf_, last_;
  std::vector<uint8_t> flags_;  // bit 0 pinned, bit 1 held
  std::vector<int64_t> held_;
  struct Impl;
  std::shared_ptr<Impl> order_;  // evictable keys ordered by score
  std::vector<int> free_;
};

// ---------------------------------------------------------------------------------------
// expert store

enum class MissMode : int {
  kCopy = 0,      // every missed expert is copied into a GPU slot, then computed
  kZeroCopy = 1,  // missed experts are computed straight from pinned host memory
  kAuto = 2,      // copy when the policy would keep the expert (it is likely reused), else zero-copy
};

// How routed experts are stored in the checkpoint and held in units.
enum class ExpertFormat : int {
  kNvfp4 = 0,     // ModelOpt NVFP4 (weight, weight_scale, weight_scale_2) → ExpertUnitLayout
  kFp8Block = 1,  // DeepSeek FP8 (weight e4m3, weight_scale_inv 128×128) → Fp8ExpertUnitLayout
};

// Where a routed expert of one resolve is computed.
enum class Lane : uint8_t {
  kGpu = 0,     // already in a GPU slot (a hit)
  kCopy = 1,    // copied into a GPU slot now, computed from there
  kMapped = 2,  // read in place by the GEMM from the pinned, mapped host cache ("zero-copy")
  kCpu = 3,     // computed on the CPU from the host cache (ExpertStore::enable_cpu_lane); its
                // table entry is kCpuLaneAddress and cpu_lane_join puts its rows in place
  kFailed = 4,  // could not be made readable (a read error): its rows become NaN
};
const char* lane_name(Lane lane);

// The one miss policy (miss_policy.cpp). Inputs for one missed expert of a resolve.
struct MissInfo {
  bool keep = false;   // the GPU cache policy would keep it (a free slot, or it outranks the victim)
  int tokens = 1;      // rows routed to it in this resolve
};

struct MissPolicyOptions {
  MissMode mode = MissMode::kCopy;
  int max_copies = -1;          // most copies into GPU slots (-1: no cap); the rest are read in place
  int free_slots = 0;           // GPU slots that can take a copy now (not pinned or held)
  bool mapped_ok = false;       // the host cache is mapped: kMapped is possible
  bool cpu_ok = false;          // a CPU expert lane exists (ExpertStore::enable_cpu_lane)
  double bus_gbs = 0;           // measured host → device copy rate
  double cpu_gbs = 0;           // measured CPU expert rate (GB/s of unit bytes) at 1 token
  int64_t unit_bytes = 0;
};

// Lanes for the misses of one resolve, in order: kCopy / kMapped by the miss mode, the copy cap
// and the free slots; kFailed where neither is possible (no slot and no mapped host cache).
// When cpu_ok, moves misses to kCpu while that shortens the slower of the two lanes, so that
// the bus and the CPU finish together (rates measured, never fixed thresholds).
std::vector<Lane> choose_lanes(const std::vector<MissInfo>& misses, const MissPolicyOptions& opt);

struct ExpertStoreOptions {
  int layers = 0;             // MoE layers (the store numbers them 0..layers-1)
  int experts = 0;            // routed experts per layer
  int64_t hidden = 0, inter = 0;
  int gpu_slots = 0;          // units in gpu_base
  void* gpu_base = nullptr;   // device memory of gpu_slots units (host memory in CPU mode)
  int host_slots = 0;         // units of pinned host cache (allocated by the store)
  bool pinned = true;         // page-locked, mapped host cache (needed for zero-copy)
  bool on_device = true;      // false: CPU mode
  CachePolicy gpu_policy = CachePolicy::kLrfu;
  CachePolicy host_policy = CachePolicy::kLru;
  double lambda = 0.05;       // LRFU decay per step
  MissMode miss_mode = MissMode::kCopy;
  int io_threads = 8;
  int repack_threads = 2;     // CPU threads per unit repack
  bool direct_io = true;
  bool async_copy = true;     // false: copies run on the compute stream (no overlap)
  int max_prefetch_units = -1;  // cap on speculative copies per prefetch call (-1: no cap)
  // speculative copies for a layer stop while its measured prediction accuracy (a running
  // average of |predicted ∩ used| / |used|) is below this; disk reads into the host cache go on
  double prefetch_min_accuracy = 0.0;
  // most missed experts one resolve copies into GPU slots; the rest are read in place from the
  // host cache (needs a mapped host cache; -1: no cap)
  int max_step_copies = -1;
  // speculative copies run in chunks of this many bytes, issued one at a time while no demand
  // copy waits, so a wrong guess costs only bus time nothing else wanted
  int64_t spec_chunk_bytes = 4 << 20;
  // decode pipeline (see ExpertStore::start_pipeline): most routed ids and predicted ids one
  // publish carries
  int pipeline_max_ids = 0, pipeline_max_pred = 0;
  uint64_t wait_timeout_ms = 30000;  // a kernel waiting for an expert gives up after this
  // CPU mode only, for tests of ordering: copies run on simulated asynchronous streams, each
  // delayed by this many microseconds, with real events (0: copies are plain memcpy)
  int sim_copy_delay_us = 0;
  // kFp8Block: each StoredExpert's parts 0, 1 / 3, 4 / 6, 7 are gate / up / down weight and
  // weight_scale_inv (parts 2, 5, 8 unused); layout() holds only hidden, inter and the FP8 unit's
  // bytes (the NVFP4 offsets are 0), and the
  // kernels read units through fp8_expert_unit_gate_up / _down. No CPU lane (NVFP4 only).
  ExpertFormat format = ExpertFormat::kNvfp4;
};

// Where the stored tensors of one expert lie: gate, up, down × (weight, weight_scale,
// weight_scale_2).
struct StoredExpert {
  TensorRange part[9];
};

// Counters, per layer and summed. Bytes are unit bytes. One list (X-macro) declares the fields,
// sums them over layers and binds them to Python.
#define DSFP4_EXPERT_COUNTERS(X)                                                                        \
  X(uint64_t, requests)              /* (expert, step) pairs resolved */                                \
  X(uint64_t, gpu_hits)              /* already in a GPU slot (or its prefetch copy was under way) */   \
  X(uint64_t, prefetch_hits)         /* of the hits: brought in by prefetch */                          \
  X(uint64_t, host_hits)             /* missed the GPU, found in the host cache */                      \
  X(uint64_t, ssd_reads)             /* units read from disk (demand + prefetch) */                     \
  X(uint64_t, demand_ssd_reads)                                                                         \
  X(uint64_t, copies)                /* host → GPU unit copies (demand + prefetch) */                   \
  X(uint64_t, zero_copy)             /* units computed from host memory */                              \
  X(uint64_t, cpu_experts)           /* units computed on the CPU */                                    \
  X(uint64_t, cpu_bytes)             /* unit bytes the CPU lane read */                                 \
  X(uint64_t, failed)                /* units that could not be made readable (NaN rows) */            \
  X(uint64_t, h2d_bytes)             /* host → GPU bytes (copies, speculative chunks included) */       \
  X(uint64_t, zero_copy_bytes)       /* bytes the GEMM read over the bus (zero-copy units) */           \
  X(uint64_t, ssd_bytes)             /* bytes read from files */                                        \
  X(uint64_t, prefetch_copies)       /* speculative copies started */                                   \
  X(uint64_t, prefetch_wasted)       /* speculative copies of experts the layer did not use */          \
  X(uint64_t, prefetch_cancelled)    /* of those: stopped before all their chunks were copied */        \
  X(uint64_t, predicted)             /* experts predicted for the layer */                              \
  X(uint64_t, predicted_used)        /* |predicted ∩ used| */                                           \
  X(uint64_t, used_after_prediction) /* |used| over the steps that had a prediction */                  \
  X(uint64_t, evictions)                                                                                \
  X(uint64_t, skipped)               /* routed experts dropped by expert_threshold (by the caller) */   \
  X(uint64_t, publishes)             /* pipeline: routed-id publishes handled */                        \
  X(double, wait_ms)                 /* host time resolve() blocked on disk reads */                    \
  X(double, publish_to_ready_ms)     /* pipeline: publish seen → last ready word issued, summed */      \
  X(double, cpu_ms)                  /* CPU lane: time its calls ran (first work item → last) */

struct ExpertCounters {
#define DSFP4_DECLARE_COUNTER(type, name) type name = 0;
  DSFP4_EXPERT_COUNTERS(DSFP4_DECLARE_COUNTER)
#undef DSFP4_DECLARE_COUNTER
  ExpertCounters& operator+=(const ExpertCounters& o) {
#define DSFP4_ADD_COUNTER(type, name) name += o.name;
    DSFP4_EXPERT_COUNTERS(DSFP4_ADD_COUNTER)
#undef DSFP4_ADD_COUNTER
    return *this;
  }
};

// What the kernels of the decode pipeline read and write (ExpertStore::pipeline_view): the
// route-publish kernel (publish_route) writes routed and predicted ids into a mailbox in
// mapped host memory; the expert GEMMs wait on per-expert ready words (Fp4GroupedWeight::
// unit_ready) that the store's thread writes by host → device copies.
#if defined(__CUDACC__)
#define DSFP4_HOST_DEVICE __host__ __device__
#else
#define DSFP4_HOST_DEVICE
#endif

struct PipelineView {
  uint64_t mailbox = 0;         // device address of the mailbox ring (mapped host memory)
  int32_t ring = 0;             // entries in the ring
  int32_t entry_bytes = 0;      // bytes per entry
  int32_t max_ids = 0, max_pred = 0;
  uint32_t* sync = nullptr;     // device words: ready [layers][experts], epochs [layers], publish count
  int32_t layers = 0, experts = 0;
  uint32_t* wait_failed = nullptr;  // mapped host word a timed-out wait sets
  uint64_t wait_timeout_ns = 0;
  bool on_device = true;
  DSFP4_HOST_DEVICE uint32_t* ready(int layer) const { return sync + static_cast<int64_t>(layer) * experts; }
  DSFP4_HOST_DEVICE uint32_t* epoch(int layer) const { return sync + static_cast<int64_t>(layers) * experts + layer; }
  DSFP4_HOST_DEVICE uint32_t* publish_count() const {
    return sync + static_cast<int64_t>(layers) * experts + layers;
  }
};
// Device words PipelineView::sync needs for a store of `layers` × `experts` (zeroed by the caller).
inline int64_t pipeline_sync_words(int layers, int experts) {
  return static_cast<int64_t>(layers) * experts + layers + 1;
}

// After routing MoE layer `layer`: bumps the layer's epoch and publishes ids [n_ids] (values
// outside [0, experts) are ignored by the store) and the predicted ids [n_pred] of MoE layer
// `next_layer` (-1: none) to the store's thread. One tiny kernel on `stream`; no host sync;
// capturable in CUDA graphs. CPU mode (view.on_device false): runs on the calling thread, the
// pointers are host pointers.
Status publish_route(const PipelineView& view, int layer, int next_layer, const int32_t* ids, int64_t n_ids,
                     const int32_t* pred, int64_t n_pred, Stream stream);

// The CPU expert lane (ExpertStore::enable_cpu_lane). In a decode step, misses that
// choose_lanes puts on the CPU are computed by a pool of pinned CPU threads from the host cache
// while the GPU computes the rest: their table entry is kCpuLaneAddress (the GEMM writes NaN
// rows for it, as for any address it cannot read), the CPU writes their rows of the permuted
// output into `y` (mapped host memory, rows placed as moe_permute places them), and
// cpu_lane_join, run after the down GEMM, waits for the layer's done word and copies them over.
constexpr uint64_t kCpuLaneAddress = 1;

struct CpuLaneOptions {
  int threads = 0;                  // 0: every core this process may use but `reserved_cores`
  std::string isa = "auto";         // cpu_experts.h
  std::vector<int> reserved_cores;  // kept free for the threads that drive the GPU and the I/O
  int max_rows = 0;                 // tokens of one forward (rows of x)
  int top_k = 0;                    // routed experts per token (ids of a resolve are [rows, top_k])
  double bus_gbs = 0;               // host → device rate measured at start-up (> 0)
  double cpu_gbs = 0;               // start value of the CPU rate at one token (0: measured on
                                    // a scratch unit at enable time), then averaged over its calls
  std::vector<int> decoder_layers;  // the model's layer number of each MoE layer (error messages;
                                    // empty: the store's numbering)
};

// Addresses the engine uses: x receives the MoE input rows ([max_rows, hidden] bf16, host
// memory the GPU copies into before it publishes the routing); y holds the CPU's rows
// ([max_rows·top_k, hidden] bf16); done/ok are per-layer words (set to the epoch when the
// layer's CPU call finished / succeeded). *_dev are the addresses kernels read.
struct CpuLaneView {
  uint64_t x = 0, y_dev = 0, done_dev = 0, ok_dev = 0;
  int max_rows = 0, top_k = 0, threads = 0;
  std::string isa;
  double bus_gbs = 0, cpu_gbs = 0;  // the rates choose_lanes uses now
};

// After the down GEMM of a MoE layer: rows of experts whose table entry is kCpuLaneAddress are
// copied from the CPU lane's y once the layer's done word reaches the epoch (and only if its ok
// word does too: a failed CPU call leaves the GEMM's NaN rows). One kernel, capturable; CPU mode
// runs on the calling thread. A wait past timeout_ns sets *wait_failed and copies nothing.
struct CpuLaneJoin {
  void* y_perm = nullptr;              // bf16 [rows, hidden], rows grouped by expert
  const int32_t* row_offsets = nullptr;  // [experts + 1]
  const uint64_t* table = nullptr;     // [experts] the layer's device table
  int experts = 0;
  int64_t hidden = 0;
  const uint32_t* epoch = nullptr;     // the layer's epoch word
  const uint32_t* done = nullptr;      // the layer's done / ok words (CpuLaneView)
  const uint32_t* ok = nullptr;
  const void* y_cpu = nullptr;         // CpuLaneView::y_dev
  int64_t y_cpu_rows = 0;              // rows y_cpu holds (max_rows · top_k): rows past it are never read
  uint32_t* wait_failed = nullptr;
  uint64_t timeout_ns = 0;
  bool on_device = true;
};
Status cpu_lane_join(const CpuLaneJoin& j, Stream stream);

class ExpertStore {
 public:
  // experts: [layers][experts] stored locations (NVFP4 ModelOpt tensors in `files`).
  static Status create(const ExpertStoreOptions& opt, std::shared_ptr<CheckpointFiles> files,
                       std::vector<StoredExpert> experts, std::unique_ptr<ExpertStore>* out);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  const ExpertUnitLayout& layout() const { return layout_; }
  const ExpertStoreOptions& options() const { return opt_; }
  // Device table of layer l: [experts] uint64 unit addresses, written by resolve(); the caller
  // owns the device memory (layers × experts × 8 bytes) and passes it here once. `sync`
  // (optional; pipeline_sync_words() uint32 words of device memory, zeroed) holds the ready
  // words and epochs of the decode pipeline.
  void set_device_tables(uint64_t* device_tables, uint32_t* sync = nullptr);
  uint64_t* device_tables() const { return device_tables_; }
  // Host mirror of the tables (pinned): current address of every expert (GPU slot, host
  // unit if mapped, or 0).
  const uint64_t* host_tables() const { return tables_; }
  // The store's stream for host → device copies (null in CPU mode or without async_copy).
  Stream copy_stream() const { return copy_; }

  // Starts a step (decode token or prefill pass): advances the policies' clock. Prediction
  // accuracy (the gate of speculative copies) is kept apart for prefill and decode steps.
  void begin_step(bool prefill = false);

  // Makes the experts in ids[0..count) (entries < 0 or ≥ experts are ignored, repeats are
  // fine) of MoE layer `layer` usable by kernels on `compute`: reads missing units from disk,
  // places each miss on a lane (choose_lanes), copies, writes the layer's device table on
  // `compute` and makes `compute` wait for the copies it needs. Blocks the host only while
  // units it needs are read from disk. On error the store stays consistent (no half-filled
  // unit is ever mapped) and the message names the file and tensor. `lanes` (optional)
  // receives the lane of every distinct expert, in ascending expert order.
  Status resolve(int layer, const int32_t* ids, int64_t count, Stream compute,
                 std::vector<std::pair<int32_t, Lane>>* lanes = nullptr);

  // Like resolve(), but nothing waits on `compute`: each expert's table entry and ready word
  // (set_device_tables' sync) are written by copies on the copy stream, the ready word last,
  // with `epoch` (the value the layer's epoch word has when the GEMM runs); a GEMM given the
  // ready words computes each expert as it lands. A failed expert still gets its ready word,
  // with address 0 (NaN rows), so no GEMM waits forever; the error is returned (and, on the
  // pipeline's thread, kept for end_pipeline_step). Used by the pipeline thread and by prefill.
  // whole_routing: ids are the layer's routing, [rows, top_k] in token order (not a subset such
  // as a prefill wave), so the CPU lane may take misses and cpu_lane_join will follow.
  Status resolve_ready(int layer, const int32_t* ids, int64_t count, uint32_t epoch, Stream compute,
                       std::vector<std::pair<int32_t, Lane>>* lanes = nullptr, bool whole_routing = false);

  // Speculative: starts bringing the experts in ids[0..count) of `layer` towards the GPU
  // (disk reads in the background; copies of host-resident units, in chunks, into free or
  // low-priority GPU slots, never evicting the experts held by the last resolve). Records them
  // as the prediction for the layer's next resolve (accuracy and wasted bytes are counted there).
  // `compute` runs the copies when async_copy is off.
  Status prefetch(int layer, const int32_t* ids, int64_t count, Stream compute);

  // Decode pipeline. start_pipeline allocates the mailbox and starts the store's resolver
  // thread; between begin_pipeline_step(compute) and end_pipeline_step() the thread resolves
  // every layer the GPU publishes (publish_route) with resolve_ready at the published epoch and
  // prefetches its prediction (chunks issued while no publish waits), while the GPU goes on.
  // Both calls synchronise with `compute` (the step's work before and after them is done);
  // end_pipeline_step returns the step's first error (a failed read names the file, tensor and
  // layer; a timed-out wait says so).
  Status start_pipeline();
  Status begin_pipeline_step(Stream compute);
  Status end_pipeline_step();
  // The pipeline's GEMMs wait on the compute stream for copies the thread issues later on the
  // copy stream; if both streams share a hardware queue, those copies sit behind the waiting
  // work. Probes each stream in `computes` against the copy stream, replacing the copy stream
  // (up to max_tries probes) until all pass; *ok false: none did (e.g. CUDA_DEVICE_MAX_CONNECTIONS=1).
  // Not during a step; a no-op in CPU mode.
  Status check_copy_stream(const std::vector<Stream>& computes, int max_tries, bool* ok, int* tries);
  PipelineView pipeline_view() const;
  bool pipeline_running() const;
  // The first error recorded by resolve_ready since the last call, or a kernel's wait that timed
  // out (call it after synchronising with compute), then cleared.
  Status take_error();

  // Changes the GPU cache policy, the miss mode, the prefetch cap and the GPU slots in use
  // (active_slots ≤ gpu_slots; -1: all) between steps: waits until `compute` and the copy stream
  // are idle, then empties the GPU expert cache (its units stay in the host cache) and rewrites
  // every device table.
  Status reconfigure(CachePolicy gpu_policy, double lambda, MissMode miss_mode, int max_prefetch_units,
                     double prefetch_min_accuracy, Stream compute, int active_slots = -1);
  // Records the distinct experts of every resolve (layer, ascending ids) until turned off, for
  // offline analysis (the benchmark's optimal-cache floor); take_routing() hands them over.
  void record_routing(bool on);
  std::vector<std::pair<int32_t, std::vector<int32_t>>> take_routing();
  // Reads expert units of `layer` into the host cache now (warm start); returns after all
  // reads finished.
  Status load_host(int layer, const int32_t* ids, int64_t count);
  // Pins (never evicted from the GPU cache) or unpins an expert; pinning loads it.
  Status set_pinned(int layer, int expert, bool pinned, Stream compute);
  // Prefill: the experts of MoE layers before `layer` are the first to be evicted (they are not
  // needed again before the next step).
  void demote_layers_before(int layer);

  // The CPU expert lane: a pool of CPU threads computes the decode misses choose_lanes puts
  // on it (needs async_copy: ready words order the GPU's side). Rates: bus_gbs as measured by
  // the caller, the CPU's from its own calls (a running average). Called once, before any step.
  Status enable_cpu_lane(const CpuLaneOptions& options);
  bool cpu_lane() const;
  // Between steps: the enabled lane takes misses (true, the default) or stands idle.
  void set_cpu_lane_active(bool active);
  CpuLaneView cpu_lane_view() const;
  // Tests: the next CPU job of (layer, expert) fails as if its unit were corrupt.
  void inject_cpu_fault(int layer, int expert);

  // Host and device address of the unit of (layer, expert), 0 where it is not (tests).
  uint64_t gpu_address(int layer, int expert) const;
  uint64_t host_address(int layer, int expert) const;
  const uint8_t* host_unit(int layer, int expert) const;

  ExpertCounters counters(int layer) const;  // layer < 0: summed over layers
  void reset_counters();
  void add_skipped(int layer, uint64_t n);
  int gpu_cached() const;
  int host_cached() const;
  CheckpointFiles& files() { return *files_; }
  // Waits until every copy the store issued has finished (tests, shutdown).
  Status sync_copies();

  struct Impl;  // opaque

 private:
  ExpertStore() = default;
  void pipeline_loop();
  std::unique_ptr<Impl> impl_;
  ExpertStoreOptions opt_;
  ExpertUnitLayout layout_;
  std::shared_ptr<CheckpointFiles> files_;
  uint64_t* tables_ = nullptr;         // host mirror, pinned when possible
  uint64_t* device_tables_ = nullptr;  // caller's device memory
  uint32_t* sync_ = nullptr;           // caller's device memory (pipeline_sync_words)
  Stream copy_ = nullptr;              // the store's copy stream (one: see expert_store.cpp)
};

// ---------------------------------------------------------------------------------------
// expert source

// An ExpertStore as the ExpertSource (expert_source.h) of the expert runner
// (moe_experts_units_cuda, or moe_experts_units_cpu in CPU mode) and of Dsfp4MoeExperts
// plugins with weight_source = "store" (register it with dsfp4_trt_set_expert_source). Layer
// l of the source is MoE layer l of the store. The store's owner still sets its device tables
// (acquire hands out their rows) and calls begin_step() once per step. Every acquire must use
// the same stream (or streams ordered with each other): the store orders slot reuse by events
// recorded on the stream of the latest resolve. One thread drives it, as it drives the store.
class ExpertStoreSource : public ExpertSource {
 public:
  // `store` is not owned and must outlive the adapter. Copies run on the store's own stream.
  static Status create(ExpertStore* store, std::unique_ptr<ExpertStoreSource>* out);
  ~ExpertStoreSource() override;
  ExpertStoreSource(const ExpertStoreSource&) = delete;
  ExpertStoreSource& operator=(const ExpertStoreSource&) = delete;

  // Reads the ids to the host (device store: a copy on `stream`, then waits for `stream`, so
  // not under CUDA graph capture; CPU mode: they are host pointers), resolves them with
  // `stream` as the compute stream and returns the layer's row of the device tables with the
  // store's layout (per-tile scales).
  Status acquire(int layer, const int32_t* expert_ids, int64_t count, Stream stream, ExpertTable* table) override;
  // Records nothing: the store keeps the experts of its latest resolve until the next one,
  // and refills a slot or host unit only after an event recorded on the compute stream at a
  // later resolve, which follows every read queued before it on that stream.
  Status release(int layer, Stream stream) override;

  int acquired() const { return acquired_; }  // acquire calls that succeeded

 private:
  ExpertStoreSource() = default;
  ExpertStore* store_ = nullptr;
  std::vector<int32_t> ids_;   // host copy of the ids
  int acquired_ = 0;
};

// ---------------------------------------------------------------------------------------
// layer ring

struct LayerRingOptions {
  int units = 0;              // paged layer units (ranks 0..units-1, in forward order)
  int slots = 0;              // ring slots in gpu_base (rank r uses slot r % slots)
  int64_t unit_bytes = 0;     // slot size (every unit fits)
  void* gpu_base = nullptr;
  bool on_device = true;
  bool async_copy = true;
  int prefetch = 1;           // ranks to copy ahead of the one in use (≤ slots - 1)
};

struct LayerCounters {
  uint64_t requests = 0, hits = 0, copies = 0, h2d_bytes = 0, prefetch_copies = 0;
};

// Per-layer units (attention, dense MLP, shared expert) that do not stay resident: host
// blobs (pinned, filled by the caller) streamed through a ring of GPU slots. Because rank r
// always uses slot r % slots, a CUDA graph that captured the slot addresses stays valid.
class LayerRing {
 public:
  static Status create(const LayerRingOptions& opt, bool pinned, std::unique_ptr<LayerRing>* out);
  // Host memory of unit r (unit_bytes), for the caller to fill once.
  uint8_t* host_unit(int rank) const;
  // Unit r is needed now: `compute` waits until slot r % slots holds it (copying it on
  // `transfer` if no prefetch did), then copies of ranks r+1..r+prefetch start on `prefetch`
  // once the layers that used their slots are done on `compute`.
  Status acquire(int rank, Stream compute, Stream transfer, Stream prefetch);
  // Ranks copied ahead from now on (≤ slots - 1).
  Status set_prefetch(int prefetch);
  LayerCounters counters() const;
  void reset_counters();
  ~LayerRing();

 private:
  LayerRing() = default;
  Status copy_into_slot(int rank, Stream compute, Stream copy, bool prefetch);
  LayerRingOptions opt_;
  std::unique_ptr<HostBuffer> host_;
  std::vector<int> slot_rank_;
  std::vector<void*> slot_ready_;   // event per slot: its last copy is done
  void* compute_mark_ = nullptr;    // event on compute at the last acquire
  LayerCounters counters_;
};

}  // namespace paging
}  // namespace dsfp4
