// A step plan: one optimizer's validated step, kept from step to step. optimizer.py builds it after
// a step that went the whole way (prepare + run), from that step's prepared updates. Each later
// step then checks only what can have changed since: that the optimizer still holds the same group
// list, groups, parameter lists, parameters and state entries (by identity: the plan holds a
// reference to each, so none can be freed and its address reused); each array's data pointer,
// shape, flags and dtype; each hyperparameter's value by identity, re-validating only the ones that
// changed; and the gradients (dtype, layout, shape, no overlap with any buffer the step writes).
// State arrays include an int8 state's absmax and a master copy; stochastic rounding's noise is
// keyed anew for each step by its number, as the whole path keys it. Then it computes the
// per-step scalars, runs the kernels and records the step counts with no Python code in
// between, as run() does. Anything it does not handle (a value of another type, a
// missing state, a None gradient, an error to report) it hands back to the whole path with a
// reason, having changed nothing. It also notices a parameter only the optimizer still holds (see
// Held, bindings/plan_facts.hpp).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "bindings/hyper.hpp"
#include "bindings/norms.hpp"
#include "bindings/plan_facts.hpp"
#include "bindings/prepared.hpp"

namespace optkern {

using npy = py::detail::npy_api;

class StepPlan {
 public:
  StepPlan(py::handle calls, py::handle groups, py::handle owner, py::handle param_state,
           py::handle state_dicts, py::handle counter, bool check_held, py::handle previous)
      : check_held_(check_held),
        key_groups_(interned("param_groups")),
        key_state_(interned("state")),
        key_version_(interned("version")),
        key_params_(interned("params")),
        key_step_(interned("step")) {
    const py::list items = snapshot(calls, "calls", "prepared updates");
    groups_ = py::reinterpret_borrow<py::object>(groups);
    if (!PyList_CheckExact(groups.ptr()) ||
        static_cast<std::size_t>(PyList_GET_SIZE(groups.ptr())) != items.size()) {
      throw py::value_error("a step plan needs one prepared update per param group");
    }
    if (!PyDict_CheckExact(owner.ptr()) || !PyDict_CheckExact(param_state.ptr())) {
      throw py::type_error("owner and param_state must be the __dict__ of the optimizer and state");
    }
    owner_ = py::reinterpret_borrow<py::object>(owner);
    state_vars_ = py::reinterpret_borrow<py::object>(param_state);
    state_obj_ = held_item(owner, "state");
    version_ = held_item(param_state, "version");
    if (!PyLong_CheckExact(version_.ptr())) throw py::type_error("state.version must be an int");
    if (!(PyList_CheckExact(counter.ptr()) && PyList_GET_SIZE(counter.ptr()) >= 1)) {
      throw py::type_error("counter must be a list whose first item is an int");
    }
    counter_ = py::reinterpret_borrow<py::object>(counter);
    const py::list dict_lists = snapshot(state_dicts, "state_dicts", "lists of state dicts");
    if (dict_lists.size() != items.size()) {
      throw py::value_error("state_dicts must hold one list per param group");
    }
    const StepPlan* prev = previous.is_none() ? nullptr : previous.cast<StepPlan*>();

    for (std::size_t g = 0; g < items.size(); ++g) {
      Group& G = groups_data_.emplace_back();
      G.prepared = items[g].cast<Prepared*>();
      G.prepared_obj = py::reinterpret_borrow<py::object>(items[g]);
      if (g == 0) {
        rule_ = &G.prepared->rule_;
        for (std::size_t k = 0; k < rule_->states.size(); ++k) {
          state_keys_.push_back(interned(rule_->states[k].name));
          const std::string absmax = std::string(rule_->states[k].name) + ABSMAX_SUFFIX;
          absmax_keys_.push_back(
              py::reinterpret_steal<py::object>(PyUnicode_InternFromString(absmax.c_str())));
          if (!absmax_keys_.back()) throw py::error_already_set();
        }
        for (std::size_t k = 0; k < rule_->carried.size(); ++k) {
          carried_keys_.push_back(interned(rule_->carried[k].name));
        }
      }
      if (&G.prepared->rule_ != rule_) {
        throw py::value_error("a step plan's updates must share one rule");
      }
      build_group(G, PyList_GET_ITEM(groups.ptr(), g), dict_lists[g]);
    }
    // Every buffer the step writes, sorted: a gradient must overlap none of them.
    for (const Group& G : groups_data_) {
      for (const ArrayFacts& f : G.params) add_written(f);
      for (const auto& entries : G.entries) {
        for (const StateEntry& e : entries) add_written(e.facts);
      }
    }
    // Stochastic rounding's noise is keyed by the number of the step being taken (the whole
    // path passes step_count + 1): the step that made the plan has just been counted, so its
    // seed is the counter now. Each later step takes the counter + 1 (see run_step).
    for (const Group& G : groups_data_) {
      if (!G.prepared->noise_seed_) continue;
      if (G.prepared->noise_seed_ != step_seed(0)) {
        throw py::value_error("a noise seed that is not the number of the step");
      }
      noisy_ = true;
    }
    std::sort(written_.begin(), written_.end());
    for (std::size_t i = 1; i < written_.size(); ++i) {
      if (written_[i].first < written_[i - 1].second) {
        throw py::value_error("buffers that a step writes share memory");
      }
    }
    // Held: the optimizer's parameters that are views of each base.
    std::unordered_map<PyObject*, Py_ssize_t> views;
    for (const Group& G : groups_data_) {
      for (const Held& h : G.held) {
        if (h.base != nullptr) ++views[h.base];
      }
    }
    for (Group& G : groups_data_) {
      for (Held& h : G.held) {
        if (h.base != nullptr) h.base_own = views[h.base];
      }
    }
    if (prev != nullptr) {  // what the plan it replaces saw of the same parameters
      std::unordered_map<PyObject*, const Held*> before;
      for (const Group& P : prev->groups_data_) {
        for (std::size_t j = 0; j < P.params.size(); ++j) before[P.params[j].obj] = &P.held[j];
      }
      for (Group& G : groups_data_) {
        for (std::size_t i = 0; i < G.params.size(); ++i) {
          const auto it = before.find(G.params[i].obj);
          if (it != before.end()) {
            G.held[i].armed = it->second->armed;
            G.held[i].reported = it->second->reported;
          }
        }
      }
    }
  }

