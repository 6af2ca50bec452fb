#!/usr/bin/env python3
"""Golden bytes: a fingerprint of every kernel's exact output, for restructurings of the C++ core
that must not change a single bit.

Runs every rule with each option set of optim_db.CASES (flags on and off, weight decay,
maximize, amsgrad, nesterov, centered, ...), a few steps, on every ISA this machine runs
(OPTKERN_FORCE_ISA in a child process per ISA, and the classes' ``_isa``), at 1 and 2 threads
(64 elements per thread, so small arrays split), over one group of arrays whose sizes are not
multiples of any vector width, some not 64-byte aligned, one empty, some 2-D or 3-D (Adafactor's
factored paths: narrow, tiled, batched), one holding NaN, Inf, huge values and signed zeros (in
the parameter, and in its gradient on the steps that do not clip).
Steps alternate plain updates, fused clipping (``max_grad_norm``) and a step that skips a
parameter (so step counts differ within the group). Also fingerprinted: the gradient norms
(p = 1, 2, 3, 0.5, inf), ``scale_``, ``clamp_`` and ``stream_axpy``; and, with ``--dtype
float64``, the same runs in float64 (parameters, gradients and states).

Every run's parameters and state (arrays by their bytes, carried numbers by their repr) are
hashed; the file maps each run to its SHA-256.

    python tests/golden.py save before.json        # on the old build
    python tests/golden.py check before.json       # on the new one: every run identical
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: (shape, misalignment in elements: 0 = 64-byte aligned)
SHAPES = [
    ((17,), 0),
    ((1023,), 1),
    ((4099,), 3),
    ((0,), 0),
    ((7, 33), 1),
    ((300, 50), 0),  # Adafactor: several row tiles
    ((3, 5, 7), 2),  # batched matrices
    ((2, 20000), 1),  # Adafactor: column tiles
    ((100, 3), 0),  # narrow rows
    ((61,), 0),  # special values
]
SPECIAL = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0, 1e-40, 3.0], np.float64)
STEPS = 7
THREADS = (1, 2)


def placed(values: np.ndarray, misalign: int, dtype) -> np.ndarray:
    """A copy of ``values`` in ``dtype`` starting ``misalign`` elements past a 64-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(values.size * dtype.itemsize + 192, np.uint8)
    start = (-raw.ctypes.data) % 64 + misalign * dtype.itemsize
    out = raw[start : start + values.size * dtype.itemsize].view(dtype).reshape(values.shape)
    out[...] = values
    return out


def feed(h, x) -> None:
    if isinstance(x, np.ndarray):
        h.update(str((x.dtype.str, x.shape)).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            h.update(str(k).encode())
            feed(h, x[k])
    elif isinstance(x, (list, tuple)):
        h.update(b"[")
        for v in x:
            feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(x).encode())


def fingerprint(*things) -> str:
    h = hashlib.sha256()
    for t in things:
        feed(h, t)
    return h.hexdigest()


