// optkern._core: strict, zero-copy bindings.
//
// Every update rule goes through one binding, _core.step (or _core.prepare + _core.run, which the
// optimizer classes use to validate every group before any is updated). It looks the rule up in
// the declarations of rules.hpp, checks the hyperparameters against their declared ranges and
// every array (dtype, layout, shape, aliasing) before anything is written, computes the per-step
// scalars in double (refusing any float32 cannot hold), releases the GIL and makes one
// multi-tensor kernel call per group. Python code can run only before the first array is
// inspected: every list is copied first, so nothing the caller's __index__ or __float__ does can
// free what is iterated.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dispatch.hpp"
#include "kernel_api.hpp"
#include "multi_tensor.hpp"
#include "thread_pool.hpp"
#define OPTKERN_RULE_DECLARATIONS
#include "rules.hpp"

namespace py = pybind11;

namespace optkern {
// bind_algos.cpp: the fused passes of Muon and L-BFGS, and row-sparse helpers.
void register_algos(py::module_& m);

namespace {

using npy = py::detail::npy_api;

enum class Access { read, write };

std::string type_name(py::handle h) { return Py_TYPE(h.ptr())->tp_name; }

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

bool native_order(char byteorder) {
  const std::uint16_t probe = 1;
  const bool little = *reinterpret_cast<const unsigned char*>(&probe) == 1;
  return byteorder == '=' || byteorder == '|' || byteorder == (little ? '<' : '>');
}

// A list or tuple, copied into a new list of strong references: whatever Python code runs while
// C++ walks it (an item's __index__, another thread) cannot free an item under us. Anything else,
// an ndarray included, is refused: iterating a 2-D array would hand us row views and hide the
// caller's mistake.
py::list snapshot(py::handle seq, const std::string& name, const char* what) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) {
    throw py::type_error(name + " must be a list or tuple of " + what + ", got " + type_name(seq));
  }
  return py::reinterpret_steal<py::list>(PySequence_List(seq.ptr()));
}

// The caller's index of each tensor (the optimizer classes pass the index into the gradient list
// given to step()), for error messages; empty: 0, 1, 2, ...
using Positions = std::vector<std::size_t>;

Positions positions_of(py::handle positions) {
  Positions out;
  if (positions.is_none()) return out;
  for (py::handle v : snapshot(positions, "positions", "ints"))
    out.push_back(v.cast<std::size_t>());
  return out;
}

// The validated float32 arrays of one call. The first list (the parameters of an update, or the
// gradients of a norm) fixes the number of tensors and their shapes; every other list must match
// it one to one. Each array is held by a strong reference until the call is over.
class Buffers {
 public:
  Buffers(py::handle first, const char* name, Access access, Positions positions)
      : first_name_(name), positions_(std::move(positions)) {
    first_ = add(first, name, access);
  }

  std::size_t count() const { return sizes_.size(); }
  const std::vector<std::size_t>& sizes() const { return sizes_; }
  float* param(std::size_t t) const { return first_[t]; }
  // The first list's array t: its number of dimensions and its dimensions.
  int ndim(std::size_t t) const { return shapes_[t]->nd; }
  const Py_intptr_t* dims(std::size_t t) const { return shapes_[t]->dimensions; }
  const std::vector<float*>& first() const { return first_; }

  std::string label(const char* name, std::size_t i) const {
    return std::string(name) + "[" + std::to_string(i < positions_.size() ? positions_[i] : i) +
           "]";
  }

  // Validates a list of arrays (matched to the first list) and returns their data pointers.
  // `shape`: a state list, each array shaped by its kind from its parameter's shape (rule_api's
  // state_dims); an entry is None, and its pointer nullptr, where the kind does not apply.
  std::vector<float*> add(py::handle seq, const char* name, Access access,
                          const StateShape* shape = nullptr) {
    const py::list items = snapshot(seq, name, "float32 NumPy arrays");
    const bool is_first = held_.empty();
    const std::size_t n = items.size();
    if (is_first) {
      sizes_.resize(n);
    } else if (n != count()) {
      throw py::value_error(std::string(name) + " has " + std::to_string(n) + " arrays but " +
                            first_name_ + " has " + std::to_string(count()) +
                            "; they must match one to one");
    }
    std::vector<float*> out(n);
    for (std::size_t i = 0; i < n; ++i) {
      std::size_t state_size = 0;
      if (shape != nullptr) {
        const int nd = shapes_[i]->nd;
        const bool applies = state_applies(*shape, nd);
        if (!applies) {
          if (!items[i].is_none()) {
            throw py::value_error(label(name, i) + " must be None: a " + std::to_string(nd) +
                                  "-d parameter keeps no such state (" + state_shape_name(*shape) +
                                  ")");
          }
          continue;  // out[i] stays nullptr
        }
        if (items[i].is_none()) {
          throw py::value_error(label(name, i) + " is None, but a " + std::to_string(nd) +
                                "-d parameter needs it");
        }
        const auto* a = inspect(items[i], name, i, access);
        std::vector<Py_intptr_t> want(static_cast<std::size_t>(nd));
        state_dims(*shape, shapes_[i]->dimensions, nd, want.data());
        if (!(a->nd == nd && std::equal(a->dimensions, a->dimensions + nd, want.begin()))) {
          throw py::value_error(label(name, i) + " has shape " + dims_str(a->dimensions, a->nd) +
                                " but " + label(first_name_, i) + " of shape " +
                                dims_str(shapes_[i]->dimensions, nd) + " needs " +
                                dims_str(want.data(), nd));
        }
        state_size = 1;
        for (int d = 0; d < nd; ++d) state_size *= static_cast<std::size_t>(want[d]);
        out[i] = reinterpret_cast<float*>(a->data);
        if (state_size != 0) {
          const auto lo = reinterpret_cast<std::uintptr_t>(out[i]);
          ranges_.push_back({lo, lo + state_size * sizeof(float), name, i, true});
        }
        continue;
      }
      const auto* a = inspect(items[i], name, i, access);
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
      out[i] = reinterpret_cast<float*>(a->data);
      if (sizes_[i] != 0) {
        const auto lo = reinterpret_cast<std::uintptr_t>(out[i]);
        ranges_.push_back({lo, lo + sizes_[i] * sizeof(float), name, i, access == Access::write});
      }
    }
    held_.push_back(items);
    return out;
  }

  // Refuses any buffer that is written and shares memory with another buffer of the call
  // (gradients may share memory with each other: they are only read).
  void check_disjoint() {
    std::sort(ranges_.begin(), ranges_.end(),
              [](const Range& a, const Range& b) { return a.lo < b.lo; });
    // Sweep by start address, remembering the range that reaches furthest. If any written range
    // overlaps another, the later-starting one of the pair meets either that range or another
    // overlap with a written range earlier in the sweep.
    const Range* reach = nullptr;
    for (const Range& r : ranges_) {
      if (reach != nullptr && r.lo < reach->hi && (r.written || reach->written)) {
        throw py::value_error(
            label(r.name, r.index) + " shares memory with " + label(reach->name, reach->index) +
            "; every buffer an optimizer writes must be separate from all others");
      }
      if (reach == nullptr || r.hi > reach->hi) reach = &r;
    }
  }

 private:
  struct Range {
    std::uintptr_t lo, hi;
    const char* name;
    std::size_t index;
    bool written;
  };

  // One array's checks, on NumPy's struct fields directly (this runs for every buffer of every
  // step); no Python code runs here.
  const py::detail::PyArray_Proxy* inspect(py::handle item, const char* name, std::size_t i,
                                           Access access) const {
    if (!py::isinstance<py::array>(item)) {
      throw py::type_error(label(name, i) + " must be a float32 NumPy array, got " +
                           type_name(item));
    }
    if (is_masked_array(item)) {
      throw py::type_error(label(name, i) +
                           " is a masked array (numpy.ma): its mask would be "
                           "ignored and the masked-out values used; pass .filled(...) or .data");
    }
    const auto* a = py::detail::array_proxy(item.ptr());
    const auto* descr = py::detail::array_descriptor_proxy(a->descr);
    if (descr->type_num != npy::NPY_FLOAT_ || !native_order(descr->byteorder)) {
      throw py::type_error(label(name, i) +
                           " must be a float32 array in native byte order, "
                           "got dtype " +
                           std::string(py::str(py::handle(a->descr))));
    }
    if (a->nd == 0) {
      throw py::value_error(label(name, i) +
                            " is a 0-d array; optkern updates arrays with at "
                            "least one dimension (use a shape (1,) array)");
    }
    if (!(a->flags & npy::NPY_ARRAY_C_CONTIGUOUS_)) {
      std::string strides = "(";
      for (int d = 0; d < a->nd; ++d) strides += (d ? ", " : "") + std::to_string(a->strides[d]);
      strides += a->nd == 1 ? ",)" : ")";
      throw py::value_error(
          label(name, i) + " must be C-contiguous, got strides " + strides +
          (access == Access::write
               ? "; it is updated in place, so a contiguous copy would lose the update"
               : "; np.ascontiguousarray() makes a contiguous copy"));
    }
    if (!(a->flags & npy::NPY_ARRAY_ALIGNED_)) {
      throw py::value_error(label(name, i) + " is not aligned to 4 bytes");
    }
    if (access == Access::write && !(a->flags & npy::NPY_ARRAY_WRITEABLE_)) {
      throw py::value_error(label(name, i) + " is read-only, but it is updated in place");
    }
    return a;
  }

