// Every optimizer's fused update, written once, ISA-neutral.
//
// CMake compiles this file once per ISA (x86-64: plain, AVX2+FMA, AVX-512; aarch64: NEON, SVE),
// each time with -DOPTKERN_ISA_NS=<isa> and that ISA's flags. The loops are plain element-wise
// C++ that the compiler vectorises (`#pragma omp simd`, restrict pointers, -fno-math-errno for
// sqrt); each element is read once and written once, with no temporaries, which is the whole
// point.
//
// Where torch's formula is p.addcdiv_(t1, t2, value=-c), the kernel computes p - (c * t1) / t2 in
// that order, as torch does: c * (t1 / t2) can overflow where torch's order does not.
//
// Rules for this file: everything lives in the ISA namespace, helpers in an anonymous namespace
// (internal linkage), and no inline functions from shared headers: the linker could otherwise
// keep the AVX-512 copy of a shared inline function for the baseline code.
#include "kernel_api.hpp"

#include <cstddef>

#ifndef OPTKERN_ISA_NS
#error "compile this file once per ISA with -DOPTKERN_ISA_NS=<isa> (src/cpp/isa_builds.txt)"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define OK_RESTRICT __restrict__
#define OK_SQRT(x) __builtin_sqrtf(x)
#define OK_SIMD _Pragma("omp simd")
#define OK_LOOP __attribute__((noinline))  // one symbol per variant: bench/instructions.py reads it
#define OK_FABSF(x) __builtin_fabsf(x)
#define OK_FABS(x) __builtin_fabs(x)
#define OK_POW(x, y) __builtin_pow((x), (y))
#define OK_NAN __builtin_nan("")
#define OK_PREFETCH(p) __builtin_prefetch(p)
#else
#include <cmath>
#include <limits>
#define OK_RESTRICT __restrict
#define OK_SQRT(x) std::sqrt(x)
#define OK_SIMD __pragma(omp simd)
#define OK_LOOP
#define OK_FABSF(x) std::fabs(x)
#define OK_FABS(x) std::fabs(x)
#define OK_POW(x, y) std::pow((x), (y))
#define OK_NAN std::numeric_limits<double>::quiet_NaN()
#define OK_PREFETCH(p) ((void)0)
#endif

// a * b + c. Where the ISA has FMA it is one fused operation, written out here because the
// kernels are compiled with -ffp-contract=off: left to itself, the compiler fuses the vector loop
// and its scalar remainder differently, and then an element's result would depend on where a
// thread's range happens to end. Written out, every element of one ISA build computes the same
// expression, so results are bit-identical for any thread count.
// x86-64: AVX2 and AVX-512 fuse (-mfma), the baseline (SSE2) does not. aarch64: every build fuses,
// NEON included: fused multiply-add is part of the base architecture (FMLA, FMADD), so NEON and
// SVE compute the same expressions and agree bit for bit.
#if (defined(__FMA__) || defined(__ARM_FEATURE_FMA)) && (defined(__GNUC__) || defined(__clang__))
#define OK_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
#define OK_FUSED true
#else
#define OK_FMA(a, b, c) ((a) * (b) + (c))
#define OK_FUSED false
#endif

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

using std::size_t;

template <bool B>
struct Flag {
  static constexpr bool value = B;
};

// The first thing every rule does to an element's gradient (GradientPrep in kernel_api.hpp).
template <bool kDecay>
float prepared_gradient(float g, float p, float grad_scale, float weight_decay) {
  const float scaled = g * grad_scale;
  return kDecay ? OK_FMA(weight_decay, p, scaled) : scaled;
}

// torch's start.lerp_(end, w) for one element, in the form the host picked for w (Lerp in
// rules.hpp): start + coeff * (end - start) or end + coeff * (end - start).
float lerp(float start, float end, float coeff, bool from_start) {
  return OK_FMA(coeff, end - start, from_start ? start : end);
}

// A moving average of squares, torch's avg.mul_(decay).addcmul_(x, x, value=1 - decay): decay *
// avg + ((1 - decay) * x) * x, in that order (Adam's exp_avg_sq, RMSprop's square_avg, ...).
float moving_square(float avg, float x, float decay, float one_minus_decay) {
  return OK_FMA(decay, avg, (one_minus_decay * x) * x);
}

// Calls f(Flag<b>{}), so a runtime choice becomes a compile-time one outside the element loop.
template <class F>
void with_flag(bool b, F&& f) {
  if (b) {
    f(Flag<true>{});
  } else {
    f(Flag<false>{});
  }
}

// ---------------------------------------------------------------------------------------------
// SGD (torch.optim.SGD), Nesterov, and the exponentially weighted Momentum (dampening =
// momentum, buffer starting at zero).
//   g = grad_scale * grad (+ weight_decay * p)
//   buf = g on the first step, else momentum * buf + (1 - dampening) * g
//   g = g + momentum * buf (nesterov) or buf
//   p = p - lr * g
template <bool kDecay, bool kMomentum, bool kNesterov, bool kInit>
OK_LOOP void sgd_impl(const SgdStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                      float* OK_RESTRICT buf, size_t n) {
  const float lr = s.lr, mom = s.momentum, keep = s.dampening_keep, gs = s.grad.grad_scale,
              wd = s.grad.weight_decay;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float pi = p[i];
    float gi = prepared_gradient<kDecay>(g[i], pi, gs, wd);
    if (kMomentum) {
      const float bi = kInit ? gi : OK_FMA(mom, buf[i], keep * gi);
      buf[i] = bi;
      gi = kNesterov ? OK_FMA(mom, bi, gi) : bi;
    }
    p[i] = OK_FMA(-lr, gi, pi);
  }
}

