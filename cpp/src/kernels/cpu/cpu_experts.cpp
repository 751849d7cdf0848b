// CpuExpertPool: pinned worker threads, the queue of calls, and one call's work split into
// items that any thread can take:
//   phase 0  (job, tokens)       arrange the job's x rows for the ISA's kernel; check scales
//   phase 1  (job, inter tiles)  gate and up tiles → h = bf16(silu(bf16 g) · bf16 u), arranged
//   phase 2  (job, down tiles)   down tiles → y rows (bf16) in the call's workspace; the last
//                                item of a job checks them and copies them to the job's y
// Items are handed out in that order from one atomic counter, so an item waits (spinning) only
// for items of its own job that other threads are already running.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dsfp4/cpu_experts.h"
#include "dsfp4/nvfp4.h"
#include "kernels/cpu/cpu_experts_kernel.h"
#include "kernels/nvfp4/nvfp4_format.h"

namespace dsfp4 {

namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

#if defined(__x86_64__) || defined(__i386__)
inline void cpu_relax() { _mm_pause(); }
// Round to nearest, no flush-to-zero or denormals-are-zero: the kernels rely on exact subnormal
// block scales, and threads inherit MXCSR from whoever created them.
inline void reset_float_mode() { _mm_setcsr(0x1F80); }
#else
inline void cpu_relax() { std::this_thread::yield(); }
inline void reset_float_mode() {}
#endif

constexpr int kTokensPerPrep = 4;  // phase 0: x rows arranged per item
constexpr int kMaxSpareBuffers = 4;

int64_t align64(int64_t v) { return (v + 63) / 64 * 64; }

struct Buffer {
  uint8_t* data = nullptr;
  size_t bytes = 0;
  ~Buffer() { std::free(data); }
};

enum class Phase : uint8_t { kPrep = 0, kGateUp = 1, kDown = 2, kRead = 3 };

struct Item {
  Phase phase;
  int32_t job;
  int64_t begin, end;
};

struct JobState {
  CpuExpertJob job;
  int64_t xa = 0, ha = 0, ys = 0;  // workspace offsets: arranged x, arranged h, staged y
  int n0 = 0, n1 = 0, n2 = 0;      // items per phase
  std::atomic<int> done0{0}, done1{0}, done2{0};
  std::atomic<bool> failed{false};
  bool inject = false;
  Status status;  // written once, by the thread that set `failed`
};

std::string where(int layer, const CpuExpertJob& j) {
  return "cpu experts: layer " + std::to_string(layer) + " expert " + std::to_string(j.expert) + ": ";
}

class CallState final : public CpuExpertsHandle {
 public:
  Phase kind = Phase::kPrep;  // kRead for the bandwidth probe
  int layer = -1;
  ExpertUnitLayout layout;
  const uint16_t* x = nullptr;
  int64_t ldx = 0;
  int64_t kbh = 0, kch = 0, kbi = 0, kci = 0;  // k-blocks and scale chunks of hidden, inter
  int64_t xkb = 0;                             // arranged bytes per token and k-block
  int64_t xs_h = 0, xs_i = 0;                  // arranged bytes per token of x and of h
  int64_t max_tokens = 0;
  std::unique_ptr<JobState[]> jobs;
  int njobs = 0;
  std::vector<Item> items;
  std::atomic<int64_t> next{0}, done_items{0};
  std::unique_ptr<Buffer> ws;
  const uint8_t* read_data = nullptr;
  std::atomic<uint64_t> read_sink{0};
  int64_t weight_bytes = 0, experts = 0;
  Clock::time_point t_submit, t_first, t_end;
  std::function<void(const Status&)> on_done;

  int spin_us = 0;  // wait() spins this long before sleeping (a futex wake-up costs tens of µs)

