#include "multi_tensor.hpp"

#include <algorithm>
#include <atomic>

#include "thread_pool.hpp"

namespace optkern {
namespace {

// When a call is worth a second thread, in time. A helper that a call wakes starts running after
// a wake-up latency: p50 2-17 us, p90 3-25 us on the 2-core AVX-512 VM with no other load
// (`python -m optkern bench --studies threads` measures it: "helper wake-up"); the calling
// thread works meanwhile, so a split of a call that takes T on one thread ends after about
// (T + wake) / 2. Each thread's share must therefore take at least MIN_NS_PER_THREAD on one
// thread: T >= 40 us for two threads, where even a p90 wake-up leaves a clear gain (0.8 T) and a
// helper that comes too late costs little against the call. The time is estimated from the
// size: NS_PER_WORK per unit of work, an element of weight w being w units. Measured on one
// thread (docs/threading.md): Adam 0.41-0.59 ns per element (WEIGHT_DIVIDES = 4 units) from L2
// sizes to 200K elements, plain SGD 0.06-0.13 (WEIGHT_STREAMING = 1 unit); at the sizes where
// the threshold falls both take at least NS_PER_WORK per unit, so calls split later than
// MIN_NS_PER_THREAD says, not earlier.
constexpr double MIN_NS_PER_THREAD = 20000.0;
constexpr double NS_PER_WORK = 0.1;
constexpr std::size_t DEFAULT_MIN_ELEMENTS_PER_THREAD =
    static_cast<std::size_t>(MIN_NS_PER_THREAD / NS_PER_WORK);

// Chunk boundaries fall on multiples of this many elements of the concatenation, so that two
// threads rarely write the same cache line.
constexpr std::size_t CHUNK_ALIGN = 64;
// A chunk holds at least this much work (elements x weight): claiming one costs an atomic
// compare-and-swap on a shared line, well under 1% of a chunk this size.
constexpr std::size_t MIN_CHUNK_WORK = 16384;
// And a call has about this many chunks per thread, so that when one thread is late or is
// descheduled the others take over its share in pieces of 1/8 or less.
constexpr std::size_t CHUNKS_PER_THREAD = 8;

std::atomic<int> g_threads{0};  // 0: not read from the environment yet
std::atomic<std::size_t> g_min_per_thread{DEFAULT_MIN_ELEMENTS_PER_THREAD};
std::atomic<std::size_t> g_chunk_elements{0};

// Threads worth using for this much work, unless helpers have lately not paid (pool::skip_helpers).
int threads_for(std::size_t work) {
  const int n = split_threads(work, num_threads(), min_elements_per_thread());
  return n > 1 && pool::skip_helpers() ? 1 : n;
}

// Items per chunk for `count` items of `weight` elements each, on `threads` threads.
std::size_t chunk_items(std::size_t count, std::size_t weight, int threads, std::size_t align) {
  std::size_t items;
  const std::size_t forced = g_chunk_elements.load(std::memory_order_relaxed);
  if (forced != 0) {
    items = std::max<std::size_t>(1, forced);
  } else {
    const std::size_t by_balance = count / (static_cast<std::size_t>(threads) * CHUNKS_PER_THREAD);
    const std::size_t by_cost = (MIN_CHUNK_WORK + weight - 1) / std::max<std::size_t>(1, weight);
    items = std::max<std::size_t>({by_balance, by_cost, 1});
  }
  return (items + align - 1) / align * align;
}

}  // namespace

int split_threads(std::size_t work, int threads, std::size_t min_per_thread) {
  const std::size_t by_size = work / std::max<std::size_t>(1, min_per_thread);
  return static_cast<int>(
      std::max<std::size_t>(1, std::min<std::size_t>(std::max(threads, 1), by_size)));
}

double min_us_per_thread() { return MIN_NS_PER_THREAD * 1e-3; }
double ns_per_work() { return NS_PER_WORK; }

int num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    n = pool::enabled() ? pool::default_threads() : 1;
    g_threads.store(n, std::memory_order_relaxed);
  }
  return n;
}

bool have_openmp() { return false; }

const char* threading() {
  if (!pool::enabled()) return "none";
  return pool::backend() == "gomp" ? "gomp team (optkern.torch: torch's libgomp)" : "optkern pool";
}

void set_num_threads(int n) {
  g_threads.store(pool::enabled() ? std::max(1, std::min(n, pool::MAX_THREADS)) : 1,
                  std::memory_order_relaxed);
  pool::retry_thread_creation();
}

std::size_t min_elements_per_thread() { return g_min_per_thread.load(std::memory_order_relaxed); }

void set_min_elements_per_thread(std::size_t n) {
  g_min_per_thread.store(std::max<std::size_t>(1, n), std::memory_order_relaxed);
}

void set_chunk_elements(std::size_t n) { g_chunk_elements.store(n, std::memory_order_relaxed); }

void parallel_for(std::size_t count, std::size_t weight, RangeFn fn, void* ctx) {
  if (count == 0) return;
  const int threads = threads_for(count * weight);
  if (threads <= 1) return fn(ctx, 0, count);
  const std::size_t per = chunk_items(count, weight, threads, 1);
  struct Job {
    std::size_t count, per;
    RangeFn fn;
    void* ctx;
  } job{count, per, fn, ctx};
  pool::run((count + per - 1) / per, threads,
            [](void* c, std::size_t i) {
              const Job& j = *static_cast<const Job*>(c);
              j.fn(j.ctx, i * j.per, std::min(j.count, (i + 1) * j.per));
            },
            &job);
}

void for_each_span(const std::size_t* sizes, std::size_t count, std::size_t weight, SpanFn fn,
                   void* ctx) {
  std::size_t total = 0;
  for (std::size_t t = 0; t < count; ++t) total += sizes[t];
  const int threads = threads_for(total * weight);
  if (threads <= 1) {
    for (std::size_t t = 0; t < count; ++t) {
      if (sizes[t] != 0) fn(ctx, t, 0, sizes[t]);
    }
    return;
  }
  std::vector<std::size_t> starts(count);
  std::size_t at = 0;
  for (std::size_t t = 0; t < count; ++t) {
    starts[t] = at;
    at += sizes[t];
  }
  struct Job {
    const std::size_t* sizes;
    const std::size_t* starts;
    std::size_t count, total, per;
    SpanFn fn;
    void* ctx;
  } job{sizes, starts.data(), count, total, chunk_items(total, weight, threads, CHUNK_ALIGN), fn,
        ctx};
  pool::run((total + job.per - 1) / job.per, threads,
            [](void* c, std::size_t i) {
              const Job& j = *static_cast<const Job*>(c);
              std::size_t lo = i * j.per;
              const std::size_t hi = std::min(j.total, lo + j.per);
              // The last tensor starting at or before lo, then every tensor the chunk reaches into.
              std::size_t t = static_cast<std::size_t>(
                                  std::upper_bound(j.starts, j.starts + j.count, lo) - j.starts) -
                              1;
              for (; lo < hi && t < j.count; ++t) {
                const std::size_t end = std::min(hi, j.starts[t] + j.sizes[t]);
                if (end > lo) j.fn(j.ctx, t, lo - j.starts[t], end - j.starts[t]);
                lo = std::max(lo, end);
              }
            },
            &job);
}

}  // namespace optkern
