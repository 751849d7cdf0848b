// Waiting on a word another agent writes: the paging store's ready words (an expert's copy has
// landed) and the CPU lane's done words. One definition for the kernels (device) and their CPU
// twins (host), so every waiter gives up the same way: after timeout_ns it sets *failed (when
// given) and reports false, and the caller writes NaN rows or skips the copy. A waiter that finds
// *failed already set gives up too: the step has failed, and a pipeline that stopped answering
// must cost one timeout, not one per layer and block wave.
#pragma once

#include <cstdint>

namespace dsfp4 {
namespace kernels {
// How often a waiting GPU thread looks at *failed (mapped host memory: a read over the bus).
constexpr uint64_t kFailedLookNs = 1000000;
}  // namespace kernels
}  // namespace dsfp4

#if defined(__CUDACC__)
namespace dsfp4 {
namespace kernels {

__device__ __forceinline__ uint64_t wait_clock_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Thread-level: spins (with a growing sleep) until *word == want; then a fence, so what the
// writer stored before the word is visible.
static __device__ __noinline__ bool wait_word(const uint32_t* word, uint32_t want, uint64_t timeout_ns, uint32_t* failed) {
  const volatile uint32_t* w = word;
  if (*w != want) {
    const uint64_t t0 = wait_clock_ns();
    uint64_t look = kFailedLookNs;
    unsigned sleep = 32;
    while (*w != want) {
      const uint64_t waited = wait_clock_ns() - t0;
      if (waited > timeout_ns) {
        if (failed != nullptr) *reinterpret_cast<volatile uint32_t*>(failed) = 1u;
        return false;
      }
      if (failed != nullptr && waited > look) {
        if (*reinterpret_cast<const volatile uint32_t*>(failed) != 0) return false;  // another wait gave up
        look = waited + kFailedLookNs;
      }
      __nanosleep(sleep);
      sleep = sleep < 1024 ? 2 * sleep : 1024;
    }
  }
  __threadfence_system();
  return true;
}

// The unit address of `slot` once its ready word reached *epoch, or 0 after the timeout.
__device__ __forceinline__ uint64_t wait_for_unit(const uint32_t* ready, const uint32_t* epoch, const uint64_t* addr,
                                                  int slot, uint64_t timeout_ns, uint32_t* failed) {
  const uint32_t want = *reinterpret_cast<const volatile uint32_t*>(epoch);
  if (!wait_word(ready + slot, want, timeout_ns, failed)) return 0;
  return *reinterpret_cast<const volatile uint64_t*>(addr + slot);
}

}  // namespace kernels
}  // namespace dsfp4

#else
#include <chrono>
#include <thread>

namespace dsfp4 {
namespace kernels {

inline bool wait_word(const uint32_t* word, uint32_t want, uint64_t timeout_ns, uint32_t* failed) {
  const auto t0 = std::chrono::steady_clock::now();
  while (__atomic_load_n(word, __ATOMIC_ACQUIRE) != want) {
    if (failed != nullptr && __atomic_load_n(failed, __ATOMIC_ACQUIRE) != 0) return false;  // another wait gave up
    const auto waited = std::chrono::steady_clock::now() - t0;
    if (static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count()) > timeout_ns) {
      if (failed != nullptr) __atomic_store_n(failed, 1u, __ATOMIC_RELEASE);
      return false;
    }
    std::this_thread::yield();
  }
  return true;
}

inline uint64_t wait_for_unit(const uint32_t* ready, const uint32_t* epoch, const uint64_t* addr, int slot,
                              uint64_t timeout_ns, uint32_t* failed) {
  const uint32_t want = __atomic_load_n(epoch, __ATOMIC_ACQUIRE);
  if (!wait_word(ready + slot, want, timeout_ns, failed)) return 0;
  return __atomic_load_n(addr + slot, __ATOMIC_ACQUIRE);
}

// Rows [lo, hi) × n of a bf16 output become NaN: a group whose unit could not be read.
inline void nan_rows(uint16_t* y, int64_t lo, int64_t hi, int64_t n, int64_t ldy) {
  for (int64_t r = lo; r < hi; ++r)
    for (int64_t c = 0; c < n; ++c) y[r * ldy + c] = 0x7FC0;
}

}  // namespace kernels
}  // namespace dsfp4
#endif