  Status wait(CpuExpertsStats* stats) override {
    const auto spin_until = Clock::now() + std::chrono::microseconds(spin_us);
    for (uint32_t n = 1; !flag_.load(std::memory_order_acquire); ++n) {
      if ((n & 63) == 0 && Clock::now() >= spin_until) break;
      cpu_relax();
    }
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return finished_; });
    if (stats != nullptr) {
      stats->experts = experts;
      stats->weight_bytes = weight_bytes;
      stats->start_ms = items.empty() ? 0.0 : ms_between(t_submit, t_first);
      stats->run_ms = items.empty() ? 0.0 : ms_between(t_first, t_end);
    }
    return status_;
  }
  bool done() const override {
    std::lock_guard<std::mutex> lk(mu_);
    return finished_;
  }
  void finish(const Status& st) {
    if (on_done) {
      try {
        on_done(st);
      } catch (...) {  // a throwing callback must not take a worker down
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      status_ = st;
      finished_ = true;
    }
    flag_.store(true, std::memory_order_release);
    cv_.notify_all();
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool finished_ = false;
  std::atomic<bool> flag_{false};  // finished_, readable without the lock
  Status status_;
};

void fail(JobState& js, Status st) {
  bool expected = false;
  if (js.failed.compare_exchange_strong(expected, true, std::memory_order_acq_rel)) js.status = std::move(st);
}

void wait_count(const std::atomic<int>& count, int target) {
  while (count.load(std::memory_order_acquire) < target) cpu_relax();
}

const cpu::IsaKernels* kernels_for(CpuIsa isa) {
#if defined(DSFP4_CPU_EXPERTS_X86)
  switch (isa) {
    case CpuIsa::kAvx2: return &cpu::avx2_kernels();
    case CpuIsa::kAvx512: return &cpu::avx512_kernels();
#if !defined(DSFP4_CPU_EXPERTS_NO_BF16)
    case CpuIsa::kAvx512Bf16: return &cpu::avx512_bf16_kernels();
#endif
    default: return nullptr;
  }
#else
  (void)isa;
  return nullptr;
#endif
}

// Rows of x (bf16, K columns) → the kernel's arrangement (cpu_experts_kernel.h), zero past K.
void arrange_row(const uint16_t* src, int64_t K, int64_t kbs, cpu::XFormat f, uint8_t* dst) {
  if (f == cpu::XFormat::kF32) {
    float* d = reinterpret_cast<float*>(dst);
    for (int64_t kb = 0; kb < kbs; ++kb)
      for (int kk = 0; kk < 4; ++kk)
        for (int w = 0; w < 16; ++w) {
          const int64_t col = 64 * kb + 4 * w + kk;
          d[kb * 64 + kk * 16 + w] = col < K ? fmt::bf16_bits_to_float(src[col]) : 0.0f;
        }
  } else {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t kb = 0; kb < kbs; ++kb)
      for (int q = 0; q < 2; ++q)
        for (int w = 0; w < 16; ++w)
          for (int h = 0; h < 2; ++h) {
            const int64_t col = 64 * kb + 4 * w + 2 * q + h;
            d[(kb * 32 + q * 16 + w) * 2 + h] = col < K ? src[col] : 0;
          }
  }
}

// Stores h (already rounded to bf16) at column i of an arranged row.
inline void put_arranged(uint8_t* row, int64_t i, uint16_t bf16, cpu::XFormat f) {
  const int64_t kb = i / 64, col = i % 64, w = col / 4, kk = col % 4;
  if (f == cpu::XFormat::kF32)
    reinterpret_cast<float*>(row)[kb * 64 + kk * 16 + w] = fmt::bf16_bits_to_float(bf16);
  else
    reinterpret_cast<uint16_t*>(row)[(kb * 32 + (kk / 2) * 16 + w) * 2 + kk % 2] = bf16;
}

inline uint16_t round_bf16(float v) { return fmt::float_to_bf16_bits(v); }

int64_t unit_bytes_read(const ExpertUnitLayout& L) {
  const int64_t H = L.hidden, I = L.inter;
  return static_cast<int64_t>(tiled_weight_bytes(2 * I, H) + tiled_scale_bytes(2 * I, H) + tiled_weight_bytes(H, I) +
                              tiled_scale_bytes(H, I)) +
         4 * ((L.gate_up_scale_per_tile ? (2 * I + 15) / 16 : 1) + (L.down_scale_per_tile ? (H + 15) / 16 : 1));
}

}  // namespace