  const char* first_name_;
  Positions positions_;
  std::vector<std::size_t> sizes_;
  std::vector<const py::detail::PyArray_Proxy*> shapes_;  // the first list's arrays
  std::vector<float*> first_;
  std::vector<py::list> held_;  // every list of the call, as copied
  std::vector<Range> ranges_;
};

// Runs f(tensor, begin, end) over the call's elements with the GIL released. weight: the work of
// one element, in the units of the single-thread threshold (multi_tensor.hpp).
template <class F>
void run(const Buffers& cb, std::size_t weight, F&& f) {
  py::gil_scoped_release nogil;
  for_each_span(cb.sizes(), weight, f);
}

const KernelTable& table_for(py::handle isa) {
  if (isa.is_none()) return kernels();
  const std::string name = py::cast<std::string>(isa);
  const KernelTable* t = kernels_for(name);
  if (t == nullptr) {
    throw py::value_error("isa='" + name + "' is not available here (available: " +
                          py::str(py::cast(available_isas())).cast<std::string>() + ")");
  }
  return *t;
}

// ------------------------------------------------------------------------------------------------
// Hyperparameters

constexpr double FLOAT32_MAX = 3.4028234663852886e38;

// Every rule's last hyperparameter: maximize negates the gradient (folded into grad_scale).
constexpr HyperDecl kMaximize = {"maximize", Range::flag, 0.0, "maximize", -1};

const RuleDecl& rule_named(py::handle name) {
  const std::string n = py::cast<std::string>(name);
  for (const RuleDecl& r : rules::kRules) {
    if (n == r.name) return r;
  }
  std::string known;
  for (const RuleDecl& r : rules::kRules) known += std::string(known.empty() ? "" : ", ") + r.name;
  throw py::value_error("unknown update rule '" + n + "' (known: " + known + ")");
}

const HyperDecl& hyper_decl(const RuleDecl& r, std::size_t i) {
  return i < r.n_hyper ? r.hyper[i] : kMaximize;
}

// The name a message gives hyperparameter `name` (labels: {name: label}, e.g. a schedule's lr).
std::string hyper_label(const char* name, py::handle labels) {
  if (!labels.is_none()) {
    PyObject* l = PyDict_GetItemString(labels.ptr(), name);
    if (l != nullptr && PyUnicode_Check(l)) return py::reinterpret_borrow<py::str>(l);
  }
  return name;
}

// One value, checked against its declaration: a real number (float or int, not bool) that float32
// can hold, in its range; or a bool for a flag. The Python layer turns NumPy scalars, 0-d arrays
// and the like into floats first; here only exact types pass, so no Python code runs.
double hyper_value(const HyperDecl& d, py::handle v, py::handle labels) {
  PyObject* o = v.ptr();
  if (d.range == Range::flag) {
    if (!PyBool_Check(o)) {
      throw py::type_error(hyper_label(d.name, labels) + " must be a bool, got " + type_name(v) +
                           ": " + std::string(py::repr(v)));
    }
    return o == Py_True ? 1.0 : 0.0;
  }
  if (o == Py_None && d.none.allowed) return d.none.value;  // None stands for a value
  double x;
  if (PyFloat_Check(o)) {
    x = PyFloat_AS_DOUBLE(o);
  } else if (PyLong_Check(o) && !PyBool_Check(o)) {
    x = PyLong_AsDouble(o);
    if (x == -1.0 && PyErr_Occurred()) {  // beyond float64
      PyErr_Clear();
      x = std::numeric_limits<double>::infinity();
    }
  } else {
    throw py::type_error(hyper_label(d.name, labels) + " must be a real number" +
                         (d.none.allowed ? std::string(" or None") : std::string()) + ", got " +
                         type_name(v) + ": " + std::string(py::repr(v)));
  }
  const std::string got = ", got " + std::string(py::repr(v));
  if (!std::isfinite(x) || std::fabs(x) > FLOAT32_MAX) {
    throw py::value_error(hyper_label(d.name, labels) +
                          " must be finite (at most 3.403e+38 in magnitude, as float32 holds it)" +
                          got);
  }
  switch (d.range) {
    case Range::nonnegative:
      if (x < 0) throw py::value_error(hyper_label(d.name, labels) + " must be >= 0" + got);
      break;
    case Range::unit:
      if (x < 0 || x > 1) {
        throw py::value_error(hyper_label(d.name, labels) + " must be in [0, 1]" + got);
      }
      break;
    case Range::unit_open:
      if (x < 0 || x >= 1) {
        throw py::value_error(hyper_label(d.name, labels) + " must be in [0, 1)" + got);
      }
      break;
    case Range::open_unit:
      if (x <= 0 || x >= 1) {
        throw py::value_error(hyper_label(d.name, labels) + " must be in (0, 1)" + got);
      }
      break;
    case Range::above_one:
      if (x <= 1) throw py::value_error(hyper_label(d.name, labels) + " must be > 1" + got);
      break;
    case Range::one_or_more:
      if (x < 1) throw py::value_error(hyper_label(d.name, labels) + " must be >= 1" + got);
      break;
    case Range::nonpositive:
      if (x > 0) throw py::value_error(hyper_label(d.name, labels) + " must be <= 0" + got);
      break;
    case Range::flag:
      break;
  }
  return x;
}

// The rule's hyperparameters from a dict {name: value}, in declaration order (maximize last);
// a missing name takes its default, an unknown one is refused.
std::vector<double> parse_hyper(const RuleDecl& r, py::handle hyper, py::handle labels) {
  if (!PyDict_Check(hyper.ptr())) {
    throw py::type_error("hyper must be a dict of hyperparameters, got " + type_name(hyper));
  }
  const std::size_t n = r.n_hyper + 1;
  std::vector<double> values(n);
  std::vector<char> seen(n, 0);
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(hyper.ptr(), &pos, &key, &value)) {
    std::size_t i = 0;
    for (; i < n; ++i) {
      if (PyUnicode_Check(key) &&
          PyUnicode_CompareWithASCIIString(key, hyper_decl(r, i).name) == 0) {
        break;
      }
    }
    if (i == n) {
      throw py::value_error(std::string(r.cls) + " has no hyperparameter " +
                            std::string(py::repr(key)));
    }
    seen[i] = 1;
    values[i] = hyper_value(hyper_decl(r, i), value, labels);
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (!seen[i]) {
      const HyperDecl& d = hyper_decl(r, i);
      values[i] = d.none.none_default ? d.none.value : d.default_value;
    }
  }
  if (r.check != nullptr) {
    try {
      r.check(Hyper(r.hyper, r.n_hyper, values.data()));
    } catch (const HyperError& e) {
      throw py::value_error(e.what());
    }
  }
  return values;
}

bool state_needed(const RuleDecl& r, const StateDecl& s, const std::vector<double>& h) {
  return s.when == nullptr || Hyper(r.hyper, r.n_hyper, h.data())[s.when] != 0.0;
}

// Step counts of this update: an int for all tensors (one entry, `all` set), or a list or tuple
// of ints >= 1, one per tensor. Converting them may run Python code (__index__), so this runs
// before any array is looked at; the count is matched to the parameters afterwards.
struct StepCounts {
  std::vector<std::int64_t> values;
  bool all = false;
};

StepCounts parse_steps(py::handle steps, const Positions& positions) {
  auto label = [&](std::size_t i) {
    return "steps[" + std::to_string(i < positions.size() ? positions[i] : i) + "]";
  };
  auto check = [&](py::handle v, std::size_t i) -> std::int64_t {
    py::object number;  // a plain int, or the int a NumPy integer stands for
    if (PyLong_CheckExact(v.ptr())) {
      number = py::reinterpret_borrow<py::object>(v);
    } else if (!PyBool_Check(v.ptr()) && PyIndex_Check(v.ptr())) {
      number = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
      if (!number) throw py::error_already_set();
    } else {
      throw py::type_error(label(i) + " must be an int, got " + type_name(v));
    }
    int overflow = 0;
    const long long s = PyLong_AsLongLongAndOverflow(number.ptr(), &overflow);
    if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (overflow != 0) throw py::value_error(label(i) + " is out of range: it must fit in 64 bits");
    if (s < 1) throw py::value_error(label(i) + " must be >= 1, got " + std::to_string(s));
    return s;
  };
  StepCounts out;
  if (!PyList_Check(steps.ptr()) && !PyTuple_Check(steps.ptr())) {
    out.values.push_back(check(steps, 0));  // checked even when nothing is updated
    out.all = true;
    return out;
  }
  const py::list items = snapshot(steps, "steps", "ints");  // __index__ may change the original
  for (std::size_t i = 0; i < items.size(); ++i) out.values.push_back(check(items[i], i));
  return out;
}

