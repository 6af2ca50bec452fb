#include "bindings/arrays.hpp"

#include <algorithm>
#include <atomic>

namespace optkern {
namespace {

using npy = py::detail::npy_api;

// Whether `h` (an ndarray) is a NumPy masked array: its mask would be ignored by the kernels,
// which read and write the data underneath, masked-out values included. Only a subclass pays for
// the check; numpy.ma is looked up in sys.modules (an object of its class means it is loaded), so
// no Python code runs and nothing is imported.
bool is_masked_array(py::handle h) {
  if (Py_TYPE(h.ptr()) == npy::get().PyArray_Type_) return false;
  PyObject* modules = PyImport_GetModuleDict();                   // borrowed
  PyObject* ma = PyDict_GetItemString(modules, "numpy.ma.core");  // borrowed
  if (ma == nullptr) return false;
  PyObject* cls = PyObject_GetAttrString(ma, "MaskedArray");  // new reference
  if (cls == nullptr) {
    PyErr_Clear();
    return false;
  }
  const int r = PyType_Check(cls)
                    ? PyType_IsSubtype(Py_TYPE(h.ptr()), reinterpret_cast<PyTypeObject*>(cls))
                    : 0;
  Py_DECREF(cls);
  return r == 1;
}

std::string dims_str(const Py_intptr_t* d, int nd) {
  std::string s = "(";
  for (int i = 0; i < nd; ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + (nd == 1 ? ",)" : ")");
}

// "float32", "float32 or float64", "float32, bfloat16 or float16", ...
std::string types_str(unsigned types) {
  std::vector<const char*> names;
  for (DType t : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::q8}) {
    if (types & bit(t)) names.push_back(dtype_name(t));
  }
  std::string out;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += i + 1 == names.size() ? " or " : ", ";
    out += names[i];
  }
  return out;
}

}  // namespace

bool native_order(char byteorder) {
  const std::uint16_t probe = 1;
  const bool little = *reinterpret_cast<const unsigned char*>(&probe) == 1;
  return byteorder == '=' || byteorder == '|' || byteorder == (little ? '<' : '>');
}

std::atomic<int> g_bfloat16_type{-1};

// The DType of a NumPy dtype number, if optkern has one (NPY_HALF: float16; NPY_UBYTE: the codes
// of a q8 state, taken only where a list accepts q8).
bool dtype_of(int type_num, DType* out) {
  if (type_num == npy::NPY_FLOAT_) {
    *out = DType::f32;
  } else if (type_num == npy::NPY_DOUBLE_) {
    *out = DType::f64;
  } else if (type_num == 23) {  // NPY_HALF (pybind11 names no constant for it)
    *out = DType::f16;
  } else if (type_num == npy::NPY_UBYTE_) {
    *out = DType::q8;
  } else if (type_num >= 0 && type_num == g_bfloat16_type.load(std::memory_order_relaxed)) {
    *out = DType::bf16;
  } else {
    return false;
  }
  return true;
}

void set_bfloat16_type(int type_num) { g_bfloat16_type.store(type_num); }

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f64:
      return "float64";
    case DType::bf16:
      return "bfloat16";
    case DType::f16:
      return "float16";
    case DType::q8:
      return "uint8 (8-bit state codes)";
    case DType::f32:
      break;
  }
  return "float32";
}

std::string type_name(py::handle h) { return Py_TYPE(h.ptr())->tp_name; }

py::list snapshot(py::handle seq, const std::string& name, const char* what) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) {
    throw py::type_error(name + " must be a list or tuple of " + what + ", got " + type_name(seq));
  }
  return py::reinterpret_steal<py::list>(PySequence_List(seq.ptr()));
}

Positions positions_of(py::handle positions) {
  Positions out;
  if (positions.is_none()) return out;
  for (py::handle v : snapshot(positions, "positions", "ints")) {
    out.push_back(v.cast<std::size_t>());
  }
  return out;
}

Buffers::Buffers(py::handle first, const char* name, Access access, Positions positions,
                 Accept accept)
    : first_name_(name), positions_(std::move(positions)) {
  held_.reserve(2 + MAX_STATES);  // params, grads and states: no reallocation on the way
  first_ = add(first, name, access, accept);
  ranges_.reserve(count() * (2 + MAX_STATES));
}

std::string Buffers::label(const char* name, std::size_t i) const {
  return std::string(name) + "[" + std::to_string(i < positions_.size() ? positions_[i] : i) + "]";
}

