// The fused passes of the optimizers that are not one element-wise rule (Muon, L-BFGS): their
// argument structs and the table of entry points each ISA build of kernels/algo_kernels.cpp
// fills in. Like kernel_api.hpp, no inline functions: this header is included by translation
// units compiled for different ISAs.
#pragma once

#include <cstddef>

namespace optkern {

// Elements per block of a pass that sums: each block's sums are computed on one thread in a
// fixed order (float lanes over runs of 256 elements, the runs added in double) and the blocks
// are added in block order, so the sums do not depend on the number of threads.
constexpr std::size_t ALGO_BLOCK = 4096;

// Muon's momentum: buf <- lerp(buf, s * g, 1 - momentum); out <- lerp(s * g, buf, momentum)
// (nesterov) or buf. Each lerp in torch's form (base + coeff * (end - start), base the start
// for |w| < 0.5, else the end, coeff = w or w - 1).
struct MuonMomentum {
  float buf_coeff, buf_from_start;  // buf.lerp_(g, 1 - momentum)
  float out_coeff, out_from_start;  // g.lerp(buf, momentum)
  float grad_scale;
  bool nesterov;
};

// One block of L-BFGS's history pass: y <- g - gp, s <- t d, gp <- g, and the inner products of
// the new pair and of the gradient with every pair (s_j, y_j) of the history (k of them).
struct LbfgsHistory {
  const float* g;
  float* gp;
  const float* d;
  float t;
  float* y;
  float* s;
  const float* const* S;  // k pointers, each at this block's first element
  const float* const* Y;
  std::size_t k;
};
// sums: [y.s, y.y, g.s, g.y], then for each j: [s_j.y, s_j.g, y_j.y, y_j.s, y_j.g].
constexpr std::size_t LBFGS_NEW_SUMS = 4;
constexpr std::size_t LBFGS_PAIR_SUMS = 5;

// One block of L-BFGS's direction pass: d <- cg g + sum_j (cy_j y_j + cs_j s_j).
struct LbfgsDirection {
  const float* g;
  float cg;
  const float* const* S;
  const float* cs;
  const float* const* Y;
  const float* cy;
  std::size_t k;
  float* d;
};

struct AlgoKernels {
  // Muon: the momentum pass over one block; returns the sum of out's squares.
  double (*muon_momentum)(const MuonMomentum& m, const float* g, float* buf, float* out,
                          std::size_t n);
  // Muon: p <- p * decay + coeff * u (torch's p.mul_(decay).add_(u, alpha=coeff)).
  void (*muon_update)(float* p, const float* u, float decay, float coeff, std::size_t n);
  // L-BFGS: the history pass over one block, its sums into sums[0 .. 4 + 5 k).
  void (*lbfgs_history)(const LbfgsHistory& a, std::size_t n, double* sums);
  // L-BFGS: the pairs' part of the history pass alone, for given y, s and g (not written):
  // sums[5 j ..] = [s_j.y, s_j.g, y_j.y, y_j.s, y_j.g], the same sums in the same order.
  void (*lbfgs_pairs)(const float* y, const float* s, const float* g, const float* const* S,
                      const float* const* Y, std::size_t k, std::size_t n, double* sums);
  // L-BFGS: the direction pass over one block; sums: [g.d, max |d|] (max: NaN if any is NaN).
  void (*lbfgs_direction)(const LbfgsDirection& a, std::size_t n, double* sums);
  // L-BFGS: out <- g; sums: [g.d, max |g|].
  void (*lbfgs_take)(const float* g, float* out, const float* d, std::size_t n, double* sums);
  // L-BFGS: p <- x + t d.
  void (*lbfgs_point)(float* p, const float* x, const float* d, float t, std::size_t n);
};

namespace scalar {
const AlgoKernels* algo_kernels();
}
namespace avx2 {
const AlgoKernels* algo_kernels();
}
namespace avx512 {
const AlgoKernels* algo_kernels();
}
namespace neon {
const AlgoKernels* algo_kernels();
}
namespace sve {
const AlgoKernels* algo_kernels();
}

}  // namespace optkern
