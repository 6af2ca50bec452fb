// The vocabulary of a rule's host declaration (the host part of each rules/<name>.inc):
// hyperparameters with their ranges, state buffers, carried numbers, the helpers a rule's scalars
// function uses to turn hyperparameters and a step count into the scalars of its kernel, and the
// declaration itself (RuleDecl). Host code only.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernel_api.hpp"

namespace optkern {

// Bytes per element of an array of this type (q8: its codes; the absmax per block is apart).
inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64:
      return 8;
    case DType::bf16:
    case DType::f16:
      return 2;
    case DType::q8:
      return 1;
    case DType::f32:
      break;
  }
  return 4;
}

// The states dict of _core.step and the state dicts name a q8 state's absmax per block
// "<state>_absmax" (optkern.functional: "<state list>_absmax"), and a 16-bit parameter's float32
// master copy "master_param" ("master_params").
constexpr const char* ABSMAX_SUFFIX = "_absmax";
constexpr const char* MASTER_STATE = "master_param";

// Blocks of a q8 state of n elements (one absmax each).
inline std::size_t q8_blocks(std::size_t n) { return (n + Q8_BLOCK - 1) / Q8_BLOCK; }

// What values a hyperparameter takes. Every real one is also finite and at most float32's
// largest value in magnitude (float32 parameters are computed in float32).
enum class Range {
  nonnegative,  // [0, inf)
  unit,         // [0, 1]
  unit_open,    // [0, 1)
  open_unit,    // (0, 1): a factor that must shrink (Rprop's etaminus)
  above_one,    // (1, inf): a factor that must grow (Rprop's etaplus)
  one_or_more,  // [1, inf) (Adafactor's clipping threshold d)
  nonpositive,  // (-inf, 0] (Adafactor's beta2_decay)
  flag,         // a bool
};

// A real hyperparameter that also takes None (torch's `eps=(None, 1e-3)` for Adafactor): None
// stands for a value the rule's scalars function picks (Hyper::is_none; Adafactor's eps1: the
// compute type's machine epsilon), `value` for float32, which _core.rules() reports; the default
// is None when `none_default` is set.
struct NoneMeans {
  bool allowed;
  double value;       // what None stands for in float32
  bool none_default;  // the declared default is None (default_value is then unused)
};

// How a hyperparameter given as None is kept among the validated values: a NaN (every other
// value is finite), which Hyper turns back into NoneMeans::value or reports by is_none.
constexpr double NONE_VALUE = std::numeric_limits<double>::quiet_NaN();

struct HyperDecl {
  const char* name;  // as _core.step and optkern.functional take it
  Range range;
  double default_value;  // flags: 0 or 1
  const char* torch;     // torch.optim's argument ("betas" for beta1 and beta2)
  int slot;              // -1, or the position in torch's tuple argument
  NoneMeans none = {false, 0.0, false};
  // An option that torch.optim's class of the same name lacks (a textbook form: Adagrad's
  // eps_inside_sqrt): optkern's class and function take it; optkern.torch keeps torch's
  // signature, so its groups run the declared default.
  bool optkern_only = false;
};

// The shape of a state array, from its parameter's shape (dims[0..nd)):
enum class StateShape {
  like_param,  // the parameter's shape (every rule's states before Adafactor)
  rows,        // nd >= 2 only: dims[:-1] + (1,), one number per row (Adafactor's row_var)
  cols,        // nd >= 2 only: dims[:-2] + (1, dims[-1]), one per column (col_var)
  unfactored,  // nd <= 1 only: the parameter's shape (Adafactor's variance)
};

struct StateDecl {
  const char* name;  // torch's state name (exp_avg), also the key of _core.step's states dict
  const char* arg;   // optkern.functional's list argument (exp_avgs)
  const char* when;  // nullptr: always; else the hyperparameter that must be nonzero / True
  const char* init;  // nullptr: starts at zero; else the hyperparameter it starts at
  StateShape shape = StateShape::like_param;
};

// Whether a state of this shape kind exists for a parameter of nd dimensions (a state that does
// not apply is absent from the parameter's state dict, and None in optkern.functional's list).
inline bool state_applies(StateShape s, int nd) {
  switch (s) {
    case StateShape::rows:
    case StateShape::cols:
      return nd >= 2;
    case StateShape::unfactored:
      return nd <= 1;
    case StateShape::like_param:
      break;
  }
  return true;
}