  // One step, as Optimizer.step(grads, max_grad_norm=max_norm, norm_type, skip_if_nonfinite=
  // skip) with those two options checked already (max_norm None or a float >= 0, norm_type > 0).
  // Returns None when it ran without options, the total norm of the gradients when it ran with
  // them, (norm,) when skip found a NaN or Inf and changed nothing; else why the whole path must
  // take the step (a str, nothing changed), or a list of (group, index) of parameters newly
  // found held by no one but the optimizer (the caller warns and calls again). run false: only
  // the checks that come first (the optimizer's structure, then whether each parameter is still
  // held), then "options".
  py::object step(py::handle grads, bool run, py::handle max_norm, double norm_type, bool skip) {
    // A dict lookup can run Python code (a key's __eq__), which could call step() again from
    // inside this one: that inner call takes the whole path instead.
    if (busy_) return py::str("busy");
    busy_ = true;
    struct Done {
      bool& busy;
      ~Done() { busy = false; }
    } done{busy_};
    return run_step(grads, run, max_norm, norm_type, skip);
  }

 private:
  // Whether the optimizer's state still maps parameter i of G to the state dict the plan
  // counted among the parameter's references (ParamState._by_id: id -> (param, dict)).
  bool state_still_held(PyObject* param, const py::object& dict) const {
    if (dict.is_none()) return true;  // not counted
    PyObject* by_id = PyDict_GetItemString(state_vars_.ptr(), "_by_id");
    if (by_id == nullptr || !PyDict_Check(by_id)) return false;
    py::object key = py::reinterpret_steal<py::object>(PyLong_FromVoidPtr(param));
    if (!key) throw py::error_already_set();
    PyObject* entry = PyDict_GetItem(by_id, key.ptr());
    return entry != nullptr && PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 2 &&
           PyTuple_GET_ITEM(entry, 0) == param && PyTuple_GET_ITEM(entry, 1) == dict.ptr();
  }

