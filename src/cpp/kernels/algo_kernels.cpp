// The fused passes of Muon and L-BFGS (algo_api.hpp), written once, ISA-neutral.
//
// CMake compiles this file once per ISA, beside the rules' kernels, with -DOPTKERN_ISA_NS=<isa>
// and that ISA's flags; kernels/kernel.hpp's rules and helpers hold here too (everything in the
// ISA namespace, helpers with internal linkage, FMAs written out, -ffp-contract=off).
//
// Sums: each run of RUN elements is added in DOT_LANES float lanes (element i into lane i %
// DOT_LANES), the lanes then in a fixed order in double, and the runs in double: the same result
// for any split of the work between threads (the host fixes the blocks), within a few float
// roundings of an exact sum over a run.
#include "algo_api.hpp"
#include "kernels/kernel.hpp"

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

using std::size_t;

constexpr size_t DOT_LANES = 16;
constexpr size_t RUN = 256;  // a multiple of DOT_LANES

// The larger of m and |x|, NaN once either is NaN (as torch's max of abs).
float larger_abs(float m, float x) {
  const float a = OK_FABS(x);
  return (a > m || a != a) ? a : m;
}

double lanes_sum(const float* acc) {
  double s = 0.0;
  for (size_t l = 0; l < DOT_LANES; ++l) s += acc[l];
  return s;
}

double lanes_max(const float* acc) {
  float m = acc[0];
  for (size_t l = 1; l < DOT_LANES; ++l) m = larger_abs(m, acc[l]);
  return m;
}

template <bool kNesterov>
OK_LOOP double muon_momentum_impl(const MuonMomentum& m, const float* OK_RESTRICT g,
                                  float* OK_RESTRICT buf, float* OK_RESTRICT out, size_t n) {
  const float gs = m.grad_scale, bc = m.buf_coeff, bf = m.buf_from_start, oc = m.out_coeff,
              of = m.out_from_start;
  double total = 0.0;
  for (size_t r = 0; r < n; r += RUN) {
    const size_t e = r + RUN < n ? r + RUN : n;
    float acc[DOT_LANES] = {};
    auto element = [&](size_t i, size_t l) {
      const float gi = g[i] * gs;
      const float bi = lerp(buf[i], gi, bc, bf != 0.0f);
      buf[i] = bi;
      const float oi = kNesterov ? lerp(gi, bi, oc, of != 0.0f) : bi;
      out[i] = oi;
      acc[l] = OK_FMA(oi, oi, acc[l]);
    };
    size_t i = r;
    for (; i + DOT_LANES <= e; i += DOT_LANES) {
      OK_SIMD
      for (size_t l = 0; l < DOT_LANES; ++l) element(i + l, l);
    }
    for (size_t l = 0; i < e; ++i, ++l) element(i, l);
    total += lanes_sum(acc);
  }
  return total;
}

double muon_momentum(const MuonMomentum& m, const float* g, float* buf, float* out, size_t n) {
  return m.nesterov ? muon_momentum_impl<true>(m, g, buf, out, n)
                    : muon_momentum_impl<false>(m, g, buf, out, n);
}

OK_LOOP void muon_update(float* OK_RESTRICT p, const float* OK_RESTRICT u, float decay, float coeff,
                         size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) p[i] = OK_FMA(coeff, u[i], p[i] * decay);
}

OK_LOOP void lbfgs_new_pair(const LbfgsHistory& a, size_t n, double* sums) {
  const float* OK_RESTRICT g = a.g;
  float* OK_RESTRICT gp = a.gp;
  const float* OK_RESTRICT d = a.d;
  float* OK_RESTRICT y = a.y;
  float* OK_RESTRICT s = a.s;
  const float t = a.t;
  for (size_t r = 0; r < n; r += RUN) {
    const size_t e = r + RUN < n ? r + RUN : n;
    float ys[DOT_LANES] = {}, yy[DOT_LANES] = {}, gs[DOT_LANES] = {}, gy[DOT_LANES] = {};
    auto element = [&](size_t i, size_t l) {
      const float gi = g[i];
      const float yi = gi - gp[i];
      const float si = t * d[i];
      gp[i] = gi;
      y[i] = yi;
      s[i] = si;
      ys[l] = OK_FMA(yi, si, ys[l]);
      yy[l] = OK_FMA(yi, yi, yy[l]);
      gs[l] = OK_FMA(gi, si, gs[l]);
      gy[l] = OK_FMA(gi, yi, gy[l]);
    };
    size_t i = r;
    for (; i + DOT_LANES <= e; i += DOT_LANES) {
      OK_SIMD
      for (size_t l = 0; l < DOT_LANES; ++l) element(i + l, l);
    }
    for (size_t l = 0; i < e; ++i, ++l) element(i, l);
    sums[0] += lanes_sum(ys);
    sums[1] += lanes_sum(yy);
    sums[2] += lanes_sum(gs);
    sums[3] += lanes_sum(gy);
  }
}

