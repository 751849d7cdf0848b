// FP4 GEMM: y[M, N] = x[M, K] · dequant(W[N, K])ᵀ with x, y in bf16 and W in NVFP4
// (tiled kernel layout, see nvfp4.h). Accumulation is in float32; the global scale is
// applied once per output element.
//
// One runner, several paths (the "tactic"):
//   kFused   weights stream from memory and are dequantized in registers straight into
//            mma.sync tensor-core instructions; x is read through L1. Tokens are processed
//            in tiles of 8/16/32/64; used for decode (M ≤ 16), mid-size M and grouped MoE.
//   kDequant large dense M on Hopper: the weight is dequantized to bf16 in chunks of rows
//            into the workspace and multiplied with a CUTLASS sm90 (TMA + wgmma) bf16 GEMM;
//            the dequant pass costs < 10% once M is in the thousands.
// Tactic choice lives outside the kernels: fp4_gemm_default_tactic() is a shape heuristic,
// the Python autotuner may pass another.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "dsfp4/common.h"

namespace dsfp4 {

// One NVFP4 weight in the tiled layout, in device memory (host memory for the CPU path).
struct Fp4Weight {
  const uint32_t* qweight = nullptr;     // tiled_weight_bytes(n, k) bytes
  const uint8_t* qscale = nullptr;       // tiled_scale_bytes(n, k) bytes
  const float* global_scale = nullptr;   // one float, or ceil(n/16) if global_scale_per_tile
  bool global_scale_per_tile = false;    // one global scale per 16-row tile (fused gate+up)
  int64_t n = 0;                         // output features (rows of W)
  int64_t k = 0;                         // input features, multiple of 16
};

// Experts of one layer stacked in "slots": slot s starts at qweight + s·qweight_slot_stride
// (uint32 elements) and qscale + s·qscale_slot_stride (bytes); global_scale[s] is its scale.
// Slots may be arena pages: the grouped GEMM indexes them through slot_of_group.
struct Fp4GroupedWeight {
  const uint32_t* qweight = nullptr;
  const uint8_t* qscale = nullptr;
  const float* global_scale = nullptr;   // [num_slots] or [num_slots][ceil(n/16)] if per tile
  bool global_scale_per_tile = false;
  int64_t qweight_slot_stride = 0;       // uint32 elements; ≥ tiled_weight_bytes(n,k)/4
  int64_t qscale_slot_stride = 0;        // bytes; ≥ tiled_scale_bytes(n,k)
  int64_t n = 0;
  int64_t k = 0;
  // Expert units (expert_source.h): when unit_addr is set, slot s is the unit at byte address
  // unit_addr[s] (device memory or mapped pinned host memory), the fields above but n, k are
  // unused, and the parts sit at these byte offsets of a unit (16-byte aligned; the scales
  // 4-byte aligned). A group whose address is 0 or not 16-byte aligned has no weights to read:
  // its output rows are written as NaN, so that a missing expert surfaces (the engine's
  // non-finite guard) instead of leaving a silently wrong row.
  const uint64_t* unit_addr = nullptr;   // device array [num_slots]
  int64_t unit_qweight = 0, unit_qscale = 0, unit_scale = 0;
  bool unit_scale_per_tile = true;       // float32 [ceil(n/16)] at unit_scale, else one float
  // Readiness (units only; the paging store's decode pipeline): when unit_ready is set, group g
  // first waits until unit_ready[slot] == *ready_epoch, then reads unit_addr[slot]; both are
  // written by host → device copies that may still be in flight when the kernel starts, so the
  // experts already resident compute while the others arrive. After wait_timeout_ns a group
  // gives up: its rows become NaN and *wait_failed (mapped host memory, may be null) is set to 1.
  const uint32_t* unit_ready = nullptr;  // device array [num_slots]
  const uint32_t* ready_epoch = nullptr; // device word
  uint32_t* wait_failed = nullptr;
  uint64_t wait_timeout_ns = 0;
};

enum class Fp4GemmPath : int { kAuto = 0, kFused = 1, kDequant = 2 };

struct Fp4GemmTactic {
  Fp4GemmPath path = Fp4GemmPath::kAuto;
  int tile_tokens = 0;  // kFused: 8, 16, 32 or 64 tokens per tile (0: heuristic)
  int warps_n = 0;      // kFused: warps of a block along N (1, 2 or 4; 0: heuristic)
  int warps_k = 0;      // kFused: warps of a block that split K (1, 2, 4 or 8; 0: heuristic)
  int split_k = 0;      // kFused: blocks that split K, ≥ 1 (0: heuristic; dense only)
};

// Resolves kAuto / zero fields for a dense problem on the current device.
Fp4GemmTactic fp4_gemm_default_tactic(int64_t m, int64_t n, int64_t k);
// Every valid tactic for the shape, for autotuning.
std::vector<Fp4GemmTactic> fp4_gemm_candidate_tactics(int64_t m, int64_t n, int64_t k);

// Workspace bytes for fp4_gemm_cuda with this shape and tactic (0 is a valid answer).
size_t fp4_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, const Fp4GemmTactic& tactic);

// Dense GEMM on the GPU. x: [m, k] bf16, row stride ldx (elements, ≥ k, rows 16-byte
// aligned); y: [m, n] bf16, row stride ldy. All pointers device memory; runs on `stream`;
// never synchronizes. Safe to capture in a CUDA graph.
Status fp4_gemm_cuda(const Fp4Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy,
                     int64_t m, const Fp4GemmTactic& tactic, void* workspace,
                     size_t workspace_bytes, Stream stream);

// Grouped GEMM (all experts of a layer in one launch). Group g multiplies rows
// [row_offsets[g], row_offsets[g+1]) of x by the weight in slot slot_of_group[g] (a negative
// slot skips the group) and writes the same rows of y. row_offsets [num_groups+1] and
// slot_of_group [num_groups] are device int32 arrays, so routing on the GPU can fill them
// without a host sync. max_rows_per_group bounds any group's rows (used for the grid).
Status fp4_grouped_gemm_cuda(const Fp4GroupedWeight& w, int num_groups,
                             const int32_t* slot_of_group, const int32_t* row_offsets,
                             int64_t max_rows_per_group, const void* x, int64_t ldx, void* y,
                             int64_t ldy, int tile_tokens, Stream stream);

// Dequantizes the tiled weight to bf16 W[n, k] (row stride ldw) on the GPU, fully scaled.
Status fp4_dequantize_tiled_cuda(const Fp4Weight& w, void* dst, int64_t ldw, Stream stream);

// CPU reference: float32 accumulation of x (bf16) times the dequantized weight,
// rounded to bf16. Host pointers.
Status fp4_gemm_cpu(const Fp4Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy,
                    int64_t m);
// CPU: the tiled weight dequantized to float32 W[n, k] (what the kernels multiply by).
Status fp4_dequantize_tiled_cpu(const Fp4Weight& w, float* dst);
// CPU reference of fp4_grouped_gemm_cuda, host pointers. It also checks what the kernel
// cannot: slots below num_slots, groups inside [0, rows) of x. Rows of y outside every group
// are left untouched.
Status fp4_grouped_gemm_cpu(const Fp4GroupedWeight& w, int num_slots, int num_groups, const int32_t* slot_of_group,
                            const int32_t* row_offsets, int64_t rows, const void* x, int64_t ldx, void* y,
                            int64_t ldy);

}  // namespace dsfp4