  py::object run_step(py::handle grads, bool run, py::handle max_norm, double norm_type,
                      bool skip) {
    if (const char* why = check_structure()) return py::str(why);
    if (check_held_) {
      py::list stale;
      for (std::size_t g = 0; g < groups_data_.size(); ++g) {
        Group& G = groups_data_[g];
        for (std::size_t i = 0; i < G.params.size(); ++i) {
          Held& h = G.held[i];
          if (h.reported) continue;
          if (h.held(G.params[i].obj)) {
            h.armed = true;
          } else if (h.armed) {
            // Another thread may have just removed the parameter's state (its reference went,
            // the version bump not yet made): then the whole path looks again.
            if (!state_still_held(G.params[i].obj, G.state_dicts[i])) return py::str("state");
            h.reported = true;
            stale.append(py::make_tuple(g, i));
          }
        }
      }
      if (stale.size() != 0) return std::move(stale);
    }
    if (!run) return py::str("options");
    if (const char* why = check_values()) return py::str(why);
    if (const char* why = check_grads(grads)) {
      grads_held_.clear();
      return py::str(why);
    }
    // The options: the total norm in one read pass (as _core.grad_norms gives it), then a
    // skip, or the clipping coefficient folded into the update (clip.clip_coefficient).
    const bool options = !max_norm.is_none() || skip;
    double norm = 0.0, scale = 1.0;
    if (options) {
      norm = compute_norms(grad_ptrs_.data(), sizes_.data(), n_grads_, norm_type).second;
      // A p-norm of finite values can still overflow for p other than 1, 2 and inf: then the
      // 2-norm says whether any value is NaN or Inf.
      if (skip && !std::isfinite(norm) &&
          (norm_type == 1.0 || norm_type == 2.0 || std::isinf(norm_type) ||
           !std::isfinite(compute_norms(grad_ptrs_.data(), sizes_.data(), n_grads_, 2.0).second))) {
        grads_held_.clear();
        return py::make_tuple(norm);
      }
      if (!max_norm.is_none()) {
        const double coef = PyFloat_AsDouble(max_norm.ptr()) / (norm + 1e-6);
        scale = coef >= 1.0 ? 1.0 : coef;  // NaN stays NaN, as in torch
      }
    }
    const std::optional<std::uint64_t> seed = noisy_ ? step_seed(1) : std::nullopt;
    if (noisy_ && !seed) {
      grads_held_.clear();
      return py::str("counter");
    }
    for (Group& G : groups_data_) {
      Prepared& P = *G.prepared;
      if (P.noise_seed_) P.seed_noise(*seed);
      P.h_ = G.h_next;
      P.grad_scale_ = P.h_[rule_->hyper.size()] != 0.0 ? -scale : scale;
      P.steps_ = G.steps_next;
      for (std::size_t k = 0; k < rule_->carried.size(); ++k) P.carried_in_[k] = G.carried_next[k];
      for (std::size_t t = 0; t < G.params.size(); ++t) {
        P.update_.tensors[t].grad = grad_ptrs_[G.first + t].data;
      }
      try {
        P.compute_scalars();
      } catch (const py::value_error&) {
        // A scalar float32 cannot hold at this step: the whole path reports it. Nothing is
        // committed; the next step reads every value again.
        grads_held_.clear();
        return py::str("scalars");
      }
    }
    // Commit: the values just validated become the ones later steps compare against.
    for (Group& G : groups_data_) {
      G.h.swap(G.h_next);
      G.seen.swap(G.seen_next);
      G.callable_lr = false;  // a step ran: every value was read (an lr now a float)
    }
    if (std::any_of(groups_data_.begin(), groups_data_.end(),
                    [](const Group& G) { return G.prepared->worth_releasing_gil(); })) {
      py::gil_scoped_release nogil;  // long enough for other Python threads to run meanwhile
      for (const Group& G : groups_data_) G.prepared->run_kernels();
    } else {
      for (const Group& G : groups_data_) G.prepared->run_kernels();
    }
    grads_held_.clear();
    record();
    return options ? py::object(py::float_(norm)) : py::object(py::none());
  }

