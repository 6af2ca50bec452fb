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
//   bf16, f16: bfloat16 and IEEE half, computed in float32.
//   q8: a state only, blockwise 8-bit: one byte per element, the index of the nearest of 256
//       codes (bitsandbytes' dynamic map: signed, or unsigned for a state that is never
//       negative), times a float32 absmax per block of Q8_BLOCK elements.
enum class DType : std::uint8_t { f32, f64, bf16, f16, q8 };
constexpr int DTYPE_COUNT = 5;

// The 16-bit storage types as the kernels see them: the bits (kernels/kernel.hpp converts them).
struct bfloat16 {
  std::uint16_t bits;
};
struct float16 {
  std::uint16_t bits;
};

// Elements per block of a q8 state, each with its own float32 absmax (bitsandbytes' 8-bit
// optimizers' block size). A thread's range of a tensor with q8 state starts on a block.
constexpr std::size_t Q8_BLOCK = 256;

// How a 16-bit parameter is written from the float32 value the rule computed.
enum class ParamWrite : std::uint8_t {
  nearest,     // rounded to nearest even (every parameter type)
  stochastic,  // rounded up or down at random, in proportion (Operands::noise)
  master,      // the rule updates a float32 master copy (Operands::master), which is then
               // rounded to nearest even into the parameter
};

// The element types of one kernel entry: the parameter's, the gradient's, and the states' (one
// type for every state array of the call), and how a 16-bit parameter is written.
struct Types {
  DType param, grad, state;
  ParamWrite write = ParamWrite::nearest;
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
  // Bit k set: state k is never negative (a moving average of squares, a sum of squares), so
  // as q8 it takes the unsigned dynamic map, twice as fine as the signed one.
  unsigned nonnegative_states = 0;
  // The element-wise pass only reads the states (the reduction pass wrote them: LAMB), so a
  // staged entry does not write them back after it.
  bool step_keeps_states = false;
  // Bit k set: state k holds values of the parameter's size (an average of the parameter:
  // ASGD's ax, Schedule-Free's z), which q8 state would lose; the bindings refuse q8 there.
  unsigned parameter_states = 0;
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

// The arrays of an update of elements [0, n) of one tensor, each positioned at the range's first
// element (absmax at the range's first block: a range of a tensor with q8 state starts on a
// block).
struct Operands {
  void* param;
  const void* grad;
  void* state[MAX_STATES];    // the k-th state buffer (nullptr when the options do not use it)
  float* absmax[MAX_STATES];  // q8 states: the absmax of each Q8_BLOCK-element block
  float* master;              // ParamWrite::master: the float32 copy of the parameter
  Types types;
  std::uint32_t noise;  // ParamWrite::stochastic: this tensor's key at this step
  std::size_t first;    // the range's first element within its tensor (the noise counter)
  bool streaming;       // the call's operands come from memory: the entry prefetches ahead
};

// The element-wise pass.
using StepFn = void (*)(const void* scalars, const Operands& op, std::size_t n);
// A kernel's reduction pass over one block, writing KernelDecl::reduce_sums sums (each
// accumulated in a fixed order within the block); it may write the states (LAMB's moments).
using ReduceFn = void (*)(const void* scalars, const Operands& op, std::size_t n, double* sums);
// A factored kernel's pass `pass` (0, 1, ...) over one tile.
using PassFn = void (*)(const void* scalars, int pass, const FactoredTile& tile);

struct KernelEntry {
  Types types;
  StepFn step;
  ReduceFn reduce;  // nullptr unless KernelDecl::reduce_sums
  PassFn pass;      // nullptr unless KernelDecl::passes
};

// One rule file's kernel on one ISA: an entry per combination of element types compiled, and the
// staged entry, which serves the 16-bit and 8-bit combinations (staged(Types) in update.hpp)
// through the float32 entry: each block of Q8_BLOCK elements of every operand not in float32 is
// widened into float32 on the stack, the float32 loop runs on the block, and what it wrote is
// narrowed back (rounded, or requantised), so the block never leaves L1. nullptr for a factored
// kernel.
struct KernelSet {
  const KernelEntry* entries;
  std::size_t count;
  const KernelEntry* staged;
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

// The conversions of the staged entries (kernels/staging.cpp), for the bindings' own use: a state
// converted between float32 and q8 (a load into an optimizer of the other state type) and the
// tests of every ISA.
struct StagingKernels {
  // out = the q8 codes of x (n <= Q8_BLOCK elements: one block), returning the block's absmax.
  float (*quantize)(const float* x, bool nonnegative, std::uint8_t* out, std::size_t n);
  // out = code[q] * absmax (one block).
  void (*dequantize)(const std::uint8_t* q, float absmax, bool nonnegative, float* out,
                     std::size_t n);
  // 16-bit (or float64) to float32 and back, rounding to nearest even; and rounding
  // stochastically with the noise of key at elements [first, first + n).
  void (*widen)(DType type, const void* x, float* out, std::size_t n);
  void (*narrow)(DType type, const float* x, void* out, std::size_t n);
  void (*narrow_stochastic)(DType type, const float* x, void* out, std::size_t n, std::uint32_t key,
                            std::size_t first);
};

// One ISA build's entry points.
struct KernelTable {
  const KernelSet* rules[KERNEL_COUNT];  // by KernelId
  const NormKernels* norms;              // [DTYPE_COUNT], by DType
  // a += s * b (float32): the benchmark's measure of the machine's in-place streaming bandwidth.
  void (*axpy)(float* a, const float* b, float s, std::size_t n);
  const StagingKernels* staging;

  // Whether this build's OK_FMA is one fused multiply-add (AVX2, AVX-512, NEON, SVE) or a
  // multiply then an add (x86-64's baseline, the generic build): builds that fuse compute
  // bit-identical results, the others agree with them within float32 roundings.
  bool fused_multiply_add;
};

// Defined once per ISA build (kernels/table.cpp), in a namespace named after the ISA
// (src/cpp/isa_builds.txt lists them; a binary holds one architecture's).
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
