// Every update rule, declared once.
//
// A rule is four things: the struct of per-step scalars its kernel reads (filled in double by the
// host and rounded once to float), its line in OPTKERN_KERNELS (which gives it a slot in every
// ISA's kernel table), its host declaration (name, class name, formulas, hyperparameters with
// their ranges, defaults and torch names, state buffers, and the function that computes the
// per-step scalars from the hyperparameters and the step count), and its element-wise body in
// kernels/update_rules.cpp. Everything else (the binding, the functional functions, the optimizer
// classes, the type stubs, the test and benchmark rows) is derived from the declarations below
// through _core.rules().
//
// The first half (the structs and the kernel list) is what kernel_api.hpp includes, for the
// kernel builds and the host alike. The second half, the declarations, is compiled by exactly one
// host translation unit (bindings.cpp), which defines OPTKERN_RULE_DECLARATIONS and includes this
// header again.
#ifndef OPTKERN_RULES_STRUCTS
#define OPTKERN_RULES_STRUCTS

#include <cstddef>
#include <cstdint>

namespace optkern {

// What every rule first does to the gradient: g = grad_scale * g (-1 for maximize, times the
// clipping coefficient when clipping is fused into the step), then g += weight_decay * p when
// has_weight_decay (AdamW decays p itself instead: see AdamStep). has_weight_decay is decided on
// the double value, as torch decides it: a weight decay of 1e-320 rounds to 0.0f but still adds
// 0 * p to the gradient, which is NaN where p is infinite.
struct GradientPrep {
  float grad_scale;
  float weight_decay;
  bool has_weight_decay;
};

// Where torch computes start.lerp_(end, w), the kernels evaluate base + coeff * (end - start) with
// (base, coeff) = (start, w) for |w| < 0.5 and (end, w - 1) otherwise, as torch does (the form
// matters for Inf and NaN). The host picks the form, in double, for every rule alike.
struct Lerp {
  float coeff;
  // 1 or 0. A float, not a bool: GCC 12 does not vectorise the centered RMSprop loop when the
  // select depends on a bool loaded from memory, and does with a float compare.
  float from_start;
};

// -- the per-step scalars of each kernel --------------------------------------------------------

struct SgdStep {
  float lr;
  float momentum;
  float dampening_keep;  // 1 - dampening
  GradientPrep grad;
  bool nesterov;
  bool init_buffer;  // torch's first step: the buffer becomes the gradient itself
};

struct RmspropStep {
  float lr;
  float alpha;
  float one_minus_alpha;
  float eps;
  float momentum;
  Lerp grad_avg;  // grad_avg.lerp_(g, 1 - alpha)
  GradientPrep grad;
};

struct AdagradStep {
  float clr;  // lr / (1 + (step - 1) * lr_decay), per tensor
  float eps;
  GradientPrep grad;
};

struct AdadeltaStep {
  float lr;
  float rho;
  float one_minus_rho;
  float eps;
  GradientPrep grad;
};

struct AdamStep {
  Lerp exp_avg;  // exp_avg.lerp_(g, 1 - beta1)
  float beta2;
  float one_minus_beta2;
  float eps;
  float decoupled_decay;            // 1 - lr * weight_decay, AdamW only (grad.weight_decay unused)
  float step_size;                  // lr / (1 - beta1^step), per tensor
  float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step), per tensor
  GradientPrep grad;
  bool amsgrad;
  bool decoupled;
};

struct AdamaxStep {
  Lerp exp_avg;  // exp_avg.lerp_(g, 1 - beta1)
  float beta2;
  float eps;
  float clr;  // lr / (1 - beta1^step), per tensor
  GradientPrep grad;
};

// NAdam (torch.optim.NAdam): Adam's moments, the update from mu_t and mu_{t+1} (Nesterov's
// look-ahead); the two coefficients come from the parameter's carried mu_product.
struct NadamStep {
  Lerp exp_avg;  // exp_avg.lerp_(g, 1 - beta1)
  float beta2;
  float one_minus_beta2;
  float eps;
  float decoupled_decay;       // 1 - lr * weight_decay (decoupled_weight_decay)
  float inv_bias_correction2;  // 1 / (1 - beta2^step), per tensor
  float grad_coeff;            // -lr * (1 - mu_t) / (1 - mu_product), per tensor
  float avg_coeff;             // -lr * mu_{t+1} / (1 - mu_product * mu_{t+1}), per tensor
  GradientPrep grad;
  bool decoupled;
};

// RAdam (torch.optim.RAdam); `rectify` (rho_t > 5) is decided on the host from the step.
struct RadamStep {
  Lerp exp_avg;  // exp_avg.lerp_(g, 1 - beta1)
  float beta2;
  float one_minus_beta2;
  float eps;
  float lr;
  float decoupled_decay;        // 1 - lr * weight_decay (decoupled_weight_decay)
  float bias_correction1;       // 1 - beta1^step, per tensor
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step), per tensor
  float rect;                   // the variance rectification r_t, per tensor (rectify only)
  GradientPrep grad;
  bool decoupled;
  bool rectify;
};

// ASGD (torch.optim.ASGD): eta and mu are the parameter's carried numbers of the previous step.
struct AsgdStep {
  float eta;
  float decay;  // 1 - lambd * eta
  float mu;
  GradientPrep grad;
  bool copy_average;  // mu == 1 (in float32, as torch tests it): ax <- p
};

struct LionStep {
  float beta1, one_minus_beta1;  // the direction: sign(one_minus_beta1 * g + beta1 * exp_avg)
  float beta2, one_minus_beta2;  // exp_avg <- one_minus_beta2 * g + beta2 * exp_avg
  float neg_lr;                  // -lr
  // grad_scale as every rule; has_weight_decay: u += weight_decay * p (decoupled, as optax's
  // add_decayed_weights: it is added to the signed direction, not to the gradient).
  GradientPrep grad;
};

struct RpropStep {
  float etaminus, etaplus;             // the step size's factor where sign(g * prev) is -1, +1
  float step_size_min, step_size_max;  // its clamp
  float grad_scale;
};

struct LambStep {
  float beta1, one_minus_beta1;  // exp_avg <- one_minus_beta1 * g + beta1 * exp_avg
  float beta2, one_minus_beta2;  // exp_avg_sq <- one_minus_beta2 * g^2 + beta2 * exp_avg_sq
  float inv_bias_correction1;    // 1 / (1 - beta1^step), per tensor
  float inv_bias_correction2;    // 1 / (1 - beta2^step), per tensor
  float eps;
  float neg_lr;       // -lr
  float trust_ratio;  // per array: filled after the reduction pass
  // grad_scale as every rule; has_weight_decay: u += weight_decay * p (decoupled, as optax).
  GradientPrep grad;
};

// Schedule-Free AdamW and SGD (schedulefree.AdamWScheduleFree, SGDScheduleFree; Defazio et al.
// 2024). The parameter array holds y (train mode); z is a state buffer, which the first step
// copies from y (init_z). The schedule's numbers (c, lr_k) come from the parameter's carried
// lr_max and weight_sum (per group in the package: identical per parameter here).
struct ScheduleFreeStep {
  float beta2, one_minus_beta2;  // AdamW only: exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) g^2
  float bias_correction2;        // AdamW only: 1 - beta2^step, per tensor
  float eps;                     // AdamW only
  Lerp average;                  // y.lerp_(z, c), c = weight / weight_sum
  float y_coeff;                 // lr_k * (beta1 * (1 - c) - 1)
  float neg_lr;                  // -lr_k: z <- z - lr_k * u
  // grad_scale as every rule; has_weight_decay: u += weight_decay * y, after AdamW's
  // normalisation (the package decays at y, after dividing by the denominator).
  GradientPrep grad;
  bool init_z;  // the parameter's first step: z starts as a copy of y
};

