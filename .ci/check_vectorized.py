#!/usr/bin/env python3
"""Every loop marked OK_SIMD in the kernels vectorises, on every ISA build of an architecture.

A loop GCC cannot vectorise still computes the right numbers, so no test sees it, but it runs
one element per iteration: Lion's and Rprop's loops once did on the scalar (SSE2) and AVX2
builds (a comparison made conditionally, which GCC does not speculate since it may trap on a
NaN) and were 11-15x slower there than on AVX-512. This compiles each kernel source as CMake
does for each ISA (the flags of CMakeLists.txt; GCC only) with -fopt-info-vec-missed, and fails
naming every OK_SIMD loop (from its `for` to its closing brace) where GCC reports "couldn't
vectorize loop" for any instantiation. (GCC merges its reports by source location, so a
"vectorized" report at a loop does not say that every instantiation of it was.) The ISA builds
and their flags are src/cpp/isa_builds.txt's, as CMake reads them.

    python .ci/check_vectorized.py [--arch x86_64|aarch64] [SOURCES...]

x86_64 (the default) compiles with $CXX (default g++); aarch64 with $CXX_AARCH64 (default
aarch64-linux-gnu-g++, Debian's g++-aarch64-linux-gnu).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMON = ["-O3", "-DNDEBUG", "-std=c++17", "-fPIC", "-fno-math-errno", "-ffp-contract=off"]
COMMON += ["-fopenmp-simd", f"-I{ROOT / 'src/cpp'}"]
COMPILERS = {"x86_64": ("CXX", "g++"), "aarch64": ("CXX_AARCH64", "aarch64-linux-gnu-g++")}


def isa_builds(arch: str) -> dict[str, list[str]]:
    """isa -> GCC flags of each build of `arch` in src/cpp/isa_builds.txt, baseline first."""
    out = {}
    for line in (ROOT / "src/cpp/isa_builds.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        line_arch, isa, gcc_flags, _msvc = (f.strip() for f in line.split("|"))
        if line_arch == arch and gcc_flags != "n/a":
            out[isa] = [] if gcc_flags == "-" else gcc_flags.split()
    return out


def simd_loops(source: pathlib.Path) -> dict[tuple[int, int], str]:
    """(first line, last line) -> text of each `for` statement that follows an OK_SIMD, the last
    line being that of its closing brace (the `for` line itself for a one-line loop)."""
    lines = source.read_text().splitlines()
    out = {}
    for i, line in enumerate(lines):
        if line.strip() != "OK_SIMD":
            continue
        j = i + 1
        while not lines[j].lstrip().startswith("for"):
            j += 1
        depth, k = 0, j
        for k in range(j, len(lines)):
            depth += lines[k].count("{") - lines[k].count("}")
            if depth <= 0:
                break
        out[(j + 1, k + 1)] = lines[j].strip()
    return out


def failed_lines(cxx: str, source: pathlib.Path, isa: str, flags: list[str]) -> set[int]:
    """Lines where GCC reports a loop it could not vectorise."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [cxx, f"-DOPTKERN_ISA_NS={isa}", *COMMON, *flags, "-c", str(source)]
        cmd += ["-o", os.path.join(tmp, "k.o"), "-fopt-info-vec-missed"]
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr}")
    pattern = re.compile(rf"{re.escape(source.name)}:(\d+):\d+: missed: couldn't vectorize loop")
    return {int(m.group(1)) for m in pattern.finditer(run.stderr)}


def main() -> int:
    args = sys.argv[1:]
    arch = "x86_64"
    if args[:1] == ["--arch"]:
        arch, args = args[1], args[2:]
    if arch not in COMPILERS:
        sys.exit(f"--arch {arch}: expected one of {', '.join(COMPILERS)}")
    # other copies of the sources (to check that the check fails on old code)
    sources = [pathlib.Path(a).resolve() for a in args]
    sources = sources or sorted((ROOT / "src/cpp/kernels").glob("*.cpp"))
    isas = isa_builds(arch)
    variable, default = COMPILERS[arch]
    cxx = os.environ.get(variable, default)
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        sys.exit(f"{cxx} not found (set {variable})")
    if "Free Software Foundation" not in version:
        sys.exit(f"{cxx} is not GCC: -fopt-info-vec-missed is GCC's (set {variable})")
    missing = []
    checked = 0
    for source in sources:
        loops = simd_loops(source)
        for isa, flags in isas.items():
            failed = failed_lines(cxx, source, isa, flags)
            for (first, last), text in loops.items():
                checked += 1
                if any(first <= line <= last for line in failed):
                    missing.append(f"{source}:{first} ({isa}): {text}")
    if missing:
        print("OK_SIMD loops GCC did not vectorise:\n  " + "\n  ".join(missing))
        return 1
    print(
        f"{checked} OK_SIMD loops x ISAs ({', '.join(isas)}) all vectorised by",
        version.split("\n")[0],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
