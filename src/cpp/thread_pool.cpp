#include "pool_internal.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace optkern {
namespace pool {

// Shared with the gomp backend (pool_internal.hpp).
std::atomic<bool> g_adaptive{true};
std::atomic<bool> g_paused{false};    // testing hook: helpers wake but take no chunk
thread_local bool t_in_pool = false;  // a helper, or a caller inside run(): no nesting
// Held by the thread whose call is running on the pool, and by fork's prepare handler.
std::mutex g_owner;

namespace {

std::atomic<int> g_spin_us{0};
std::atomic<long> g_fail_after{-1};

// Helpers that do not pay (thread_pool.hpp, paid): they came late (the caller had taken every
// chunk: no free core, another library's threads spinning on it, a busy machine), ran under half
// their share, or one held the caller back. Waking them then only costs: a context switch that
// lands on the next matmul's threads, or a time slice. After LATE_CALLS such calls in a row, or
// one straggler, the pool runs the next `backoff` calls on the calling thread alone and probes
// again: a probe that does not pay doubles the backoff (up to MAX_BACKOFF calls), one that pays
// halves it (under 2 * FIRST_BACKOFF: over). On a machine with no idle CPU, about one call in
// MAX_BACKOFF + 1 has helpers. Results do not change: the kernels are bit-identical for any
// thread count.
constexpr int LATE_CALLS = 2;
constexpr int FIRST_BACKOFF = 4;
constexpr int MAX_BACKOFF = 64;
// Guarded by g_owner (only the call owning the pool reads or writes them).
int g_late_streak = 0;
int g_backoff = 0;
int g_skip = 0;
std::atomic<std::uint64_t> g_stat_calls{0}, g_stat_helper_chunks{0}, g_stat_late{0},
    g_stat_serial{0};

// One call's shared state, and the helpers that serve it. A call owns the pool for its duration
// (g_owner); helpers find its chunks through `claim`, which carries the call's generation in its
// high half, so a helper that wakes for an older call can never take a chunk of a newer one.
struct Pool {
  std::mutex wake_m;
  std::condition_variable wake_cv;
  std::atomic<std::uint32_t> gen{0};  // bumped (under wake_m) when a call publishes its chunks

  // The current call, written by its owner before it publishes the generation.
  ChunkFn fn = nullptr;
  void* ctx = nullptr;
  std::size_t chunks = 0;
  // (generation << 32) | chunks not yet claimed. A chunk's index is chunks - remaining.
  std::atomic<std::uint64_t> claim{0};
  // (generation << 32) | helpers that joined; a call wants at most `wanted` of them.
  std::atomic<std::uint64_t> join{0};
  std::atomic<std::uint32_t> wanted{0};
  std::atomic<std::size_t> done{0};           // chunks finished
  std::atomic<std::int64_t> helper_start{0};  // tracing: when a helper claimed its first chunk
  std::atomic<int> helper_cpu{-1};
  std::mutex done_m;
  std::condition_variable done_cv;

