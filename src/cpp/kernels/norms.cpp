// Gradient norms and clipping, and the benchmark's bandwidth yardstick, for one ISA build (compiled
// once per ISA, like the rules' kernels: see kernels/kernel.hpp). Each block's sum is accumulated
// in double (a float squared is exact in double); the caller adds the blocks up in a fixed order,
// so the result does not depend on the number of threads.
#include "kernels/kernel.hpp"

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

template <class T, class Term>
OK_LOOP double lane_sum(const T* OK_RESTRICT x, size_t n, Term term) {
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

template <class T>
double sum_squares(const T* x, size_t n) {
  return lane_sum(x, n, [](double v) { return v * v; });
}

template <class T>
double sum_abs(const T* x, size_t n) {
  return lane_sum(x, n, [](double v) { return OK_FABS(v); });
}

template <class T>
OK_LOOP double max_abs(const T* OK_RESTRICT x, size_t n) {
  // The NaN flags in T: flags of another width keep the double loop scalar on SSE2.
  T m[LANES] = {};
  T nan[LANES] = {};
  size_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    prefetch_ahead(x, i);
    OK_SIMD
    for (size_t j = 0; j < LANES; ++j) {
      const T a = OK_FABS(x[i + j]);
      m[j] = a > m[j] ? a : m[j];
      nan[j] = a != a ? T(1) : nan[j];
    }
  }
  for (size_t j = 0; i < n; ++i, ++j) {
    const T a = OK_FABS(x[i]);
    m[j] = a > m[j] ? a : m[j];
    nan[j] = a != a ? T(1) : nan[j];
  }
  T best = 0;
  bool any_nan = false;
  for (size_t j = 0; j < LANES; ++j) {
    best = m[j] > best ? m[j] : best;
    any_nan = any_nan || nan[j] != T(0);
  }
  return any_nan ? quiet_nan() : static_cast<double>(best);
}

template <class T>
double sum_pow(const T* OK_RESTRICT x, size_t n, double p) {
  double acc = 0.0;  // rare norm types: plain loop, pow in double
  for (size_t i = 0; i < n; ++i) acc += power(OK_FABS(static_cast<double>(x[i])), p);
  return acc;
}

template <class T>
double norm_block(const void* data, size_t n, double p) {
  const T* x = static_cast<const T*>(data);
  if (p == 2.0) return sum_squares(x, n);
  if (p == 1.0) return sum_abs(x, n);
  if (p > 1e300) return max_abs(x, n);  // p = inf
  return sum_pow(x, n, p);
}

template <class T>
OK_LOOP void scale_loop(T* OK_RESTRICT x, size_t n, T c) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) x[i] *= c;
}

template <class T>
void scale(void* x, size_t n, double c) {
  scale_loop(static_cast<T*>(x), n, static_cast<T>(c));
}

template <class T>
OK_LOOP void clamp_loop(T* OK_RESTRICT x, size_t n, T lo, T hi) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    T v = x[i];
    v = v < lo ? lo : v;
    x[i] = v > hi ? hi : v;
  }
}

template <class T>
void clamp(void* x, size_t n, double lo, double hi) {
  clamp_loop(static_cast<T*>(x), n, static_cast<T>(lo), static_cast<T>(hi));
}

}  // namespace

// kernels/table.cpp's pieces of this ISA's table: by DType.
extern const NormKernels norm_kernels[DTYPE_COUNT] = {
    {&norm_block<float>, &scale<float>, &clamp<float>},
    {&norm_block<double>, &scale<double>, &clamp<double>},
};
static_assert(static_cast<int>(DType::f32) == 0 && static_cast<int>(DType::f64) == 1);

void axpy(float* OK_RESTRICT a, const float* OK_RESTRICT b, float s, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) a[i] = OK_FMA(s, b[i], a[i]);
}

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
