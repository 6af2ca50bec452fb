#include "dispatch.hpp"

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define OPTKERN_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#elif (defined(__aarch64__) || defined(_M_ARM64)) && defined(__linux__)
#define OPTKERN_AARCH64_LINUX 1
#include <sys/auxv.h>
#ifndef HWCAP_SVE
#define HWCAP_SVE (1UL << 22)  // Linux's bit for SVE in AT_HWCAP (asm/hwcap.h), for old headers
#endif
#endif

namespace optkern {
namespace {

struct CpuSupport {
  bool avx2 = false;    // AVX2 + FMA, with the OS saving YMM state
  bool avx512 = false;  // AVX-512 F/DQ/BW/VL on top of that, with the OS saving ZMM and mask state
  bool sve = false;     // aarch64: SVE, which the kernel reports only when it saves SVE state
};

#if defined(OPTKERN_X86)
void cpuid(unsigned leaf, unsigned subleaf, unsigned regs[4]) {
#if defined(_MSC_VER)
  int r[4];
  __cpuidex(r, static_cast<int>(leaf), static_cast<int>(subleaf));
  for (int i = 0; i < 4; ++i) regs[i] = static_cast<unsigned>(r[i]);
#else
  __cpuid_count(leaf, subleaf, regs[0], regs[1], regs[2], regs[3]);
#endif
}

std::uint64_t xgetbv0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  std::uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
#endif
}

CpuSupport detect_cpu() {
  CpuSupport s;
  unsigned r[4];
  cpuid(0, 0, r);
  const unsigned max_leaf = r[0];
  if (max_leaf < 7) return s;
  cpuid(1, 0, r);
  const bool fma = r[2] & (1u << 12), osxsave = r[2] & (1u << 27), avx = r[2] & (1u << 28);
  if (!(osxsave && avx)) return s;  // without OSXSAVE, xgetbv is not allowed
  const std::uint64_t xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;    // SSE and AVX state
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;  // plus opmask, ZMM_Hi256, Hi16_ZMM
  cpuid(7, 0, r);
  const unsigned ebx = r[1];
  const bool avx2 = ebx & (1u << 5);
  const bool f = ebx & (1u << 16), dq = ebx & (1u << 17), bw = ebx & (1u << 30),
             vl = ebx & (1u << 31);
  s.avx2 = os_ymm && avx2 && fma;
  s.avx512 = s.avx2 && os_zmm && f && dq && bw && vl;
  return s;
}
#elif defined(OPTKERN_AARCH64_LINUX)
CpuSupport detect_cpu() {
  CpuSupport s;
  s.sve = (getauxval(AT_HWCAP) & HWCAP_SVE) != 0;
  return s;
}
#else
// Other systems (macOS on Apple silicon, Windows): the baseline only. Apple's CPUs have no SVE.
CpuSupport detect_cpu() { return {}; }
#endif

struct IsaBuild {
  const char* name;
  const KernelTable* (*table)();  // nullptr when not compiled into this binary
  const char* flags;
  bool (*supported)(const CpuSupport&);
};

// Every ISA build optkern knows, of every architecture (src/cpp/isa_builds.txt), from the baseline
// up; a binary holds the builds of one architecture (OPTKERN_HAVE_<ISA> from CMake), so the last
// runnable one is the default. The baseline of x86-64 and of other architectures is "scalar",
// that of aarch64 is "neon": whatever a binary holds of it runs on every CPU it loads on.
#define OPTKERN_NOT_BUILT(name, check) {name, nullptr, "", check}
#if defined(OPTKERN_HAVE_SCALAR)
#define OPTKERN_BUILD_SCALAR(check) {"scalar", scalar::kernel_table, OPTKERN_FLAGS_SCALAR, check}
#else
#define OPTKERN_BUILD_SCALAR(check) OPTKERN_NOT_BUILT("scalar", check)
#endif
#if defined(OPTKERN_HAVE_AVX2)
#define OPTKERN_BUILD_AVX2(check) {"avx2", avx2::kernel_table, OPTKERN_FLAGS_AVX2, check}
#else
#define OPTKERN_BUILD_AVX2(check) OPTKERN_NOT_BUILT("avx2", check)
#endif
#if defined(OPTKERN_HAVE_AVX512)
#define OPTKERN_BUILD_AVX512(check) {"avx512", avx512::kernel_table, OPTKERN_FLAGS_AVX512, check}
#else
#define OPTKERN_BUILD_AVX512(check) OPTKERN_NOT_BUILT("avx512", check)
#endif
#if defined(OPTKERN_HAVE_NEON)
#define OPTKERN_BUILD_NEON(check) {"neon", neon::kernel_table, OPTKERN_FLAGS_NEON, check}
#else
#define OPTKERN_BUILD_NEON(check) OPTKERN_NOT_BUILT("neon", check)
#endif
#if defined(OPTKERN_HAVE_SVE)
#define OPTKERN_BUILD_SVE(check) {"sve", sve::kernel_table, OPTKERN_FLAGS_SVE, check}
#else
#define OPTKERN_BUILD_SVE(check) OPTKERN_NOT_BUILT("sve", check)
#endif

const IsaBuild kBuilds[] = {
    OPTKERN_BUILD_SCALAR([](const CpuSupport&) { return true; }),
    OPTKERN_BUILD_AVX2([](const CpuSupport& c) { return c.avx2; }),
    OPTKERN_BUILD_AVX512([](const CpuSupport& c) { return c.avx512; }),
    OPTKERN_BUILD_NEON([](const CpuSupport&) { return true; }),
    OPTKERN_BUILD_SVE([](const CpuSupport& c) { return c.sve; }),
};

// Set once by init_dispatch(), at import, under the GIL; read-only afterwards.
const IsaBuild* g_active = nullptr;
const KernelTable* g_table = nullptr;

bool runnable(const IsaBuild& b, const CpuSupport& cpu) {
  return b.table != nullptr && b.supported(cpu);
}

std::string joined_available(const CpuSupport& cpu) {
  std::string out;
  for (const IsaBuild& b : kBuilds) {
    if (!runnable(b, cpu)) continue;
    if (!out.empty()) out += ", ";
    out += b.name;
  }
  return out;
}

std::string known_names() {
  std::string out;
  for (const IsaBuild& b : kBuilds) {
    if (!out.empty()) out += ", ";
    out += b.name;
  }
  return out;
}

}  // namespace

