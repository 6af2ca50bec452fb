// The array checks of every binding: each list of arrays a call takes is copied, and each array
// is checked (type, dtype, layout, writeability, alignment, shape against its parameter) before
// anything is written; written arrays may not share memory with any other array of the call.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernel_api.hpp"
#include "rule_api.hpp"

namespace optkern {

namespace py = pybind11;

enum class Access { read, write };

std::string type_name(py::handle h);

// Whether a NumPy byte order character is this machine's.
bool native_order(char byteorder);

// The DType of a NumPy dtype number, if optkern has one.
bool dtype_of(int type_num, DType* out);

// A list or tuple, copied into a new list of strong references: whatever Python code runs while
// C++ walks it (an item's __index__, another thread) cannot free an item under us. Anything else,
// an ndarray included, is refused: iterating a 2-D array would hand us row views and hide the
// caller's mistake.
py::list snapshot(py::handle seq, const std::string& name, const char* what);

// The caller's index of each tensor (the optimizer classes pass the index into the gradient list
// given to step()), for error messages; empty: 0, 1, 2, ...
using Positions = std::vector<std::size_t>;
Positions positions_of(py::handle positions);

// The element types a list may hold: a set of DTypes, or (for states) the type of the array of
// the first list at the same index.
struct Accept {
  unsigned types;   // bit (1 << DType) per accepted type
  bool like_first;  // each array has the type of the first list's array at its index; with
                    // `types`, only where that is float64 (else one of `types`)
};
constexpr unsigned bit(DType t) { return 1u << static_cast<unsigned>(t); }
constexpr Accept FLOAT32 = {bit(DType::f32), false};
constexpr Accept LIKE_FIRST = {0, true};
constexpr unsigned FLOATS = bit(DType::f32) | bit(DType::bf16) | bit(DType::f16);

// What the bindings take: an optimizer's parameters and gradients, its states (float32,
// bfloat16 or q8 codes; a float64 parameter's like it), and the arrays of the norms and
// clipping. A list may mix the types; each (parameter, gradient, state) combination is one
// kernels/kernel.hpp instantiates, or one a rule's staged entry serves (update.hpp).
constexpr Accept PARAMS = {FLOATS | bit(DType::f64), false};
constexpr Accept GRADS = {FLOATS | bit(DType::f64), false};
constexpr Accept STATES = {bit(DType::f32) | bit(DType::bf16) | bit(DType::q8), true};
constexpr Accept NORM_ARRAYS = {FLOATS | bit(DType::f64), false};

// The NumPy type number of ml_dtypes' bfloat16 (registered by optkern's __init__ when ml_dtypes
// imports; -1: none).
void set_bfloat16_type(int type_num);
// The DType of a NumPy dtype number, if optkern has one.
bool dtype_of(int type_num, DType* out);
const char* dtype_name(DType t);

struct ArrayRef {
  void* data;  // nullptr where a state does not apply
  DType type;
};

// The checks of one array (Buffers' for every array it takes; the fused passes of Muon and
// L-BFGS, bindings/algos.cpp, call it for their flat vectors): a NumPy array (not a masked one)
// of one of the types in `types` (bits of DType), in native byte order, of >= 1 dimension,
// C-contiguous, aligned, writeable when written. TypeError or ValueError naming `label`
// otherwise; its type in *type.
const py::detail::PyArray_Proxy* check_array(py::handle item, const std::string& label,
                                             Access access, unsigned types, DType* type);

// A callable making an array's name for a message, called only when one is thrown (Buffers
// checks every array of every step; building each name up front cost a string per array).
class LabelRef {
 public:
  template <class F>
  explicit LabelRef(const F& f)
      : f_(&f), call_([](const void* g) { return (*static_cast<const F*>(g))(); }) {}
  std::string operator()() const { return call_(f_); }

 private:
  const void* f_;
  std::string (*call_)(const void*);
};
const py::detail::PyArray_Proxy* check_array(py::handle item, LabelRef label, Access access,
                                             unsigned types, DType* type);

// The validated arrays of one call. The first list (the parameters of an update, or the
// gradients of a norm) fixes the number of tensors and their shapes; every other list must match
// it one to one. Each array is held by a strong reference until the call is over.
class Buffers {
 public:
  Buffers(py::handle first, const char* name, Access access, Positions positions,
          Accept accept = FLOAT32);

  std::size_t count() const { return sizes_.size(); }
  const std::vector<std::size_t>& sizes() const { return sizes_; }
  const std::vector<ArrayRef>& first() const { return first_; }
  // The first list's array t: its number of dimensions and its dimensions.
  int ndim(std::size_t t) const { return shapes_[t]->nd; }
  const Py_intptr_t* dims(std::size_t t) const { return shapes_[t]->dimensions; }

  std::string label(const char* name, std::size_t i) const;
  // The caller's index of tensor i (positions, else i).
  std::size_t position(std::size_t i) const { return i < positions_.size() ? positions_[i] : i; }

  // The k-th list of the call as copied (0: the first), holding its arrays.
  const py::list& list(std::size_t k) const { return held_[k]; }

  // Validates a list of arrays (matched to the first list) and returns them. `shape`: a state
  // list, each array shaped by its kind from its parameter's shape (rule_api's state_dims); an
  // entry is None, and its data nullptr, where the kind does not apply.
  // `skip`: entries left to the caller (an update's row-sparse gradients, optkern.RowSparse,
  // checked by bindings/row_grads.hpp), unchecked here; their ArrayRef's data is nullptr.
  std::vector<ArrayRef> add(py::handle seq, const char* name, Access access, Accept accept,
                            const StateShape* shape = nullptr,
                            const std::vector<char>* skip = nullptr);
  // Memory the call reads or writes beside its lists (a RowSparse gradient's values), for
  // check_disjoint: `bytes` from `data`, named name[index] in messages.
  void add_range(const void* data, std::size_t bytes, const char* name, std::size_t index,
                 bool written);

  // A written list of float32 arrays beside the states: per tensor t, shape[t] = NONE (the
  // entry must be None: data nullptr), LIKE_PARAM (an array shaped like the first list's: a
  // master copy) or n >= 0 (a 1-d array of n elements: a q8 state's absmax per block).
  static constexpr std::ptrdiff_t NONE = -1, LIKE_PARAM = -2;
  std::vector<ArrayRef> add_float32(py::handle seq, const char* name,
                                    const std::vector<std::ptrdiff_t>& shape);

  // Refuses any buffer that is written and shares memory with another buffer of the call
  // (gradients may share memory with each other: they are only read).
  void check_disjoint();

 private:
  struct Range {
    std::uintptr_t lo, hi;
    const char* name;
    std::size_t index;
    bool written;
  };

  const py::detail::PyArray_Proxy* inspect(py::handle item, const char* name, std::size_t i,
                                           Access access, Accept accept, DType* type) const;

  const char* first_name_;
  unsigned first_types_ = 0;  // what the first list accepts
  Positions positions_;
  std::vector<std::size_t> sizes_;
  std::vector<const py::detail::PyArray_Proxy*> shapes_;  // the first list's arrays
  std::vector<ArrayRef> first_;
  std::vector<py::list> held_;                       // every list of the call, as copied
  std::vector<std::unique_ptr<std::string>> names_;  // names made up for add_float32 lists
  std::vector<Range> ranges_;
};

}  // namespace optkern