  int helpers = 0;                  // created (by owners only)
  std::atomic<int> caller_cpu{-1};  // the CPU the current call's caller started on
  std::mutex tid_m;                 // guards the next three
  std::vector<long> tids;           // the helpers' kernel thread ids
  int excluded_cpu = -1;            // the CPU the helpers' affinity leaves out (-1: none)
  std::size_t masked = 0;           // helpers whose affinity place_helpers set
  bool refused = false;             // the system refused a thread: do not ask again (until a fork)
  std::atomic<int> alive{0};        // helpers running helper_main
};

// The pool of this process: created lazily, replaced (never freed) in a forked child, whose copy
// of the parent's pool has no threads behind it.
Pool* g_pool = nullptr;
// Helpers stay off the calling thread's CPU (run_pool). On by default; a benchmark hook.
std::atomic<bool> g_keep_off{true};
// A straggler (straggled): the caller, after its own chunks, waited for a helper's chunk longer
// than this floor plus this many of its own chunks' time.
constexpr auto SLOW_WAIT_FLOOR = std::chrono::microseconds(50);
constexpr long SLOW_WAIT_CHUNKS = 4;

std::atomic<bool> g_tracing{false};
std::vector<CallTrace> g_trace;  // guarded by g_owner
std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}
// The CPU this thread runs on, -1 when unknown (not Linux, or sched_getcpu failed).
int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// Claims and runs chunks of generation g until none is left; returns how many it ran.
std::size_t work(Pool* p, std::uint32_t g, bool helper) {
  for (std::size_t ran = 0;; ++ran) {
    std::uint64_t c = p->claim.load(std::memory_order_acquire);
    do {
      if (static_cast<std::uint32_t>(c >> 32) != g || static_cast<std::uint32_t>(c) == 0) {
        return ran;
      }
    } while (!p->claim.compare_exchange_weak(c, c - 1, std::memory_order_acq_rel,
                                             std::memory_order_acquire));
    // The call cannot end before this chunk is counted done, so its fields are still its own.
    const std::size_t n = p->chunks;
    if (helper && ran == 0 && g_tracing.load(std::memory_order_relaxed)) {
      std::int64_t zero = 0;
      if (p->helper_start.compare_exchange_strong(zero, now_ns())) {
        p->helper_cpu.store(current_cpu(), std::memory_order_relaxed);
      }
    }
    p->fn(p->ctx, n - static_cast<std::uint32_t>(c));
    if (p->done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      std::lock_guard<std::mutex> lock(p->done_m);  // the caller may be asleep waiting for it
      p->done_cv.notify_one();
    }
  }
}

// Joins generation g if the call still wants a helper.
bool join(Pool* p, std::uint32_t g) {
  std::uint64_t j = p->join.load(std::memory_order_acquire);
  do {
    if (static_cast<std::uint32_t>(j >> 32) != g) return false;
    if (static_cast<std::uint32_t>(j) >= p->wanted.load(std::memory_order_relaxed)) return false;
  } while (!p->join.compare_exchange_weak(j, j + 1, std::memory_order_acq_rel,
                                          std::memory_order_acquire));
  return true;
}

void helper_main(Pool* p, std::uint32_t seen) {
  t_in_pool = true;
  p->alive.fetch_add(1, std::memory_order_relaxed);
#if defined(__linux__)
  {
    std::lock_guard<std::mutex> lock(p->tid_m);
    p->tids.push_back(static_cast<long>(syscall(SYS_gettid)));
  }
#endif
  for (;;) {
    std::uint32_t g = seen;
    auto fresh = [&] { return (g = p->gen.load(std::memory_order_acquire)) != seen; };
    const int spin = g_spin_us.load(std::memory_order_relaxed);
    if (!spin_until(fresh, std::chrono::microseconds(spin))) {
      std::unique_lock<std::mutex> lock(p->wake_m);
      p->wake_cv.wait(lock, fresh);
    }
    seen = g;
    // A helper woken on the calling thread's CPU has taken it from the caller (run_pool keeps
    // them apart; the caller may have moved since): it gives it back at once.
    const int caller_cpu = p->caller_cpu.load(std::memory_order_relaxed);
    if (caller_cpu >= 0 && current_cpu() == caller_cpu) continue;
    if (!g_paused.load(std::memory_order_relaxed) && join(p, g)) work(p, g, true);
  }
}

// Starts one helper; false when the system (or the testing hook) refuses.
bool start_helper(Pool* p) {
  long fail = g_fail_after.load(std::memory_order_relaxed);
  while (fail >= 0) {
    if (fail == 0) return false;
    if (g_fail_after.compare_exchange_weak(fail, fail - 1)) break;
  }
#if defined(OPTKERN_POSIX)
  // Helpers block every signal, so that signals reach the threads that expect them (Python
  // handles signals on its main thread; this only keeps the kernel from picking a helper).
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
#endif
  bool ok = true;
  try {
    std::thread(helper_main, p, p->gen.load(std::memory_order_relaxed)).detach();
  } catch (const std::exception&) {  // std::system_error (EAGAIN), std::bad_alloc
    ok = false;
  }
#if defined(OPTKERN_POSIX)
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
#endif
  return ok;
}

#if defined(OPTKERN_POSIX)
// fork: the prepare handler waits for a call in flight (it takes g_owner), so the child never
// inherits half a call. The child's copy of the pool has no threads: it starts a new one when
// a call first needs helpers. The old one is left allocated (its mutexes may be copies of held
// ones), a few hundred bytes per fork.
void before_fork() { g_owner.lock(); }
void after_fork_parent() { g_owner.unlock(); }
void after_fork_child() {
  g_pool = nullptr;
  drop_gomp_in_child();
  g_owner.unlock();
}
#endif

}  // namespace

