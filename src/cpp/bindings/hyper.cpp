#include "bindings/hyper.hpp"

#include "update.hpp"

#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <string_view>

namespace optkern {
namespace {

constexpr double FLOAT32_MAX = 3.4028234663852886e38;

// Every rule's last hyperparameter: maximize negates the gradient (folded into grad_scale).
constexpr HyperDecl kMaximize = {"maximize", Range::flag, 0.0, "maximize", -1};

// The name a message gives hyperparameter `name` (labels: {name: label}, e.g. a schedule's lr).
std::string hyper_label(const char* name, py::handle labels) {
  if (!labels.is_none()) {
    PyObject* l = PyDict_GetItemString(labels.ptr(), name);
    if (l != nullptr && PyUnicode_Check(l)) return py::reinterpret_borrow<py::str>(l);
  }
  return name;
}

}  // namespace

double hyper_value(const HyperDecl& d, py::handle v, py::handle labels) {
  PyObject* o = v.ptr();
  if (d.range == Range::flag) {
    if (!PyBool_Check(o)) {
      throw py::type_error(hyper_label(d.name, labels) + " must be a bool, got " + type_name(v) +
                           ": " + std::string(py::repr(v)));
    }
    return o == Py_True ? 1.0 : 0.0;
  }
  if (o == Py_None && d.none.allowed) return NONE_VALUE;  // None stands for a value
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
  // The message's tail, made only for a message (repr formats the number: slow, every step).
  auto got = [&] { return ", got " + std::string(py::repr(v)); };
  if (!std::isfinite(x) || std::fabs(x) > FLOAT32_MAX) {
    throw py::value_error(hyper_label(d.name, labels) +
                          " must be finite (at most 3.403e+38 in magnitude, as float32 holds it)" +
                          got());
  }
  switch (d.range) {
    case Range::nonnegative:
      if (x < 0) throw py::value_error(hyper_label(d.name, labels) + " must be >= 0" + got());
      break;
    case Range::unit:
      if (x < 0 || x > 1) {
        throw py::value_error(hyper_label(d.name, labels) + " must be in [0, 1]" + got());
      }
      break;
    case Range::unit_open:
      if (x < 0 || x >= 1) {
        throw py::value_error(hyper_label(d.name, labels) + " must be in [0, 1)" + got());
      }
      break;
    case Range::open_unit:
      if (x <= 0 || x >= 1) {
        throw py::value_error(hyper_label(d.name, labels) + " must be in (0, 1)" + got());
      }
      break;
    case Range::above_one:
      if (x <= 1) throw py::value_error(hyper_label(d.name, labels) + " must be > 1" + got());
      break;
    case Range::one_or_more:
      if (x < 1) throw py::value_error(hyper_label(d.name, labels) + " must be >= 1" + got());
      break;
    case Range::nonpositive:
      if (x > 0) throw py::value_error(hyper_label(d.name, labels) + " must be <= 0" + got());
      break;
    case Range::flag:
      break;
  }
  return x;
}

const Rule& rule_named(py::handle name) {
  // Called on every functional step: looked up by its UTF-8 text (which the str keeps), the
  // rule found last tried first (the GIL is held, so the cache needs no lock).
  static const Rule* last = nullptr;
  if (PyUnicode_Check(name.ptr())) {
    Py_ssize_t size = 0;
    const char* text = PyUnicode_AsUTF8AndSize(name.ptr(), &size);
    if (text == nullptr) throw py::error_already_set();
    const std::string_view n(text, static_cast<std::size_t>(size));
    if (last != nullptr && n == last->name) return *last;
    if (const Rule* r = find_rule(n)) return *(last = r);
  }
  const std::string n = py::cast<std::string>(name);
  if (const Rule* r = find_rule(n)) return *r;
  std::string known;
  for (const Rule& r : all_rules()) known += std::string(known.empty() ? "" : ", ") + r.name;
  throw py::value_error("unknown update rule '" + n + "' (known: " + known + ")");
}

const HyperDecl& hyper_decl(const Rule& r, std::size_t i) {
  return i < r.hyper.size() ? r.hyper[i] : kMaximize;
}

std::vector<double> parse_hyper(const Rule& r, py::handle hyper, py::handle labels) {
  if (!PyDict_Check(hyper.ptr())) {
    throw py::type_error("hyper must be a dict of hyperparameters, got " + type_name(hyper));
  }
  const std::size_t n = r.hyper.size() + 1;
  std::vector<double> values(n);
  std::vector<char> seen(n, 0);
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  std::size_t next = 0;  // keys usually come in declaration order: try the next one first
  while (PyDict_Next(hyper.ptr(), &pos, &key, &value)) {
    std::size_t i = n;
    for (std::size_t j = 0; j < n && PyUnicode_Check(key); ++j) {
      const std::size_t k = (next + j) % n;
      if (PyUnicode_CompareWithASCIIString(key, hyper_decl(r, k).name) == 0) {
        i = k;
        break;
      }
    }
    next = i + 1;
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
      values[i] = d.none.none_default ? NONE_VALUE : d.default_value;
    }
  }
  if (r.check != nullptr) {
    try {
      r.check(Hyper(r.hyper.data(), r.hyper.size(), values.data()));
    } catch (const HyperError& e) {
      throw py::value_error(e.what());
    }
  }
  return values;
}