  struct Group {
    Prepared* prepared = nullptr;
    py::object prepared_obj;  // keeps it (and the arrays it holds) alive
    py::object dict;          // the param group
    py::object params_list;   // its "params" list
    std::vector<ArrayFacts> params;
    std::vector<Held> held;
    std::vector<py::object> state_dicts;           // per parameter (None: no state entry)
    std::vector<std::vector<StateEntry>> entries;  // per parameter: the arrays of its state
    std::vector<py::object> step_seen;             // per parameter: the step count object
    std::vector<std::int64_t> step_value;          // and its value
    // Hyperparameters, by the group's keys (torch's names): the value object last validated
    // and the hyperparameter slots it fills (a tuple's items: betas).
    std::vector<py::object> keys;
    std::vector<std::vector<std::size_t>> slots;
    std::vector<py::object> seen, seen_next;
    std::vector<double> h, h_next;  // their values: validated, for this step
    bool callable_lr = false;       // the group's lr is a callable
    std::vector<char> needed;       // each state, needed under those values
    std::vector<std::int64_t> steps_next;
    std::vector<std::vector<double>> carried_next;  // [carried][parameter]
    std::size_t first = 0;                          // its first gradient's index in step()'s list
  };

  // The index of the key holding the learning rate ("lr"), or keys.size().
  static std::size_t lr_key(const Group& G) {
    for (std::size_t k = 0; k < G.keys.size(); ++k) {
      if (PyUnicode_CompareWithASCIIString(G.keys[k].ptr(), "lr") == 0) return k;
    }
    return G.keys.size();
  }

  // The noise seed of step counter + ahead, in its low 64 bits as the core takes any int seed;
  // nullopt if the counter holds no int (a lookup's Python code may have changed it).
  std::optional<std::uint64_t> step_seed(std::uint64_t ahead) const {
    PyObject* c =
        PyList_GET_SIZE(counter_.ptr()) < 1 ? nullptr : PyList_GET_ITEM(counter_.ptr(), 0);
    if (c == nullptr || !PyLong_CheckExact(c)) return std::nullopt;
    const unsigned long long v = PyLong_AsUnsignedLongLongMask(c);
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
    return static_cast<std::uint64_t>(v) + ahead;
  }

  static py::object interned(const char* text) {
    return py::reinterpret_borrow<py::object>(key_of(text));
  }

  static py::object held_item(py::handle dict, const char* key) {
    PyObject* v = PyDict_GetItemString(dict.ptr(), key);
    if (v == nullptr) throw py::value_error(std::string("no '") + key + "' to build a plan on");
    return py::reinterpret_borrow<py::object>(v);
  }

  void add_written(const ArrayFacts& f) {
    const std::size_t n = f.bytes();
    if (n == 0) return;
    const auto lo = reinterpret_cast<std::uintptr_t>(f.data);
    written_.emplace_back(lo, lo + n);
  }