std::vector<std::int64_t> steps_for(const StepCounts& s, std::size_t count) {
  if (s.all) return std::vector<std::int64_t>(count, s.values[0]);
  if (s.values.size() != count) {
    throw py::value_error("steps has " + std::to_string(s.values.size()) +
                          " entries but params has " + std::to_string(count));
  }
  return s.values;
}

// ------------------------------------------------------------------------------------------------
// One validated update of one group, ready to run.

template <KernelId K>
struct Slot;
#define OPTKERN_SLOT(kname, S, n, w)                          \
  template <>                                                 \
  struct Slot<KernelId::kname> {                              \
    static auto get(const KernelTable& t) { return t.kname; } \
  };
OPTKERN_KERNELS(OPTKERN_SLOT)
#undef OPTKERN_SLOT

template <KernelId K>
struct ReduceSlot;
#define OPTKERN_REDUCE_SLOT_GET(kname, n)                              \
  template <>                                                          \
  struct ReduceSlot<KernelId::kname> {                                 \
    static auto get(const KernelTable& t) { return t.kname##_reduce; } \
  };
OPTKERN_REDUCTIONS(OPTKERN_REDUCE_SLOT_GET)
#undef OPTKERN_REDUCE_SLOT_GET

// Every rule on a kernel with a reduction pass declares its per_array function (RULE_REDUCED),
// and no other rule does.
constexpr bool reductions_declared() {
  for (const RuleDecl& r : rules::kRules) {
    bool reduced = false;
#define OPTKERN_IS_REDUCED(kname, n) reduced = reduced || r.kernel == KernelId::kname;
    OPTKERN_REDUCTIONS(OPTKERN_IS_REDUCED)
#undef OPTKERN_IS_REDUCED
    if (reduced != (r.per_array != nullptr)) return false;
  }
  return true;
}
static_assert(reductions_declared(),
              "a rule on a kernel of OPTKERN_REDUCTIONS needs RULE_REDUCED, and only such a rule");

template <KernelId K>
struct FactoredSlot;
#define OPTKERN_FACTORED_SLOT_GET(kname, n)                          \
  template <>                                                        \
  struct FactoredSlot<KernelId::kname> {                             \
    static auto get(const KernelTable& t) { return t.kname##_pass; } \
  };
OPTKERN_FACTORED(OPTKERN_FACTORED_SLOT_GET)
#undef OPTKERN_FACTORED_SLOT_GET

// Every rule on a factored kernel declares its host step (RULE_FACTORED), and no other rule does.
constexpr bool factored_declared() {
  for (const RuleDecl& r : rules::kRules) {
    bool factored = false;
#define OPTKERN_IS_FACTORED(kname, n) factored = factored || r.kernel == KernelId::kname;
    OPTKERN_FACTORED(OPTKERN_IS_FACTORED)
#undef OPTKERN_IS_FACTORED
    if (factored != (r.between != nullptr)) return false;
  }
  return true;
}
static_assert(factored_declared(),
              "a rule on a kernel of OPTKERN_FACTORED needs RULE_FACTORED, and only such a rule");

// Tiles of a factored kernel: a matrix's rows longer than 2 * FACTOR_COLS are cut into column
// tiles of about FACTOR_COLS; each column tile into row tiles of about FACTOR_TILE elements, at
// most FACTOR_TILES of them and at least FACTOR_MIN_ROWS rows each (an array of <= 1 dimension:
// tiles of FACTOR_TILE elements). Each tile keeps a partial sum per row and per column it holds
// (a 5000 x 10000 matrix: 1 x 64 tiles, 5 MB of column partials; 16 x 250000: 31 x 1 tiles).
// Fixed by the shapes alone, never by the thread count. A tile's rows are separate runs of
// memory, each restarting the hardware's streams: with FACTOR_COLS = 4096 a 5000 x 10000 matrix
// came in runs of 3344 elements and its three passes took 1.15-1.5x the time of three flat passes
// over the same bytes, against 1.0-1.2x in whole rows of 10000 (the kernel's column block,
// BLOCK = 16384 floats, still holds a tile's width).
constexpr std::size_t FACTOR_TILE = 4096;
constexpr std::size_t FACTOR_TILES = 64;
constexpr std::size_t FACTOR_MIN_ROWS = 16;
constexpr std::size_t FACTOR_COLS = 8192;
// Rows or columns per range of a factored rule's work per row and column (between_range).
constexpr std::size_t HOST_RANGE = 4096;

// Elements per block of a reduction pass (as NORM_BLOCK for the gradient norms): each block's
// sums are computed on one thread, in a fixed order, and added per array in block order, so the
// sums, and everything computed from them, are the same for any number of threads.
constexpr std::size_t REDUCE_BLOCK = 4096;

constexpr std::size_t scalars_size() {
  std::size_t n = 0;
#define OPTKERN_SIZE(kname, S, ns, w) n = sizeof(S) > n ? sizeof(S) : n;
  OPTKERN_KERNELS(OPTKERN_SIZE)
#undef OPTKERN_SIZE
  return n;
}
// Room for any rule's scalars, suitably aligned.
struct alignas(alignof(std::max_align_t)) ScalarsSlot {
  unsigned char bytes[scalars_size()];
};

class Prepared {
 public:
  Prepared(const RuleDecl& rule, py::handle params, py::handle grads, py::handle states,
           py::handle hyper, py::handle steps, double grad_scale, py::handle positions,
           py::handle isa, py::handle record)
      : rule_(rule), table_(&table_for(isa)) {
    // Everything that can run Python code comes first: the hyperparameters, the step counts,
    // the positions and the state lists (all copied); then the arrays, which run none.
    const std::vector<double> h = parse_hyper(rule, hyper, py::none());
    // grad_scale is data, like a gradient: a clipping coefficient from a NaN norm is NaN and
    // makes the update NaN, as in torch. optkern.functional refuses a non-finite one from users.
    if (h[rule.n_hyper] != 0.0) grad_scale = -grad_scale;  // maximize
    if (!PyDict_Check(states.ptr())) {
      throw py::type_error("states must be a dict {state name: list of arrays}, got " +
                           type_name(states));
    }
    std::vector<py::object> lists(rule.n_states);
    for (std::size_t k = 0; k < rule.n_states; ++k) {
      const StateDecl& s = rule.states[k];
      PyObject* l = PyDict_GetItemString(states.ptr(), s.name);
      if (state_needed(rule, s, h)) {
        if (l == nullptr || (l == Py_None && s.when != nullptr)) {
          std::string why;
          if (s.when != nullptr) {
            const bool flag =
                Hyper(rule.hyper, rule.n_hyper, h.data())[s.when] != 0.0 &&
                std::any_of(rule.hyper, rule.hyper + rule.n_hyper, [&](const HyperDecl& d) {
                  return std::string(d.name) == s.when && d.range == Range::flag;
                });
            why = std::string(" when ") + s.when + (flag ? "=True" : " != 0");
          }
          throw py::value_error(std::string(s.arg) + " is required" + why);
        }
        lists[k] = py::reinterpret_borrow<py::object>(l);
      }
    }
    {
      PyObject *key, *value;
      Py_ssize_t pos = 0;
      while (PyDict_Next(states.ptr(), &pos, &key, &value)) {
        const bool known =
            PyUnicode_Check(key) &&
            (std::any_of(rule.states, rule.states + rule.n_states,
                         [&](const StateDecl& s) {
                           return PyUnicode_CompareWithASCIIString(key, s.name) == 0;
                         }) ||
             std::any_of(rule.carried, rule.carried + rule.n_carried, [&](const CarriedDecl& c) {
               return PyUnicode_CompareWithASCIIString(key, c.name) == 0;
             }));
        if (!known) {
          throw py::value_error(std::string(rule.cls) + " keeps no state " +
                                std::string(py::repr(key)));
        }
      }
    }
    // The carried numbers (CarriedDecl): a list of floats per name, read now (converting them
    // may run Python code) and written back, with the state dicts, after the kernels.
    for (std::size_t k = 0; k < rule.n_carried; ++k) {
      const CarriedDecl& c = rule.carried[k];
      PyObject* l = PyDict_GetItemString(states.ptr(), c.name);
      if (l == nullptr) throw py::value_error(std::string(c.arg) + " is required");
      if (!PyList_CheckExact(l)) {
        throw py::type_error(std::string(c.arg) +
                             " must be a list of floats (updated in place), "
                             "got " +
                             type_name(l));
      }
      carried_lists_.push_back(py::reinterpret_borrow<py::list>(l));
      const py::list items = snapshot(l, c.arg, "floats");
      std::vector<double> values;
      for (std::size_t i = 0; i < items.size(); ++i) {
        PyObject* o = items[i].ptr();
        if (PyBool_Check(o) || !(PyFloat_Check(o) || PyLong_Check(o))) {
          throw py::type_error(std::string(c.arg) + "[" + std::to_string(i) +
                               "] must be a real number, got " + type_name(items[i]));
        }
        const double x = PyFloat_Check(o) ? PyFloat_AS_DOUBLE(o) : PyLong_AsDouble(o);
        if (PyErr_Occurred()) throw py::error_already_set();
        if (!std::isfinite(x)) {
          throw py::value_error(std::string(c.arg) + "[" + std::to_string(i) +
                                "] must be finite, got " + std::string(py::repr(items[i])));
        }
        values.push_back(x);
      }
      carried_in_.push_back(std::move(values));
    }
    Positions pos = positions_of(positions);
    const bool steps_given = !steps.is_none();
    if (rule.steps == Steps::used && !steps_given) {
      throw py::type_error(std::string(rule.cls) + " needs the step number (steps=)");
    }
    py::list record_items;
    if (!record.is_none()) record_items = snapshot(record, "record", "state dicts");
    StepCounts step_counts;
    if (steps_given) step_counts = parse_steps(steps, pos);
    // From here on no Python code runs until the kernels are done.

    buffers_ = std::make_unique<Buffers>(params, "params", Access::write, std::move(pos));
    Buffers& cb = *buffers_;
    const std::size_t count = cb.count();
    grads_ = cb.add(grads, "grads", Access::read);
    for (std::size_t k = 0; k < rule.n_states; ++k) {
      if (lists[k]) {
        const StateShape& kind = rule.states[k].shape;
        state_[k] = cb.add(lists[k], rule.states[k].arg, Access::write,
                           kind == StateShape::like_param ? nullptr : &kind);
      }
    }
    cb.check_disjoint();
    steps_ = steps_given ? steps_for(step_counts, count) : std::vector<std::int64_t>(count, 2);
    if (!record.is_none()) {
      if (record_items.size() != count) {
        throw py::value_error("record has " + std::to_string(record_items.size()) +
                              " entries but params has " + std::to_string(count));
      }
      for (py::handle d : record_items) {
        if (!PyDict_CheckExact(d.ptr())) {
          throw py::type_error("record must hold the parameters' state dicts, got " + type_name(d));
        }
      }
      record_ = record_items;
    }

    const std::size_t nc = rule.n_carried;
    for (std::size_t k = 0; k < nc; ++k) {
      if (carried_in_[k].size() != count) {
        throw py::value_error(std::string(rule.carried[k].arg) + " has " +
                              std::to_string(carried_in_[k].size()) + " entries but params has " +
                              std::to_string(count));
      }
    }
    // carried_[t * nc + k]: tensor t's k-th carried number, turned by the scalars function from
    // its value before this step into its value after it.
    carried_.resize(count * nc);
    for (std::size_t t = 0; t < count; ++t) {
      for (std::size_t k = 0; k < nc; ++k) carried_[t * nc + k] = carried_in_[k][t];
    }

    // The per-step scalars, in double from the step count (and the carried numbers), one set
    // per distinct step and carried values.
    const Hyper hyp(rule.hyper, rule.n_hyper, h.data());
    which_.resize(count);
    for (std::size_t t = 0; t < count; ++t) {
      bool same = t > 0 && steps_[t] == steps_[t - 1];
      for (std::size_t k = 0; same && k < nc; ++k) {
        same = carried_in_[k][t] == carried_in_[k][t - 1];
      }
      if (same) {
        which_[t] = which_[t - 1];
        std::copy(carried_.begin() + (t - 1) * nc, carried_.begin() + t * nc,
                  carried_.begin() + t * nc);
        continue;
      }
      StepInfo info{rule.cls, steps_[t], steps_[t] == 1, grad_scale};
      info.carried = nc ? carried_.data() + t * nc : nullptr;
      scalars_.emplace_back();
      try {
        rule.scalars(hyp, info, scalars_.back().bytes);
      } catch (const HyperError& e) {
        throw py::value_error(e.what());
      }
      which_[t] = scalars_.size() - 1;
    }
    if (count == 0 && !scalars_.empty()) scalars_.clear();
    if (count == 0) {  // still check the scalars of step 1 (or the given step)
      StepInfo info{rule.cls, steps_given && step_counts.all ? step_counts.values[0] : 1, true,
                    grad_scale};
      std::vector<double> start(nc);  // each carried number at its start
      for (std::size_t k = 0; k < nc; ++k) {
        const CarriedDecl& c = rule.carried[k];
        start[k] = c.init_from != nullptr ? hyp[c.init_from] : c.init;
      }
      info.carried = nc ? start.data() : nullptr;
      ScalarsSlot probe{};
      try {
        rule.scalars(hyp, info, probe.bytes);
      } catch (const HyperError& e) {
        throw py::value_error(e.what());
      }
    }
  }

  // The kernels, with the GIL released by the caller.
  void run_kernels() const {
    switch (rule_.kernel) {
#define OPTKERN_CASE(kname, S, n, w) \
  case KernelId::kname:              \
    run_rule<KernelId::kname>();     \
    break;
      OPTKERN_KERNELS(OPTKERN_CASE)
#undef OPTKERN_CASE
      case KernelId::count:
        break;
    }
  }

  // The step's bookkeeping (GIL held, no Python code runs): each state dict's step count.
  // The carried numbers go back into the lists they came from (and the state dicts).
  void record() const {
    const std::size_t nc = rule_.n_carried, count = steps_.size();
    for (std::size_t k = 0; k < nc; ++k) {
      PyObject* l = carried_lists_[k].ptr();
      if (static_cast<std::size_t>(PyList_GET_SIZE(l)) != count) {
        throw py::value_error(std::string(rule_.carried[k].arg) +
                              " changed length during the step");
      }
      for (std::size_t t = 0; t < count; ++t) {
        PyObject* v = PyFloat_FromDouble(carried_[t * nc + k]);
        if (v == nullptr) throw py::error_already_set();
        PyList_SetItem(l, static_cast<Py_ssize_t>(t), v);  // steals v
      }
    }
    if (!record_) return;
    const py::list& items = *record_;
    for (std::size_t t = 0; t < count; ++t) {
      py::int_ step(steps_[t]);
      if (PyDict_SetItemString(items[t].ptr(), "step", step.ptr()) != 0) {
        throw py::error_already_set();
      }
      for (std::size_t k = 0; k < nc; ++k) {
        py::float_ v(carried_[t * nc + k]);
        if (PyDict_SetItemString(items[t].ptr(), rule_.carried[k].name, v.ptr()) != 0) {
          throw py::error_already_set();
        }
      }
    }
  }

  bool used = false;

 private:
  // The state pointers of tensor t from element b on.
  template <KernelId K>
  void states_at(std::size_t t, std::size_t b, float* (&st)[MAX_STATES]) const {
    for (std::size_t k = 0; k < KernelInfo<K>::states; ++k) {
      st[k] = state_[k].empty() ? nullptr : state_[k][t] + b;
    }
  }

  template <KernelId K>
  void run_rule() const {
    if constexpr (Factored<K>::passes > 0) {
      factored<K>();
      return;
    }
    using S = typename KernelInfo<K>::Scalars;
    const auto fn = Slot<K>::get(*table_);
    const Buffers& cb = *buffers_;
    // Each tensor's scalars: its step's, or its own after a reduction pass.
    const ScalarsSlot* scalars = scalars_.data();
    const std::size_t* which = which_.data();
    std::vector<ScalarsSlot> per_array;
    std::vector<std::size_t> own;
    if constexpr (Reduction<K>::sums > 0) {
      per_array = reduce<K>();
      own.resize(cb.count());
      for (std::size_t t = 0; t < own.size(); ++t) own[t] = t;
      scalars = per_array.data();
      which = own.data();
    }
    auto body = [&](std::size_t t, std::size_t b, std::size_t e) {
      float* st[MAX_STATES] = {};
      states_at<K>(t, b, st);
      fn(*reinterpret_cast<const S*>(scalars[which[t]].bytes), cb.param(t) + b, grads_[t] + b, st,
         e - b);
    };
    for_each_span(cb.sizes(), KernelInfo<K>::weight, body);
  }

  // The reduction pass of a kernel that has one (OPTKERN_REDUCTIONS): its first pass over fixed
  // blocks of every array, in parallel; each array's sums added in block order; then the rule's
  // per_array function gives each array its own scalars, returned one per tensor.
  template <KernelId K>
  std::vector<ScalarsSlot> reduce() const {
    using S = typename KernelInfo<K>::Scalars;
    constexpr std::size_t NR = Reduction<K>::sums;
    const auto fn = ReduceSlot<K>::get(*table_);
    const Buffers& cb = *buffers_;
    struct Block {
      std::size_t tensor, begin, size;
    };
    std::vector<Block> blocks;
    for (std::size_t t = 0; t < cb.count(); ++t) {
      for (std::size_t b = 0; b < cb.sizes()[t]; b += REDUCE_BLOCK) {
        blocks.push_back({t, b, std::min(REDUCE_BLOCK, cb.sizes()[t] - b)});
      }
    }
    std::vector<double> partial(blocks.size() * NR);
    auto pass = [&](std::size_t lo, std::size_t hi) {
      for (std::size_t i = lo; i < hi; ++i) {
        const Block& k = blocks[i];
        float* st[MAX_STATES] = {};
        states_at<K>(k.tensor, k.begin, st);
        fn(*reinterpret_cast<const S*>(scalars_[which_[k.tensor]].bytes),
           cb.param(k.tensor) + k.begin, grads_[k.tensor] + k.begin, st, k.size, &partial[i * NR]);
      }
    };
    parallel_for(blocks.size(), REDUCE_BLOCK * KernelInfo<K>::weight, pass);
    std::vector<double> sums(cb.count() * NR, 0.0);
    for (std::size_t i = 0; i < blocks.size(); ++i) {  // block order: fixed
      for (std::size_t r = 0; r < NR; ++r) sums[blocks[i].tensor * NR + r] += partial[i * NR + r];
    }
    std::vector<ScalarsSlot> out(cb.count());
    for (std::size_t t = 0; t < cb.count(); ++t) {
      out[t] = scalars_[which_[t]];
      rule_.per_array(&sums[t * NR], out[t].bytes);
    }
    return out;
  }

  // A factored kernel (OPTKERN_FACTORED): its passes over tiles of every array, the tiles of the
  // whole group in one parallel region per pass, and the rule's host step (`between`) on each
  // array after each pass but the last; after pass 0 also its work per row and per column
  // (`between_range`), in parallel over ranges of rows and of columns. A matrix's tile grid and
  // ranges depend on its shape alone, each tile's sums are added per array in tile order, its
  // row and column partial sums per row and column in tile order, so the results do not depend
  // on the number of threads.
  template <KernelId K>
  void factored() const {
    using S = typename KernelInfo<K>::Scalars;
    constexpr int PASSES = Factored<K>::passes;
    const auto fn = FactoredSlot<K>::get(*table_);
    const Buffers& cb = *buffers_;
    const std::size_t count = cb.count();
    struct Array {
      std::size_t batch = 0, rows = 1, cols = 0, numel = 0;
      std::size_t row_at = 0, col_at = 0, mat_at = 0;  // into per_row, per_col, per_matrix
      std::size_t row_tiles = 1, col_tiles = 1;
      // Its row partials, [col_tiles][batch * rows], and column partials, [row_tiles][batch *
      // cols], in `parts`: each tile writes its own; the first slice ends up holding the sums.
      std::size_t rp_at = 0, cp_at = 0;
      bool factored = false;
      // One row tile: pass 0 finishes the columns itself (FactoredTile::col_scale_out), with no
      // column partials and no ranges of columns.
      bool whole_cols = false;
    };
    struct Tile {
      std::size_t tensor, matrix, row, rows, col, cols;  // rows x cols at (row, col) of a matrix
      std::size_t begin;                                 // its first element in the array
      std::size_t row_part, col_part;                    // where its partial sums go in `parts`
    };
    struct Range {
      std::size_t tensor, matrix, lo, hi;
      bool rows;
    };
    std::vector<Array> arrays(count);
    std::vector<Tile> tiles;
    std::vector<Range> ranges;
    std::size_t n_rows = 0, n_cols = 0, n_matrices = 0, n_parts = 0, total = 0, spans = 0;
    for (std::size_t t = 0; t < count; ++t) {
      Array& a = arrays[t];
      const int nd = cb.ndim(t);
      const Py_intptr_t* dims = cb.dims(t);
      a.numel = cb.sizes()[t];
      total += a.numel;
      a.factored = nd >= 2;
      if (!a.factored) {
        for (std::size_t e = 0; e < a.numel; e += FACTOR_TILE) {
          const std::size_t n = std::min(FACTOR_TILE, a.numel - e);
          tiles.push_back({t, 0, 0, 1, 0, n, e, 0, 0});
        }
        continue;
      }
      a.rows = static_cast<std::size_t>(dims[nd - 2]);
      a.cols = static_cast<std::size_t>(dims[nd - 1]);
      a.batch = 1;
      for (int d = 0; d < nd - 2; ++d) a.batch *= static_cast<std::size_t>(dims[d]);
      a.row_at = n_rows;
      a.col_at = n_cols;
      a.mat_at = n_matrices;
      n_rows += a.batch * a.rows;
      n_cols += a.batch * a.cols;
      n_matrices += a.batch;
      // Columns in tiles of about FACTOR_COLS when a row is longer than twice that; rows in
      // tiles of about FACTOR_TILE elements, at most FACTOR_TILES per column tile and at least
      // FACTOR_MIN_ROWS rows (the column partials: at most an eighth of the matrix's bytes).
      std::size_t width = a.cols;
      if (a.cols > 2 * FACTOR_COLS) {
        const std::size_t n = (a.cols + FACTOR_COLS - 1) / FACTOR_COLS;
        width = ((a.cols + n - 1) / n + 15) / 16 * 16;
        a.col_tiles = (a.cols + width - 1) / width;
      }
      std::size_t per = std::max(
          (FACTOR_TILE + std::max<std::size_t>(width, 1) - 1) / std::max<std::size_t>(width, 1),
          (a.rows + FACTOR_TILES - 1) / FACTOR_TILES);
      per = std::max<std::size_t>(1, std::max(per, std::min(a.rows, FACTOR_MIN_ROWS)));
      a.row_tiles = a.numel == 0 ? 1 : (a.rows + per - 1) / per;
      a.whole_cols = a.numel != 0 && a.row_tiles == 1;
      a.rp_at = n_parts;
      n_parts += a.col_tiles * a.batch * a.rows;
      a.cp_at = n_parts;
      if (!a.whole_cols) n_parts += a.row_tiles * a.batch * a.cols;
      for (std::size_t b = 0; b < a.batch; ++b) {
        for (std::size_t r = 0, rt = 0; a.numel != 0 && r < a.rows; r += per, ++rt) {
          for (std::size_t c = 0, ct = 0; c < a.cols; c += width, ++ct) {
            tiles.push_back({t, b, r, std::min(per, a.rows - r), c, std::min(width, a.cols - c),
                             (b * a.rows + r) * a.cols + c,
                             a.rp_at + (ct * a.batch + b) * a.rows + r,
                             a.cp_at + (rt * a.batch + b) * a.cols + c});
          }
        }
        for (std::size_t lo = 0; lo < a.rows; lo += HOST_RANGE) {
          ranges.push_back({t, b, lo, std::min(a.rows, lo + HOST_RANGE), true});
        }
        for (std::size_t lo = 0; !a.whole_cols && lo < a.cols; lo += HOST_RANGE) {
          ranges.push_back({t, b, lo, std::min(a.cols, lo + HOST_RANGE), false});
        }
        spans += a.rows + (a.whole_cols ? 0 : a.cols);
      }
    }
    // The partial sums and the per-row and per-column numbers, in buffers kept by the calling
    // thread from step to step (every element is written before it is read): fresh pages of a
    // few tens of MB would cost more than the pass that fills them.
    thread_local std::vector<double> parts_buffer;
    thread_local std::vector<float> scale_buffer;
    if (parts_buffer.size() < n_parts) parts_buffer.resize(n_parts);
    if (scale_buffer.size() < n_rows + n_cols) scale_buffer.resize(n_rows + n_cols);
    double* parts = parts_buffer.data();
    float* per_row = scale_buffer.data();
    float* per_col = per_row + n_rows;
    for (const Array& a : arrays) {  // an empty matrix: its rows or columns sum to 0
      if (a.factored && a.numel == 0) {
        std::fill(parts + a.rp_at, parts + a.cp_at + a.batch * a.cols, 0.0);
      }
    }
    constexpr std::size_t NS = 1;  // sums per tile and pass
    std::vector<double> sums(tiles.size() * NS), range_out(ranges.size()), per_matrix(n_matrices);
    std::vector<ScalarsSlot> scalars(count);
    std::vector<std::array<float*, MAX_STATES>> states(count);
    for (std::size_t t = 0; t < count; ++t) {
      scalars[t] = scalars_[which_[t]];
      states[t].fill(nullptr);
      for (std::size_t s = 0; s < KernelInfo<K>::states; ++s) {
        states[t][s] = state_[s].empty() ? nullptr : state_[s][t];
      }
    }
    auto array_view = [&](std::size_t t, const double* array_sums) {
      const Array& a = arrays[t];
      FactoredArray fa{};
      fa.sums = array_sums != nullptr ? array_sums + t * NS : nullptr;
      fa.row_sums = a.factored ? parts + a.rp_at : nullptr;
      fa.col_sums = a.factored ? parts + a.cp_at : nullptr;
      fa.state = states[t].data();
      fa.batch = a.batch;
      fa.rows = a.rows;
      fa.cols = a.cols;
      fa.numel = a.numel;
      fa.per_row = per_row + a.row_at;
      fa.per_col = per_col + a.col_at;
      fa.per_matrix = per_matrix.data() + a.mat_at;
      fa.factored = a.factored;
      return fa;
    };
    auto run_ranges = [&](int stage) {
      auto body = [&](std::size_t lo, std::size_t hi) {
        for (std::size_t i = lo; i < hi; ++i) {
          const Range& g = ranges[i];
          const Array& a = arrays[g.tensor];
          if (stage == 0) {  // this range's sums: its partials in tile order
            const std::size_t n = g.rows ? a.rows : a.cols,
                              slices = g.rows ? a.col_tiles : a.row_tiles;
            double* first = parts + (g.rows ? a.rp_at : a.cp_at) + g.matrix * n;
            for (std::size_t k = 1; k < slices; ++k) {
              const double* other = first + k * a.batch * n;
              for (std::size_t j = g.lo; j < g.hi; ++j) first[j] += other[j];
            }
          }
          range_out[i] = rule_.between_range(stage, array_view(g.tensor, nullptr), g.matrix, g.rows,
                                             g.lo, g.hi, scalars[g.tensor].bytes);
        }
      };
      const std::size_t w = ranges.empty() ? 1 : std::max<std::size_t>(1, spans / ranges.size());
      parallel_for(ranges.size(), w * WEIGHT_DIVIDES, body);
    };
    const std::size_t weight =
        tiles.empty() ? 1 : std::max<std::size_t>(1, total / tiles.size()) * KernelInfo<K>::weight;
    for (int pass = 0; pass < PASSES; ++pass) {
      auto body = [&](std::size_t lo, std::size_t hi) {
        for (std::size_t i = lo; i < hi; ++i) {
          const Tile& k = tiles[i];
          const Array& a = arrays[k.tensor];
          FactoredTile ft{};
          ft.param = cb.param(k.tensor) + k.begin;
          ft.grad = grads_[k.tensor] + k.begin;
          for (std::size_t s = 0; s < KernelInfo<K>::states; ++s) {
            float* base = state_[s].empty() ? nullptr : state_[s][k.tensor];
            if (base == nullptr) continue;
            switch (rule_.states[s].shape) {
              case StateShape::rows:
                ft.state[s] = base + k.matrix * a.rows + k.row;
                break;
              case StateShape::cols:
                ft.state[s] = base + k.matrix * a.cols + k.col;
                break;
              default:
                ft.state[s] = base + k.begin;
            }
          }
          ft.rows = k.rows;
          ft.cols = k.cols;
          ft.stride = a.factored ? a.cols : k.cols;
          ft.row_scale = a.factored ? per_row + a.row_at + k.matrix * a.rows + k.row : nullptr;
          ft.col_scale = a.factored ? per_col + a.col_at + k.matrix * a.cols + k.col : nullptr;
          ft.sums = &sums[i * NS];
          ft.row_sums = a.factored ? parts + k.row_part : nullptr;
          ft.col_sums = a.factored && !a.whole_cols ? parts + k.col_part : nullptr;
          ft.col_scale_out =
              a.whole_cols ? per_col + a.col_at + k.matrix * a.cols + k.col : nullptr;
          fn(*reinterpret_cast<const S*>(scalars[k.tensor].bytes), pass, ft);
        }
      };
      parallel_for(tiles.size(), weight, body);
      if (pass == PASSES - 1) break;
      if (pass == 0) run_ranges(0);
      // The host step of each array: its tile sums in tile order, and after pass 0 its matrices'
      // stage-0 results over their row ranges in range order.
      std::vector<double> array_sums(count * NS, 0.0);
      for (std::size_t i = 0; i < tiles.size(); ++i) {
        for (std::size_t r = 0; r < NS; ++r) {
          array_sums[tiles[i].tensor * NS + r] += sums[i * NS + r];
        }
      }
      if (pass == 0) {
        std::fill(per_matrix.begin(), per_matrix.end(), 0.0);
        for (std::size_t i = 0; i < ranges.size(); ++i) {
          const Range& g = ranges[i];
          if (g.rows) per_matrix[arrays[g.tensor].mat_at + g.matrix] += range_out[i];
        }
      }
      for (std::size_t t = 0; t < count; ++t) {
        rule_.between(pass, array_view(t, array_sums.data()), scalars[t].bytes);
      }
      if (pass == 0) run_ranges(1);
    }
  }

  const RuleDecl& rule_;
  const KernelTable* table_;
  std::unique_ptr<Buffers> buffers_;
  std::vector<float*> grads_;
  std::vector<float*> state_[MAX_STATES];
  std::vector<std::int64_t> steps_;
  std::vector<ScalarsSlot> scalars_;
  std::vector<std::size_t> which_;
  std::optional<py::list> record_;
  std::vector<py::list> carried_lists_;          // the caller's lists, written back by record()
  std::vector<std::vector<double>> carried_in_;  // [k][t]: the values before the step
  std::vector<double> carried_;                  // [t * nc + k]: the values after it
};

// Runs prepared updates: every kernel in one stretch without the GIL, then all the bookkeeping
// (state step counts, and counter[0] += 1 when a counter list is given) with no Python code in
// between, so a KeyboardInterrupt sees either none of the step or all of it.
void run_prepared(py::handle calls, py::handle counter) {
  std::vector<Prepared*> todo;
  const py::list items = snapshot(calls, "calls", "prepared updates");
  for (py::handle c : items) {
    auto* p = c.cast<Prepared*>();
    if (p->used) throw py::value_error("a prepared update runs once");
    todo.push_back(p);
  }
  if (!counter.is_none() &&
      !(PyList_CheckExact(counter.ptr()) && PyList_GET_SIZE(counter.ptr()) >= 1 &&
        PyLong_CheckExact(PyList_GET_ITEM(counter.ptr(), 0)))) {
    throw py::type_error("counter must be a list whose first item is an int");
  }
  for (Prepared* p : todo) p->used = true;
  {
    py::gil_scoped_release nogil;
    for (Prepared* p : todo) p->run_kernels();
  }
  for (Prepared* p : todo) p->record();
  if (!counter.is_none()) {
    PyObject* old = PyList_GET_ITEM(counter.ptr(), 0);
    PyObject* next = PyNumber_Add(old, py::int_(1).ptr());
    if (next == nullptr) throw py::error_already_set();
    PyList_SetItem(counter.ptr(), 0, next);  // steals next
  }
}

py::dict validate(py::handle rule, py::handle hyper, py::handle labels) {
  const RuleDecl& r = rule_named(rule);
  const std::vector<double> h = parse_hyper(r, hyper, labels);
  py::dict out;
  for (std::size_t i = 0; i <= r.n_hyper; ++i) {
    const HyperDecl& d = hyper_decl(r, i);
    if (d.range == Range::flag) {
      out[d.name] = py::bool_(h[i] != 0.0);
    } else {
      out[d.name] = py::float_(h[i]);
    }
  }
  return out;
}

const char* range_name(Range r) {
  switch (r) {
    case Range::nonnegative:
      return "nonnegative";
    case Range::unit:
      return "unit";
    case Range::unit_open:
      return "unit_open";
    case Range::open_unit:
      return "open_unit";
    case Range::above_one:
      return "above_one";
    case Range::one_or_more:
      return "one_or_more";
    case Range::nonpositive:
      return "nonpositive";
    case Range::flag:
      return "flag";
  }
  return "";
}

py::list rule_table() {
  py::list out;
  for (const RuleDecl& r : rules::kRules) {
    py::dict d;
    d["name"] = r.name;
    d["cls"] = r.cls;
    d["doc"] = r.doc;
    d["counts_steps"] = r.steps != Steps::first_only;
    d["uses_step"] = r.steps == Steps::used;
    std::size_t weight = 1, kernel_states = 0;
    const char* kernel = "";
#define OPTKERN_META(kname, S, ns, w) \
  if (r.kernel == KernelId::kname) {  \
    weight = w;                       \
    kernel_states = ns;               \
    kernel = #kname;                  \
  }
    OPTKERN_KERNELS(OPTKERN_META)
#undef OPTKERN_META
    (void)kernel_states;
    d["kernel"] = kernel;
    d["weight"] = weight;
    std::size_t reduction = 0;  // double sums per block of the kernel's reduction pass, if any
#define OPTKERN_REDUCTION_META(kname, n) \
  if (r.kernel == KernelId::kname) reduction = n;
    OPTKERN_REDUCTIONS(OPTKERN_REDUCTION_META)
#undef OPTKERN_REDUCTION_META
    d["reduction"] = reduction;
    int passes = 0;  // passes of a factored kernel (OPTKERN_FACTORED), 0 for the others
#define OPTKERN_FACTORED_META(kname, n) \
  if (r.kernel == KernelId::kname) passes = n;
    OPTKERN_FACTORED(OPTKERN_FACTORED_META)
#undef OPTKERN_FACTORED_META
    d["factored"] = passes;
    py::list hyper;
    for (std::size_t i = 0; i <= r.n_hyper; ++i) {
      const HyperDecl& h = hyper_decl(r, i);
      py::dict e;
      e["name"] = h.name;
      e["range"] = range_name(h.range);
      e["if_none"] = h.none.allowed ? py::object(py::float_(h.none.value)) : py::object(py::none());
      if (h.none.none_default) {
        e["default"] = py::none();
      } else if (h.range == Range::flag) {
        e["default"] = py::bool_(h.default_value != 0.0);
      } else {
        e["default"] = h.default_value;
      }
      e["torch"] = h.torch;
      e["slot"] = h.slot;
      hyper.append(e);
    }
    d["hyper"] = hyper;
    py::list states;
    for (std::size_t k = 0; k < r.n_states; ++k) {
      const StateDecl& s = r.states[k];
      py::dict e;
      e["name"] = s.name;
      e["arg"] = s.arg;
      e["when"] = s.when ? py::object(py::str(s.when)) : py::object(py::none());
      e["init"] = s.init ? py::object(py::str(s.init)) : py::object(py::none());
      e["shape"] = state_shape_name(s.shape);
      states.append(e);
    }
    d["states"] = states;
    py::list carried;
    for (std::size_t k = 0; k < r.n_carried; ++k) {
      const CarriedDecl& c = r.carried[k];
      py::dict e;
      e["name"] = c.name;
      e["arg"] = c.arg;
      e["init"] = c.init;
      e["init_from"] = c.init_from ? py::object(py::str(c.init_from)) : py::object(py::none());
      carried.append(e);
    }
    d["carried"] = carried;
    out.append(d);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Gradient norms and clipping

// Elements per block of a norm. Blocks are reduced independently (in parallel) and then added up
// in a fixed order, so a norm does not depend on the number of threads.
constexpr std::size_t NORM_BLOCK = 4096;

double nan_max(double a, double b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

// Per-array norms and the total norm of all arrays together (torch.linalg.vector_norm of their
// concatenation), from one read pass over the data.
std::pair<std::vector<double>, double> compute_norms(const Buffers& cb, double p) {
  if (!(p > 0.0)) throw py::value_error("norm_type must be > 0 or inf, got " + std::to_string(p));
  struct Block {
    std::size_t tensor, begin, size;
  };
  std::vector<Block> blocks;
  for (std::size_t t = 0; t < cb.count(); ++t) {
    for (std::size_t b = 0; b < cb.sizes()[t]; b += NORM_BLOCK) {
      blocks.push_back({t, b, std::min(NORM_BLOCK, cb.sizes()[t] - b)});
    }
  }
  std::vector<double> partial(blocks.size());
  const KernelTable& k = kernels();
  const float* const* data = cb.first().data();
  auto reduce = [&](std::size_t lo, std::size_t hi) {
    for (std::size_t i = lo; i < hi; ++i) {
      partial[i] = k.norm_block(data[blocks[i].tensor] + blocks[i].begin, blocks[i].size, p);
    }
  };
  {
    py::gil_scoped_release nogil;
    parallel_for(blocks.size(), NORM_BLOCK, reduce);
  }
  const bool is_max = std::isinf(p);
  std::vector<double> per_tensor(cb.count(), 0.0);
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    double& acc = per_tensor[blocks[i].tensor];
    acc = is_max ? nan_max(acc, partial[i]) : acc + partial[i];
  }
  double total = 0.0;
  for (double v : per_tensor) total = is_max ? nan_max(total, v) : total + v;
  auto root = [&](double acc) {
    if (is_max || p == 1.0) return acc;
    return p == 2.0 ? std::sqrt(acc) : std::pow(acc, 1.0 / p);
  };
  for (double& v : per_tensor) v = root(v);
  return {per_tensor, root(total)};
}

py::tuple grad_norms(py::handle grads, double norm_type, py::handle positions) {
  Buffers cb(grads, "grads", Access::read, positions_of(positions));
  auto [per_tensor, total] = compute_norms(cb, norm_type);
  return py::make_tuple(py::array_t<double>(per_tensor.size(), per_tensor.data()), total);
}

void scale_grads(py::handle grads, double factor) {
  Buffers cb(grads, "grads", Access::write, {});
  cb.check_disjoint();  // two views of one buffer would be scaled twice
  const auto c = static_cast<float>(factor);
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING,
      [&](std::size_t t, std::size_t b, std::size_t e) { k.scale(cb.param(t) + b, e - b, c); });
}

void clamp_grads(py::handle grads, double lo, double hi) {
  Buffers cb(grads, "grads", Access::write, {});
  cb.check_disjoint();
  const auto l = static_cast<float>(lo), h = static_cast<float>(hi);
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING,
      [&](std::size_t t, std::size_t b, std::size_t e) { k.clamp(cb.param(t) + b, e - b, l, h); });
}

// a += s * b over lists of arrays, threaded like the optimizer kernels: the benchmark's yardstick.
void stream_axpy(py::handle a, py::handle b, double s) {
  Buffers cb(a, "a", Access::write, {});
  const auto bs = cb.add(b, "b", Access::read);
  cb.check_disjoint();
  const auto f = static_cast<float>(s);
  const KernelTable& k = kernels();
  run(cb, WEIGHT_STREAMING, [&](std::size_t t, std::size_t lo, std::size_t hi) {
    k.axpy(cb.param(t) + lo, bs[t] + lo, f, hi - lo);
  });
}

void check_params(py::handle params) {
  Buffers cb(params, "params", Access::write, {});
  cb.check_disjoint();
}

void check_grads(py::handle params, py::handle grads, py::handle positions) {
  Buffers cb(params, "params", Access::write, positions_of(positions));
  cb.add(grads, "grads", Access::read);
  cb.check_disjoint();
}

// set_num_threads(n): an int (or NumPy integer), not a bool, from 1 to pool::MAX_THREADS.
void set_num_threads_checked(py::handle n) {
  if (PyBool_Check(n.ptr()) || !PyIndex_Check(n.ptr())) {
    throw py::type_error("set_num_threads: n must be an int, got " + type_name(n));
  }
  auto number = py::reinterpret_steal<py::object>(PyNumber_Index(n.ptr()));
  if (!number) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(number.ptr(), &overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow < 0 || (overflow == 0 && v < 1)) {
    throw py::value_error("set_num_threads: n must be >= 1, got " +
                          py::str(number).cast<std::string>());
  }
  if (overflow > 0 || v > pool::MAX_THREADS) {
    throw py::value_error("set_num_threads: n must be <= " + std::to_string(pool::MAX_THREADS) +
                          ", got " + py::str(number).cast<std::string>());
  }
  set_num_threads(static_cast<int>(v));
}

py::dict build_info() {
  py::dict info;
  info["version"] = OPTKERN_VERSION;
  info["compiler"] = OPTKERN_COMPILER;
  info["openmp"] = have_openmp();  // kept for compatibility: always False now
  info["threads"] = threading();
  info["max_threads"] = pool::MAX_THREADS;
  py::dict flags;
  for (const auto& [isa, f] : isa_build_flags()) flags[py::str(isa)] = f;
  info["isa_flags"] = flags;
  info["min_elements_per_thread"] = min_elements_per_thread();
  return info;
}

}  // namespace
}  // namespace optkern

