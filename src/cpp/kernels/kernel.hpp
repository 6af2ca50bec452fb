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

#include <bit>
#include <cstddef>
#include <cstdint>

#include "kernel_api.hpp"

#ifndef OPTKERN_ISA_NS
#error "compile kernel units once per ISA with -DOPTKERN_ISA_NS=<isa> (src/cpp/isa_builds.txt)"
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

// x86-64: AVX2 and AVX-512 fuse (-mfma), the baseline (SSE2) does not. aarch64: every build fuses,
// NEON included: fused multiply-add is part of the base architecture (FMLA, FMADD), so NEON and
// SVE compute the same expressions and agree bit for bit.
#if (defined(__FMA__) || defined(__ARM_FEATURE_FMA)) && (defined(__GNUC__) || defined(__clang__))
constexpr bool kFusedMultiplyAdd = true;
float fused_multiply_add(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
double fused_multiply_add(double a, double b, double c) { return __builtin_fma(a, b, c); }
#else
constexpr bool kFusedMultiplyAdd = false;
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
// rounds to nearest even); bfloat16 and float16 by the bit operations below, which every ISA
// build vectorises and computes alike. The rules' loops are compiled for float and double; the
// 16-bit and 8-bit types reach them through the staged entries (kernels/staging.cpp).

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
template <>
struct ElementType<bfloat16> {
  using compute = float;
  static constexpr DType dtype = DType::bf16;
};
template <>
struct ElementType<float16> {
  using compute = float;
  static constexpr DType dtype = DType::f16;
};

std::uint32_t bits_of(float x) { return std::bit_cast<std::uint32_t>(x); }
float float_of(std::uint32_t u) { return std::bit_cast<float>(u); }

// bfloat16 is the high half of a float32: widening is exact; narrowing rounds the low half to
// nearest even, and a NaN stays a (quiet) NaN of its sign, as torch and ml_dtypes convert.
float bf16_to_float(std::uint16_t h) { return float_of(static_cast<std::uint32_t>(h) << 16); }
std::uint16_t float_to_bf16(float x) {
  const std::uint32_t u = bits_of(x);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// IEEE half: 5 exponent bits, 10 mantissa bits. Subnormal halves (below 2^-14) are multiples
// of 2^-24, which float32 holds exactly: widening multiplies the count, narrowing lets a float
// addition round at that spacing (adding 0.5 puts 2^-24 in the last mantissa bit).
float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = (static_cast<std::uint32_t>(h) & 0x8000u) << 16;
  const std::uint32_t em = static_cast<std::uint32_t>(h) & 0x7fffu;
  const std::uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  const std::uint32_t inf_nan = (em << 13) | 0x7f800000u;
  const float subnormal =
      static_cast<float>(static_cast<std::int32_t>(em)) * 5.9604644775390625e-8f;
  // Selected by masks: GCC keeps a loop with nested selects of this function scalar ("control
  // flow in loop"), and vectorises the masks.
  const std::uint32_t big = 0u - static_cast<std::uint32_t>(em >= 0x7c00u);
  const std::uint32_t norm = 0u - static_cast<std::uint32_t>(em >= 0x0400u);
  const std::uint32_t r = (inf_nan & big) | (normal & norm & ~big) | (bits_of(subnormal) & ~norm);
  return float_of(r | sign);
}
std::uint16_t float_to_f16(float x) {
  const std::uint32_t u = bits_of(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  const std::uint32_t normal = (a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const std::uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3f000000u;
  // NaN (a quiet one), or Inf and overflow: 0x7c00 | 0x200 for a NaN, by a mask
  const std::uint32_t big = 0x7c00u | (0x200u & (0u - static_cast<std::uint32_t>(a > 0x7f800000u)));
  // 65520 (0x477ff000) and above round to Inf; 2^-14 (0x38800000) is the least normal half.
  // Selected by masks, as in f16_to_float.
  const std::uint32_t over = 0u - static_cast<std::uint32_t>(a >= 0x477ff000u);
  const std::uint32_t norm = 0u - static_cast<std::uint32_t>(a >= 0x38800000u);
  const std::uint32_t r = (big & over) | (normal & norm & ~over) | (subnormal & ~norm);
  return static_cast<std::uint16_t>(r | sign);
}

template <class R, class Stored>
R load(const Stored& x) {
  return static_cast<R>(x);
}
template <class R>
R load(const bfloat16& x) {
  return static_cast<R>(bf16_to_float(x.bits));
}
template <class R>
R load(const float16& x) {
  return static_cast<R>(f16_to_float(x.bits));
}
template <class Stored, class R>
void store(Stored& to, R v) {
  to = static_cast<Stored>(v);
}
template <class R>
void store(bfloat16& to, R v) {
  to.bits = float_to_bf16(static_cast<float>(v));
}
template <class R>
void store(float16& to, R v) {
  to.bits = float_to_f16(static_cast<float>(v));
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
// gradient of either type, its states in the parameter's type; and the common 16-bit ones,
// computed in float32 with each operand converted as it is loaded and stored: a bfloat16 or
// float16 parameter with a gradient of its type or float32 and float32 state, float32 with
// bfloat16 state, and all bfloat16. Each combination costs every rule's loops once more in every
// ISA build (compile time, and binary size: about 150 KB per combination), so they are listed,
// not crossed: every other combination the bindings accept (other gradient types, int8 state,
// stochastic rounding, master copies) takes the rule's staged entry (update.hpp).
using Instantiated = TypeList<Types<float, float, float>, Types<float, double, float>,
                              Types<double, double, double>, Types<double, float, double>,
                              Types<bfloat16, bfloat16, float>, Types<bfloat16, float, float>,
                              Types<float16, float16, float>, Types<float16, float, float>,
                              Types<float, float, bfloat16>, Types<bfloat16, bfloat16, bfloat16>>;

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
// Xeon of bench/README.md. (The update kernels ask ahead too, in pieces: kernels/rule.cpp.)
constexpr size_t PREFETCH_AHEAD_BYTES = 4096;

template <class T>
void prefetch_ahead(const T* x, size_t i) {
  const char* at = reinterpret_cast<const char*>(x + i) + PREFETCH_AHEAD_BYTES;
  OK_PREFETCH(at);
  OK_PREFETCH(at + 64);
}

// Asks for the cache lines of x[0, n) (the streaming pieces of kernels/rule.cpp and staging.cpp).
template <class T>
void prefetch_lines(const T* x, size_t n) {
  const char* at = reinterpret_cast<const char*>(x);
  for (size_t b = 0; b < n * sizeof(T); b += 64) OK_PREFETCH(at + b);
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

// -- the staged entries' conversions (kernels/staging.cpp, once per ISA)
// ---------------------------- Each converts n elements (n <= Q8_BLOCK) between a storage type and
// float32 on the stack.

// out = x as float32: bfloat16, float16 (exact) or float64 (rounded to nearest even).
void widen(DType type, const void* x, float* out, size_t n);
// out = x rounded to nearest even into bfloat16 or float16.
void narrow(DType type, const float* x, void* out, size_t n);
// out = x rounded stochastically into bfloat16 or float16: up with the probability of x's
// distance from the value below, by the noise of (key, element index) for the elements
// [first, first + n) of the tensor, so the result depends on neither the thread nor the ISA.
void narrow_stochastic(DType type, const float* x, void* out, size_t n, std::uint32_t key,
                       size_t first);
// The q8 codes of one block of x (bitsandbytes' dynamic map: unsigned where `nonnegative`),
// returning the block's absmax; and back.
float quantize(const float* x, bool nonnegative, std::uint8_t* out, size_t n);
void dequantize(const std::uint8_t* q, float absmax, bool nonnegative, float* out, size_t n);

// One block of a staged entry's operands as float32 arrays: an operand stored in float32 in
// place, the others widened (dequantised) into the stack buffers of Stage. With master weights
// the rule's parameter is the float32 master copy.
struct alignas(64) Stage {
  float param[Q8_BLOCK];
  float grad[Q8_BLOCK];
  float state[MAX_STATES][Q8_BLOCK];
};
struct StagedBlock {
  float* param;
  const float* grad;
  float* state[MAX_STATES];
};
// Block [b, b + n) of op (b a multiple of Q8_BLOCK, n <= Q8_BLOCK). `nonnegative`: the kernel's
// KernelDecl::nonnegative_states.
StagedBlock stage_in(const Operands& op, size_t b, size_t n, Stage& buf, unsigned nonnegative);
// Asks for the cache lines of block [b, b + Q8_BLOCK) of every operand of op.
void prefetch_block(const Operands& op, size_t b);
// Writes back what the pass wrote: the parameter (rounded to its type, stochastically when asked,
// or from the master copy) if `param_written`, the 16-bit and q8 states if `states_written`.
void stage_out(const Operands& op, size_t b, size_t n, const StagedBlock& block,
               unsigned nonnegative, bool param_written, bool states_written);

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