  void build_group(Group& G, PyObject* group, py::handle dicts) {
    Prepared& P = *G.prepared;
    const Rule& r = *rule_;
    if (!PyDict_CheckExact(group)) throw py::type_error("a param group must be a dict");
    G.dict = py::reinterpret_borrow<py::object>(group);
    G.params_list = held_item(group, "params");
    const Buffers& cb = *P.buffers_;
    const std::size_t n = cb.count();
    if (!PyList_CheckExact(G.params_list.ptr()) ||
        static_cast<std::size_t>(PyList_GET_SIZE(G.params_list.ptr())) != n) {
      throw py::value_error("the prepared update does not cover its whole group");
    }
    const py::list& held_params = cb.list(0);
    for (std::size_t t = 0; t < n; ++t) {
      PyObject* p = PyList_GET_ITEM(G.params_list.ptr(), t);
      if (p != held_params[t].ptr()) throw py::value_error("the group's params changed");
      G.params.push_back(ArrayFacts::of(p));
      sizes_.push_back(cb.sizes()[t]);
      Held h;
      const auto* a = py::detail::array_proxy(p);
      if (a->base != nullptr) {
        h.base = a->base;
        h.base_is_owner = npy::get().PyArray_Check_(a->base) &&
                          (py::detail::array_proxy(a->base)->flags & npy::NPY_ARRAY_OWNDATA_) != 0;
      }
      G.held.push_back(h);
    }
    // Hyperparameters: the group's keys (torch's names, each once) and what each holds now,
    // which must give the values the prepared update was validated with.
    for (std::size_t i = 0; i <= r.hyper.size(); ++i) {
      const HyperDecl& d = hyper_decl(r, i);
      std::size_t k = 0;
      for (; k < G.keys.size(); ++k) {
        if (PyUnicode_CompareWithASCIIString(G.keys[k].ptr(), d.torch) == 0) break;
      }
      if (k == G.keys.size()) {
        G.keys.push_back(py::reinterpret_steal<py::object>(PyUnicode_InternFromString(d.torch)));
        G.slots.emplace_back();
        PyObject* v = PyDict_GetItem(group, G.keys.back().ptr());
        G.seen.push_back(v == nullptr ? py::object() : py::reinterpret_borrow<py::object>(v));
      }
      G.slots[k].push_back(i);
    }
    G.seen_next = G.seen;
    std::vector<double> h(P.h_.size());
    for (std::size_t k = 0; k < G.keys.size(); ++k) {
      if (read_value(G, k, G.seen[k].ptr(), h)) continue;
      // A callable lr (a schedule the whole path calls once per step): while the group holds
      // it, every step goes the whole way, the plan still checking the rest first.
      if (k == lr_key(G) && G.seen[k] && PyCallable_Check(G.seen[k].ptr())) {
        G.callable_lr = true;
        h[G.slots[k][0]] = P.h_[G.slots[k][0]];
        continue;
      }
      throw py::value_error("a hyperparameter the plan cannot read");
    }
    // (None is kept as a NaN: equal to itself here)
    if (!std::equal(h.begin(), h.end(), P.h_.begin(), P.h_.end(), [](double a, double b) {
          return a == b || (std::isnan(a) && std::isnan(b));
        })) {
      throw py::value_error("the group's values are not those of its update");
    }
    G.h = G.h_next = h;
    for (std::size_t s = 0; s < r.states.size(); ++s)
      G.needed.push_back(state_needed(r, r.states[s], h));
    // State: each parameter's dict, the arrays in it, its step count.
    const py::list dicts_list = snapshot(dicts, "state dicts", "dicts or None");
    if (dicts_list.size() != n) throw py::value_error("one state dict per parameter");
    G.entries.resize(n);
    for (std::size_t t = 0; t < n; ++t) {
      py::object d = py::reinterpret_borrow<py::object>(dicts_list[t]);
      if (!d.is_none() && !PyDict_CheckExact(d.ptr())) throw py::type_error("a state dict");
      G.state_dicts.push_back(d);
      G.held[t].own = 2 + (d.is_none() ? 0 : 1);
      const Tensor& tensor = P.update_.tensors[t];
      const auto add = [&](PyObject* key, const void* ptr) {
        if (d.is_none()) throw py::value_error("a state array without a state dict");
        PyObject* a = PyDict_GetItem(d.ptr(), key);
        if (a == nullptr || !py::isinstance<py::array>(a) ||
            py::detail::array_proxy(a)->data != static_cast<const char*>(ptr)) {
          throw py::value_error("the state dicts do not hold the update's arrays");
        }
        G.entries[t].push_back({key, ArrayFacts::of(a)});
      };
      for (std::size_t s = 0; s < r.states.size(); ++s) {
        if (!G.needed[s] || tensor.state[s] == nullptr) continue;
        add(state_keys_[s].ptr(), tensor.state[s]);
        if (tensor.absmax[s] != nullptr) add(absmax_keys_[s].ptr(), tensor.absmax[s]);
      }
      if (tensor.master != nullptr) add(key_of(MASTER_STATE), tensor.master);
    }
    // Step counts (rules that count them) as the update recorded them.
    const bool counts = r.steps != Steps::first_only;
    for (std::size_t t = 0; t < n; ++t) {
      if (!counts) {
        G.step_seen.emplace_back();
        G.step_value.push_back(1);
        continue;
      }
      if (G.state_dicts[t].is_none()) throw py::value_error("a counting rule without state");
      PyObject* s = PyDict_GetItemString(G.state_dicts[t].ptr(), "step");
      if (s == nullptr || !PyLong_CheckExact(s)) throw py::value_error("a step count to read");
      G.step_seen.push_back(py::reinterpret_borrow<py::object>(s));
      G.step_value.push_back(PyLong_AsLongLong(s));
    }
    G.steps_next.assign(n, 2);
    G.carried_next.assign(r.carried.size(), std::vector<double>(n));
    G.first = n_grads_;
    n_grads_ += n;
  }

