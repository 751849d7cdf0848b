// CUTLASS sm90 bf16 GEMM (TMA warp-specialized cooperative, wgmma) for the dequantize path.
// Compiled for sm_90a only.
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels/fp4_gemm/bf16_gemm_sm90.h"

#include <string>

namespace dsfp4 {
namespace kernels {

namespace {

using namespace cute;
using Bf16 = cutlass::bfloat16_t;
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;

// x: [M, K] row-major (A), w: [N, K] row-major (B as K×N column-major), y: [M, N] row-major.
using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8, Bf16,
    cutlass::layout::RowMajor, 8, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, cutlass::layout::RowMajor, 8, Bf16,
    cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

typename Gemm::Arguments make_args(const void* x, int64_t ldx, const __nv_bfloat16* w, int64_t ldw,
                                   __nv_bfloat16* y, int64_t ldy, int64_t m, int64_t n, int64_t k,
                                   const float* alpha) {
  typename Kernel::StrideA sa = cute::make_stride(ldx, cute::Int<1>{}, int64_t(0));
  typename Kernel::StrideB sb = cute::make_stride(ldw, cute::Int<1>{}, int64_t(0));
  typename Kernel::StrideD sd = cute::make_stride(ldy, cute::Int<1>{}, int64_t(0));
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1},
                                {static_cast<const Bf16*>(x), sa, reinterpret_cast<const Bf16*>(w), sb},
                                {{}, nullptr, sd, reinterpret_cast<Bf16*>(y), sd}};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.alpha_ptr = alpha;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

}  // namespace

bool sm90_bf16_gemm_available() { return true; }

size_t sm90_bf16_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k) {
  auto args = make_args(nullptr, k, nullptr, k, nullptr, n, m, n, k, nullptr);
  return Gemm::get_workspace_size(args);
}

Status sm90_bf16_gemm(const void* x, int64_t ldx, const __nv_bfloat16* w, int64_t ldw, __nv_bfloat16* y,
                      int64_t ldy, int64_t m, int64_t n, int64_t k, const float* alpha, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream) {
  auto args = make_args(x, ldx, w, ldw, y, ldy, m, n, k, alpha);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess)
    return Unsupported("bf16 GEMM: CUTLASS cannot run M=" + std::to_string(m) + " N=" + std::to_string(n) +
                       " K=" + std::to_string(k) + " with these strides");
  if (Gemm::get_workspace_size(args) > workspace_bytes) return InvalidArgument("bf16 GEMM: workspace too small");
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess)
    return Status(StatusCode::kCudaError, "bf16 GEMM: CUTLASS initialize failed");
  if (gemm.run(stream) != cutlass::Status::kSuccess)
    return Status(StatusCode::kCudaError, "bf16 GEMM: CUTLASS launch failed");
  return Status::Ok();
}

}  // namespace kernels
}  // namespace dsfp4
