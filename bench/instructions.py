#!/usr/bin/env python3
"""Instructions per element of each kernel's main vector loop, read from the disassembly.

Hardware counters are not available on every machine (not in this VM, nor under valgrind for
AVX-512), but the main loop of a fused element-wise kernel is straight-line code: its length
divided by the elements one iteration handles is the count that matters for cache-resident
buffers. Also counted: divisions and square roots (the divider is the bottleneck when the data
fit in cache: one vdivps zmm and one vsqrtps zmm take about 10 + 12 cycles per 16 elements).

Usage: python bench/instructions.py [BUILD_DIR] [--dtype float32|float64]
       (a CMake build of this repo; default build/dev; the float32 kernels by default)

    mkdir -p build/dev && cd build/dev && cmake ../.. -G Ninja -DCMAKE_BUILD_TYPE=Release \\
        -Dpybind11_DIR=$(python -c "import pybind11;print(pybind11.get_cmake_dir())") && ninja
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
    "schedule_free": ("adamw", "decay", "init"),
    "adafactor": ("factored", "decay"),
}
# Kernels whose element-wise loop has another name than <kernel>_impl.
LOOP_NAMES = {"adafactor": "adafactor_apply"}
# Flags a rule's class always has on (its kernel's plain variant would be another rule's).
RULE_FLAGS = {"ScheduleFreeAdamW": ("adamw",)}
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


LANES = {"zmm": 16, "ymm": 8, "xmm": 4}
LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")


def functions(obj: str) -> Dict[str, List[Tuple[int, str, str]]]:
    text = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", obj], check=True, capture_output=True, text=True
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
                out[current].append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def loops(code: List[Tuple[int, str, str]]) -> List[List[Tuple[int, str, str]]]:
    """Every innermost loop: a conditional backward branch and its body, holding no other."""
    index = {addr: i for i, (addr, _, _) in enumerate(code)}
    spans = []
    for i, (addr, op, args) in enumerate(code):
        target = re.match(r"([0-9a-f]+)\s", args + " ")
        if op.startswith("j") and op != "jmp" and target:
            t = int(target.group(1), 16)
            if t < addr and t in index:
                spans.append((index[t], i))
    return [
        code[a : b + 1]
        for a, b in spans
        if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)
    ]


def width(body: List[Tuple[int, str, str]], size: int = 4) -> int:
    """Lanes of the widest vectors of `size`-byte elements the loop computes with (1: scalar)."""
    packed = any(op.endswith(("ps", "pd")) for _, op, _ in body)
    best = max((LANES[r] for _, _, a in body for r in LANES if f"%{r}" in a), default=1)
    return max(1, best * 4 // size) if packed else 1


def main_loop(code: List[Tuple[int, str, str]]) -> Optional[List[Tuple[int, str, str]]]:
    """The vector body: of the innermost loops, the longest among those with the widest vectors
    (the others are remainder loops)."""
    candidates = loops(code)
    return max(candidates, key=lambda b: (width(b), len(b)), default=None)  # widest, longest


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


def _isa_order(isa: str) -> tuple:
    known = ["scalar", "avx2", "avx512", "neon", "sve"]
    return (known.index(isa) if isa in known else len(known), isa)


def report(build_dir: str, dtype: str = "float32") -> None:
    types = ELEMENT_TYPES[dtype]
    scalar = types.split(",")[0]
    # Every ISA build CMake made (optkern_kernels_<isa>), from the baseline up.
    dirs = glob.glob(os.path.join(build_dir, "**", "optkern_kernels_*.dir"), recursive=True)
    isas = sorted({re.sub(r".*optkern_kernels_(\w+)\.dir$", r"\1", d) for d in dirs}, key=_isa_order)
    for isa in isas:
        # One object per rule file (generated/kernels/<rule>.cpp.o) and the norms'.
        objs = glob.glob(
            os.path.join(build_dir, "**", f"optkern_kernels_{isa}.dir", "**", "*.cpp.o"),
            recursive=True,
        )
        if not objs:
            continue
        funcs: Dict[str, List[Tuple[int, str, str]]] = {}
        for obj in sorted(objs):
            funcs.update(functions(obj))
        print(
            f"\n{isa}, {dtype}: instructions per element in the main loop (divisions, square roots)"
        )
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
            n = elements_per_iteration(body, 8 if dtype == "float64" else 4)
            div = sum(1 for _, o, _ in body if o.startswith(("vdiv", "div")))
            sqrt = sum(1 for _, o, _ in body if "sqrt" in o)
            print(
                f"  {name:<28} {len(body) / n:5.2f}  ({len(body)} instructions per {n} "
                f"elements; {div} div, {sqrt} sqrt)"
            )


if __name__ == "__main__":
    args = sys.argv[1:]
    dtype = "float32"
    if "--dtype" in args:
        i = args.index("--dtype")
        dtype = args[i + 1]
        del args[i : i + 2]
    report(args[0] if args else os.path.join("build", "dev"), dtype)
