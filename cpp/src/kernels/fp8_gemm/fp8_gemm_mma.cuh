// Fused FP8-block × bf16 GEMM on mma.sync (sm_80+), weights as the A operand ("swap AB"): a
// warp computes yᵀ tiles of 16 weight rows × 8 tokens with mma.m16n8k16, so one 8-token column
// serves M = 1…8 at decode and the same kernel scales to 64-token tiles.
//
// The weight stays in the checkpoint's row-major layout. Per 64-column chunk of a 16-row tile,
// lane (g = lane/4, c = lane%4) makes two 16-byte loads: columns 16c…16c+15 of rows g and g+8
// (a warp reads 64 contiguous bytes of each of 16 rows). Word j of those bytes (columns
// 16c+4j…+3) feeds k-step j: the virtual k order inside a step is permuted so that the lane's
// x fragment is columns 16c+4j…+3 too, i.e. x is read as plain 32-byte runs (two 16-byte loads
// per 8-token tile and chunk, no shuffles, no shared memory).
//
// Conversion in registers (exact): prmt spreads two e4m3 bytes into the high bytes of a
// bf16x2, a mask and a shift move sign, exponent and mantissa into bf16 position — the value
// × 2⁻¹²⁰ (a bf16 subnormal for e4m3 subnormals) — and one bf16x2 FMA by 2¹²⁰ restores it
// (its addend is a NaN for the NaN codes 0x7F / 0xFF).
// Each 128-column block accumulates on its own; its float32 sum is added to the result times
// the block's scale (rows g and g+8 may have different scales across a split).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/unit_wait.h"

