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
times the lanes of one vector (float32: 8 for AVX2, 16 for AVX-512, 4 for NEON, VL/32 for SVE),
the count to compare across vector widths.

Usage: python bench/instructions.py [BUILD_DIR...] [--dtype float32|float64]
       (CMake builds of this repo; default build/dev; the float32 kernels by default)

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

# Each rule's loop is `<kernel>_impl<Types<P, G, S>, flags...>` in its src/cpp/rules/<kernel>.inc;
# a variant is named here by its kernel and the flags switched on (the template parameters' names,
# in order, after the element types), so the list does not depend on how the compiler spells an
# instantiation. Every rule of the registry gets its plain variant (no weight decay, no options)
# without being listed.
FLAGS = {  # kernel -> its template parameters after the element types, in order
    "sgd": ("decay", "momentum", "nesterov", "init"),
    "rmsprop": ("decay", "centered", "momentum"),
    "adam": ("l2", "decoupled", "amsgrad"),
    "nadam": ("l2", "decoupled"),
    "radam": ("l2", "decoupled", "rectify"),
    "asgd": ("decay", "copy"),
    "rprop": (),
    "schedule_free": ("second_moment", "decay", "init"),
    "adafactor": ("factored", "decay"),
}
# Kernels whose element-wise loop has another name than <kernel>_impl.
LOOP_NAMES = {"adafactor": "adafactor_apply"}
# Flags a rule's class always has on (its kernel's plain variant would be another rule's).
RULE_FLAGS = {"ScheduleFreeAdamW": ("second_moment",)}
VARIANTS = {  # label -> (kernel, flags on)
    "SGD": ("sgd", ()),
    "SGD momentum / Momentum": ("sgd", ("momentum",)),
    "Nesterov": ("sgd", ("momentum", "nesterov")),
    "RMSprop": ("rmsprop", ()),
    "RMSprop centered+momentum": ("rmsprop", ("centered", "momentum")),
    "AdamW": ("adam", ("decoupled",)),
    "Adam amsgrad": ("adam", ("amsgrad",)),
}
OTHERS = {  # loops that are not update rules: a pattern of their symbol ({t}: the element type)
    "norm (sum of squares)": r"lane_sum<{t}, .*sum_squares<{t}>",
    "stream a += s*b": r"::axpy\(float\*",
}
FLOAT32_ONLY = {"stream a += s*b"}
#: The element types (parameter, gradient, state) of the instantiations to count: --dtype float64
#: counts the float64 kernels.
ELEMENT_TYPES = {"float32": "float, float, float", "float64": "double, double, double"}


def rule_variants() -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """VARIANTS plus the plain variant of every rule the installed optkern declares."""
    out = dict(VARIANTS)
    try:
        import optkern

        rules = optkern.registry.rules()
    except Exception:  # not installed: the listed variants only
        rules = []
    for r in rules:
        on = RULE_FLAGS.get(r.cls, ())
        if not any(k == r.kernel and set(o) == set(on) for k, o in out.values()):
            out[r.cls] = (r.kernel, on)
    return out


def template_args(name: str, start: int) -> List[str]:
    """The top-level template arguments of the `<...>` that opens at name[start]."""
    args, depth, begin = [], 0, start + 1
    for i in range(start, len(name)):
        c = name[i]
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
            if depth == 0:
                args.append(name[begin:i].strip())
                return args
        elif c == "," and depth == 1:
            args.append(name[begin:i].strip())
            begin = i + 1
    return args


def find_variant(
    funcs: Dict[str, List[Tuple[int, str, str]]], kernel: str, on: Tuple[str, ...], types: str
) -> Optional[List[Tuple[int, str, str]]]:
    """The loop of this variant for these element types (parameter, gradient, state); failing
    that, for another gradient type: GCC may fold an entry into an identical one (LAMB's second
    pass does not read the gradient) and keep that one's name."""
    names = FLAGS.get(kernel, ("decay",))
    loop = LOOP_NAMES.get(kernel, f"{kernel}_impl")
    want = [n in on for n in names]
    p, _, s = (t.strip() for t in types.split(","))
    exact, other = None, None
    for f, code in funcs.items():
        m = re.search(rf"\b{loop}<", f)
        if not m:
            continue
        args = template_args(f, m.end() - 1)
        if not args or [a == "true" for a in args[1:]] != want:
            continue
        if args[0].endswith(f"Types<{types}>"):
            exact = exact or code
        elif re.search(rf"Types<{p}, \w+, {s}>$", args[0]):
            other = other or code
    return exact or other


