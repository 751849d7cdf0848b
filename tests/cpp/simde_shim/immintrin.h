// Test shim: AVX-512 intrinsics emulated by SIMDe (libsimde-dev) on CPUs without AVX-512, for
// test_cpu_experts_emulated. Reductions SIMDe 0.7 lacks are written out here.
#pragma once
#include_next <immintrin.h>
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
static inline float shim_reduce_add_ps(simde__m512 v) {
  float f[16];
  simde_mm512_storeu_ps(f, v);
  float s = 0;
  for (int i = 0; i < 16; ++i) s += f[i];
  return s;
}
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps(v) shim_reduce_add_ps(v)
static inline long long shim_reduce_or_epi64(simde__m512i v) {
  long long f[8];
  simde_mm512_storeu_si512(f, v);
  long long s = 0;
  for (int i = 0; i < 8; ++i) s |= f[i];
  return s;
}
#undef _mm512_reduce_or_epi64
#define _mm512_reduce_or_epi64(v) shim_reduce_or_epi64(v)
