// FP8 GEMM: y[M, N] = x[M, K] · dequant(W[N, K])ᵀ with x, y in bf16 and W in DeepSeek's FP8
// block format: float8_e4m3fn W[N, K] row-major (row stride K bytes) and float32 block scales
// ("weight_scale_inv") S[ceil(N/128), ceil(K/128)] row-major; dequant(W)[n, k] =
// e4m3(W[n, k]) × S[n/128, k/128]. Accumulation is in float32.
//
// Two weights stacked along N (gate + up, q_a + kv_a) keep their own block grids: with
// split_rows = s > 0, rows [0, s) use scale rows [0, ceil(s/128)) and rows [s, N) use scale
// rows ceil(s/128) + (n - s)/128 — the two scale tensors concatenated. A split that is a
// multiple of 128 is the same as none.
//
// One runner, several paths (the "tactic"):
//   kFused        weights stream from memory with 16-byte loads and are converted to bf16 in
//                 registers (exact: every e4m3 value is a bf16 value) straight into mma.sync;
//                 each 128-column block is accumulated on its own and added to the result
//                 times its scale, so the scale multiplies in float32. Tokens run in tiles of
//                 8/16/32/64; used for decode (M ≤ 16), mid-size M, grouped MoE and on sm_80.
//   kBlockScaled  large M on Hopper: x is quantized per token and 128-column group as
//                 DeepSeek does (s = amax/448, q = e4m3(x/s)), and a CUTLASS sm90 FP8 GEMM
//                 (TMA + wgmma, QGMMA in SASS) applies both scales per 128-column block.
//                 Not bit-compatible with the others: x loses precision to e4m3
//                 (fp8_gemm_blockscaled_cpu is its reference).
//   kDequant      large M on Hopper: W is dequantized to bf16 (rounded) in row chunks into
//                 the workspace and multiplied by the CUTLASS sm90 bf16 GEMM.
// Tactic choice lives outside the kernels: fp8_gemm_default_tactic() is a shape heuristic,
// the Python autotuner may pass another.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "dsfp4/common.h"
#include "dsfp4/nvfp4.h"

namespace dsfp4 {

constexpr int kFp8Block = 128;  // DeepSeek's weight_block_size, both dimensions

// Rows of the scale tensor of a [n, k] weight with the given split (see above).
int64_t fp8_scale_rows(int64_t n, int64_t split_rows);
inline int64_t fp8_scale_cols(int64_t k) {
  return (k + kFp8Block - 1) / kFp8Block;
}

// One FP8 weight; device memory for the CUDA entry points, host memory for the CPU ones.
struct Fp8Weight {
  const uint8_t* weight = nullptr;  // e4m3 [n, k] row-major, 16-byte aligned
  const float* scale = nullptr;     // float32 [fp8_scale_rows(n, split_rows), ceil(k/128)]
  int64_t n = 0;                    // output features
  int64_t k = 0;                    // input features; a multiple of 16 for the CUDA paths
  int64_t split_rows = 0;           // 0, or rows of the first of two stacked weights
};

// The weights of several experts ("slots"). Slot s: weight + s·weight_slot_stride bytes and
// scale + s·scale_slot_stride floats; with unit_addr set, slot s is the expert unit at byte
// address unit_addr[s] (device memory or mapped pinned host memory; 0, or an address that is
// not 16-byte aligned, gives the group NaN rows) with its weight at unit_weight and its scales at
// unit_scale bytes (16- and 4-byte aligned). See fp8_expert_unit_layout for an expert's unit.
// Readiness (units only), as Fp4GroupedWeight: with unit_ready set, group g first waits until
// unit_ready[slot] == *ready_epoch, then reads unit_addr[slot]; past wait_timeout_ns its rows
// become NaN and *wait_failed (may be null) is set to 1.
struct Fp8GroupedWeight {
  const uint8_t* weight = nullptr;
  const float* scale = nullptr;
  int64_t weight_slot_stride = 0;  // bytes, multiple of 16, ≥ n·k
  int64_t scale_slot_stride = 0;   // floats, ≥ fp8_scale_rows(n, split_rows)·ceil(k/128)
  int64_t n = 0;
  int64_t k = 0;
  int64_t split_rows = 0;
  const uint64_t* unit_addr = nullptr;  // [num_slots]
  int64_t unit_weight = 0, unit_scale = 0;
  const uint32_t* unit_ready = nullptr;  // [num_slots]
  const uint32_t* ready_epoch = nullptr;
  uint32_t* wait_failed = nullptr;
  uint64_t wait_timeout_ns = 0;
};

enum class Fp8GemmPath : int { kAuto = 0, kFused = 1, kBlockScaled = 2, kDequant = 3 };

struct Fp8GemmTactic {
  Fp8GemmPath path = Fp8GemmPath::kAuto;
  int tile_tokens = 0;  // kFused: 8, 16, 32 or 64 tokens per tile (0: heuristic)
  int warps_n = 0;      // kFused: warps of a block along N (1, 2 or 4)
  int warps_k = 0;      // kFused: warps of a block that split K (1, 2, 4 or 8)
  int split_k = 0;      // kFused: blocks that split K, ≥ 1 (dense only)
};

// Resolves kAuto / zero fields for a dense problem on the current device.
Fp8GemmTactic fp8_gemm_default_tactic(int64_t m, int64_t n, int64_t k, int64_t split_rows = 0);
// Every valid tactic for the shape (split_rows as given), for autotuning.
std::vector<Fp8GemmTactic> fp8_gemm_candidate_tactics(int64_t m, int64_t n, int64_t k, int64_t split_rows = 0);
// Workspace bytes fp8_gemm_cuda needs for this shape and tactic (0 is a valid answer).
size_t fp8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, const Fp8GemmTactic& tactic, int64_t split_rows = 0);