// Adafactor (torch.optim.Adafactor): a factored kernel (OPTKERN_FACTORED), three passes over each
// array. Pass 0: the sum of p^2 and, for an array of >= 2 dimensions, the sums of g^2 over each
// row and each column (for one of <= 1 dimension: variance <- lerp(variance, g^2, w)). Host:
// alpha, the row and column factors' lerps and each matrix's clamped row-factor mean. Pass 1: the
// sum of update^2. Host: coeff = -alpha / denom. Pass 2: p <- p * decay + coeff * update.
struct AdafactorStep {
  Lerp var;         // w = t^beta2_decay: row_var, col_var and variance lerp towards g^2 by w
  float eps1;       // the floor of a matrix's row-factor mean
  float eps1_sq;    // eps1 * eps1 (in double, then float): the floor of the variance estimate
  float scale_cap;  // 1 / sqrt(eps1_sq): the largest factor of the update (factored arrays)
  float decay;      // 1 - lr * weight_decay
  float grad_scale;
  float coeff;     // per array, after pass 1: -alpha / max(1, rms(update) / d)
  bool has_decay;  // weight_decay != 0
  double rho;      // host: min(lr, 1 / sqrt(t))
  double eps2, d;  // host
  double alpha;    // host, per array after pass 0: max(eps2, rms(p)) * rho
};

// The kernels: X(name, scalars struct, number of state buffers, work per element). Each gets a
// slot `name` in KernelTable, filled by every ISA build of kernels/update_rules.cpp from the
// function of the same name there. Work is counted against the single-thread threshold in units
// of SGD's element (multi_tensor.hpp): 1 for a few multiply-adds, 4 with a sqrt and a division.
#define OPTKERN_KERNELS(X)           \
  X(sgd, SgdStep, 1, 1)              \
  X(rmsprop, RmspropStep, 3, 4)      \
  X(adagrad, AdagradStep, 1, 4)      \
  X(adadelta, AdadeltaStep, 2, 4)    \
  X(adam, AdamStep, 3, 4)            \
  X(adamax, AdamaxStep, 2, 4)        \
  X(nadam, NadamStep, 2, 4)          \
  X(radam, RadamStep, 2, 4)          \
  X(asgd, AsgdStep, 1, 1)            \
  X(lion, LionStep, 1, 1)            \
  X(rprop, RpropStep, 2, 1)          \
  X(lamb, LambStep, 2, 4)            \
  X(sfadamw, ScheduleFreeStep, 2, 4) \
  X(sfsgd, ScheduleFreeStep, 1, 1)   \
  X(adafactor, AdafactorStep, 3, 4)

// Kernels with a reduction pass before their element-wise pass: X(name, sums). Such a kernel has
// a second slot `name_reduce` in KernelTable, which the multi-tensor driver (Prepared in
// bindings.cpp) runs first over fixed blocks of each array; it may write the state (LAMB writes
// its new moments) and returns `sums` double partial sums per block. The driver adds each array's
// blocks in block order (so the sums do not depend on the thread count), then the rule's
// per_array function (its RULE_REDUCED declaration) turns the array's sums into that array's
// scalars (LAMB's trust ratio), and then the element-wise kernel `name` runs with them.
#define OPTKERN_REDUCTIONS(X) X(lamb, 2)

// Factored kernels: X(name, passes). Their state arrays need not be shaped like the parameter
// (StateDecl::shape: a factor per row or per column), so they do not run element-wise over flat
// spans: the driver (Prepared::factored in bindings.cpp) cuts each matrix into a grid of tiles
// (column tiles for long rows, row tiles within them; fixed by the shape alone), runs the
// kernel's slot `name_pass` for pass 0, 1, ... over every tile of the group in one parallel region
// per pass, adds each array's tile sums in tile order, and after pass 0 each row's and column's
// partial sums in tile order, then runs the rule's work per row and column (RULE_FACTORED's
// `between_range`) in parallel over fixed ranges; between two passes it runs the rule's host step
// (`between`) on each array. Results do not depend on the thread count. Their element-wise slot
// `name` is the last pass over a span of an array of <= 1 dimension (tests call it directly).
#define OPTKERN_FACTORED(X) X(adafactor, 3)

// The largest number of state buffers a kernel takes.
constexpr std::size_t MAX_STATES = 4;

}  // namespace optkern
#endif  // OPTKERN_RULES_STRUCTS

#if defined(OPTKERN_RULE_DECLARATIONS) && !defined(OPTKERN_RULES_DECLARED)
#define OPTKERN_RULES_DECLARED
// -- host side: the declarations
// -------------------------------------------------------------------
#include <algorithm>

#include "rule_api.hpp"