  // Reads the value of key k into h (the slots it fills); false where the plan does not take
  // it (the whole path converts or refuses it): a real must be a float (or None where the rule
  // takes None), a flag a bool, a tuple argument a tuple of those; an absent key is left to the
  // whole path too.
  bool read_value(const Group& G, std::size_t k, PyObject* v, std::vector<double>& h) const {
    if (v == nullptr) return false;
    const std::vector<std::size_t>& slots = G.slots[k];
    const HyperDecl& d0 = hyper_decl(*rule_, slots[0]);
    if (d0.slot < 0) {
      const bool ok = d0.range == Range::flag
                          ? PyBool_Check(v)
                          : PyFloat_CheckExact(v) || (v == Py_None && d0.none.allowed);
      return ok && read_one(d0, v, h[slots[0]]);
    }
    if (!PyTuple_CheckExact(v) || static_cast<std::size_t>(PyTuple_GET_SIZE(v)) != slots.size()) {
      return false;
    }
    for (std::size_t j = 0; j < slots.size(); ++j) {
      const HyperDecl& d = hyper_decl(*rule_, slots[j]);
      PyObject* x = PyTuple_GET_ITEM(v, static_cast<Py_ssize_t>(d.slot));
      const bool ok = d.range == Range::flag
                          ? PyBool_Check(x)
                          : PyFloat_CheckExact(x) || (x == Py_None && d.none.allowed);
      if (!ok || !read_one(d, x, h[slots[j]])) return false;
    }
    return true;
  }

  static bool read_one(const HyperDecl& d, PyObject* v, double& out) {
    try {
      out = hyper_value(d, v, py::none());
    } catch (const py::error_already_set&) {
      throw;
    } catch (const std::exception&) {
      return false;  // out of range: the whole path says so
    }
    return true;
  }

  // The optimizer still holds the same group list, groups, parameter lists and parameters, and
  // the same state (unchanged version); the parameters' arrays are as validated.
  const char* check_structure() const {
    PyObject* groups = PyDict_GetItem(owner_.ptr(), key_groups_.ptr());
    if (groups != groups_.ptr() ||
        PyList_GET_SIZE(groups) != static_cast<Py_ssize_t>(groups_data_.size())) {
      return "groups";
    }
    if (PyDict_GetItem(owner_.ptr(), key_state_.ptr()) != state_obj_.ptr()) return "state";
    if (PyList_GET_SIZE(counter_.ptr()) < 1 ||
        !PyLong_CheckExact(PyList_GET_ITEM(counter_.ptr(), 0))) {
      return "counter";  // run() refuses it
    }
    PyObject* version = PyDict_GetItem(state_vars_.ptr(), key_version_.ptr());
    if (version != version_.ptr()) {
      if (version == nullptr || !PyLong_CheckExact(version) ||
          PyObject_RichCompareBool(version, version_.ptr(), Py_EQ) != 1) {
        return "state";
      }
    }
    for (std::size_t g = 0; g < groups_data_.size(); ++g) {
      const Group& G = groups_data_[g];
      if (PyList_GET_ITEM(groups, g) != G.dict.ptr()) return "groups";
      PyObject* params = PyDict_GetItem(G.dict.ptr(), key_params_.ptr());
      if (params != G.params_list.ptr() ||
          PyList_GET_SIZE(params) != static_cast<Py_ssize_t>(G.params.size())) {
        return "params";
      }
      for (std::size_t t = 0; t < G.params.size(); ++t) {
        if (!G.params[t].same(PyList_GET_ITEM(params, t))) return "params";
      }
    }
    return nullptr;
  }

