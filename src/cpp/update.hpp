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
  void* state[MAX_STATES];  // the kernel's state slots (nullptr where unused)
  std::size_t size;         // elements
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
  std::vector<ScalarsSlot> scalars;
  // Row-sparse gradients (optkern.RowSparse): each one's rows, the tensor it belongs to (its
  // grad is nullptr), and whether every row of those tensors is updated (RowsDecl::dense_when)
  // or only the listed ones (sparse_rows.hpp).
  std::vector<RowTarget> rows;
  std::vector<std::size_t> row_tensors;
  bool dense_rows = false;
};

// The entry of `set` for these element types, or nullptr when none was compiled.
const KernelEntry* find_entry(const KernelSet& set, Types types);

// Runs the update (the caller has released the GIL). Results do not depend on the number of
// threads: element-wise passes are split at any element, reductions are summed over blocks
// fixed by the shapes, in a fixed order.
void run_update(const Update& u);

// The factored plan (factored.cpp), run_update's path for a kernel with KernelDecl::passes.
void run_factored(const Update& u);

}  // namespace optkern