namespace optkern {
namespace rules {

using H = HyperDecl;
using S = StateDecl;
using Real = Range;

// SGD (torch.optim.SGD) and Nesterov (the same rule, nesterov=True by default in its class).
constexpr HyperDecl kSgdHyper[] = {
    {"lr", Real::nonnegative, 1e-3, "lr", -1},
    {"momentum", Real::nonnegative, 0.0, "momentum", -1},
    {"dampening", Real::unit, 0.0, "dampening", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
    {"nesterov", Real::flag, 0.0, "nesterov", -1},
};
constexpr StateDecl kSgdStates[] = {
    {"momentum_buffer", "momentum_buffers", "momentum", nullptr},
};
inline void sgd_check(const Hyper& h) {
  if (h.flag("nesterov") && (h["momentum"] <= 0 || h["dampening"] != 0)) {
    throw HyperError("nesterov momentum requires momentum > 0 and dampening == 0");
  }
}
inline void sgd_scalars(const Hyper& h, const StepInfo& t, SgdStep& s) {
  s.lr = t.f32(h["lr"], "lr");
  s.momentum = t.f32(h["momentum"], "momentum");
  s.dampening_keep = t.f32(1.0 - h["dampening"], "1 - dampening");
  s.grad = t.grad(h["weight_decay"]);
  s.nesterov = h.flag("nesterov");
  s.init_buffer = t.first;
}

// The notes' momentum: V = beta * V + (1 - beta) * g, V starting at zero: SGD's kernel with
// dampening = momentum = beta, never taking the first-step shortcut.
constexpr HyperDecl kMomentumHyper[] = {
    {"lr", Real::nonnegative, 1e-3, "lr", -1},
    {"beta", Real::unit_open, 0.9, "beta", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
};
constexpr StateDecl kMomentumStates[] = {
    {"momentum_buffer", "velocities", nullptr, nullptr},
};
inline void momentum_scalars(const Hyper& h, const StepInfo& t, SgdStep& s) {
  s.lr = t.f32(h["lr"], "lr");
  s.momentum = t.f32(h["beta"], "beta");
  s.dampening_keep = t.f32(1.0 - h["beta"], "1 - beta");
  s.grad = t.grad(h["weight_decay"]);
  s.nesterov = false;
  s.init_buffer = false;
}

constexpr HyperDecl kRmspropHyper[] = {
    {"lr", Real::nonnegative, 1e-2, "lr", -1},
    {"alpha", Real::unit, 0.99, "alpha", -1},
    {"eps", Real::nonnegative, 1e-8, "eps", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
    {"momentum", Real::nonnegative, 0.0, "momentum", -1},
    {"centered", Real::flag, 0.0, "centered", -1},
};
constexpr StateDecl kRmspropStates[] = {
    {"square_avg", "square_avgs", nullptr, nullptr},
    {"momentum_buffer", "momentum_buffers", "momentum", nullptr},
    {"grad_avg", "grad_avgs", "centered", nullptr},
};
inline void rmsprop_scalars(const Hyper& h, const StepInfo& t, RmspropStep& s) {
  s.lr = t.f32(h["lr"], "lr");
  s.alpha = t.f32(h["alpha"], "alpha");
  s.one_minus_alpha = t.f32(1.0 - h["alpha"], "1 - alpha");
  s.grad_avg = lerp_weight(1.0 - h["alpha"]);
  s.eps = t.f32(h["eps"], "eps");
  s.momentum = t.f32(h["momentum"], "momentum");
  s.grad = t.grad(h["weight_decay"]);
}

constexpr HyperDecl kAdagradHyper[] = {
    {"lr", Real::nonnegative, 1e-2, "lr", -1},
    {"lr_decay", Real::nonnegative, 0.0, "lr_decay", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
    {"initial_accumulator_value", Real::nonnegative, 0.0, "initial_accumulator_value", -1},
    {"eps", Real::nonnegative, 1e-10, "eps", -1},
};
constexpr StateDecl kAdagradStates[] = {
    {"sum", "state_sums", nullptr, "initial_accumulator_value"},
};
inline void adagrad_scalars(const Hyper& h, const StepInfo& t, AdagradStep& s) {
  s.clr = t.f32(h["lr"] / (1.0 + static_cast<double>(t.step - 1) * h["lr_decay"]),
                "lr / (1 + (step - 1) * lr_decay)");
  s.eps = t.f32(h["eps"], "eps");
  s.grad = t.grad(h["weight_decay"]);
}

constexpr HyperDecl kAdadeltaHyper[] = {
    {"lr", Real::nonnegative, 1.0, "lr", -1},
    {"rho", Real::unit, 0.9, "rho", -1},
    {"eps", Real::nonnegative, 1e-6, "eps", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
};
constexpr StateDecl kAdadeltaStates[] = {
    {"square_avg", "square_avgs", nullptr, nullptr},
    {"acc_delta", "acc_deltas", nullptr, nullptr},
};
inline void adadelta_scalars(const Hyper& h, const StepInfo& t, AdadeltaStep& s) {
  s.lr = t.f32(h["lr"], "lr");
  s.rho = t.f32(h["rho"], "rho");
  s.one_minus_rho = t.f32(1.0 - h["rho"], "1 - rho");
  s.eps = t.f32(h["eps"], "eps");
  s.grad = t.grad(h["weight_decay"]);
}

// Adam and AdamW: one kernel; AdamW decays the parameter instead of adding an L2 term.
constexpr HyperDecl kAdamHyper[] = {
    {"lr", Real::nonnegative, 1e-3, "lr", -1},
    {"beta1", Real::unit_open, 0.9, "betas", 0},
    {"beta2", Real::unit_open, 0.999, "betas", 1},
    {"eps", Real::nonnegative, 1e-8, "eps", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
    {"amsgrad", Real::flag, 0.0, "amsgrad", -1},
};
constexpr HyperDecl kAdamwHyper[] = {
    {"lr", Real::nonnegative, 1e-3, "lr", -1},
    {"beta1", Real::unit_open, 0.9, "betas", 0},
    {"beta2", Real::unit_open, 0.999, "betas", 1},
    {"eps", Real::nonnegative, 1e-8, "eps", -1},
    {"weight_decay", Real::nonnegative, 1e-2, "weight_decay", -1},
    {"amsgrad", Real::flag, 0.0, "amsgrad", -1},
};
constexpr StateDecl kAdamStates[] = {
    {"exp_avg", "exp_avgs", nullptr, nullptr},
    {"exp_avg_sq", "exp_avg_sqs", nullptr, nullptr},
    {"max_exp_avg_sq", "max_exp_avg_sqs", "amsgrad", nullptr},
};
inline void adam_common(const Hyper& h, const StepInfo& t, AdamStep& s, bool decoupled) {
  const double lr = h["lr"], beta1 = h["beta1"], beta2 = h["beta2"], wd = h["weight_decay"];
  s.exp_avg = lerp_weight(1.0 - beta1);
  s.beta2 = t.f32(beta2, "beta2");
  s.one_minus_beta2 = t.f32(1.0 - beta2, "1 - beta2");
  s.eps = t.f32(h["eps"], "eps");
  s.decoupled_decay = t.f32(1.0 - lr * wd, "1 - lr * weight_decay");
  const double n = static_cast<double>(t.step);  // bias corrections from the step count
  s.step_size = t.f32(lr / (1.0 - t.pow(beta1, n)), "lr / (1 - beta1^step)");
  s.inv_bias_correction2_sqrt =
      t.f32(1.0 / t.sqrt(1.0 - t.pow(beta2, n)), "1 / sqrt(1 - beta2^step)");
  s.grad = t.grad(wd);
  s.amsgrad = h.flag("amsgrad");
  s.decoupled = decoupled;
}
inline void adam_scalars(const Hyper& h, const StepInfo& t, AdamStep& s) {
  adam_common(h, t, s, false);
}
inline void adamw_scalars(const Hyper& h, const StepInfo& t, AdamStep& s) {
  adam_common(h, t, s, true);
}

// Adamax (torch.optim.Adamax): Adam with the infinity norm in place of the second moment.
constexpr HyperDecl kAdamaxHyper[] = {
    {"lr", Real::nonnegative, 2e-3, "lr", -1},
    {"beta1", Real::unit_open, 0.9, "betas", 0},
    {"beta2", Real::unit_open, 0.999, "betas", 1},
    {"eps", Real::nonnegative, 1e-8, "eps", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
};
constexpr StateDecl kAdamaxStates[] = {
    {"exp_avg", "exp_avgs", nullptr, nullptr},
    {"exp_inf", "exp_infs", nullptr, nullptr},
};
inline void adamax_scalars(const Hyper& h, const StepInfo& t, AdamaxStep& s) {
  s.exp_avg = lerp_weight(1.0 - h["beta1"]);
  s.beta2 = t.f32(h["beta2"], "beta2");
  s.eps = t.f32(h["eps"], "eps");
  s.clr = t.f32(h["lr"] / (1.0 - t.pow(h["beta1"], static_cast<double>(t.step))),
                "lr / (1 - beta1^step)");
  s.grad = t.grad(h["weight_decay"]);
}

// NAdam (torch.optim.NAdam). mu_product is carried per parameter in double (torch keeps it as a
// float32 tensor in the state): the product of every mu_t so far.
constexpr HyperDecl kNadamHyper[] = {
    {"lr", Real::nonnegative, 2e-3, "lr", -1},
    {"beta1", Real::unit_open, 0.9, "betas", 0},
    {"beta2", Real::unit_open, 0.999, "betas", 1},
    {"eps", Real::nonnegative, 1e-8, "eps", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
    {"momentum_decay", Real::nonnegative, 4e-3, "momentum_decay", -1},
    {"decoupled_weight_decay", Real::flag, 0.0, "decoupled_weight_decay", -1},
};
constexpr StateDecl kNadamStates[] = {
    {"exp_avg", "exp_avgs", nullptr, nullptr},
    {"exp_avg_sq", "exp_avg_sqs", nullptr, nullptr},
};
constexpr CarriedDecl kNadamCarried[] = {
    {"mu_product", "mu_products", 1.0, nullptr},
};
inline void nadam_scalars(const Hyper& h, const StepInfo& t, NadamStep& s) {
  const double lr = h["lr"], beta1 = h["beta1"], beta2 = h["beta2"], wd = h["weight_decay"];
  const double n = static_cast<double>(t.step), md = h["momentum_decay"];
  const double mu = beta1 * (1.0 - 0.5 * t.pow(0.96, n * md));
  const double mu_next = beta1 * (1.0 - 0.5 * t.pow(0.96, (n + 1.0) * md));
  double& mu_product = t.carried[0];
  const double product = mu_product * mu;
  s.exp_avg = lerp_weight(1.0 - beta1);
  s.beta2 = t.f32(beta2, "beta2");
  s.one_minus_beta2 = t.f32(1.0 - beta2, "1 - beta2");
  s.eps = t.f32(h["eps"], "eps");
  s.decoupled_decay = t.f32(1.0 - lr * wd, "1 - lr * weight_decay");
  s.inv_bias_correction2 = t.f32(1.0 / (1.0 - t.pow(beta2, n)), "1 / (1 - beta2^step)");
  s.grad_coeff = t.f32(-lr * (1.0 - mu) / (1.0 - product), "lr * (1 - mu_t) / (1 - mu_product)");
  s.avg_coeff = t.f32((-lr * mu_next) / (1.0 - product * mu_next),
                      "lr * mu_{t+1} / (1 - mu_product * mu_{t+1})");
  s.decoupled = h.flag("decoupled_weight_decay");
  s.grad = t.grad(s.decoupled ? 0.0 : wd);
  mu_product = product;
}

// RAdam (torch.optim.RAdam). Whether a step is rectified depends only on the step and beta2, so
// the host decides it; with the default betas the first 5 steps are bias-corrected momentum.
constexpr HyperDecl kRadamHyper[] = {
    {"lr", Real::nonnegative, 1e-3, "lr", -1},
    {"beta1", Real::unit_open, 0.9, "betas", 0},
    {"beta2", Real::unit_open, 0.999, "betas", 1},
    {"eps", Real::nonnegative, 1e-8, "eps", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
    {"decoupled_weight_decay", Real::flag, 0.0, "decoupled_weight_decay", -1},
};
constexpr StateDecl kRadamStates[] = {
    {"exp_avg", "exp_avgs", nullptr, nullptr},
    {"exp_avg_sq", "exp_avg_sqs", nullptr, nullptr},
};
inline void radam_scalars(const Hyper& h, const StepInfo& t, RadamStep& s) {
  const double lr = h["lr"], beta1 = h["beta1"], beta2 = h["beta2"], wd = h["weight_decay"];
  const double n = static_cast<double>(t.step);
  const double bc2 = 1.0 - t.pow(beta2, n);
  const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
  const double rho_t = rho_inf - 2.0 * n * t.pow(beta2, n) / bc2;
  s.exp_avg = lerp_weight(1.0 - beta1);
  s.beta2 = t.f32(beta2, "beta2");
  s.one_minus_beta2 = t.f32(1.0 - beta2, "1 - beta2");
  s.eps = t.f32(h["eps"], "eps");
  s.lr = t.f32(lr, "lr");
  s.decoupled_decay = t.f32(1.0 - lr * wd, "1 - lr * weight_decay");
  s.bias_correction1 = t.f32(1.0 - t.pow(beta1, n), "1 - beta1^step");
  s.bias_correction2_sqrt = t.f32(t.sqrt(bc2), "sqrt(1 - beta2^step)");
  s.rectify = rho_t > 5.0;
  s.rect = s.rectify ? t.f32(t.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                    ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)),
                             "the rectification r_t")
                     : 1.0f;
  s.decoupled = h.flag("decoupled_weight_decay");
  s.grad = t.grad(s.decoupled ? 0.0 : wd);
}

// ASGD (torch.optim.ASGD). eta and mu are carried: each step uses the values the previous one
// computed (eta from the lr of that step), as torch does.
constexpr HyperDecl kAsgdHyper[] = {
    {"lr", Real::nonnegative, 1e-2, "lr", -1},
    {"lambd", Real::nonnegative, 1e-4, "lambd", -1},
    {"alpha", Real::nonnegative, 0.75, "alpha", -1},
    {"t0", Real::nonnegative, 1e6, "t0", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
};
constexpr StateDecl kAsgdStates[] = {
    {"ax", "axs", nullptr, nullptr},
};
constexpr CarriedDecl kAsgdCarried[] = {
    {"eta", "etas", 0.0, "lr"},
    {"mu", "mus", 1.0, nullptr},
};
inline void asgd_scalars(const Hyper& h, const StepInfo& t, AsgdStep& s) {
  const double lr = h["lr"], lambd = h["lambd"];
  double& eta = t.carried[0];
  double& mu = t.carried[1];
  s.eta = t.f32(eta, "eta");
  s.decay = t.f32(1.0 - lambd * eta, "1 - lambd * eta");
  s.mu = t.f32(mu, "mu");
  s.copy_average = s.mu == 1.0f;
  s.grad = t.grad(h["weight_decay"]);
  const double n = static_cast<double>(t.step);
  eta = lr / t.pow(1.0 + lambd * lr * n, h["alpha"]);
  mu = 1.0 / std::max(1.0, n - h["t0"]);
}

// Lion (optax.lion, Chen et al. 2023), with lion-pytorch's defaults and state name. The betas are
// in [0, 1) as Adam's (lion-pytorch also takes 1, which freezes the moment or ignores it).
constexpr HyperDecl kLionHyper[] = {
    {"lr", Real::nonnegative, 1e-4, "lr", -1},
    {"beta1", Real::unit_open, 0.9, "betas", 0},
    {"beta2", Real::unit_open, 0.99, "betas", 1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
};
constexpr StateDecl kLionStates[] = {
    {"exp_avg", "exp_avgs", nullptr, nullptr},
};
inline void lion_scalars(const Hyper& h, const StepInfo& t, LionStep& s) {
  s.beta1 = t.f32(h["beta1"], "beta1");
  s.one_minus_beta1 = t.f32(1.0 - h["beta1"], "1 - beta1");
  s.beta2 = t.f32(h["beta2"], "beta2");
  s.one_minus_beta2 = t.f32(1.0 - h["beta2"], "1 - beta2");
  s.neg_lr = t.f32(-h["lr"], "lr");
  s.grad = t.grad(h["weight_decay"]);
}

// Rprop (torch.optim.Rprop). torch checks 0 < etaminus < 1 < etaplus; optkern also refuses
// negative step sizes and step_size_min > step_size_max (torch's clamp would then give the max).
constexpr HyperDecl kRpropHyper[] = {
    {"lr", Real::nonnegative, 1e-2, "lr", -1},
    {"etaminus", Real::open_unit, 0.5, "etas", 0},
    {"etaplus", Real::above_one, 1.2, "etas", 1},
    {"step_size_min", Real::nonnegative, 1e-6, "step_sizes", 0},
    {"step_size_max", Real::nonnegative, 50.0, "step_sizes", 1},
};
constexpr StateDecl kRpropStates[] = {
    {"prev", "prevs", nullptr, nullptr},
    {"step_size", "step_sizes", nullptr, "lr"},  // starts at lr, as torch's full_like(p, lr)
};
inline void rprop_check(const Hyper& h) {
  require_order(h, "step_size_min", "step_size_max", "step_sizes");
}
inline void rprop_scalars(const Hyper& h, const StepInfo& t, RpropStep& s) {
  s.etaminus = t.f32(h["etaminus"], "etaminus");
  s.etaplus = t.f32(h["etaplus"], "etaplus");
  s.step_size_min = t.f32(h["step_size_min"], "step_size_min");
  s.step_size_max = t.f32(h["step_size_max"], "step_size_max");
  s.grad_scale = static_cast<float>(t.grad_scale);
}

// LAMB (optax.lamb, You et al. 2019): Adam's direction plus decoupled decay, scaled per array by
// the trust ratio norm(p) / norm(u). Two passes (see OPTKERN_REDUCTIONS): the first writes the
// moments and sums p^2 and u^2; the second recomputes u from the new moments (the same float
// operations, so the same bits whose norm was taken) and writes p.
constexpr HyperDecl kLambHyper[] = {
    {"lr", Real::nonnegative, 1e-3, "lr", -1},
    {"beta1", Real::unit_open, 0.9, "betas", 0},
    {"beta2", Real::unit_open, 0.999, "betas", 1},
    {"eps", Real::nonnegative, 1e-6, "eps", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
};
constexpr StateDecl kLambStates[] = {
    {"exp_avg", "exp_avgs", nullptr, nullptr},
    {"exp_avg_sq", "exp_avg_sqs", nullptr, nullptr},
};
inline void lamb_scalars(const Hyper& h, const StepInfo& t, LambStep& s) {
  const double beta1 = h["beta1"], beta2 = h["beta2"], n = static_cast<double>(t.step);
  s.beta1 = t.f32(beta1, "beta1");
  s.one_minus_beta1 = t.f32(1.0 - beta1, "1 - beta1");
  s.beta2 = t.f32(beta2, "beta2");
  s.one_minus_beta2 = t.f32(1.0 - beta2, "1 - beta2");
  // Reciprocals in double, so the kernel multiplies (optax divides: within a rounding). A division
  // per bias correction would make LAMB's two passes divide six times per element, which at 1M
  // elements cost 2x its memory traffic on the 2-core AVX-512 machine.
  s.inv_bias_correction1 = t.f32(1.0 / (1.0 - t.pow(beta1, n)), "1 / (1 - beta1^step)");
  s.inv_bias_correction2 = t.f32(1.0 / (1.0 - t.pow(beta2, n)), "1 / (1 - beta2^step)");
  s.eps = t.f32(h["eps"], "eps");
  s.neg_lr = t.f32(-h["lr"], "lr");
  s.trust_ratio = 1.0f;
  s.grad = t.grad(h["weight_decay"]);
}
// sums = {sum of p^2, sum of u^2} over the array, in double. The ratio is 1 where either norm is
// 0, NaN where either is NaN (as optax: a NaN anywhere in u makes the whole array NaN). It is
// data, not a hyperparameter: rounded to float32 without the finiteness check.
inline void lamb_per_array(const double* sums, LambStep& s) {
  const double p_norm = std::sqrt(sums[0]), u_norm = std::sqrt(sums[1]);
  s.trust_ratio = static_cast<float>(p_norm == 0.0 || u_norm == 0.0 ? 1.0 : p_norm / u_norm);
}

// Schedule-Free (schedulefree 1.4). The package keeps k, lr_max and weight_sum per param group;
// optkern carries lr_max and weight_sum per parameter (CarriedDecl, starting at the package's
// -1 and 0) and takes k from the parameter's step count, so they are the group's numbers as long
// as every parameter of the group has a gradient at every step (a parameter skipped on a step
// would lag the group's k here, where the package advances it). beta1 and momentum are in
// (0, 1): eval() divides by them.
constexpr HyperDecl kSfAdamwHyper[] = {
    {"lr", Real::nonnegative, 0.0025, "lr", -1},
    {"beta1", Real::open_unit, 0.9, "betas", 0},
    {"beta2", Real::unit_open, 0.999, "betas", 1},
    {"eps", Real::nonnegative, 1e-8, "eps", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
    {"warmup_steps", Real::nonnegative, 0.0, "warmup_steps", -1},
    {"r", Real::nonnegative, 0.0, "r", -1},
    {"weight_lr_power", Real::nonnegative, 2.0, "weight_lr_power", -1},
};
constexpr StateDecl kSfAdamwStates[] = {
    {"z", "zs", nullptr, nullptr},  // zero until the first step's kernel copies y into it
    {"exp_avg_sq", "exp_avg_sqs", nullptr, nullptr},
};
constexpr HyperDecl kSfSgdHyper[] = {
    {"lr", Real::nonnegative, 1.0, "lr", -1},
    {"momentum", Real::open_unit, 0.9, "momentum", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
    {"warmup_steps", Real::nonnegative, 0.0, "warmup_steps", -1},
    {"r", Real::nonnegative, 0.0, "r", -1},
    {"weight_lr_power", Real::nonnegative, 2.0, "weight_lr_power", -1},
};
constexpr StateDecl kSfSgdStates[] = {
    {"z", "zs", nullptr, nullptr},
};
constexpr CarriedDecl kScheduleFreeCarried[] = {
    {"lr_max", "lr_maxs", -1.0, nullptr},
    {"weight_sum", "weight_sums", 0.0, nullptr},
};
// The package's per-group step k + 1 = t.step: the warmed-up lr and c = weight / weight_sum.
inline void schedule_free_common(const Hyper& h, const StepInfo& t, double beta1,
                                 ScheduleFreeStep& s) {
  const double n = static_cast<double>(t.step), warmup = h["warmup_steps"];
  const double lr = h["lr"] * (n - 1.0 < warmup ? n / warmup : 1.0);
  double& lr_max = t.carried[0];
  double& weight_sum = t.carried[1];
  const double new_max = std::max(lr, lr_max);
  const double weight = t.pow(n, h["r"]) * t.pow(new_max, h["weight_lr_power"]);
  const double new_sum = weight_sum + weight;
  const double c = new_sum != 0.0 ? weight / new_sum : 0.0;
  s.average = lerp_weight(c);
  s.y_coeff = t.f32(lr * (beta1 * (1.0 - c) - 1.0), "lr * (beta * (1 - c) - 1)");
  s.neg_lr = t.f32(-lr, "lr");
  s.grad = t.grad(h["weight_decay"]);
  s.init_z = t.first;
  lr_max = new_max;
  weight_sum = new_sum;
}
inline void sfadamw_scalars(const Hyper& h, const StepInfo& t, ScheduleFreeStep& s) {
  const double beta2 = h["beta2"];
  s.beta2 = t.f32(beta2, "beta2");
  s.one_minus_beta2 = t.f32(1.0 - beta2, "1 - beta2");
  s.bias_correction2 = t.f32(1.0 - t.pow(beta2, static_cast<double>(t.step)), "1 - beta2^step");
  s.eps = t.f32(h["eps"], "eps");
  schedule_free_common(h, t, h["beta1"], s);
}
inline void sfsgd_scalars(const Hyper& h, const StepInfo& t, ScheduleFreeStep& s) {
  s.beta2 = s.one_minus_beta2 = s.bias_correction2 = s.eps = 0.0f;
  schedule_free_common(h, t, h["momentum"], s);
}

// Adafactor (torch.optim.Adafactor): eps1 = None means float32's machine epsilon (torch: the
// parameter's dtype's), d >= 1 and beta2_decay <= 0 as torch requires.
constexpr HyperDecl kAdafactorHyper[] = {
    {"lr", Real::nonnegative, 1e-2, "lr", -1},
    {"beta2_decay", Real::nonpositive, -0.8, "beta2_decay", -1},
    {"eps1", Real::nonnegative, 0.0, "eps", 0, {true, 1.1920928955078125e-07, true}},
    {"eps2", Real::nonnegative, 1e-3, "eps", 1},
    {"d", Real::one_or_more, 1.0, "d", -1},
    {"weight_decay", Real::nonnegative, 0.0, "weight_decay", -1},
};
constexpr StateDecl kAdafactorStates[] = {
    {"row_var", "row_vars", nullptr, nullptr, StateShape::rows},
    {"col_var", "col_vars", nullptr, nullptr, StateShape::cols},
    {"variance", "variances", nullptr, nullptr, StateShape::unfactored},
};
inline void adafactor_scalars(const Hyper& h, const StepInfo& t, AdafactorStep& s) {
  const double step = static_cast<double>(t.step), eps1 = h["eps1"], lr = h["lr"];
  s.var = lerp_weight(t.pow(step, h["beta2_decay"]));
  s.eps1 = t.f32(eps1, "eps1");
  s.eps1_sq = static_cast<float>(eps1 * eps1);  // torch's clamp_(min=eps1 * eps1): may be inf
  s.scale_cap = 1.0f / std::sqrt(s.eps1_sq);
  s.decay = t.f32(1.0 - lr * h["weight_decay"], "1 - lr * weight_decay");
  s.has_decay = h["weight_decay"] != 0.0;
  s.grad_scale = static_cast<float>(t.grad_scale);
  s.coeff = 0.0f;
  s.rho = std::min(lr, 1.0 / t.sqrt(step));
  s.eps2 = h["eps2"];
  s.d = h["d"];
  s.alpha = 0.0;
}
// torch's float32 lerp (see Lerp), on the host: the same result on every ISA.
inline float host_lerp(float start, float end, const Lerp& l) {
  return (l.from_start != 0.0f ? start : end) + l.coeff * (end - start);
}
// After pass 0: alpha, and each matrix's clamped row-factor mean from the sum of its lerped row
// factors (adafactor_range's stage 0, added per matrix over its row ranges in order).
inline void adafactor_between(int pass, const FactoredArray& a, AdafactorStep& s) {
  const double n = static_cast<double>(a.numel);
  if (pass == 0) {
    // Python's max(eps2, rms) as torch takes it: a NaN rms (or an empty array) gives eps2.
    const double rms = a.numel ? std::sqrt(a.sums[0]) / std::sqrt(n) : 0.0;
    s.alpha = (rms > s.eps2 ? rms : s.eps2) * s.rho;
    if (!a.factored) return;
    const double rows = static_cast<double>(a.rows);
    for (std::size_t b = 0; b < a.batch; ++b) {
      float mean = static_cast<float>(a.per_matrix[b] / rows);
      mean = mean < s.eps1 ? s.eps1 : mean;  // clamp_(min=eps1): NaN stays NaN
      a.per_matrix[b] = mean;
    }
  } else if (pass == 1) {
    const double ratio = std::sqrt(a.sums[0]) / (std::sqrt(n) * s.d);
    s.coeff = static_cast<float>(-s.alpha / (ratio > 1.0 ? ratio : 1.0));  // max(1.0, ratio)
  }
}
// The work per row and column of matrix b after pass 0, over [lo, hi). Stage 0: the row factors'
// lerps (returning their sum, in double, for the mean) and the column factors' lerps with each
// column's scale 1 / sqrt(col_var); stage 1: each row's scale 1 / sqrt(row_var / mean).
// v[i, j] = r[i] * c[j] / mean; the kernel takes 1 / sqrt(v) as the product of the two scales.
inline double adafactor_range(int stage, const FactoredArray& a, std::size_t b, bool rows,
                              std::size_t lo, std::size_t hi, const AdafactorStep& s) {
  if (rows) {
    float* r = a.state[0] + b * a.rows;
    float* scale = a.per_row + b * a.rows;
    if (stage == 1) {
      const float mean = static_cast<float>(a.per_matrix[b]);
      for (std::size_t i = lo; i < hi; ++i) scale[i] = 1.0f / std::sqrt(r[i] / mean);
      return 0.0;
    }
    const double* sums = a.row_sums + b * a.rows;
    // torch: norm(g, dim=-1)^2 / cols, here times 1 / cols in double (a double division per row
    // or column costs more than the float passes' rounding can show; 0 * inf = NaN for an empty
    // row, as torch's 0 / 0)
    const double inv_cols = 1.0 / static_cast<double>(a.cols);
    double total = 0.0;
    for (std::size_t i = lo; i < hi; ++i) {
      r[i] = host_lerp(r[i], static_cast<float>(sums[i] * inv_cols), s.var);
      total += r[i];
    }
    return total;
  }
  if (stage == 0) {
    float* c = a.state[1] + b * a.cols;
    float* scale = a.per_col + b * a.cols;
    const double* sums = a.col_sums + b * a.cols;
    const double inv_rows = 1.0 / static_cast<double>(a.rows);  // as the kernel's pass 0
    for (std::size_t j = lo; j < hi; ++j) {
      c[j] = host_lerp(c[j], static_cast<float>(sums[j] * inv_rows), s.var);
      scale[j] = 1.0f / std::sqrt(c[j]);
    }
  }
  return 0.0;
}

// -- the table
// -------------------------------------------------------------------------------------
// RULE(kernel, name, class, steps (see Steps), hyper, states, check, scalars, formulas)

constexpr RuleDecl kRules[] = {
    RULE(
        sgd, "sgd", "SGD", first_only, kSgdHyper, kSgdStates, sgd_check, sgd_scalars,
        "Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD::\n\n"
        "    g   <- g + weight_decay * p\n"
        "    buf <- g                                          (first step)\n"
        "    buf <- momentum * buf + (1 - dampening) * g       (later steps)\n"
        "    g   <- g + momentum * buf     if nesterov,  else  g <- buf      (when momentum != 0)\n"
        "    p   <- p - lr * g\n\n"
        "State: ``momentum_buffer`` (when momentum != 0). Feeding it the gradient of the whole\n"
        "data set, one sample or a mini-batch gives BGD, SGD or mini-batch GD (see\n"
        "``optkern.data.batches``)."),
    RULE(sgd, "momentum", "Momentum", first_only, kMomentumHyper, kMomentumStates, nullptr,
         momentum_scalars,
         "Gradient descent with momentum in its exponentially weighted form::\n\n"
         "    g <- g + weight_decay * p\n"
         "    V <- beta * V + (1 - beta) * g        (V starts at zero)\n"
         "    p <- p - lr * V\n\n"
         "This differs from ``SGD(momentum=beta)``, whose buffer is not damped by (1 - beta) and\n"
         "starts at the first gradient. State: ``momentum_buffer`` (V)."),
    RULE(rmsprop, "rmsprop", "RMSprop", counted, kRmspropHyper, kRmspropStates, nullptr,
         rmsprop_scalars,
         "RMSprop, as torch.optim.RMSprop::\n\n"
         "    g          <- g + weight_decay * p\n"
         "    square_avg <- alpha * square_avg + (1 - alpha) * g^2\n"
         "    avg        <- sqrt(square_avg) + eps\n"
         "    centered:  grad_avg <- lerp(grad_avg, g, 1 - alpha);"
         "  avg <- sqrt(square_avg - grad_avg^2) + eps\n"
         "    momentum > 0:  buf <- momentum * buf + g / avg;  p <- p - lr * buf\n"
         "    otherwise:     p <- p - lr * g / avg\n\n"
         "State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg``\n"
         "(centered)."),
    RULE(adagrad, "adagrad", "Adagrad", used, kAdagradHyper, kAdagradStates, nullptr,
         adagrad_scalars,
         "Adagrad, as torch.optim.Adagrad::\n\n"
         "    g   <- g + weight_decay * p\n"
         "    clr <- lr / (1 + (t - 1) * lr_decay)\n"
         "    sum <- sum + g^2                      (sum starts at initial_accumulator_value)\n"
         "    p   <- p - clr * g / (sqrt(sum) + eps)\n\n"
         "Each coordinate's step shrinks with the gradient it has seen, so rare (sparse) features\n"
         "keep large steps. State: ``step``, ``sum``."),
    RULE(adadelta, "adadelta", "Adadelta", counted, kAdadeltaHyper, kAdadeltaStates, nullptr,
         adadelta_scalars,
         "Adadelta, as torch.optim.Adadelta::\n\n"
         "    g          <- g + weight_decay * p\n"
         "    square_avg <- rho * square_avg + (1 - rho) * g^2\n"
         "    delta      <- sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g\n"
         "    acc_delta  <- rho * acc_delta + (1 - rho) * delta^2\n"
         "    p          <- p - lr * delta\n\n"
         "State: ``step``, ``square_avg``, ``acc_delta``."),
    RULE(adam, "adam", "Adam", used, kAdamHyper, kAdamStates, nullptr, adam_scalars,
         "Adam, as torch.optim.Adam (weight decay as an L2 term in the gradient)::\n\n"
         "    g          <- g + weight_decay * p\n"
         "    exp_avg    <- beta1 * exp_avg + (1 - beta1) * g        (computed as torch's lerp)\n"
         "    exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * g^2\n"
         "    amsgrad:   max_exp_avg_sq <- max(max_exp_avg_sq, exp_avg_sq), used for v below\n"
         "    v          <- exp_avg_sq\n"
         "    p          <- p - lr / (1 - beta1^t) * exp_avg / (sqrt(v) / sqrt(1 - beta2^t) + "
         "eps)\n\n"
         "The bias corrections 1 - beta^t are computed in double from t. State: ``step``,\n"
         "``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad)."),
    RULE(adam, "adamw", "AdamW", used, kAdamwHyper, kAdamStates, nullptr, adamw_scalars,
         "AdamW, as torch.optim.AdamW: Adam with the weight decay decoupled from the gradient::\n\n"
         "    p <- p * (1 - lr * weight_decay)\n"
         "    then Adam's update of p with g (no L2 term)\n\n"
         "State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad)."),
    RULE(adamax, "adamax", "Adamax", used, kAdamaxHyper, kAdamaxStates, nullptr, adamax_scalars,
         "Adamax, as torch.optim.Adamax (Adam with the infinity norm)::\n\n"
         "    g       <- g + weight_decay * p\n"
         "    exp_avg <- beta1 * exp_avg + (1 - beta1) * g         (computed as torch's lerp)\n"
         "    exp_inf <- max(beta2 * exp_inf, |g| + eps)\n"
         "    p       <- p - lr / (1 - beta1^t) * exp_avg / exp_inf\n\n"
         "Only the first moment is bias-corrected. State: ``step``, ``exp_avg``, ``exp_inf``."),
    RULE_CARRIED(
        nadam, "nadam", "NAdam", used, kNadamHyper, kNadamStates, kNadamCarried, nullptr,
        nadam_scalars,
        "NAdam, as torch.optim.NAdam (Adam with Nesterov momentum)::\n\n"
        "    decoupled_weight_decay:  p <- p * (1 - lr * weight_decay)\n"
        "    otherwise:               g <- g + weight_decay * p\n"
        "    mu_t       = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))\n"
        "    mu_{t+1}   = beta1 * (1 - 0.5 * 0.96^((t + 1) * momentum_decay))\n"
        "    mu_product <- mu_product * mu_t                   (a number per parameter, from 1)\n"
        "    exp_avg    <- beta1 * exp_avg + (1 - beta1) * g   (computed as torch's lerp)\n"
        "    exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * g^2\n"
        "    denom      =  sqrt(exp_avg_sq / (1 - beta2^t)) + eps\n"
        "    p          <- p - lr * (1 - mu_t) / (1 - mu_product) * g / denom\n"
        "                    - lr * mu_{t+1} / (1 - mu_product * mu_{t+1}) * exp_avg / denom\n\n"
        "State: ``step``, ``mu_product`` (a float, kept in double), ``exp_avg``, ``exp_avg_sq``."),
    RULE(radam, "radam", "RAdam", used, kRadamHyper, kRadamStates, nullptr, radam_scalars,
         "RAdam, as torch.optim.RAdam (Adam with the variance rectified)::\n\n"
         "    decoupled_weight_decay:  p <- p * (1 - lr * weight_decay)\n"
         "    otherwise:               g <- g + weight_decay * p\n"
         "    exp_avg    <- beta1 * exp_avg + (1 - beta1) * g   (computed as torch's lerp)\n"
         "    exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * g^2\n"
         "    rho_inf    =  2 / (1 - beta2) - 1\n"
         "    rho_t      =  rho_inf - 2 t beta2^t / (1 - beta2^t)\n"
         "    rho_t > 5: r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) "
         "rho_t))\n"
         "               p <- p - lr * exp_avg / (1 - beta1^t) * r_t * sqrt(1 - beta2^t)"
         " / (sqrt(exp_avg_sq) + eps)\n"
         "    otherwise: p <- p - lr * exp_avg / (1 - beta1^t)\n\n"
         "The switch is decided from t (with the default betas, the first 5 steps are\n"
         "bias-corrected momentum). State: ``step``, ``exp_avg``, ``exp_avg_sq``."),
    RULE_CARRIED(
        asgd, "asgd", "ASGD", used, kAsgdHyper, kAsgdStates, kAsgdCarried, nullptr, asgd_scalars,
        "Averaged SGD, as torch.optim.ASGD::\n\n"
        "    g   <- g + weight_decay * p\n"
        "    p   <- p * (1 - lambd * eta) - eta * g\n"
        "    ax  <- ax + mu * (p - ax)      (ax <- p while mu = 1, that is until step t0 + 1)\n"
        "    eta <- lr / (1 + lambd * lr * t)^alpha             (the rate of the next step)\n"
        "    mu  <- 1 / max(1, t - t0)\n\n"
        "``eta`` starts at lr, ``mu`` at 1: numbers per parameter carried in the state, as torch\n"
        "does (so an lr changed by a schedule takes effect one step late, as in torch). ``ax``,\n"
        "the averaged point, is what to evaluate with. State: ``step``, ``eta``, ``mu``, ``ax``."),
    RULE(
        lion, "lion", "Lion", first_only, kLionHyper, kLionStates, nullptr, lion_scalars,
        "Lion, as optax.lion (Chen et al. 2023), with lion-pytorch's defaults::\n\n"
        "    u       <- sign(beta1 * exp_avg + (1 - beta1) * g)    (sign(0) = 0, sign(NaN) = NaN)\n"
        "    u       <- u + weight_decay * p                       (decoupled weight decay)\n"
        "    p       <- p - lr * u\n"
        "    exp_avg <- beta2 * exp_avg + (1 - beta2) * g\n\n"
        "Every element moves by lr (plus the decay) or not at all. A NaN gradient makes its\n"
        "element NaN, as in optax (lion-pytorch's torch.sign would give 0 and not move it).\n"
        "State: ``exp_avg`` (lion-pytorch's name; no step count)."),
    RULE(
        rprop, "rprop", "Rprop", counted, kRpropHyper, kRpropStates, rprop_check, rprop_scalars,
        "Rprop (resilient backpropagation), as torch.optim.Rprop::\n\n"
        "    s         =  sign(g * prev)                       (torch's sign: 0 for NaN)\n"
        "    step_size <- clamp(step_size * (etaplus if s > 0, etaminus if s < 0, 1 otherwise),\n"
        "                       step_size_min, step_size_max)\n"
        "    g         <- 0 where s < 0                (a flipped sign neither moves nor is kept)\n"
        "    p         <- p - sign(g) * step_size\n"
        "    prev      <- g\n\n"
        "Only signs are used, so the gradient's scale does not matter. ``step_size`` starts at\n"
        "lr, ``prev`` at zero. A NaN gradient moves nothing but is kept as ``prev``.\n"
        "State: ``step``, ``prev``, ``step_size``."),
    RULE_REDUCED(
        lamb, "lamb", "LAMB", used, kLambHyper, kLambStates, nullptr, lamb_scalars, lamb_per_array,
        "LAMB, as optax.lamb (You et al. 2019): Adam's direction with decoupled weight decay,\n"
        "scaled per parameter array by the trust ratio::\n\n"
        "    exp_avg    <- beta1 * exp_avg + (1 - beta1) * g\n"
        "    exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * g^2\n"
        "    u          =  (exp_avg / (1 - beta1^t)) / (sqrt(exp_avg_sq / (1 - beta2^t)) + eps)\n"
        "                   + weight_decay * p\n"
        "    ratio      =  norm(p) / norm(u), or 1 where either norm is 0    (per array)\n"
        "    p          <- p - lr * ratio * u\n\n"
        "The norms are over each whole array, summed in double over fixed blocks, so the\n"
        "result is the same for any number of threads; a NaN anywhere in u makes the array NaN,\n"
        "as in optax. State: ``step``, ``exp_avg``, ``exp_avg_sq`` (torch's names for Adam's)."),
    RULE_CARRIED(
        sfadamw, "schedule_free_adamw", "ScheduleFreeAdamW", used, kSfAdamwHyper, kSfAdamwStates,
        kScheduleFreeCarried, nullptr, sfadamw_scalars,
        "Schedule-Free AdamW, as schedulefree.AdamWScheduleFree (Defazio et al. 2024)::\n\n"
        "    lr_t       = lr * min(1, t / warmup_steps)\n"
        "    lr_max     <- max(lr_max, lr_t)                    (a number per parameter, from -1)\n"
        "    weight     = t^r * lr_max^weight_lr_power;  weight_sum <- weight_sum + weight\n"
        "    c          = weight / weight_sum                   (0 while weight_sum is 0)\n"
        "    z          <- y                                    (first step)\n"
        "    exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * g^2\n"
        "    u          =  g / (sqrt(exp_avg_sq / (1 - beta2^t)) + eps) + weight_decay * y\n"
        "    y          <- lerp(y, z, c) + lr_t * (beta1 * (1 - c) - 1) * u\n"
        "    z          <- z - lr_t * u\n\n"
        "The parameter holds y in train mode, x (the average to evaluate and save) in eval\n"
        "mode: ``train()`` sets p <- lerp(p, z, 1 - beta1), ``eval()`` p <- lerp(p, z,\n"
        "1 - 1/beta1); a step in eval mode is an error. Unlike the package, which starts in\n"
        "eval mode, the optimizer starts in train mode (the package's first train() is a no-op\n"
        "there too). ``lr_max`` and ``weight_sum`` are per group in the package and per\n"
        "parameter here (equal while every parameter has a gradient at every step). State:\n"
        "``step``, ``lr_max``, ``weight_sum``, ``z``, ``exp_avg_sq``; ``train_mode`` in the "
        "group."),
    RULE_CARRIED(
        sfsgd, "schedule_free_sgd", "ScheduleFreeSGD", used, kSfSgdHyper, kSfSgdStates,
        kScheduleFreeCarried, nullptr, sfsgd_scalars,
        "Schedule-Free SGD, as schedulefree.SGDScheduleFree (Defazio et al. 2024)::\n\n"
        "    lr_t, lr_max, weight_sum, c as ScheduleFreeAdamW's\n"
        "    z <- y                                              (first step)\n"
        "    u =  g + weight_decay * y\n"
        "    y <- lerp(y, z, c) + lr_t * (momentum * (1 - c) - 1) * u\n"
        "    z <- z - lr_t * u\n\n"
        "``train()`` sets p <- lerp(p, z, 1 - momentum), ``eval()`` p <- lerp(p, z,\n"
        "1 - 1/momentum); a step in eval mode is an error; the optimizer starts in train mode.\n"
        "State: ``step``, ``lr_max``, ``weight_sum``, ``z``; ``train_mode`` in the group."),
    RULE_FACTORED(
        adafactor, "adafactor", "Adafactor", used, kAdafactorHyper, kAdafactorStates, nullptr,
        adafactor_scalars, adafactor_between, adafactor_range,
        "Adafactor, as torch.optim.Adafactor (Shazeer and Stern 2018)::\n\n"
        "    w        = t^beta2_decay;  rho = min(lr, 1 / sqrt(t))\n"
        "    alpha    = max(eps2, norm(p) / sqrt(numel(p))) * rho       (p before the decay)\n"
        "    p        <- p * (1 - lr * weight_decay)\n"
        "    p of >= 2 dimensions (factored over its last two, R rows x C columns):\n"
        "      row_var <- lerp(row_var, mean of g^2 over each row, w)       (shape [..., R, 1])\n"
        "      col_var <- lerp(col_var, mean of g^2 over each column, w)    (shape [..., 1, C])\n"
        "      v       =  row_var @ col_var / max(mean of row_var over the rows, eps1)\n"
        "    p of <= 1 dimension:\n"
        "      variance <- lerp(variance, g^2, w);  v = variance\n"
        "    u        = g / sqrt(max(v, eps1^2))\n"
        "    p        <- p - alpha / max(1, norm(u) / (sqrt(numel(p)) * d)) * u\n\n"
        "``eps=(None, 1e-3)``: eps1 None means float32's machine epsilon. A factored parameter\n"
        "keeps R + C numbers per matrix instead of R * C: the memory of the second moment\n"
        "shrinks from the parameter's size to its row and column counts. Three passes over\n"
        "each array (24 bytes per element of a factored one: p and g read, g read, p and g\n"
        "read and p written); sums are over fixed tiles, so results do not depend on the\n"
        "thread count. State: ``step``, ``row_var`` and ``col_var`` (>= 2 dimensions) or\n"
        "``variance`` (<= 1 dimension)."),
};

}  // namespace rules
}  // namespace optkern
#endif  // OPTKERN_RULE_DECLARATIONS
