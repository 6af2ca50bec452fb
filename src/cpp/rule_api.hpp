// The vocabulary of a rule's host declaration (rules.hpp): hyperparameters with their ranges,
// state buffers, and the helpers a rule's scalars function uses to turn hyperparameters and a
// step count into the float scalars of its kernel. Host code only.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernel_api.hpp"

namespace optkern {

// What values a hyperparameter takes. Every real one is also finite and at most float32's
// largest value in magnitude (the kernels compute in float32).
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

// A real hyperparameter that also takes None (torch's `eps=(None, 1e-3)` for Adafactor):
// None stands for `none_means`, and the default is None when `none_default` is set.
struct NoneMeans {
  bool allowed;
  double value;       // what None stands for
  bool none_default;  // the declared default is None (default_value is then unused)
};

struct HyperDecl {
  const char* name;  // as _core.step and optkern.functional take it
  Range range;
  double default_value;  // flags: 0 or 1
  const char* torch;     // torch.optim's argument ("betas" for beta1 and beta2)
  int slot;              // -1, or the position in torch's tuple argument
  NoneMeans none = {false, 0.0, false};
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

// A bad hyperparameter, or a per-step scalar float32 cannot hold: ValueError in Python.
struct HyperError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A rule's validated hyperparameters, looked up by name.
class Hyper;
// For a rule's check function: hyperparameters `lo` <= `hi` (e.g. Rprop's step_size_min and
// step_size_max, torch's argument `torch`), refused otherwise.
inline void require_order(const Hyper& h, const char* lo, const char* hi, const char* torch);

class Hyper {
 public:
  Hyper(const HyperDecl* decl, std::size_t count, const double* values)
      : decl_(decl), count_(count), values_(values) {}
  double operator[](const char* name) const {
    for (std::size_t i = 0; i < count_; ++i) {
      if (std::strcmp(decl_[i].name, name) == 0) return values_[i];
    }
    throw std::logic_error(std::string("optkern: no hyperparameter ") + name);
  }
  bool flag(const char* name) const { return (*this)[name] != 0.0; }