OK_LOOP void lbfgs_pair(const float* OK_RESTRICT sj, const float* OK_RESTRICT yj,
                        const float* OK_RESTRICT y, const float* OK_RESTRICT s,
                        const float* OK_RESTRICT g, size_t n, double* sums) {
  for (size_t r = 0; r < n; r += RUN) {
    const size_t e = r + RUN < n ? r + RUN : n;
    float a0[DOT_LANES] = {}, a1[DOT_LANES] = {}, a2[DOT_LANES] = {}, a3[DOT_LANES] = {},
          a4[DOT_LANES] = {};
    auto element = [&](size_t i, size_t l) {
      const float si = sj[i], yi = yj[i];
      a0[l] = OK_FMA(si, y[i], a0[l]);
      a1[l] = OK_FMA(si, g[i], a1[l]);
      a2[l] = OK_FMA(yi, y[i], a2[l]);
      a3[l] = OK_FMA(yi, s[i], a3[l]);
      a4[l] = OK_FMA(yi, g[i], a4[l]);
    };
    size_t i = r;
    for (; i + DOT_LANES <= e; i += DOT_LANES) {
      OK_SIMD
      for (size_t l = 0; l < DOT_LANES; ++l) element(i + l, l);
    }
    for (size_t l = 0; i < e; ++i, ++l) element(i, l);
    sums[0] += lanes_sum(a0);
    sums[1] += lanes_sum(a1);
    sums[2] += lanes_sum(a2);
    sums[3] += lanes_sum(a3);
    sums[4] += lanes_sum(a4);
  }
}

void lbfgs_pairs(const float* y, const float* s, const float* g, const float* const* S,
                 const float* const* Y, size_t k, size_t n, double* sums) {
  for (size_t i = 0; i < LBFGS_PAIR_SUMS * k; ++i) sums[i] = 0.0;
  for (size_t j = 0; j < k; ++j) {
    if (j + 1 < k) {  // the next pair's first lines, before its streams start
      OK_PREFETCH(S[j + 1]);
      OK_PREFETCH(Y[j + 1]);
    }
    lbfgs_pair(S[j], Y[j], y, s, g, n, sums + LBFGS_PAIR_SUMS * j);
  }
}

void lbfgs_history(const LbfgsHistory& a, size_t n, double* sums) {
  for (size_t i = 0; i < LBFGS_NEW_SUMS; ++i) sums[i] = 0.0;
  lbfgs_new_pair(a, n, sums);
  lbfgs_pairs(a.y, a.s, a.g, a.S, a.Y, a.k, n, sums + LBFGS_NEW_SUMS);
}

OK_LOOP void scale_into(float* OK_RESTRICT d, const float* OK_RESTRICT g, float c, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) d[i] = c * g[i];
}

OK_LOOP void add_pair(float* OK_RESTRICT d, const float* OK_RESTRICT y, float cy,
                      const float* OK_RESTRICT s, float cs, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) d[i] = OK_FMA(cs, s[i], OK_FMA(cy, y[i], d[i]));
}

// sums: [g.x, max |x|] over [0, n).
OK_LOOP void dot_and_max(const float* OK_RESTRICT g, const float* OK_RESTRICT x, size_t n,
                         double* sums) {
  double dot = 0.0;
  float mx[DOT_LANES] = {};
  for (size_t r = 0; r < n; r += RUN) {
    const size_t e = r + RUN < n ? r + RUN : n;
    float acc[DOT_LANES] = {};
    auto element = [&](size_t i, size_t l) {
      acc[l] = OK_FMA(g[i], x[i], acc[l]);
      mx[l] = larger_abs(mx[l], x[i]);
    };
    size_t i = r;
    for (; i + DOT_LANES <= e; i += DOT_LANES) {
      OK_SIMD
      for (size_t l = 0; l < DOT_LANES; ++l) element(i + l, l);
    }
    for (size_t l = 0; i < e; ++i, ++l) element(i, l);
    dot += lanes_sum(acc);
  }
  sums[0] = dot;
  sums[1] = lanes_max(mx);
}

void lbfgs_direction(const LbfgsDirection& a, size_t n, double* sums) {
  scale_into(a.d, a.g, a.cg, n);
  for (size_t j = 0; j < a.k; ++j) {
    if (j + 1 < a.k) {
      OK_PREFETCH(a.S[j + 1]);
      OK_PREFETCH(a.Y[j + 1]);
    }
    add_pair(a.d, a.Y[j], a.cy[j], a.S[j], a.cs[j], n);
  }
  dot_and_max(a.g, a.d, n, sums);
}

OK_LOOP void copy_into(float* OK_RESTRICT out, const float* OK_RESTRICT g, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) out[i] = g[i];
}

void lbfgs_take(const float* g, float* out, const float* d, size_t n, double* sums) {
  copy_into(out, g, n);
  double s[2];
  dot_and_max(d, out, n, s);  // g.d and max |g|
  sums[0] = s[0];
  sums[1] = s[1];
}

OK_LOOP void lbfgs_point(float* OK_RESTRICT p, const float* OK_RESTRICT x,
                         const float* OK_RESTRICT d, float t, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) p[i] = OK_FMA(t, d[i], x[i]);
}

const AlgoKernels kTable = {
    muon_momentum,   muon_update, lbfgs_history, lbfgs_pairs,
    lbfgs_direction, lbfgs_take,  lbfgs_point,
};

}  // namespace

const AlgoKernels* algo_kernels() { return &kTable; }

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