// The shape of a state of kind s for a parameter of shape dims[0..nd) (the kind must apply): the
// one definition every layer uses (Buffers checks arrays against it; Python creates and loads
// states through _core.state_shape).
template <class Dim>
void state_dims(StateShape s, const Dim* dims, int nd, Dim* out) {
  for (int i = 0; i < nd; ++i) out[i] = dims[i];
  if (s == StateShape::rows) out[nd - 1] = 1;
  if (s == StateShape::cols) out[nd - 2] = 1;
}

inline const char* state_shape_name(StateShape s) {
  switch (s) {
    case StateShape::rows:
      return "rows";
    case StateShape::cols:
      return "cols";
    case StateShape::unfactored:
      return "unfactored";
    case StateShape::like_param:
      break;
  }
  return "like_param";
}

// A number per parameter that a rule carries from step to step, in double (NAdam's mu_product,
// ASGD's eta and mu). Why not recompute it from the step count: NAdam's running product would
// drift from torch's after a load (torch keeps the product, not the factors), and ASGD's eta is
// the rate the previous step computed from the lr of that step, so an lr changed by a schedule
// takes effect one step late, as in torch. It lives in the parameter's state under torch's name;
// the rule's scalars function reads the previous value from StepInfo::carried and writes the
// next one there.
struct CarriedDecl {
  const char* name;       // torch's state name (mu_product), a float in the state dict
  const char* arg;        // optkern.functional's list argument (mu_products), updated in place
  double init;            // its value before the first step, unless init_from is set
  const char* init_from;  // nullptr, or the hyperparameter it starts at (ASGD's eta: lr)
};

// A bad hyperparameter, or a per-step scalar the compute type cannot hold: ValueError in Python.
struct HyperError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A rule's validated hyperparameters, looked up by name.
class Hyper {
 public:
  Hyper(const HyperDecl* decl, std::size_t count, const double* values)
      : decl_(decl), count_(count), values_(values) {}
  // Its value; for one given as None, the value None stands for in float32.
  double operator[](const char* name) const {
    const std::size_t i = index(name);
    return std::isnan(values_[i]) ? decl_[i].none.value : values_[i];
  }
  bool flag(const char* name) const { return (*this)[name] != 0.0; }
  // Whether it was given as None (or left at a default of None).
  bool is_none(const char* name) const { return std::isnan(values_[index(name)]); }

 private:
  std::size_t index(const char* name) const {
    for (std::size_t i = 0; i < count_; ++i) {
      if (std::strcmp(decl_[i].name, name) == 0) return i;
    }
    throw std::logic_error(std::string("optkern: no hyperparameter ") + name);
  }

  const HyperDecl* decl_;
  std::size_t count_;
  const double* values_;
};