 private:
  const HyperDecl* decl_;
  std::size_t count_;
  const double* values_;
};

inline std::string number_str(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

inline void require_order(const Hyper& h, const char* lo, const char* hi, const char* torch) {
  if (!(h[lo] <= h[hi])) {
    throw HyperError(std::string(torch) + ": " + lo + " must be <= " + hi + ", got " +
                     number_str(h[lo]) + " > " + number_str(h[hi]));
  }
}

// One tensor's step: its number (1 on the first), the gradient scale, and the checked rounding
// of every derived scalar to float32.
struct StepInfo {
  const char* rule;  // the class name, for messages
  std::int64_t step;
  bool first;
  double grad_scale;
  // The parameter's carried numbers (CarriedDecl), in declaration order: the scalars function
  // reads the values after the previous step and overwrites them with the values after this one.
  // nullptr for a rule that declares none.
  double* carried = nullptr;

  // v as float32, or HyperError when float32 cannot hold it (torch raises there too, rather than
  // fill every parameter with Inf or NaN).
  float f32(double v, const char* what) const {
    const float f = static_cast<float>(v);
    if (!std::isfinite(f)) {
      throw HyperError(std::string(rule) + ": " + what + " is " + number_str(v) + " at step " +
                       std::to_string(step) +
                       ", which float32 cannot hold; nothing was changed (use a smaller lr or "
                       "betas further from 1)");
    }
    return f;
  }
  GradientPrep grad(double weight_decay) const {
    GradientPrep prep{};
    prep.grad_scale = static_cast<float>(grad_scale);
    prep.weight_decay = f32(weight_decay, "weight_decay");
    prep.has_weight_decay = weight_decay != 0.0;  // in double, as torch decides it
    return prep;
  }
  static double pow(double x, double y) { return std::pow(x, y); }
  static double sqrt(double x) { return std::sqrt(x); }
};

// The lerp form for weight w, as torch's float32 lerp picks it (see Lerp).
inline Lerp lerp_weight(double w) {
  const float wf = static_cast<float>(w);
  Lerp l{};
  const bool from_start = std::fabs(wf) < 0.5f;
  l.from_start = from_start ? 1.0f : 0.0f;
  l.coeff = from_start ? wf : wf - 1.0f;
  return l;
}

// One array of a factored kernel (OPTKERN_FACTORED), as the rule's host step between two passes
// sees it (RULE_FACTORED's `between`). An array of >= 2 dimensions is factored: `batch` matrices
// of rows x cols (its last two dimensions); an array of <= 1 dimension is not (batch 0).
struct FactoredArray {
  const double* sums;      // the pass's sums over the whole array (tile sums in tile order)
  const double* row_sums;  // after pass 0, factored: [batch * rows] sums of the pass's rows
  const double* col_sums;  // after pass 0, factored: [batch * cols] sums of its columns
  float* const* state;     // the array's state buffers, whole (nullptr where absent)
  std::size_t batch, rows, cols, numel;
  float* per_row;  // [batch * rows]: a number per row that the later passes read
  float* per_col;  // [batch * cols]: a number per column that the later passes read
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

// One rule: what _core.rules() exports and _core.step runs.
struct RuleDecl {
  const char* name;  // functional name: optkern.functional.<name>_
  const char* cls;   // class name: optkern.<cls>
  const char* doc;   // the formulas, for the class docstring
  KernelId kernel;
  Steps steps;
  const HyperDecl* hyper;
  std::size_t n_hyper;
  const StateDecl* states;
  std::size_t n_states;
  void (*check)(const Hyper&);  // constraints between hyperparameters, or nullptr
  void (*scalars)(const Hyper&, const StepInfo&, void* out);
  const CarriedDecl* carried = nullptr;  // numbers per parameter (RULE_CARRIED), or none
  std::size_t n_carried = 0;
  // Rules whose kernel has a reduction pass (OPTKERN_REDUCTIONS): turns one array's sums into
  // that array's scalars (a copy of its step's scalars). nullptr for the others.
  void (*per_array)(const double* sums, void* scalars) = nullptr;
  // Rules on a factored kernel (OPTKERN_FACTORED): after pass `pass` (0, 1, ...) over an array,
  // the host step that turns the array's sums into its scalars for the next pass (and may write
  // its small states: Adafactor's row and column factors). nullptr for the others.
  void (*between)(int pass, const FactoredArray& a, void* scalars) = nullptr;
  // Their work per row and per column after pass 0, in parallel over ranges fixed by the shape
  // alone: stage 0 on rows (rows = true) or columns [lo, hi) of matrix `matrix` before `between`
  // (its sums, a.row_sums and a.col_sums, complete over those rows or columns), stage 1 after it.
  // What stage 0 returns for a range of rows is added per matrix into a.per_matrix.
  double (*between_range)(int stage, const FactoredArray& a, std::size_t matrix, bool rows,
                          std::size_t lo, std::size_t hi, const void* scalars) = nullptr;
};

template <class T, std::size_t N>
constexpr std::size_t count_of(const T (&)[N]) {
  return N;
}

// The scalars struct of `kernel` behind the void* that rule tables pass around.
#define OPTKERN_SCALARS_OF(kernel, ptr) (*static_cast<KernelInfo<KernelId::kernel>::Scalars*>(ptr))

// What every RULE_* macro begins with: the rule's names, formulas, kernel, steps, hyperparameters,
// states and check, and its scalars function typed for its kernel's scalars struct.
#define OPTKERN_RULE_HEAD(kernel, name, cls, counts, hyper, states, check, scalars, doc) \
  name, cls, doc, KernelId::kernel, Steps::counts, hyper, count_of(hyper), states,       \
      count_of(states), check, [](const Hyper& h, const StepInfo& t, void* out) {        \
        scalars(h, t, OPTKERN_SCALARS_OF(kernel, out));                                  \
      }

// RULE(kernel, name, class, steps, hyper, states, check, scalars, doc): one RuleDecl.
#define RULE(kernel, name, cls, counts, hyper, states, check, scalars, doc) \
  RuleDecl { OPTKERN_RULE_HEAD(kernel, name, cls, counts, hyper, states, check, scalars, doc) }

// RULE_CARRIED(kernel, name, class, steps, hyper, states, carried, check, scalars, doc): a rule
// that also carries numbers per parameter from step to step (see CarriedDecl).
#define RULE_CARRIED(kernel, name, cls, counts, hyper, states, carried, check, scalars, doc)   \
  RuleDecl {                                                                                   \
    OPTKERN_RULE_HEAD(kernel, name, cls, counts, hyper, states, check, scalars, doc), carried, \
        count_of(carried)                                                                      \
  }

// RULE_REDUCED(kernel, name, class, steps, hyper, states, check, scalars, per_array, doc): a rule
// whose kernel has a reduction pass, with the function from its array's sums to its scalars.
#define RULE_REDUCED(kernel, name, cls, counts, hyper, states, check, scalars, per_array, doc)    \
  RuleDecl {                                                                                      \
    OPTKERN_RULE_HEAD(kernel, name, cls, counts, hyper, states, check, scalars, doc), nullptr, 0, \
        [](const double* sums, void* out) { per_array(sums, OPTKERN_SCALARS_OF(kernel, out)); }   \
  }

// RULE_FACTORED(kernel, name, class, steps, hyper, states, check, scalars, between, range, doc):
// a rule on a factored kernel, with its host step between passes and its work per row and column.
#define RULE_FACTORED(kernel, name, cls, counts, hyper, states, check, scalars, between, range,   \
                      doc)                                                                        \
  RuleDecl {                                                                                      \
    OPTKERN_RULE_HEAD(kernel, name, cls, counts, hyper, states, check, scalars, doc), nullptr, 0, \
        nullptr,                                                                                  \
        [](int pass, const FactoredArray& a, void* out) {                                         \
          between(pass, a, OPTKERN_SCALARS_OF(kernel, out));                                      \
        },                                                                                        \
        [](int stage, const FactoredArray& a, std::size_t m, bool rows, std::size_t lo,           \
           std::size_t hi, const void* s) {                                                       \
          return range(stage, a, m, rows, lo, hi,                                                 \
                       *static_cast<const KernelInfo<KernelId::kernel>::Scalars*>(s));            \
        }                                                                                         \
  }

}  // namespace optkern
