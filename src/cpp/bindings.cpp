// optkern._core: strict, zero-copy bindings. Each step function validates every array it is given
// (dtype, layout, shape, aliasing) before any buffer is written, collects raw pointers, releases
// the GIL and makes one multi-tensor kernel call. Hyperparameter ranges are checked by the Python
// layer (optkern.functional), which is the only caller.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dispatch.hpp"
#include "kernel_api.hpp"
#include "multi_tensor.hpp"

namespace py = pybind11;

namespace optkern {
namespace {

using npy = py::detail::npy_api;

enum class Access { read, write };

std::string type_name(py::handle h) { return Py_TYPE(h.ptr())->tp_name; }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(a.shape(d));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

bool native_float32(const py::dtype& dt) {
  if (dt.num() != npy::NPY_FLOAT_) return false;
  const char order = dt.byteorder();
  const std::uint16_t probe = 1;
  const bool little = *reinterpret_cast<const unsigned char*>(&probe) == 1;
  return order == '=' || order == '|' || order == (little ? '<' : '>');
}

// A list or tuple, as a borrowed array of items (valid while the sequence is alive and the GIL
// is held). Anything else, an ndarray included, is refused: iterating a 2-D array would hand us
// row views and hide the caller's mistake.
struct Items {
  PyObject** items;
  std::size_t size;
};

Items items_of(py::handle seq, const char* name) {
  PyObject* o = seq.ptr();
  if (PyList_Check(o)) {
    return {reinterpret_cast<PyListObject*>(o)->ob_item, static_cast<std::size_t>(PyList_GET_SIZE(o))};
  }
  if (PyTuple_Check(o)) {
    return {reinterpret_cast<PyTupleObject*>(o)->ob_item, static_cast<std::size_t>(PyTuple_GET_SIZE(o))};
  }
  throw py::type_error(std::string(name) + " must be a list or tuple of float32 NumPy arrays, got " +
                       type_name(seq));
}

// Every buffer of one call, validated. The parameters come first and fix the number of tensors
// and their shapes; every other list must match them one to one.
class CallBuffers {
 public:
  // positions: None, or the caller's own index of each tensor, used in error messages (the
  // optimizer classes pass the index into the gradient list the user gave step()).
  CallBuffers(py::handle params, py::handle positions) : positions_(positions) {
    const Items items = items_of(params, "params");
    count_ = items.size;
    sizes_.resize(count_);
    params_ = add(params, "params", Access::write);
  }

  std::size_t count() const { return count_; }
  const std::vector<std::size_t>& sizes() const { return sizes_; }
  float* param(std::size_t t) const { return params_[t]; }

  // Validates a list of arrays matched to the parameters and returns their data pointers.
  std::vector<float*> add(py::handle seq, const char* name, Access access) {
    const Items items = items_of(seq, name);
    if (items.size != count_) {
      throw py::value_error(std::string(name) + " has " + std::to_string(items.size) + " arrays but params has " +
                            std::to_string(count_) + "; they must match one to one");
    }
    const bool is_params = arrays_.empty();
    std::vector<float*> out(count_);
    for (std::size_t i = 0; i < count_; ++i) {
      py::handle item(items.items[i]);
      const std::string what = label(name, i);
      if (!py::isinstance<py::array>(item)) {
        throw py::type_error(what + " must be a float32 NumPy array, got " + type_name(item));
      }
      auto arr = py::reinterpret_borrow<py::array>(item);
      const py::dtype dt = arr.dtype();
      if (!native_float32(dt)) {
        throw py::type_error(what + " must be a float32 array in native byte order, got dtype " +
                             std::string(py::str(dt)));
      }
      if (arr.ndim() == 0) {
        throw py::value_error(what + " is a 0-d array; optkern updates arrays with at least one "
                              "dimension (use a shape (1,) array)");
      }
      const int flags = arr.flags();
      if (!(flags & npy::NPY_ARRAY_C_CONTIGUOUS_)) {
        throw py::value_error(
            what + " must be C-contiguous, got strides " + strides_str(arr) +
            (access == Access::write
                 ? "; it is updated in place, so a contiguous copy would lose the update"
                 : "; np.ascontiguousarray() makes a contiguous copy"));
      }
      if (!(flags & npy::NPY_ARRAY_ALIGNED_)) {
        throw py::value_error(what + " is not aligned to 4 bytes");
      }
      if (access == Access::write && !(flags & npy::NPY_ARRAY_WRITEABLE_)) {
        throw py::value_error(what + " is read-only, but it is updated in place");
      }
      if (is_params) {
        sizes_[i] = static_cast<std::size_t>(arr.size());
      } else if (!same_shape(arr, arrays_[i])) {
        throw py::value_error(what + " has shape " + shape_str(arr) + " but " +
                              label("params", i) + " has shape " + shape_str(arrays_[i]));
      }
      out[i] = static_cast<float*>(const_cast<void*>(arr.data()));
      if (sizes_[i] != 0) {
        const auto lo = reinterpret_cast<std::uintptr_t>(out[i]);
        ranges_.push_back({lo, lo + sizes_[i] * sizeof(float), name, i, access == Access::write});
      }
      // Hold a reference to every array while the GIL is released, in case another thread
      // empties the caller's list meanwhile.
      (is_params ? arrays_ : held_).push_back(arr);
    }
    return out;
  }

