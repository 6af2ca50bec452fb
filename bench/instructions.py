#!/usr/bin/env python3
"""Instructions per element of each kernel's main vector loop, read from the disassembly.

Hardware counters are not available on every machine (not in this VM, nor under valgrind for
AVX-512), but the main loop of a fused element-wise kernel is straight-line code: its length
divided by the elements one iteration handles is the count that matters for cache-resident
buffers. Also counted: divisions and square roots (the divider is the bottleneck when the data
fit in cache: one vdivps zmm and one vsqrtps zmm take about 10 + 12 cycles per 16 elements).

On aarch64 the same is read from NEON's and SVE's objects (aarch64-linux-gnu-objdump, from
Debian's binutils-aarch64-linux-gnu; $OBJDUMP_AARCH64 names another). An SVE loop handles one
vector of VL bits per iteration whatever VL is (vector-length agnostic), so its count is given per
vector, and per element at VL = 128 bits (Neoverse V2, Grace) and 256 bits (Graviton 3). The last
table puts every ISA side by side as instructions per vector of the ISA's width: per element
times the lanes of one vector (8 for AVX2, 16 for AVX-512, 4 for NEON, VL/32 for SVE), the
count to compare across vector widths.

Usage: python bench/instructions.py [BUILD_DIR...]   (CMake builds of this repo; default build/dev)

    mkdir -p build/dev && cd build/dev && cmake ../.. -G Ninja -DCMAKE_BUILD_TYPE=Release \\
        -Dpybind11_DIR=$(python -c "import pybind11;print(pybind11.get_cmake_dir())") && ninja

The aarch64 build is the one .ci/aarch64.sh cross-compiles (build/aarch64):

    python bench/instructions.py build/dev build/aarch64
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

# Each rule's loop is `<kernel>_impl<flags...>` in update_rules.cpp; a variant is named here by
# its kernel and the flags switched on (the template parameters' names, in order), so the list
# does not depend on how the compiler spells an instantiation. Every rule of the registry gets
# its plain variant (no weight decay, no options) without being listed.
FLAGS = {  # kernel -> its template parameters, in order
    "sgd": ("decay", "momentum", "nesterov", "init"),
    "rmsprop": ("decay", "centered", "momentum"),
    "adam": ("l2", "decoupled", "amsgrad"),
    "nadam": ("l2", "decoupled"),
    "radam": ("l2", "decoupled", "rectify"),
    "asgd": ("decay", "copy"),
    "rprop": (),  # not a template
    "sfadamw": ("adamw", "decay", "init"),
    "sfsgd": ("adamw", "decay", "init"),
}
# Kernels whose loop is another name's template: kernel -> (loop name, flags always on).
SHARED_LOOPS = {"sfadamw": ("schedule_free", ("adamw",)), "sfsgd": ("schedule_free", ())}
VARIANTS = {  # label -> (kernel, flags on)
    "SGD": ("sgd", ()),
    "SGD momentum / Momentum": ("sgd", ("momentum",)),
    "Nesterov": ("sgd", ("momentum", "nesterov")),
    "RMSprop": ("rmsprop", ()),
    "RMSprop centered+momentum": ("rmsprop", ("centered", "momentum")),
    "AdamW": ("adam", ("decoupled",)),
    "Adam amsgrad": ("adam", ("amsgrad",)),
}
OTHERS = {  # loops that are not update rules
    "norm (sum of squares)": "lane_sum<optkern::{isa}::(anonymous namespace)::sum_squares",
    "stream a += s*b": "axpy(",
}


def rule_variants() -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """VARIANTS plus the plain variant of every rule the installed optkern declares."""
    out = dict(VARIANTS)
    try:
        import optkern

        rules = optkern.registry.rules()
    except Exception:  # not installed: the listed variants only
        rules = []
    for r in rules:
        if not any(k == r.kernel and not on for k, on in out.values()):
            out[r.cls] = (r.kernel, ())
    return out


def find_variant(
    funcs: Dict[str, List[Tuple[int, str, str]]], kernel: str, on: Tuple[str, ...]
) -> Optional[List[Tuple[int, str, str]]]:
    names = FLAGS.get(kernel, ("decay",))
    loop, always = SHARED_LOOPS.get(kernel, (kernel, ()))
    want = [n in on or n in always for n in names]
    for f, code in funcs.items():
        m = re.search(rf"\b{loop}_impl(?:<([^>]*)>)?\(", f)
        flags = m.group(1).split(",") if m and m.group(1) else []
        if m and [a.strip() == "true" for a in flags] == want:
            return code
    return None


LANES = {"zmm": 16, "ymm": 8, "xmm": 4}
NEON_LANES = {".4s": 4, ".2s": 2}  # float32 lanes of a NEON arrangement
SVE = 0  # width() of an SVE loop: one vector of VL/32 float32 lanes
LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
EM_AARCH64 = 183  # ELF e_machine


def is_aarch64(obj: str) -> bool:
    with open(obj, "rb") as f:
        header = f.read(20)
    return int.from_bytes(header[18:20], "little") == EM_AARCH64


def functions(obj: str) -> Dict[str, List[Tuple[int, str, str]]]:
    objdump = os.environ.get("OBJDUMP_AARCH64", "aarch64-linux-gnu-objdump")
    objdump = objdump if is_aarch64(obj) else "objdump"
    text = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", obj], check=True, capture_output=True, text=True
    ).stdout
    out: Dict[str, List[Tuple[int, str, str]]] = {}
    current: Optional[str] = None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            current = head.group(1)
            out[current] = []
        elif current is not None:
            m = LINE.match(line)
            if m:
                args = m.group(3).split("//")[0].strip()  # aarch64 objdump's "// b.any" notes
                out[current].append((int(m.group(1), 16), m.group(2), args))
    return out


def conditional_branch(op: str) -> bool:
    """x86's jcc, aarch64's b.cond, cbz/cbnz and tbz/tbnz."""
    return (op.startswith("j") and op != "jmp") or op.startswith("b.") or op in AARCH64_CBRANCH


AARCH64_CBRANCH = ("cbz", "cbnz", "tbz", "tbnz")


def loops(code: List[Tuple[int, str, str]]) -> List[List[Tuple[int, str, str]]]:
    """Every innermost loop: a conditional backward branch and its body, holding no other."""
    index = {addr: i for i, (addr, _, _) in enumerate(code)}
    spans = []
    for i, (addr, op, args) in enumerate(code):
        target = re.search(r"(?:^|[ ,])([0-9a-f]+)(?:\s|$)", args)
        if conditional_branch(op) and target:
            t = int(target.group(1), 16)
            if t < addr and t in index:
                spans.append((index[t], i))
    return [
        code[a : b + 1]
        for a, b in spans
        if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)
    ]


def width(body: List[Tuple[int, str, str]]) -> int:
    """Lanes of the widest float vectors the loop computes with (1: scalar code; SVE: an SVE
    loop, whose lanes are VL/32)."""
    if any(re.search(r"\bz\d+\.s\b", a) for _, _, a in body):
        return SVE
    neon = [n for _, op, a in body if op.startswith("f") for k, n in NEON_LANES.items() if k in a]
    if neon:
        return max(neon)
    packed = any(op.endswith(("ps", "pd")) for _, op, _ in body)
    best = max((LANES[r] for _, _, a in body for r in LANES if f"%{r}" in a), default=1)
    return best if packed else 1


def rank(body: List[Tuple[int, str, str]]) -> Tuple[int, int]:
    w = width(body)
    return (1 << 20 if w == SVE else w, len(body))


def main_loop(code: List[Tuple[int, str, str]]) -> Optional[List[Tuple[int, str, str]]]:
    """The vector body: of the innermost loops, the longest among those with the widest vectors
    (the others are remainder loops)."""
    candidates = loops(code)
    return max(candidates, key=rank, default=None)


def elements_per_iteration(body: List[Tuple[int, str, str]]) -> int:
    """Elements one pass of the loop handles, from the growth of a register it addresses memory
    with: an index scaled by 4 (x(%rax,%rdx,4)) grows by elements, a base pointer ((%rax)) or an
    unscaled index by bytes. Counters used for nothing else are ignored."""
    text = " ".join(a for _, op, a in body if op != "lea")  # lea computes, it does not access
    scaled = set(re.findall(r",(%r\w+),4\)", text))
    bytewise = set(re.findall(r"\((%r\w+)[,)]", text)) | set(re.findall(r",(%r\w+),1\)", text))
    for _, op, args in body:
        m = (
            re.match(r"\$0x([0-9a-f]+),(%r\w+)$", args)
            if op in ("add", "sub")
            else re.match(r"0x([0-9a-f]+)\((%r\w+)\),(%r\w+)$", args)
            if op == "lea"
            else None
        )
        if not m or (op == "lea" and m.group(2) != m.group(3)):
            continue
        step, reg = int(m.group(1), 16), m.group(2)
        if op == "sub":  # sub $-128,%rax is add $128,%rax
            step = (1 << 64) - step if step >= 1 << 63 else -step
        if reg in scaled:
            return step
        if reg in bytewise and step % 4 == 0:
            return step // 4
    return width(body)


def aarch64_elements(body: List[Tuple[int, str, str]], code: List[Tuple[int, str, str]]) -> float:
    """Elements one pass of an aarch64 loop handles, from the growth of the register it indexes
    memory with: [x1, x0, lsl #2] indexes by elements, [x1, x0] or [x1], #16 by bytes. For SVE,
    in vectors: the index grows by cntw (or incw), one vector of VL/32 elements."""
    text = " ".join(a for _, _, a in body)
    scaled = set(re.findall(r"\[x\d+, (x\d+), lsl #2\]", text))
    bytewise = set(re.findall(r"\[x\d+, (x\d+)\]", text))
    bytewise |= set(re.findall(r"\[(x\d+)(?:, #-?\w+)?\](?:, #\w+)?", text))
    per_vector = {"cntb": 4.0, "cnth": 2.0, "cntw": 1.0, "cntd": 0.5}
    counts = {}  # register -> vectors, from cnt[bhwd] xN[, all, mul #k] in the function
    for _, op, args in code:
        m = re.match(r"(x\d+)(?:, all, mul #(\d+))?$", args)
        if op in per_vector and m:
            counts[m.group(1)] = per_vector[op] * int(m.group(2) or 1)
    for _, op, args in body:
        m = re.match(r"(x\d+)(?:, all, mul #(\d+))?$", args)
        if op.replace("inc", "cnt") in per_vector and m:  # incw x0: one vector
            return per_vector[op.replace("inc", "cnt")] * int(m.group(2) or 1)
        m = re.match(r"(x\d+), (x\d+), (#0x[0-9a-f]+|#\d+|x\d+)$", args)
        if op != "add" or not m or m.group(1) != m.group(2):
            continue
        reg, step = m.group(1), m.group(3)
        if step in counts:
            return counts[step]
        if not step.startswith("#"):
            continue
        step_value = int(step[1:], 0)
        if reg in scaled:
            return step_value
        if reg in bytewise and step_value % 4 == 0:
            return step_value // 4
    w = width(body)
    return 1 if w == SVE else w


def lanes_of(isa: str) -> int:
    return {"avx2": 8, "avx512": 16, "neon": 4, "sve": SVE}.get(isa, 4)


def objects(build_dir: str, isa: str) -> List[str]:
    """The object files of one ISA build (one or more translation units)."""
    pattern = os.path.join(build_dir, "**", f"optkern_kernels_{isa}*.dir", "**", "*.o")
    return sorted(glob.glob(pattern, recursive=True))


def report(build_dirs: List[str]) -> None:
    per_vector: Dict[str, Dict[str, float]] = {}  # rule -> isa -> instructions per vector
    for isa in ["scalar", "avx2", "avx512", "neon", "sve"]:
        objs = [o for d in build_dirs for o in objects(d, isa)]
        if not objs:
            continue
        funcs: Dict[str, List[Tuple[int, str, str]]] = {}
        for obj in objs:
            funcs.update(functions(obj))
        sve = isa == "sve"
        what = (
            "instructions per vector (per element at VL = 128 / 256 bits)"
            if sve
            else "instructions per element"
        )
        print(f"\n{isa}: {what} in the main loop (divisions, square roots)")
        found = {
            name: find_variant(funcs, kernel, on) for name, (kernel, on) in rule_variants().items()
        }
        found.update(
            {
                name: next((c for f, c in funcs.items() if symbol.format(isa=isa) in f), None)
                for name, symbol in OTHERS.items()
            }
        )
        for name, code in found.items():
            body = main_loop(code) if code else None
            if not body:
                print(f"  {name:<28} (not found)")
                continue
            aarch64 = isa in ("neon", "sve")
            n = aarch64_elements(body, code) if aarch64 else elements_per_iteration(body)
            div = sum(1 for _, o, _ in body if o.startswith(("vdiv", "div", "fdiv")))
            sqrt = sum(1 for _, o, _ in body if "sqrt" in o)
            if sve:
                vec = len(body) / n
                print(
                    f"  {name:<28} {vec:5.2f}  ({vec / 4:.2f} / {vec / 8:.2f}; {len(body)} "
                    f"instructions per {n:g} vectors; {div} div, {sqrt} sqrt)"
                )
            else:
                vec = len(body) / n * lanes_of(isa)
                print(
                    f"  {name:<28} {len(body) / n:5.2f}  ({len(body)} instructions per {n:g} "
                    f"elements; {div} div, {sqrt} sqrt)"
                )
            per_vector.setdefault(name, {})[isa] = vec
    compared = [
        i for i in ["avx2", "avx512", "neon", "sve"] if any(i in v for v in per_vector.values())
    ]
    if not compared:
        return
    print("\ninstructions per vector (per element x lanes: avx2 8, avx512 16, neon 4, sve VL/32)")
    print(f"  {'':<28} " + " ".join(f"{i:>13}" for i in compared))
    for name, by_isa in per_vector.items():
        base = by_isa.get("avx2")
        cells = []
        for i in compared:
            v = by_isa.get(i)
            if v is None:
                cells.append(f"{'-':>13}")
            elif base and i != "avx2":
                cells.append(f"{v:6.1f} ({v / base:4.2f}x)")
            else:
                cells.append(f"{v:13.1f}")
        print(f"  {name:<28} " + " ".join(cells))


if __name__ == "__main__":
    report(sys.argv[1:] or [os.path.join("build", "dev")])
