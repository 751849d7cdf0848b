// CUDA NVFP4 quantize / dequantize / repack. Element formulas are the ones of the CPU
// reference (nvfp4_format.h), so results are bit-identical.
#include <cuda_runtime.h>

#include <string>

#include "dsfp4/nvfp4.h"
#include "kernels/cuda_check.h"
#include "kernels/nvfp4/nvfp4_checks.h"
#include "kernels/nvfp4/nvfp4_format.h"

namespace dsfp4 {

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t work) {
  int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}

// Non-negative floats order like their bit patterns, so atomicMax on the bits is a float max.
__global__ void amax_kernel(MatrixSource src, int64_t rows, int64_t cols, unsigned int* amax_bits) {
  float m = 0.0f;
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    m = fmaxf(m, fabsf(fmt::load_value(src, cols, i / cols, i % cols)));
  }
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  __shared__ float warp_max[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x) / 32; ++w) m = fmaxf(m, warp_max[w]);
    atomicMax(amax_bits, __float_as_uint(m));
  }
}

// One thread per 16-element block.
__global__ void quantize_kernel(MatrixSource src, int64_t rows, int64_t cols, const float* global_scale_in,
                                const unsigned int* amax_bits, uint8_t* packed, uint8_t* block_scale,
                                float* global_scale_out) {
  const float gs = global_scale_in != nullptr ? *global_scale_in
                                              : fmt::global_scale_from_amax(__uint_as_float(*amax_bits));
  const int64_t groups = cols / kNvfp4BlockSize;
  const int64_t total = rows * groups;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i == 0) *global_scale_out = gs;
  if (i >= total) return;
  const int64_t r = i / groups, g = i % groups;
  float vals[kNvfp4BlockSize];
  float bmax = 0.0f;
#pragma unroll
  for (int e = 0; e < kNvfp4BlockSize; ++e) {
    vals[e] = fmt::load_value(src, cols, r, g * kNvfp4BlockSize + e);
    bmax = fmaxf(bmax, fabsf(vals[e]));
  }
  const uint8_t sc = fmt::block_scale_code(bmax, gs);
  block_scale[i] = sc;
  const float s = fmt::e4m3_to_float(sc);
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) lo |= static_cast<uint32_t>(fmt::quantize_element(vals[e], s, gs)) << (4 * e);
#pragma unroll
  for (int e = 0; e < 8; ++e) hi |= static_cast<uint32_t>(fmt::quantize_element(vals[8 + e], s, gs)) << (4 * e);
  *reinterpret_cast<uint2*>(packed + r * (cols / 2) + g * 8) = make_uint2(lo, hi);
}

template <bool kBf16, typename OutT>
__global__ void dequantize_kernel(const uint8_t* packed, const uint8_t* block_scale, const float* global_scale,
                                  int64_t rows, int64_t cols, OutT* dst) {
  const int64_t groups = cols / kNvfp4BlockSize;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * groups) return;
  const int64_t r = i / groups, g = i % groups;
  const float s = fmt::e4m3_to_float(block_scale[i]) * *global_scale;  // ModelOpt's order
  const uint2 q = *reinterpret_cast<const uint2*>(packed + r * (cols / 2) + g * 8);
#pragma unroll
  for (int e = 0; e < kNvfp4BlockSize; ++e) {
    const uint32_t word = e < 8 ? q.x : q.y;
    const uint8_t code = static_cast<uint8_t>((word >> (4 * (e & 7))) & 0xF);
    const float v = fmt::e2m1_to_float(code) * s;
    const int64_t o = r * cols + g * kNvfp4BlockSize + e;
    if constexpr (sizeof(OutT) == 4) {
      dst[o] = v;
    } else if constexpr (kBf16) {
      dst[o] = fmt::float_to_bf16_bits(v);
    } else {
      dst[o] = fmt::float_to_half_bits(v);
    }
  }
}

// One thread per qweight word; the placement is fmt::tiled_word, as on the CPU.
__global__ void repack_weight_kernel(const uint8_t* packed, int64_t rows, int64_t cols, int64_t nkb,
                                     int64_t total_words, uint32_t* qweight) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total_words) return;
  const int j = static_cast<int>(idx & 3);
  const int lane = static_cast<int>((idx >> 2) & 31);
  const int64_t tkb = idx >> 7;
  qweight[idx] = fmt::tiled_word(packed, rows, cols, tkb / nkb, tkb % nkb, lane, j);
}

// One thread per qscale byte.
__global__ void repack_scale_kernel(const uint8_t* block_scale, int64_t rows, int64_t cols, int64_t nkc,
                                    int64_t total_bytes, uint8_t* qscale) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total_bytes) return;
  const int r = static_cast<int>(idx & 1);
  const int kbi = static_cast<int>((idx >> 1) & 7);
  const int lane = static_cast<int>((idx >> 4) & 31);
  const int64_t tkc = idx >> 9;
  qscale[idx] = fmt::tiled_scale_byte(block_scale, rows, cols, tkc / nkc, tkc % nkc, lane, kbi, r);
}

// DeepSeek FP8 block dequantize, one thread per element (fmt::load_value, as on the CPU).
__global__ void fp8_block_dequantize_kernel(MatrixSource src, int64_t rows, int64_t cols, float* dst) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = fmt::load_value(src, cols, i / cols, i % cols);
}

}  // namespace

