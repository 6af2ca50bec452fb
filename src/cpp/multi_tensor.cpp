#include "multi_tensor.hpp"

#include <algorithm>
#include <atomic>

#include "thread_pool.hpp"

namespace optkern {
namespace {

// Measured on the 2-core AVX-512 Xeon of bench/README.md (bench/threshold.py): a second thread
// starts to pay at about 32K elements of SGD (16K per thread) and 12K of Adam, whose element
// costs about 4 of SGD's (WEIGHT_DIVIDES). Twice the break-even keeps small calls clear of it.
constexpr std::size_t DEFAULT_MIN_ELEMENTS_PER_THREAD = 32768;

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

// Threads worth using for this much work: one below the threshold, never more than asked for.
int threads_for(std::size_t work) {
  const std::size_t by_size = work / min_elements_per_thread();
  const int n =
      static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(num_threads(), by_size)));
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

void for_each_span(const std::size_t* sizes, const std::size_t* aligns, std::size_t count,
                   std::size_t weight, SpanFn fn, void* ctx) {
  std::size_t total = 0;
  for (std::size_t t = 0; t < count; ++t) total += sizes[t];
  const int threads = threads_for(total * weight);
  if (threads <= 1) {
    for (std::size_t t = 0; t < count; ++t) {
      if (sizes[t] != 0) fn(ctx, t, 0, sizes[t]);
    }
    return;
  }
  // The tensors laid end to end, each aligned tensor starting at a multiple of its alignment
  // (padding no chunk visits), and chunks a multiple of every alignment: a chunk then starts
  // inside an aligned tensor only at a multiple of its alignment.
  std::vector<std::size_t> starts(count);
  std::size_t at = 0, align = CHUNK_ALIGN;
  for (std::size_t t = 0; t < count; ++t) {
    const std::size_t a = aligns == nullptr ? 1 : aligns[t];
    at = (at + a - 1) / a * a;
    align = std::max(align, a);  // every alignment divides CHUNK_ALIGN or equals Q8_BLOCK
    starts[t] = at;
    at += sizes[t];
  }
  const std::size_t extent = at;
  struct Job {
    const std::size_t* sizes;
    const std::size_t* starts;
    std::size_t count, extent, per;
    SpanFn fn;
    void* ctx;
  } job{sizes, starts.data(), count, extent, chunk_items(total, weight, threads, align), fn, ctx};
  pool::run((extent + job.per - 1) / job.per, threads,
            [](void* c, std::size_t i) {
              const Job& j = *static_cast<const Job*>(c);
              const std::size_t lo = i * j.per;
              const std::size_t hi = std::min(j.extent, lo + j.per);
              // The last tensor starting at or before lo, then every tensor the chunk reaches into.
              std::size_t t = static_cast<std::size_t>(
                                  std::upper_bound(j.starts, j.starts + j.count, lo) - j.starts) -
                              1;
              for (; t < j.count && j.starts[t] < hi; ++t) {
                const std::size_t b = std::max(lo, j.starts[t]);
                const std::size_t e = std::min(hi, j.starts[t] + j.sizes[t]);
                if (e > b) j.fn(j.ctx, t, b - j.starts[t], e - j.starts[t]);
              }
            },
            &job);
}

}  // namespace optkern