struct CpuExpertPool::Impl {
  CpuExpertsOptions opt;
  CpuIsa isa = CpuIsa::kAvx2;
  const cpu::IsaKernels* k = nullptr;
  std::vector<int> cores;
  std::vector<std::thread> workers;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<CallState>> queue;
  std::atomic<int> queued{0};
  int sleepers = 0;
  bool stop = false;
  std::vector<std::unique_ptr<Buffer>> spare;
  int fault_layer = INT_MIN, fault_expert = INT_MIN;

  ~Impl() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    cv.notify_all();
    for (auto& t : workers)
      if (t.joinable()) t.join();
  }

  Status take_buffer(size_t bytes, std::unique_ptr<Buffer>* out) {
    {
      std::lock_guard<std::mutex> lk(mu);
      int best = -1;
      for (size_t i = 0; i < spare.size(); ++i)
        if (spare[i]->bytes >= bytes && (best < 0 || spare[i]->bytes < spare[best]->bytes)) best = static_cast<int>(i);
      if (best >= 0) {
        *out = std::move(spare[best]);
        spare.erase(spare.begin() + best);
        return Status::Ok();
      }
    }
    auto b = std::make_unique<Buffer>();
    b->bytes = (bytes + 63) / 64 * 64;
    if (b->bytes == 0) b->bytes = 64;
    b->data = static_cast<uint8_t*>(std::aligned_alloc(64, b->bytes));
    if (b->data == nullptr)
      return Status(StatusCode::kOutOfMemory, "cpu experts: cannot allocate " + std::to_string(bytes) +
                                                  " bytes of workspace");
    *out = std::move(b);
    return Status::Ok();
  }
  void give_buffer(std::unique_ptr<Buffer> b) {
    if (!b) return;
    std::lock_guard<std::mutex> lk(mu);
    if (static_cast<int>(spare.size()) < kMaxSpareBuffers) spare.push_back(std::move(b));
  }

  void enqueue(const std::shared_ptr<CallState>& c) {
    c->t_submit = Clock::now();
    std::lock_guard<std::mutex> lk(mu);
    queue.push_back(c);
    queued.fetch_add(1, std::memory_order_release);
    if (sleepers > 0) cv.notify_all();
  }

  // The oldest call with items left; spins for opt.spin_us, then sleeps. Null: stop.
  std::shared_ptr<CallState> next_call() {
    auto spin_until = Clock::now() + std::chrono::microseconds(opt.spin_us);
    for (uint32_t n = 1;; ++n) {
      if (queued.load(std::memory_order_acquire) > 0) {
        std::lock_guard<std::mutex> lk(mu);
        while (!queue.empty()) {
          const auto& f = queue.front();
          if (f->next.load(std::memory_order_relaxed) < static_cast<int64_t>(f->items.size())) return f;
          queue.pop_front();
          queued.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      if ((n & 63) == 0 && Clock::now() >= spin_until) {
        std::unique_lock<std::mutex> lk(mu);
        if (stop && queue.empty()) return nullptr;
        ++sleepers;
        cv.wait(lk, [&] { return stop || !queue.empty(); });
        --sleepers;
        if (stop && queue.empty()) return nullptr;
        spin_until = Clock::now() + std::chrono::microseconds(opt.spin_us);
        continue;
      }
      cpu_relax();
    }
  }

  void worker_main() {
    reset_float_mode();
    std::vector<float> scratch;
    for (;;) {
      std::shared_ptr<CallState> c = next_call();
      if (!c) return;
      work(*c, scratch);
    }
  }

  void work(CallState& c, std::vector<float>& scratch) {
    const int64_t total = static_cast<int64_t>(c.items.size());
    for (;;) {
      const int64_t i = c.next.fetch_add(1, std::memory_order_acq_rel);
      if (i >= total) return;
      if (i == 0) c.t_first = Clock::now();
      run_item(c, c.items[i], scratch);
      if (c.done_items.fetch_add(1, std::memory_order_acq_rel) + 1 == total) finish_call(c);
    }
  }

  void finish_call(CallState& c) {
    c.t_end = Clock::now();
    Status st;
    for (int j = 0; j < c.njobs; ++j)
      if (c.jobs[j].failed.load(std::memory_order_acquire)) {
        st = c.jobs[j].status;
        break;
      }
    give_buffer(std::move(c.ws));
    c.finish(st);
  }

  void run_item(CallState& c, const Item& it, std::vector<float>& scratch) {
    if (it.phase == Phase::kRead) {
      const uint64_t v = k->read(c.read_data + it.begin, static_cast<size_t>(it.end - it.begin));
      c.read_sink.fetch_xor(v, std::memory_order_relaxed);
      return;
    }
    JobState& js = c.jobs[it.job];
    switch (it.phase) {
      case Phase::kPrep:
        prep(c, js, it.begin, it.end);
        js.done0.fetch_add(1, std::memory_order_release);
        break;
      case Phase::kGateUp:
        wait_count(js.done0, js.n0);
        if (!js.failed.load(std::memory_order_acquire)) gate_up(c, js, it.begin, it.end, scratch);
        js.done1.fetch_add(1, std::memory_order_release);
        break;
      case Phase::kDown:
        wait_count(js.done1, js.n1);
        if (!js.failed.load(std::memory_order_acquire)) down(c, js, it.begin, it.end, scratch);
        if (js.done2.fetch_add(1, std::memory_order_acq_rel) + 1 == js.n2) finish_job(c, js);
        break;
      default: break;
    }
  }

  void prep(CallState& c, JobState& js, int64_t t0, int64_t t1) {
    const ExpertUnitLayout& L = c.layout;
    const CpuExpertJob& j = js.job;
    if (t0 == 0) {
      if (js.inject) {
        fail(js, Status(StatusCode::kInternal, where(c.layer, j) + "injected fault"));
        return;
      }
      const struct {
        const char* name;
        int64_t off, count;
      } scales[] = {{"gate_up", L.gate_up_global_scale, L.gate_up_scale_per_tile ? 2 * L.inter / 16 : 1},
                    {"down", L.down_global_scale, L.down_scale_per_tile ? L.hidden / 16 : 1}};
      for (const auto& s : scales) {
        const float* gs = reinterpret_cast<const float*>(j.unit + s.off);
        for (int64_t i = 0; i < s.count; ++i)
          if (!std::isfinite(gs[i])) {
            fail(js, InvalidArgument(where(c.layer, j) + "the " + s.name + " global scale of row tile " +
                                     std::to_string(i) + " is " + std::to_string(gs[i]) +
                                     " (the unit is corrupt)"));
            return;
          }
      }
    }
    const cpu::XFormat f = k->x_format;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = j.rows ? j.rows[t] : t;
      arrange_row(c.x + row * c.ldx, L.hidden, c.kbh, f, c.ws->data + js.xa + t * c.xs_h);
      // h columns past inter stay zero; phase 1 writes the others
      if (L.inter % 64 != 0) std::memset(c.ws->data + js.ha + t * c.xs_i + (c.kbi - 1) * c.xkb, 0, c.xkb);
    }
  }

  // Inter tiles [j0, j1): the gate tiles one after the other, then the up tiles (two long
  // contiguous streams), then h = bf16(silu(bf16 g) · bf16 u) for their rows.
  void gate_up(CallState& c, JobState& js, int64_t j0, int64_t j1, std::vector<float>& scratch) {
    const ExpertUnitLayout& L = c.layout;
    const CpuExpertJob& j = js.job;
    const int64_t T = j.tokens, ti = L.inter / 16, n = j1 - j0;
    scratch.resize(static_cast<size_t>(32 * T * n));
    const int64_t wt = c.kbh * 512, st = c.kch * 512;  // bytes per row tile
    const uint8_t* qw = j.unit + L.gate_up_qweight;
    const uint8_t* qs = j.unit + L.gate_up_qscale;
    const float* gs = reinterpret_cast<const float*>(j.unit + L.gate_up_global_scale);
    cpu::TileJob tj;
    tj.kb = c.kbh;
    tj.x = c.ws->data + js.xa;
    tj.x_stride = c.xs_h;
    tj.tokens = static_cast<int>(T);
    tj.prefetch = opt.prefetch_bytes;
    tj.prefetch_l2 = opt.prefetch_l2;
    for (int64_t i = 0; i < 2 * n; ++i) {  // gate tiles j0.., then up tiles j0 + ti..
      const int64_t rt = i < n ? j0 + i : ti + j0 + (i - n);
      const int64_t nt = i + 1 < n ? rt + 1 : i + 1 == n ? ti + j0 : i + 1 < 2 * n ? rt + 1 : -1;
      tj.qweight = qw + rt * wt;
      tj.qscale = qs + rt * st;
      tj.next_qweight = nt >= 0 ? qw + nt * wt : nullptr;
      tj.next_qscale = nt >= 0 ? qs + nt * st : nullptr;
      tj.out = scratch.data() + i * 16 * T;
      if (!k->tile(tj)) {
        fail(js, InvalidArgument(where(c.layer, j) + "a gate_up block scale of rows " + std::to_string(16 * rt) +
                                 ".." + std::to_string(16 * rt + 15) +
                                 " is NaN or negative (the unit is corrupt)"));
        return;
      }
    }
    uint8_t* ha = c.ws->data + js.ha;
    const int64_t h_stride = c.xs_i;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t jt = j0 + i;
      const float* og = scratch.data() + i * 16 * T;
      const float* ou = scratch.data() + (n + i) * 16 * T;
      const float sg = (L.gate_up_scale_per_tile ? gs[jt] : gs[0]) * cpu::kOutScale;
      const float su = (L.gate_up_scale_per_tile ? gs[jt + ti] : gs[0]) * cpu::kOutScale;
      for (int64_t t = 0; t < T; ++t)
        for (int r = 0; r < 16; ++r) {
          // as the GPU path: GEMM outputs and SiLU·mul rounded to bf16
          const float g = fmt::bf16_bits_to_float(round_bf16(og[t * 16 + r] * sg));
          const float u = fmt::bf16_bits_to_float(round_bf16(ou[t * 16 + r] * su));
          put_arranged(ha + t * h_stride, 16 * jt + r, round_bf16(g / (1.0f + std::exp(-g)) * u), k->x_format);
        }
    }
  }

  void down(CallState& c, JobState& js, int64_t t0, int64_t t1, std::vector<float>& scratch) {
    const ExpertUnitLayout& L = c.layout;
    const CpuExpertJob& j = js.job;
    const int64_t T = j.tokens, H = L.hidden;
    scratch.resize(static_cast<size_t>(16 * T));
    const int64_t wt = c.kbi * 512, st = c.kci * 512;
    const uint8_t* qw = j.unit + L.down_qweight;
    const uint8_t* qs = j.unit + L.down_qscale;
    const float* gs = reinterpret_cast<const float*>(j.unit + L.down_global_scale);
    uint16_t* ys = reinterpret_cast<uint16_t*>(c.ws->data + js.ys);
    cpu::TileJob tj;
    tj.kb = c.kbi;
    tj.x = c.ws->data + js.ha;
    tj.x_stride = c.xs_i;
    tj.tokens = static_cast<int>(T);
    tj.out = scratch.data();
    tj.prefetch = opt.prefetch_bytes;
    tj.prefetch_l2 = opt.prefetch_l2;
    for (int64_t rt = t0; rt < t1; ++rt) {
      tj.qweight = qw + rt * wt;
      tj.qscale = qs + rt * st;
      tj.next_qweight = rt + 1 < t1 ? qw + (rt + 1) * wt : nullptr;
      tj.next_qscale = rt + 1 < t1 ? qs + (rt + 1) * st : nullptr;
      if (!k->tile(tj)) {
        fail(js, InvalidArgument(where(c.layer, j) + "a down block scale of rows " + std::to_string(16 * rt) + ".." +
                                 std::to_string(16 * rt + 15) + " is NaN or negative (the unit is corrupt)"));
        return;
      }
      const float s = (L.down_scale_per_tile ? gs[rt] : gs[0]) * cpu::kOutScale;
      for (int64_t t = 0; t < T; ++t)
        for (int r = 0; r < 16; ++r) ys[t * H + 16 * rt + r] = round_bf16(scratch[t * 16 + r] * s);
    }
  }

  // All down items of the job are done: check its rows and hand them to the caller.
  void finish_job(CallState& c, JobState& js) {
    if (js.failed.load(std::memory_order_acquire)) return;
    const CpuExpertJob& j = js.job;
    const int64_t H = c.layout.hidden;
    const uint16_t* ys = reinterpret_cast<const uint16_t*>(c.ws->data + js.ys);
    for (int64_t i = 0; i < j.tokens * H; ++i)
      if ((ys[i] & 0x7F80u) == 0x7F80u) {
        fail(js, InvalidArgument(where(c.layer, j) + "output row " + std::to_string(i / H) + " column " +
                                 std::to_string(i % H) + " is not finite (NaN or inf in x, or an overflow)"));
        return;
      }
    for (int64_t t = 0; t < j.tokens; ++t)
      std::memcpy(static_cast<uint16_t*>(j.y) + t * j.ldy, ys + t * H, static_cast<size_t>(H) * 2);
  }

  Status check(const CpuExpertsCall& call) const {
    const ExpertUnitLayout& L = call.layout;
    const std::string at = "cpu experts: layer " + std::to_string(call.layer) + ": ";
    if (L.hidden <= 0 || L.inter <= 0 || L.hidden % 16 != 0 || L.inter % 16 != 0)
      return InvalidArgument(at + "hidden (" + std::to_string(L.hidden) + ") and inter (" + std::to_string(L.inter) +
                             ") must be positive multiples of 16");
    DSFP4_RETURN_IF_ERROR(check_expert_unit_layout(L, L.hidden, L.inter));
    if (call.count < 0 || (call.count > 0 && call.jobs == nullptr))
      return InvalidArgument(at + "jobs is null or count (" + std::to_string(call.count) + ") is negative");
    if (call.x_rows < 0) return InvalidArgument(at + "x_rows is negative");
    for (int i = 0; i < call.count; ++i) {
      const CpuExpertJob& j = call.jobs[i];
      const std::string jat = at + "job " + std::to_string(i) + " (expert " + std::to_string(j.expert) + "): ";
      if (j.tokens < 0) return InvalidArgument(jat + "tokens is negative");
      if (j.tokens == 0) continue;
      if (j.tokens > INT_MAX) return InvalidArgument(jat + "too many tokens");
      if (j.unit == nullptr || reinterpret_cast<uintptr_t>(j.unit) % 16 != 0)
        return InvalidArgument(jat + "unit address is null or not 16-byte aligned");
      if (j.y == nullptr || j.ldy < L.hidden)
        return InvalidArgument(jat + "y is null or ldy (" + std::to_string(j.ldy) + ") < hidden");
      if (call.x == nullptr || call.ldx < L.hidden)
        return InvalidArgument(jat + "x is null or ldx (" + std::to_string(call.ldx) + ") < hidden");
      if (j.rows == nullptr) {
        if (j.tokens > call.x_rows)
          return InvalidArgument(jat + std::to_string(j.tokens) + " tokens but x has " + std::to_string(call.x_rows) +
                                 " rows");
      } else {
        for (int64_t t = 0; t < j.tokens; ++t)
          if (j.rows[t] < 0 || j.rows[t] >= call.x_rows)
            return InvalidArgument(jat + "rows[" + std::to_string(t) + "] = " + std::to_string(j.rows[t]) +
                                   " is outside x's " + std::to_string(call.x_rows) + " rows");
      }
    }
    return Status::Ok();
  }

  Status build(const CpuExpertsCall& call, std::shared_ptr<CallState>* out) {
    auto c = std::make_shared<CallState>();
    const ExpertUnitLayout& L = call.layout;
    c->layer = call.layer;
    c->layout = L;
    c->x = static_cast<const uint16_t*>(call.x);
    c->ldx = call.ldx;
    c->kbh = (L.hidden + 63) / 64;
    c->kch = (c->kbh + 7) / 8;
    c->kbi = (L.inter + 63) / 64;
    c->kci = (c->kbi + 7) / 8;
    c->xkb = cpu::x_bytes_per_kblock(k->x_format);
    // One line more than the row: tokens 4 KB apart would share L1 sets in the kernel's loop.
    c->xs_h = c->kbh * c->xkb + 64;
    c->xs_i = c->kbi * c->xkb + 64;
    c->njobs = call.count;
    c->jobs.reset(new JobState[call.count > 0 ? call.count : 1]);
    int64_t ws = 0;
    {
      std::lock_guard<std::mutex> lk(mu);
      for (int i = 0; i < call.count; ++i)
        if (call.jobs[i].expert == fault_expert && call.layer == fault_layer && call.jobs[i].tokens > 0) {
          c->jobs[i].inject = true;
          fault_layer = fault_expert = INT_MIN;
          break;
        }
    }
    const int64_t ti = L.inter / 16, th = L.hidden / 16;
    for (int i = 0; i < call.count; ++i) {
      JobState& js = c->jobs[i];
      js.job = call.jobs[i];
      const int64_t T = js.job.tokens;
      if (T == 0) continue;
      ++c->experts;
      c->weight_bytes += unit_bytes_read(L);
      c->max_tokens = std::max(c->max_tokens, T);
      js.xa = ws;
      ws += T * c->xs_h;
      js.ha = ws;
      ws += T * c->xs_i;
      js.ys = ws;
      ws += align64(T * L.hidden * 2);
      js.n0 = static_cast<int>((T + kTokensPerPrep - 1) / kTokensPerPrep);
      js.n1 = static_cast<int>((ti + opt.gate_up_tiles - 1) / opt.gate_up_tiles);
      js.n2 = static_cast<int>((th + opt.down_tiles - 1) / opt.down_tiles);
    }
    for (int i = 0; i < call.count; ++i)
      for (int64_t t = 0; t < c->jobs[i].job.tokens; t += kTokensPerPrep)
        c->items.push_back({Phase::kPrep, i, t, std::min<int64_t>(c->jobs[i].job.tokens, t + kTokensPerPrep)});
    for (int i = 0; i < call.count; ++i)
      if (c->jobs[i].job.tokens > 0)
        for (int64_t t = 0; t < ti; t += opt.gate_up_tiles)
          c->items.push_back({Phase::kGateUp, i, t, std::min<int64_t>(ti, t + opt.gate_up_tiles)});
    for (int i = 0; i < call.count; ++i)
      if (c->jobs[i].job.tokens > 0)
        for (int64_t t = 0; t < th; t += opt.down_tiles)
          c->items.push_back({Phase::kDown, i, t, std::min<int64_t>(th, t + opt.down_tiles)});
    if (!c->items.empty()) DSFP4_RETURN_IF_ERROR(take_buffer(static_cast<size_t>(ws), &c->ws));
    *out = std::move(c);
    return Status::Ok();
  }
};

