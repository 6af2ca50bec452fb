// optkern's own thread pool: the helpers that run the chunks of a large call beside the calling
// thread. No OpenMP runtime: the helpers sleep when idle (they do not spin into the user's next
// matmul), the calling thread starts work at once, chunks are claimed one at a time (a helper
// that wakes late takes only what is left), helpers stay off the caller's CPU, and calls whose
// helpers came late or held the caller back (descheduled while holding a chunk) make the next
// calls run on the caller alone for a while. docs/threading.md has the measurements behind each
// choice.
#pragma once

#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

namespace optkern {
namespace pool {

// The most threads a call may use (set_num_threads refuses more; larger environment values are
// ignored). glibc's fixed cpu_set_t holds 1024 CPUs; a memory-bound update stops gaining long
// before that, and the bound keeps a typo from starting millions of threads.
constexpr int MAX_THREADS = 1024;

// True when this build has the pool (CMake option OPTKERN_THREADS, on by default).
bool enabled();

// Calls fn(ctx, i) once for every i in [0, chunks): on the calling thread and on up to
// `threads - 1` helpers, and returns when every chunk has run. fn must not throw. The calling
// thread runs chunks itself from the start; helpers take the chunks still unclaimed when they
// wake. Runs everything on the calling thread when threads <= 1, when the pool is already
// running another call (a second Python thread stepping at the same time), when called from a
// helper (no nesting), or when no helper thread could be created.
using ChunkFn = void (*)(void* ctx, std::size_t chunk);
void run(std::size_t chunks, int threads, ChunkFn fn, void* ctx);

// Where run() hands its chunks. "pool" (the default): optkern's helpers above. "gomp": the GNU
// OpenMP team of the calling thread, through GOMP_parallel of a libgomp this process has
// already loaded (torch's, so that the workers torch just used, still spinning after its op,
// take optkern's chunks instead of competing with optkern's helpers for the cores). `path`
// names the library (opened with RTLD_NOLOAD: never a second OpenMP runtime); empty: the first
// loaded object whose file name starts with "libgomp". The chunks and the results are the same
// on either backend; a call runs on min(threads, omp_get_max_threads()) threads of the team.
// The pool's rules hold on both: one call at a time (a concurrent call runs on its calling
// thread), no nesting, the late-helper backoff. A forked child goes back to "pool" (libgomp's
// team does not survive fork). Returns the backend in effect: "pool" when the library is not
// loaded or lacks GOMP_parallel, or in a build without threads or dlopen.
std::string set_backend(const std::string& name, const std::string& path);
std::string backend();
std::string backend_library();  // the library's path for "gomp", else empty

// Whether a multi-threaded call paid for its helpers (the late-helper backoff counts those that
// did not): they ran at least half their fair share of the `chunks` (the calling thread ran
// `mine`), and the calling thread, after `own` on its own chunks, waited at most `wait` for
// theirs: no more than a floor plus a few of its own chunks' time (more: a helper descheduled
// while holding a chunk).
bool paid(std::size_t chunks, std::size_t mine, int threads,
          std::chrono::steady_clock::duration own, std::chrono::steady_clock::duration wait);
// The second condition alone: true when a helper held the caller back (straggled).
bool straggled(std::size_t mine, std::chrono::steady_clock::duration own,
               std::chrono::steady_clock::duration wait);

// The default thread count: OPTKERN_NUM_THREADS, else the first entry of OMP_NUM_THREADS, when
// it is an integer in [1, MAX_THREADS]; otherwise the CPUs this process may use (its affinity
// mask and its cgroup CPU quota, the smaller), at most MAX_THREADS.
int default_threads();

// Pieces of default_threads, exposed for tests.
int parse_thread_count(const char* text);        // 0 unless an integer in [1, MAX_THREADS]
int cpus_from_cpu_max(const std::string& text);  // cgroup v2 "quota period": ceil, 0 for "max"
int cpus_from_cfs(long long quota, long long period);  // cgroup v1; 0 for no quota
int affinity_cpus();                                   // 0 when unknown
int quota_cpus();                                      // 0 when there is no quota

// After the system refused a thread, calls use the helpers they have and do not ask again until
// this is called (set_num_threads calls it).
void retry_thread_creation();

// Testing hooks. After k more helper threads are created, creating one fails as if the system
// refused it (k < 0: never). helpers() counts the helpers alive in this process.
void fail_thread_creation_after(long k);
int helpers();
// How long (microseconds) an idle helper checks for new work before it sleeps.
void set_spin_us(int us);
// Helpers that do not pay (thread_pool.cpp): after calls whose helpers did not pay (paid, below),
// the next calls run on the calling thread alone for a while. On by default; off for
// measurements (resets the state).
void set_adaptive(bool on);
// True when the next call should run on the calling thread alone (helpers did not pay lately:
// it counts the call as one of the backoff). Callers then take their single-thread path,
// unchunked.
bool skip_helpers();
bool adaptive();
// Testing hook: helpers wake but take no chunk, as if every one were late.
void pause_helpers(bool paused);
// Counters since the process started: multi-threaded calls, chunks the helpers ran, calls whose
// helpers did not pay (late_calls: late, under half their share, or a straggler), and calls run
// on the calling thread alone by the backoff;
// for the "gomp" backend: calls on the OpenMP team, those whose closing barrier was slow, and
// calls sent to optkern's pool after slow ones (thread_pool.cpp, "A slow team").
struct Stats {
  unsigned long long calls, helper_chunks, late_calls, serial_calls, gomp_calls, gomp_slow_calls,
      gomp_pool_calls;
};
Stats stats();
int spin_us();

// Benchmark hooks. trace(true) clears and starts a record of every multi-threaded call on the
// pool: microseconds from publishing the call to a helper's first chunk (-1: helpers ran none),
// the caller's own work until no chunk was left, its wait for the helpers' chunks after that;
// chunks, those run by helpers, and the CPUs of the caller and of that helper.
struct CallTrace {
  double wake_us, caller_us, wait_us;
  unsigned chunks, helper_chunks;
  int caller_cpu, helper_cpu;
};
void trace(bool on);
std::vector<CallTrace> take_trace();  // the record so far, cleared
// Benchmark hook: whether helpers stay off the calling thread's CPU (run_pool in
// thread_pool.cpp; Linux; on by default).
void set_keep_off_caller_cpu(bool on);
bool keep_off_caller_cpu();
// Benchmark hook: `samples` calls of two chunks on two threads, `gap_us` apart (the helpers
// asleep between them), the caller's chunk waiting for a helper to start the other: microseconds
// from the call to a helper running (-1: none within 100 ms).
std::vector<double> wake_latencies(int samples, int gap_us);

}  // namespace pool
}  // namespace optkern
