// Fused NVFP4 × bf16 GEMM on mma.sync (sm_80+), weights as the A operand ("swap AB"):
// a warp computes yᵀ tiles of 16 weight rows × 8 tokens with mma.m16n8k16, so one 8-token
// column serves M = 1…8 at decode and the same kernel scales to 64-token tiles.
//
// Data path per lane and k-block (64 columns): one 16-byte load of packed weights (4 words,
// one per k-step), one 2-byte load of its two scales, and for each 8-token tile two 16-byte
// loads of x. The tiled layout gives each lane 16 consecutive columns, which is what lets
// x be read as plain 32-byte runs (no shuffles, no shared memory).
//
// Dequantization in registers: a word's four bf16x2 A registers come from shifts and masks
// (see mag_base/sign_pos in nvfp4_format.h): the E2M1 magnitude bits land in the low exponent bits and the
// top mantissa bit of a bf16, the sign in bit 15, which yields E2M1 × 2⁻¹²⁶ (a bf16
// subnormal for 0 and 0.5). One bf16x2 FMA by (block scale × 2¹¹⁷) gives the exact value
// × 2⁻⁹; the global scale × 2⁹ is applied to the float32 accumulator at the end.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/unit_wait.h"

namespace dsfp4 {
namespace kernels {

struct FusedGemmArgs {
  const uint4* qweight;         // slot 0; a slot is nt·kb·32 uint4
  const uint8_t* qscale;        // slot 0; a slot is nt·kc·512 bytes
  const float* global_scale;    // [slots], or [slots][nt] when gs_per_tile
  int gs_per_tile;
  int64_t qweight_slot_stride;  // uint4 units
  int64_t qscale_slot_stride;   // bytes
  const int32_t* slot_of_group; // null: slot = group
  // Expert units: slot s lives at byte address unit_addr[s] (device memory or mapped host
  // memory; 0 or a misaligned address skips the group), its parts at these byte offsets;
  // gs_per_tile says whether the unit holds one global scale per row tile or one in all.
  const uint64_t* unit_addr;    // null: slots are qweight/qscale + s·stride
  int64_t unit_qweight, unit_qscale, unit_scale;
  const uint32_t* unit_ready;   // null: no wait (see Fp4GroupedWeight)
  const uint32_t* ready_epoch;
  uint32_t* wait_failed;
  uint64_t wait_timeout_ns;
  const int32_t* row_offsets;   // null: dense, rows [0, m)
  const __nv_bfloat16* x;
  int64_t ldx;
  __nv_bfloat16* y;
  int64_t ldy;
  int m, n, k;
  int nt, kb, kc;
  int token_tiles;  // grid.x / split_k: token tiles visited with this stride
  int split_k;
  float* partial;   // split_k > 1: [split_k][row blocks · token_tiles][block outputs]
  int* counters;    // split_k > 1: [row blocks · token_tiles], zeroed before the launch
};

__device__ __forceinline__ uint4 ld_stream_u4(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 ld_nc_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t ld_nc_u16(const void* p) {
  unsigned short v;
  asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

// e4m3 byte → bf16 bits of (value × 2^117), exact.
__device__ __forceinline__ uint32_t e4m3_to_bf16_scaled(uint32_t byte) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(byte), __NV_E4M3);
  const float f = __half2float(__half(h)) * 1.6615349947311448e+35f;  // 2^117
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(f)));
}

// bf16x2 a·b, exact for our operands (subnormal inputs are honoured by fma.rn.bf16x2).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

