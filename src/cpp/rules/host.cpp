// One rule file's host declarations, compiled through a generated unit that defines
// OPTKERN_RULE_NAME and OPTKERN_RULE_FILE and includes this file, once for every rule (as
// kernels/rule.cpp is). The file's shared part (its scalars struct, kKernel) and host part
// (hyperparameters, states, scalars functions, kRules) land in an anonymous namespace of their
// own; `rule_file_<rule>()` hands them to the registry (rules/registry.cpp).
#include <algorithm>
#include <cmath>

#include "rule_api.hpp"
#include "rules/registry.hpp"

#if !defined(OPTKERN_RULE_NAME) || !defined(OPTKERN_RULE_FILE)
#error \
    "compile through a unit that defines OPTKERN_RULE_NAME and OPTKERN_RULE_FILE (see CMakeLists.txt)"
#endif

#define OPTKERN_CAT2(a, b) a##b
#define OPTKERN_CAT(a, b) OPTKERN_CAT2(a, b)
#define OPTKERN_RULE_NS OPTKERN_CAT(rule_, OPTKERN_RULE_NAME)

namespace optkern {
namespace rules {
namespace OPTKERN_RULE_NS {
namespace {

#define OPTKERN_HOST_CONTEXT
#include OPTKERN_RULE_FILE
#undef OPTKERN_HOST_CONTEXT

constexpr bool declarations_fit() {
  for (const RuleDecl& r : kRules) {
    if (!fits_kernel(r, kKernel)) return false;
  }
  return true;
}
static_assert(declarations_fit(),
              "a rule on a kernel with a reduction pass needs per_array, one on a factored kernel "
              "between and between_range, and only those; states <= the kernel's <= MAX_STATES");
static_assert(sizeof(Scalars<double>) <= MAX_SCALARS_BYTES &&
                  sizeof(Scalars<float>) <= MAX_SCALARS_BYTES,
              "raise MAX_SCALARS_BYTES (kernel_api.hpp)");

}  // namespace
}  // namespace OPTKERN_RULE_NS

RuleFile OPTKERN_CAT(rule_file_, OPTKERN_RULE_NAME)() {
  namespace self = OPTKERN_RULE_NS;
  return {KernelId::OPTKERN_RULE_NAME, self::kKernel, self::kRules};
}

}  // namespace rules
}  // namespace optkern

#undef OPTKERN_RULE_NS