size_t nvfp4_quantize_workspace_bytes() { return 256; }

Status nvfp4_quantize_cuda(const MatrixSource& src, int64_t rows, int64_t cols, const float* global_scale_in,
                           uint8_t* packed, uint8_t* block_scale, float* global_scale_out, void* workspace,
                           Stream stream) {
  DSFP4_RETURN_IF_ERROR(detail::check_shape(rows, cols, "nvfp4_quantize"));
  DSFP4_RETURN_IF_ERROR(detail::check_source(src, "nvfp4_quantize"));
  if (!packed || !block_scale || !global_scale_out) return InvalidArgument("nvfp4_quantize: output pointer is null");
  if (global_scale_in == nullptr && workspace == nullptr)
    return InvalidArgument("nvfp4_quantize: workspace is null");
  auto s = static_cast<cudaStream_t>(stream);
  auto* amax = static_cast<unsigned int*>(workspace);
  if (global_scale_in == nullptr) {
    DSFP4_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(amax, 0, 4, s), "nvfp4_quantize: memset"));
    amax_kernel<<<blocks_for(rows * cols / 8), kThreads, 0, s>>>(src, rows, cols, amax);
    DSFP4_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "nvfp4_quantize: amax kernel"));
  }
  const int64_t groups = rows * (cols / kNvfp4BlockSize);
  quantize_kernel<<<static_cast<unsigned>((groups + kThreads - 1) / kThreads), kThreads, 0, s>>>(
      src, rows, cols, global_scale_in, amax, packed, block_scale, global_scale_out);
  return cuda_status(cudaGetLastError(), "nvfp4_quantize: quantize kernel");
}

Status nvfp4_dequantize_cuda(const uint8_t* packed, const uint8_t* block_scale, const float* global_scale,
                             int64_t rows, int64_t cols, void* dst, DType dst_dtype, Stream stream) {
  DSFP4_RETURN_IF_ERROR(detail::check_shape(rows, cols, "nvfp4_dequantize"));
  if (!packed || !block_scale || !global_scale || !dst) return InvalidArgument("nvfp4_dequantize: null pointer");
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t groups = rows * (cols / kNvfp4BlockSize);
  const unsigned blocks = static_cast<unsigned>((groups + kThreads - 1) / kThreads);
  switch (dst_dtype) {
    case DType::kFloat32:
      dequantize_kernel<false, float><<<blocks, kThreads, 0, s>>>(packed, block_scale, global_scale, rows, cols,
                                                                 static_cast<float*>(dst));
      break;
    case DType::kBFloat16:
      dequantize_kernel<true, uint16_t><<<blocks, kThreads, 0, s>>>(packed, block_scale, global_scale, rows, cols,
                                                                   static_cast<uint16_t*>(dst));
      break;
    case DType::kFloat16:
      dequantize_kernel<false, uint16_t><<<blocks, kThreads, 0, s>>>(packed, block_scale, global_scale, rows, cols,
                                                                    static_cast<uint16_t*>(dst));
      break;
    default:
      return InvalidArgument(std::string("nvfp4_dequantize: output dtype ") + dtype_name(dst_dtype) +
                             " is not float32, float16 or bfloat16");
  }
  return cuda_status(cudaGetLastError(), "nvfp4_dequantize: kernel launch");
}

Status nvfp4_repack_cuda(const uint8_t* packed, const uint8_t* block_scale, int64_t rows, int64_t cols,
                         uint32_t* qweight, uint8_t* qscale, Stream stream) {
  DSFP4_RETURN_IF_ERROR(detail::check_shape(rows, cols, "nvfp4_repack"));
  if (!packed || !block_scale || !qweight || !qscale) return InvalidArgument("nvfp4_repack: null pointer");
  auto s = static_cast<cudaStream_t>(stream);
  const auto d = fmt::tiled_dims(rows, cols);
  const int64_t words = d.nt * d.kb * 128;
  repack_weight_kernel<<<static_cast<unsigned>((words + kThreads - 1) / kThreads), kThreads, 0, s>>>(
      packed, rows, cols, d.kb, words, qweight);
  DSFP4_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "nvfp4_repack: weight kernel"));
  const int64_t sbytes = d.nt * d.kc * 512;
  repack_scale_kernel<<<static_cast<unsigned>((sbytes + kThreads - 1) / kThreads), kThreads, 0, s>>>(
      block_scale, rows, cols, d.kc, sbytes, qscale);
  return cuda_status(cudaGetLastError(), "nvfp4_repack: scale kernel");
}

Status fp8_block_dequantize_cuda(const MatrixSource& src, int64_t rows, int64_t cols, float* dst, Stream stream) {
  if (rows <= 0 || cols <= 0) return InvalidArgument("fp8_block_dequantize: shape must be positive");
  if (src.dtype != DType::kFloat8E4M3)
    return InvalidArgument("fp8_block_dequantize: source dtype must be float8_e4m3fn");
  DSFP4_RETURN_IF_ERROR(detail::check_source(src, "fp8_block_dequantize"));
  if (!dst) return InvalidArgument("fp8_block_dequantize: output pointer is null");
  fp8_block_dequantize_kernel<<<blocks_for(rows * cols), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      src, rows, cols, dst);
  return cuda_status(cudaGetLastError(), "fp8_block_dequantize: kernel launch");
}

}  // namespace dsfp4
