// Loop structure shared by the per-ISA tile kernels. Internal header, included only by the
// per-ISA files; everything here has internal linkage so each file keeps its own instances
// compiled for its own instruction set.
//
// K (the ISA's block kernel) provides
//   Vec, kLanes                 float32 accumulator vector
//   State, init(State&), ok()   constants in registers and the NaN-scale flag
//   kMaxTokens, group(nt)       tokens per pass and the 8-row groups (g) they can hold
//   block<NT>(st, w, s, kbi, x, x_stride, acc)
//                               one 64-byte line (rows g, g+8 of one k-block) for NT tokens
//   zero(), load(), store(), hsum()
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/cpu_experts_kernel.h"

namespace dsfp4 {
namespace cpu {
namespace {

// Local helpers rather than <algorithm>: template instances with external linkage compiled
// with wider ISA flags could be picked by the linker for code that runs on any CPU.
inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

inline void prefetch_line(const uint8_t* p, bool l2) {
  if (l2)
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
  else
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// Prefetches the weight lines and the scale line `job.prefetch` bytes ahead of k-block kb,
// running on into the next tile this thread will read.
inline void prefetch_ahead(const TileJob& j, int64_t kb) {
  const int64_t wbytes = j.kb * 512, sbytes = (j.kb + 7) / 8 * 512;
  const int64_t off = kb * 512 + j.prefetch;
  const uint8_t* w = off < wbytes ? j.qweight + off : j.next_qweight ? j.next_qweight + (off - wbytes) : nullptr;
  if (w != nullptr)
    for (int i = 0; i < 8; ++i) prefetch_line(w + 64 * i, j.prefetch_l2);
  const int64_t soff = kb * 64 + j.prefetch / 8;  // scales advance 64 bytes per k-block
  const uint8_t* s = soff < sbytes ? j.qscale + soff : j.next_qscale ? j.next_qscale + (soff - sbytes) : nullptr;
  if (s != nullptr) prefetch_line(s, j.prefetch_l2);
}

// NT tokens from tok0: G lines (row pairs) per pass, 8/G passes. With one pass the
// accumulators stay in registers over all of K; otherwise K is walked in chunks of 8
// k-blocks (4 KB of weights, the activations of the chunk stay in L1) and each pass parks
// its accumulators in `spill` between chunks.
template <class K, int NT, int G>
void tile_tokens(const TileJob& j, typename K::State& st, int tok0) {
  using Vec = typename K::Vec;
  constexpr int kPasses = 8 / G;
  const int64_t KB = j.kb;
  const int64_t xkb = K::kXBytes;
  const uint8_t* x = j.x + tok0 * j.x_stride;
  float* out = j.out + tok0 * 16;
  const bool pf = j.prefetch > 0 && tok0 == 0;  // later token chunks find the tile in cache
  if constexpr (kPasses == 1) {
    Vec acc[8][2][NT];
    for (int g = 0; g < 8; ++g)
      for (int r = 0; r < 2; ++r)
        for (int t = 0; t < NT; ++t) acc[g][r][t] = K::zero();
    for (int64_t kb = 0; kb < KB; ++kb) {
      if (pf) prefetch_ahead(j, kb);
      const uint8_t* w = j.qweight + kb * 512;
      const uint8_t* s = j.qscale + (kb >> 3) * 512;
      for (int g = 0; g < 8; ++g)
        K::template block<NT>(st, w + 64 * g, s + 64 * g, static_cast<int>(kb & 7), x + kb * xkb, j.x_stride,
                              acc[g]);
    }
    for (int g = 0; g < 8; ++g)
      for (int r = 0; r < 2; ++r)
        for (int t = 0; t < NT; ++t) out[t * 16 + g + 8 * r] = K::hsum(acc[g][r][t]);
  } else {
    alignas(64) float spill[kPasses][G][2][NT][K::kLanes];
    for (int64_t kc0 = 0; kc0 < KB; kc0 += 8) {
      const int64_t kend = min_i64(KB, kc0 + 8);
      const uint8_t* s = j.qscale + (kc0 >> 3) * 512;
      for (int p = 0; p < kPasses; ++p) {
        Vec acc[G][2][NT];
        for (int gi = 0; gi < G; ++gi)
          for (int r = 0; r < 2; ++r)
            for (int t = 0; t < NT; ++t) acc[gi][r][t] = kc0 == 0 ? K::zero() : K::load(spill[p][gi][r][t]);
        for (int64_t kb = kc0; kb < kend; ++kb) {
          if (pf && p == 0) prefetch_ahead(j, kb);
          const uint8_t* w = j.qweight + kb * 512;
          for (int gi = 0; gi < G; ++gi) {
            const int g = p * G + gi;
            K::template block<NT>(st, w + 64 * g, s + 64 * g, static_cast<int>(kb & 7), x + kb * xkb, j.x_stride,
                                  acc[gi]);
          }
        }
        if (kend == KB) {
          for (int gi = 0; gi < G; ++gi)
            for (int r = 0; r < 2; ++r)
              for (int t = 0; t < NT; ++t) out[t * 16 + p * G + gi + 8 * r] = K::hsum(acc[gi][r][t]);
        } else {
          for (int gi = 0; gi < G; ++gi)
            for (int r = 0; r < 2; ++r)
              for (int t = 0; t < NT; ++t) K::store(spill[p][gi][r][t], acc[gi][r][t]);
        }
      }
    }
  }
}

// All tokens of the job, in passes of the widest token count that fits.
template <class K>
bool run_tile(const TileJob& j) {
  typename K::State st;
  K::init(st);
  int t = 0;
  while (t < j.tokens) {
    const int rem = j.tokens - t;
    if constexpr (K::kMaxTokens >= 8) {
      if (rem >= 8) {
        tile_tokens<K, 8, K::group(8)>(j, st, t);
        t += 8;
        continue;
      }
    }
    if (rem >= 4) {
      tile_tokens<K, 4, K::group(4)>(j, st, t);
      t += 4;
    } else if (rem >= 2) {
      tile_tokens<K, 2, K::group(2)>(j, st, t);
      t += 2;
    } else {
      tile_tokens<K, 1, K::group(1)>(j, st, t);
      t += 1;
    }
  }
  return K::ok(st);
}

}  // namespace
}  // namespace cpu
}  // namespace dsfp4