CpuExpertPool::CpuExpertPool() : impl_(new Impl) {}
CpuExpertPool::~CpuExpertPool() = default;

Status CpuExpertPool::create(const CpuExpertsOptions& options, std::unique_ptr<CpuExpertPool>* out) {
  if (out == nullptr) return InvalidArgument("cpu experts: out is null");
  CpuIsa isa;
  DSFP4_RETURN_IF_ERROR(cpu_isa_resolve(options.isa, cpu_features(), &isa));
  const cpu::IsaKernels* k = kernels_for(isa);
  if (k == nullptr) return Unsupported(std::string("cpu experts: isa ") + cpu_isa_name(isa) + " is not in this build");
  if (options.threads < 0) return InvalidArgument("cpu experts: threads must be non-negative");
  if (options.spin_us < 0 || options.prefetch_bytes < 0)
    return InvalidArgument("cpu experts: spin_us and prefetch_bytes must be non-negative");
  if (options.gate_up_tiles < 1 || options.down_tiles < 1)
    return InvalidArgument("cpu experts: gate_up_tiles and down_tiles must be positive");
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0)
    return Status(StatusCode::kInternal, "cpu experts: sched_getaffinity failed");
  std::vector<int> cores;
  if (!options.cores.empty()) {
    for (int core : options.cores) {
      if (core < 0 || core >= CPU_SETSIZE || !CPU_ISSET(core, &allowed))
        return InvalidArgument("cpu experts: core " + std::to_string(core) + " is not one this process may run on");
      for (int r : options.reserved_cores)
        if (r == core) return InvalidArgument("cpu experts: core " + std::to_string(core) + " is also reserved");
      cores.push_back(core);
    }
  } else {
    for (int core = 0; core < CPU_SETSIZE; ++core) {
      if (!CPU_ISSET(core, &allowed)) continue;
      bool reserved = false;
      for (int r : options.reserved_cores) reserved |= r == core;
      if (!reserved) cores.push_back(core);
    }
  }
  if (cores.empty()) return InvalidArgument("cpu experts: no core is left for the worker threads");
  const int n = options.threads > 0 ? options.threads : static_cast<int>(cores.size());
  if (n > static_cast<int>(cores.size()))
    return InvalidArgument("cpu experts: " + std::to_string(n) + " threads but only " + std::to_string(cores.size()) +
                           " cores to run them on");
  cores.resize(static_cast<size_t>(n));

  std::unique_ptr<CpuExpertPool> pool(new CpuExpertPool());
  Impl& im = *pool->impl_;
  im.opt = options;
  im.isa = isa;
  im.k = k;
  im.cores = cores;
  for (int i = 0; i < n; ++i) {
    im.workers.emplace_back([&im] { im.worker_main(); });
    if (options.pin) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(cores[i], &set);
      const int rc = pthread_setaffinity_np(im.workers.back().native_handle(), sizeof(set), &set);
      if (rc != 0)
        return Status(StatusCode::kInternal, "cpu experts: pinning a worker to core " + std::to_string(cores[i]) +
                                                 " failed (error " + std::to_string(rc) + ")");
    }
  }
  *out = std::move(pool);
  return Status::Ok();
}

