#include "rules/registry.hpp"

namespace optkern {
namespace rules {
#define OPTKERN_RULE(name) RuleFile rule_file_##name();
#include "rules/list.inc"
#undef OPTKERN_RULE
}  // namespace rules

const std::vector<Rule>& all_rules() {
  static const std::vector<Rule> all = [] {
    std::vector<Rule> out;
    for (const rules::RuleFile& file : {
#define OPTKERN_RULE(name) rules::rule_file_##name(),
#include "rules/list.inc"
#undef OPTKERN_RULE
         }) {
      for (const RuleDecl& decl : file.rules) {
        Rule rule{decl, file.kernel, file.info};
        if (decl.weight != 0) rule.info.weight = decl.weight;
        out.push_back(rule);
      }
    }
    return out;
  }();
  return all;
}

const Rule* find_rule(std::string_view name) {
  for (const Rule& r : all_rules()) {
    if (name == r.name) return &r;
  }
  return nullptr;
}

}  // namespace optkern