PYBIND11_MODULE(_core, m) {
  using namespace optkern;
  namespace py = pybind11;
  m.doc() =
      "optkern's C++ core: fused optimizer kernels behind runtime ISA dispatch (private; "
      "use optkern and optkern.functional)";
  init_dispatch();
  m.attr("__version__") = OPTKERN_VERSION;
  register_algos(m);

  m.def("active_isa", &active_isa,
        "The instruction set the kernels run with: scalar, avx2 or avx512.");
  m.def("available_isas", &available_isas,
        "The instruction sets this build holds and this CPU supports, from the baseline up.");
  m.def("get_num_threads", &num_threads, "Threads a large update uses.");
  m.def("set_num_threads", &set_num_threads_checked, py::arg("n"),
        "Sets the threads a large update uses: an int from 1 to build_info()['max_threads'].");
  m.def("build_info", &build_info, "Version, compiler, threading and the flags of each ISA build.");
  m.def("_set_min_elements_per_thread", &set_min_elements_per_thread, py::arg("n"),
        "Testing hook: the smallest share of elements worth a thread of its own.");
  m.def("_min_elements_per_thread", &min_elements_per_thread);
  m.def("_set_chunk_elements", &set_chunk_elements, py::arg("n"),
        "Testing hook: elements per chunk of a multi-threaded call (0: chosen by size).");
  m.def("_fail_thread_creation_after", &pool::fail_thread_creation_after, py::arg("k"),
        "Testing hook: creating a helper thread fails after k more (k < 0: never).");
  m.def("_pool_helpers", &pool::helpers, "Testing hook: helper threads this process started.");
  m.def("_set_spin_us", &pool::set_spin_us, py::arg("us"),
        "Benchmark hook: how long an idle helper looks for work before it sleeps.");
  m.def("_spin_us", &pool::spin_us);
  m.def("_set_parallel_backend", &pool::set_backend, py::arg("name"), py::arg("library") = "",
        "Where large updates run their chunks: 'pool' (optkern's threads) or 'gomp' (the calling "
        "thread's OpenMP team of an already loaded libgomp, e.g. torch's). Returns the backend in "
        "effect ('pool' when the library is not loaded or lacks GOMP_parallel).");
  m.def(
      "_parallel_backend", [] { return py::make_tuple(pool::backend(), pool::backend_library()); },
      "The parallel backend in effect and its library ('' for the pool).");
  m.def("_set_adaptive_threads", &pool::set_adaptive, py::arg("on"),
        "Benchmark hook: after calls whose helpers ran no chunk, run the next calls on the "
        "calling thread alone for a while (on by default). Setting it resets that state.");
  m.def("_adaptive_threads", &pool::adaptive);
  m.def("_pause_helpers", &pool::pause_helpers, py::arg("paused"),
        "Testing hook: helpers wake but take no chunk, as if every one were late.");
  m.def(
      "_pool_stats",
      [] {
        const pool::Stats s = pool::stats();
        py::dict d;
        d["calls"] = s.calls;
        d["helper_chunks"] = s.helper_chunks;
        d["late_calls"] = s.late_calls;
        d["serial_calls"] = s.serial_calls;
        d["gomp_calls"] = s.gomp_calls;
        d["gomp_slow_calls"] = s.gomp_slow_calls;
        d["gomp_pool_calls"] = s.gomp_pool_calls;
        return d;
      },
      "Counters: multi-threaded calls, chunks run by helpers, calls whose helpers ran none, "
      "calls run alone because helpers had been late.");
  m.def("_parse_thread_count",
        [](const std::string& s) { return pool::parse_thread_count(s.c_str()); });
  m.def("_cpus_from_cpu_max", &pool::cpus_from_cpu_max);
  m.def("_cpus_from_cfs", &pool::cpus_from_cfs);
  m.def("_affinity_cpus", &pool::affinity_cpus);
  m.def("_quota_cpus", &pool::quota_cpus);

  m.def("check_params", &check_params, py::arg("params"),
        "Validates params as distinct, writeable, C-contiguous float32 arrays.");
  m.def("check_grads", &check_grads, py::arg("params"), py::arg("grads"), py::kw_only(),
        py::arg("positions") = py::none(),
        "Validates grads against params without running anything.");

  m.def("grad_norms", &grad_norms, py::arg("grads"), py::arg("norm_type"), py::kw_only(),
        py::arg("positions") = py::none(),
        "(per-array norms as a float64 array, total norm) of a list of float32 arrays.");
  m.def("scale_", &scale_grads, py::arg("grads"), py::arg("factor"),
        "Multiplies every array by factor (rounded to float32) in place.");
  m.def("clamp_", &clamp_grads, py::arg("grads"), py::arg("lo"), py::arg("hi"),
        "Clamps every array to [lo, hi] in place; NaN stays NaN.");
  m.def("stream_axpy", &stream_axpy, py::arg("a"), py::arg("b"), py::arg("s"),
        "a[i] += s * b[i] over lists of float32 arrays (the benchmark's bandwidth yardstick).");
  m.def(
      "state_shape",
      [](const std::string& kind, const std::vector<Py_intptr_t>& shape) -> py::object {
        StateShape k;
        if (kind == "like_param") {
          k = StateShape::like_param;
        } else if (kind == "rows") {
          k = StateShape::rows;
        } else if (kind == "cols") {
          k = StateShape::cols;
        } else if (kind == "unfactored") {
          k = StateShape::unfactored;
        } else {
          throw py::value_error("unknown state shape kind '" + kind + "'");
        }
        const int nd = static_cast<int>(shape.size());
        if (!state_applies(k, nd)) return py::none();
        std::vector<Py_intptr_t> out(shape.size());
        state_dims(k, shape.data(), nd, out.data());
        return py::tuple(py::cast(out));
      },
      py::arg("kind"), py::arg("shape"),
      "The shape of a state of this kind (a StateDecl's shape: like_param, rows, cols, "
      "unfactored) for a parameter of this shape, or None where the kind does not apply: the "
      "one rule the core's array checks, the state dicts and the checkpoints share.");
  m.def("rules", &rule_table,
        "Every update rule's declaration: name, class, formulas, hyperparameters (name, range, "
        "default, torch name and tuple slot), state buffers (name, functional argument, the "
        "option that enables it, the option it starts at), kernel and whether it counts steps.");
  m.def("validate", &validate, py::arg("rule"), py::arg("hyper"), py::kw_only(),
        py::arg("labels") = py::none(),
        "Checks a dict of hyperparameters against the rule's declared ranges; returns them all "
        "(defaults filled in) as floats and bools.");
  py::class_<Prepared>(m, "Prepared",
                       "One validated update of one group, not yet run (see prepare and run).");
  auto prepare = [](py::handle rule, py::handle params, py::handle grads, py::handle states,
                    py::handle hyper, py::handle steps, double grad_scale, py::handle positions,
                    py::handle isa, py::handle record) {
    return new Prepared(rule_named(rule), params, grads, states, hyper, steps, grad_scale,
                        positions, isa, record);
  };
  m.def("prepare", prepare, py::arg("rule"), py::arg("params"), py::arg("grads"), py::arg("states"),
        py::arg("hyper"), py::kw_only(), py::arg("steps") = py::none(), py::arg("grad_scale") = 1.0,
        py::arg("positions") = py::none(), py::arg("isa") = py::none(),
        py::arg("record") = py::none(), py::return_value_policy::take_ownership,
        "Validates one group's update (arrays, hyperparameters, step counts, per-step scalars) "
        "without writing anything.");
  m.def("run", &run_prepared, py::arg("calls"), py::kw_only(), py::arg("counter") = py::none(),
        "Runs prepared updates, then records their step counts (and counter[0] += 1) with no "
        "Python code in between.");
  m.def(
      "step",
      [prepare](py::handle rule, py::handle params, py::handle grads, py::handle states,
                py::handle hyper, py::handle steps, double grad_scale, py::handle positions,
                py::handle isa) {
        std::unique_ptr<Prepared> p(prepare(rule, params, grads, states, hyper, steps, grad_scale,
                                            positions, isa, py::none()));
        p->used = true;
        {
          py::gil_scoped_release nogil;
          p->run_kernels();
        }
        p->record();  // the carried numbers, if the rule has any
      },
      py::arg("rule"), py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("hyper"),
      py::kw_only(), py::arg("steps") = py::none(), py::arg("grad_scale") = 1.0,
      py::arg("positions") = py::none(), py::arg("isa") = py::none(),
      "One fused update of a group by the named rule: every array validated, the GIL released, "
      "one multi-tensor kernel call. isa names a compiled kernel build to use instead of the "
      "active one (tests compare every ISA in one process).");
}