void register_fork_handlers() {
#if defined(OPTKERN_POSIX)
  static const bool registered = [] {
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
    return true;
  }();
  (void)registered;
#endif
}

namespace {

Pool* pool() {
  if (g_pool == nullptr) {
    register_fork_handlers();
    g_pool = new Pool;
  }
  return g_pool;
}

void run_serial(std::size_t chunks, ChunkFn fn, void* ctx) {
  for (std::size_t i = 0; i < chunks; ++i) fn(ctx, i);
}

#if defined(__linux__)
// The helpers' affinity: the calling thread's CPUs without `cpu` (the one it runs on), or all of
// them (cpu < 0). Set only when it changes (a new CPU, a new helper): a sched_setaffinity per
// helper then, nothing otherwise. A mask the system refuses leaves the helpers as they were.
void place_helpers(Pool* p, int cpu) {
  std::lock_guard<std::mutex> lock(p->tid_m);
  if (cpu == p->excluded_cpu && p->masked == p->tids.size()) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return;
  if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_CLR(cpu, &set);
  if (CPU_COUNT(&set) == 0) return;  // the caller may use one CPU only
  for (long tid : p->tids) sched_setaffinity(static_cast<pid_t>(tid), sizeof set, &set);
  p->excluded_cpu = cpu;
  p->masked = p->tids.size();
}
#endif

// What run_pool tells run(): the chunks the calling thread ran (NOT_RUN: no helper was available,
// the caller runs them serially), the threads of the call, how long the caller worked on its own
// chunks and how long it then waited for the helpers' last ones.
constexpr std::size_t NOT_RUN = ~std::size_t{0};
struct PoolRun {
  std::size_t mine = NOT_RUN;
  int threads = 1;
  Clock::duration own{}, wait{};
};

// optkern's pool: runs the chunks with up to threads - 1 helpers.
//
// Helpers stay off the calling thread's CPU. When no CPU is idle, Linux wakes a helper on the
// CPU of the thread that woke it, where it preempts the caller; the helper runs the chunks while
// the caller, which may hold one itself, waits behind every other runnable thread of that CPU
// for a time slice (milliseconds) before it can finish the call. So while a call runs, the
// helpers' affinity leaves out the CPU the caller runs on, and a helper that finds itself there
// anyway takes no chunk. When the caller has to sleep until a helper finishes a chunk, the
// helpers may use its CPU again.
PoolRun run_pool(std::size_t chunks, int threads, ChunkFn fn, void* ctx) {
  Pool* p = pool();
  const int want = static_cast<int>(std::min<std::size_t>(chunks - 1, threads - 1));
  while (p->helpers < want && !p->refused) {
    if (start_helper(p)) {
      ++p->helpers;
    } else {
      p->refused = true;
    }
  }
  const int helpers = std::min(want, p->helpers);
  PoolRun out;
  if (helpers == 0) return out;
  out.threads = helpers + 1;

  t_in_pool = true;
  const bool tracing = g_tracing.load(std::memory_order_relaxed);
  const auto t0 = Clock::now();
  const bool keep_off = g_keep_off.load(std::memory_order_relaxed);
  const int cpu = keep_off || tracing ? current_cpu() : -1;
  p->caller_cpu.store(keep_off ? cpu : -1, std::memory_order_relaxed);
#if defined(__linux__)
  if (keep_off) place_helpers(p, cpu);
#endif
  p->helper_start.store(0, std::memory_order_relaxed);
  p->helper_cpu.store(-1, std::memory_order_relaxed);
  p->fn = fn;
  p->ctx = ctx;
  p->chunks = chunks;
  p->wanted.store(static_cast<std::uint32_t>(helpers), std::memory_order_relaxed);
  p->done.store(0, std::memory_order_relaxed);
  const std::uint32_t g = p->gen.load(std::memory_order_relaxed) + 1;
  p->join.store(std::uint64_t{g} << 32, std::memory_order_relaxed);
  p->claim.store((std::uint64_t{g} << 32) | chunks, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(p->wake_m);
    p->gen.store(g, std::memory_order_release);
  }
  if (helpers >= p->helpers) {
    p->wake_cv.notify_all();
  } else {
    for (int i = 0; i < helpers; ++i) p->wake_cv.notify_one();
  }
  // The calling thread starts at once and takes whatever no helper has claimed.
  out.mine = work(p, g, false);
  const auto t1 = Clock::now();
  auto finished = [&] { return p->done.load(std::memory_order_acquire) == chunks; };
  if (!spin_until(finished, CALLER_SPIN)) {
#if defined(__linux__)
    if (keep_off) place_helpers(p, -1);  // a helper holds a chunk: it may run here meanwhile
#endif
    std::unique_lock<std::mutex> lock(p->done_m);
    p->done_cv.wait(lock, finished);
  }
  t_in_pool = false;
  const auto t2 = Clock::now();
  out.own = t1 - t0;
  out.wait = t2 - t1;
  if (tracing && g_trace.size() < (1u << 20)) {
    const std::int64_t h = p->helper_start.load(std::memory_order_relaxed);
    const std::int64_t start =
        std::chrono::duration_cast<std::chrono::nanoseconds>(t0.time_since_epoch()).count();
    auto us = [](Clock::duration d) {
      return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count() * 1e-3;
    };
    g_trace.push_back({h == 0 ? -1.0 : (h - start) * 1e-3, us(out.own), us(out.wait),
                       static_cast<unsigned>(chunks), static_cast<unsigned>(chunks - out.mine), cpu,
                       p->helper_cpu.load(std::memory_order_relaxed)});
  }
  return out;
}

}  // namespace