def arrays(seed: int, dtype, scale: float = 0.5, special: bool = True):
    """One array per SHAPES entry; the last one holds SPECIAL values when ``special``."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (shape, mis) in enumerate(SHAPES):
        v = rng.standard_normal(shape) * scale
        if special and i == len(SHAPES) - 1:
            v.reshape(-1)[: SPECIAL.size] = SPECIAL * (1 if seed % 2 else -1)
        out.append(placed(v, mis, dtype))
    return out


def run_case(isa: str, name: str, hp: dict, dtype) -> str:
    import optkern as ok

    params = arrays(1, dtype)
    opt = getattr(ok, name)(params, **hp)
    opt._isa = isa
    for k in range(STEPS):
        clip = k % 3 == 1  # a NaN in any gradient would make every parameter NaN there
        grads = arrays(100 + k, dtype, scale=0.1, special=not clip)
        if k == 3:
            grads[1] = None  # this parameter's step count falls behind the others'
        if clip:
            opt.step(grads, max_grad_norm=1.0)
        else:
            opt.step(grads)
    state = [opt.state[p] for p in params if p in opt.state]
    return fingerprint(params, state)


def run_norms(dtype) -> dict:
    import optkern as ok

    out = {}
    grads = arrays(7, dtype)
    for p in (1.0, 2.0, 3.0, 0.5, float("inf")):
        per, total = ok._core.grad_norms(grads, p)
        out[f"norm p={p}"] = fingerprint(per, total)
    g = arrays(8, dtype, special=False)
    ok.clip_grad_norm_(g, 0.5)
    out["clip_grad_norm_"] = fingerprint(g)
    g = arrays(9, dtype)
    ok.clip_grad_value_(g, 0.3)
    out["clip_grad_value_"] = fingerprint(g)
    if np.dtype(dtype) == np.float32:
        a, b = arrays(10, dtype), arrays(11, dtype)
        ok._core.stream_axpy(a, b, 0.75)
        out["stream_axpy"] = fingerprint(a)
    return out


def set_min_elements_per_thread(n: int) -> None:
    """The test hook, in the core's old place (_core) or its new one (_core._testing)."""
    from optkern import _core

    testing = getattr(_core, "_testing", None)
    if testing is not None:
        testing.set_min_elements_per_thread(n)
    else:
        _core._set_min_elements_per_thread(n)


def child(dtype_name: str) -> None:
    """Runs everything on the ISA OPTKERN_FORCE_ISA names; prints {key: digest} as JSON."""
    import optkern as ok
    from optim_db import CASES, case_id

    dtype = np.dtype(dtype_name)
    isa = ok.active_isa()
    extra = [  # option sets CASES lacks
        ("NAdam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
        ("RAdam", dict(weight_decay=0.1, decoupled_weight_decay=True, betas=(0.9, 0.6))),
        ("AdamW", dict(weight_decay=0.0)),
        ("ASGD", dict(t0=2)),
    ]
    out = {}
    for threads in THREADS:
        ok.set_num_threads(threads)
        set_min_elements_per_thread(64)
        for name, hp in CASES + extra:
            out[f"{isa} t{threads} {case_id((name, hp))}"] = run_case(isa, name, hp, dtype)
        for k, v in run_norms(dtype).items():
            out[f"{isa} t{threads} {k}"] = v
    print(json.dumps(out))


def collect(dtype_name: str) -> dict:
    import optkern as ok

    out = {}
    for isa in ok.available_isas():
        env = dict(os.environ, OPTKERN_FORCE_ISA=isa)
        run = subprocess.run(
            [sys.executable, __file__, "_child", dtype_name],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0:
            sys.exit(f"the {isa} run failed:\n{run.stderr}")
        out.update(json.loads(run.stdout))
    return out


def main(argv) -> int:
    if argv[:1] == ["_child"]:
        child(argv[1])
        return 0
    dtype = "float32"
    if "--dtype" in argv:
        i = argv.index("--dtype")
        dtype = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    if len(argv) != 2 or argv[0] not in ("save", "check"):
        print(__doc__)
        return 2
    got = collect(dtype)
    if argv[0] == "save":
        with open(argv[1], "w") as f:
            json.dump(got, f, indent=0, sort_keys=True)
        print(f"{len(got)} fingerprints saved to {argv[1]}")
        return 0
    with open(argv[1]) as f:
        want = json.load(f)
    differ = sorted(k for k in want if k in got and got[k] != want[k])
    missing = sorted(set(want) - set(got))
    isas = sorted({k.split()[0] for k in want})
    print(
        f"{len(want)} fingerprints over ISAs {', '.join(isas)}: {len(differ)} differ, "
        f"{len(missing)} missing, {len(set(got) - set(want))} new"
    )
    for k in differ[:40] + missing[:40]:
        print("  ", k)
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