// One packed word → the four A registers (E2M1 × 2^-126 in bf16x2), see mag_base/sign_pos in nvfp4_format.h.
__device__ __forceinline__ void decode_word(uint32_t w, uint32_t (&r)[4]) {
  r[0] = w & 0x81C081C0u;
  r[1] = (w << 3) & 0x81C081C0u;
  r[2] = ((w << 6) & 0x01C001C0u) | ((w << 1) & 0x80008000u);
  r[3] = ((w >> 3) & 0x01C001C0u) | ((w << 2) & 0x80008000u);
}

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t u4_get(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Thread 0 of a block: the unit address of `slot` once its copy has landed (see
// Fp4GroupedWeight::unit_ready), or 0 after the timeout.
__device__ __forceinline__ uint64_t wait_for_unit(const FusedGemmArgs& a, int slot) {
  return kernels::wait_for_unit(a.unit_ready, a.ready_epoch, a.unit_addr, slot, a.wait_timeout_ns, a.wait_failed);
}

// A group with no weights to read: its rows of this block's output columns become NaN.
template <int WR, int WN>
__device__ void write_nan_rows(const FusedGemmArgs& a, int row0, int rows, int kTok) {
  const int n0 = blockIdx.y * WN * WR * 16;
  const int n1 = min(a.n, n0 + WN * WR * 16);
  const int ks = blockIdx.x % a.split_k;
  if (ks != 0) return;
  const __nv_bfloat16 nan = __float2bfloat16_rn(__int_as_float(0x7fc00000));
  for (int tt = blockIdx.x / a.split_k; tt * kTok < rows; tt += a.token_tiles) {
    const int t_end = min(rows, (tt + 1) * kTok);
    for (int i = threadIdx.x; i < (t_end - tt * kTok) * (n1 - n0); i += blockDim.x) {
      const int tok = tt * kTok + i / (n1 - n0);
      const int n = n0 + i % (n1 - n0);
      a.y[static_cast<int64_t>(row0 + tok) * a.ldy + n] = nan;
    }
  }
}

// NT8: 8-token tiles per warp; WR: 16-row tiles per warp; WN × KW warps per block (KW of
// them split K and are reduced through shared memory); U: k-blocks loaded ahead.
// Grid: x = token tiles × split_k (fastest, so the blocks that share weight rows run
// together and re-reads hit L2), y = row blocks, z = groups.
template <int NT8, int WR, int WN, int KW, int U>
__global__ void __launch_bounds__(32 * WN * KW) fused_fp4_gemm_kernel(const FusedGemmArgs a) {
  constexpr int kTok = 8 * NT8;
  constexpr int kAcc = WR * NT8 * 4;
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

  const uint4* wbase;
  const uint8_t* sbase;
  const float* gscale;
  if (a.unit_addr != nullptr) {
    uint64_t unit;
    if (a.unit_ready != nullptr) {
      __shared__ uint64_t ready_unit;
      if (threadIdx.x == 0) ready_unit = wait_for_unit(a, slot);
      __syncthreads();
      unit = ready_unit;
    } else {
      unit = a.unit_addr[slot];
    }
    if (unit == 0 || unit % 16 != 0) {  // block-uniform; a misaligned unit would fault
      write_nan_rows<WR, WN>(a, row0, rows, kTok);
      return;
    }
    wbase = reinterpret_cast<const uint4*>(unit + a.unit_qweight);
    sbase = reinterpret_cast<const uint8_t*>(unit + a.unit_qscale);
    gscale = reinterpret_cast<const float*>(unit + a.unit_scale);
  } else {
    wbase = a.qweight + static_cast<int64_t>(slot) * a.qweight_slot_stride;
    sbase = a.qscale + static_cast<int64_t>(slot) * a.qscale_slot_stride;
    gscale = a.gs_per_tile ? a.global_scale + static_cast<int64_t>(slot) * a.nt : a.global_scale + slot;
  }

  const int ks = blockIdx.x % a.split_k;
  const int tt_first = blockIdx.x / a.split_k;
  const int row_block = blockIdx.y;
  // This warp's k-block range: split_k·KW contiguous slices.
  const int slices = a.split_k * KW;
  const int slice = ks * KW + wk;
  const int kb_lo = static_cast<int>((static_cast<int64_t>(a.kb) * slice) / slices);
  const int kb_hi = static_cast<int>((static_cast<int64_t>(a.kb) * (slice + 1)) / slices);

  const int tile0 = (row_block * WN + wn) * WR;  // first 16-row tile of this warp
  const int token_tiles_total = (rows + kTok - 1) / kTok;

  __shared__ float red[(KW > 1) ? (KW - 1) * WN * 32 * kAcc : 1];
  __shared__ int last_block;

  for (int tt = tt_first; tt < token_tiles_total; tt += a.token_tiles) {
    float acc[WR][NT8][4];
#pragma unroll
    for (int i = 0; i < WR; ++i)
#pragma unroll
      for (int q = 0; q < NT8; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][q][e] = 0.0f;

    // x rows this lane reads (token 8q + g of the tile), or null past the group's rows.
    const __nv_bfloat16* xrow[NT8];
#pragma unroll
    for (int q = 0; q < NT8; ++q) {
      const int tok = tt * kTok + 8 * q + g;
      xrow[q] = tok < rows ? a.x + static_cast<int64_t>(row0 + tok) * a.ldx + 16 * c : nullptr;
    }

    // x is fetched together with the weights (measured on H100: fetching it just before use,
    // to spend its registers on deeper weight prefetch, was slower on most decode shapes).
    auto load_x = [&](int kb, uint4 (&xs)[NT8][2]) {
      const bool col_ok = kb < kb_hi && (64 * kb + 16 * c) < a.k;
#pragma unroll
      for (int q = 0; q < NT8; ++q) {
        if (col_ok && xrow[q] != nullptr) {
          const __nv_bfloat16* p = xrow[q] + 64 * kb;
          xs[q][0] = ld_nc_u4(p);
          xs[q][1] = ld_nc_u4(p + 8);
        } else {
          xs[q][0] = make_uint4(0, 0, 0, 0);
          xs[q][1] = make_uint4(0, 0, 0, 0);
        }
      }
    };

    for (int kb0 = kb_lo; kb0 < kb_hi; kb0 += U) {
      uint4 wv[U][WR];
      uint32_t sv[U][WR];
      uint4 xv[U][NT8][2];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kb = kb0 + u;
        const bool kb_ok = kb < kb_hi;
#pragma unroll
        for (int i = 0; i < WR; ++i) {
          const int t = tile0 + i;
          if (kb_ok && t < a.nt) {
            wv[u][i] = ld_stream_u4(wbase + (static_cast<int64_t>(t) * a.kb + kb) * 32 + lane);
            sv[u][i] = ld_nc_u16(sbase + ((static_cast<int64_t>(t) * a.kc + (kb >> 3)) * 32 + lane) * 16 +
                                 (kb & 7) * 2);
          } else {
            wv[u][i] = make_uint4(0, 0, 0, 0);
            sv[u][i] = 0;
          }
        }
        load_x(kb, xv[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const uint4 (&xs)[NT8][2] = xv[u];
#pragma unroll
        for (int i = 0; i < WR; ++i) {
          const uint32_t s0 = e4m3_to_bf16_scaled(sv[u][i] & 0xFFu);
          const uint32_t s1 = e4m3_to_bf16_scaled(sv[u][i] >> 8);
          const uint32_t sp0 = s0 | (s0 << 16), sp1 = s1 | (s1 << 16);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t r[4];
            decode_word(u4_get(wv[u][i], j), r);
            uint32_t af[4];
            af[0] = bf16x2_mul(r[0], sp0);
            af[1] = bf16x2_mul(r[1], sp1);
            af[2] = bf16x2_mul(r[2], sp0);
            af[3] = bf16x2_mul(r[3], sp1);
#pragma unroll
            for (int q = 0; q < NT8; ++q) {
              const uint4& lo = xs[q][j >> 1];
              const uint32_t b0 = (j & 1) ? lo.z : lo.x;
              const uint32_t b1 = (j & 1) ? lo.w : lo.y;
              mma_bf16_16816(acc[i][q], af, b0, b1);
            }
          }
        }
      }
    }

    // Reduce the KW K-slices of the block through shared memory into warps with wk == 0.
    if constexpr (KW > 1) {
      if (wk > 0) {
        float* dst = red + (((wk - 1) * WN + wn) * 32 + lane) * kAcc;
#pragma unroll
        for (int i = 0; i < WR; ++i)
#pragma unroll
          for (int q = 0; q < NT8; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) dst[(i * NT8 + q) * 4 + e] = acc[i][q][e];
      }
      __syncthreads();
      if (wk == 0) {
        for (int w2 = 0; w2 < KW - 1; ++w2) {
          const float* src = red + ((w2 * WN + wn) * 32 + lane) * kAcc;
#pragma unroll
          for (int i = 0; i < WR; ++i)
#pragma unroll
            for (int q = 0; q < NT8; ++q)
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[i][q][e] += src[(i * NT8 + q) * 4 + e];
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
        for (int i = 0; i < WR; ++i)
#pragma unroll
          for (int q = 0; q < NT8; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) mine[(wn * 32 + lane) * kAcc + (i * NT8 + q) * 4 + e] = acc[i][q][e];
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
        for (int i = 0; i < WR; ++i)
#pragma unroll
          for (int q = 0; q < NT8; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][q][e] = 0.0f;
        for (int s = 0; s < a.split_k; ++s) {
          const float* src = a.partial + (s * tiles + tile_id) * block_out +
                             (wn * 32 + lane) * kAcc;
#pragma unroll
          for (int i = 0; i < WR; ++i)
#pragma unroll
            for (int q = 0; q < NT8; ++q)
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[i][q][e] += __ldcg(src + (i * NT8 + q) * 4 + e);
        }
      }
    }

    if (wk == 0) {
#pragma unroll
      for (int i = 0; i < WR; ++i) {
        const int t = tile0 + i;
        if (t >= a.nt) continue;
        const float out_scale = gscale[a.gs_per_tile ? t : 0] * 512.0f;  // undo the A operand's 2^-9
#pragma unroll
        for (int q = 0; q < NT8; ++q) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int n = 16 * t + g + ((e & 2) ? 8 : 0);
            const int tok = tt * kTok + 8 * q + 2 * c + (e & 1);
            if (n < a.n && tok < rows)
              a.y[static_cast<int64_t>(row0 + tok) * a.ldy + n] = __float2bfloat16_rn(acc[i][q][e] * out_scale);
          }
        }
      }
    }
  }
}

// Tiled weight → bf16 W[n, k] (row stride ldw). With apply_global the values are fully scaled;
// otherwise they hold E2M1 × scale × 2^-9 exactly and the global scale × 2^9 is written to
// *alpha for the GEMM epilogue (per-tile global scales need apply_global). One thread per word.
__global__ void dequant_tiled_kernel(const uint32_t* __restrict__ qweight, const uint8_t* __restrict__ qscale,
                                     const float* __restrict__ global_scale, bool gs_per_tile, int n, int k, int nt,
                                     int kb, int kc, int row_begin, int row_count, __nv_bfloat16* __restrict__ dst,
                                     int64_t ldw, float* alpha, bool apply_global);

}  // namespace kernels
}  // namespace dsfp4
