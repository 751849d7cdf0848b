// CUTLASS sm90 FP8 GEMM with per-token-group activation scales (1×128) and 128×128 weight
// block scales, the scales applied per 128-column block in float32 (CUTLASS's "FP8 blockwise"
// warp-specialized cooperative kernel: TMA + wgmma). Compiled for sm_90a only.
#include <string>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels/fp8_gemm/fp8_gemm_sm90.h"

namespace dsfp4 {
namespace kernels {

namespace {

using namespace cute;
using Fp8 = cutlass::float_e4m3_t;
using Bf16 = cutlass::bfloat16_t;
using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_1, _2, _1>;
// Activation scales per token (M granularity 1), weight scales per 128 rows; both per 128
// columns. SFA is M-major ([K/128][M]), SFB K-major ([N/128][K/128], the checkpoint layout).
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::MN, cute::GMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8, Bf16,
    cutlass::layout::RowMajor, 8, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Fp8, cute::tuple<cutlass::layout::RowMajor, LayoutSFA>, 16,
    Fp8, cute::tuple<cutlass::layout::ColumnMajor, LayoutSFB>, 16, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;
using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

typename Gemm::Arguments make_args(const uint8_t* xq, int64_t ldq, const float* sx, const uint8_t* w, int64_t ldw,
                                   const float* sw, __nv_bfloat16* y, int64_t ldy, int64_t m, int64_t n, int64_t k) {
  typename Kernel::StrideA sa = cute::make_stride(ldq, cute::Int<1>{}, int64_t(0));
  typename Kernel::StrideB sb = cute::make_stride(ldw, cute::Int<1>{}, int64_t(0));
  typename Kernel::StrideD sd = cute::make_stride(ldy, cute::Int<1>{}, int64_t(0));
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  // the activation scales are laid out for M rounded up to 4 (16-byte aligned TMA rows)
  LayoutSFA lsfa =
      ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(static_cast<int>(sm90_fp8_scale_ld(m)), ni, ki, 1));
  LayoutSFB lsfb = ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(mi, ni, ki, 1));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {mi, ni, ki, 1},
      {reinterpret_cast<const Fp8*>(xq), sa, reinterpret_cast<const Fp8*>(w), sb, sx, lsfa, sw, lsfb},
      {{}, nullptr, sd, reinterpret_cast<Bf16*>(y), sd}};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

}  // namespace

bool sm90_fp8_blockwise_available() {
  return true;
}

bool sm90_fp8_blockwise_can_run(int64_t m, int64_t n, int64_t k, int64_t ldq, int64_t ldw, int64_t ldy) {
  if (m <= 0 || n <= 0 || k <= 0 || m > (1ll << 30) || n > (1ll << 30) || k > (1ll << 30)) return false;
  if (k % 16 != 0 || ldq % 16 != 0 || ldw % 16 != 0 || n % 8 != 0 || ldy % 8 != 0) return false;
  auto args = make_args(nullptr, ldq, nullptr, nullptr, ldw, nullptr, nullptr, ldy, m, n, k);
  return Gemm::can_implement(args) == cutlass::Status::kSuccess;
}

size_t sm90_fp8_blockwise_workspace_bytes(int64_t m, int64_t n, int64_t k) {
  auto args = make_args(nullptr, k, nullptr, nullptr, k, nullptr, nullptr, n, m, n, k);
  return Gemm::get_workspace_size(args);
}

Status sm90_fp8_blockwise_gemm(const uint8_t* xq, int64_t ldq, const float* sx, const uint8_t* w, int64_t ldw,
                               const float* sw, __nv_bfloat16* y, int64_t ldy, int64_t m, int64_t n, int64_t k,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  auto args = make_args(xq, ldq, sx, w, ldw, sw, y, ldy, m, n, k);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess)
    return Unsupported("fp8_gemm: CUTLASS cannot run M=" + std::to_string(m) + " N=" + std::to_string(n) +
                       " K=" + std::to_string(k) + " with these strides");
  if (Gemm::get_workspace_size(args) > workspace_bytes) return InvalidArgument("fp8_gemm: CUTLASS workspace too small");
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess)
    return Status(StatusCode::kCudaError, "fp8_gemm: CUTLASS initialize failed");
  if (gemm.run(stream) != cutlass::Status::kSuccess)
    return Status(StatusCode::kCudaError, "fp8_gemm: CUTLASS launch failed");
  return Status::Ok();
}

}  // namespace kernels
}  // namespace dsfp4