  // Refuses any buffer that is written and shares memory with another buffer of the call
  // (gradients may share memory with each other: they are only read).
  void check_disjoint() {
    std::sort(ranges_.begin(), ranges_.end(),
              [](const Range& a, const Range& b) { return a.lo < b.lo; });
    // Sweep by start address, remembering the range that reaches furthest. If any written range
    // overlaps another, the later-starting one of the pair meets either that range or another
    // overlap with a written range earlier in the sweep.
    const Range* reach = nullptr;
    for (const Range& r : ranges_) {
      if (reach != nullptr && r.lo < reach->hi && (r.written || reach->written)) {
        throw py::value_error(label(r.name, r.index) + " shares memory with " +
                              label(reach->name, reach->index) +
                              "; every buffer an optimizer writes must be separate from all others");
      }
      if (reach == nullptr || r.hi > reach->hi) reach = &r;
    }
  }

  std::string label(const char* name, std::size_t i) const {
    std::size_t shown = i;
    if (!positions_.is_none() && i < py::len(positions_)) {
      shown = py::cast<std::size_t>(positions_[py::int_(i)]);
    }
    return std::string(name) + "[" + std::to_string(shown) + "]";
  }

 private:
  struct Range {
    std::uintptr_t lo, hi;
    const char* name;
    std::size_t index;
    bool written;
  };

  static bool same_shape(const py::array& a, const py::array& b) {
    return a.ndim() == b.ndim() && std::equal(a.shape(), a.shape() + a.ndim(), b.shape());
  }

  static std::string strides_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
      if (d) s += ", ";
      s += std::to_string(a.strides(d));
    }
    return s + (a.ndim() == 1 ? ",)" : ")");
  }

  py::handle positions_;
  std::size_t count_ = 0;
  std::vector<std::size_t> sizes_;
  std::vector<float*> params_;
  std::vector<py::array> arrays_;  // the parameters, for their shapes
  std::vector<py::array> held_;    // every other array of the call
  std::vector<Range> ranges_;
};

// Runs f(tensor, begin, end) over the call's elements with the GIL released.
template <class F>
void run(const CallBuffers& cb, F&& f) {
  py::gil_scoped_release nogil;
  for_each_span(cb.sizes(), f);
}

