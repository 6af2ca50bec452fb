// The contract between the driver (update.hpp) and the kernels: element types, the small plain
// structs every rule's per-step scalars are built from, what a kernel declares about itself, and
// the table of type-erased entry points each ISA build of the kernels fills in.
//
// This header holds no inline functions on purpose: it is included by translation units compiled
// for different ISAs, and an inline function emitted by an AVX-512 unit could be the copy the
// linker keeps for the baseline code. Host-only helpers live in rule_api.hpp; kernel-only ones
// in kernels/kernel.hpp (internal linkage there).
#pragma once

#include <cstddef>
#include <cstdint>

namespace optkern {

// -- element types --------------------------------------------------------------------------------

// The storage type of an array a kernel reads or writes. A kernel loads each operand in its
// stored type, computes in its parameter's compute type (float32, or float64 for a float64
// parameter) and stores with round-to-nearest-even; kernels/kernel.hpp has the per-ISA load and
// store of each type. Adding a type: an entry here, its load/store there, and its combinations
// in kernels/kernel.hpp's Instantiated list (docs/design.md, "Element types").
enum class DType : std::uint8_t { f32, f64 };
constexpr int DTYPE_COUNT = 2;

// The element types of one kernel entry: the parameter's, the gradient's, and the states' (one
// type for every state array of the call).
struct Types {
  DType param, grad, state;
};

// -- pieces of the per-step scalars ---------------------------------------------------------------
// Each rule's scalars struct (in its rules/<name>.inc) is a template on the compute type R (float
// or double), filled in double by the host and rounded once to R.

// What every rule first does to the gradient: g = grad_scale * g (-1 for maximize, times the
// clipping coefficient when clipping is fused into the step), then g += weight_decay * p when
// has_weight_decay (AdamW decays p itself instead: see rules/adam.inc). has_weight_decay is
// decided on the double value, as torch decides it: a weight decay of 1e-320 rounds to 0.0f but
// still adds 0 * p to the gradient, which is NaN where p is infinite.
template <class R>
struct GradientPrep {
  R grad_scale;
  R weight_decay;
  bool has_weight_decay;
};

// Where torch computes start.lerp_(end, w), the kernels evaluate base + coeff * (end - start) with
// (base, coeff) = (start, w) for |w| < 0.5 and (end, w - 1) otherwise, as torch does (the form
// matters for Inf and NaN). The host picks the form, in double, for every rule alike.
template <class R>
struct Lerp {
  R coeff;
  // 1 or 0. A number, not a bool: GCC 12 does not vectorise the centered RMSprop loop when the
  // select depends on a bool loaded from memory, and does with a float compare.
  R from_start;
};

// The largest number of state buffers a kernel takes, and the largest scalars struct (in bytes,
// for R = double) the driver keeps room for; rules/host.cpp checks every rule against both.
constexpr std::size_t MAX_STATES = 4;
constexpr std::size_t MAX_SCALARS_BYTES = 256;

// -- what a kernel declares -----------------------------------------------------------------------

// One rule file's kernel, as the driver needs to know it (each rules/<name>.inc declares its
// kKernel).
struct KernelDecl {
  std::size_t states;  // state buffers it takes: state[k] for k < states (nullptr where unused)
  // Work per element against the single-thread threshold, in units of SGD's element
  // (multi_tensor.hpp): 1 for a few multiply-adds, 4 with a sqrt and a division.
  std::size_t weight;
  // A reduction pass before the element-wise pass: the double sums per block it returns (LAMB: 2,
  // the norms of p and u). The driver runs it over fixed blocks of each array, adds each array's
  // sums in block order, turns them into that array's scalars (the rule's per_array) and then
  // runs the element-wise pass with them.
  std::size_t reduce_sums = 0;
  // A factored kernel (Adafactor): its passes over tiles of each matrix, with the rule's host step
  // between passes (factored.cpp). Its states need not be shaped like the parameter.
  int passes = 0;
};

// The rule files, in the order of rules/list.inc: a kernel's index in every KernelTable.
#define OPTKERN_RULE(name) name,
enum class KernelId : int {
#include "rules/list.inc"
  count
};
#undef OPTKERN_RULE
constexpr int KERNEL_COUNT = static_cast<int>(KernelId::count);

// One tile of a factored kernel's pass: `rows` whole rows of `cols` elements of one matrix (the
// last two dimensions of an array of >= 2 dimensions), or for an array of <= 1 dimension one
// block of `cols` elements (rows = 1). The driver (factored.cpp) fixes the tiles from the shapes
// alone and positions every pointer: param and grad at the tile's first element, each state by
// its StateShape (like_param and unfactored at the tile's first element, rows at the tile's first
// row, cols at its matrix's first column; nullptr where absent). The per-row and per-column
// numbers are in the compute type.
struct FactoredTile {
  void* param;
  const void* grad;
  void* state[MAX_STATES];
  std::size_t rows, cols;  // a tile of a matrix: rows x cols, its rows `stride` elements apart
  std::size_t stride;
  const void* row_scale;  // factored, after pass 0: the host step's number per row of the tile
  const void* col_scale;  // factored, after pass 0: its number per column of the matrix
  double* sums;           // out: the tile's sums (one pass's; a fixed order within the tile)
  double* row_sums;       // out, pass 0 of a factored array: [rows], this tile's sum per row
  double* col_sums;       // out, pass 0 of a factored array: [cols], this tile's sum per column
  // Pass 0 of a tile that holds every row of its matrix (else nullptr): the kernel finishes the
  // columns itself (their states and [cols] numbers per column here) and leaves col_sums unused.
  void* col_scale_out;
};

// -- the entry points -----------------------------------------------------------------------------
// Type-erased: `scalars` points at the rule's scalars struct for the entry's compute type, the
// arrays hold the entry's Types. Each updates elements [0, n) of the pointers it is given; the
// driver offsets the pointers for each thread's range.

// The element-wise pass: state[k] is the k-th state buffer (nullptr when the options do not use
// it).
using StepFn = void (*)(const void* scalars, void* param, const void* grad, void* const* state,
                        std::size_t n);
// A kernel's reduction pass over one block, writing KernelDecl::reduce_sums sums (each
// accumulated in a fixed order within the block).
using ReduceFn = void (*)(const void* scalars, const void* param, const void* grad,
                          void* const* state, std::size_t n, double* sums);
// A factored kernel's pass `pass` (0, 1, ...) over one tile.
using PassFn = void (*)(const void* scalars, int pass, const FactoredTile& tile);

struct KernelEntry {
  Types types;
  StepFn step;
  ReduceFn reduce;  // nullptr unless KernelDecl::reduce_sums
  PassFn pass;      // nullptr unless KernelDecl::passes
};

// One rule file's kernel on one ISA: an entry per combination of element types compiled.
struct KernelSet {
  const KernelEntry* entries;
  std::size_t count;
};

// Gradient norms and clipping on arrays of one type.
struct NormKernels {
  // One block, accumulated in double: the sum of |x|^p (p = 1, 2 or any p > 0), or max |x| for
  // p = inf. NaN or Inf in x makes the result NaN or Inf.
  double (*norm_block)(const void* x, std::size_t n, double p);
  // x *= c, and x = min(max(x, lo), hi) (NaN stays NaN, as in torch.clamp); c, lo and hi are
  // rounded to x's type first.
  void (*scale)(void* x, std::size_t n, double c);
  void (*clamp)(void* x, std::size_t n, double lo, double hi);
};

// One ISA build's entry points.
struct KernelTable {
  const KernelSet* rules[KERNEL_COUNT];  // by KernelId
  const NormKernels* norms;              // [DTYPE_COUNT], by DType
  // a += s * b (float32): the benchmark's measure of the machine's in-place streaming bandwidth.
  void (*axpy)(float* a, const float* b, float s, std::size_t n);
};

// Defined once per ISA build (kernels/table.cpp, in namespaces scalar, avx2, avx512).
namespace scalar {
const KernelTable* kernel_table();
}
namespace avx2 {
const KernelTable* kernel_table();
}
namespace avx512 {
const KernelTable* kernel_table();
}

}  // namespace optkern