bool enabled() {
#if defined(OPTKERN_HAVE_THREADS)
  return true;
#else
  return false;
#endif
}

bool straggled(std::size_t mine, Clock::duration own, Clock::duration wait) {
  if (mine == 0) return false;  // the caller ran none: nothing to time a chunk by
  return wait > SLOW_WAIT_FLOOR + SLOW_WAIT_CHUNKS * (own / static_cast<long>(mine));
}

bool paid(std::size_t chunks, std::size_t mine, int threads, Clock::duration own,
          Clock::duration wait) {
  if (mine >= chunks) return false;
  const std::size_t helped = chunks - mine;
  const std::size_t t = static_cast<std::size_t>(std::max(threads, 2));
  return 2 * helped * t >= chunks * (t - 1) && !straggled(mine, own, wait);
}

void run(std::size_t chunks, int threads, ChunkFn fn, void* ctx) {
#if defined(OPTKERN_HAVE_THREADS)
  if (chunks <= 1 || threads <= 1 || t_in_pool || chunks >= (std::size_t{1} << 32)) {
    return run_serial(chunks, fn, ctx);
  }
  std::unique_lock<std::mutex> owner(g_owner, std::try_to_lock);
  if (!owner.owns_lock()) return run_serial(chunks, fn, ctx);  // busy: run on this thread
  std::size_t mine;
  bool ok, slow = false;
  int team = gomp_team(threads);  // 0: this call runs on optkern's pool
  if (team > 0) {
    team = static_cast<int>(std::min<std::size_t>(chunks, static_cast<std::size_t>(team)));
    if (team <= 1) return run_serial(chunks, fn, ctx);
    mine = run_gomp(chunks, static_cast<unsigned>(team), fn, ctx);
    ok = paid(chunks, mine, team, Clock::duration::zero(), Clock::duration::zero());
  } else {
    const PoolRun r = run_pool(chunks, threads, fn, ctx);
    if (r.mine == NOT_RUN) return run_serial(chunks, fn, ctx);
    mine = r.mine;
    ok = paid(chunks, mine, r.threads, r.own, r.wait);
    slow = straggled(mine, r.own, r.wait);
  }
  g_stat_calls.fetch_add(1, std::memory_order_relaxed);
  g_stat_helper_chunks.fetch_add(chunks - mine, std::memory_order_relaxed);
  if (ok) {
    g_late_streak = 0;
    if (g_backoff < 2 * FIRST_BACKOFF) {
      g_backoff = 0;
    } else {  // a probe that paid: back off half as long
      g_backoff /= 2;
      g_skip = g_backoff;
    }
  } else {
    g_stat_late.fetch_add(1, std::memory_order_relaxed);
    if (g_backoff > 0) {  // a probe that did not pay
      g_backoff = std::min(2 * g_backoff, MAX_BACKOFF);
      g_skip = g_backoff;
    } else if (slow || ++g_late_streak >= LATE_CALLS) {  // a straggler: back off at once
      g_late_streak = 0;
      g_backoff = FIRST_BACKOFF;
      g_skip = g_backoff;
    }
  }
#else
  (void)threads;
  run_serial(chunks, fn, ctx);
#endif
}

