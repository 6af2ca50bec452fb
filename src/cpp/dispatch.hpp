// Runtime ISA dispatch: which builds of the kernels exist, which this CPU and OS can run, and the
// one table of kernel entry points every call goes through.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "kernel_api.hpp"

namespace optkern {

// Picks the ISA once, at import: the best one the CPU and the OS support, or the one named by
// OPTKERN_FORCE_ISA. Throws std::runtime_error naming the value when that ISA is unknown, not
// built into this binary, or not supported here.
void init_dispatch();

// The active kernel table (init_dispatch() has run).
const KernelTable& kernels();

// The kernel table of the named ISA build, or nullptr when this binary or this machine lacks it
// (tests run every ISA's kernels in one process through it).
const KernelTable* kernels_for(const std::string& isa);

// Name of the active ISA: "scalar", "avx2" or "avx512" on x86-64, "neon" or "sve" on aarch64.
const char* active_isa();

// The ISAs this binary holds that this machine can run, from the baseline up.
std::vector<std::string> available_isas();

// (isa, compiler flags) for every ISA compiled into this binary.
std::vector<std::pair<std::string, std::string>> isa_build_flags();

}  // namespace optkern