// Step counts of this update, one per tensor: an int for all, or a list or tuple of ints >= 1.
std::vector<std::int64_t> step_counts(py::handle steps, const CallBuffers& cb) {
  std::vector<std::int64_t> out(cb.count());
  auto check = [&](py::handle v, std::size_t i) -> std::int64_t {
    if (!PyLong_Check(v.ptr()) || PyBool_Check(v.ptr())) {
      throw py::type_error(cb.label("steps", i) + " must be an int, got " + type_name(v));
    }
    int overflow = 0;
    const long long s = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
    if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (overflow != 0) {
      throw py::value_error(cb.label("steps", i) + " is out of range: it must fit in 64 bits");
    }
    if (s < 1) throw py::value_error(cb.label("steps", i) + " must be >= 1, got " + std::to_string(s));
    return s;
  };
  if (PyLong_Check(steps.ptr())) {
    const std::int64_t s = check(steps, 0);  // checked even when there is nothing to update
    std::fill(out.begin(), out.end(), s);
    return out;
  }
  const Items items = items_of(steps, "steps");
  if (items.size != cb.count()) {
    throw py::value_error("steps has " + std::to_string(items.size) + " entries but params has " +
                          std::to_string(cb.count()));
  }
  for (std::size_t i = 0; i < items.size; ++i) out[i] = check(items.items[i], i);
  return out;
}

std::vector<char> flags_of(py::handle seq, const char* name, const CallBuffers& cb) {
  std::vector<char> out(cb.count(), 0);
  if (seq.is_none()) return out;
  const Items items = items_of(seq, name);
  if (items.size != cb.count()) {
    throw py::value_error(std::string(name) + " has " + std::to_string(items.size) + " entries but params has " +
                          std::to_string(cb.count()));
  }
  for (std::size_t i = 0; i < items.size; ++i) {
    const int truth = PyObject_IsTrue(items.items[i]);
    if (truth < 0) throw py::error_already_set();
    out[i] = static_cast<char>(truth);
  }
  return out;
}

template <class T>
T* at(const std::vector<T*>& v, std::size_t t, std::size_t begin) {
  return v.empty() ? nullptr : v[t] + begin;
}

// ------------------------------------------------------------------------------------------------

void sgd_step(py::handle params, py::handle grads, py::handle momentum_buffers,
              py::handle init_buffers, double lr, double weight_decay, double momentum,
              double dampening, bool nesterov, double grad_scale, py::handle positions) {
  CallBuffers cb(params, positions);
  const auto g = cb.add(grads, "grads", Access::read);
  std::vector<float*> buf;
  std::vector<char> init(cb.count(), 0);
  if (!momentum_buffers.is_none()) {
    buf = cb.add(momentum_buffers, "momentum_buffers", Access::write);
    init = flags_of(init_buffers, "init_buffers", cb);
  }
  cb.check_disjoint();
  const SgdStep base{static_cast<float>(lr),       static_cast<float>(weight_decay),
                     static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                     static_cast<float>(grad_scale), nesterov, false};
  const KernelTable& k = kernels();
  run(cb, [&](std::size_t t, std::size_t b, std::size_t e) {
    SgdStep s = base;
    s.init_buffer = init[t] != 0;
    k.sgd(s, cb.param(t) + b, g[t] + b, at(buf, t, b), e - b);
  });
}

void rmsprop_step(py::handle params, py::handle grads, py::handle square_avgs,
                  py::handle momentum_buffers, py::handle grad_avgs, double lr, double alpha,
                  double eps, double weight_decay, double momentum, double grad_scale,
                  py::handle positions) {
  CallBuffers cb(params, positions);
  const auto g = cb.add(grads, "grads", Access::read);
  const auto sq = cb.add(square_avgs, "square_avgs", Access::write);
  std::vector<float*> buf, gavg;
  if (!momentum_buffers.is_none()) buf = cb.add(momentum_buffers, "momentum_buffers", Access::write);
  if (!grad_avgs.is_none()) gavg = cb.add(grad_avgs, "grad_avgs", Access::write);
  cb.check_disjoint();
  const RmspropStep s{static_cast<float>(lr),           static_cast<float>(alpha),
                      static_cast<float>(1.0 - alpha), static_cast<float>(eps),
                      static_cast<float>(weight_decay), static_cast<float>(momentum),
                      static_cast<float>(grad_scale),   !gavg.empty()};
  const KernelTable& k = kernels();
  run(cb, [&](std::size_t t, std::size_t b, std::size_t e) {
    k.rmsprop(s, cb.param(t) + b, g[t] + b, sq[t] + b, at(buf, t, b), at(gavg, t, b), e - b);
  });
}