std::vector<ArrayRef> Buffers::add(py::handle seq, const char* name, Access access, Accept accept,
                                   const StateShape* shape, const std::vector<char>* skip) {
  const bool is_first = held_.empty();
  if (is_first) first_types_ = accept.types;
  // The text of snapshot's message, built only where it can be thrown (a list or tuple is
  // taken): this runs for every list of every step, and building it cost several allocations.
  const bool sequence = PyList_Check(seq.ptr()) || PyTuple_Check(seq.ptr());
  const std::string what =
      sequence ? std::string()
               : types_str(accept.like_first && accept.types == 0 ? first_types_ : accept.types) +
                     " NumPy arrays";
  const py::list items = snapshot(seq, name, what.c_str());
  const std::size_t n = items.size();
  if (is_first) {
    sizes_.resize(n);
  } else if (n != count()) {
    throw py::value_error(std::string(name) + " has " + std::to_string(n) + " arrays but " +
                          first_name_ + " has " + std::to_string(count()) +
                          "; they must match one to one");
  }
  std::vector<ArrayRef> out(n, ArrayRef{nullptr, DType::f32});
  for (std::size_t i = 0; i < n; ++i) {
    DType type = DType::f32;
    if (shape != nullptr) {
      const int nd = shapes_[i]->nd;
      const bool applies = state_applies(*shape, nd);
      if (!applies) {
        if (!items[i].is_none()) {
          throw py::value_error(label(name, i) + " must be None: a " + std::to_string(nd) +
                                "-d parameter keeps no such state (" + state_shape_name(*shape) +
                                ")");
        }
        continue;  // out[i].data stays nullptr
      }
      if (items[i].is_none()) {
        throw py::value_error(label(name, i) + " is None, but a " + std::to_string(nd) +
                              "-d parameter needs it");
      }
      const auto* a = inspect(items[i], name, i, access, accept, &type);
      std::vector<Py_intptr_t> want(static_cast<std::size_t>(nd));
      state_dims(*shape, shapes_[i]->dimensions, nd, want.data());
      if (!(a->nd == nd && std::equal(a->dimensions, a->dimensions + nd, want.begin()))) {
        throw py::value_error(label(name, i) + " has shape " + dims_str(a->dimensions, a->nd) +
                              " but " + label(first_name_, i) + " of shape " +
                              dims_str(shapes_[i]->dimensions, nd) + " needs " +
                              dims_str(want.data(), nd));
      }
      std::size_t state_size = 1;
      for (int d = 0; d < nd; ++d) state_size *= static_cast<std::size_t>(want[d]);
      out[i] = {a->data, type};
      if (state_size != 0) {
        const auto lo = reinterpret_cast<std::uintptr_t>(a->data);
        ranges_.push_back({lo, lo + state_size * dtype_size(type), name, i, true});
      }
      continue;
    }
    if (skip != nullptr && i < skip->size() && (*skip)[i]) continue;  // out[i].data: nullptr
    const auto* a = inspect(items[i], name, i, access, accept, &type);
    if (is_first) {
      std::size_t size = 1;
      for (int d = 0; d < a->nd; ++d) size *= static_cast<std::size_t>(a->dimensions[d]);
      sizes_[i] = size;
      shapes_.push_back(a);
    } else if (!(a->nd == shapes_[i]->nd &&
                 std::equal(a->dimensions, a->dimensions + a->nd, shapes_[i]->dimensions))) {
      throw py::value_error(label(name, i) + " has shape " + dims_str(a->dimensions, a->nd) +
                            " but " + label(first_name_, i) + " has shape " +
                            dims_str(shapes_[i]->dimensions, shapes_[i]->nd));
    }
    out[i] = {a->data, type};
    if (sizes_[i] != 0) {
      const auto lo = reinterpret_cast<std::uintptr_t>(a->data);
      ranges_.push_back({lo, lo + sizes_[i] * dtype_size(type), name, i, access == Access::write});
    }
  }
  held_.push_back(items);
  return out;
}

std::vector<ArrayRef> Buffers::add_float32(py::handle seq, const char* given,
                                           const std::vector<std::ptrdiff_t>& shape) {
  names_.push_back(std::make_unique<std::string>(given));  // ranges_ keep the name
  const char* name = names_.back()->c_str();
  const py::list items = snapshot(seq, name, "float32 NumPy arrays");
  if (items.size() != count()) {
    throw py::value_error(std::string(name) + " has " + std::to_string(items.size()) +
                          " entries but " + first_name_ + " has " + std::to_string(count()) +
                          "; they must match one to one");
  }
  std::vector<ArrayRef> out(count(), ArrayRef{nullptr, DType::f32});
  for (std::size_t i = 0; i < count(); ++i) {
    if (shape[i] == NONE) {
      if (!items[i].is_none()) {
        throw py::value_error(label(name, i) + " must be None for a " + dtype_name(first_[i].type) +
                              " " + label(first_name_, i));
      }
      continue;
    }
    if (items[i].is_none()) {
      throw py::value_error(label(name, i) + " is None, but " + label(first_name_, i) +
                            " needs it");
    }
    DType type = DType::f32;
    const auto* a = inspect(items[i], name, i, Access::write, FLOAT32, &type);
    std::size_t n = 1;
    for (int d = 0; d < a->nd; ++d) n *= static_cast<std::size_t>(a->dimensions[d]);
    if (shape[i] == LIKE_PARAM) {
      if (!(a->nd == shapes_[i]->nd &&
            std::equal(a->dimensions, a->dimensions + a->nd, shapes_[i]->dimensions))) {
        throw py::value_error(label(name, i) + " has shape " + dims_str(a->dimensions, a->nd) +
                              " but " + label(first_name_, i) + " has shape " +
                              dims_str(shapes_[i]->dimensions, shapes_[i]->nd));
      }
    } else if (a->nd != 1 || n != static_cast<std::size_t>(shape[i])) {
      throw py::value_error(label(name, i) + " has shape " + dims_str(a->dimensions, a->nd) +
                            " but must have shape (" + std::to_string(shape[i]) +
                            ",): one number per block of " + std::to_string(Q8_BLOCK) +
                            " elements of " + label(first_name_, i));
    }
    out[i] = {a->data, type};
    if (n != 0) {
      const auto lo = reinterpret_cast<std::uintptr_t>(a->data);
      ranges_.push_back({lo, lo + n * sizeof(float), name, i, true});
    }
  }
  held_.push_back(items);
  return out;
}

