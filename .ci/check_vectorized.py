#!/usr/bin/env python3
"""Every loop marked OK_SIMD in the kernels vectorises, on every x86 ISA build, for every element
type a kernel is compiled for.

A loop GCC cannot vectorise still computes the right numbers, so no test sees it, but it runs
one element per iteration: Lion's and Rprop's loops once did on the scalar (SSE2) and AVX2
builds (a comparison made conditionally, which GCC does not speculate since it may trap on a
NaN) and were 11-15x slower there than on AVX-512. This compiles each kernel unit as CMake does
for each ISA (the flags of CMakeLists.txt; GCC only) with -fopt-info-vec-missed: every rule file
of src/cpp/rules/list.inc through src/cpp/kernels/rule.cpp, and src/cpp/kernels/norms.cpp. It
fails naming every OK_SIMD loop (from its `for` to its closing brace, in the rule file or kernel
source that holds it) where GCC reports "couldn't vectorize loop" for any instantiation: GCC
reports each instantiation (every option variant, every combination of element types: float32,
float64, mixed gradients) at the loop's own location, so one that fails anywhere fails the loop.

    python .ci/check_vectorized.py              (CXX picks the compiler; default g++)
    python .ci/check_vectorized.py FILE...      (other copies: a rule file (.inc) or a kernel unit)
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
ISAS = {  # CMakeLists.txt: OPTKERN_ISA_FLAGS_<isa>
    "scalar": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"]
    + ["-mprefer-vector-width=512"],
}


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
    cxx = os.environ.get("CXX", "g++")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" not in version:
        sys.exit(f"{cxx} is not GCC: -fopt-info-vec-missed is GCC's (set CXX=g++)")
    sources = [pathlib.Path(a).resolve() for a in sys.argv[1:]]
    if not sources:
        sources = [*rule_files(), CPP / "kernels/norms.cpp", CPP / "kernels/algo_kernels.cpp"]
    missing = []
    checked = 0
    for source, unit in units(sources):
        loops = simd_loops(source)
        if not loops:
            sys.exit(f"{source} has no OK_SIMD loop: is it a kernel source?")
        for isa, flags in ISAS.items():
            failed = failed_lines(cxx, source, unit, isa, flags)
            for (first, last), text in loops.items():
                checked += 1
                if any(first <= line <= last for line in failed):
                    missing.append(f"{source}:{first} ({isa}): {text}")
    if missing:
        print("OK_SIMD loops GCC did not vectorise:\n  " + "\n  ".join(missing))
        return 1
    print(
        f"{checked} OK_SIMD loops x ISAs ({', '.join(ISAS)}) in {len(sources)} files all "
        "vectorised by",
        version.split("\n")[0],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