void adagrad_step(py::handle params, py::handle grads, py::handle state_sums, py::handle steps,
                  double lr, double lr_decay, double eps, double weight_decay, double grad_scale,
                  py::handle positions) {
  CallBuffers cb(params, positions);
  const auto g = cb.add(grads, "grads", Access::read);
  const auto sums = cb.add(state_sums, "state_sums", Access::write);
  cb.check_disjoint();
  const auto step = step_counts(steps, cb);
  std::vector<AdagradStep> per_tensor(cb.count());
  for (std::size_t t = 0; t < cb.count(); ++t) {
    const double clr = lr / (1.0 + static_cast<double>(step[t] - 1) * lr_decay);
    per_tensor[t] = {static_cast<float>(clr), static_cast<float>(eps),
                     static_cast<float>(weight_decay), static_cast<float>(grad_scale)};
  }
  const KernelTable& k = kernels();
  run(cb, [&](std::size_t t, std::size_t b, std::size_t e) {
    k.adagrad(per_tensor[t], cb.param(t) + b, g[t] + b, sums[t] + b, e - b);
  });
}

void adadelta_step(py::handle params, py::handle grads, py::handle square_avgs,
                   py::handle acc_deltas, double lr, double rho, double eps, double weight_decay,
                   double grad_scale, py::handle positions) {
  CallBuffers cb(params, positions);
  const auto g = cb.add(grads, "grads", Access::read);
  const auto sq = cb.add(square_avgs, "square_avgs", Access::write);
  const auto acc = cb.add(acc_deltas, "acc_deltas", Access::write);
  cb.check_disjoint();
  const AdadeltaStep s{static_cast<float>(lr),  static_cast<float>(rho),
                       static_cast<float>(1.0 - rho), static_cast<float>(eps),
                       static_cast<float>(weight_decay), static_cast<float>(grad_scale)};
  const KernelTable& k = kernels();
  run(cb, [&](std::size_t t, std::size_t b, std::size_t e) {
    k.adadelta(s, cb.param(t) + b, g[t] + b, sq[t] + b, acc[t] + b, e - b);
  });
}

void adam_step(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
               py::handle max_exp_avg_sqs, py::handle steps, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled, double grad_scale,
               py::handle positions) {
  CallBuffers cb(params, positions);
  const auto g = cb.add(grads, "grads", Access::read);
  const auto m = cb.add(exp_avgs, "exp_avgs", Access::write);
  const auto v = cb.add(exp_avg_sqs, "exp_avg_sqs", Access::write);
  std::vector<float*> vmax;
  if (!max_exp_avg_sqs.is_none()) vmax = cb.add(max_exp_avg_sqs, "max_exp_avg_sqs", Access::write);
  cb.check_disjoint();
  const auto step = step_counts(steps, cb);

  AdamStep base{};
  const double w = 1.0 - beta1;  // exp_avg.lerp_(grad, 1 - beta1)
  base.lerp_from_avg = std::abs(w) < 0.5;
  base.lerp_coeff = static_cast<float>(base.lerp_from_avg ? w : w - 1.0);
  base.beta2 = static_cast<float>(beta2);
  base.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  base.eps = static_cast<float>(eps);
  base.weight_decay = static_cast<float>(weight_decay);
  base.decoupled_decay = static_cast<float>(1.0 - lr * weight_decay);
  base.grad_scale = static_cast<float>(grad_scale);
  base.amsgrad = !vmax.empty();
  base.decoupled = decoupled;
  std::vector<AdamStep> per_tensor(cb.count(), base);
  for (std::size_t t = 0; t < cb.count(); ++t) {
    if (t > 0 && step[t] == step[t - 1]) {
      per_tensor[t] = per_tensor[t - 1];
      continue;
    }
    // Bias corrections from the step count, in double (never a running product).
    const double n = static_cast<double>(step[t]);
    per_tensor[t].step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, n)));
    per_tensor[t].inv_bias_correction2_sqrt =
        static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, n)));
  }
  const KernelTable& k = kernels();
  run(cb, [&](std::size_t t, std::size_t b, std::size_t e) {
    k.adam(per_tensor[t], cb.param(t) + b, g[t] + b, m[t] + b, v[t] + b, at(vmax, t, b), e - b);
  });
}

