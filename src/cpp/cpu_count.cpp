// The default thread count (pool::default_threads) and its pieces: the environment, the CPUs
// this process may run on, and its cgroup's CPU quota.
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "thread_pool.hpp"

#if defined(__linux__)
#include <sched.h>
#endif

namespace optkern {
namespace pool {

int parse_thread_count(const char* text) {
  if (text == nullptr) return 0;
  while (*text == ' ' || *text == '\t') ++text;
  long long v = 0;
  const char* s = text;
  while (*s >= '0' && *s <= '9') {
    v = v * 10 + (*s - '0');
    if (v > MAX_THREADS) return 0;
    ++s;
  }
  if (s == text) return 0;
  while (*s == ' ' || *s == '\t') ++s;
  // OMP_NUM_THREADS may list one count per nesting level ("4,2"): the first is ours.
  if (*s != '\0' && *s != ',') return 0;
  return v >= 1 ? static_cast<int>(v) : 0;
}

int cpus_from_cfs(long long quota, long long period) {
  if (quota <= 0 || period <= 0) return 0;  // -1: no quota
  const long long cpus = (quota + period - 1) / period;
  return static_cast<int>(std::min<long long>(std::max<long long>(cpus, 1), MAX_THREADS));
}

int cpus_from_cpu_max(const std::string& text) {
  std::istringstream in(text);
  std::string quota;
  long long period = 100000;
  if (!(in >> quota) || quota == "max") return 0;
  if (!(in >> period)) period = 100000;  // the kernel always writes both; the period defaults so
  char* end = nullptr;
  const long long q = std::strtoll(quota.c_str(), &end, 10);
  if (end == quota.c_str() || *end != '\0') return 0;
  return cpus_from_cfs(q, period);
}

int affinity_cpus() {
#if defined(__linux__) && defined(CPU_ALLOC)
  for (int n = 1024; n <= (1 << 20); n *= 2) {
    cpu_set_t* set = CPU_ALLOC(n);
    if (set == nullptr) return 0;
    const std::size_t size = CPU_ALLOC_SIZE(n);
    CPU_ZERO_S(size, set);
    if (sched_getaffinity(0, size, set) == 0) {
      const int count = CPU_COUNT_S(size, set);
      CPU_FREE(set);
      return count;
    }
    CPU_FREE(set);
    if (errno != EINVAL) return 0;  // EINVAL: the mask is wider than n CPUs
  }
  return 0;
#else
  return static_cast<int>(std::thread::hardware_concurrency());
#endif
}

namespace {

bool read_file(const std::string& path, std::string& out) {
  std::ifstream f(path);
  if (!f) return false;
  std::ostringstream s;
  s << f.rdbuf();
  out = s.str();
  return true;
}

// The smallest quota among the cgroup `dir` (a path below `root`) and its ancestors; 0 for none.
template <class Read>
int smallest_quota(const std::string& root, std::string dir, Read&& read) {
  int best = 0;
  for (;;) {
    const int q = read(root + dir);
    if (q > 0 && (best == 0 || q < best)) best = q;
    if (dir.empty() || dir == "/") break;
    const auto slash = dir.find_last_of('/');
    dir = slash == std::string::npos ? std::string() : dir.substr(0, slash);
  }
  return best;
}

}  // namespace

int quota_cpus() {
#if defined(__linux__)
  std::string cgroups;
  if (!read_file("/proc/self/cgroup", cgroups)) return 0;
  std::istringstream lines(cgroups);
  std::string line;
  int best = 0;
  auto take = [&](int q) {
    if (q > 0 && (best == 0 || q < best)) best = q;
  };
  while (std::getline(lines, line)) {
    // "hierarchy-id:controllers:path"; cgroup v2 is "0::path".
    const auto a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (controllers.empty()) {
      take(smallest_quota("/sys/fs/cgroup", path, [](const std::string& d) {
        std::string text;
        return read_file(d + "/cpu.max", text) ? cpus_from_cpu_max(text) : 0;
      }));
    } else if (("," + controllers + ",").find(",cpu,") != std::string::npos) {
      for (const char* root : {"/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"}) {
        take(smallest_quota(root, path, [](const std::string& d) {
          std::string q, p;
          if (!read_file(d + "/cpu.cfs_quota_us", q) || !read_file(d + "/cpu.cfs_period_us", p)) {
            return 0;
          }
          return cpus_from_cfs(std::atoll(q.c_str()), std::atoll(p.c_str()));
        }));
      }
    }
  }
  return best;
#else
  return 0;
#endif
}

int default_threads() {
  for (const char* name : {"OPTKERN_NUM_THREADS", "OMP_NUM_THREADS"}) {
    const int n = parse_thread_count(std::getenv(name));
    if (n > 0) return n;
  }
  int n = affinity_cpus();
  const int quota = quota_cpus();
  if (quota > 0 && (n <= 0 || quota < n)) n = quota;
  return std::max(1, std::min(n, MAX_THREADS));
}

}  // namespace pool
}  // namespace optkern
