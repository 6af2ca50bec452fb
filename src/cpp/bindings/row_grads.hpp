// Row-sparse gradients as the bindings take them: an optkern.RowSparse object in a gradient
// list, checked against its parameter (indices, values, their shapes and types, every index in
// range) and its rows grouped (sparse_rows.hpp), before anything is written.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <string>

#include "sparse_rows.hpp"

namespace optkern {

namespace py = pybind11;

// optkern.RowSparse, which optkern.sparse registers at import (_core._set_row_sparse_type).
void set_row_sparse_type(py::handle cls);

// Whether `item` is an optkern.RowSparse (exactly that class: its arrays are read from its
// slots, which runs no Python code).
bool is_row_sparse(py::handle item);

// One checked row-sparse gradient, its arrays held until the call is over.
struct RowGrad {
  py::object indices, values;  // the arrays, held
  RowGroups groups;
  RowTarget target() const { return {&groups, values_data, row, num_rows}; }
  const float* values_data = nullptr;
  std::size_t row = 0;       // elements per row: the product of the parameter's dims[1:]
  std::size_t num_rows = 0;  // the parameter's dims[0]
};

// Checks `item` (is_row_sparse) as the gradient of a parameter of shape dims[0..nd), nd >= 1:
// indices a 1-D C-contiguous int64 array, values a float32 array in native byte order,
// C-contiguous and aligned, of shape (len(indices), *dims[1:]), every index in [0, dims[0]).
// TypeError or ValueError naming `label` otherwise. Groups the rows (no Python code runs).
RowGrad parse_row_grad(py::handle item, const std::string& label, const Py_intptr_t* dims, int nd);

}  // namespace optkern
