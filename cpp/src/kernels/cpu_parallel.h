// Row-parallel loops for the CPU references. Internal header.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace dsfp4 {
namespace detail {

// Runs fn(begin, end) over [0, n) on up to hardware_concurrency threads, in chunks of at
// least min_chunk items (threads cost more than they save on small work).
template <typename Fn>
void parallel_rows(int64_t n, Fn fn, int64_t min_chunk = 64) {
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t nthreads = std::min<int64_t>(hw, std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk)));
  if (nthreads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + nthreads - 1) / nthreads;
  for (int64_t t = 0; t < nthreads; ++t) {
    const int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b < e) pool.emplace_back([=] { fn(b, e); });
  }
  for (auto& th : pool) th.join();
}

}  // namespace detail
}  // namespace dsfp4
