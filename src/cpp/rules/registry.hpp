// Every rule, as its file declares it (rules/<name>.inc, listed in rules/list.inc), with its
// kernel: what the bindings validate against and the driver runs.
#pragma once

#include <span>
#include <string_view>
#include <vector>

#include "rule_api.hpp"

namespace optkern {

// One rule: its declaration, its kernel's index in every KernelTable and what that kernel is.
struct Rule : RuleDecl {
  KernelId kernel;
  KernelDecl info;
};

// Every rule, in the order of rules/list.inc and, within a file, of its kRules.
const std::vector<Rule>& all_rules();

// The rule of that functional name, or nullptr.
const Rule* find_rule(std::string_view name);

namespace rules {
// What one rule file's host unit (rules/host.cpp) declares.
struct RuleFile {
  KernelId kernel;
  KernelDecl info;
  std::span<const RuleDecl> rules;
};
}  // namespace rules

}  // namespace optkern
