// The driver: one validated update of one group, run over every array of the group in one
// multi-tensor call (multi_tensor.hpp). Plain C++: the bindings (bindings/prepared.cpp) check
// the arrays and hyperparameters and fill an Update; nothing here reads a Python object or can
// fail. Host code only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernel_api.hpp"
#include "rules/registry.hpp"
#include "sparse_rows.hpp"

namespace optkern {

// Whether an array of this type as a parameter is computed in float64 (else float32): which of
// a rule's PerReal host functions and which scalars struct it takes.
inline bool computes_in_f64(DType param) { return param == DType::f64; }

// Room for any rule's scalars struct, suitably aligned.
struct alignas(alignof(std::max_align_t)) ScalarsSlot {
  unsigned char bytes[MAX_SCALARS_BYTES];
};

// One array of the group and what its update reads and writes.
struct Tensor {
  void* param;
  const void* grad;
  void* state[MAX_STATES];    // the kernel's state slots (nullptr where unused)
  float* absmax[MAX_STATES];  // q8 states: their absmax per block (Operands)
  float* master;              // ParamWrite::master: the float32 copy of the parameter
  std::uint32_t noise;        // ParamWrite::stochastic: the tensor's key at this step
  std::size_t size;           // elements
  int ndim;
  const std::intptr_t* dims;  // its shape (factored kernels tile matrices by it)
  Types types;
  const KernelEntry* entry;  // the kernel entry of its types
  std::size_t scalars;       // its step's scalars: Update::scalars[scalars]
};

struct Update {
  const Rule* rule = nullptr;
  std::vector<Tensor> tensors;
  // tensors[t].size, for the multi-tensor split; 0 for a tensor with a row-sparse gradient
  std::vector<std::size_t> sizes;
  std::vector<std::size_t> aligns;  // range_align(tensors[t].types): where ranges may start
  std::vector<ScalarsSlot> scalars;
  // Row-sparse gradients (optkern.RowSparse): each one's rows, the tensor it belongs to (its
  // grad is nullptr), and whether every row of those tensors is updated (RowsDecl::dense_when)
  // or only the listed ones (sparse_rows.hpp).
  std::vector<RowTarget> rows;
  std::vector<std::size_t> row_tensors;
  bool dense_rows = false;
};

// Calls whose operands take at least this many bytes prefetch ahead (update.cpp). Testing hook:
// 0 makes every call of a rule with a division prefetch in pieces; results never depend on it.
void set_streaming_call_bytes(std::size_t bytes);
std::size_t streaming_call_bytes();

// The entry of `set` for these element types: a compiled combination, else the staged entry
// where it serves them (staged), else nullptr.
const KernelEntry* find_entry(const KernelSet& set, Types types);

// Whether a kernel's staged entry serves these element types: a float32, bfloat16 or float16
// parameter (written to nearest; bfloat16 and float16 also stochastically or from a master
// copy), a gradient of any float type, states in float32, bfloat16 or q8 (not both float32 with
// a float32 parameter written to nearest: a compiled combination).
bool staged(Types types);

// Why state k of a kernel cannot be q8, or nullptr if it can: a state holding values of the
// parameter's size (ASGD's ax, Schedule-Free's z); a kernel with a reduction pass (LAMB), whose
// norms would be computed from the moments before requantisation and its update from the
// requantised ones (a moment requantised to zero would then get an update no norm bounds);
// a factored kernel, which takes its states in the parameter's type.
inline const char* q8_refusal(const KernelDecl& k, std::size_t state) {
  if ((k.parameter_states >> state) & 1u) {
    return "keeps an average of the parameter in its state, which 8 bits cannot hold";
  }
  if (k.reduce_sums > 0) {
    return "computes norms of its update in a pass of their own, which 8-bit state would make "
           "inconsistent with the update";
  }
  if (k.passes > 0) return "keeps its factored state in the parameter's type";
  return nullptr;
}

// Elements a thread's range of this tensor starts at a multiple of (Q8_BLOCK with q8 state).
inline std::size_t range_align(const Types& t) { return t.state == DType::q8 ? Q8_BLOCK : 1; }

// Runs the update (the caller has released the GIL). Results do not depend on the number of
// threads: element-wise passes are split at any element, reductions are summed over blocks
// fixed by the shapes, in a fixed order.
void run_update(const Update& u);

// The factored plan (factored.cpp), run_update's path for a kernel with KernelDecl::passes.
void run_factored(const Update& u);

}  // namespace optkern