void Buffers::add_range(const void* data, std::size_t bytes, const char* name, std::size_t index,
                        bool written) {
  if (bytes == 0) return;
  const auto lo = reinterpret_cast<std::uintptr_t>(data);
  ranges_.push_back({lo, lo + bytes, name, index, written});
}

void Buffers::check_disjoint() {
  std::sort(ranges_.begin(), ranges_.end(),
            [](const Range& a, const Range& b) { return a.lo < b.lo; });
  // Sweep by start address, remembering the range that reaches furthest. If any written range
  // overlaps another, the later-starting one of the pair meets either that range or another
  // overlap with a written range earlier in the sweep.
  const Range* reach = nullptr;
  for (const Range& r : ranges_) {
    if (reach != nullptr && r.lo < reach->hi && (r.written || reach->written)) {
      throw py::value_error(label(r.name, r.index) + " shares memory with " +
                            label(reach->name, reach->index) +
                            "; every buffer an optimizer writes must be separate from all others");
    }
    if (reach == nullptr || r.hi > reach->hi) reach = &r;
  }
}

// One array's checks, on NumPy's struct fields directly (this runs for every buffer of every
// step); no Python code runs here.
const py::detail::PyArray_Proxy* Buffers::inspect(py::handle item, const char* name, std::size_t i,
                                                  Access access, Accept accept, DType* type) const {
  // A state list (like_first with types) takes those types, or float64 like a float64 parameter.
  const bool exact = accept.like_first && (accept.types == 0 || first_[i].type == DType::f64);
  if (exact && py::isinstance<py::array>(item)) {
    const auto* a = py::detail::array_proxy(item.ptr());
    const auto* descr = py::detail::array_descriptor_proxy(a->descr);
    if (dtype_of(descr->type_num, type) && native_order(descr->byteorder) &&
        *type != first_[i].type) {
      throw py::type_error(label(name, i) + " must be a " + dtype_name(first_[i].type) +
                           " array like " + label(first_name_, i) + ", got dtype " +
                           std::string(py::str(py::handle(a->descr))));
    }
  }
  const auto text = [&] { return label(name, i); };
  return check_array(item, LabelRef(text), access, exact ? bit(first_[i].type) : accept.types,
                     type);
}

const py::detail::PyArray_Proxy* check_array(py::handle item, const std::string& label,
                                             Access access, unsigned types, DType* type) {
  const auto text = [&] { return label; };
  return check_array(item, LabelRef(text), access, types, type);
}

const py::detail::PyArray_Proxy* check_array(py::handle item, LabelRef label, Access access,
                                             unsigned types, DType* type) {
  if (!py::isinstance<py::array>(item)) {
    throw py::type_error(label() + " must be a " + types_str(types) + " NumPy array, got " +
                         type_name(item));
  }
  if (is_masked_array(item)) {
    throw py::type_error(label() +
                         " is a masked array (numpy.ma): its mask would be "
                         "ignored and the masked-out values used; pass .filled(...) or .data");
  }
  const auto* a = py::detail::array_proxy(item.ptr());
  const auto* descr = py::detail::array_descriptor_proxy(a->descr);
  const bool known = dtype_of(descr->type_num, type) && native_order(descr->byteorder);
  if (!known || !(types & bit(*type))) {
    throw py::type_error(label() + " must be a " + types_str(types) +
                         " array in native byte order, got dtype " +
                         std::string(py::str(py::handle(a->descr))));
  }
  if (!(a->flags & npy::NPY_ARRAY_C_CONTIGUOUS_)) {
    std::string strides = "(";
    for (int d = 0; d < a->nd; ++d) strides += (d ? ", " : "") + std::to_string(a->strides[d]);
    strides += a->nd == 1 ? ",)" : ")";
    throw py::value_error(
        label() + " must be C-contiguous, got strides " + strides +
        (access == Access::write
             ? "; it is updated in place, so a contiguous copy would lose the update"
             : "; np.ascontiguousarray() makes a contiguous copy"));
  }
  if (!(a->flags & npy::NPY_ARRAY_ALIGNED_)) {
    throw py::value_error(label() + " is not aligned to " + std::to_string(dtype_size(*type)) +
                          " bytes");
  }
  if (access == Access::write && !(a->flags & npy::NPY_ARRAY_WRITEABLE_)) {
    throw py::value_error(label() + " is read-only, but it is updated in place");
  }
  return a;
}

}  // namespace optkern
