// The AVX-512 tile kernels, built against SIMDe (tests/cpp/simde_shim), against the AVX2 kernel
// on random tiles: every valid e4m3 scale (subnormals and padding zeros too), K not a multiple
// of 64, token counts 1..17 (every pass shape); NaN and negative scales refused. Lets machines
// without AVX-512 check the AVX-512 code; test_cpu_experts_cpp runs it natively where it can.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "kernels/cpu/cpu_experts_kernel.h"
using namespace dsfp4::cpu;
static uint16_t f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7FFF + ((u >> 16) & 1); return u >> 16; }
static float bf2f(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; memcpy(&f, &u, 4); return f; }
static void arrange(const std::vector<uint16_t>& x, int64_t K, int64_t kbs, XFormat f, uint8_t* dst) {
  for (int64_t kb = 0; kb < kbs; ++kb) for (int w = 0; w < 16; ++w) for (int kk = 0; kk < 4; ++kk) {
    int64_t col = 64 * kb + 4 * w + kk; uint16_t v = col < K ? x[col] : 0;
    if (f == XFormat::kF32) ((float*)dst)[kb * 64 + kk * 16 + w] = bf2f(v);
    else ((uint16_t*)dst)[(kb * 32 + (kk / 2) * 16 + w) * 2 + kk % 2] = v;
  }
}
int main() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("skipped: the emulation runs on AVX2\n");
    return 0;
  }
  int fails = 0;
  std::mt19937 rng(5);
  for (int64_t K : {64, 96, 448, 1024, 2048, 7168}) for (int T : {1, 2, 3, 4, 5, 8, 9, 16, 17}) {
    int64_t kb = (K + 63) / 64, kc = (kb + 7) / 8;
    std::vector<uint8_t> w(kb * 512), s(kc * 512);
    for (auto& v : w) v = rng();
    for (auto& v : s) v = rng() % 0x7F;  // every valid non-negative e4m3 incl. subnormals and 0
    // zero the codes and scales past K (the layout's padding)
    std::vector<std::vector<uint16_t>> x(T, std::vector<uint16_t>(K));
    std::normal_distribution<float> d;
    for (auto& r : x) for (auto& v : r) v = f2bf(d(rng));
    std::vector<float> ref(16 * T), got(16 * T);
    const IsaKernels* ks[3] = {&avx2_kernels(), &avx512_kernels(), &avx512_bf16_kernels()};
    for (int k = 0; k < 3; ++k) {
      int xkb = x_bytes_per_kblock(ks[k]->x_format);
      int64_t xs = kb * xkb + 64;
      std::vector<uint8_t> xa(xs * T + 64);
      uint8_t* xp = xa.data() + (64 - (uintptr_t)xa.data() % 64) % 64;
      for (int t = 0; t < T; ++t) arrange(x[t], K, kb, ks[k]->x_format, xp + t * xs);
      TileJob j; j.qweight = w.data(); j.qscale = s.data(); j.kb = kb; j.x = xp; j.x_stride = xs; j.tokens = T;
      j.out = k ? got.data() : ref.data(); j.prefetch = 1024;
      if (!ks[k]->tile(j)) { printf("tile refused valid scales\n"); ++fails; }
      if (k) {
        double worst = 0, rms = 0;
        for (int i = 0; i < 16 * T; ++i) rms += double(ref[i]) * ref[i];
        rms = std::sqrt(rms / (16 * T));
        for (int i = 0; i < 16 * T; ++i) worst = std::max(worst, std::fabs(double(got[i]) - ref[i]) / rms);
        if (!(worst < 1e-5)) { printf("isa %d K %ld T %d: max |diff|/rms %.3g\n", k, (long)K, T, worst); ++fails; }
      }
    }
  }
  // NaN / negative scale refusal on each ISA
  {
    int64_t kb = 16; std::vector<uint8_t> w(kb * 512, 0x11), s(2 * 512, 0x38);
    std::vector<uint8_t> xa(kb * 256 + 128, 0); std::vector<float> out(16);
    for (int k = 0; k < 3; ++k) for (uint8_t bad : {0x7F, 0xFF, 0x90}) {
      const IsaKernels* ks[3] = {&avx2_kernels(), &avx512_kernels(), &avx512_bf16_kernels()};
      s[600] = bad;
      TileJob j; j.qweight = w.data(); j.qscale = s.data(); j.kb = kb; j.x = (uint8_t*)(((uintptr_t)xa.data() + 63) / 64 * 64);
      j.x_stride = kb * 256; j.tokens = 1; j.out = out.data();
      if (ks[k]->tile(j)) { printf("isa %d accepted scale 0x%02x\n", k, bad); ++fails; }
      s[600] = 0x38;
    }
  }
  printf(fails ? "%d FAILED\n" : "emulated AVX-512 kernels agree with AVX2 (%d)\n", fails);
  return fails != 0;
}
