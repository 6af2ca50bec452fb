// Gradient norms and clipping (_core.grad_norms, scale_, clamp_), the benchmark's yardstick
// (stream_axpy) and the array checks the optimizer classes run on their own (check_params,
// check_grads).
#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "bindings/norms.hpp"
#include "dispatch.hpp"
#include "multi_tensor.hpp"

namespace optkern {
namespace {

// Runs f(tensor, begin, end) over the call's elements with the GIL released. weight: the work of
// one element, in the units of the single-thread threshold (multi_tensor.hpp).
template <class F>
void run(const Buffers& cb, std::size_t weight, F&& f) {
  py::gil_scoped_release nogil;
  for_each_span(cb.sizes(), weight, f);
}

// Array x from element `begin` on.
void* element(const ArrayRef& x, std::size_t begin) {
  return static_cast<char*>(x.data) + begin * dtype_size(x.type);
}
const NormKernels& norm_kernels(const KernelTable& k, DType type) {
  return k.norms[static_cast<int>(type)];
}

// Elements per block of a norm. Blocks are reduced independently (in parallel) and then added up
// in a fixed order, so a norm does not depend on the number of threads.
constexpr std::size_t NORM_BLOCK = 4096;

double nan_max(double a, double b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

std::pair<std::vector<double>, double> compute_norms(const Buffers& cb, double p) {
  return compute_norms(cb.first().data(), cb.sizes().data(), cb.count(), p);
}

}  // namespace

std::pair<std::vector<double>, double> compute_norms(const ArrayRef* arrays,
                                                     const std::size_t* sizes, std::size_t count,
                                                     double p) {
  if (!(p > 0.0)) throw py::value_error("norm_type must be > 0 or inf, got " + std::to_string(p));
  struct Block {
    std::size_t tensor, begin, size;
  };
  std::vector<Block> blocks;
  for (std::size_t t = 0; t < count; ++t) {
    for (std::size_t b = 0; b < sizes[t]; b += NORM_BLOCK) {
      blocks.push_back({t, b, std::min(NORM_BLOCK, sizes[t] - b)});
    }
  }
  std::vector<double> partial(blocks.size());
  const KernelTable& k = kernels();
  auto reduce = [&](std::size_t lo, std::size_t hi) {
    for (std::size_t i = lo; i < hi; ++i) {
      const ArrayRef& x = arrays[blocks[i].tensor];
      partial[i] =
          norm_kernels(k, x.type).norm_block(element(x, blocks[i].begin), blocks[i].size, p);
    }
  };
  if (blocks.size() * NORM_BLOCK >= min_elements_per_thread()) {  // long enough to split
    py::gil_scoped_release nogil;
    parallel_for(blocks.size(), NORM_BLOCK, reduce);
  } else {
    parallel_for(blocks.size(), NORM_BLOCK, reduce);
  }
  const bool is_max = std::isinf(p);
  std::vector<double> per_tensor(count, 0.0);
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

namespace {

py::tuple grad_norms(py::handle grads, double norm_type, py::handle positions) {
  Buffers cb(grads, "grads", Access::read, positions_of(positions), NORM_ARRAYS);
  auto [per_tensor, total] = compute_norms(cb, norm_type);
  return py::make_tuple(py::array_t<double>(per_tensor.size(), per_tensor.data()), total);
}

void scale_grads(py::handle grads, double factor) {
  Buffers cb(grads, "grads", Access::write, {}, NORM_ARRAYS);
  cb.check_disjoint();  // two views of one buffer would be scaled twice
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING, [&](std::size_t t, std::size_t b, std::size_t e) {
    const ArrayRef& x = cb.first()[t];
    norm_kernels(k, x.type).scale(element(x, b), e - b, factor);
  });
}

void clamp_grads(py::handle grads, double lo, double hi) {
  Buffers cb(grads, "grads", Access::write, {}, NORM_ARRAYS);
  cb.check_disjoint();
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING, [&](std::size_t t, std::size_t b, std::size_t e) {
    const ArrayRef& x = cb.first()[t];
    norm_kernels(k, x.type).clamp(element(x, b), e - b, lo, hi);
  });
}

// a += s * b over lists of arrays, threaded like the optimizer kernels: the benchmark's yardstick.
void stream_axpy(py::handle a, py::handle b, double s) {
  Buffers cb(a, "a", Access::write, {}, FLOAT32);
  const auto bs = cb.add(b, "b", Access::read, FLOAT32);
  cb.check_disjoint();
  const auto f = static_cast<float>(s);
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING, [&](std::size_t t, std::size_t lo, std::size_t hi) {
    k.axpy(static_cast<float*>(cb.first()[t].data) + lo, static_cast<const float*>(bs[t].data) + lo,
           f, hi - lo);
  });
}

void check_params(py::handle params) {
  Buffers cb(params, "params", Access::write, {}, PARAMS);
  cb.check_disjoint();
}

void check_grads(py::handle params, py::handle grads, py::handle positions) {
  Buffers cb(params, "params", Access::write, positions_of(positions), PARAMS);
  cb.add(grads, "grads", Access::read, GRADS);
  cb.check_disjoint();
}

}  // namespace

void define_norms(py::module_& m) {
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
}

}  // namespace optkern
