// The "gomp" backend: the chunks go to the calling thread's GNU OpenMP team (set_backend). A team
// found through dlopen(RTLD_NOLOAD) among the libraries already loaded, never a second runtime.
#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <stdexcept>
#include <string>

#include "pool_internal.hpp"

#if defined(OPTKERN_GOMP)
#include <dlfcn.h>
#if defined(__linux__)
#include <link.h>
#endif
#endif

namespace optkern {
namespace pool {
namespace {
using GompParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpMaxThreadsFn = int (*)();

// Written under g_owner only (set_backend, the fork child); read by run() under g_owner.
struct Gomp {
  void* handle = nullptr;  // from dlopen(RTLD_NOLOAD): keeps the library loaded while in use
  GompParallelFn parallel = nullptr;
  OmpMaxThreadsFn max_threads = nullptr;
  std::string path;
};
Gomp g_gomp;

// One call on the team: every thread of the team claims chunks until none is left. The calling
// thread then waits for the chunks the others hold, as the pool's caller does (a short spin,
// then sleep), before it enters libgomp's closing barrier: there it would spin (libgomp's
// OMP_WAIT_POLICY) on the core a descheduled worker needs to finish its chunk.
struct GompJob {
  ChunkFn fn;
  void* ctx;
  std::size_t chunks;
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> done{0};
  std::mutex done_m;
  std::condition_variable done_cv;
  std::size_t caller_ran = 0;
  // The calling thread's timeline: it entered the region, found no chunk left to claim.
  Clock::time_point caller_start, caller_idle;
};
thread_local const GompJob* t_gomp_job = nullptr;  // the call this thread handed to its team

void gomp_body(void* data) {
  GompJob* j = static_cast<GompJob*>(data);
  const bool caller = t_gomp_job == j;
  const bool was_in_pool = t_in_pool;
  t_in_pool = true;  // a chunk that calls back into optkern runs serially there (no nesting)
  std::size_t ran = 0;
  if (caller) j->caller_start = Clock::now();
  if (caller || !g_paused.load(std::memory_order_relaxed)) {
    for (;;) {
      const std::size_t i = j->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= j->chunks) break;
      j->fn(j->ctx, i);
      ++ran;
    }
  }
  t_in_pool = was_in_pool;
  if (ran > 0 && j->done.fetch_add(ran, std::memory_order_acq_rel) + ran == j->chunks && !caller) {
    std::lock_guard<std::mutex> lock(j->done_m);  // the caller may be asleep waiting for it
    j->done_cv.notify_one();
  }
  if (caller) {
    j->caller_ran = ran;
    j->caller_idle = Clock::now();
    auto finished = [&] { return j->done.load(std::memory_order_acquire) == j->chunks; };
    if (!spin_until(finished, CALLER_SPIN)) {
      std::unique_lock<std::mutex> lock(j->done_m);
      j->done_cv.wait(lock, finished);
    }
  }
}

// A slow team. When a worker of the team cannot get a core (another process holds it, or more
// threads than cores), the calling thread waits for it in libgomp's start (the worker has not
// reached the dock since the last region), for the chunk it holds, and in libgomp's closing
// barrier, spinning on the core that worker needs for up to libgomp's spin count (milliseconds
// with OMP_WAIT_POLICY unset): a 1M step measured 8 ms instead of 0.1-0.4 ms that way on the
// loaded 2-core VM. optkern's pool does not wait for a helper that took no chunk. So a call
// whose caller waited (in GOMP_parallel's start, and from its last chunk to GOMP_parallel's
// return) longer than SLOW_WAIT plus two of its own chunks' time sends the next calls to
// optkern's pool: GOMP_FIRST_BACKOFF calls, doubled by each slow probe up to GOMP_MAX_BACKOFF;
// a fast probe ends it. set_adaptive(false) suspends it (calls go to the team) without
// resetting it: it describes the machine.
constexpr auto SLOW_WAIT = std::chrono::microseconds(200);
constexpr int GOMP_FIRST_BACKOFF = 8;
constexpr int GOMP_MAX_BACKOFF = 512;
int g_gomp_backoff = 0;  // guarded by g_owner
int g_gomp_skip = 0;
std::atomic<std::uint64_t> g_stat_gomp_calls{0}, g_stat_gomp_slow{0}, g_stat_gomp_pool{0};

#if defined(OPTKERN_GOMP) && defined(__linux__)
int find_libgomp(struct dl_phdr_info* info, std::size_t, void* out) {
  const char* name = info->dlpi_name;
  if (name == nullptr || *name == '\0') return 0;
  const char* base = std::strrchr(name, '/');
  base = base == nullptr ? name : base + 1;
  if (std::strncmp(base, "libgomp", 7) != 0) return 0;
  *static_cast<std::string*>(out) = name;
  return 1;
}
#endif

}  // namespace

void drop_gomp_in_child() {
  // The child has no threads behind the parent's OpenMP team; leave the handle open (the
  // library stays loaded in the child anyway) and go back to optkern's pool.
  g_gomp = Gomp{};
}

int gomp_team(int threads) {
  if (g_gomp.parallel == nullptr) return 0;
  if (g_gomp_skip > 0 && g_adaptive.load(std::memory_order_relaxed)) {
    --g_gomp_skip;  // the team was slow lately: this call runs on optkern's pool
    g_stat_gomp_pool.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }
  if (g_gomp.max_threads != nullptr) threads = std::min(threads, std::max(1, g_gomp.max_threads()));
  return threads;
}

// GOMP_parallel returns after the team's closing barrier: every chunk has run.
std::size_t run_gomp(std::size_t chunks, unsigned threads, ChunkFn fn, void* ctx) {
  GompJob job;
  job.fn = fn;
  job.ctx = ctx;
  job.chunks = chunks;
  const GompJob* outer = t_gomp_job;
  t_gomp_job = &job;
  const auto called = Clock::now();
  g_gomp.parallel(gomp_body, &job, threads, 0);
  // The caller's waits: in libgomp's start (for the workers to reach its dock from their last
  // region), for the chunks the workers held, then in libgomp's closing barrier. A worker with
  // a core ends within about one chunk's time (the caller's own chunks tell it).
  const auto wait = (job.caller_start - called) + (Clock::now() - job.caller_idle);
  const auto chunk_time = (job.caller_idle - job.caller_start) /
                          static_cast<long>(std::max<std::size_t>(1, job.caller_ran));
  t_gomp_job = outer;
  g_stat_gomp_calls.fetch_add(1, std::memory_order_relaxed);
  if (wait > SLOW_WAIT + 2 * chunk_time) {
    g_stat_gomp_slow.fetch_add(1, std::memory_order_relaxed);
    if (g_adaptive.load(std::memory_order_relaxed)) {
      g_gomp_backoff =
          g_gomp_backoff == 0 ? GOMP_FIRST_BACKOFF : std::min(2 * g_gomp_backoff, GOMP_MAX_BACKOFF);
      g_gomp_skip = g_gomp_backoff;
    }
  } else {
    g_gomp_backoff = 0;
  }
  return job.caller_ran;
}

GompStats gomp_stats() {
  return {g_stat_gomp_calls.load(std::memory_order_relaxed),
          g_stat_gomp_slow.load(std::memory_order_relaxed),
          g_stat_gomp_pool.load(std::memory_order_relaxed)};
}

std::string set_backend(const std::string& name, const std::string& path) {
  if (name != "pool" && name != "gomp") {
    throw std::invalid_argument("parallel backend must be 'pool' or 'gomp', got '" + name + "'");
  }
  std::lock_guard<std::mutex> owner(g_owner);  // no call is in flight while the backend changes
  Gomp next;
#if defined(OPTKERN_GOMP)
  if (name == "gomp") {
    std::string lib = path;
#if defined(__linux__)
    if (lib.empty()) dl_iterate_phdr(find_libgomp, &lib);
#endif
    // RTLD_NOLOAD: only a library this process has already loaded; never a second runtime.
    void* handle = lib.empty() ? nullptr : dlopen(lib.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (handle != nullptr) {
      next.parallel = reinterpret_cast<GompParallelFn>(dlsym(handle, "GOMP_parallel"));
      next.max_threads = reinterpret_cast<OmpMaxThreadsFn>(dlsym(handle, "omp_get_max_threads"));
      if (next.parallel == nullptr) {
        dlclose(handle);
        next = Gomp{};
      } else {
        next.handle = handle;
        next.path = lib;
        register_fork_handlers();
      }
    }
  }
  if (g_gomp.handle != nullptr) dlclose(g_gomp.handle);
#else
  (void)path;
#endif
  g_gomp = next;  // the slow-team backoff carries over: it describes the machine, not the library
  return g_gomp.parallel != nullptr ? "gomp" : "pool";
}

std::string backend() {
  std::lock_guard<std::mutex> owner(g_owner);
  return g_gomp.parallel != nullptr ? "gomp" : "pool";
}

std::string backend_library() {
  std::lock_guard<std::mutex> owner(g_owner);
  return g_gomp.path;
}

}  // namespace pool
}  // namespace optkern
