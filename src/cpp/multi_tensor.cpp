#include "multi_tensor.hpp"

#include <algorithm>
#include <atomic>

#if defined(OPTKERN_HAVE_OPENMP)
#include <omp.h>
#endif

namespace optkern {
namespace {

// Measured on the 2-core AVX-512 Xeon of bench/README.md (bench/threshold.py): a second thread
// starts to pay at about 32K elements of SGD (16K per thread) and 12K of Adam, whose element
// costs about 4 of SGD's (WEIGHT_DIVIDES). Twice the break-even keeps small calls clear of it.
constexpr std::size_t DEFAULT_MIN_ELEMENTS_PER_THREAD = 32768;

// Thread ranges start at multiples of this many elements of the concatenation, so that two
// threads rarely write the same cache line.
constexpr std::size_t RANGE_ALIGN = 64;

int initial_threads() {
#if defined(OPTKERN_HAVE_OPENMP)
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

std::atomic<int> g_threads{0};  // 0: not read from OpenMP yet
std::atomic<std::size_t> g_min_per_thread{DEFAULT_MIN_ELEMENTS_PER_THREAD};

// Start of thread k's range among `parts`, for k in [0, parts].
std::size_t range_start(std::size_t total, std::size_t parts, std::size_t k) {
  if (k >= parts) return total;
  const auto start = static_cast<std::size_t>(
      static_cast<unsigned long long>(total) * k / parts);  // total < 2^54, parts < 2^10
  return start / RANGE_ALIGN * RANGE_ALIGN;
}

void visit_range(const std::size_t* sizes, const std::size_t* starts, std::size_t count,
                 std::size_t lo, std::size_t hi, SpanFn fn, void* ctx) {
  // The last tensor starting at or before lo.
  std::size_t t = static_cast<std::size_t>(std::upper_bound(starts, starts + count, lo) - starts) - 1;
  while (lo < hi && t < count) {
    const std::size_t end = std::min(hi, starts[t] + sizes[t]);
    if (end > lo) fn(ctx, t, lo - starts[t], end - starts[t]);
    lo = std::max(lo, end);
    ++t;
  }
}

}  // namespace

int num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    n = initial_threads();
    g_threads.store(n, std::memory_order_relaxed);
  }
  return n;
}

bool have_openmp() {
#if defined(OPTKERN_HAVE_OPENMP)
  return true;
#else
  return false;
#endif
}

void set_num_threads(int n) {
  g_threads.store(have_openmp() ? std::max(1, n) : 1, std::memory_order_relaxed);
}

std::size_t min_elements_per_thread() { return g_min_per_thread.load(std::memory_order_relaxed); }

void set_min_elements_per_thread(std::size_t n) {
  g_min_per_thread.store(std::max<std::size_t>(1, n), std::memory_order_relaxed);
}

namespace {

// Threads worth using for this many elements: one below the threshold, never more than asked for.
int threads_for(std::size_t elements) {
  const std::size_t by_size = elements / min_elements_per_thread();
  return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(num_threads(), by_size)));
}

}  // namespace

void parallel_for(std::size_t count, std::size_t weight, RangeFn fn, void* ctx) {
  if (count == 0) return;
#if defined(OPTKERN_HAVE_OPENMP)
  const int threads = threads_for(count * weight);
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const auto parts = static_cast<std::size_t>(omp_get_num_threads());
      const auto k = static_cast<std::size_t>(omp_get_thread_num());
      const std::size_t lo = count * k / parts, hi = count * (k + 1) / parts;
      if (lo < hi) fn(ctx, lo, hi);
    }
    return;
  }
#else
  (void)weight;
#endif
  fn(ctx, 0, count);
}

void for_each_span(const std::size_t* sizes, std::size_t count, std::size_t weight, SpanFn fn,
                   void* ctx) {
  std::size_t total = 0;
  for (std::size_t t = 0; t < count; ++t) total += sizes[t];
  const int threads = threads_for(total * weight);
#if defined(OPTKERN_HAVE_OPENMP)
  if (threads > 1) {
    std::vector<std::size_t> starts(count);
    std::size_t at = 0;
    for (std::size_t t = 0; t < count; ++t) {
      starts[t] = at;
      at += sizes[t];
    }
#pragma omp parallel num_threads(threads)
    {
      // The team may be smaller than asked for; split among the threads actually running.
      const auto parts = static_cast<std::size_t>(omp_get_num_threads());
      const auto k = static_cast<std::size_t>(omp_get_thread_num());
      visit_range(sizes, starts.data(), count, range_start(total, parts, k),
                  range_start(total, parts, k + 1), fn, ctx);
    }
    return;
  }
#else
  (void)threads;
#endif
  for (std::size_t t = 0; t < count; ++t) {
    if (sizes[t] != 0) fn(ctx, t, 0, sizes[t]);
  }
}

}  // namespace optkern
