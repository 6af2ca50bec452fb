// The contract between the dispatcher and the kernels: plain structs of per-step scalars and a
// table of function pointers, one table per ISA build of kernels/update_rules.cpp.
//
// This header holds no inline functions on purpose: it is included by translation units compiled
// for different ISAs, and an inline function emitted by an AVX-512 unit could be the copy the
// linker keeps for the baseline code.
#pragma once

#include <cstddef>
#include <cstdint>

namespace optkern {

// Every struct below holds the scalars of one update, already in the float form the kernel uses.
// They are filled in double by the caller (bias corrections from the step count) and then
// rounded once.

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
  // exp_avg.lerp_(grad, w) as torch computes it: base + coeff * (grad - exp_avg), where
  // (base, coeff) is (exp_avg, w) for w < 0.5 and (grad, w - 1) otherwise.
  float lerp_coeff;
  bool lerp_from_avg;
  float beta2;
  float one_minus_beta2;
  float eps;
  float decoupled_decay;       // 1 - lr * weight_decay, AdamW only (grad.weight_decay unused)
  float step_size;             // lr / (1 - beta1^step), per tensor
  float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step), per tensor
  GradientPrep grad;
  bool amsgrad;
  bool decoupled;
};

// One ISA build's entry points. Each updates elements [0, n) of the pointers it is given;
// the multi-tensor driver offsets the pointers for each thread's range.
struct KernelTable {
  const char* isa;
  void (*sgd)(const SgdStep&, float* param, const float* grad, float* momentum_buffer,
              std::size_t n);
  void (*rmsprop)(const RmspropStep&, float* param, const float* grad, float* square_avg,
                  float* momentum_buffer, float* grad_avg, std::size_t n);
  void (*adagrad)(const AdagradStep&, float* param, const float* grad, float* sum, std::size_t n);
  void (*adadelta)(const AdadeltaStep&, float* param, const float* grad, float* square_avg,
                   float* acc_delta, std::size_t n);
  void (*adam)(const AdamStep&, float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
               float* max_exp_avg_sq, std::size_t n);

  // Gradient norms, one block at a time, accumulated in double: the sum of |x|^p (p = 1, 2 or
  // any p > 0), or max |x| for p = inf. NaN or Inf in x makes the result NaN or Inf.
  double (*norm_block)(const float* x, std::size_t n, double p);
  // x *= c, and x = min(max(x, lo), hi) (NaN stays NaN, as in torch.clamp).
  void (*scale)(float* x, std::size_t n, float c);
  void (*clamp)(float* x, std::size_t n, float lo, float hi);
  // a += s * b: the benchmark's measure of the machine's in-place streaming bandwidth.
  void (*axpy)(float* a, const float* b, float s, std::size_t n);
};

// Defined once per ISA build (namespaces scalar, avx2, avx512).
namespace scalar { const KernelTable* kernel_table(); }
namespace avx2 { const KernelTable* kernel_table(); }
namespace avx512 { const KernelTable* kernel_table(); }

}  // namespace optkern
