// What a step plan (bindings/step_plan.cpp) keeps of the arrays and parameters it validated, to
// check from step to step: each array's facts (ArrayFacts), and who else holds each parameter
// (Held). Plain records over the Python objects, with no knowledge of rules or groups.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "bindings/arrays.hpp"

namespace optkern {

// What the plan checks of an array from step to step: the facts the validation relied on.
struct ArrayFacts {
  using npy = py::detail::npy_api;

  PyObject* obj = nullptr;  // the array (the plan holds a reference through its Prepared)
  PyTypeObject* type = nullptr;
  char* data = nullptr;
  int nd = 0;
  int flags = 0;
  int type_num = 0;
  char byteorder = '=';
  std::size_t itemsize = 0;
  std::vector<Py_intptr_t> dims;

  static constexpr int FLAGS =
      npy::NPY_ARRAY_C_CONTIGUOUS_ | npy::NPY_ARRAY_ALIGNED_ | npy::NPY_ARRAY_WRITEABLE_;

  static ArrayFacts of(PyObject* o) {
    ArrayFacts f;
    const auto* a = py::detail::array_proxy(o);
    const auto* d = py::detail::array_descriptor_proxy(a->descr);
    f.obj = o;
    f.type = Py_TYPE(o);
    f.data = a->data;
    f.nd = a->nd;
    f.flags = a->flags & FLAGS;
    f.type_num = d->type_num;
    f.byteorder = d->byteorder;
    f.itemsize = static_cast<std::size_t>(py::reinterpret_borrow<py::dtype>(a->descr).itemsize());
    f.dims.assign(a->dimensions, a->dimensions + a->nd);
    return f;
  }

  bool same(PyObject* o) const {
    if (o != obj || Py_TYPE(o) != type) return false;
    const auto* a = py::detail::array_proxy(o);
    const auto* d = py::detail::array_descriptor_proxy(a->descr);
    return a->data == data && a->nd == nd && (a->flags & FLAGS) == flags &&
           d->type_num == type_num && d->byteorder == byteorder &&
           std::equal(dims.begin(), dims.end(), a->dimensions);
  }

  std::size_t bytes() const {
    std::size_t n = itemsize;
    for (Py_intptr_t d : dims) n *= static_cast<std::size_t>(d);
    return n;
  }
};

// An array of a parameter's state that an update reads and writes (a rule's state, an int8
// state's absmax, a master copy) and its key in the parameter's state dict (a str the plan
// keeps alive).
struct StateEntry {
  PyObject* key;
  ArrayFacts facts;
};

// Whether anyone but the optimizer holds a parameter. The optimizer's own references are known:
// its group's "params" list, the plan (through its prepared update's copy of that list) and,
// once the parameter has state, its entry in optimizer.state. Anything beyond that is someone
// else's. A view whose memory belongs to a base array is also held when anyone but the
// optimizer's own parameters (other views of the same base) holds that base; a base that is not
// an array owning its memory (a torch tensor, a buffer, a memory map) always counts as held.
// A parameter is reported once, the first time it is found unheld after having been held at an
// earlier step (an array made inside the optimizer's argument list was never held by the user).
struct Held {
  Py_ssize_t own = 0;          // the optimizer's references to the parameter
  PyObject* base = nullptr;    // its base array, or nullptr (owns its memory)
  Py_ssize_t base_own = 0;     // parameters of the plan that are views of that base
  bool base_is_owner = false;  // base is an ndarray that owns its memory
  bool armed = false;          // seen held by someone else at a step
  bool reported = false;

  bool held(PyObject* p) const {
    if (Py_REFCNT(p) > own) return true;
    if (base == nullptr) return false;
    return !base_is_owner || Py_REFCNT(base) > base_own;
  }
};

}  // namespace optkern