// Dense GEMM on the GPU. x: [m, k] bf16, row stride ldx (elements, ≥ k, multiple of 8, rows
// 16-byte aligned); y: [m, n] bf16, row stride ldy. Device pointers; runs on `stream`; never
// synchronizes; safe to capture in a CUDA graph.
Status fp8_gemm_cuda(const Fp8Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t m,
                     const Fp8GemmTactic& tactic, void* workspace, size_t workspace_bytes, Stream stream);

// Grouped GEMM (all experts of a layer in one launch, the fused path). Group g multiplies rows
// [row_offsets[g], row_offsets[g+1]) of x by the weight in slot slot_of_group[g] (negative:
// skip) and writes the same rows of y. row_offsets [num_groups+1] and slot_of_group
// [num_groups] are device int32 arrays; max_rows_per_group bounds any group's rows.
Status fp8_grouped_gemm_cuda(const Fp8GroupedWeight& w, int num_groups, const int32_t* slot_of_group,
                             const int32_t* row_offsets, int64_t max_rows_per_group, const void* x, int64_t ldx,
                             void* y, int64_t ldy, int tile_tokens, Stream stream);

// Per-token, per-128-column quantization of activations (the kBlockScaled path's first step):
// for row r and group j, s = amax(|x[r, 128j : 128j+128]|) / 448 (1 when the group is all
// zero), xq[r, c] = e4m3(x[r, c] / s) (round to nearest even, saturating), scale[j·ld_scale + r]
// = s (groups major: the layout the sm90 GEMM reads). x bf16 [m, k] (row stride ldx), xq
// [m, k] bytes (row stride ldq); ld_scale ≥ m.
Status fp8_act_quant_cpu(const void* x, int64_t ldx, int64_t m, int64_t k, uint8_t* xq, int64_t ldq, float* scale,
                         int64_t ld_scale);
Status fp8_act_quant_cuda(const void* x, int64_t ldx, int64_t m, int64_t k, uint8_t* xq, int64_t ldq, float* scale,
                          int64_t ld_scale, Stream stream);