namespace dsfp4 {
namespace kernels {
namespace fp8 {

struct FusedArgs {
  const uint8_t* weight;         // slot 0: e4m3 [n, k] row-major
  const float* scale;            // slot 0: [scale rows, kb]
  int64_t weight_slot_stride;    // bytes
  int64_t scale_slot_stride;     // floats
  const int32_t* slot_of_group;  // null: slot = group
  const uint64_t* unit_addr;     // null: slots are weight/scale + s·stride
  int64_t unit_weight, unit_scale;
  const uint32_t* unit_ready;    // null: no wait (see Fp8GroupedWeight)
  const uint32_t* ready_epoch;
  uint32_t* wait_failed;
  uint64_t wait_timeout_ns;
  const int32_t* row_offsets;  // null: dense, rows [0, m)
  const __nv_bfloat16* x;
  int64_t ldx;
  __nv_bfloat16* y;
  int64_t ldy;
  int m, n, k;
  int split_rows;   // 0 or the first part's rows
  int nt;           // 16-row tiles
  int kb;           // 128-column blocks (scale columns)
  int token_tiles;  // grid.x / split_k: token tiles visited with this stride
  int split_k;
  float* partial;  // split_k > 1: [split_k][row blocks · token_tiles][block outputs]
  int* counters;   // split_k > 1: [row blocks · token_tiles], zeroed before the launch
};

__device__ __forceinline__ uint4 ld_stream_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 ld_nc_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float ld_nc_f32(const float* p) {
  float v;
  asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t u4_get(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Bit 7 of each byte set iff the byte is 0x7F or 0xFF (e4m3fn's NaN; no carry between bytes).
__device__ __forceinline__ uint32_t e4m3_nan_flags(uint32_t word) {
  return (word & 0x7F7F7F7Fu) + 0x01010101u;
}

// Bytes sel-selected from word (0x1404: bytes 0, 1; 0x3424: bytes 2, 3) → their e4m3 values as
// a bf16x2 (low half the first byte), exactly; NaN codes give NaN as in the reference (the
// shift alone would make them ±480). kNanSel (0x9988 / 0xBBAA) spreads those bytes' flags
// (nan = e4m3_nan_flags(word)) into 0xFFFF halves, the FMA's addend: a NaN there, else +0.
template <uint32_t kSel, uint32_t kNanSel>
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t word, uint32_t nan) {
  uint32_t t, c;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(t) : "r"(word), "r"(0u), "n"(kSel));
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(c) : "r"(nan), "r"(0u), "n"(kNanSel));
  const uint32_t v = (t & 0x80008000u) | ((t & 0x7F007F00u) >> 4);  // value × 2^-120
  uint32_t d;
  // × 2^120 (bf16 0x7B80) + c: exact; fma.rn.bf16x2 honours subnormal inputs. (+0 turns a -0
  // weight into +0, which no product or sum can tell apart.)
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(v), "r"(0x7B807B80u), "r"(c));
  return d;
}

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int scale_row(int r, int split) {
  if (split <= 0 || r < split) return r >> 7;
  return ((split + 127) >> 7) + ((r - split) >> 7);
}

// NT8: 8-token tiles per warp; WN × KW warps per block (KW of them split K and are reduced
// through shared memory); UC: 64-column chunks loaded ahead. One 16-row tile per warp.
// Grid: x = token tiles × split_k (fastest, so blocks that share weight rows run together and
// re-reads hit L2), y = row blocks, z = groups.
template <int NT8, int WN, int KW, int UC>
__global__ void __launch_bounds__(32 * WN * KW) fused_fp8_gemm_kernel(const FusedArgs a) {
  constexpr int kTok = 8 * NT8;
  constexpr int kAcc = NT8 * 4;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int g = lane >> 2, c = lane & 3;

  const int group = blockIdx.z;
  int row0 = 0, rows = a.m;
  if (a.row_offsets != nullptr) {
    row0 = a.row_offsets[group];
    rows = a.row_offsets[group + 1] - row0;
  }
  const int slot = a.slot_of_group != nullptr ? a.slot_of_group[group] : group;
  if (rows <= 0 || slot < 0) return;  // block-uniform

  const uint8_t* wbase;
  const float* sbase;
  if (a.unit_addr != nullptr) {
    uint64_t unit;
    if (a.unit_ready != nullptr) {
      __shared__ uint64_t ready_unit;
      if (threadIdx.x == 0)
        ready_unit = kernels::wait_for_unit(a.unit_ready, a.ready_epoch, a.unit_addr, slot, a.wait_timeout_ns,
                                            a.wait_failed);
      __syncthreads();
      unit = ready_unit;
    } else {
      unit = a.unit_addr[slot];
    }
    if (unit == 0 || unit % 16 != 0) {  // block-uniform; a misaligned unit would fault
      // no weights to read: this block's rows and columns become NaN (a missing expert must
      // surface, never pass as a smaller sum); the first K split writes them
      if (blockIdx.x % a.split_k != 0) return;
      const int n0 = 16 * blockIdx.y * WN;
      const int cols = min(a.n, n0 + 16 * WN) - n0;
      if (cols <= 0) return;
      const __nv_bfloat16 nan = __float2bfloat16_rn(__int_as_float(0x7fc00000));
      const int tiles = (rows + kTok - 1) / kTok;
      for (int tt = blockIdx.x / a.split_k; tt < tiles; tt += a.token_tiles)
        for (int i = threadIdx.x; i < kTok * cols; i += blockDim.x) {
          const int tok = tt * kTok + i / cols;
          if (tok < rows) a.y[static_cast<int64_t>(row0 + tok) * a.ldy + n0 + i % cols] = nan;
        }
      return;
    }
    wbase = reinterpret_cast<const uint8_t*>(unit + a.unit_weight);
    sbase = reinterpret_cast<const float*>(unit + a.unit_scale);
  } else {
    wbase = a.weight + static_cast<int64_t>(slot) * a.weight_slot_stride;
    sbase = a.scale + static_cast<int64_t>(slot) * a.scale_slot_stride;
  }

  const int ks = blockIdx.x % a.split_k;
  const int tt_first = blockIdx.x / a.split_k;
  const int row_block = blockIdx.y;
  // This warp's 128-column blocks: split_k·KW contiguous slices, so a block's scale is
  // applied by the warp that summed it.
  const int slices = a.split_k * KW;
  const int slice = ks * KW + wk;
  const int kb_lo = static_cast<int>((static_cast<int64_t>(a.kb) * slice) / slices);
  const int kb_hi = static_cast<int>((static_cast<int64_t>(a.kb) * (slice + 1)) / slices);

  const int tile = row_block * WN + wn;
  // rows g and g+8 of the tile: weight row (at this lane's 16 columns) and scale row, or null
  const uint8_t* wrow[2];
  const float* srow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = 16 * tile + g + 8 * r;
    const bool ok = tile < a.nt && row < a.n;
    wrow[r] = ok ? wbase + static_cast<int64_t>(row) * a.k + 16 * c : nullptr;
    srow[r] = ok ? sbase + static_cast<int64_t>(scale_row(row, a.split_rows)) * a.kb : nullptr;
  }
  const int token_tiles_total = (rows + kTok - 1) / kTok;

  __shared__ float red[(KW > 1) ? (KW - 1) * WN * 32 * kAcc : 1];
  __shared__ int last_block;