void sgd(const SgdStep& s, float* p, const float* g, float* const* st, size_t n) {
  float* buf = st[0];
  with_flag(s.grad.has_weight_decay, [&](auto decay) {
    constexpr bool kDecay = decltype(decay)::value;
    if (buf == nullptr) {
      sgd_impl<kDecay, false, false, false>(s, p, g, nullptr, n);
      return;
    }
    with_flag(s.nesterov, [&](auto nesterov) {
      with_flag(s.init_buffer, [&](auto init) {
        sgd_impl<kDecay, true, decltype(nesterov)::value, decltype(init)::value>(s, p, g, buf, n);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// RMSprop (torch.optim.RMSprop)
//   square_avg = alpha * square_avg + (1 - alpha) * g^2
//   centered:  grad_avg = lerp(grad_avg, g, 1 - alpha);  avg = sqrt(square_avg - grad_avg^2) + eps
//   else:      avg = sqrt(square_avg) + eps
//   momentum:  buf = momentum * buf + g / avg;  p = p - lr * buf
//   else:      p = p - lr * g / avg
template <bool kDecay, bool kCentered, bool kMomentum>
OK_LOOP void rmsprop_impl(const RmspropStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                          float* OK_RESTRICT sq, float* OK_RESTRICT buf, float* OK_RESTRICT gavg,
                          size_t n) {
  const float lr = s.lr, alpha = s.alpha, w = s.one_minus_alpha, eps = s.eps, mom = s.momentum,
              gs = s.grad.grad_scale, wd = s.grad.weight_decay;
  const bool lerp_from_avg =
      s.grad_avg.from_start != 0.0f;  // grad_avg.lerp_(g, w), as torch (Lerp)
  const float lerp_coeff = s.grad_avg.coeff;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float pi = p[i];
    const float gi = prepared_gradient<kDecay>(g[i], pi, gs, wd);
    // (w * g) * g, in torch's addcmul order: a gradient of 1e20 does not overflow to inf here.
    const float si = moving_square(sq[i], gi, alpha, w);
    sq[i] = si;
    float avg;
    if (kCentered) {
      const float ai = gavg[i];
      const float a = lerp(ai, gi, lerp_coeff, lerp_from_avg);
      gavg[i] = a;
      // Not fused: torch rounds grad_avg^2 first, so where it overflows, inf - inf gives NaN.
      avg = OK_SQRT(si - a * a) + eps;
    } else {
      avg = OK_SQRT(si) + eps;
    }
    if (kMomentum) {
      const float bi = OK_FMA(mom, buf[i], gi / avg);
      buf[i] = bi;
      p[i] = OK_FMA(-lr, bi, pi);
    } else {
      p[i] = pi - (lr * gi) / avg;
    }
  }
}

void rmsprop(const RmspropStep& s, float* p, const float* g, float* const* st, size_t n) {
  float *sq = st[0], *buf = st[1], *gavg = st[2];
  with_flag(s.grad.has_weight_decay, [&](auto decay) {
    with_flag(gavg != nullptr, [&](auto centered) {
      with_flag(buf != nullptr, [&](auto momentum) {
        rmsprop_impl<decltype(decay)::value, decltype(centered)::value, decltype(momentum)::value>(
            s, p, g, sq, buf, gavg, n);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Adagrad (torch.optim.Adagrad)
//   sum = sum + g^2;  p = p - clr * g / (sqrt(sum) + eps)
template <bool kDecay>
OK_LOOP void adagrad_impl(const AdagradStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                          float* OK_RESTRICT sum, size_t n) {
  const float clr = s.clr, eps = s.eps, gs = s.grad.grad_scale, wd = s.grad.weight_decay;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float pi = p[i];
    const float gi = prepared_gradient<kDecay>(g[i], pi, gs, wd);
    const float si = OK_FMA(gi, gi, sum[i]);
    sum[i] = si;
    p[i] = pi - (clr * gi) / (OK_SQRT(si) + eps);
  }
}

void adagrad(const AdagradStep& s, float* p, const float* g, float* const* st, size_t n) {
  with_flag(s.grad.has_weight_decay,
            [&](auto decay) { adagrad_impl<decltype(decay)::value>(s, p, g, st[0], n); });
}

// ---------------------------------------------------------------------------------------------
// Adadelta (torch.optim.Adadelta)
//   square_avg = rho * square_avg + (1 - rho) * g^2
//   delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
//   acc_delta = rho * acc_delta + (1 - rho) * delta^2
//   p = p - lr * delta
template <bool kDecay>
OK_LOOP void adadelta_impl(const AdadeltaStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                           float* OK_RESTRICT sq, float* OK_RESTRICT acc, size_t n) {
  const float lr = s.lr, rho = s.rho, w = s.one_minus_rho, eps = s.eps, gs = s.grad.grad_scale,
              wd = s.grad.weight_decay;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float pi = p[i];
    const float gi = prepared_gradient<kDecay>(g[i], pi, gs, wd);
    const float si = moving_square(sq[i], gi, rho, w);
    sq[i] = si;
    const float ai = acc[i];
    const float delta = OK_SQRT(ai + eps) / OK_SQRT(si + eps) * gi;
    acc[i] = moving_square(ai, delta, rho, w);
    p[i] = OK_FMA(-lr, delta, pi);
  }
}

void adadelta(const AdadeltaStep& s, float* p, const float* g, float* const* st, size_t n) {
  with_flag(s.grad.has_weight_decay,
            [&](auto decay) { adadelta_impl<decltype(decay)::value>(s, p, g, st[0], st[1], n); });
}

// ---------------------------------------------------------------------------------------------
// Adam's moments of one element, shared by Adam, AdamW, NAdam and RAdam (their step structs name
// the same fields): the parameter decayed (decoupled weight decay), the gradient prepared from
// it, exp_avg and exp_avg_sq updated in place; returned for the rule's update. Built from the
// step struct once per call, outside the element loop.
template <bool kL2, bool kDecoupled>
struct AdamMoments {
  struct Element {
    float p, g, m, v;
  };
  float lc, b2, w2, decay, gs, wd;
  bool from_avg;
  template <class Step>
  explicit AdamMoments(const Step& s)
      : lc(s.exp_avg.coeff),
        b2(s.beta2),
        w2(s.one_minus_beta2),
        decay(s.decoupled_decay),
        gs(s.grad.grad_scale),
        wd(s.grad.weight_decay),
        from_avg(s.exp_avg.from_start != 0.0f) {}
  Element operator()(float p, float g, float& m, float& v) const {
    if (kDecoupled) p *= decay;
    const float gi = prepared_gradient<kL2>(g, p, gs, wd);
    const float mi = lerp(m, gi, lc, from_avg);
    const float vi = moving_square(v, gi, b2, w2);
    m = mi;
    v = vi;
    return {p, gi, mi, vi};
  }
};

// ---------------------------------------------------------------------------------------------
// Adam and AdamW (torch.optim.Adam / AdamW); step_size and the bias corrections are per tensor.
//   AdamW: p = p * (1 - lr * weight_decay);   Adam: g = g + weight_decay * p
//   exp_avg = lerp(exp_avg, g, 1 - beta1);  exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
//   amsgrad: max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq), used in place of exp_avg_sq below
//   p = p - step_size * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^t) + eps)
// One sqrt and one division per element.
template <bool kL2, bool kDecoupled, bool kAmsgrad>
OK_LOOP void adam_impl(const AdamStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                       float* OK_RESTRICT m, float* OK_RESTRICT v, float* OK_RESTRICT vmax,
                       size_t n) {
  const AdamMoments<kL2, kDecoupled> moments(s);
  const float eps = s.eps, step_size = s.step_size, inv_bc2 = s.inv_bias_correction2_sqrt;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const auto e = moments(p[i], g[i], m[i], v[i]);
    float vd = e.v;
    if (kAmsgrad) {
      const float vm = vmax[i];
      vd = (e.v > vm || e.v != e.v) ? e.v : vm;  // NaN-propagating max, like torch.maximum
      vmax[i] = vd;
    }
    const float denom = OK_FMA(OK_SQRT(vd), inv_bc2, eps);
    p[i] = e.p - (step_size * e.m) / denom;
  }
}

void adam(const AdamStep& s, float* p, const float* g, float* const* st, size_t n) {
  float *m = st[0], *v = st[1], *vmax = st[2];
  const bool decay = s.grad.has_weight_decay;
  with_flag(decay && !s.decoupled, [&](auto l2) {
    with_flag(decay && s.decoupled, [&](auto decoupled) {
      with_flag(s.amsgrad, [&](auto amsgrad) {
        adam_impl<decltype(l2)::value, decltype(decoupled)::value, decltype(amsgrad)::value>(
            s, p, g, m, v, vmax, n);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Adamax (torch.optim.Adamax); clr = lr / (1 - beta1^t) is per tensor.
//   exp_avg = lerp(exp_avg, g, 1 - beta1);  exp_inf = max(beta2 * exp_inf, |g| + eps)
//   p = p - clr * exp_avg / exp_inf
template <bool kDecay>
OK_LOOP void adamax_impl(const AdamaxStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                         float* OK_RESTRICT m, float* OK_RESTRICT u, size_t n) {
  const float lc = s.exp_avg.coeff, b2 = s.beta2, eps = s.eps, clr = s.clr, gs = s.grad.grad_scale,
              wd = s.grad.weight_decay;
  const bool from_avg = s.exp_avg.from_start != 0.0f;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float pi = p[i];
    const float gi = prepared_gradient<kDecay>(g[i], pi, gs, wd);
    const float mi0 = m[i];
    const float mi = lerp(mi0, gi, lc, from_avg);
    const float a = u[i] * b2, b = OK_FABSF(gi) + eps;
    const float ui = (a > b || a != a) ? a : b;  // NaN-propagating max, like torch.maximum
    m[i] = mi;
    u[i] = ui;
    p[i] = pi - (clr * mi) / ui;
  }
}

void adamax(const AdamaxStep& s, float* p, const float* g, float* const* st, size_t n) {
  with_flag(s.grad.has_weight_decay,
            [&](auto decay) { adamax_impl<decltype(decay)::value>(s, p, g, st[0], st[1], n); });
}

// ---------------------------------------------------------------------------------------------
// NAdam (torch.optim.NAdam); the coefficients and 1 - beta2^t are per tensor.
//   decoupled: p = p * (1 - lr * weight_decay);   else: g = g + weight_decay * p
//   exp_avg = lerp(exp_avg, g, 1 - beta1);  exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
//   denom = sqrt(exp_avg_sq / (1 - beta2^t)) + eps
//   p = p + (grad_coeff * g + avg_coeff * exp_avg) / denom
// torch makes the last line two addcdivs (two divisions) and divides exp_avg_sq by 1 - beta2^t;
// one division and a multiplication by 1 / (1 - beta2^t) are within a few float32 roundings of
// that, and the divider bounds this loop when its arrays are in cache.
template <bool kL2, bool kDecoupled>
OK_LOOP void nadam_impl(const NadamStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                        float* OK_RESTRICT m, float* OK_RESTRICT v, size_t n) {
  const AdamMoments<kL2, kDecoupled> moments(s);
  const float eps = s.eps, inv_bc2 = s.inv_bias_correction2, c1 = s.grad_coeff, c2 = s.avg_coeff;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const auto e = moments(p[i], g[i], m[i], v[i]);
    const float denom = OK_SQRT(e.v * inv_bc2) + eps;
    p[i] = e.p + (c1 * e.g + c2 * e.m) / denom;
  }
}

void nadam(const NadamStep& s, float* p, const float* g, float* const* st, size_t n) {
  const bool decay = s.grad.has_weight_decay;
  with_flag(decay, [&](auto l2) {
    with_flag(s.decoupled && s.decoupled_decay != 1.0f, [&](auto decoupled) {
      nadam_impl<decltype(l2)::value, decltype(decoupled)::value>(s, p, g, st[0], st[1], n);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// RAdam (torch.optim.RAdam); the bias corrections and r_t are per tensor, `rectify` per step.
//   decoupled: p = p * (1 - lr * weight_decay);   else: g = g + weight_decay * p
//   exp_avg = lerp(exp_avg, g, 1 - beta1);  exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
//   u = exp_avg / (1 - beta1^t) * lr
//   rectify: u = u * (sqrt(1 - beta2^t) / (sqrt(exp_avg_sq) + eps)) * r_t
//   p = p - u                                     (torch's order of float32 operations)
template <bool kL2, bool kDecoupled, bool kRectify>
OK_LOOP void radam_impl(const RadamStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                        float* OK_RESTRICT m, float* OK_RESTRICT v, size_t n) {
  const AdamMoments<kL2, kDecoupled> moments(s);
  const float eps = s.eps, lr = s.lr, bc1 = s.bias_correction1, sbc2 = s.bias_correction2_sqrt,
              rect = s.rect;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const auto e = moments(p[i], g[i], m[i], v[i]);
    float u = (e.m / bc1) * lr;
    if (kRectify) u = (u * (sbc2 / (OK_SQRT(e.v) + eps))) * rect;
    p[i] = e.p - u;
  }
}

void radam(const RadamStep& s, float* p, const float* g, float* const* st, size_t n) {
  with_flag(s.grad.has_weight_decay, [&](auto l2) {
    with_flag(s.decoupled && s.decoupled_decay != 1.0f, [&](auto decoupled) {
      with_flag(s.rectify, [&](auto rectify) {
        radam_impl<decltype(l2)::value, decltype(decoupled)::value, decltype(rectify)::value>(
            s, p, g, st[0], st[1], n);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// ASGD (torch.optim.ASGD); eta and mu are the parameter's carried numbers, per tensor.
//   g = g + weight_decay * p;  p = p * (1 - lambd * eta);  p = p - eta * g
//   ax = p while mu == 1, else ax = ax + (p - ax) * mu
template <bool kDecay, bool kCopy>
OK_LOOP void asgd_impl(const AsgdStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                       float* OK_RESTRICT ax, size_t n) {
  const float eta = s.eta, decay = s.decay, mu = s.mu, gs = s.grad.grad_scale,
              wd = s.grad.weight_decay;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float p0 = p[i];
    const float gi = prepared_gradient<kDecay>(g[i], p0, gs, wd);
    const float pi = OK_FMA(-eta, gi, p0 * decay);
    p[i] = pi;
    if (kCopy) {
      ax[i] = pi;
    } else {
      const float ai = ax[i];
      ax[i] = ai + (pi - ai) * mu;  // not fused: torch rounds (p - ax) * mu first
    }
  }
}

void asgd(const AsgdStep& s, float* p, const float* g, float* const* st, size_t n) {
  with_flag(s.grad.has_weight_decay, [&](auto decay) {
    with_flag(s.copy_average, [&](auto copy) {
      asgd_impl<decltype(decay)::value, decltype(copy)::value>(s, p, g, st[0], n);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Lion (optax.lion), in optax's order of operations:
//   c = (1 - beta1) * g + beta1 * exp_avg;  u = sign(c) (+ weight_decay * p)
//   p = p + (-lr) * u;  exp_avg = (1 - beta2) * g + beta2 * exp_avg
template <bool kDecay>
OK_LOOP void lion_impl(const LionStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                       float* OK_RESTRICT m, size_t n) {
  const float b1 = s.beta1, c1 = s.one_minus_beta1, b2 = s.beta2, c2 = s.one_minus_beta2,
              nlr = s.neg_lr, gs = s.grad.grad_scale, wd = s.grad.weight_decay;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float pi = p[i], gi = g[i] * gs, mi = m[i];
    const float c = c1 * gi + b1 * mi;
    // jnp.sign: 0 stays 0, NaN stays NaN. Both comparisons are made before either select: nested
    // as `c > 0 ? 1 : (c < 0 ? -1 : c)`, the second comparison is conditional and may trap on a
    // NaN, so GCC does not if-convert the loop without AVX-512's masks (scalar code, a
    // mispredicted branch per element: 10x slower on AVX2).
    const bool positive = c > 0.0f, negative = c < 0.0f;
    float u = positive ? 1.0f : c;
    u = negative ? -1.0f : u;
    if (kDecay) u = u + wd * pi;
    p[i] = pi + nlr * u;
    m[i] = c2 * gi + b2 * mi;
  }
}

void lion(const LionStep& s, float* p, const float* g, float* const* st, size_t n) {
  with_flag(s.grad.has_weight_decay,
            [&](auto decay) { lion_impl<decltype(decay)::value>(s, p, g, st[0], n); });
}

// ---------------------------------------------------------------------------------------------
// Rprop (torch.optim.Rprop). Signs are torch's: sign(NaN) is 0, so a NaN product keeps the step
// size and a NaN gradient does not move p. torch's step_size.mul_(factor).clamp_(min, max) and
// p.addcmul_(sign(g), step_size, value=-1) (sign * step_size is exact).
OK_LOOP void rprop_impl(const RpropStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT g,
                        float* OK_RESTRICT prev, float* OK_RESTRICT step_size, size_t n) {
  const float em = s.etaminus, ep = s.etaplus, lo = s.step_size_min, hi = s.step_size_max,
              gs = s.grad_scale;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    // Every comparison is made before the selects that use it, as in Lion's loop (why: there).
    const float gi = g[i] * gs;
    const float prod = gi * prev[i];
    const bool grew = prod > 0.0f, flipped = prod < 0.0f;
    float factor = grew ? ep : 1.0f;
    factor = flipped ? em : factor;
    const float ss0 = step_size[i] * factor;
    const bool below = ss0 < lo;
    const bool above = ss0 > hi;
    const float capped = above ? hi : ss0;
    const float ss = below ? lo : capped;  // torch.clamp: NaN stays NaN
    const float gk = flipped ? 0.0f : gi;
    const bool gpos = gk > 0.0f, gneg = gk < 0.0f;
    float sign = gpos ? 1.0f : 0.0f;
    sign = gneg ? -1.0f : sign;
    p[i] = p[i] - sign * ss;
    step_size[i] = ss;
    prev[i] = gk;
  }
}

void rprop(const RpropStep& s, float* p, const float* g, float* const* st, size_t n) {
  rprop_impl(s, p, g, st[0], st[1], n);
}

// ---------------------------------------------------------------------------------------------
// Gradient norms and clipping. Each block's sum is accumulated in double (a float squared is exact
// in double); the caller adds the blocks up in a fixed order, so the result does not depend on
// the number of threads.

// Sums are kept in LANES independent partial sums (element i goes to lane i % LANES), added up
// in a fixed order at the end: one accumulator would make every addition wait for the last
// (a 4-cycle chain), several let the reduction run at memory speed. The order is the same for
// every call, so the result is too.
constexpr size_t LANES = 32;

// A read-only pass has one stream per thread, which the hardware prefetcher alone does not keep
// busy: asking for the data 4 KB ahead made the 50M-element norm 1.5x faster on the 2-core
// Xeon of bench/README.md (the update kernels, with 3 to 5 streams each, gained nothing).
constexpr size_t PREFETCH_AHEAD = 1024;

inline void prefetch_ahead(const float* x, size_t i) {
  OK_PREFETCH(x + i + PREFETCH_AHEAD);
  OK_PREFETCH(x + i + PREFETCH_AHEAD + 16);
}

template <class Term>
OK_LOOP double lane_sum(const float* OK_RESTRICT x, size_t n, Term term) {
  double acc[LANES] = {};
  size_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    prefetch_ahead(x, i);
    OK_SIMD
    for (size_t j = 0; j < LANES; ++j) acc[j] += term(static_cast<double>(x[i + j]));
  }
  for (size_t j = 0; i < n; ++i, ++j) acc[j] += term(static_cast<double>(x[i]));
  double total = 0.0;
  for (size_t j = 0; j < LANES; ++j) total += acc[j];
  return total;
}

double sum_squares(const float* x, size_t n) {
  return lane_sum(x, n, [](double v) { return v * v; });
}

double sum_abs(const float* x, size_t n) {
  return lane_sum(x, n, [](double v) { return OK_FABS(v); });
}

double max_abs(const float* OK_RESTRICT x, size_t n) {
  float m[LANES] = {};
  int nan[LANES] = {};
  size_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    prefetch_ahead(x, i);
    OK_SIMD
    for (size_t j = 0; j < LANES; ++j) {
      const float a = OK_FABSF(x[i + j]);
      m[j] = a > m[j] ? a : m[j];
      nan[j] |= a != a;
    }
  }
  for (size_t j = 0; i < n; ++i, ++j) {
    const float a = OK_FABSF(x[i]);
    m[j] = a > m[j] ? a : m[j];
    nan[j] |= a != a;
  }
  float best = 0.0f;
  int any_nan = 0;
  for (size_t j = 0; j < LANES; ++j) {
    best = m[j] > best ? m[j] : best;
    any_nan |= nan[j];
  }
  return any_nan ? OK_NAN : static_cast<double>(best);
}

double sum_pow(const float* OK_RESTRICT x, size_t n, double p) {
  double acc = 0.0;  // rare norm types: plain loop, pow in double
  for (size_t i = 0; i < n; ++i) acc += OK_POW(OK_FABS(static_cast<double>(x[i])), p);
  return acc;
}

double norm_block(const float* x, size_t n, double p) {
  if (p == 2.0) return sum_squares(x, n);
  if (p == 1.0) return sum_abs(x, n);
  if (p > 1e300) return max_abs(x, n);  // p = inf
  return sum_pow(x, n, p);
}

void scale(float* OK_RESTRICT x, size_t n, float c) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) x[i] *= c;
}

void clamp(float* OK_RESTRICT x, size_t n, float lo, float hi) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    float v = x[i];
    v = v < lo ? lo : v;
    x[i] = v > hi ? hi : v;
  }
}

void axpy(float* OK_RESTRICT a, const float* OK_RESTRICT b, float s, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) a[i] = OK_FMA(s, b[i], a[i]);
}

// ---------------------------------------------------------------------------------------------
// LAMB (optax.lamb), in optax's order of operations. Pass 1 (lamb_reduce, per fixed block):
//   exp_avg = (1 - beta1) * g + beta1 * exp_avg;  exp_avg_sq = (1 - beta2) * g^2 + beta2 *
//   exp_avg_sq u = (exp_avg * (1 / bc1)) / (sqrt(exp_avg_sq * (1 / bc2)) + eps) (+ weight_decay *
//   p) sums: p^2 and u^2 in double.
// Pass 2 (lamb, with the array's trust ratio): u again from the new moments, p = p + (-lr) * (u *
// ratio). Both passes compute u with lamb_direction, so pass 2 scales the very u whose norm was
// taken.
template <bool kDecay>
float lamb_direction(const LambStep& s, float p, float m, float v) {
  const float u = (m * s.inv_bias_correction1) / (OK_SQRT(v * s.inv_bias_correction2) + s.eps);
  return kDecay ? u + s.grad.weight_decay * p : u;
}

template <bool kDecay>
OK_LOOP void lamb_reduce_impl(const LambStep& s, const float* OK_RESTRICT p,
                              const float* OK_RESTRICT g, float* OK_RESTRICT m,
                              float* OK_RESTRICT v, size_t n, double* sums) {
  const float b1 = s.beta1, c1 = s.one_minus_beta1, b2 = s.beta2, c2 = s.one_minus_beta2,
              gs = s.grad.grad_scale;
  // LANES independent double sums per quantity, added in a fixed order (as lane_sum below).
  double pp[LANES] = {}, uu[LANES] = {};
  auto element = [&](size_t i, size_t j) {
    const float gi = g[i] * gs;
    const float mi = c1 * gi + b1 * m[i];
    const float vi = c2 * (gi * gi) + b2 * v[i];
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i];
    const float u = lamb_direction<kDecay>(s, pi, mi, vi);
    pp[j] += static_cast<double>(pi) * static_cast<double>(pi);
    uu[j] += static_cast<double>(u) * static_cast<double>(u);
  };
  size_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    OK_SIMD
    for (size_t j = 0; j < LANES; ++j) element(i + j, j);
  }
  for (size_t j = 0; i < n; ++i, ++j) element(i, j);
  double psum = 0.0, usum = 0.0;
  for (size_t j = 0; j < LANES; ++j) {
    psum += pp[j];
    usum += uu[j];
  }
  sums[0] = psum;
  sums[1] = usum;
}

template <bool kDecay>
OK_LOOP void lamb_impl(const LambStep& s, float* OK_RESTRICT p, const float* OK_RESTRICT m,
                       const float* OK_RESTRICT v, size_t n) {
  const float nlr = s.neg_lr, ratio = s.trust_ratio;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float pi = p[i];
    p[i] = pi + nlr * (lamb_direction<kDecay>(s, pi, m[i], v[i]) * ratio);
  }
}

void lamb_reduce(const LambStep& s, const float* p, const float* g, float* const* st, size_t n,
                 double* sums) {
  with_flag(s.grad.has_weight_decay, [&](auto decay) {
    lamb_reduce_impl<decltype(decay)::value>(s, p, g, st[0], st[1], n, sums);
  });
}

void lamb(const LambStep& s, float* p, const float*, float* const* st, size_t n) {
  with_flag(s.grad.has_weight_decay,
            [&](auto decay) { lamb_impl<decltype(decay)::value>(s, p, st[0], st[1], n); });
}

// ---------------------------------------------------------------------------------------------
// Schedule-Free AdamW and SGD (schedulefree 1.4), in the package's order of operations:
//   z = y on the first step
//   AdamW: exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
//          u = g / (sqrt(exp_avg_sq / (1 - beta2^t)) + eps)          SGD: u = g
//   u = u + weight_decay * y;  y = lerp(y, z, c) + y_coeff * u;  z = z + (-lr) * u
template <bool kAdam, bool kDecay, bool kInit>
OK_LOOP void schedule_free_impl(const ScheduleFreeStep& s, float* OK_RESTRICT p,
                                const float* OK_RESTRICT g, float* OK_RESTRICT z,
                                float* OK_RESTRICT v, size_t n) {
  const float b2 = s.beta2, w2 = s.one_minus_beta2, bc2 = s.bias_correction2, eps = s.eps,
              lc = s.average.coeff, yc = s.y_coeff, nlr = s.neg_lr, gs = s.grad.grad_scale,
              wd = s.grad.weight_decay;
  const bool from_y = s.average.from_start != 0.0f;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float yi = p[i];
    const float zi = kInit ? yi : z[i];
    float u = g[i] * gs;
    if (kAdam) {
      const float vi = moving_square(v[i], u, b2, w2);
      v[i] = vi;
      u = u / (OK_SQRT(vi / bc2) + eps);
    }
    if (kDecay) u = OK_FMA(wd, yi, u);
    const float avg = lerp(yi, zi, lc, from_y);
    p[i] = OK_FMA(yc, u, avg);
    z[i] = OK_FMA(nlr, u, zi);
  }
}

void sfadamw(const ScheduleFreeStep& s, float* p, const float* g, float* const* st, size_t n) {
  with_flag(s.grad.has_weight_decay, [&](auto decay) {
    with_flag(s.init_z, [&](auto init) {
      schedule_free_impl<true, decltype(decay)::value, decltype(init)::value>(s, p, g, st[0], st[1],
                                                                              n);
    });
  });
}

void sfsgd(const ScheduleFreeStep& s, float* p, const float* g, float* const* st, size_t n) {
  with_flag(s.grad.has_weight_decay, [&](auto decay) {
    with_flag(s.init_z, [&](auto init) {
      schedule_free_impl<false, decltype(decay)::value, decltype(init)::value>(s, p, g, st[0],
                                                                               nullptr, n);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Adafactor (torch.optim.Adafactor), a factored kernel (AdafactorStep in rules.hpp). Its states:
// st[0] row_var, st[1] col_var (factored tiles: a block of rows x columns of one matrix), st[2]
// variance (arrays of <= 1 dimension). Sums are kept in LANES double lanes by column (element)
// index within the tile and added in a fixed order, so a tile's sums do not depend on the thread
// that ran it.
//   pass 0: sum p^2; factored: the sums of g^2 per row and per column of the tile;
//           else: variance = lerp(variance, g^2, w)
//   pass 1: u = g / sqrt(max(v, eps1^2)); sum u^2
//   pass 2: p = p * (1 - lr * weight_decay) + coeff * u
// Factored, 1 / sqrt(max(v, eps1^2)) with v = row_var * col_var / mean is evaluated as
// min(row_scale[i] * col_scale[j], 1 / sqrt(eps1^2)), the two scales (1 / sqrt(row_var / mean),
// 1 / sqrt(col_var)) computed once per row and column by the host step (or, for the columns of
// a matrix held by one row tile, by pass 0): within a few float32
// roundings of torch's order, and no division or square root per element.
// Sums of squares in float over short runs (SEGMENT elements, SEGMENT / LANES terms per lane),
// each run then added in double: the cost of float arithmetic, nearly the accuracy of double
// (tests/test_adafactor.py holds the result to rtol 1e-5 of a float64 reference).
constexpr size_t SEGMENT = 1024;

// Pass 0 of a factored tile, one column block (at most BLOCK columns, so that rows of up to
// BLOCK elements are walked linearly) at a time: each run of SEGMENT elements of a row adds p^2
// and g^2 into float lanes, then into double; each column's g^2 goes into a float partial over
// the tile's rows (then into double).
constexpr size_t BLOCK = 16384;

// The sum of v[0, 2W) in float by a fixed tree of W, W / 2, ..., 1 vector additions.
template <size_t W>
inline float fold_lanes(float* v) {
  OK_SIMD
  for (size_t k = 0; k < W; ++k) v[k] += v[k + W];
  if constexpr (W > 1) {
    return fold_lanes<W / 2>(v);
  } else {
    return v[0];
  }
}

// Pass 0 of a tile holding every row of its matrix (FactoredTile::col_scale_out): the columns'
// part of the host step (adafactor_range, stage 0), in the same float and double operations as
// there (so the same bits): col_var <- lerp(col_var, sum * (1 / rows), w), scale = 1 /
// sqrt(col_var).
template <class T>
OK_LOOP void adafactor_finish_cols(const AdafactorStep& s, const FactoredTile& t, size_t c0,
                                   const T* OK_RESTRICT sums, size_t width) {
  const double inv_rows = 1.0 / static_cast<double>(t.rows);
  const float lc = s.var.coeff;
  const bool from_var = s.var.from_start != 0.0f;
  float* OK_RESTRICT c = t.state[1] + c0;
  float* OK_RESTRICT out = t.col_scale_out + c0;
  OK_SIMD
  for (size_t j = 0; j < width; ++j) {
    const float m = static_cast<float>(static_cast<double>(sums[j]) * inv_rows), c0j = c[j];
    const float v = (from_var ? c0j : m) + lc * (m - c0j);  // host_lerp's order, no FMA
    c[j] = v;
    out[j] = 1.0f / OK_SQRT(v);
  }
}

// Rows of fewer than LANES elements (tall, narrow matrices): lane j holds column j, and each row's
// g^2 is one float sum by fold_lanes (vector code: a sum in element order would keep the loop
// scalar); the float lanes go into double every NARROW_RUN rows.
constexpr size_t NARROW_RUN = 32;

OK_LOOP void adafactor_stats_narrow(const AdafactorStep& s, const FactoredTile& t) {
  const float gs = s.grad_scale;
  const size_t rows = t.rows, cols = t.cols, stride = t.stride;
  double col[LANES] = {}, acc[LANES] = {};
  float pf[LANES] = {}, cf[LANES] = {};
  for (size_t i0 = 0; i0 < rows; i0 += NARROW_RUN) {
    const size_t end = rows - i0 < NARROW_RUN ? rows : i0 + NARROW_RUN;
    for (size_t i = i0; i < end; ++i) {
      const float* OK_RESTRICT p = t.param + i * stride;
      const float* OK_RESTRICT g = t.grad + i * stride;
      float rf[LANES] = {};
      OK_SIMD
      for (size_t j = 0; j < cols; ++j) {
        const float gi = g[j] * gs, pi = p[j], sq = gi * gi;
        pf[j] = OK_FMA(pi, pi, pf[j]);
        cf[j] += sq;
        rf[j] = sq;
      }
      t.row_sums[i] = fold_lanes<LANES / 2>(rf);
    }
    for (size_t j = 0; j < LANES; ++j) {
      acc[j] += pf[j];
      pf[j] = 0.0f;
    }
    for (size_t j = 0; j < cols; ++j) {
      col[j] += cf[j];
      cf[j] = 0.0f;
    }
  }
  if (t.col_scale_out != nullptr) {
    adafactor_finish_cols(s, t, 0, col, cols);
  } else {
    for (size_t j = 0; j < cols; ++j) t.col_sums[j] = col[j];
  }
  double total = 0.0;
  for (size_t k = 0; k < LANES; ++k) total += acc[k];
  t.sums[0] = total;
}

OK_LOOP void adafactor_stats_factored(const AdafactorStep& s, const FactoredTile& t) {
  if (t.cols < LANES) {
    adafactor_stats_narrow(s, t);
    return;
  }
  const float gs = s.grad_scale;
  const size_t rows = t.rows, cols = t.cols, stride = t.stride;
  double* OK_RESTRICT col = t.col_sums;
  double acc[LANES] = {};
  for (size_t i = 0; i < rows; ++i) t.row_sums[i] = 0.0;
  float colf[BLOCK];
  for (size_t c0 = 0; c0 < cols; c0 += BLOCK) {
    const size_t width = cols - c0 < BLOCK ? cols - c0 : BLOCK;
    for (size_t j = 0; j < width; ++j) colf[j] = 0.0f;
    for (size_t i = 0; i < rows; ++i) {
      double row = 0.0;
      for (size_t s0 = 0; s0 < width; s0 += SEGMENT) {
        const size_t run = width - s0 < SEGMENT ? width - s0 : SEGMENT;
        const float* OK_RESTRICT p = t.param + i * stride + c0 + s0;
        const float* OK_RESTRICT g = t.grad + i * stride + c0 + s0;
        float* OK_RESTRICT cf = colf + s0;
        float pf[LANES] = {}, rf[LANES] = {};
        size_t j = 0;
        for (; j + LANES <= run; j += LANES) {
          prefetch_ahead(p, j);  // a read-only pass: see PREFETCH_AHEAD
          prefetch_ahead(g, j);
          OK_SIMD
          for (size_t k = 0; k < LANES; ++k) {
            const float gi = g[j + k] * gs, pi = p[j + k], sq = gi * gi;
            pf[k] = OK_FMA(pi, pi, pf[k]);
            rf[k] += sq;
            cf[j + k] += sq;
          }
        }
        for (size_t k = 0; j < run; ++j, ++k) {
          const float gi = g[j] * gs, pi = p[j], sq = gi * gi;
          pf[k] = OK_FMA(pi, pi, pf[k]);
          rf[k] += sq;
          cf[j] += sq;
        }
        for (size_t k = 0; k < LANES; ++k) acc[k] += pf[k];
        row += fold_lanes<LANES / 2>(rf);  // a fixed tree, then one double addition
      }
      t.row_sums[i] += row;
    }
    if (t.col_scale_out != nullptr) {
      adafactor_finish_cols(s, t, c0, colf, width);
    } else {
      for (size_t j = 0; j < width; ++j) col[c0 + j] = colf[j];
    }
  }
  double total = 0.0;
  for (size_t k = 0; k < LANES; ++k) total += acc[k];
  t.sums[0] = total;
}

OK_LOOP void adafactor_stats_vector(const AdafactorStep& s, const FactoredTile& t) {
  const float gs = s.grad_scale, lc = s.var.coeff;
  const bool from_var = s.var.from_start != 0.0f;
  const size_t n = t.cols;
  const float* OK_RESTRICT p = t.param;
  const float* OK_RESTRICT g = t.grad;
  float* OK_RESTRICT v = t.state[2];
  double acc[LANES] = {};
  auto element = [&](size_t i, size_t k) {
    const double pi = p[i];
    acc[k] += pi * pi;
    const float gi = g[i] * gs, sq = gi * gi, v0 = v[i];
    v[i] = OK_FMA(lc, sq - v0, from_var ? v0 : sq);
  };
  size_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    OK_SIMD
    for (size_t k = 0; k < LANES; ++k) element(i + k, k);
  }
  for (size_t k = 0; i < n; ++i, ++k) element(i, k);
  double total = 0.0;
  for (size_t k = 0; k < LANES; ++k) total += acc[k];
  t.sums[0] = total;
}

// The update's scale of one element: factored, min(row * col, cap) (NaN stays NaN); else
// 1 / sqrt(max(variance, eps1^2)) in torch's order.
template <bool kFactored>
float adafactor_scale(const AdafactorStep& s, float row, float col, float v) {
  if (kFactored) {
    const float x = row * col;
    return x > s.scale_cap ? s.scale_cap : x;
  }
  const float est = v < s.eps1_sq ? s.eps1_sq : v;  // clamp_(min=eps1^2): NaN stays NaN
  return 1.0f / OK_SQRT(est);
}

// Pass 1 over rows of fewer than LANES elements: lane j holds column j, into double every
// NARROW_RUN rows.
OK_LOOP void adafactor_norm_narrow(const AdafactorStep& s, const FactoredTile& t) {
  const float gs = s.grad_scale;
  const size_t rows = t.rows, cols = t.cols, stride = t.stride;
  const float* OK_RESTRICT cs = t.col_scale;
  double acc[LANES] = {};
  float uf[LANES] = {};
  for (size_t i0 = 0; i0 < rows; i0 += NARROW_RUN) {
    const size_t end = rows - i0 < NARROW_RUN ? rows : i0 + NARROW_RUN;
    for (size_t i = i0; i < end; ++i) {
      const float* OK_RESTRICT g = t.grad + i * stride;
      const float r = t.row_scale[i];
      OK_SIMD
      for (size_t j = 0; j < cols; ++j) {
        const float u = adafactor_scale<true>(s, r, cs[j], 0.0f) * (g[j] * gs);
        uf[j] = OK_FMA(u, u, uf[j]);
      }
    }
    for (size_t j = 0; j < LANES; ++j) {
      acc[j] += uf[j];
      uf[j] = 0.0f;
    }
  }
  double total = 0.0;
  for (size_t k = 0; k < LANES; ++k) total += acc[k];
  t.sums[0] = total;
}

template <bool kFactored>
OK_LOOP void adafactor_norm(const AdafactorStep& s, const FactoredTile& t) {
  if (kFactored && t.cols < LANES) {
    adafactor_norm_narrow(s, t);
    return;
  }
  const float gs = s.grad_scale;
  const size_t rows = t.rows, cols = t.cols, stride = t.stride;
  double acc[LANES] = {};
  for (size_t i = 0; i < rows; ++i) {
    const float r = kFactored ? t.row_scale[i] : 0.0f;
    for (size_t c0 = 0; c0 < cols; c0 += SEGMENT) {  // float lanes over a run, then double
      const size_t width = cols - c0 < SEGMENT ? cols - c0 : SEGMENT;
      const float* OK_RESTRICT g = t.grad + i * stride + c0;
      const float* OK_RESTRICT v = kFactored ? nullptr : t.state[2] + i * stride + c0;
      const float* OK_RESTRICT cs = kFactored ? t.col_scale + c0 : nullptr;
      float uf[LANES] = {};
      auto element = [&](size_t j, size_t k) {
        const float u =
            adafactor_scale<kFactored>(s, r, kFactored ? cs[j] : 0.0f, kFactored ? 0.0f : v[j]) *
            (g[j] * gs);
        uf[k] = OK_FMA(u, u, uf[k]);
      };
      size_t j = 0;
      for (; j + LANES <= width; j += LANES) {
        prefetch_ahead(g, j);  // a read-only pass over g: see PREFETCH_AHEAD
        OK_SIMD
        for (size_t k = 0; k < LANES; ++k) element(j + k, k);
      }
      for (size_t k = 0; j < width; ++j, ++k) element(j, k);
      for (size_t k = 0; k < LANES; ++k) acc[k] += uf[k];
    }
  }
  double total = 0.0;
  for (size_t k = 0; k < LANES; ++k) total += acc[k];
  t.sums[0] = total;
}

template <bool kFactored, bool kDecay>
OK_LOOP void adafactor_apply(const AdafactorStep& s, const FactoredTile& t) {
  const float gs = s.grad_scale, coeff = s.coeff, decay = s.decay;
  const size_t rows = t.rows, cols = t.cols, stride = t.stride;
  const float* OK_RESTRICT cs = t.col_scale;
  for (size_t i = 0; i < rows; ++i) {
    float* OK_RESTRICT p = t.param + i * stride;
    const float* OK_RESTRICT g = t.grad + i * stride;
    const float* OK_RESTRICT v = kFactored ? nullptr : t.state[2] + i * stride;
    const float r = kFactored ? t.row_scale[i] : 0.0f;
    OK_SIMD
    for (size_t j = 0; j < cols; ++j) {
      const float u =
          adafactor_scale<kFactored>(s, r, kFactored ? cs[j] : 0.0f, kFactored ? 0.0f : v[j]) *
          (g[j] * gs);
      const float pi = kDecay ? p[j] * decay : p[j];
      p[j] = OK_FMA(coeff, u, pi);
    }
  }
}

void adafactor_pass(const AdafactorStep& s, int pass, const FactoredTile& t) {
  with_flag(t.state[0] != nullptr, [&](auto factored) {
    constexpr bool kFactored = decltype(factored)::value;
    if (pass == 0) {
      if (kFactored) {
        adafactor_stats_factored(s, t);
      } else {
        adafactor_stats_vector(s, t);
      }
    } else if (pass == 1) {
      adafactor_norm<kFactored>(s, t);
    } else {
      with_flag(s.has_decay,
                [&](auto decay) { adafactor_apply<kFactored, decltype(decay)::value>(s, t); });
    }
  });
}

// The element-wise slot: the last pass over a span of an array of <= 1 dimension.
void adafactor(const AdafactorStep& s, float* p, const float* g, float* const* st, size_t n) {
  FactoredTile t{};
  t.param = p;
  t.grad = g;
  t.state[2] = st[2];
  t.rows = 1;
  t.cols = t.stride = n;
  adafactor_pass(s, 2, t);
}

#define OPTKERN_KERNEL_ENTRY(name, S, states, weight) name,
constexpr KernelTable kTable = {
    OPTKERN_KERNELS(OPTKERN_KERNEL_ENTRY)
#define OPTKERN_REDUCE_ENTRY(name, n_sums) name##_reduce,
        OPTKERN_REDUCTIONS(OPTKERN_REDUCE_ENTRY)
#undef OPTKERN_REDUCE_ENTRY
#define OPTKERN_FACTORED_ENTRY(name, n_passes) name##_pass,
            OPTKERN_FACTORED(OPTKERN_FACTORED_ENTRY)
#undef OPTKERN_FACTORED_ENTRY
    /*norm_block=*/norm_block,
    /*scale=*/scale,
    /*clamp=*/clamp,
    /*axpy=*/axpy,
    /*fused_multiply_add=*/OK_FUSED,
};

}  // namespace

const KernelTable* kernel_table() { return &kTable; }

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
