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
#include "thread_pool.hpp"

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

bool native_order(char byteorder) {
  const std::uint16_t probe = 1;
  const bool little = *reinterpret_cast<const unsigned char*>(&probe) == 1;
  return byteorder == '=' || byteorder == '|' || byteorder == (little ? '<' : '>');
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
  // The first list (the parameters of an update, or the gradients of a norm) fixes the count and
  // the shapes. positions: None, or the caller's own index of each tensor, used in error
  // messages (the optimizer classes pass the index into the gradient list given to step()).
  CallBuffers(py::handle first, const char* name, Access access, py::handle positions)
      : first_name_(name), positions_(positions) {
    const Items items = items_of(first, name);
    count_ = items.size;
    sizes_.resize(count_);
    first_ = add(first, name, access);
  }
  CallBuffers(py::handle params, py::handle positions)
      : CallBuffers(params, "params", Access::write, positions) {}

  std::size_t count() const { return count_; }
  const std::vector<std::size_t>& sizes() const { return sizes_; }
  float* param(std::size_t t) const { return first_[t]; }
  const std::vector<float*>& first() const { return first_; }

  // Validates a list of arrays matched to the parameters and returns their data pointers.
  std::vector<float*> add(py::handle seq, const char* name, Access access) {
    const Items items = items_of(seq, name);
    if (items.size != count_) {
      throw py::value_error(std::string(name) + " has " + std::to_string(items.size) +
                            " arrays but " + first_name_ + " has " + std::to_string(count_) +
                            "; they must match one to one");
    }
    const bool is_first = arrays_.empty();
    std::vector<float*> out(count_);
    for (std::size_t i = 0; i < count_; ++i) {
      py::handle item(items.items[i]);
      if (!py::isinstance<py::array>(item)) {
        throw py::type_error(label(name, i) + " must be a float32 NumPy array, got " +
                             type_name(item));
      }
      // NumPy's struct fields directly: this runs for every buffer of every step.
      const auto* a = py::detail::array_proxy(item.ptr());
      const auto* descr = py::detail::array_descriptor_proxy(a->descr);
      if (descr->type_num != npy::NPY_FLOAT_ || !native_order(descr->byteorder)) {
        throw py::type_error(label(name, i) + " must be a float32 array in native byte order, "
                             "got dtype " + std::string(py::str(py::handle(a->descr))));
      }
      if (a->nd == 0) {
        throw py::value_error(label(name, i) + " is a 0-d array; optkern updates arrays with at "
                              "least one dimension (use a shape (1,) array)");
      }
      const auto arr = py::reinterpret_borrow<py::array>(item);
      if (!(a->flags & npy::NPY_ARRAY_C_CONTIGUOUS_)) {
        throw py::value_error(
            label(name, i) + " must be C-contiguous, got strides " + strides_str(arr) +
            (access == Access::write
                 ? "; it is updated in place, so a contiguous copy would lose the update"
                 : "; np.ascontiguousarray() makes a contiguous copy"));
      }
      if (!(a->flags & npy::NPY_ARRAY_ALIGNED_)) {
        throw py::value_error(label(name, i) + " is not aligned to 4 bytes");
      }
      if (access == Access::write && !(a->flags & npy::NPY_ARRAY_WRITEABLE_)) {
        throw py::value_error(label(name, i) + " is read-only, but it is updated in place");
      }
      if (is_first) {
        std::size_t n = 1;
        for (int d = 0; d < a->nd; ++d) n *= static_cast<std::size_t>(a->dimensions[d]);
        sizes_[i] = n;
      } else if (!same_shape(a, py::detail::array_proxy(arrays_[i].ptr()))) {
        throw py::value_error(label(name, i) + " has shape " + shape_str(arr) + " but " +
                              label(first_name_, i) + " has shape " + shape_str(arrays_[i]));
      }
      out[i] = reinterpret_cast<float*>(a->data);
      if (sizes_[i] != 0) {
        const auto lo = reinterpret_cast<std::uintptr_t>(out[i]);
        ranges_.push_back({lo, lo + sizes_[i] * sizeof(float), name, i, access == Access::write});
      }
      // Hold a reference to every array while the GIL is released, in case another thread
      // empties the caller's list meanwhile.
      (is_first ? arrays_ : held_).push_back(arr);
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

  static bool same_shape(const py::detail::PyArray_Proxy* a, const py::detail::PyArray_Proxy* b) {
    return a->nd == b->nd && std::equal(a->dimensions, a->dimensions + a->nd, b->dimensions);
  }

  static std::string strides_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
      if (d) s += ", ";
      s += std::to_string(a.strides(d));
    }
    return s + (a.ndim() == 1 ? ",)" : ")");
  }

  const char* first_name_;
  py::handle positions_;
  std::size_t count_ = 0;
  std::vector<std::size_t> sizes_;
  std::vector<float*> first_;
  std::vector<py::array> arrays_;  // the first list's arrays, for their shapes
  std::vector<py::array> held_;    // every other array of the call
  std::vector<Range> ranges_;
};

