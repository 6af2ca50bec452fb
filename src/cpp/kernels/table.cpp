// One ISA build's table of entry points: every rule file's kernel (kernels/rule.cpp, one unit
// per rule) and the norm kernels (kernels/norms.cpp), compiled once per ISA like them. All of it
// is constant-initialised data: no static initialiser runs at load time.
#include "kernels/kernel.hpp"

namespace optkern {
namespace OPTKERN_ISA_NS {

#define OPTKERN_RULE(name) extern const KernelSet kernels_##name;
#include "rules/list.inc"
#undef OPTKERN_RULE
extern const NormKernels norm_kernels[DTYPE_COUNT];
void axpy(float* a, const float* b, float s, size_t n);

namespace {

constexpr KernelTable kTable = {
    {
#define OPTKERN_RULE(name) &kernels_##name,
#include "rules/list.inc"
#undef OPTKERN_RULE
    },
    norm_kernels,
    &axpy,
};

}  // namespace

const KernelTable* kernel_table() { return &kTable; }

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
