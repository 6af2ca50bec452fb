// optkern._core._testing: what tests and benchmarks reach into (thread-split thresholds, the
// pool's counters and failure injection, the pieces of the default thread count). Not an API.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <string>

#include "multi_tensor.hpp"
#include "thread_pool.hpp"
#include "update.hpp"

namespace optkern {

namespace py = pybind11;

void define_testing(py::module_& m) {
  m.def("set_min_elements_per_thread", &set_min_elements_per_thread, py::arg("n"),
        "The smallest share of elements worth a thread of its own.");
  m.def("min_elements_per_thread", &min_elements_per_thread);
  m.def(
      "split_threads",
      [](std::size_t elements, std::size_t weight) {
        return split_threads(elements * weight, num_threads(), min_elements_per_thread());
      },
      py::arg("elements"), py::arg("weight"),
      "The threads a call of this many elements of this weight would use (before the backoff).");
  m.def("set_chunk_elements", &set_chunk_elements, py::arg("n"),
        "Elements per chunk of a multi-threaded call (0: chosen by size).");
  m.def("set_streaming_call_bytes", &set_streaming_call_bytes, py::arg("n"),
        "Calls of at least this many bytes prefetch ahead in pieces (0: every call).");
  m.def("streaming_call_bytes", &streaming_call_bytes);
  m.def("fail_thread_creation_after", &pool::fail_thread_creation_after, py::arg("k"),
        "Creating a helper thread fails after k more (k < 0: never).");
  m.def("pool_helpers", &pool::helpers, "Helper threads this process started.");
  m.def("set_spin_us", &pool::set_spin_us, py::arg("us"),
        "How long an idle helper looks for work before it sleeps.");
  m.def("spin_us", &pool::spin_us);
  m.def("set_adaptive_threads", &pool::set_adaptive, py::arg("on"),
        "After calls whose helpers did not pay, run the next calls on the calling thread alone "
        "for a while (on by default). Setting it resets that state.");
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
      "Counters: multi-threaded calls, chunks run by helpers, calls whose helpers did not pay "
      "(late_calls), calls run alone by the backoff.");
  m.def(
      "call_paid",
      [](std::size_t chunks, std::size_t mine, int threads, double own_us, double wait_us) {
        auto us = [](double v) {
          return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
              std::chrono::duration<double, std::micro>(v));
        };
        return pool::paid(chunks, mine, threads, us(own_us), us(wait_us));
      },
      py::arg("chunks"), py::arg("mine"), py::arg("threads"), py::arg("own_us"), py::arg("wait_us"),
      "Whether a multi-threaded call with these counts and times paid for its helpers.");
  m.def("set_keep_off_caller_cpu", &pool::set_keep_off_caller_cpu, py::arg("on"),
        "Helpers stay off the calling thread's CPU (Linux; on by default).");
  m.def("keep_off_caller_cpu", &pool::keep_off_caller_cpu);
  m.def("pool_trace", &pool::trace, py::arg("on"),
        "Clear and start (or stop) recording each multi-threaded call's timings.");
  m.def(
      "pool_take_trace",
      [] {
        py::list out;
        for (const auto& t : pool::take_trace()) {
          out.append(py::make_tuple(t.wake_us, t.caller_us, t.wait_us, t.chunks, t.helper_chunks,
                                    t.caller_cpu, t.helper_cpu));
        }
        return out;
      },
      "The recorded calls as (wake_us, caller_us, wait_us, chunks, helper_chunks, caller_cpu, "
      "helper_cpu), and clears them.");
  m.def(
      "helper_wake_latencies",
      [](int samples, int gap_us) {
        py::gil_scoped_release nogil;
        return pool::wake_latencies(samples, gap_us);
      },
      py::arg("samples"), py::arg("gap_us"),
      "Microseconds from a call to a helper running, per sample (-1: none within 100 ms).");
  m.def("parse_thread_count",
        [](const std::string& s) { return pool::parse_thread_count(s.c_str()); });
  m.def("cpus_from_cpu_max", &pool::cpus_from_cpu_max);
  m.def("cpus_from_cfs", &pool::cpus_from_cfs);
  m.def("affinity_cpus", &pool::affinity_cpus);
  m.def("quota_cpus", &pool::quota_cpus);
}

}  // namespace optkern
