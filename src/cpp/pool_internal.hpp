// What thread_pool.cpp (optkern's pool) and gomp_backend.cpp (the "gomp" backend) share: the
// platform switches, the spin-wait, the pool's ownership and the calls into the backend.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>

#include "thread_pool.hpp"

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
#include <immintrin.h>
#define OPTKERN_PAUSE() _mm_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define OPTKERN_PAUSE() __asm__ __volatile__("yield")
#else
#define OPTKERN_PAUSE() ((void)0)
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <signal.h>
#define OPTKERN_POSIX 1
#endif
#if defined(OPTKERN_POSIX) && defined(OPTKERN_HAVE_THREADS)
#define OPTKERN_GOMP 1
#endif

namespace optkern {
namespace pool {

using Clock = std::chrono::steady_clock;

// How long the calling thread checks for its helpers' last chunks before it sleeps. Helpers
// that hold a claimed chunk are running (or were just descheduled): most finish within a chunk's
// time, a few microseconds; past this, sleeping gives a descheduled helper the core back.
constexpr auto CALLER_SPIN = std::chrono::microseconds(50);

// Checks `done()` with a pause between checks for up to `limit`; true when it became true.
template <class Done>
bool spin_until(Done&& done, Clock::duration limit) {
  if (done()) return true;
  if (limit <= Clock::duration::zero()) return false;
  const auto deadline = Clock::now() + limit;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      OPTKERN_PAUSE();
      if (done()) return true;
    }
    if (Clock::now() >= deadline) return false;
  }
}

extern std::atomic<bool> g_adaptive;  // the late-helper and slow-team backoffs (set_adaptive)
extern std::atomic<bool> g_paused;    // testing hook: helpers wake but take no chunk
extern thread_local bool t_in_pool;   // a helper, or a caller inside run(): no nesting
// Held by the thread whose call is running (on either backend), and by fork's prepare handler.
extern std::mutex g_owner;

void register_fork_handlers();  // once per process; the child drops the pool and the team

// -- the "gomp" backend (gomp_backend.cpp); every call under g_owner ------------------------------

// The team's thread count for a call that would use `threads`, or 0 when the call runs on
// optkern's pool (no team chosen, or the team was slow lately and the backoff skips it).
int gomp_team(int threads);
// Runs the chunks on `threads` threads of the team; returns how many the calling thread ran.
std::size_t run_gomp(std::size_t chunks, unsigned threads, ChunkFn fn, void* ctx);
void drop_gomp_in_child();  // the child of a fork has no threads behind the parent's team

struct GompStats {
  std::uint64_t calls, slow, pool;  // calls on the team, slow ones, calls the backoff sent back
};
GompStats gomp_stats();

}  // namespace pool
}  // namespace optkern
