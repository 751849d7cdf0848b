// The per-ISA part of the CPU expert FFN: one 16-row weight tile times a few tokens, and the
// stream read of the bandwidth probe. Internal header.
//
// A tile of the tiled layout (nvfp4.h) is kb k-blocks of 512 bytes (8 lines of 64 bytes; line
// g holds rows g and g+8 of the tile, all 64 columns of the k-block: dword w covers columns
// 4w..4w+3) followed, in the scale array, by ceil(kb/8) chunks of 512 bytes (line g: the
// e4m3 scales of rows g, g+8 for 8 k-blocks, its 16-byte lane c for columns 16c..16c+15).
//
// Activations are arranged once per call to match that lane order, per token and k-block:
//   kF32        float [4 kk][16 w]          = x[64·kb + 4w + kk]                (256 bytes)
//   kBf16Pairs  uint32 [2 q][16 w] bf16 pairs (x[64·kb + 4w + 2q], x[.. + 1])   (128 bytes)
// Columns past K are zero.
//
// The per-ISA files include nothing but this header, the driver and <immintrin.h>: inline
// functions with external linkage compiled there with wider ISA flags could otherwise be picked
// by the linker for code that must run on any CPU.
#pragma once

#include <cstddef>
#include <cstdint>


namespace dsfp4 {
namespace cpu {

enum class XFormat : int { kF32 = 0, kBf16Pairs = 1 };

// The kernels look E2M1 values up pre-multiplied by 2^96 and read each e4m3 block scale as the
// float32 with its bits (the scale × 2^-120), which saves a multiply per scale: a tile's row
// sums come out × 2^-24, and the caller multiplies them by kOutScale (exact). The 2^96 keeps
// the products of |x| up to ~10^7 finite and those that matter far from float32's subnormals.
constexpr float kOutScale = 16777216.0f;  // 2^24
inline int x_bytes_per_kblock(XFormat f) { return f == XFormat::kF32 ? 256 : 128; }

struct TileJob {
  const uint8_t* qweight = nullptr;  // this tile's k-blocks, kb · 512 bytes
  const uint8_t* qscale = nullptr;   // this tile's scale chunks, ceil(kb/8) · 512 bytes
  int64_t kb = 0;
  const uint8_t* x = nullptr;        // arranged activations of token 0 (64-byte aligned)
  int64_t x_stride = 0;              // bytes from one token to the next
  int tokens = 0;
  float* out = nullptr;              // [tokens][16]: row sums × 2^-24, before the global scale
  const uint8_t* next_qweight = nullptr;  // the tile this thread reads next (prefetch), or null
  const uint8_t* next_qscale = nullptr;
  int64_t prefetch = 0;              // bytes ahead in the weight stream, 0: none
  bool prefetch_l2 = false;          // prefetch into L2 only (else into L1)
};

struct IsaKernels {
  XFormat x_format;
  // false when a block scale byte is NaN or negative (>= 0x7F; never written by the repack); out
  // is then meaningless.
  bool (*tile)(const TileJob& job);
  // Reads [p, p + bytes) (bytes a multiple of 256) and returns a value that depends on all of it.
  uint64_t (*read)(const uint8_t* p, size_t bytes);
};

// Defined in the per-ISA files, each compiled with its own target flags; only called after
// cpuid said the CPU has what they need.
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();
const IsaKernels& avx512_bf16_kernels();

}  // namespace cpu
}  // namespace dsfp4