void init_dispatch() {
  const CpuSupport cpu = detect_cpu();
  const char* forced = std::getenv("OPTKERN_FORCE_ISA");
  std::string want;
  if (forced != nullptr) {
    for (const char* c = forced; *c; ++c) {
      if (!std::isspace(static_cast<unsigned char>(*c))) {
        want += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
      }
    }
  }
  if (want.empty()) {
    for (const IsaBuild& b : kBuilds) {
      if (runnable(b, cpu)) g_active = &b;
    }
    g_table = g_active->table();
    return;
  }
  for (const IsaBuild& b : kBuilds) {
    if (want != b.name) continue;
    if (b.table == nullptr) {
      throw std::runtime_error("OPTKERN_FORCE_ISA='" + std::string(forced) +
                               "': this build of optkern has no " + b.name +
                               " kernels (it has: " + joined_available(cpu) + ")");
    }
    if (!b.supported(cpu)) {
      throw std::runtime_error(
          "OPTKERN_FORCE_ISA='" + std::string(forced) + "': " + b.name +
          " is not supported by this CPU and OS (available: " + joined_available(cpu) + ")");
    }
    g_active = &b;
    g_table = b.table();
    return;
  }
  throw std::runtime_error("OPTKERN_FORCE_ISA='" + std::string(forced) +
                           "' is not an ISA optkern knows; expected one of " + known_names() +
                           " (available here: " + joined_available(cpu) + ")");
}

const KernelTable& kernels() { return *g_table; }

const KernelTable* kernels_for(const std::string& isa) {
  const CpuSupport cpu = detect_cpu();
  for (const IsaBuild& b : kBuilds) {
    if (isa == b.name) return runnable(b, cpu) ? b.table() : nullptr;
  }
  return nullptr;
}

const char* active_isa() { return g_active->name; }

std::vector<std::string> available_isas() {
  const CpuSupport cpu = detect_cpu();
  std::vector<std::string> out;
  for (const IsaBuild& b : kBuilds) {
    if (runnable(b, cpu)) out.emplace_back(b.name);
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> isa_build_flags() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const IsaBuild& b : kBuilds) {
    if (b.table != nullptr) out.emplace_back(b.name, b.flags);
  }
  return out;
}

}  // namespace optkern