  // Hyperparameters (changed ones validated), state entries and arrays, step counts and
  // carried numbers, into each group's *_next.
  const char* check_values() {
    const Rule& r = *rule_;
    const bool counts = r.steps != Steps::first_only;
    for (Group& G : groups_data_) {
      bool changed = false;
      G.h_next = G.h;
      for (std::size_t k = 0; k < G.keys.size(); ++k) {
        PyObject* v = PyDict_GetItem(G.dict.ptr(), G.keys[k].ptr());
        if (v == G.seen[k].ptr()) {
          // The same callable lr: the whole path calls it (and the plan stays).
          if (G.callable_lr && k == lr_key(G)) return "lr";
          G.seen_next[k] = G.seen[k];
          continue;
        }
        if (!read_value(G, k, v, G.h_next)) return "hyper";
        G.seen_next[k] = py::reinterpret_borrow<py::object>(v);
        changed = true;
      }
      if (changed) {
        if (r.check != nullptr) {
          try {
            r.check(Hyper(r.hyper.data(), r.hyper.size(), G.h_next.data()));
          } catch (const HyperError&) {
            return "hyper";
          }
        }
        for (std::size_t s = 0; s < r.states.size(); ++s) {
          if (state_needed(r, r.states[s], G.h_next) != static_cast<bool>(G.needed[s])) {
            return "hyper";  // a state to make (or one no longer used): the whole path
          }
        }
      }
      for (std::size_t t = 0; t < G.params.size(); ++t) {
        const py::object& d = G.state_dicts[t];
        for (const StateEntry& e : G.entries[t]) {
          if (!e.facts.same(PyDict_GetItem(d.ptr(), e.key))) return "state";
        }
        if (counts) {
          PyObject* s = PyDict_GetItem(d.ptr(), key_step_.ptr());
          if (s != G.step_seen[t].ptr()) {
            if (s == nullptr || !PyLong_CheckExact(s)) return "state";
            int overflow = 0;
            const long long v = PyLong_AsLongLongAndOverflow(s, &overflow);
            if (overflow != 0 || v < 0 || v >= std::numeric_limits<std::int64_t>::max()) {
              return "state";
            }
            G.step_seen[t] = py::reinterpret_borrow<py::object>(s);
            G.step_value[t] = v;
          }
          G.steps_next[t] = G.step_value[t] + 1;
        } else {
          G.steps_next[t] = 2;  // every buffer exists: not a first step
        }
        for (std::size_t k = 0; k < r.carried.size(); ++k) {
          PyObject* c = PyDict_GetItem(d.ptr(), carried_keys_[k].ptr());
          if (c == nullptr || !PyFloat_CheckExact(c)) return "state";
          const double x = PyFloat_AS_DOUBLE(c);
          if (!std::isfinite(x)) return "state";
          G.carried_next[k][t] = x;
        }
      }
    }
    return nullptr;
  }

  // The gradients: a list or tuple with one float32 ndarray per parameter, C-contiguous,
  // aligned, shaped like its parameter, overlapping no buffer the step writes. Each is held
  // until the kernels are done (another thread may drop the list meanwhile).
  const char* check_grads(py::handle grads) {
    PyObject* seq = grads.ptr();
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) return "grads";
    if (PySequence_Fast_GET_SIZE(seq) != static_cast<Py_ssize_t>(n_grads_)) return "grads";
    PyObject** items = PySequence_Fast_ITEMS(seq);
    grad_ptrs_.assign(n_grads_, ArrayRef{nullptr, DType::f32});
    grads_held_.clear();
    for (const Group& G : groups_data_) {
      for (std::size_t t = 0; t < G.params.size(); ++t) {
        PyObject* o = items[G.first + t];
        if (Py_TYPE(o) != npy::get().PyArray_Type_) return "grads";
        const auto* a = py::detail::array_proxy(o);
        const auto* d = py::detail::array_descriptor_proxy(a->descr);
        const ArrayFacts& p = G.params[t];
        constexpr int need = npy::NPY_ARRAY_C_CONTIGUOUS_ | npy::NPY_ARRAY_ALIGNED_;
        DType type;
        if (!dtype_of(d->type_num, &type) || !native_order(d->byteorder) ||
            type != G.prepared->update_.tensors[t].types.grad || (a->flags & need) != need ||
            a->nd != p.nd || !std::equal(p.dims.begin(), p.dims.end(), a->dimensions)) {
          return "grads";  // (a gradient of another type: its kernel entry is the whole path's)
        }
        const std::size_t n = sizes_[G.first + t] * dtype_size(type);
        if (n != 0) {
          const auto lo = reinterpret_cast<std::uintptr_t>(a->data), hi = lo + n;
          // The first written range ending after lo: the grad overlaps it if it starts before hi.
          auto it = std::upper_bound(
              written_.begin(), written_.end(), lo,
              [](std::uintptr_t x, const std::pair<std::uintptr_t, std::uintptr_t>& w) {
                return x < w.second;
              });
          if (it != written_.end() && it->first < hi) return "grads";
        }
        grad_ptrs_[G.first + t] = {a->data, type};
        grads_held_.push_back(py::reinterpret_borrow<py::object>(o));
      }
    }
    return nullptr;
  }

