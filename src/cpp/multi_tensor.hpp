// The multi-tensor driver: one call visits every element of a whole list of buffers (a param
// group). A large call is cut into chunks of the concatenated buffers (64-element aligned), which
// the calling thread and the helpers of optkern's pool (thread_pool.hpp) claim one at a time.
#pragma once

#include <cstddef>
#include <vector>

namespace optkern {

// Threads a large call uses. Starts at pool::default_threads() (OPTKERN_NUM_THREADS or
// OMP_NUM_THREADS, else the CPUs this process may use).
int num_threads();
void set_num_threads(int n);  // 1 <= n <= pool::MAX_THREADS (the bindings check)
bool have_openmp();           // false: optkern no longer uses an OpenMP runtime
// "optkern pool"; "gomp team ..." while the gomp backend is on (pool::set_backend); "none" in a
// single-threaded build.
const char* threading();

// Below this much work per thread, a call uses fewer threads (one, for small calls): a helper
// starts running some microseconds after a call wakes it, so a share that takes less than that
// is faster done by the calling thread. Work is counted in elements of the cheapest update (SGD,
// WEIGHT_STREAMING); an element of a rule with a division and a square root weighs
// WEIGHT_DIVIDES. The default is a time (min_us_per_thread of work for each thread's share, on
// one thread) over an estimate of the time per unit of work (ns_per_work): multi_tensor.cpp.
std::size_t min_elements_per_thread();
void set_min_elements_per_thread(std::size_t n);  // n >= 1; tests use it to split small calls
double min_us_per_thread();
double ns_per_work();
// The threads a call of `work` units uses with `threads` available and that threshold: work /
// min_per_thread, at least 1 and at most `threads` (before the late-helper backoff).
int split_threads(std::size_t work, int threads, std::size_t min_per_thread);

// Testing hook: every chunk of a multi-threaded call holds this many elements (0: chosen by size,
// see chunk_elements in multi_tensor.cpp). Results never depend on it.
void set_chunk_elements(std::size_t n);

constexpr std::size_t WEIGHT_STREAMING = 1;  // a few multiply-adds per element: SGD, norms, axpy
constexpr std::size_t WEIGHT_DIVIDES = 4;    // a sqrt and a division per element: Adam, RMSprop...

// Calls fn(ctx, tensor, begin, end) so that every element [0, sizes[t]) of every tensor is visited
// exactly once. No parallel region nests inside another; fn must not throw.
using SpanFn = void (*)(void* ctx, std::size_t tensor, std::size_t begin, std::size_t end);
void for_each_span(const std::size_t* sizes, std::size_t count, std::size_t weight, SpanFn fn,
                   void* ctx);

// Calls fn(ctx, begin, end) over [0, count), in contiguous ranges (chunks); `weight` is the
// number of elements one item stands for, against the single-thread threshold.
using RangeFn = void (*)(void* ctx, std::size_t begin, std::size_t end);
void parallel_for(std::size_t count, std::size_t weight, RangeFn fn, void* ctx);

template <class F>
void parallel_for(std::size_t count, std::size_t weight, F& f) {
  parallel_for(
      count, weight, [](void* ctx, std::size_t b, std::size_t e) { (*static_cast<F*>(ctx))(b, e); },
      &f);
}

template <class F>
void for_each_span(const std::vector<std::size_t>& sizes, std::size_t weight, F& f) {
  for_each_span(
      sizes.data(), sizes.size(), weight,
      [](void* ctx, std::size_t t, std::size_t b, std::size_t e) {
        (*static_cast<F*>(ctx))(t, b, e);
      },
      &f);
}

}  // namespace optkern
