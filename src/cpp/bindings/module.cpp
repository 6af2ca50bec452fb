// optkern._core: strict, zero-copy bindings of optkern's C++ core (private; optkern and
// optkern.functional are the API).
//
// Every update rule goes through one binding, _core.step (or _core.prepare + _core.run, which the
// optimizer classes use to validate every group before any is updated): bindings/prepared.cpp.
// It looks the rule up in the declarations (rules/registry.hpp), checks the hyperparameters
// against their declared ranges (bindings/hyper.cpp) and every array (dtype, layout, shape,
// aliasing: bindings/arrays.cpp) before anything is written, computes the per-step scalars in
// double (refusing any the compute type cannot hold), releases the GIL and makes one multi-tensor
// kernel call per group (update.cpp). Python code can run only before the first array is
// inspected: every list is copied first, so nothing the caller's __index__ or __float__ does can
// free what is iterated. The hooks tests and benchmarks use are in the _core._testing submodule
// (bindings/testing.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>

#include "bindings/arrays.hpp"
#include "dispatch.hpp"
#include "multi_tensor.hpp"
#include "thread_pool.hpp"

namespace optkern {

void define_rules(py::module_& m);
void define_prepared(py::module_& m);
void define_step_plan(py::module_& m);
void define_norms(py::module_& m);
void define_testing(py::module_& m);
void define_lowbits(py::module_& m, py::module_& testing);
void define_algos(py::module_& m);
void define_algos_testing(py::module_& m);

namespace {

// set_num_threads(n): an int (or NumPy integer), not a bool, from 1 to pool::MAX_THREADS.
void set_num_threads_checked(py::handle n) {
  if (PyBool_Check(n.ptr()) || !PyIndex_Check(n.ptr())) {
    throw py::type_error("set_num_threads: n must be an int, got " + type_name(n));
  }
  auto number = py::reinterpret_steal<py::object>(PyNumber_Index(n.ptr()));
  if (!number) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(number.ptr(), &overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow < 0 || (overflow == 0 && v < 1)) {
    throw py::value_error("set_num_threads: n must be >= 1, got " +
                          py::str(number).cast<std::string>());
  }
  if (overflow > 0 || v > pool::MAX_THREADS) {
    throw py::value_error("set_num_threads: n must be <= " + std::to_string(pool::MAX_THREADS) +
                          ", got " + py::str(number).cast<std::string>());
  }
  set_num_threads(static_cast<int>(v));
}

py::dict build_info() {
  py::dict info;
  info["version"] = OPTKERN_VERSION;
  info["compiler"] = OPTKERN_COMPILER;
  info["openmp"] = have_openmp();  // kept for compatibility: always False now
  info["threads"] = threading();
  info["max_threads"] = pool::MAX_THREADS;
  py::dict flags;
  for (const auto& [isa, f] : isa_build_flags()) flags[py::str(isa)] = f;
  info["isa_flags"] = flags;
  py::list fused;  // the available ISAs whose builds fuse multiply-adds (bit-identical results)
  for (const std::string& isa : available_isas()) {
    if (kernels_for(isa)->fused_multiply_add) fused.append(isa);
  }
  info["fused_multiply_add"] = fused;
  // When a call uses more than one thread (multi_tensor.hpp): each thread's share must take
  // min_us_per_thread on one thread, estimated at ns_per_work per unit of work; an element of a
  // rule of weight w is w units.
  info["min_elements_per_thread"] = min_elements_per_thread();
  info["min_us_per_thread"] = min_us_per_thread();
  info["ns_per_work"] = ns_per_work();
  py::dict by_weight;
  for (std::size_t w : {WEIGHT_STREAMING, WEIGHT_DIVIDES}) {
    by_weight[py::int_(w)] = (min_elements_per_thread() + w - 1) / w;
  }
  info["min_elements_per_thread_by_weight"] = by_weight;
  return info;
}

// OPTKERN_NUM_THREADS set to something that is not a thread count would be ignored without a
// word (the count then comes from OMP_NUM_THREADS or the CPUs): say so once, at import.
void warn_on_unreadable_thread_count() {
  const char* text = std::getenv("OPTKERN_NUM_THREADS");
  if (text == nullptr || *text == '\0' || pool::parse_thread_count(text) > 0) return;
  const std::string message = "OPTKERN_NUM_THREADS='" + std::string(text) +
                              "' is not a thread count (a whole number from 1 to " +
                              std::to_string(pool::MAX_THREADS) + "); it is ignored and " +
                              std::to_string(pool::default_threads()) + " threads are used";
  if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) != 0) throw py::error_already_set();
}

}  // namespace
}  // namespace optkern

PYBIND11_MODULE(_core, m) {
  using namespace optkern;
  m.doc() =
      "optkern's C++ core: fused optimizer kernels behind runtime ISA dispatch (private; "
      "use optkern and optkern.functional)";
  init_dispatch();
  m.attr("__version__") = OPTKERN_VERSION;
  warn_on_unreadable_thread_count();

  m.def("active_isa", &active_isa,
        "The instruction set the kernels run with: scalar, avx2, avx512 (x86-64), neon, sve "
        "(aarch64).");
  m.def("available_isas", &available_isas,
        "The instruction sets this build holds and this CPU supports, from the baseline up.");
  m.def("get_num_threads", &num_threads, "Threads a large update uses.");
  m.def("set_num_threads", &set_num_threads_checked, py::arg("n"),
        "Sets the threads a large update uses: an int from 1 to build_info()['max_threads'].");
  m.def("build_info", &build_info, "Version, compiler, threading and the flags of each ISA build.");
  m.def("set_parallel_backend", &pool::set_backend, py::arg("name"), py::arg("library") = "",
        "Where large updates run their chunks: 'pool' (optkern's threads) or 'gomp' (the calling "
        "thread's OpenMP team of an already loaded libgomp, e.g. torch's). Returns the backend in "
        "effect ('pool' when the library is not loaded or lacks GOMP_parallel).");
  m.def(
      "parallel_backend", [] { return py::make_tuple(pool::backend(), pool::backend_library()); },
      "The parallel backend in effect and its library ('' for the pool).");

  define_norms(m);
  define_rules(m);
  define_prepared(m);
  define_step_plan(m);
  define_algos(m);
  py::module_ testing =
      m.def_submodule("_testing", "Hooks for optkern's tests and benchmarks; not an API.");
  define_testing(testing);
  define_lowbits(m, testing);
  define_algos_testing(testing);
}
