// Gradient norms, as _core.grad_norms computes them: shared with the step plan, which folds a
// clipping coefficient into its update.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include "bindings/arrays.hpp"

namespace optkern {

// Per-array norms and the total norm of all arrays together (torch.linalg.vector_norm of their
// concatenation), from one read pass over the data: arrays[t] holds sizes[t] elements. Blocks
// are summed in a fixed order (the same norm for any thread count); the GIL is released for a
// pass long enough to split between threads. ValueError unless p > 0.
std::pair<std::vector<double>, double> compute_norms(const ArrayRef* arrays,
                                                     const std::size_t* sizes, std::size_t count,
                                                     double p);

}  // namespace optkern
