#!/usr/bin/env python3
"""Every loop marked OK_SIMD in the kernels vectorises, on every ISA build of an architecture, for
every element type a kernel is compiled for.

A loop GCC cannot vectorise still computes the right numbers, so no test sees it, but it runs
one element per iteration: Lion's and Rprop's loops once did on the scalar (SSE2) and AVX2
builds (a comparison made conditionally, which GCC does not speculate since it may trap on a
NaN) and were 11-15x slower there than on AVX-512. This compiles each kernel unit as CMake does
for each ISA build of one architecture (GCC only) with -fopt-info-vec-missed: every rule file
of src/cpp/rules/list.inc through src/cpp/kernels/rule.cpp, src/cpp/kernels/norms.cpp and
src/cpp/kernels/staging.cpp (the 16-bit and int8 conversions of the staged entries). It
fails naming every OK_SIMD loop (from its `for` to its closing brace, in the rule file or kernel
source that holds it) where GCC reports "couldn't vectorize loop" for any instantiation: GCC
reports each instantiation (every option variant, every combination of element types: float32,
float64, mixed gradients) at the loop's own location, so one that fails anywhere fails the loop.
The ISA builds and their flags are src/cpp/isa_builds.txt's, as CMake reads them.

    python .ci/check_vectorized.py [--arch x86_64|aarch64] [FILE...]

x86_64 (the default) compiles with $CXX (default g++); aarch64 with $CXX_AARCH64 (default
aarch64-linux-gnu-g++, Debian's g++-aarch64-linux-gnu). FILE...: other copies of the sources (a
rule file (.inc) or a kernel unit), to check that the check fails on old code.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
CPP = ROOT / "src/cpp"
COMMON = ["-O3", "-DNDEBUG", "-std=c++20", "-fPIC", "-fno-math-errno", "-ffp-contract=off"]
COMMON += ["-fopenmp-simd", f"-I{CPP}"]
COMPILERS = {"x86_64": ("CXX", "g++"), "aarch64": ("CXX_AARCH64", "aarch64-linux-gnu-g++")}


def isa_builds(arch: str) -> dict[str, list[str]]:
    """isa -> GCC flags of each build of `arch` in src/cpp/isa_builds.txt, baseline first."""
    out = {}
    for line in (CPP / "isa_builds.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        line_arch, isa, gcc_flags, _msvc = (f.strip() for f in line.split("|"))
        if line_arch == arch and gcc_flags != "n/a":
            out[isa] = [] if gcc_flags == "-" else gcc_flags.split()
            if isa in GCC_ONLY_FLAGS:
                out[isa] += GCC_ONLY_FLAGS[isa]
    return out


# Flags CMakeLists.txt adds for GCC alone (Clang refuses them): the gathers of the staged loops.
GCC_ONLY_FLAGS = {"avx2": ["-mtune-ctrl=use_gather"], "avx512": ["-mtune-ctrl=use_gather"]}


def rule_files() -> list[pathlib.Path]:
    """Every rule file, in the order of src/cpp/rules/list.inc (as CMakeLists.txt reads it)."""
    text = (CPP / "rules/list.inc").read_text()
    return [CPP / f"rules/{name}.inc" for name in re.findall(r"^OPTKERN_RULE\((\w+)\)", text, re.M)]


def units(paths: list[pathlib.Path]) -> list[tuple[pathlib.Path, list[str]]]:
    """(file whose OK_SIMD loops are checked, compiler arguments of the unit that compiles it)."""
    out = []
    for path in paths:
        if path.suffix == ".inc":  # a rule file: compiled through kernels/rule.cpp
            args = [f"-DOPTKERN_RULE_NAME={path.stem}", f'-DOPTKERN_RULE_FILE="{path}"']
            out.append((path, [*args, str(CPP / "kernels/rule.cpp")]))
        else:
            out.append((path, [str(path)]))
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


def failed_lines(cxx: str, source: pathlib.Path, unit: list[str], isa: str, flags: list[str]):
    """Lines of `source` where GCC reports a loop it could not vectorise."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [cxx, f"-DOPTKERN_ISA_NS={isa}", *COMMON, *flags, "-c", *unit]
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
        if len(args) < 2:
            sys.exit(f"--arch: expected one of {', '.join(COMPILERS)}")
        arch, args = args[1], args[2:]
    if arch not in COMPILERS:
        sys.exit(f"--arch {arch}: expected one of {', '.join(COMPILERS)}")
    isas = isa_builds(arch)
    variable, default = COMPILERS[arch]
    cxx = os.environ.get(variable, default)
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        sys.exit(f"{cxx} not found (set {variable})")
    if "Free Software Foundation" not in version:
        sys.exit(f"{cxx} is not GCC: -fopt-info-vec-missed is GCC's (set {variable})")
    sources = [pathlib.Path(a).resolve() for a in args]
    if not sources:
        sources = [
            *rule_files(),
            CPP / "kernels/norms.cpp",
            CPP / "kernels/staging.cpp",
            CPP / "kernels/algo_kernels.cpp",
        ]
    missing = []
    checked = 0
    for source, unit in units(sources):
        loops = simd_loops(source)
        if not loops:
            sys.exit(f"{source} has no OK_SIMD loop: is it a kernel source?")
        for isa, flags in isas.items():
            failed = failed_lines(cxx, source, unit, isa, flags)
            for (first, last), text in loops.items():
                checked += 1
                if any(first <= line <= last for line in failed):
                    missing.append(f"{source}:{first} ({isa}): {text}")
    if missing:
        print("OK_SIMD loops GCC did not vectorise:\n  " + "\n  ".join(missing))
        return 1
    print(
        f"{checked} OK_SIMD loops x ISAs ({', '.join(isas)}) in {len(sources)} files all "
        "vectorised by",
        version.split("\n")[0],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
