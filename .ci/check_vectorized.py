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

On x86_64 it also disassembles staging.cpp's AVX2 and AVX-512 objects and fails unless each
table lookup of the int8 state (GATHER_LOOPS) is a gather: GCC reports a lookup it cannot gather
as vectorised, built from scalar loads, several times slower.

    python .ci/check_vectorized.py [--arch x86_64|aarch64] [FILE...]
    python .ci/check_vectorized.py --reports DIR

--reports DIR reads the reports a build configured with -DOPTKERN_VECTORIZE_REPORT=DIR wrote
(GCC's -fopt-info-vec-missed of each kernel unit, as CMake compiled it for each ISA build)
instead of compiling: CI checks the wheels it builds that way, at the cost of writing the reports
(about a sixth of the kernels' compile time) rather than of a second compile. The architecture is
the build's; a report missing for any rule file, kernel unit or ISA build of it fails the check.

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
    """isa -> GCC flags of each build of `arch` in src/cpp/isa_builds.txt, baseline first: the
    flags GCC and Clang share, then those for GCC alone, as CMakeLists.txt passes them to GCC."""
    out = {}
    for line in (CPP / "isa_builds.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        line_arch, isa, flags, gcc_flags, _msvc = (f.strip() for f in line.split("|"))
        if line_arch == arch and flags != "n/a":
            out[isa] = [f for f in (*flags.split(), *gcc_flags.split()) if f != "-"]
    return out


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


def missed_lines(source: pathlib.Path, report: str) -> set[int]:
    """Lines of `source` where GCC's report says a loop could not be vectorised."""
    pattern = re.compile(rf"{re.escape(source.name)}:(\d+):\d+: missed: couldn't vectorize loop")
    return {int(m.group(1)) for m in pattern.finditer(report)}


def failed_lines(cxx: str, source: pathlib.Path, unit: list[str], isa: str, flags: list[str]):
    """Lines of `source` where GCC reports a loop it could not vectorise (compiling the unit)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [cxx, f"-DOPTKERN_ISA_NS={isa}", *COMMON, *flags, "-c", *unit]
        cmd += ["-o", os.path.join(tmp, "k.o"), "-fopt-info-vec-missed"]
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return missed_lines(source, run.stderr)


# The staged entries' table lookups (kernels/staging.cpp), which must be gathers on the x86 ISA
# builds that have them: GCC "vectorises" a lookup it cannot gather by building each vector from
# scalar loads, which no -fopt-info report calls a failure, and which made the int8 state's
# dequantisation 40% of an Adam step on AVX-512.
GATHER_LOOPS = ("dequantize_loop", "quantize_signed", "quantize_unsigned")
GATHER_ISAS = ("avx2", "avx512")


def lookups_without_gather(cxx: str, source: pathlib.Path, isa: str, flags: list[str]) -> list:
    """The functions of GATHER_LOOPS in `source`'s object for `isa` with no gather instruction."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "k.o")
        cmd = [cxx, f"-DOPTKERN_ISA_NS={isa}", *COMMON, *flags, "-c", str(source), "-o", obj]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr}")
        dump = subprocess.run(["objdump", "-d", "-C", obj], capture_output=True, text=True).stdout
    missing, found = [], set()
    for block in dump.split("\n\n"):
        head = block.strip().split("\n", 1)[0]
        name = next((n for n in GATHER_LOOPS if f"::{n}" in head), None)
        if name is None:
            continue
        found.add(name)
        if "gather" not in block:
            missing.append(head.split("<", 1)[-1].rstrip(">:") + " has no gather (scalar loads)")
    # a renamed or inlined function would otherwise pass unchecked
    missing += [f"{n}: no such function in the object" for n in GATHER_LOOPS if n not in found]
    return missing


def build_reports(directory: pathlib.Path):
    """(arch, compiler, isas, failed(source, isa)) of a build's reports (CMake's
    OPTKERN_VECTORIZE_REPORT): failed reads the report of that kernel unit and ISA build."""
    info_file = directory / "build.txt"
    if not info_file.is_file():
        sys.exit(
            f"{info_file} missing: configure the build with -DOPTKERN_VECTORIZE_REPORT={directory}"
        )
    info = dict(line.split(": ", 1) for line in info_file.read_text().splitlines() if ": " in line)
    arch, isas = info["arch"], info["isas"].split(";")
    if arch not in COMPILERS:
        sys.exit(f"{info_file}: architecture {arch}: expected one of {', '.join(COMPILERS)}")
    if isas != list(isa_builds(arch)):
        sys.exit(
            f"{info_file}: ISA builds {isas}, src/cpp/isa_builds.txt has {list(isa_builds(arch))}"
        )

    def failed(source: pathlib.Path, isa: str) -> set[int]:
        kind = "rules" if source.suffix == ".inc" else "kernels"
        report = directory / isa / kind / f"{source.stem}.txt"
        if not report.is_file():
            sys.exit(f"{report} missing: was {source.name} compiled for {isa} by that build?")
        return missed_lines(source, report.read_text())

    return arch, f"{info['compiler']} (the build's reports in {directory})", isas, failed


def compiler(arch: str):
    """(compiler, failed(source, isa)) compiling each unit with $CXX or $CXX_AARCH64."""
    variable, default = COMPILERS[arch]
    cxx = os.environ.get(variable, default)
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        sys.exit(f"{cxx} not found (set {variable})")
    if "Free Software Foundation" not in version:
        sys.exit(f"{cxx} is not GCC: -fopt-info-vec-missed is GCC's (set {variable})")
    isas = isa_builds(arch)
    unit_of = dict(units([*rule_files(), *KERNEL_UNITS]))

    def failed(source: pathlib.Path, isa: str) -> set[int]:
        unit = unit_of.get(source) or dict(units([source]))[source]
        return failed_lines(cxx, source, unit, isa, isas[isa])

    return version.split("\n")[0], failed


KERNEL_UNITS = [
    CPP / "kernels/norms.cpp",
    CPP / "kernels/staging.cpp",
    CPP / "kernels/algo_kernels.cpp",
]


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--reports"]:
        if len(args) != 2:
            sys.exit("--reports DIR: one directory, no other argument")
        arch, version, isas, failed = build_reports(pathlib.Path(args[1]).resolve())
        args = []
    else:
        arch = "x86_64"
        if args[:1] == ["--arch"]:
            if len(args) < 2:
                sys.exit(f"--arch: expected one of {', '.join(COMPILERS)}")
            arch, args = args[1], args[2:]
        if arch not in COMPILERS:
            sys.exit(f"--arch {arch}: expected one of {', '.join(COMPILERS)}")
        isas = list(isa_builds(arch))
        version, failed = compiler(arch)
    sources = [pathlib.Path(a).resolve() for a in args]
    if not sources:
        sources = [*rule_files(), *KERNEL_UNITS]
    missing = []
    checked = 0
    for source in sources:
        loops = simd_loops(source)
        if not loops:
            sys.exit(f"{source} has no OK_SIMD loop: is it a kernel source?")
        for isa in isas:
            failed_here = failed(source, isa)
            for (first, last), text in loops.items():
                checked += 1
                if any(first <= line <= last for line in failed_here):
                    missing.append(f"{source}:{first} ({isa}): {text}")
    if arch == "x86_64":
        # compiled here in both modes: a report says nothing of the instructions chosen
        cxx = os.environ.get(*COMPILERS["x86_64"])
        flags = isa_builds("x86_64")
        for source in sources:
            if source.name != "staging.cpp":
                continue
            for isa in GATHER_ISAS:
                for what in lookups_without_gather(cxx, source, isa, flags[isa]):
                    missing.append(f"{source} ({isa}): {what}")
    if missing:
        print("OK_SIMD loops GCC did not vectorise:\n  " + "\n  ".join(missing))
        return 1
    print(
        f"{checked} OK_SIMD loops x ISAs ({', '.join(isas)}) in {len(sources)} files all "
        "vectorised by",
        version,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
