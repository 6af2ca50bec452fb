// optkern._core._testing: what tests and benchmarks reach into (thread-split thresholds, the
// pool's counters and failure injection, the pieces of the default thread count). Not an API.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "multi_tensor.hpp"
#include "thread_pool.hpp"

namespace optkern {

namespace py = pybind11;

void define_testing(py::module_& m) {
  m.def("set_min_elements_per_thread", &set_min_elements_per_thread, py::arg("n"),
        "The smallest share of elements worth a thread of its own.");
  m.def("min_elements_per_thread", &min_elements_per_thread);
  m.def("set_chunk_elements", &set_chunk_elements, py::arg("n"),
        "Elements per chunk of a multi-threaded call (0: chosen by size).");
  m.def("fail_thread_creation_after", &pool::fail_thread_creation_after, py::arg("k"),
        "Creating a helper thread fails after k more (k < 0: never).");
  m.def("pool_helpers", &pool::helpers, "Helper threads this process started.");
  m.def("set_spin_us", &pool::set_spin_us, py::arg("us"),
        "How long an idle helper looks for work before it sleeps.");
  m.def("spin_us", &pool::spin_us);
  m.def("set_adaptive_threads", &pool::set_adaptive, py::arg("on"),
        "After calls whose helpers ran no chunk, run the next calls on the "
        "calling thread alone for a while (on by default). Setting it resets that state.");
  m.def("adaptive_threads", &pool::adaptive);
  m.def("pause_helpers", &pool::pause_helpers, py::arg("paused"),
        "Helpers wake but take no chunk, as if every one were late.");
  m.def(
      "pool_stats",
      [] {
        const pool::Stats s = pool::stats();
        py::dict d;
        d["calls"] = s.calls;
        d["helper_chunks"] = s.helper_chunks;
        d["late_calls"] = s.late_calls;
        d["serial_calls"] = s.serial_calls;
        d["gomp_calls"] = s.gomp_calls;
        d["gomp_slow_calls"] = s.gomp_slow_calls;
        d["gomp_pool_calls"] = s.gomp_pool_calls;
        return d;
      },
      "Counters: multi-threaded calls, chunks run by helpers, calls whose helpers ran none, "
      "calls run alone because helpers had been late.");
  m.def("parse_thread_count",
        [](const std::string& s) { return pool::parse_thread_count(s.c_str()); });
  m.def("cpus_from_cpu_max", &pool::cpus_from_cpu_max);
  m.def("cpus_from_cfs", &pool::cpus_from_cfs);
  m.def("affinity_cpus", &pool::affinity_cpus);
  m.def("quota_cpus", &pool::quota_cpus);
}

}  // namespace optkern