// Runs f(tensor, begin, end) over the call's elements with the GIL released. weight: the work of
// one element, in the units of the single-thread threshold (multi_tensor.hpp).
template <class F>
void run(const CallBuffers& cb, std::size_t weight, F&& f) {
  py::gil_scoped_release nogil;
  for_each_span(cb.sizes(), weight, f);
}

// Step counts of this update, one per tensor: an int for all, or a list or tuple of ints >= 1.
std::vector<std::int64_t> step_counts(py::handle steps, const CallBuffers& cb) {
  std::vector<std::int64_t> out(cb.count());
  auto check = [&](py::handle v, std::size_t i) -> std::int64_t {
    py::object number;  // a plain int, or the int a NumPy integer stands for
    if (PyLong_CheckExact(v.ptr())) {
      number = py::reinterpret_borrow<py::object>(v);
    } else if (!PyBool_Check(v.ptr()) && PyIndex_Check(v.ptr())) {
      number = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
      if (!number) throw py::error_already_set();
    } else {
      throw py::type_error(cb.label("steps", i) + " must be an int, got " + type_name(v));
    }
    int overflow = 0;
    const long long s = PyLong_AsLongLongAndOverflow(number.ptr(), &overflow);
    if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (overflow != 0) {
      throw py::value_error(cb.label("steps", i) + " is out of range: it must fit in 64 bits");
    }
    if (s < 1) throw py::value_error(cb.label("steps", i) + " must be >= 1, got " + std::to_string(s));
    return s;
  };
  if (!PyList_Check(steps.ptr()) && !PyTuple_Check(steps.ptr())) {
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

GradientPrep gradient_prep(double weight_decay, double grad_scale) {
  GradientPrep prep{};
  prep.grad_scale = static_cast<float>(grad_scale);
  prep.weight_decay = static_cast<float>(weight_decay);
  prep.has_weight_decay = weight_decay != 0.0;  // in double, as torch decides it
  return prep;
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
  SgdStep base{};
  base.lr = static_cast<float>(lr);
  base.momentum = static_cast<float>(momentum);
  base.dampening_keep = static_cast<float>(1.0 - dampening);
  base.grad = gradient_prep(weight_decay, grad_scale);
  base.nesterov = nesterov;
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING, [&](std::size_t t, std::size_t b, std::size_t e) {
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
  RmspropStep s{};
  s.lr = static_cast<float>(lr);
  s.alpha = static_cast<float>(alpha);
  s.one_minus_alpha = static_cast<float>(1.0 - alpha);
  s.eps = static_cast<float>(eps);
  s.momentum = static_cast<float>(momentum);
  s.grad = gradient_prep(weight_decay, grad_scale);
  const KernelTable& k = kernels();
  run(cb, WEIGHT_DIVIDES, [&](std::size_t t, std::size_t b, std::size_t e) {
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
  AdagradStep base{};
  base.eps = static_cast<float>(eps);
  base.grad = gradient_prep(weight_decay, grad_scale);
  std::vector<AdagradStep> per_tensor(cb.count(), base);
  for (std::size_t t = 0; t < cb.count(); ++t) {
    per_tensor[t].clr = static_cast<float>(lr / (1.0 + static_cast<double>(step[t] - 1) * lr_decay));
  }
  const KernelTable& k = kernels();
  run(cb, WEIGHT_DIVIDES, [&](std::size_t t, std::size_t b, std::size_t e) {
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
  AdadeltaStep s{};
  s.lr = static_cast<float>(lr);
  s.rho = static_cast<float>(rho);
  s.one_minus_rho = static_cast<float>(1.0 - rho);
  s.eps = static_cast<float>(eps);
  s.grad = gradient_prep(weight_decay, grad_scale);
  const KernelTable& k = kernels();
  run(cb, WEIGHT_DIVIDES, [&](std::size_t t, std::size_t b, std::size_t e) {
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
  base.decoupled_decay = static_cast<float>(1.0 - lr * weight_decay);
  base.grad = gradient_prep(weight_decay, grad_scale);
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
  run(cb, WEIGHT_DIVIDES, [&](std::size_t t, std::size_t b, std::size_t e) {
    k.adam(per_tensor[t], cb.param(t) + b, g[t] + b, m[t] + b, v[t] + b, at(vmax, t, b), e - b);
  });
}

// ------------------------------------------------------------------------------------------------
// Gradient norms and clipping

// Elements per block of a norm. Blocks are reduced independently (in parallel) and then added up
// in a fixed order, so a norm does not depend on the number of threads.
constexpr std::size_t NORM_BLOCK = 4096;

double nan_max(double a, double b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

// Per-array norms and the total norm of all arrays together (torch.linalg.vector_norm of their
// concatenation), from one read pass over the data.
std::pair<std::vector<double>, double> compute_norms(const CallBuffers& cb, double p) {
  if (!(p > 0.0)) throw py::value_error("norm_type must be > 0 or inf, got " + std::to_string(p));
  struct Block {
    std::size_t tensor, begin, size;
  };
  std::vector<Block> blocks;
  for (std::size_t t = 0; t < cb.count(); ++t) {
    for (std::size_t b = 0; b < cb.sizes()[t]; b += NORM_BLOCK) {
      blocks.push_back({t, b, std::min(NORM_BLOCK, cb.sizes()[t] - b)});
    }
  }
  std::vector<double> partial(blocks.size());
  const KernelTable& k = kernels();
  const float* const* data = cb.first().data();
  auto reduce = [&](std::size_t lo, std::size_t hi) {
    for (std::size_t i = lo; i < hi; ++i) {
      partial[i] = k.norm_block(data[blocks[i].tensor] + blocks[i].begin, blocks[i].size, p);
    }
  };
  {
    py::gil_scoped_release nogil;
    parallel_for(blocks.size(), NORM_BLOCK, reduce);
  }
  const bool is_max = std::isinf(p);
  std::vector<double> per_tensor(cb.count(), 0.0);
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    double& acc = per_tensor[blocks[i].tensor];
    acc = is_max ? nan_max(acc, partial[i]) : acc + partial[i];
  }
  double total = 0.0;
  for (double v : per_tensor) total = is_max ? nan_max(total, v) : total + v;
  auto root = [&](double acc) {
    if (is_max || p == 1.0) return acc;
    return p == 2.0 ? std::sqrt(acc) : std::pow(acc, 1.0 / p);
  };
  for (double& v : per_tensor) v = root(v);
  return {per_tensor, root(total)};
}

py::tuple grad_norms(py::handle grads, double norm_type, py::handle positions) {
  CallBuffers cb(grads, "grads", Access::read, positions);
  auto [per_tensor, total] = compute_norms(cb, norm_type);
  return py::make_tuple(py::array_t<double>(per_tensor.size(), per_tensor.data()), total);
}

void scale_grads(py::handle grads, double factor) {
  CallBuffers cb(grads, "grads", Access::write, py::none());
  cb.check_disjoint();  // two views of one buffer would be scaled twice
  const auto c = static_cast<float>(factor);
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING,
      [&](std::size_t t, std::size_t b, std::size_t e) { k.scale(cb.param(t) + b, e - b, c); });
}

void clamp_grads(py::handle grads, double lo, double hi) {
  CallBuffers cb(grads, "grads", Access::write, py::none());
  cb.check_disjoint();
  const auto l = static_cast<float>(lo), h = static_cast<float>(hi);
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING, [&](std::size_t t, std::size_t b, std::size_t e) {
    k.clamp(cb.param(t) + b, e - b, l, h);
  });
}

// a += s * b over lists of arrays, threaded like the optimizer kernels: the benchmark's yardstick.
void stream_axpy(py::handle a, py::handle b, double s) {
  CallBuffers cb(a, "a", Access::write, py::none());
  const auto bs = cb.add(b, "b", Access::read);
  cb.check_disjoint();
  const auto f = static_cast<float>(s);
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING, [&](std::size_t t, std::size_t lo, std::size_t hi) {
    k.axpy(cb.param(t) + lo, bs[t] + lo, f, hi - lo);
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
    throw py::value_error("set_num_threads: n must be >= 1, got " + py::str(number).cast<std::string>());
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
  m.def("set_num_threads", &set_num_threads_checked, py::arg("n"),
        "Sets the threads a large update uses: an int from 1 to build_info()['max_threads'].");
  m.def("build_info", &build_info, "Version, compiler, threading and the flags of each ISA build.");
  m.def("_set_min_elements_per_thread", &set_min_elements_per_thread, py::arg("n"),
        "Testing hook: the smallest share of elements worth a thread of its own.");
  m.def("_min_elements_per_thread", &min_elements_per_thread);
  m.def("_set_chunk_elements", &set_chunk_elements, py::arg("n"),
        "Testing hook: elements per chunk of a multi-threaded call (0: chosen by size).");
  m.def("_fail_thread_creation_after", &pool::fail_thread_creation_after, py::arg("k"),
        "Testing hook: creating a helper thread fails after k more (k < 0: never).");
  m.def("_pool_helpers", &pool::helpers, "Testing hook: helper threads this process started.");
  m.def("_set_spin_us", &pool::set_spin_us, py::arg("us"),
        "Benchmark hook: how long an idle helper looks for work before it sleeps.");
  m.def("_spin_us", &pool::spin_us);
  m.def("_parse_thread_count", [](const std::string& s) { return pool::parse_thread_count(s.c_str()); });
  m.def("_cpus_from_cpu_max", &pool::cpus_from_cpu_max);
  m.def("_cpus_from_cfs", &pool::cpus_from_cfs);
  m.def("_affinity_cpus", &pool::affinity_cpus);
  m.def("_quota_cpus", &pool::quota_cpus);

  m.def("check_params", &check_params, py::arg("params"),
        "Validates params as distinct, writeable, C-contiguous float32 arrays.");
  m.def("check_grads", &check_grads, py::arg("params"), py::arg("grads"), py::kw_only(),
        py::arg("positions") = py::none(),
        "Validates grads against params without running anything.");

  m.def("grad_norms", &grad_norms, py::arg("grads"), py::arg("norm_type"), py::kw_only(),
        py::arg("positions") = py::none(),
        "(per-array norms as a float64 array, total norm) of a list of float32 arrays.");
  m.def("scale_", &scale_grads, py::arg("grads"), py::arg("factor"),
        "Multiplies every array by factor (rounded to float32) in place.");
  m.def("clamp_", &clamp_grads, py::arg("grads"), py::arg("lo"), py::arg("hi"),
        "Clamps every array to [lo, hi] in place; NaN stays NaN.");
  m.def("stream_axpy", &stream_axpy, py::arg("a"), py::arg("b"), py::arg("s"),
        "a[i] += s * b[i] over lists of float32 arrays (the benchmark's bandwidth yardstick).");
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
