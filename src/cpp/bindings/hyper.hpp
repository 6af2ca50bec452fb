// Hyperparameters and step counts, as the bindings take them from Python: every value checked
// against its rule's declaration (rules/<name>.inc) before anything is written.
#pragma once

#include <cstdint>
#include <vector>

#include "bindings/arrays.hpp"
#include "rules/registry.hpp"

namespace optkern {

// The rule of that name, or ValueError naming the known ones.
const Rule& rule_named(py::handle name);

// One value, checked against its declaration: a real number (float or int, not bool) that float32
// can hold, in its range; or a bool for a flag (None where the declaration takes it); else
// TypeError or ValueError naming it (labels: {name: label} for messages, or None). Only exact
// types pass, so no Python code runs but to format a message.
double hyper_value(const HyperDecl& d, py::handle v, py::handle labels);

// The rule's hyperparameter i; i == hyper.size() is maximize, every rule's last.
const HyperDecl& hyper_decl(const Rule& r, std::size_t i);

// The rule's hyperparameters from a dict {name: value}, in declaration order (maximize last);
// a missing name takes its default, an unknown one is refused. labels: {name: label} for
// messages (e.g. a schedule's lr), or None.
std::vector<double> parse_hyper(const Rule& r, py::handle hyper, py::handle labels);

// Whether the rule needs state s under these hyperparameters (its `when` option is set).
bool state_needed(const Rule& r, const StateDecl& s, const std::vector<double>& h);

// Step counts of an update: an int for all tensors (one entry, `all` set), or a list or tuple
// of ints >= 1, one per tensor. Converting them may run Python code (__index__), so this runs
// before any array is looked at; the count is matched to the parameters afterwards.
struct StepCounts {
  std::vector<std::int64_t> values;
  bool all = false;
};
StepCounts parse_steps(py::handle steps, const Positions& positions);
std::vector<std::int64_t> steps_for(const StepCounts& s, std::size_t count);

// _core.validate, _core.rules and _core.state_shape.
void define_rules(py::module_& m);

}  // namespace optkern
