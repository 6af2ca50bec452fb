// The contract between the dispatcher and the kernels: plain structs of per-step scalars and a
// table of function pointers, one table per ISA build of kernels/update_rules.cpp.
//
// This header holds no inline functions on purpose: it is included by translation units compiled
// for different ISAs, and an inline function emitted by an AVX-512 unit could be the copy the
// linker keeps for the baseline code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rules.hpp"

namespace optkern {

// The per-step scalars of each rule's kernel are declared with the rules (rules.hpp), each in the
// float form the kernel uses, filled in double by the host and rounded once.

#define OPTKERN_KERNEL_ID(name, Scalars, states, weight) name,
enum class KernelId : int { OPTKERN_KERNELS(OPTKERN_KERNEL_ID) count };
#undef OPTKERN_KERNEL_ID

template <KernelId>
struct KernelInfo;
#define OPTKERN_KERNEL_INFO(kname, S, n_states, w)  \
  template <>                                       \
  struct KernelInfo<KernelId::kname> {              \
    using Scalars = S;                              \
    static constexpr std::size_t states = n_states; \
    static constexpr std::size_t weight = w;        \
    static constexpr const char* name = #kname;     \
  };
OPTKERN_KERNELS(OPTKERN_KERNEL_INFO)
#undef OPTKERN_KERNEL_INFO

// Kernels with a reduction pass (OPTKERN_REDUCTIONS in rules.hpp): how many double sums per
// block their first pass returns; 0 for the others.
template <KernelId>
struct Reduction {
  static constexpr std::size_t sums = 0;
};
#define OPTKERN_REDUCTION_INFO(kname, n_sums)   \
  template <>                                   \
  struct Reduction<KernelId::kname> {           \
    static constexpr std::size_t sums = n_sums; \
  };
OPTKERN_REDUCTIONS(OPTKERN_REDUCTION_INFO)
#undef OPTKERN_REDUCTION_INFO

// Factored kernels (OPTKERN_FACTORED in rules.hpp): how many passes over the data they make (0
// for the others).
template <KernelId>
struct Factored {
  static constexpr int passes = 0;
};
#define OPTKERN_FACTORED_INFO(kname, n_passes) \
  template <>                                  \
  struct Factored<KernelId::kname> {           \
    static constexpr int passes = n_passes;    \
  };
OPTKERN_FACTORED(OPTKERN_FACTORED_INFO)
#undef OPTKERN_FACTORED_INFO

// One tile of a factored kernel's pass: `rows` whole rows of `cols` elements of one matrix (the
// last two dimensions of an array of >= 2 dimensions), or for an array of <= 1 dimension one
// block of `cols` elements (rows = 1). The driver (Prepared::factored in bindings.cpp) fixes the
// tiles from the shapes alone and positions every pointer: param and grad at the tile's first
// element, each state by its StateShape (like_param and unfactored at the tile's first element,
// rows at the tile's first row, cols at its matrix's first column; nullptr where absent).
struct FactoredTile {
  float* param;
  const float* grad;
  float* state[MAX_STATES];
  std::size_t rows, cols;  // a tile of a matrix: rows x cols, its rows `stride` elements apart
  std::size_t stride;
  const float* row_scale;  // factored, after pass 0: the host step's number per row of the tile
  const float* col_scale;  // factored, after pass 0: its number per column of the matrix
  double* sums;            // out: the tile's sums (one pass's; a fixed order within the tile)
  double* row_sums;        // out, pass 0 of a factored array: [rows], this tile's sum per row
  double* col_sums;        // out, pass 0 of a factored array: [cols], this tile's sum per column
  // Pass 0 of a tile that holds every row of its matrix (else nullptr): the kernel finishes the
  // columns itself (their states and [cols] numbers per column here) and leaves col_sums unused.
  float* col_scale_out;
};

// One ISA build's entry points. Each updates elements [0, n) of the pointers it is given;
// the multi-tensor driver offsets the pointers for each thread's range.
struct KernelTable {
  // One entry per rule kernel: kernel(scalars, param, grad, state, n), state[k] being the k-th
  // state buffer of the rule (nullptr when the options do not use it).
#define OPTKERN_KERNEL_SLOT(name, S, states, weight) \
  void (*name)(const S&, float* param, const float* grad, float* const* state, std::size_t n);
  OPTKERN_KERNELS(OPTKERN_KERNEL_SLOT)
#undef OPTKERN_KERNEL_SLOT

  // The first pass of each kernel with a reduction: name_reduce(scalars, param, grad, state, n,
  // sums) over one block, writing Reduction<name>::sums double sums (each accumulated in a
  // fixed order within the block) to sums[0..).
#define OPTKERN_REDUCE_SLOT(kname, n_sums)                                                \
  void (*kname##_reduce)(const KernelInfo<KernelId::kname>::Scalars&, const float* param, \
                         const float* grad, float* const* state, std::size_t n, double* sums);
  OPTKERN_REDUCTIONS(OPTKERN_REDUCE_SLOT)
#undef OPTKERN_REDUCE_SLOT

  // Each factored kernel's passes: name_pass(scalars, pass, tile), pass = 0, 1, ...
#define OPTKERN_FACTORED_SLOT(kname, n_passes)                                \
  void (*kname##_pass)(const KernelInfo<KernelId::kname>::Scalars&, int pass, \
                       const FactoredTile& tile);
  OPTKERN_FACTORED(OPTKERN_FACTORED_SLOT)
#undef OPTKERN_FACTORED_SLOT

  // Gradient norms, one block at a time, accumulated in double: the sum of |x|^p (p = 1, 2 or
  // any p > 0), or max |x| for p = inf. NaN or Inf in x makes the result NaN or Inf.
  double (*norm_block)(const float* x, std::size_t n, double p);
  // x *= c, and x = min(max(x, lo), hi) (NaN stays NaN, as in torch.clamp).
  void (*scale)(float* x, std::size_t n, float c);
  void (*clamp)(float* x, std::size_t n, float lo, float hi);
  // a += s * b: the benchmark's measure of the machine's in-place streaming bandwidth.
  void (*axpy)(float* a, const float* b, float s, std::size_t n);

  // Whether this build's OK_FMA is one fused multiply-add (AVX2, AVX-512, NEON, SVE) or a
  // multiply then an add (x86-64's baseline, the generic build): builds that fuse compute
  // bit-identical results, the others agree with them within float32 roundings.
  bool fused_multiply_add;
};

// Defined once per ISA build (src/cpp/isa_builds.txt; a binary holds one architecture's).
namespace scalar {
const KernelTable* kernel_table();
}
namespace avx2 {
const KernelTable* kernel_table();
}
namespace avx512 {
const KernelTable* kernel_table();
}
namespace neon {
const KernelTable* kernel_table();
}
namespace sve {
const KernelTable* kernel_table();
}

}  // namespace optkern
