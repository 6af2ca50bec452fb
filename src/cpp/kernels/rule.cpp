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

// A streaming call (Operands::streaming) runs in pieces of STREAMING_PIECE_BYTES of the
// parameter, each first asking for the piece STREAMING_AHEAD_PIECES later (4 KB ahead in the
// parameter) in every operand: the hardware prefetcher alone keeps too few lines in flight while
// a rule with a division and a square root per element computes. A staged entry asks for the
// block STAGED_AHEAD_BLOCKS later (1024 elements). Measured on the 2-core Xeon of
// bench/results/2026-12-07-xeon-avx512-2core-streaming.md.
constexpr size_t STREAMING_PIECE_BYTES = 512;
constexpr size_t STREAMING_AHEAD_PIECES = 8;
constexpr size_t STAGED_AHEAD_BLOCKS = 4;

template <class T>
void states_at(State<T>* const* st, size_t b, State<T>** out) {
  for (size_t k = 0; k < MAX_STATES; ++k) out[k] = st[k] == nullptr ? nullptr : st[k] + b;
}

template <class K, class T>
void step_entry(const void* s, const Operands& op, size_t n) {
  const auto& scalars = *static_cast<const Scalars<Real<T>>*>(s);
  auto* p = static_cast<Param<T>*>(op.param);
  const auto* g = static_cast<const Grad<T>*>(op.grad);
  State<T>* st[MAX_STATES];
  states_of<T>(op.state, st);
  constexpr size_t piece = STREAMING_PIECE_BYTES / sizeof(Param<T>);
  constexpr size_t ahead = STREAMING_AHEAD_PIECES * piece;
  if (!op.streaming || n < 2 * ahead) {
    K::template step<T>(scalars, p, g, st, n);
    return;
  }
  State<T>* at[MAX_STATES];
  size_t i = 0;
  for (; i + ahead + piece <= n; i += piece) {
    prefetch_lines(p + i + ahead, piece);
    prefetch_lines(g + i + ahead, piece);
    for (size_t k = 0; k < MAX_STATES; ++k) {
      if (st[k] != nullptr) prefetch_lines(st[k] + i + ahead, piece);
    }
    states_at<T>(st, i, at);
    K::template step<T>(scalars, p + i, g + i, at, piece);
  }
  states_at<T>(st, i, at);
  K::template step<T>(scalars, p + i, g + i, at, n - i);
}

template <class K, class T>
void reduce_entry(const void* s, const Operands& op, size_t n, double* sums) {
  State<T>* st[MAX_STATES];
  states_of<T>(op.state, st);
  K::template reduce<T>(*static_cast<const Scalars<Real<T>>*>(s),
                        static_cast<const Param<T>*>(op.param),
                        static_cast<const Grad<T>*>(op.grad), st, n, sums);
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

// The staged entry (KernelSet::staged): the float32 loop, one block of Q8_BLOCK elements at a
// time, its operands widened into float32 on the stack and narrowed back (kernels/staging.cpp).
// The rule's loops are not compiled again for the 16-bit and 8-bit types.
using Staged = Types<float, float, float>;

template <class K>
void staged_step(const void* s, const Operands& op, size_t n) {
  const auto& scalars = *static_cast<const Scalars<float>*>(s);
  Stage buf;
  for (size_t b = 0; b < n; b += Q8_BLOCK) {
    const size_t len = n - b < Q8_BLOCK ? n - b : Q8_BLOCK;
    const size_t ahead = b + STAGED_AHEAD_BLOCKS * Q8_BLOCK;
    if (op.streaming && ahead + Q8_BLOCK <= n) prefetch_block(op, ahead);
    const StagedBlock block = stage_in(op, b, len, buf, kKernel.nonnegative_states);
    float* st[MAX_STATES];
    for (size_t k = 0; k < MAX_STATES; ++k) st[k] = block.state[k];
    K::template step<Staged>(scalars, block.param, block.grad, st, len);
    stage_out(op, b, len, block, kKernel.nonnegative_states, true, !kKernel.step_keeps_states);
  }
}

template <class K>
void staged_reduce(const void* s, const Operands& op, size_t n, double* sums) {
  const auto& scalars = *static_cast<const Scalars<float>*>(s);
  Stage buf;
  for (size_t r = 0; r < kKernel.reduce_sums; ++r) sums[r] = 0.0;
  for (size_t b = 0; b < n; b += Q8_BLOCK) {
    const size_t len = n - b < Q8_BLOCK ? n - b : Q8_BLOCK;
    const StagedBlock block = stage_in(op, b, len, buf, kKernel.nonnegative_states);
    float* st[MAX_STATES];
    for (size_t k = 0; k < MAX_STATES; ++k) st[k] = block.state[k];
    double part[kKernel.reduce_sums > 0 ? kKernel.reduce_sums : 1];
    K::template reduce<Staged>(scalars, block.param, block.grad, st, len, part);
    for (size_t r = 0; r < kKernel.reduce_sums; ++r) sums[r] += part[r];  // block order: fixed
    stage_out(op, b, len, block, kKernel.nonnegative_states, false, true);
  }
}

template <class K>
constexpr KernelEntry staged_entry() {
  KernelEntry e{{DType::f32, DType::f32, DType::f32}, &staged_step<K>, nullptr, nullptr};
  if constexpr (kKernel.reduce_sums > 0) e.reduce = &staged_reduce<K>;
  return e;
}

// A factored kernel (its passes see tiles, not blocks) has no staged entry.
template <class K>
constexpr KernelEntry make_staged() {
  if constexpr (kKernel.passes > 0) {
    return KernelEntry{};
  } else {
    return staged_entry<K>();
  }
}
constexpr KernelEntry kStaged[] = {make_staged<Kernel>()};

}  // namespace
}  // namespace OPTKERN_RULE_NS

// kernels_<rule>: this rule's entries on this ISA (kernels/table.cpp lists them).
extern const KernelSet OPTKERN_CAT(kernels_, OPTKERN_RULE_NAME) = {
    OPTKERN_RULE_NS::RuleEntries::list,
    sizeof(OPTKERN_RULE_NS::RuleEntries::list) / sizeof(KernelEntry),
    OPTKERN_RULE_NS::kKernel.passes > 0 ? nullptr : OPTKERN_RULE_NS::kStaged};

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern

#undef OPTKERN_RULE_NS