bool state_needed(const Rule& r, const StateDecl& s, const std::vector<double>& h) {
  return s.when == nullptr || Hyper(r.hyper.data(), r.hyper.size(), h.data())[s.when] != 0.0;
}

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

namespace {

py::dict validate(py::handle rule, py::handle hyper, py::handle labels) {
  const Rule& r = rule_named(rule);
  const std::vector<double> h = parse_hyper(r, hyper, labels);
  py::dict out;
  for (std::size_t i = 0; i <= r.hyper.size(); ++i) {
    const HyperDecl& d = hyper_decl(r, i);
    if (d.range == Range::flag) {
      out[d.name] = py::bool_(h[i] != 0.0);
    } else if (std::isnan(h[i])) {
      out[d.name] = py::none();  // None stands for a value the rule picks per compute type
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
  for (const Rule& r : all_rules()) {
    py::dict d;
    d["name"] = r.name;
    d["cls"] = r.cls;
    d["doc"] = r.doc;
    d["counts_steps"] = r.steps != Steps::first_only;
    d["uses_step"] = r.steps == Steps::used;
    static const char* const kernel_names[] = {
#define OPTKERN_RULE(name) #name,
#include "rules/list.inc"
#undef OPTKERN_RULE
    };
    d["kernel"] = kernel_names[static_cast<int>(r.kernel)];
    d["weight"] = r.info.weight;
    d["example_lr"] =
        r.example_lr > 0 ? py::object(py::float_(r.example_lr)) : py::object(py::none());
    d["peer"] = r.peer ? py::object(py::str(r.peer)) : py::object(py::none());
    d["reduction"] = r.info.reduce_sums;  // double sums per block of its reduction pass, if any
    d["factored"] = r.info.passes;        // passes of a factored kernel, 0 for the others
    py::list hyper;
    for (std::size_t i = 0; i <= r.hyper.size(); ++i) {
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
      e["optkern_only"] = h.optkern_only;
      hyper.append(e);
    }
    d["hyper"] = hyper;
    py::list states;
    for (std::size_t k = 0; k < r.states.size(); ++k) {
      const StateDecl& s = r.states[k];
      py::dict e;
      e["name"] = s.name;
      e["arg"] = s.arg;
      e["when"] = s.when ? py::object(py::str(s.when)) : py::object(py::none());
      e["init"] = s.init ? py::object(py::str(s.init)) : py::object(py::none());
      e["shape"] = state_shape_name(s.shape);
      // As 8-bit state: the unsigned map (never negative), or refused (q8_refusal).
      e["nonnegative"] = py::bool_((r.info.nonnegative_states >> k) & 1u);
      e["int8"] = py::bool_(q8_refusal(r.info, k) == nullptr);
      states.append(e);
    }
    d["states"] = states;
    py::list carried;
    for (const CarriedDecl& c : r.carried) {
      py::dict e;
      e["name"] = c.name;
      e["arg"] = c.arg;
      e["init"] = c.init;
      e["init_from"] = c.init_from ? py::object(py::str(c.init_from)) : py::object(py::none());
      carried.append(e);
    }
    d["carried"] = carried;
    py::dict rows;  // row-sparse gradients (RowsDecl)
    rows["accepted"] = r.rows.accepted;
    rows["dense_when"] = r.rows.dense_when ? py::object(py::str(r.rows.dense_when)) : py::none();
    rows["refused_when"] =
        r.rows.refused_when ? py::object(py::str(r.rows.refused_when)) : py::none();
    d["rows"] = rows;
    out.append(d);
  }
  return out;
}

py::object state_shape(const std::string& kind, const std::vector<Py_intptr_t>& shape) {
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
}

}  // namespace

void define_rules(py::module_& m) {
  m.def("state_shape", &state_shape, py::arg("kind"), py::arg("shape"),
        "The shape of a state of this kind (a StateDecl's shape: like_param, rows, cols, "
        "unfactored) for a parameter of this shape, or None where the kind does not apply: the "
        "one rule the core's array checks, the state dicts and the checkpoints share.");
  m.def("rules", &rule_table,
        "Every update rule's declaration: name, class, formulas, hyperparameters (name, range, "
        "default, torch name and tuple slot, whether torch lacks it), state buffers (name, "
        "functional argument, the "
        "option that enables it, the option it starts at), kernel and whether it counts steps.");
  m.def("validate", &validate, py::arg("rule"), py::arg("hyper"), py::kw_only(),
        py::arg("labels") = py::none(),
        "Checks a dict of hyperparameters against the rule's declared ranges; returns them all "
        "(defaults filled in) as floats and bools.");
}

}  // namespace optkern