// DeepSeek block quantization of a dense weight src [rows, cols] (f32/f16/bf16; MatrixSource
// from nvfp4.h): per 128×128 block, s = amax(|block|)/448 in float32 (1 for an all-zero block),
// q = e4m3(w / s) (nearest even, saturating at 448). Writes q [rows, cols] and
// scale_inv [ceil(rows/128), ceil(cols/128)] = s. The formula of the DeepSeek release.
Status fp8_block_quantize_cpu(const MatrixSource& src, int64_t rows, int64_t cols, uint8_t* q, float* scale_inv);
Status fp8_block_quantize_cuda(const MatrixSource& src, int64_t rows, int64_t cols, uint8_t* q, float* scale_inv,
                               Stream stream);

// dequant(W) rounded to bf16, dst [n, k] with row stride ldd (what kDequant multiplies by).
Status fp8_dequantize_bf16_cuda(const Fp8Weight& w, void* dst, int64_t ldd, Stream stream);

// ---- CPU references (host pointers) -------------------------------------------------------

// dequant(W) in float32, dst [n, k] (exact: e4m3 × scale rounded once to float32).
Status fp8_dequantize_cpu(const Fp8Weight& w, float* dst);
// What kFused computes: y = bf16(Σ_k x·dequant(W)) with x in bf16, accumulated in float64
// (any K ≥ 1 here).
Status fp8_gemm_cpu(const Fp8Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t m);
// What kBlockScaled computes: x quantized as fp8_act_quant_cpu, then
// y = bf16(Σ_j sx[r, j]·S[n/128, j]·Σ_{k in group j} xq·W), float64 accumulation.
Status fp8_gemm_blockscaled_cpu(const Fp8Weight& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t m);
// Reference of fp8_grouped_gemm_cuda. Also checks what the kernel cannot: slots below
// num_slots, groups inside [0, rows). Rows of y outside every group are left untouched.
Status fp8_grouped_gemm_cpu(const Fp8GroupedWeight& w, int num_slots, int num_groups, const int32_t* slot_of_group,
                            const int32_t* row_offsets, int64_t rows, const void* x, int64_t ldx, void* y, int64_t ldy);

// ---- FP8 expert units ---------------------------------------------------------------------
// One routed expert in FP8 as one block of memory (a paging unit): gate and up stacked into
// gate_up [2I, H] (split_rows = I: each keeps its own block grid) and down [H, I], with their
// scales, at these byte offsets (weights 16-byte, scales 16-byte aligned). The bytes are the
// checkpoint's own (no repack): a unit fills with plain copies of the stored tensors.
struct Fp8ExpertUnitLayout {
  int64_t hidden = 0;          // H
  int64_t inter = 0;           // I
  int64_t gate_up_weight = 0;  // e4m3 [2I, H]: gate rows, then up rows
  int64_t gate_up_scale = 0;   // float32 [2·ceil(I/128), ceil(H/128)]: gate's, then up's
  int64_t down_weight = 0;     // e4m3 [H, I]
  int64_t down_scale = 0;      // float32 [ceil(H/128), ceil(I/128)]
  int64_t bytes = 0;           // the whole unit (a multiple of 256)
};

// H and I must be positive multiples of 16.
Status fp8_expert_unit_layout(int64_t hidden, int64_t inter, Fp8ExpertUnitLayout* out);
// Fills one unit (host memory, layout.bytes) from the stored tensors: gate/up e4m3 [I, H] with
// scales [ceil(I/128), ceil(H/128)], down e4m3 [H, I] with scales [ceil(H/128), ceil(I/128)].
// Scales must be finite and non-negative (the message names the tensor).
Status fp8_expert_unit_fill(const Fp8ExpertUnitLayout& layout, const uint8_t* gate, const float* gate_scale,
                            const uint8_t* up, const float* up_scale, const uint8_t* down, const float* down_scale,
                            uint8_t* unit);
// The grouped weights of a unit table: gate_up (n = 2I, k = H, split I) or down (n = H, k = I).
Fp8GroupedWeight fp8_expert_unit_gate_up(const Fp8ExpertUnitLayout& layout, const uint64_t* unit_addr);
Fp8GroupedWeight fp8_expert_unit_down(const Fp8ExpertUnitLayout& layout, const uint64_t* unit_addr);

}  // namespace dsfp4