void retry_thread_creation() {
  std::lock_guard<std::mutex> owner(g_owner);
  if (g_pool != nullptr) g_pool->refused = false;
}

void fail_thread_creation_after(long k) {
  g_fail_after.store(k < 0 ? -1 : k, std::memory_order_relaxed);
  retry_thread_creation();  // the next call tries again, and succeeds or fails as asked
}

int helpers() {
  std::lock_guard<std::mutex> owner(g_owner);
  return g_pool == nullptr ? 0 : g_pool->helpers;
}

bool skip_helpers() {
#if defined(OPTKERN_HAVE_THREADS)
  if (!g_adaptive.load(std::memory_order_relaxed) || t_in_pool) return false;
  std::unique_lock<std::mutex> owner(g_owner, std::try_to_lock);
  if (!owner.owns_lock() || g_skip <= 0) return false;
  --g_skip;
  g_stat_serial.fetch_add(1, std::memory_order_relaxed);
  return true;
#else
  return false;
#endif
}

void set_adaptive(bool on) {
  std::lock_guard<std::mutex> owner(g_owner);
  g_adaptive.store(on, std::memory_order_relaxed);
  g_late_streak = g_backoff = g_skip = 0;
}
bool adaptive() { return g_adaptive.load(std::memory_order_relaxed); }
void pause_helpers(bool paused) { g_paused.store(paused, std::memory_order_relaxed); }
Stats stats() {
  const GompStats gomp = gomp_stats();
  return {g_stat_calls.load(std::memory_order_relaxed),
          g_stat_helper_chunks.load(std::memory_order_relaxed),
          g_stat_late.load(std::memory_order_relaxed),
          g_stat_serial.load(std::memory_order_relaxed),
          gomp.calls,
          gomp.slow,
          gomp.pool};
}

void set_keep_off_caller_cpu(bool on) { g_keep_off.store(on, std::memory_order_relaxed); }
bool keep_off_caller_cpu() { return g_keep_off.load(std::memory_order_relaxed); }

void trace(bool on) {
  std::lock_guard<std::mutex> owner(g_owner);
  g_trace.clear();
  g_tracing.store(on, std::memory_order_relaxed);
}

std::vector<CallTrace> take_trace() {
  std::lock_guard<std::mutex> owner(g_owner);
  std::vector<CallTrace> out;
  out.swap(g_trace);
  return out;
}

std::vector<double> wake_latencies(int samples, int gap_us) {
  std::vector<double> out;
#if defined(OPTKERN_HAVE_THREADS)
  struct Probe {
    std::thread::id caller = std::this_thread::get_id();
    std::int64_t t0 = 0;
    std::atomic<std::int64_t> helper{0};
    bool caller_waited = false;
  } probe;
  for (int i = 0; i < samples; ++i) {
    if (gap_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
    probe.helper.store(0, std::memory_order_relaxed);
    probe.caller_waited = false;
    probe.t0 = now_ns();
    run(
        2, 2,
        [](void* ctx, std::size_t) {
          Probe& pr = *static_cast<Probe*>(ctx);
          if (std::this_thread::get_id() != pr.caller) {
            pr.helper.store(now_ns(), std::memory_order_release);
            return;
          }
          // The caller's chunk waits for a helper to start the other one (at most 100 ms); when
          // none came, the caller runs the other one too (the pool was busy: no helper).
          if (pr.caller_waited) return;
          pr.caller_waited = true;
          spin_until([&] { return pr.helper.load(std::memory_order_acquire) != 0; },
                     std::chrono::milliseconds(100));
        },
        &probe);
    const std::int64_t h = probe.helper.load(std::memory_order_acquire);
    out.push_back(h == 0 ? -1.0 : (h - probe.t0) * 1e-3);
  }
#else
  (void)samples;
  (void)gap_us;
#endif
  return out;
}

void set_spin_us(int us) {
  g_spin_us.store(std::max(0, std::min(us, 100000)), std::memory_order_relaxed);
}
int spin_us() { return g_spin_us.load(std::memory_order_relaxed); }

}  // namespace pool
}  // namespace optkern