inline std::string number_str(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

// For a rule's check function: hyperparameters `lo` <= `hi` (e.g. Rprop's step_size_min and
// step_size_max, torch's argument `torch`), refused otherwise.
inline void require_order(const Hyper& h, const char* lo, const char* hi, const char* torch) {
  if (!(h[lo] <= h[hi])) {
    throw HyperError(std::string(torch) + ": " + lo + " must be <= " + hi + ", got " +
                     number_str(h[lo]) + " > " + number_str(h[hi]));
  }
}

template <class R>
constexpr const char* real_name() {
  return std::is_same_v<R, float> ? "float32" : "float64";
}

// One tensor's step: its number (1 on the first), the gradient scale, and the checked rounding
// of every derived scalar to the compute type R (float32, or float64 for float64 parameters).
struct StepInfo {
  const char* rule;  // the class name, for messages
  std::int64_t step;
  bool first;
  double grad_scale;
  // The parameter's carried numbers (CarriedDecl), in declaration order: the scalars function
  // reads the values after the previous step and overwrites them with the values after this one.
  // nullptr for a rule that declares none.
  double* carried = nullptr;

  // v rounded to R, or HyperError when R cannot hold it (torch raises there too, rather than
  // fill every parameter with Inf or NaN).
  template <class R>
  R real(double v, const char* what) const {
    const R r = static_cast<R>(v);
    if (!std::isfinite(r)) {
      throw HyperError(std::string(rule) + ": " + what + " is " + number_str(v) + " at step " +
                       std::to_string(step) + ", which " + real_name<R>() +
                       " cannot hold; nothing was changed (use a smaller lr or "
                       "betas further from 1)");
    }
    return r;
  }
  template <class R>
  GradientPrep<R> grad(double weight_decay) const {
    GradientPrep<R> prep{};
    prep.grad_scale = static_cast<R>(grad_scale);
    prep.weight_decay = real<R>(weight_decay, "weight_decay");
    prep.has_weight_decay = weight_decay != 0.0;  // in double, as torch decides it
    return prep;
  }
  static double pow(double x, double y) { return std::pow(x, y); }
  static double sqrt(double x) { return std::sqrt(x); }
};

// The lerp form for weight w, as torch's lerp in R picks it (see Lerp).
template <class R>
Lerp<R> lerp_weight(double w) {
  const R wr = static_cast<R>(w);
  Lerp<R> l{};
  const bool from_start = std::fabs(wr) < R(0.5);
  l.from_start = from_start ? R(1) : R(0);
  l.coeff = from_start ? wr : wr - R(1);
  return l;
}

// One array of a factored kernel, as the rule's host step between two passes sees it (RuleDecl's
// `between`). An array of >= 2 dimensions is factored: `batch` matrices of rows x cols (its last
// two dimensions); an array of <= 1 dimension is not (batch 0). States and the numbers per row and
// column are in the compute type R of the rule's host step.
struct FactoredArray {
  const double* sums;      // the pass's sums over the whole array (tile sums in tile order)
  const double* row_sums;  // after pass 0, factored: [batch * rows] sums of the pass's rows
  const double* col_sums;  // after pass 0, factored: [batch * cols] sums of its columns
  void* const* state;      // the array's state buffers, whole (nullptr where absent)
  std::size_t batch, rows, cols, numel;
  void* per_row;  // [batch * rows]: a number per row that the later passes read
  void* per_col;  // [batch * cols]: a number per column that the later passes read
  // After pass 0, factored: [batch] one number per matrix. `between` finds in it the sum, over
  // the matrix's row ranges in order, of what stage 0 of `between_range` returned for them; what
  // it leaves there, stage 1 reads.
  double* per_matrix;
  bool factored;
};

// What a rule does with step counts.
enum class Steps {
  first_only,  // no count in the state; step 1 only marks a buffer's first update (SGD)
  counted,     // each parameter's state counts its steps; the kernel does not use them
  used,        // counted, and the per-step scalars depend on them (bias corrections)
};

// -- the declaration ------------------------------------------------------------------------------

// The host functions of a rule, type-erased (void* is the rule's scalars struct for one compute
// type); per_real below builds them from a rule's function templates.
using ScalarsFn = void (*)(const Hyper&, const StepInfo&, void* scalars);
using PerArrayFn = void (*)(const double* sums, void* scalars);
using BetweenFn = void (*)(int pass, const FactoredArray&, void* scalars);
using BetweenRangeFn = double (*)(int stage, const FactoredArray&, std::size_t matrix, bool rows,
                                  std::size_t lo, std::size_t hi, const void* scalars);

// One host function per compute type: [0] float32, [1] float64.
template <class Fn>
struct PerReal {
  Fn f32 = nullptr;
  Fn f64 = nullptr;
  // Whether the rule declares the function. A flag, not `f32 != nullptr`: GCC does not treat a
  // function's address compared with null as a constant under -fsanitize, and
  // rules/host.cpp's static_assert reads this.
  bool declared = false;
  constexpr Fn operator[](bool is_f64) const { return is_f64 ? f64 : f32; }
  constexpr explicit operator bool() const { return declared; }
};

namespace detail {
template <class Fn, Fn F>
struct Erase;
template <class S, void (*F)(const Hyper&, const StepInfo&, S&)>
struct Erase<void (*)(const Hyper&, const StepInfo&, S&), F> {
  using Fn = ScalarsFn;
  static void call(const Hyper& h, const StepInfo& t, void* s) { F(h, t, *static_cast<S*>(s)); }
};
template <class S, void (*F)(const double*, S&)>
struct Erase<void (*)(const double*, S&), F> {
  using Fn = PerArrayFn;
  static void call(const double* sums, void* s) { F(sums, *static_cast<S*>(s)); }
};
template <class S, void (*F)(int, const FactoredArray&, S&)>
struct Erase<void (*)(int, const FactoredArray&, S&), F> {
  using Fn = BetweenFn;
  static void call(int pass, const FactoredArray& a, void* s) { F(pass, a, *static_cast<S*>(s)); }
};
template <class S, double (*F)(int, const FactoredArray&, std::size_t, bool, std::size_t,
                               std::size_t, const S&)>
struct Erase<double (*)(int, const FactoredArray&, std::size_t, bool, std::size_t, std::size_t,
                        const S&),
             F> {
  using Fn = BetweenRangeFn;
  static double call(int stage, const FactoredArray& a, std::size_t m, bool rows, std::size_t lo,
                     std::size_t hi, const void* s) {
    return F(stage, a, m, rows, lo, hi, *static_cast<const S*>(s));
  }
};
template <auto F>
using Erased = Erase<decltype(F), F>;
}  // namespace detail

// A rule's host function in its float32 and float64 forms, type-erased: per_real<f<float>,
// f<double>> for a function template f taking the rule's scalars struct (a scalars function, a
// per_array, between or between_range function).
template <auto F32, auto F64>
constexpr PerReal<typename detail::Erased<F32>::Fn> per_real = {&detail::Erased<F32>::call,
                                                                &detail::Erased<F64>::call, true};

// One rule: what _core.rules() exports and _core.step runs. Declared with designated
// initializers in its file's host part (fields in this order; the optional ones may be left out).
// How a rule takes a row-sparse gradient (optkern.RowSparse: some rows of a parameter listed, the
// others zero), with torch's semantics for sparse gradients. By default it refuses one, as torch's
// optimizers refuse sparse gradients (Adam: "please consider SparseAdam instead").
struct RowsDecl {
  bool accepted = false;
  // A hyperparameter that, when nonzero, makes the update touch every row, with a zero gradient
  // for the rows not listed (SGD's momentum: torch's buffer decays on every row). Otherwise only
  // the listed rows are touched, each once, with its duplicates summed (a lazy update: the other
  // rows and their state are left as they are).
  const char* dense_when = nullptr;
  // A hyperparameter that, when nonzero, refuses a row-sparse gradient (weight decay: torch
  // refuses it with sparse gradients).
  const char* refused_when = nullptr;
};

struct RuleDecl {
  const char* name;  // functional name: optkern.functional.<name>_
  const char* cls;   // class name: optkern.<cls>
  Steps steps;
  std::span<const HyperDecl> hyper;
  std::span<const StateDecl> states;
  std::span<const CarriedDecl> carried = {};  // numbers per parameter carried between steps
  void (*check)(const Hyper&) = nullptr;      // constraints between hyperparameters, if any
  // The per-step scalars from the hyperparameters and the step (and the carried numbers).
  PerReal<ScalarsFn> scalars;
  // Rules whose kernel has a reduction pass (KernelDecl::reduce_sums): turns one array's sums into
  // that array's scalars (a copy of its step's scalars). Empty for the others.
  PerReal<PerArrayFn> per_array = {};
  // Rules on a factored kernel (KernelDecl::passes): after pass `pass` (0, 1, ...) over an array,
  // the host step that turns the array's sums into its scalars for the next pass (and may write
  // its small states: Adafactor's row and column factors). Empty for the others.
  PerReal<BetweenFn> between = {};
  // Their work per row and per column after pass 0, in parallel over ranges fixed by the shape
  // alone: stage 0 on rows (rows = true) or columns [lo, hi) of matrix `matrix` before `between`
  // (its sums, a.row_sums and a.col_sums, complete over those rows or columns), stage 1 after it.
  // What stage 0 returns for a range of rows is added per matrix into a.per_matrix.
  PerReal<BetweenRangeFn> between_range = {};
  // Its work per element when less than its kernel's (KernelDecl::weight; 0: the kernel's):
  // Schedule-Free SGD takes its kernel's path without the square root and division.
  std::size_t weight = 0;
  // The learning rate the examples train this rule at (optkern.examples: the best of
  // `python -m optkern.examples.mlp --sweep` on their MLP); 0: the rule is not in the examples'
  // default comparison (they take it by name, at its default lr).
  double example_lr = 0;
  // What benchmarks compare the rule with where torch.optim has no class of its name: a
  // "module.name" (a torch optimizer class, or a function such as optax's that makes one),
  // optionally with its arguments given as the class's own (torch's names), "torch.optim.SGD(
  // momentum=beta, dampening=beta)"; nullptr: torch.optim.<cls>, or none known.
  const char* peer = nullptr;
  const char* doc = "";  // the formulas, for the class docstring
  RowsDecl rows = {};    // row-sparse gradients: refused unless declared
};

// Whether a rule file's declarations fit its kernel: a reduction pass needs per_array, a factored
// kernel between and between_range, and only those (rules/host.cpp asserts it).
constexpr bool fits_kernel(const RuleDecl& r, const KernelDecl& k) {
  return (k.reduce_sums > 0) == static_cast<bool>(r.per_array) &&
         (k.passes > 0) == static_cast<bool>(r.between) &&
         (k.passes > 0) == static_cast<bool>(r.between_range) && r.states.size() <= k.states &&
         k.states <= MAX_STATES;
}

}  // namespace optkern
