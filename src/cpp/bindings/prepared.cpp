#include "bindings/prepared.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <unordered_map>

#include "bindings/hyper.hpp"
#include "dispatch.hpp"
#include "multi_tensor.hpp"

namespace optkern {
namespace {

// The key of a tensor's stochastic rounding noise: the step's seed and the tensor's position,
// mixed (splitmix64's finalizer) so that neighbouring seeds and positions share no pattern.
std::uint32_t noise_key(std::uint64_t seed, std::size_t position) {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(position);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<std::uint32_t>(z ^ (z >> 32));
}

// Whether `rule` takes a row-sparse gradient (RowsDecl) with these hyperparameters, and then
// whether every row is updated (true) or only the listed ones. TypeError or ValueError naming
// `label` (the first row-sparse gradient) otherwise.
bool rows_mode(const Rule& rule, const std::vector<double>& h, const std::string& label) {
  const Hyper hyp(rule.hyper.data(), rule.hyper.size(), h.data());
  if (!rule.rows.accepted) {
    std::string takers;
    for (const Rule& r : all_rules()) {
      if (r.rows.accepted) takers += std::string(takers.empty() ? "" : ", ") + r.cls;
    }
    throw py::type_error(label + " is a row-sparse gradient (RowSparse), but " + rule.cls +
                         " takes dense gradients only (as torch's " + rule.cls +
                         " refuses sparse ones); RowSparse gradients are taken by " + takers);
  }
  if (rule.rows.refused_when != nullptr && hyp[rule.rows.refused_when] != 0.0) {
    throw py::value_error(label + " is a row-sparse gradient (RowSparse), which " + rule.cls +
                          " refuses when " + rule.rows.refused_when +
                          " != 0 (as torch refuses sparse gradients then)");
  }
  return rule.rows.dense_when != nullptr && hyp[rule.rows.dense_when] != 0.0;
}

// A row-sparse gradient updates float32 and float64 parameters written to nearest, with state of
// their type: its rows start anywhere (int8 state's blocks do not), and the staged forms
// (16-bit parameters, bfloat16 state, master copies, stochastic rounding) are not run on rows.
// TypeError naming `label` otherwise.
void check_row_types(const Rule& rule, const Types& t, const std::string& label) {
  const bool plain = (t.param == DType::f32 || t.param == DType::f64) && t.state == t.param &&
                     t.write == ParamWrite::nearest;
  if (plain) return;
  throw py::type_error(
      label + " is a row-sparse gradient (RowSparse), which " + rule.cls +
      " takes only for float32 or float64 parameters with state of the parameter's type, "
      "without master weights or stochastic rounding; here: a " +
      dtype_name(t.param) + " parameter with " + dtype_name(t.state) + " state" +
      (t.write == ParamWrite::master       ? " and master weights"
       : t.write == ParamWrite::stochastic ? " rounded stochastically"
                                           : ""));
}

}  // namespace

PyObject* key_of(const char* name) {
  static std::unordered_map<const char*, PyObject*> keys;  // the GIL guards it
  auto [it, fresh] = keys.try_emplace(name, nullptr);
  if (fresh) {
    it->second = PyUnicode_InternFromString(name);
    if (it->second == nullptr) {
      keys.erase(it);
      throw py::error_already_set();
    }
  }
  return it->second;
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

Prepared::Prepared(const Rule& rule, py::handle params, py::handle grads, py::handle states,
                   py::handle hyper, py::handle steps, double grad_scale, py::handle positions,
                   py::handle isa, py::handle record, py::handle noise_seed)
    : rule_(rule) {
  const KernelTable& table = table_for(isa);
  // Everything that can run Python code comes first: the hyperparameters, the step counts,
  // the positions and the state lists (all copied); then the arrays, which run none.
  h_ = parse_hyper(rule, hyper, py::none());
  const std::vector<double>& h = h_;
  // grad_scale is data, like a gradient: a clipping coefficient from a NaN norm is NaN and
  // makes the update NaN, as in torch. optkern.functional refuses a non-finite one from users.
  if (h[rule.hyper.size()] != 0.0) grad_scale = -grad_scale;  // maximize
  grad_scale_ = grad_scale;
  if (!PyDict_Check(states.ptr())) {
    throw py::type_error("states must be a dict {state name: list of arrays}, got " +
                         type_name(states));
  }
  std::vector<py::object> lists(rule.states.size());
  for (std::size_t k = 0; k < rule.states.size(); ++k) {
    const StateDecl& s = rule.states[k];
    PyObject* l = PyDict_GetItem(states.ptr(), key_of(s.name));
    if (state_needed(rule, s, h)) {
      if (l == nullptr || (l == Py_None && s.when != nullptr)) {
        std::string why;
        if (s.when != nullptr) {
          const bool flag =
              Hyper(rule.hyper.data(), rule.hyper.size(), h.data())[s.when] != 0.0 &&
              std::any_of(rule.hyper.begin(), rule.hyper.end(), [&](const HyperDecl& d) {
                return std::string(d.name) == s.when && d.range == Range::flag;
              });
          why = std::string(" when ") + s.when + (flag ? "=True" : " != 0");
        }
        throw py::value_error(std::string(s.arg) + " is required" + why);
      }
      lists[k] = py::reinterpret_borrow<py::object>(l);
    }
  }
  // Whether the dict holds an absmax list or the master copies (looked up below only then: most
  // steps have neither).
  bool any_absmax = false, any_master = false;
  {
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    const std::size_t suffix = std::strlen(ABSMAX_SUFFIX);
    while (PyDict_Next(states.ptr(), &pos, &key, &value)) {
      const char* k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : nullptr;
      if (k == nullptr) PyErr_Clear();
      const auto is_state = [&](const StateDecl& s) { return std::strcmp(k, s.name) == 0; };
      const auto is_absmax = [&](const StateDecl& s) {  // "<name>_absmax", without allocating
        const std::size_t n = std::strlen(s.name);
        return std::strncmp(k, s.name, n) == 0 && std::strncmp(k + n, ABSMAX_SUFFIX, suffix) == 0 &&
               k[n + suffix] == '\0';
      };
      bool known = false;
      if (k != nullptr) {
        if (std::any_of(rule.states.begin(), rule.states.end(), is_state) ||
            std::any_of(rule.carried.begin(), rule.carried.end(),
                        [&](const CarriedDecl& c) { return std::strcmp(k, c.name) == 0; })) {
          known = true;
        } else if (std::any_of(rule.states.begin(), rule.states.end(), is_absmax)) {
          known = any_absmax = true;
        } else if (std::strcmp(k, MASTER_STATE) == 0) {
          known = any_master = true;
        }
      }
      if (!known) {
        throw py::value_error(std::string(rule.cls) + " keeps no state " +
                              std::string(py::repr(key)));
      }
    }
  }
  // The carried numbers (CarriedDecl): a list of floats per name, read now (converting them
  // may run Python code) and written back, with the state dicts, after the kernels.
  for (const CarriedDecl& c : rule.carried) {
    PyObject* l = PyDict_GetItem(states.ptr(), key_of(c.name));
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
  // Stochastic rounding: the seed of this step's noise (the optimizer classes pass the step).
  std::optional<std::uint64_t> seed;
  if (!noise_seed.is_none()) {
    if (PyBool_Check(noise_seed.ptr()) || !PyLong_Check(noise_seed.ptr())) {
      throw py::type_error("noise_seed must be None or an int, got " + type_name(noise_seed));
    }
    // Any int: its low 64 bits (two's complement) key the noise.
    seed = PyLong_AsUnsignedLongLongMask(noise_seed.ptr());
    if (PyErr_Occurred()) throw py::error_already_set();
  }
  // The lists beside the states: each q8 state's absmax, the master copies (read now: a dict
  // lookup runs no Python code, but keep every Python-facing step before the arrays).
  std::vector<py::object> absmax_lists(rule.states.size());
  for (std::size_t k = 0; any_absmax && k < rule.states.size(); ++k) {
    PyObject* l = PyDict_GetItemString(states.ptr(),
                                       (std::string(rule.states[k].name) + ABSMAX_SUFFIX).c_str());
    if (l != nullptr && lists[k]) absmax_lists[k] = py::reinterpret_borrow<py::object>(l);
  }
  py::object master_list;
  if (PyObject* l = any_master ? PyDict_GetItemString(states.ptr(), MASTER_STATE) : nullptr) {
    master_list = py::reinterpret_borrow<py::object>(l);
  }
  StepCounts step_counts;
  if (steps_given) step_counts = parse_steps(steps, pos);
  // From here on no Python code runs until the kernels are done.

  buffers_ = std::make_unique<Buffers>(params, "params", Access::write, std::move(pos), PARAMS);
  Buffers& cb = *buffers_;
  const std::size_t count = cb.count();
  // Row-sparse gradients (optkern.RowSparse), found by their type (no Python code runs): Buffers
  // leaves them out; they are checked, and their rows grouped, below.
  const py::list grad_items = snapshot(grads, "grads", "float32 NumPy arrays or RowSparse");
  std::vector<char> row_sparse(grad_items.size(), 0);
  bool any_rows = false;
  for (std::size_t i = 0; i < grad_items.size(); ++i) {
    row_sparse[i] = is_row_sparse(grad_items[i]) ? 1 : 0;
    any_rows = any_rows || row_sparse[i];
  }
  const std::vector<ArrayRef> grad_arrays =
      cb.add(grad_items, "grads", Access::read, GRADS, nullptr, any_rows ? &row_sparse : nullptr);
  bool dense_rows = false;
  if (any_rows) {
    const std::size_t first = static_cast<std::size_t>(
        std::find(row_sparse.begin(), row_sparse.end(), 1) - row_sparse.begin());
    dense_rows = rows_mode(rule, h, cb.label("grads", first));
    row_grads_.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      if (!row_sparse[i]) continue;
      row_grads_.push_back(
          parse_row_grad(grad_items[i], cb.label("grads", i), cb.dims(i), cb.ndim(i)));
      const RowGrad& rg = row_grads_.back();
      cb.add_range(rg.values_data, rg.groups.order.size() * rg.row * sizeof(float), "grads", i,
                   false);
    }
  }
  std::vector<ArrayRef> state_arrays[MAX_STATES];
  for (std::size_t k = 0; k < rule.states.size(); ++k) {
    if (lists[k]) {
      const StateShape& kind = rule.states[k].shape;
      state_arrays[k] = cb.add(lists[k], rule.states[k].arg, Access::write,
                               rule.info.passes > 0 ? LIKE_FIRST : STATES,
                               kind == StateShape::like_param ? nullptr : &kind);
    }
  }
  // Each tensor's states share one type: the first state's (a tensor without state: float32,
  // or its parameter's float64).
  std::vector<DType> state_type(count);
  for (std::size_t t = 0; t < count; ++t) {
    const DType param = cb.first()[t].type;
    state_type[t] = param == DType::f64 ? DType::f64 : DType::f32;
    const char* first_name = nullptr;
    for (std::size_t k = 0; k < rule.states.size(); ++k) {
      if (state_arrays[k].empty() || state_arrays[k][t].data == nullptr) continue;
      const DType type = state_arrays[k][t].type;
      if (first_name == nullptr) {
        state_type[t] = type;
        first_name = rule.states[k].arg;
      } else if (type != state_type[t]) {
        throw py::type_error(cb.label(rule.states[k].arg, t) + " is " + dtype_name(type) + " but " +
                             cb.label(first_name, t) + " is " + dtype_name(state_type[t]) +
                             ": the states of a parameter share one type");
      }
    }
    for (std::size_t k = 0; state_type[t] == DType::q8 && k < rule.states.size(); ++k) {
      if (const char* why = q8_refusal(rule.info, k)) {
        throw py::type_error(cb.label("params", t) + ": " + rule.cls + " " + why +
                             "; use bfloat16 or float32 state");
      }
    }
  }
  // q8 states: the absmax of each block, float32 (ceil(n / Q8_BLOCK),).
  std::vector<ArrayRef> absmax_arrays[MAX_STATES];
  const bool any_q8 =
      std::find(state_type.begin(), state_type.end(), DType::q8) != state_type.end();
  for (std::size_t k = 0; (any_q8 || any_absmax) && k < rule.states.size(); ++k) {
    if (!lists[k]) continue;
    std::vector<std::ptrdiff_t> shape(count, Buffers::NONE);
    bool any = false;
    for (std::size_t t = 0; t < count; ++t) {
      if (state_type[t] == DType::q8 && state_arrays[k][t].data != nullptr) {
        shape[t] = static_cast<std::ptrdiff_t>(q8_blocks(cb.sizes()[t]));
        any = true;
      }
    }
    const std::string name = std::string(rule.states[k].name) + ABSMAX_SUFFIX;
    if (!absmax_lists[k]) {
      if (any) {
        throw py::value_error(name + " is required: " + rule.states[k].arg +
                              " holds 8-bit codes, each block of " + std::to_string(Q8_BLOCK) +
                              " scaled by its absmax");
      }
      continue;
    }
    absmax_arrays[k] = cb.add_float32(absmax_lists[k], name.c_str(), shape);
  }
  // Master copies: float32, shaped like their 16-bit parameters (None for the others).
  std::vector<ArrayRef> master_arrays;
  if (master_list) {
    std::vector<std::ptrdiff_t> shape(count, Buffers::NONE);
    for (std::size_t t = 0; t < count; ++t) {
      const DType param = cb.first()[t].type;
      if (param == DType::bf16 || param == DType::f16) shape[t] = Buffers::LIKE_PARAM;
    }
    master_arrays = cb.add_float32(master_list, "master_params", shape);
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

  const std::size_t nc = rule.carried.size();
  for (std::size_t k = 0; k < nc; ++k) {
    if (carried_in_[k].size() != count) {
      throw py::value_error(std::string(rule.carried[k].arg) + " has " +
                            std::to_string(carried_in_[k].size()) + " entries but params has " +
                            std::to_string(count));
    }
  }

  // Each tensor's arrays and kernel entry: the entry of its element types (parameter, gradient,
  // states: the parameter's type).
  Update& u = update_;
  u.rule = &rule;
  u.sizes = cb.sizes();
  u.aligns.assign(count, 1);
  u.dense_rows = dense_rows;
  for (std::size_t t = 0, r = 0; any_rows && t < count; ++t) {
    if (!row_sparse[t]) continue;
    u.sizes[t] = 0;  // its rows are run by for_each_row, not by the dense split
    u.rows.push_back(row_grads_[r++].target());
    u.row_tensors.push_back(t);
  }
  u.tensors.resize(count);
  const KernelSet& kernels = *table.rules[static_cast<int>(rule.kernel)];
  for (std::size_t t = 0; t < count; ++t) {
    Tensor& tensor = u.tensors[t];
    const ArrayRef& p = cb.first()[t];
    tensor.param = p.data;
    tensor.grad = grad_arrays[t].data;
    for (std::size_t k = 0; k < MAX_STATES; ++k) {
      tensor.state[k] = state_arrays[k].empty() ? nullptr : state_arrays[k][t].data;
    }
    tensor.size = cb.sizes()[t];
    tensor.ndim = cb.ndim(t);
    tensor.dims = cb.dims(t);
    for (std::size_t k = 0; k < MAX_STATES; ++k) {
      tensor.absmax[k] =
          absmax_arrays[k].empty() ? nullptr : static_cast<float*>(absmax_arrays[k][t].data);
    }
    tensor.master = master_arrays.empty() ? nullptr : static_cast<float*>(master_arrays[t].data);
    const bool half = p.type == DType::bf16 || p.type == DType::f16;
    ParamWrite write = ParamWrite::nearest;
    tensor.noise = 0;  // (stochastic rounding's: seed_noise, below)
    if (tensor.master != nullptr) {
      write = ParamWrite::master;
    } else if (seed && half) {
      write = ParamWrite::stochastic;
    }
    tensor.types = {p.type, grad_arrays[t].type, state_type[t], write};
    const Tensor* prev = t > 0 ? &u.tensors[t - 1] : nullptr;
    const bool same_types = prev != nullptr && prev->types.param == tensor.types.param &&
                            prev->types.grad == tensor.types.grad &&
                            prev->types.state == tensor.types.state &&
                            prev->types.write == tensor.types.write;
    tensor.entry = same_types ? prev->entry : find_entry(kernels, tensor.types);
    if (tensor.entry == nullptr) {
      throw py::type_error(cb.label("params", t) + ": " + rule.cls + " has no kernel for a " +
                           dtype_name(p.type) + " parameter with a " +
                           dtype_name(grad_arrays[t].type) + " gradient and " +
                           dtype_name(state_type[t]) + " state" +
                           (write == ParamWrite::master       ? " and a master copy"
                            : write == ParamWrite::stochastic ? " rounded stochastically"
                                                              : ""));
    }
    u.aligns[t] = range_align(tensor.types);
    if (row_sparse[t]) check_row_types(rule, tensor.types, cb.label("grads", t));
  }

  if (seed) seed_noise(*seed);
  compute_scalars();
  if (count == 0) {  // still check the scalars of step 1 (or the given step), in float32
    const Hyper hyp(rule.hyper.data(), rule.hyper.size(), h.data());
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
      rule.scalars.f32(hyp, info, probe.bytes);
    } catch (const HyperError& e) {
      throw py::value_error(e.what());
    }
  }
}

void Prepared::seed_noise(std::uint64_t seed) {
  noise_seed_ = seed;
  for (std::size_t t = 0; t < update_.tensors.size(); ++t) {
    Tensor& tensor = update_.tensors[t];
    if (tensor.types.write == ParamWrite::stochastic) {
      tensor.noise = noise_key(seed, buffers_->position(t));
    }
  }
}

void Prepared::compute_scalars() {
  const Rule& rule = rule_;
  Update& u = update_;
  const std::size_t nc = rule.carried.size(), count = steps_.size();
  // carried_[t * nc + k]: tensor t's k-th carried number, turned by the scalars function from
  // its value before this step into its value after it.
  carried_.resize(count * nc);
  for (std::size_t t = 0; t < count; ++t) {
    for (std::size_t k = 0; k < nc; ++k) carried_[t * nc + k] = carried_in_[k][t];
  }
  // The per-step scalars, in double from the step count (and the carried numbers), rounded to
  // each tensor's compute type: one set per distinct step, carried values and compute type.
  const Hyper hyp(rule.hyper.data(), rule.hyper.size(), h_.data());
  u.scalars.clear();
  for (std::size_t t = 0; t < count; ++t) {
    const bool f64 = computes_in_f64(u.tensors[t].types.param);
    bool same =
        t > 0 && steps_[t] == steps_[t - 1] && f64 == computes_in_f64(u.tensors[t - 1].types.param);
    for (std::size_t k = 0; same && k < nc; ++k) {
      same = carried_in_[k][t] == carried_in_[k][t - 1];
    }
    if (same) {
      u.tensors[t].scalars = u.tensors[t - 1].scalars;
      std::copy(carried_.begin() + (t - 1) * nc, carried_.begin() + t * nc,
                carried_.begin() + t * nc);
      continue;
    }
    StepInfo info{rule.cls, steps_[t], steps_[t] == 1, grad_scale_};
    info.carried = nc ? carried_.data() + t * nc : nullptr;
    u.scalars.emplace_back();
    try {
      rule.scalars[f64](hyp, info, u.scalars.back().bytes);
    } catch (const HyperError& e) {
      throw py::value_error(e.what());
    }
    u.tensors[t].scalars = u.scalars.size() - 1;
  }
}

bool Prepared::worth_releasing_gil() const {
  std::size_t work = 0;
  for (std::size_t s : update_.sizes) work += s;
  return work * rule_.info.weight >= min_elements_per_thread();
}

void Prepared::record() const {
  const std::size_t nc = rule_.carried.size(), count = steps_.size();
  for (std::size_t k = 0; k < nc; ++k) {
    PyObject* l = carried_lists_[k].ptr();
    if (static_cast<std::size_t>(PyList_GET_SIZE(l)) != count) {
      throw py::value_error(std::string(rule_.carried[k].arg) + " changed length during the step");
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
    if (PyDict_SetItem(items[t].ptr(), key_of("step"), step.ptr()) != 0) {
      throw py::error_already_set();
    }
    for (std::size_t k = 0; k < nc; ++k) {
      py::float_ v(carried_[t * nc + k]);
      if (PyDict_SetItem(items[t].ptr(), key_of(rule_.carried[k].name), v.ptr()) != 0) {
        throw py::error_already_set();
      }
    }
  }
}

namespace {

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
  if (std::any_of(todo.begin(), todo.end(), [](Prepared* p) { return p->worth_releasing_gil(); })) {
    py::gil_scoped_release nogil;
    for (Prepared* p : todo) p->run_kernels();
  } else {
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

}  // namespace

void define_prepared(py::module_& m) {
  py::class_<Prepared>(m, "Prepared",
                       "One validated update of one group, not yet run (see prepare and run).");
  auto prepare = [](py::handle rule, py::handle params, py::handle grads, py::handle states,
                    py::handle hyper, py::handle steps, double grad_scale, py::handle positions,
                    py::handle isa, py::handle record, py::handle noise_seed) {
    return new Prepared(rule_named(rule), params, grads, states, hyper, steps, grad_scale,
                        positions, isa, record, noise_seed);
  };
  m.def("prepare", prepare, py::arg("rule"), py::arg("params"), py::arg("grads"), py::arg("states"),
        py::arg("hyper"), py::kw_only(), py::arg("steps") = py::none(), py::arg("grad_scale") = 1.0,
        py::arg("positions") = py::none(), py::arg("isa") = py::none(),
        py::arg("record") = py::none(), py::arg("noise_seed") = py::none(),
        py::return_value_policy::take_ownership,
        "Validates one group's update (arrays, hyperparameters, step counts, per-step scalars) "
        "without writing anything.");
  m.def("run", &run_prepared, py::arg("calls"), py::kw_only(), py::arg("counter") = py::none(),
        "Runs prepared updates, then records their step counts (and counter[0] += 1) with no "
        "Python code in between.");
  m.def(
      "step",
      [prepare](py::handle rule, py::handle params, py::handle grads, py::handle states,
                py::handle hyper, py::handle steps, double grad_scale, py::handle positions,
                py::handle isa, py::handle noise_seed) {
        std::unique_ptr<Prepared> p(prepare(rule, params, grads, states, hyper, steps, grad_scale,
                                            positions, isa, py::none(), noise_seed));
        p->used = true;
        if (p->worth_releasing_gil()) {
          py::gil_scoped_release nogil;
          p->run_kernels();
        } else {
          p->run_kernels();
        }
        p->record();  // the carried numbers, if the rule has any
      },
      py::arg("rule"), py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("hyper"),
      py::arg("steps") = py::none(), py::arg("grad_scale") = 1.0, py::arg("positions") = py::none(),
      py::arg("isa") = py::none(), py::arg("noise_seed") = py::none(),
      "One fused update of a group by the named rule: every array validated, the GIL released, "
      "one multi-tensor kernel call. isa names a compiled kernel build to use instead of the "
      "active one (tests compare every ISA in one process).");
}

}  // namespace optkern
