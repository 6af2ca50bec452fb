#include "bindings/row_grads.hpp"

#include <pybind11/numpy.h>

#include <cstdint>
#include <vector>

#include "bindings/arrays.hpp"

namespace optkern {
namespace {

using npy = py::detail::npy_api;  // as arrays.cpp (the same alias again is allowed)

namespace rows {  // named: the bindings are one unity-build unit with other anonymous helpers

PyObject* g_row_sparse_type = nullptr;  // a strong reference, set once at import

bool little_endian() {
  const std::uint16_t probe = 1;
  return *reinterpret_cast<const unsigned char*>(&probe) == 1;
}

std::string shape_str(const Py_intptr_t* d, int nd) {
  std::string s = "(";
  for (int i = 0; i < nd; ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + (nd == 1 ? ",)" : ")");
}

// The array in slot `name` of a RowSparse (a member descriptor: no Python code runs).
const py::detail::PyArray_Proxy* slot_array(py::handle item, const char* name,
                                            const std::string& label, py::object& held) {
  held = py::reinterpret_steal<py::object>(PyObject_GetAttrString(item.ptr(), name));
  if (!held) throw py::error_already_set();
  if (!py::isinstance<py::array>(held)) {
    throw py::type_error(label + "." + (name + 1) + " must be a NumPy array");
  }
  return py::detail::array_proxy(held.ptr());
}

}  // namespace rows
}  // namespace

using namespace rows;  // NOLINT: this file's own helpers

void set_row_sparse_type(py::handle cls) {
  if (!PyType_Check(cls.ptr())) throw py::type_error("expected a class");
  Py_XDECREF(g_row_sparse_type);
  g_row_sparse_type = cls.ptr();
  Py_INCREF(g_row_sparse_type);
}

bool is_row_sparse(py::handle item) {
  return g_row_sparse_type != nullptr &&
         reinterpret_cast<PyObject*>(Py_TYPE(item.ptr())) == g_row_sparse_type;
}

RowGrad parse_row_grad(py::handle item, const std::string& label, const Py_intptr_t* dims, int nd) {
  RowGrad out;
  if (nd < 1) {
    throw py::value_error(label +
                          " is a RowSparse gradient, but its parameter is 0-d (it has "
                          "no rows)");
  }
  const auto* ia = slot_array(item, "_indices", label, out.indices);
  const auto* id = py::detail::array_descriptor_proxy(ia->descr);
  const char order = id->byteorder;
  const bool native = order == '=' || order == '|' || order == (little_endian() ? '<' : '>');
  if ((id->type_num != npy::NPY_LONGLONG_ && id->type_num != npy::NPY_LONG_) ||
      py::reinterpret_borrow<py::array>(out.indices).itemsize() != 8 || !native) {
    throw py::type_error(label + ".indices must be int64 in native byte order");
  }
  if (ia->nd != 1 || !(ia->flags & npy::NPY_ARRAY_C_CONTIGUOUS_) ||
      !(ia->flags & npy::NPY_ARRAY_ALIGNED_)) {
    throw py::value_error(label + ".indices must be a 1-D C-contiguous int64 array");
  }
  out.values = py::reinterpret_steal<py::object>(PyObject_GetAttrString(item.ptr(), "_values"));
  if (!out.values) throw py::error_already_set();
  DType type;
  const auto* va = check_array(out.values, label + ".values", Access::read, bit(DType::f32), &type);
  const std::size_t k = static_cast<std::size_t>(ia->dimensions[0]);
  bool shaped = va->nd == nd && static_cast<std::size_t>(va->dimensions[0]) == k;
  for (int d = 1; shaped && d < nd; ++d) shaped = va->dimensions[d] == dims[d];
  if (!shaped) {
    std::vector<Py_intptr_t> want(dims, dims + nd);
    want[0] = static_cast<Py_intptr_t>(k);
    throw py::value_error(label + ".values has shape " + shape_str(va->dimensions, va->nd) +
                          "; for a parameter of shape " + shape_str(dims, nd) + " and " +
                          std::to_string(k) + " indices it must be " + shape_str(want.data(), nd));
  }
  out.row = 1;
  for (int d = 1; d < nd; ++d) out.row *= static_cast<std::size_t>(dims[d]);
  out.num_rows = static_cast<std::size_t>(dims[0]);
  const auto* idx = reinterpret_cast<const std::int64_t*>(ia->data);
  const std::size_t bad = first_bad_row(idx, k, static_cast<std::int64_t>(out.num_rows));
  if (bad != k) {
    throw py::value_error(label + ".indices[" + std::to_string(bad) +
                          "] = " + std::to_string(idx[bad]) +
                          (idx[bad] < 0 ? " is negative" : " is out of range") +
                          " for a parameter of " + std::to_string(out.num_rows) + " rows");
  }
  out.values_data = reinterpret_cast<const float*>(va->data);
  out.groups = group_rows(idx, k, static_cast<std::int64_t>(out.num_rows));
  return out;
}

}  // namespace optkern
