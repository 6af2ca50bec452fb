// What every kernel translation unit starts with: the element types and their per-ISA loads and
// stores, the macros and small helpers the element-wise loops are written with, and the helpers
// several rules share.
//
// CMake compiles each kernel unit (kernels/rule.cpp once per rule, kernels/norms.cpp,
// kernels/table.cpp) once per ISA, each time with -DOPTKERN_ISA_NS=<isa> and that ISA's flags.
// The loops are plain element-wise C++ that the compiler vectorises (`#pragma omp simd`,
// restrict pointers, -fno-math-errno for sqrt); each element is read once and written once, with
// no temporaries, which is the whole point.
//
// Rules for kernel code: everything lives in the ISA namespace, helpers in an anonymous namespace
// (internal linkage), and no inline functions from shared headers: the linker could otherwise
// keep the AVX-512 copy of a shared inline function for the baseline code. This header opens and
// closes that anonymous namespace itself; include it only from kernel units.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernel_api.hpp"

#ifndef OPTKERN_ISA_NS
#error "compile kernel units once per ISA with -DOPTKERN_ISA_NS=<scalar|avx2|avx512>"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define OK_RESTRICT __restrict__
#define OK_SIMD _Pragma("omp simd")
#define OK_LOOP __attribute__((noinline))  // one symbol per variant: bench/instructions.py reads it
#define OK_PREFETCH(p) __builtin_prefetch(p)
#else
#include <cmath>
#include <limits>
#define OK_RESTRICT __restrict
#define OK_SIMD __pragma(omp simd)
#define OK_LOOP
#define OK_PREFETCH(p) ((void)0)
#endif

// a * b + c. Where the ISA has FMA it is one fused operation, written out here because the
// kernels are compiled with -ffp-contract=off: left to itself, the compiler fuses the vector loop
// and its scalar remainder differently, and then an element's result would depend on where a
// thread's range happens to end. Written out, every element of one ISA build computes the same
// expression, so results are bit-identical for any thread count. Its operands are all float or
// all double (a mix does not compile).
#define OK_FMA(a, b, c) ::optkern::OPTKERN_ISA_NS::fused_multiply_add((a), (b), (c))
// sqrt and |x| of a float or a double, in its own type.
#define OK_SQRT(x) ::optkern::OPTKERN_ISA_NS::square_root(x)
#define OK_FABS(x) ::optkern::OPTKERN_ISA_NS::absolute(x)

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

using std::size_t;

