#!/usr/bin/env python3
"""Instructions per element of each kernel's main vector loop, read from the disassembly.

Hardware counters are not available on every machine (not in this VM, nor under valgrind for
AVX-512), but the main loop of a fused element-wise kernel is straight-line code: its length
divided by the elements one iteration handles is the count that matters for cache-resident
buffers. Also counted: divisions and square roots (the divider is the bottleneck when the data
fit in cache: one vdivps zmm and one vsqrtps zmm take about 10 + 12 cycles per 16 elements).

Usage: python bench/instructions.py [BUILD_DIR]   (a CMake build of this repo; default build/dev)

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


def width(body: List[Tuple[int, str, str]]) -> int:
    """Lanes of the widest float vectors the loop computes with (1: scalar code)."""
    packed = any(op.endswith(("ps", "pd")) for _, op, _ in body)
    best = max((LANES[r] for _, _, a in body for r in LANES if f"%{r}" in a), default=1)
    return best if packed else 1


def main_loop(code: List[Tuple[int, str, str]]) -> Optional[List[Tuple[int, str, str]]]:
    """The vector body: of the innermost loops, the longest among those with the widest vectors
    (the others are remainder loops)."""
    candidates = loops(code)
    return max(candidates, key=lambda b: (width(b), len(b)), default=None)


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


def report(build_dir: str) -> None:
    for isa in ["scalar", "avx2", "avx512"]:
        objs = glob.glob(
            os.path.join(build_dir, "**", f"optkern_kernels_{isa}.dir", "**", "update_rules.cpp.o"),
            recursive=True,
        )
        if not objs:
            continue
        funcs = functions(objs[0])
        print(f"\n{isa}: instructions per element in the main loop (divisions, square roots)")
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
            n = elements_per_iteration(body)
            div = sum(1 for _, o, _ in body if o.startswith(("vdiv", "div")))
            sqrt = sum(1 for _, o, _ in body if "sqrt" in o)
            print(
                f"  {name:<28} {len(body) / n:5.2f}  ({len(body)} instructions per {n} "
                f"elements; {div} div, {sqrt} sqrt)"
            )


if __name__ == "__main__":
    report(sys.argv[1] if len(sys.argv) > 1 else os.path.join("build", "dev"))
