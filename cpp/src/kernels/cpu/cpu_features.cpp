// cpuid / XCR0 feature detection and the choice of the CPU experts' instruction set.
#include <iterator>
#include <string>
#include <vector>

#include "dsfp4/cpu_experts.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace dsfp4 {

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Bf16: return "avx512_bf16";
  }
  return "unknown";
}

CpuFeatures cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  f.fma = (c >> 12) & 1;
  f.f16c = (c >> 29) & 1;
  const bool avx = (c >> 28) & 1;
  if (osxsave) {
    uint32_t xlo = 0, xhi = 0;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    f.os_avx = avx && (xlo & 0x6) == 0x6;             // SSE and AVX state
    f.os_avx512 = f.os_avx && (xlo & 0xE0) == 0xE0;   // opmask, ZMM0-15 upper halves, ZMM16-31
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = (b >> 5) & 1;
    f.avx512f = (b >> 16) & 1;
    f.avx512bw = (b >> 30) & 1;
    f.avx512vl = (b >> 31) & 1;
    f.avx512_vnni = (c >> 11) & 1;
    f.amx_bf16 = (d >> 22) & 1;
    f.amx_tile = (d >> 24) & 1;
    const unsigned max_sub = a;
    if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = (a >> 5) & 1;
  }
#endif
  return f;
}

namespace {
struct Need {
  const char* name;
  bool have;
};

std::string missing(const std::vector<Need>& needs) {
  std::string out;
  for (const Need& n : needs)
    if (!n.have) out += (out.empty() ? "" : ", ") + std::string(n.name);
  return out;
}
}  // namespace

Status cpu_isa_resolve(const std::string& name, const CpuFeatures& f, CpuIsa* out) {
  const Need base[] = {{"AVX2", f.avx2}, {"FMA", f.fma}, {"OS AVX state (XCR0)", f.os_avx}};
  const Need wide[] = {{"AVX512F", f.avx512f},
                       {"AVX512BW", f.avx512bw},
                       {"AVX512VL", f.avx512vl},
                       {"OS AVX-512 state (XCR0)", f.os_avx512}};
  const std::vector<Need> avx2(std::begin(base), std::end(base));
  std::vector<Need> avx512 = avx2;
  for (const Need& n : wide) avx512.push_back(n);
  std::vector<Need> avx512_bf16 = avx512;
  avx512_bf16.push_back({"AVX512_BF16", f.avx512_bf16});
#if !defined(DSFP4_CPU_EXPERTS_X86)
  (void)out;
  return Unsupported("cpu experts: this build has no x86 CPU expert kernels: set cpu_experts to \"off\"");
#else
#if defined(DSFP4_CPU_EXPERTS_NO_BF16)
  avx512_bf16.push_back({"a compiler with -mavx512bf16 at build time", false});
#endif
  if (missing(avx2).size() > 0)
    return Unsupported("cpu experts need AVX2 and FMA; this CPU lacks " + missing(avx2) +
                       ": set cpu_experts to \"off\"");
  if (name == "auto") {
    *out = missing(avx512_bf16).empty() ? CpuIsa::kAvx512Bf16 : missing(avx512).empty() ? CpuIsa::kAvx512 : CpuIsa::kAvx2;
    return Status::Ok();
  }
  const struct {
    const char* name;
    CpuIsa isa;
    const std::vector<Need>* needs;
  } options[] = {{"avx2", CpuIsa::kAvx2, &avx2},
                 {"avx512", CpuIsa::kAvx512, &avx512},
                 {"avx512_bf16", CpuIsa::kAvx512Bf16, &avx512_bf16}};
  for (const auto& o : options) {
    if (name != o.name) continue;
    const std::string lack = missing(*o.needs);
    if (!lack.empty())
      return Unsupported("cpu experts: isa \"" + name + "\" needs what this CPU lacks: " + lack);
    *out = o.isa;
    return Status::Ok();
  }
  return InvalidArgument("cpu experts: unknown isa \"" + name + "\" (expected auto, avx512_bf16, avx512 or avx2)");
#endif
}

}  // namespace dsfp4