Status CpuExpertPool::submit(const CpuExpertsCall& call, std::shared_ptr<CpuExpertsHandle>* handle,
                             std::function<void(const Status&)> on_done) {
  DSFP4_RETURN_IF_ERROR(impl_->check(call));
  std::shared_ptr<CallState> c;
  DSFP4_RETURN_IF_ERROR(impl_->build(call, &c));
  c->on_done = std::move(on_done);
  c->spin_us = impl_->opt.spin_us;
  if (handle != nullptr) *handle = c;
  if (c->items.empty()) {
    c->t_submit = c->t_first = c->t_end = Clock::now();
    c->finish(Status::Ok());
    return Status::Ok();
  }
  impl_->enqueue(c);
  return Status::Ok();
}

Status CpuExpertPool::run(const CpuExpertsCall& call, CpuExpertsStats* stats) {
  std::shared_ptr<CpuExpertsHandle> h;
  DSFP4_RETURN_IF_ERROR(submit(call, &h));
  return h->wait(stats);
}

Status CpuExpertPool::read_bandwidth(const void* data, size_t bytes, int reps, double* gbs) {
  if (data == nullptr || gbs == nullptr || reps < 1 || bytes < 256)
    return InvalidArgument("cpu experts: read_bandwidth needs data, at least 256 bytes, reps >= 1 and gbs");
  bytes = bytes / 256 * 256;
  // Contiguous shares of a few hundred KB, like the weight tiles of a work item.
  const size_t nthreads = impl_->workers.size();
  size_t chunk = bytes / (nthreads * 16);
  chunk = std::max<size_t>(64 << 10, chunk / 4096 * 4096);
  double best = 0.0;
  for (int rep = 0; rep < reps; ++rep) {
    auto c = std::make_shared<CallState>();
    c->kind = Phase::kRead;
    c->read_data = static_cast<const uint8_t*>(data);
    for (size_t off = 0; off < bytes; off += chunk)
      c->items.push_back({Phase::kRead, -1, static_cast<int64_t>(off), static_cast<int64_t>(std::min(bytes, off + chunk))});
    impl_->enqueue(c);
    CpuExpertsStats st;
    DSFP4_RETURN_IF_ERROR(c->wait(&st));
    if (st.run_ms > 0) best = std::max(best, static_cast<double>(bytes) / (st.run_ms * 1e-3) / 1e9);
  }
  *gbs = best;
  return Status::Ok();
}

void CpuExpertPool::inject_fault(int layer, int expert) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->fault_layer = layer;
  impl_->fault_expert = expert;
}

CpuIsa CpuExpertPool::isa() const { return impl_->isa; }
int CpuExpertPool::threads() const { return static_cast<int>(impl_->workers.size()); }
const std::vector<int>& CpuExpertPool::cores() const { return impl_->cores; }

}  // namespace dsfp4
