// One rule file's kernel for one ISA build, with an entry per combination of element types.
//
// CMake compiles this through a generated unit that defines OPTKERN_RULE_NAME (the rule file's name
// in rules/list.inc) and OPTKERN_RULE_FILE ("rules/<name>.inc") and includes this file (a unit may
// do so for several rules in turn); OPTKERN_ISA_NS and the ISA's flags come from the target. The
// rule file's shared part (its scalars struct, kKernel) and its kernel part (the loops and `struct
// Kernel`) land in an anonymous namespace of their own; `kernels_<rule>` hands the driver its
// entries.
#include "kernels/kernel.hpp"

#if !defined(OPTKERN_RULE_NAME) || !defined(OPTKERN_RULE_FILE)
#error \
    "compile through a unit that defines OPTKERN_RULE_NAME and OPTKERN_RULE_FILE (CMakeLists.txt)"
#endif

#define OPTKERN_CAT2(a, b) a##b
#define OPTKERN_CAT(a, b) OPTKERN_CAT2(a, b)
#define OPTKERN_RULE_NS OPTKERN_CAT(rule_, OPTKERN_RULE_NAME)

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace OPTKERN_RULE_NS {
namespace {

#define OPTKERN_KERNEL_CONTEXT
#include OPTKERN_RULE_FILE
#undef OPTKERN_KERNEL_CONTEXT

// A rule file's kernel part defines
//   struct Kernel {
//     template <class T> static void step(const Scalars<Real<T>>&, Param<T>* p,
//                                         const Grad<T>* g, State<T>* const* state, size_t n);
//     // with KernelDecl::reduce_sums: the reduction pass over one block
//     template <class T> static void reduce(const Scalars<Real<T>>&, const Param<T>* p,
//                                           const Grad<T>* g, State<T>* const* state, size_t n,
//                                           double* sums);
//     // with KernelDecl::passes: pass `pass` over one tile
//     template <class T> static void pass(const Scalars<Real<T>>&, int pass,
//                                         const FactoredTile& tile);
//   };
// and these wrap them in the type-erased signatures of kernel_api.hpp.

template <class T>
void states_of(void* const* state, State<T>** out) {
  for (size_t k = 0; k < MAX_STATES; ++k) out[k] = static_cast<State<T>*>(state[k]);
}

template <class K, class T>
void step_entry(const void* s, void* p, const void* g, void* const* state, size_t n) {
  State<T>* st[MAX_STATES];
  states_of<T>(state, st);
  K::template step<T>(*static_cast<const Scalars<Real<T>>*>(s), static_cast<Param<T>*>(p),
                      static_cast<const Grad<T>*>(g), st, n);
}

template <class K, class T>
void reduce_entry(const void* s, const void* p, const void* g, void* const* state, size_t n,
                  double* sums) {
  State<T>* st[MAX_STATES];
  states_of<T>(state, st);
  K::template reduce<T>(*static_cast<const Scalars<Real<T>>*>(s), static_cast<const Param<T>*>(p),
                        static_cast<const Grad<T>*>(g), st, n, sums);
}

template <class K, class T>
void pass_entry(const void* s, int pass, const FactoredTile& tile) {
  K::template pass<T>(*static_cast<const Scalars<Real<T>>*>(s), pass, tile);
}

template <class K, class T>
constexpr KernelEntry entry() {
  KernelEntry e{
      {ElementType<Param<T>>::dtype, ElementType<Grad<T>>::dtype, ElementType<State<T>>::dtype},
      &step_entry<K, T>,
      nullptr,
      nullptr};
  if constexpr (kKernel.reduce_sums > 0) e.reduce = &reduce_entry<K, T>;
  if constexpr (kKernel.passes > 0) e.pass = &pass_entry<K, T>;
  return e;
}

template <class K, class... T>
struct Entries {
  static constexpr KernelEntry list[] = {entry<K, T>()...};
};
template <class K, class... T>
constexpr Entries<K, T...> entries_of(TypeList<T...>) {
  return {};
}

using RuleEntries = decltype(entries_of<Kernel>(Instantiated{}));

}  // namespace
}  // namespace OPTKERN_RULE_NS

// kernels_<rule>: this rule's entries on this ISA (kernels/table.cpp lists them).
extern const KernelSet OPTKERN_CAT(kernels_, OPTKERN_RULE_NAME) = {
    OPTKERN_RULE_NS::RuleEntries::list,
    sizeof(OPTKERN_RULE_NS::RuleEntries::list) / sizeof(KernelEntry)};

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern

#undef OPTKERN_RULE_NS