LANES = {"zmm": 16, "ymm": 8, "xmm": 4}  # float32 lanes of an x86 register
NEON_BYTES = {".4s": 16, ".2d": 16, ".2s": 8}  # bytes of a NEON floating-point arrangement
SVE = 0  # width() of an SVE loop: one vector of VL bits
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


def width(body: List[Tuple[int, str, str]], size: int = 4) -> int:
    """Lanes of the widest vectors of `size`-byte elements the loop computes with (1: scalar
    code; SVE: an SVE loop, whose lanes are VL / (8 * size))."""
    if any(re.search(r"\bz\d+\.[bhsd]\b", a) for _, _, a in body):
        return SVE
    neon = [n for _, op, a in body if op.startswith("f") for k, n in NEON_BYTES.items() if k in a]
    if neon:
        return max(1, max(neon) // size)
    packed = any(op.endswith(("ps", "pd")) for _, op, _ in body)
    best = max((LANES[r] for _, _, a in body for r in LANES if f"%{r}" in a), default=1)
    return max(1, best * 4 // size) if packed else 1


def main_loop(code: List[Tuple[int, str, str]]) -> Optional[List[Tuple[int, str, str]]]:
    """The vector body: of the innermost loops, the longest among those with the widest vectors
    (the others are remainder loops)."""
    candidates = loops(code)
    return max(candidates, key=rank, default=None)


def rank(body: List[Tuple[int, str, str]]) -> Tuple[int, int]:
    """Widest first (an SVE loop above any fixed width), then longest."""
    w = width(body)
    return (1 << 20 if w == SVE else w, len(body))


def elements_per_iteration(body: List[Tuple[int, str, str]], size: int = 4) -> int:
    """Elements (of `size` bytes) one pass of the loop handles, from the growth of a register it
    addresses memory with: an index scaled by the size (x(%rax,%rdx,4)) grows by elements, a base
    pointer ((%rax)) or an unscaled index by bytes. Counters used for nothing else are ignored."""
    text = " ".join(a for _, op, a in body if op != "lea")  # lea computes, it does not access
    scaled = set(re.findall(rf",(%r\w+),{size}\)", text))
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
        if reg in bytewise and step % size == 0:
            return step // size
    return width(body, size)


def aarch64_elements(
    body: List[Tuple[int, str, str]], code: List[Tuple[int, str, str]], size: int = 4
) -> float:
    """Elements (of `size` bytes) one pass of an aarch64 loop handles, from the growth of the
    register it indexes memory with: [x1, x0, lsl #2] (float32; lsl #3 for float64) indexes by
    elements, [x1, x0] or [x1], #16 by bytes. For SVE, in vectors: the index grows by cntw (cntd
    for float64) or incw, one vector of VL / (8 * size) elements."""
    text = " ".join(a for _, _, a in body)
    shift = {4: 2, 8: 3}[size]
    scaled = set(re.findall(rf"\[x\d+, (x\d+), lsl #{shift}\]", text))
    bytewise = set(re.findall(r"\[x\d+, (x\d+)\]", text))
    bytewise |= set(re.findall(r"\[(x\d+)(?:, #-?\w+)?\](?:, #\w+)?", text))
    # cnt[bhwd] counts the bytes, halfwords, words, doublewords of one vector: as an element
    # index, in vectors of `size`-byte elements (cntb = size vectors); as a byte offset, one
    # vector per `size` of them.
    per_vector = {"cntb": size / 1, "cnth": size / 2, "cntw": size / 4, "cntd": size / 8}
    counts = {}  # register -> vectors as an element index, from cnt[bhwd] xN[, all, mul #k]
    for _, op, args in code:
        m = re.match(r"(x\d+)(?:, all, mul #(\d+))?$", args)
        if op in per_vector and m:
            counts[m.group(1)] = per_vector[op] * int(m.group(2) or 1)
    for _, op, args in body:
        m = re.match(r"(x\d+)(?:, all, mul #(\d+))?$", args)
        if op.replace("inc", "cnt") in per_vector and m:  # incw x0: one vector of float32
            vectors = per_vector[op.replace("inc", "cnt")] * int(m.group(2) or 1)
            return vectors / size if m.group(1) in bytewise - scaled else vectors
        m = re.match(r"(x\d+), (x\d+), (#0x[0-9a-f]+|#\d+|x\d+)$", args)
        if op != "add" or not m or m.group(1) != m.group(2):
            continue
        reg, step = m.group(1), m.group(3)
        if step in counts:
            return counts[step] / size if reg in bytewise - scaled else counts[step]
        if not step.startswith("#"):
            continue
        step_value = int(step[1:], 0)
        if reg in scaled:
            return step_value
        if reg in bytewise and step_value % size == 0:
            return step_value // size
    w = width(body, size)
    return 1 if w == SVE else w


def lanes_of(isa: str, size: int = 4) -> int:
    """Lanes of one vector of `size`-byte elements (SVE: SVE, per vector of any length)."""
    if isa == "sve":
        return SVE
    return max(1, {"avx2": 32, "avx512": 64, "neon": 16}.get(isa, 16) // size)


def _isa_order(isa: str) -> tuple:
    known = ["scalar", "avx2", "avx512", "neon", "sve"]
    return (known.index(isa) if isa in known else len(known), isa)


def report(build_dirs: List[str], dtype: str = "float32") -> None:
    types = ELEMENT_TYPES[dtype]
    scalar = types.split(",")[0]
    size = 8 if dtype == "float64" else 4
    # Every ISA build CMake made (optkern_kernels_<isa>) in the build trees, from the baseline up.
    dirs = [
        d
        for b in build_dirs
        for d in glob.glob(os.path.join(b, "**", "optkern_kernels_*.dir"), recursive=True)
    ]
    isas = sorted({re.sub(r".*optkern_kernels_(\w+)\.dir$", r"\1", d) for d in dirs}, key=_isa_order)
    per_vector: Dict[str, Dict[str, float]] = {}  # rule -> isa -> instructions per vector
    for isa in isas:
        # One object per rule file (generated/kernels/<rule>.cpp.o) and the norms'.
        objs = [
            o
            for b in build_dirs
            for o in glob.glob(
                os.path.join(b, "**", f"optkern_kernels_{isa}.dir", "**", "*.cpp.o"),
                recursive=True,
            )
        ]
        if not objs:
            continue
        funcs: Dict[str, List[Tuple[int, str, str]]] = {}
        for obj in sorted(objs):
            funcs.update(functions(obj))
        sve = isa == "sve"
        what = (
            "instructions per vector (per element at VL = 128 / 256 bits)"
            if sve
            else "instructions per element"
        )
        print(f"\n{isa}, {dtype}: {what} in the main loop (divisions, square roots)")
        found = {
            name: find_variant(funcs, kernel, on, types)
            for name, (kernel, on) in rule_variants().items()
        }
        found.update(
            {
                name: next(
                    (c for f, c in funcs.items() if re.search(pattern.format(t=scalar), f)), None
                )
                for name, pattern in OTHERS.items()
                if scalar == "float" or name not in FLOAT32_ONLY
            }
        )
        for name, code in found.items():
            body = main_loop(code) if code else None
            if not body:
                print(f"  {name:<28} (not found)")
                continue
            if isa in ("neon", "sve"):
                n = aarch64_elements(body, code, size)
            else:
                n = elements_per_iteration(body, size)
            div = sum(1 for _, o, _ in body if o.startswith(("vdiv", "div", "fdiv")))
            sqrt = sum(1 for _, o, _ in body if "sqrt" in o)
            if sve:
                vec = len(body) / n
                per_128, per_256 = vec / (16 // size), vec / (32 // size)
                print(
                    f"  {name:<28} {vec:5.2f}  ({per_128:.2f} / {per_256:.2f}; {len(body)} "
                    f"instructions per {n:g} vectors; {div} div, {sqrt} sqrt)"
                )
            else:
                vec = len(body) / n * lanes_of(isa, size)
                print(
                    f"  {name:<28} {len(body) / n:5.2f}  ({len(body)} instructions per {n:g} "
                    f"elements; {div} div, {sqrt} sqrt)"
                )
            per_vector.setdefault(name, {})[isa] = vec
    compare(per_vector, size)


def compare(per_vector: Dict[str, Dict[str, float]], size: int) -> None:
    """Every vector ISA side by side, per vector of its width, against AVX2."""
    compared = [
        i for i in ["avx2", "avx512", "neon", "sve"] if any(i in v for v in per_vector.values())
    ]
    if not compared:
        return
    lanes = ", ".join(
        f"{i} VL/{8 * size}" if i == "sve" else f"{i} {lanes_of(i, size)}" for i in compared
    )
    print(f"\ninstructions per vector (per element x lanes: {lanes})")
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
    args = sys.argv[1:]
    dtype = "float32"
    if "--dtype" in args:
        i = args.index("--dtype")
        dtype = args[i + 1]
        del args[i : i + 2]
    report(args or [os.path.join("build", "dev")], dtype)