  for (int tt = tt_first; tt < token_tiles_total; tt += a.token_tiles) {
    float acc[NT8][4], blk[NT8][4];
#pragma unroll
    for (int q = 0; q < NT8; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[q][e] = blk[q][e] = 0.0f;

    // x rows this lane reads (token 8q + g of the tile), or null past the group's rows.
    const __nv_bfloat16* xrow[NT8];
#pragma unroll
    for (int q = 0; q < NT8; ++q) {
      const int tok = tt * kTok + 8 * q + g;
      xrow[q] = tok < rows ? a.x + static_cast<int64_t>(row0 + tok) * a.ldx + 16 * c : nullptr;
    }

    for (int ch0 = 2 * kb_lo; ch0 < 2 * kb_hi; ch0 += UC) {
      uint4 wv[UC][2];
      float sv[UC][2];
      uint4 xv[UC][NT8][2];
#pragma unroll
      for (int u = 0; u < UC; ++u) {
        const int ch = ch0 + u;
        const int col = 64 * ch + 16 * c;
        const bool ok = ch < 2 * kb_hi && col < a.k;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          wv[u][r] = (ok && wrow[r] != nullptr) ? ld_stream_u4(wrow[r] + 64 * ch) : make_uint4(0, 0, 0, 0);
          sv[u][r] = (ch < 2 * kb_hi && srow[r] != nullptr) ? ld_nc_f32(srow[r] + (ch >> 1)) : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < NT8; ++q) {
          if (ok && xrow[q] != nullptr) {
            const __nv_bfloat16* p = xrow[q] + 64 * ch;
            xv[u][q][0] = ld_nc_u4(p);
            xv[u][q][1] = ld_nc_u4(p + 8);
          } else {
            xv[u][q][0] = make_uint4(0, 0, 0, 0);
            xv[u][q][1] = make_uint4(0, 0, 0, 0);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < UC; ++u) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t w0 = u4_get(wv[u][0], j), w1 = u4_get(wv[u][1], j);
          const uint32_t n0 = e4m3_nan_flags(w0), n1 = e4m3_nan_flags(w1);
          uint32_t af[4];
          af[0] = e4m3x2_to_bf16x2<0x1404u, 0x9988u>(w0, n0);  // row g, columns 4j, 4j+1
          af[1] = e4m3x2_to_bf16x2<0x1404u, 0x9988u>(w1, n1);  // row g+8
          af[2] = e4m3x2_to_bf16x2<0x3424u, 0xBBAAu>(w0, n0);  // row g, columns 4j+2, 4j+3
          af[3] = e4m3x2_to_bf16x2<0x3424u, 0xBBAAu>(w1, n1);  // row g+8
#pragma unroll
          for (int q = 0; q < NT8; ++q) {
            const uint4& lo = xv[u][q][j >> 1];
            const uint32_t b0 = (j & 1) ? lo.z : lo.x;
            const uint32_t b1 = (j & 1) ? lo.w : lo.y;
            mma_bf16_16816(blk[q], af, b0, b1);
          }
        }
        if ((ch0 + u) & 1) {  // a 128-column block is complete: promote with its scales
#pragma unroll
          for (int q = 0; q < NT8; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              acc[q][e] = fmaf(blk[q][e], sv[u][e >> 1], acc[q][e]);
              blk[q][e] = 0.0f;
            }
        }
      }
    }

    // Reduce the KW K-slices of the block through shared memory into warps with wk == 0.
    if constexpr (KW > 1) {
      if (wk > 0) {
        float* dst = red + (((wk - 1) * WN + wn) * 32 + lane) * kAcc;
#pragma unroll
        for (int q = 0; q < NT8; ++q)
#pragma unroll
          for (int e = 0; e < 4; ++e) dst[q * 4 + e] = acc[q][e];
      }
      __syncthreads();
      if (wk == 0) {
        for (int w2 = 0; w2 < KW - 1; ++w2) {
          const float* src = red + ((w2 * WN + wn) * 32 + lane) * kAcc;
#pragma unroll
          for (int q = 0; q < NT8; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[q][e] += src[q * 4 + e];
        }
      }
      __syncthreads();  // red is reused by the next token tile
    }

    // Split-K across blocks: publish the partial; the last block of a tile sums them in order.
    if (a.split_k > 1) {
      const int tile_id = row_block * a.token_tiles + tt_first;  // one token tile per block
      const int64_t block_out = static_cast<int64_t>(WN) * 32 * kAcc;
      const int64_t tiles = static_cast<int64_t>(gridDim.y) * a.token_tiles;
      float* mine = a.partial + (ks * tiles + tile_id) * block_out;
      if (wk == 0) {
#pragma unroll
        for (int q = 0; q < NT8; ++q)
#pragma unroll
          for (int e = 0; e < 4; ++e) mine[(wn * 32 + lane) * kAcc + q * 4 + e] = acc[q][e];
      }
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) {
        const int prev = atomicAdd(a.counters + tile_id, 1);
        last_block = (prev == a.split_k - 1);
      }
      __syncthreads();
      if (!last_block) continue;
      __threadfence();
      if (wk == 0) {
#pragma unroll
        for (int q = 0; q < NT8; ++q)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[q][e] = 0.0f;
        for (int s = 0; s < a.split_k; ++s) {
          const float* src = a.partial + (s * tiles + tile_id) * block_out + (wn * 32 + lane) * kAcc;
#pragma unroll
          for (int q = 0; q < NT8; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[q][e] += __ldcg(src + q * 4 + e);
        }
      }
    }

    if (wk == 0 && tile < a.nt) {
#pragma unroll
      for (int q = 0; q < NT8; ++q) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = 16 * tile + g + ((e & 2) ? 8 : 0);
          const int tok = tt * kTok + 8 * q + 2 * c + (e & 1);
          if (n < a.n && tok < rows) a.y[static_cast<int64_t>(row0 + tok) * a.ldy + n] = __float2bfloat16_rn(acc[q][e]);
        }
      }
    }
  }
}

}  // namespace fp8
}  // namespace kernels
}  // namespace dsfp4