void check_params(py::handle params) {
  CallBuffers cb(params, py::none());
  cb.check_disjoint();
}

void check_grads(py::handle params, py::handle grads, py::handle positions) {
  CallBuffers cb(params, positions);
  cb.add(grads, "grads", Access::read);
  cb.check_disjoint();
}

py::dict build_info() {
  py::dict info;
  info["version"] = OPTKERN_VERSION;
  info["compiler"] = OPTKERN_COMPILER;
  info["openmp"] = have_openmp();
  py::dict flags;
  for (const auto& [isa, f] : isa_build_flags()) flags[py::str(isa)] = f;
  info["isa_flags"] = flags;
  info["min_elements_per_thread"] = min_elements_per_thread();
  return info;
}

}  // namespace
}  // namespace optkern

PYBIND11_MODULE(_core, m) {
  using namespace optkern;
  namespace py = pybind11;
  m.doc() = "optkern's C++ core: fused optimizer kernels behind runtime ISA dispatch (private; "
            "use optkern and optkern.functional)";
  init_dispatch();
  m.attr("__version__") = OPTKERN_VERSION;

  m.def("active_isa", &active_isa, "The instruction set the kernels run with: scalar, avx2 or avx512.");
  m.def("available_isas", &available_isas,
        "The instruction sets this build holds and this CPU supports, from the baseline up.");
  m.def("get_num_threads", &num_threads, "Threads a large update uses.");
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
        set_num_threads(n);
      },
      py::arg("n"), "Sets the threads a large update uses (1 or more).");
  m.def("build_info", &build_info, "Version, compiler, OpenMP and the flags of each ISA build.");
  m.def("_set_min_elements_per_thread", &set_min_elements_per_thread, py::arg("n"),
        "Testing hook: the smallest share of elements worth a thread of its own.");
  m.def("_min_elements_per_thread", &min_elements_per_thread);

  m.def("check_params", &check_params, py::arg("params"),
        "Validates params as distinct, writeable, C-contiguous float32 arrays.");
  m.def("check_grads", &check_grads, py::arg("params"), py::arg("grads"), py::kw_only(),
        py::arg("positions") = py::none(),
        "Validates grads against params without running anything.");

  m.def("sgd_step", &sgd_step, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"),
        py::kw_only(), py::arg("init_buffers"), py::arg("lr"), py::arg("weight_decay"),
        py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"), py::arg("grad_scale"),
        py::arg("positions") = py::none());
  m.def("rmsprop_step", &rmsprop_step, py::arg("params"), py::arg("grads"),
        py::arg("square_avgs"), py::arg("momentum_buffers"), py::arg("grad_avgs"), py::kw_only(),
        py::arg("lr"), py::arg("alpha"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("momentum"), py::arg("grad_scale"), py::arg("positions") = py::none());
  m.def("adagrad_step", &adagrad_step, py::arg("params"), py::arg("grads"),
        py::arg("state_sums"), py::kw_only(), py::arg("steps"), py::arg("lr"),
        py::arg("lr_decay"), py::arg("eps"), py::arg("weight_decay"), py::arg("grad_scale"),
        py::arg("positions") = py::none());
  m.def("adadelta_step", &adadelta_step, py::arg("params"), py::arg("grads"),
        py::arg("square_avgs"), py::arg("acc_deltas"), py::kw_only(), py::arg("lr"),
        py::arg("rho"), py::arg("eps"), py::arg("weight_decay"), py::arg("grad_scale"),
        py::arg("positions") = py::none());
  m.def("adam_step", &adam_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::kw_only(), py::arg("steps"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled"), py::arg("grad_scale"),
        py::arg("positions") = py::none());
}