  // After the kernels, with no Python code in between: each state's step count and carried
  // numbers, then the optimizer's step counter.
  void record() {
    const Rule& r = *rule_;
    const bool counts = r.steps != Steps::first_only;
    const std::size_t nc = r.carried.size();
    for (Group& G : groups_data_) {
      const Prepared& P = *G.prepared;
      for (std::size_t t = 0; t < G.params.size(); ++t) {
        PyObject* d = G.state_dicts[t].ptr();
        if (counts) {
          auto step = py::reinterpret_steal<py::object>(PyLong_FromLongLong(P.steps_[t]));
          if (!step || PyDict_SetItem(d, key_step_.ptr(), step.ptr()) != 0) {
            throw py::error_already_set();
          }
          G.step_value[t] = P.steps_[t];
          G.step_seen[t] = std::move(step);
        }
        for (std::size_t k = 0; k < nc; ++k) {
          auto v = py::reinterpret_steal<py::object>(PyFloat_FromDouble(P.carried_[t * nc + k]));
          if (!v || PyDict_SetItem(d, carried_keys_[k].ptr(), v.ptr()) != 0) {
            throw py::error_already_set();
          }
        }
      }
    }
    PyObject* c = counter_.ptr();
    PyObject* old = PyList_GET_ITEM(c, 0);
    PyObject* next = PyNumber_Add(old, py::int_(1).ptr());
    if (next == nullptr) throw py::error_already_set();
    PyList_SetItem(c, 0, next);  // steals next
  }

  const Rule* rule_ = nullptr;
  bool check_held_;
  bool busy_ = false;
  bool noisy_ = false;  // some update rounds stochastically: its noise is keyed by the step
  py::object key_groups_, key_state_, key_version_, key_params_, key_step_;
  std::vector<py::object> state_keys_, absmax_keys_, carried_keys_;
  py::object owner_, state_vars_, state_obj_, version_, groups_, counter_;
  std::vector<Group> groups_data_;
  std::size_t n_grads_ = 0;
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> written_;  // sorted [lo, hi)
  std::vector<ArrayRef> grad_ptrs_;                                 // the gradients of this step
  std::vector<std::size_t> sizes_;  // elements of each parameter, in the gradients' order
  std::vector<py::object> grads_held_;
};

void define_step_plan(py::module_& m) {
  py::class_<StepPlan>(m, "StepPlan",
                       "One optimizer's validated step, kept from step to step: each step "
                       "checks only what can have changed (see bindings/step_plan.cpp).")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, bool,
                    py::handle>(),
           py::arg("calls"), py::arg("groups"), py::arg("owner"), py::arg("param_state"),
           py::arg("state_dicts"), py::arg("counter"), py::arg("check_held"), py::arg("previous"))
      .def("step", &StepPlan::step, py::arg("grads"), py::arg("run"), py::arg("max_norm"),
           py::arg("norm_type"), py::arg("skip"),
           "One step (see StepPlan::step): None or the norm when it ran, (norm,) when skipped, "
           "else why the whole path must take it (nothing changed), or the (group, index) of "
           "parameters newly held by no one but the optimizer.");
}

}  // namespace optkern