#if defined(__FMA__) && (defined(__GNUC__) || defined(__clang__))
float fused_multiply_add(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
double fused_multiply_add(double a, double b, double c) { return __builtin_fma(a, b, c); }
#else
float fused_multiply_add(float a, float b, float c) { return a * b + c; }
double fused_multiply_add(double a, double b, double c) { return a * b + c; }
#endif

#if defined(__GNUC__) || defined(__clang__)
float square_root(float x) { return __builtin_sqrtf(x); }
double square_root(double x) { return __builtin_sqrt(x); }
float absolute(float x) { return __builtin_fabsf(x); }
double absolute(double x) { return __builtin_fabs(x); }
double power(double x, double y) { return __builtin_pow(x, y); }
double quiet_nan() { return __builtin_nan(""); }
#else
float square_root(float x) { return std::sqrt(x); }
double square_root(double x) { return std::sqrt(x); }
float absolute(float x) { return std::fabs(x); }
double absolute(double x) { return std::fabs(x); }
double power(double x, double y) { return std::pow(x, y); }
double quiet_nan() { return std::numeric_limits<double>::quiet_NaN(); }
#endif

// -- element types: how each storage type is loaded and stored ------------------------------------
// A kernel computes in its parameter's compute type R and converts every operand as it reads or
// writes it, in registers, never as a copy. float and double convert by the hardware (a store
// rounds to nearest even). A 16-bit or 8-bit type adds its own load and store here (and its
// DType and combinations below); the rules' loops stay as they are.

template <class Stored>
struct ElementType;  // what a kernel knows of a storage type
template <>
struct ElementType<float> {
  using compute = float;  // the compute type of a parameter stored as this type
  static constexpr DType dtype = DType::f32;
};
template <>
struct ElementType<double> {
  using compute = double;
  static constexpr DType dtype = DType::f64;
};

template <class R, class Stored>
R load(const Stored& x) {
  return static_cast<R>(x);
}
template <class Stored, class R>
void store(Stored& to, R v) {
  to = static_cast<Stored>(v);
}

// The element types of one kernel entry: parameter, gradient and states, and the compute type.
template <class P_, class G_, class S_>
struct Types {
  using P = P_;
  using G = G_;
  using S = S_;
  using R = typename ElementType<P_>::compute;
};
template <class T>
using Real = typename T::R;
template <class T>
using Param = typename T::P;
template <class T>
using Grad = typename T::G;
template <class T>
using State = typename T::S;

template <class... T>
struct TypeList {};

// The combinations of element types every rule's kernel is compiled for, each an entry of its
// KernelSet (the driver picks the entry per tensor): a float32 or float64 parameter with a
// gradient of either type, its states in the parameter's type. Each combination costs every
// rule's loops once more in every ISA build (compile time, and binary size: about 150 KB per
// combination); the bindings accept exactly these (bindings/arrays.hpp).
using Instantiated = TypeList<Types<float, float, float>, Types<float, double, float>,
                              Types<double, double, double>, Types<double, float, double>>;

// -- helpers of the element-wise loops
// -------------------------------------------------------------

template <bool B>
struct Flag {
  static constexpr bool value = B;
};

// Calls f(Flag<b>{}), so a runtime choice becomes a compile-time one outside the element loop.
template <class F>
void with_flag(bool b, F&& f) {
  if (b) {
    f(Flag<true>{});
  } else {
    f(Flag<false>{});
  }
}

// The first thing every rule does to an element's gradient (GradientPrep in kernel_api.hpp).
template <bool kDecay, class R>
R prepared_gradient(R g, R p, R grad_scale, R weight_decay) {
  const R scaled = g * grad_scale;
  return kDecay ? OK_FMA(weight_decay, p, scaled) : scaled;
}

// torch's start.lerp_(end, w) for one element, in the form the host picked for w (Lerp in
// kernel_api.hpp): start + coeff * (end - start) or end + coeff * (end - start).
template <class R>
R lerp(R start, R end, R coeff, bool from_start) {
  return OK_FMA(coeff, end - start, from_start ? start : end);
}

// A moving average of squares, torch's avg.mul_(decay).addcmul_(x, x, value=1 - decay): decay *
// avg + ((1 - decay) * x) * x, in that order (Adam's exp_avg_sq, RMSprop's square_avg, ...).
template <class R>
R moving_square(R avg, R x, R decay, R one_minus_decay) {
  return OK_FMA(decay, avg, (one_minus_decay * x) * x);
}

// Sums are kept in LANES independent partial sums (element i goes to lane i % LANES), added up
// in a fixed order at the end: one accumulator would make every addition wait for the last
// (a 4-cycle chain), several let the reduction run at memory speed. The order is the same for
// every call, so the result is too.
constexpr size_t LANES = 32;

// A read-only pass has one stream per thread, which the hardware prefetcher alone does not keep
// busy: asking for the data 4 KB ahead made the 50M-element norm 1.5x faster on the 2-core
// Xeon of bench/README.md (the update kernels, with 3 to 5 streams each, gained nothing).
constexpr size_t PREFETCH_AHEAD_BYTES = 4096;

template <class T>
void prefetch_ahead(const T* x, size_t i) {
  const char* at = reinterpret_cast<const char*>(x + i) + PREFETCH_AHEAD_BYTES;
  OK_PREFETCH(at);
  OK_PREFETCH(at + 64);
}

// -- shared by several rules
// ------------------------------------------------------------------------

// Adam's moments of one element, shared by Adam, AdamW, NAdam and RAdam (their step structs name
// the same fields): the parameter decayed (decoupled weight decay), the gradient prepared from
// it, exp_avg and exp_avg_sq updated in place; returned for the rule's update. Built from the step
// struct once per call, outside the element loop.
template <class R, bool kL2, bool kDecoupled>
struct AdamMoments {
  struct Element {
    R p, g, m, v;
  };
  R lc, b2, w2, decay, gs, wd;
  bool from_avg;
  template <class Step>
  explicit AdamMoments(const Step& s)
      : lc(s.exp_avg.coeff),
        b2(s.beta2),
        w2(s.one_minus_beta2),
        decay(s.decoupled_decay),
        gs(s.grad.grad_scale),
        wd(s.grad.weight_decay),
        from_avg(s.exp_avg.from_start != R(0)) {}
  template <class S>
  Element operator()(R p, R g, S& m, S& v) const {
    if (kDecoupled) p *= decay;
    const R gi = prepared_gradient<kL2>(g, p, gs, wd);
    const R mi = lerp(load<R>(m), gi, lc, from_avg);
    const R vi = moving_square(load<R>(v), gi, b2, w2);
    store(m, mi);
    store(v, vi);
    return {p, gi, mi, vi};
  }
};

}  // namespace
}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
