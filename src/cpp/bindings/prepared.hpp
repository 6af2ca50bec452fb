// _core.prepare, _core.run and _core.step: one group's update validated whole (arrays,
// hyperparameters, step counts, per-step scalars) into an Update (update.hpp) before anything is
// written, then run with the GIL released, then its bookkeeping (step counts, carried numbers)
// recorded with no Python code in between.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "bindings/arrays.hpp"
#include "bindings/row_grads.hpp"
#include "update.hpp"

namespace optkern {

class Prepared {
 public:
  Prepared(const Rule& rule, py::handle params, py::handle grads, py::handle states,
           py::handle hyper, py::handle steps, double grad_scale, py::handle positions,
           py::handle isa, py::handle record, py::handle noise_seed = py::none());

  // Whether the kernels take long enough to let other Python threads run meanwhile: a call below
  // the threshold of a second thread takes microseconds, less than handing the GIL over and back
  // (and another thread holding it can make that wait last a whole switch interval, 5 ms).
  bool worth_releasing_gil() const;

  // The kernels, with the GIL released by the caller (or held, for a short call).
  void run_kernels() const { run_update(update_); }

  // The step's bookkeeping (GIL held, no Python code runs): each state dict's step count.
  // The carried numbers go back into the lists they came from (and the state dicts).
  void record() const;

  bool used = false;

 private:
  friend class StepPlan;  // re-runs a prepared update with new gradients and step counts

  // The noise keys of the tensors rounded stochastically, for the step whose noise seed is
  // `seed` (each keyed by it and by the tensor's position).
  void seed_noise(std::uint64_t seed);

  // The per-step scalars of steps_ (and carried_in_) under h_ and grad_scale_, into update_;
  // carried_ gets the carried numbers after this step. A scalar the compute type cannot hold:
  // ValueError.
  void compute_scalars();

  const Rule& rule_;
  std::vector<double> h_;    // the hyperparameters, maximize last
  double grad_scale_ = 1.0;  // with maximize's sign
  std::unique_ptr<Buffers> buffers_;
  std::vector<RowGrad> row_grads_;  // the row-sparse gradients (update_.rows points into them)
  Update update_;
  std::vector<std::int64_t> steps_;
  std::optional<std::uint64_t> noise_seed_;  // stochastic rounding: the seed this step was given
  std::optional<py::list> record_;
  std::vector<py::list> carried_lists_;          // the caller's lists, written back by record()
  std::vector<std::vector<double>> carried_in_;  // [k][t]: the values before the step
  std::vector<double> carried_;                  // [t * nc + k]: the values after it
};

// The interned str of a name declared in C++ (a state's, "step"): made once per name, so a dict
// lookup by it hashes nothing and compares pointers first.
PyObject* key_of(const char* name);

// The kernel table of the ISA build named `isa` (None: the active one), or ValueError.
const KernelTable& table_for(py::handle isa);

void define_prepared(py::module_& m);

}  // namespace optkern
