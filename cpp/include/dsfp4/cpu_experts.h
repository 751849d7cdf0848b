// Routed experts computed on the CPU, straight from expert units in host memory.
//
// For the tokens routed to one expert, y = down(silu(gate(x)) ⊙ up(x)) with the expert read in
// place from its unit (ExpertUnitLayout, expert_source.h: gate_up [2·inter, hidden] then down
// [hidden, inter], NVFP4 in the tiled layout of nvfp4.h). The numerics are those of the GPU
// expert path (moe_experts.h): gate_up rows summed in float32 and rounded to bf16, SiLU·mul in
// float32 rounded to bf16, down summed in float32 and rounded to bf16.
//
// A CpuExpertPool owns worker threads pinned to chosen cores and kept warm (they spin for
// spin_us after their last work, then sleep). One call runs all the CPU experts of one MoE
// layer: the work is split over 16-row weight tiles, so every thread streams contiguous
// weights even at one token. Calls are queued in order; submit() returns at once with a handle.
//
// Instruction sets, chosen at run time from cpuid (or forced by name):
//   "avx512_bf16"  AVX512F/BW/VL + AVX512_BF16: weights decoded to bf16 with a 32-entry word
//                  permute, multiplied by vdpbf16ps (float32 accumulation)
//   "avx512"       AVX512F/BW/VL: the same decode, products in float32 FMA
//   "avx2"         AVX2 + FMA: 8-entry float permute per nibble, float32 FMA
// A CPU without AVX2 and FMA cannot run CPU experts; create() says so.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dsfp4/common.h"
#include "dsfp4/expert_source.h"

namespace dsfp4 {

enum class CpuIsa : int { kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
const char* cpu_isa_name(CpuIsa isa);

// What cpuid and the OS (XCR0) report; os_* say the OS saves the wider registers.
struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512_bf16 = false, avx512_vnni = false;
  bool amx_tile = false, amx_bf16 = false;
  bool os_avx = false, os_avx512 = false;
};
CpuFeatures cpu_features();

// The instruction set to use: "auto" (the best this CPU has), "avx512_bf16", "avx512" or "avx2".
// Unsupported (naming the missing features) when the CPU lacks what the name needs or has no
// AVX2+FMA at all; InvalidArgument for an unknown name.
Status cpu_isa_resolve(const std::string& name, const CpuFeatures& features, CpuIsa* out);

struct CpuExpertsOptions {
  std::string isa = "auto";
  int threads = 0;                   // 0: one per core of `cores`
  std::vector<int> cores;            // empty: the cores this process may run on, less reserved_cores
  std::vector<int> reserved_cores;   // kept free (GPU-driving and I/O threads)
  bool pin = true;                   // pin worker i to cores[i]
  int spin_us = 500;                 // busy-wait this long for new work before sleeping
  int prefetch_bytes = 8192;         // software prefetch distance in the weight stream (0: none)
  bool prefetch_l2 = false;          // software prefetch into L2 only (else into L1)
  int gate_up_tiles = 4;             // work item: 16-row tiles of gate (and as many of up)
  int down_tiles = 8;                // work item: 16-row tiles of down
};

// One expert of a call. rows[i] is the row of the call's x holding token i (null: rows
// 0..tokens-1); y receives bf16 [tokens, hidden] with row stride ldy (elements).
struct CpuExpertJob {
  int expert = -1;                   // for error messages
  const uint8_t* unit = nullptr;     // host address of the expert unit, 16-byte aligned
  const int32_t* rows = nullptr;     // [tokens], values in [0, x_rows)
  int64_t tokens = 0;
  void* y = nullptr;
  int64_t ldy = 0;
};

// The CPU experts of one MoE layer. x: bf16 [x_rows, hidden], row stride ldx (elements).
struct CpuExpertsCall {
  int layer = -1;                    // for error messages
  ExpertUnitLayout layout;
  const void* x = nullptr;
  int64_t x_rows = 0;
  int64_t ldx = 0;
  const CpuExpertJob* jobs = nullptr;
  int count = 0;
};

struct CpuExpertsStats {
  int64_t experts = 0;        // jobs with at least one token
  int64_t weight_bytes = 0;   // unit bytes the call read (weights, block and global scales)
  double start_ms = 0.0;      // submit → first work item started (queueing and wake-up)
  double run_ms = 0.0;        // first work item started → last one finished
};

// A submitted call. wait() blocks until it has finished and returns its status: the first
// job that failed is named by layer and expert; the other jobs' outputs are written, a failed
// job's y is left as it was. The call's buffers must stay valid until the call has finished.
class CpuExpertsHandle {
 public:
  virtual ~CpuExpertsHandle() = default;
  virtual Status wait(CpuExpertsStats* stats = nullptr) = 0;
  virtual bool done() const = 0;
};

class CpuExpertPool {
 public:
  static Status create(const CpuExpertsOptions& options, std::unique_ptr<CpuExpertPool>* out);
  ~CpuExpertPool();
  CpuExpertPool(const CpuExpertPool&) = delete;
  CpuExpertPool& operator=(const CpuExpertPool&) = delete;

  // Checks the call and queues it; on_done (optional) runs on a worker thread when the call
  // has finished, with its status. A call that fails the checks is not queued.
  Status submit(const CpuExpertsCall& call, std::shared_ptr<CpuExpertsHandle>* handle,
                std::function<void(const Status&)> on_done = {});
  // submit() and wait().
  Status run(const CpuExpertsCall& call, CpuExpertsStats* stats = nullptr);

  // Reads [data, data + bytes) once per rep with the pool's threads (each thread a contiguous
  // share), the same way the experts stream their weights; *gbs is the best rep's rate.
  Status read_bandwidth(const void* data, size_t bytes, int reps, double* gbs);

  // Tests: the next job of (layer, expert) fails as if its unit were corrupt.
  void inject_fault(int layer, int expert);

  CpuIsa isa() const;
  int threads() const;
  const std::vector<int>& cores() const;

 private:
  CpuExpertPool();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsfp4
