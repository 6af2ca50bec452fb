"""A NumPy MLP training loop with optkern's update against hand-written NumPy updates: the
measurements behind docs/threading.md.

Each measurement runs in its own process (so each variant starts with fresh thread pools), and
the driver interleaves the variants round by round; it reports medians over rounds. Variants name
the Python to run with, so two builds of optkern (two virtual environments) can be compared:

    python bench/loop_threads.py --python new=/work/venvs/pool/bin/python \\
        --python old=/work/venvs/pool-old/bin/python --rounds 5 --busy none,unpinned,pinned

Per step it reports: the whole loop (forward, backward, update), the update inside the loop
(timed around the optimizer call), and the same update alone (back to back, no matmuls between).
NumPy's BLAS keeps its default thread count, as in a user's own loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = {"small": (784, 256, 128, 10), "big": (1024, 1024, 1024, 10)}
BATCH = 64


def child(size: str, opt: str, impl: str, threads: int, spin: int, steps: int) -> dict:
    import numpy as np

    dims = SIZES[size]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH * 8, dims[0])).astype(np.float32)
    y = rng.integers(0, dims[-1], BATCH * 8)
    params = []
    for a, b in zip(dims[:-1], dims[1:]):
        params.append((rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32))
        params.append(np.zeros(b, np.float32))
    grads = [np.zeros_like(p) for p in params]
    lr = 1e-3 if opt == "adam" else 1e-2

    if impl == "numpy":
        state = [(np.zeros_like(p), np.zeros_like(p), np.empty_like(p)) for p in params]
        t = [0]

        def update():
            t[0] += 1
            if opt == "adam":
                b1, b2, eps = 0.9, 0.999, 1e-8
                c1, c2 = 1 - b1 ** t[0], 1 - b2 ** t[0]
                for p, g, (m, v, tmp) in zip(params, grads, state):
                    m *= b1
                    m += (1 - b1) * g
                    v *= b2
                    np.multiply(g, g, out=tmp)
                    tmp *= 1 - b2
                    v += tmp
                    np.sqrt(v, out=tmp)
                    tmp *= 1 / np.sqrt(c2)
                    tmp += eps
                    np.divide(m, tmp, out=tmp)
                    tmp *= lr / c1
                    p -= tmp
            else:
                for p, g, (buf, _, tmp) in zip(params, grads, state):
                    buf *= 0.9
                    buf += g
                    np.multiply(buf, lr, out=tmp)
                    p -= tmp
    else:
        import optkern as ok

        if threads:
            ok.set_num_threads(threads)
        if spin >= 0:
            ok._core._testing.set_spin_us(spin)
        o = ok.Adam(params, lr=lr) if opt == "adam" else ok.SGD(params, lr=lr, momentum=0.9)

        def update():
            o.step(grads)

    def forward_backward(xb, yb):
        acts = [xb]
        h = xb
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i + 2 < len(params):
                np.maximum(h, 0, out=h)
            acts.append(h)
        z = acts[-1]
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        d = e / e.sum(axis=1, keepdims=True)
        d[np.arange(len(yb)), yb] -= 1
        d /= len(yb)
        for i in range(len(params) - 2, -1, -2):
            a = acts[i // 2]
            np.matmul(a.T, d, out=grads[i])
            np.sum(d, axis=0, out=grads[i + 1])
            if i:
                d = d @ params[i].T
                d *= acts[i // 2] > 0

    loop, upd = [], []
    warm = max(10, steps // 5)
    for s in range(warm + steps):
        k = (s % 8) * BATCH
        t0 = time.perf_counter()
        forward_backward(X[k : k + BATCH], y[k : k + BATCH])
        t1 = time.perf_counter()
        update()
        t2 = time.perf_counter()
        if s >= warm:
            loop.append(t2 - t0)
            upd.append(t2 - t1)
    alone = []
    for s in range(warm + steps):
        t1 = time.perf_counter()
        update()
        if s >= warm:
            alone.append(time.perf_counter() - t1)
    ms = lambda v: 1e3 * statistics.median(v)  # noqa: E731
    return {
        "loop_ms": ms(loop),
        "update_in_loop_ms": ms(upd),
        "update_alone_ms": ms(alone),
        "matmul_ms": ms(loop) - ms(upd),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument(
        "--python",
        action="append",
        default=[],
        help="NAME=PATH of a Python whose optkern to measure (default: this one as new)",
    )
    ap.add_argument(
        "--variants",
        default="numpy,{py},{py}:t1",
        help="comma list; {py} expands to every --python NAME; NAME:tN forces N "
        "threads, NAME:sU a helper spin of U microseconds",
    )
    ap.add_argument("--sizes", default="small,big")
    ap.add_argument("--opts", default="adam,sgdm")
    ap.add_argument("--busy", default="none", help="comma list of none, unpinned, pinned")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.child:
        size, opt, impl, threads, spin, steps = args.child
        print(json.dumps(child(size, opt, impl, int(threads), int(spin), int(steps))))
        return 0

    pythons = dict(p.split("=", 1) for p in args.python) or {"new": sys.executable}
    variants = []
    for v in args.variants.split(","):
        variants += [v.replace("{py}", name) for name in pythons] if "{py}" in v else [v]
    results = []
    for busy in args.busy.split(","):
        hog = None
        if busy != "none":
            cmd = [sys.executable, "-c", "while True: pass"]
            if busy == "pinned":
                cmd = ["taskset", "-c", "0"] + cmd
            hog = subprocess.Popen(cmd)
            time.sleep(0.5)
        try:
            for size in args.sizes.split(","):
                for opt in args.opts.split(","):
                    runs = {v: [] for v in variants}
                    for _ in range(args.rounds):
                        for v in variants:
                            name, *mods = v.split(":")
                            threads = next((int(m[1:]) for m in mods if m[0] == "t"), 0)
                            spin = next((int(m[1:]) for m in mods if m[0] == "s"), -1)
                            py = pythons.get(name, sys.executable)
                            impl = "numpy" if name == "numpy" else "optkern"
                            out = subprocess.run(
                                [
                                    py,
                                    os.path.abspath(__file__),
                                    "--child",
                                    size,
                                    opt,
                                    impl,
                                    str(threads),
                                    str(spin),
                                    str(args.steps),
                                ],
                                capture_output=True,
                                text=True,
                                check=True,
                                cwd="/",
                            )
                            runs[v].append(json.loads(out.stdout))
                    base = (
                        statistics.median(r["loop_ms"] for r in runs["numpy"])
                        if "numpy" in runs
                        else None
                    )
                    for v, rs in runs.items():
                        row = {"busy": busy, "size": size, "opt": opt, "variant": v}
                        for key in rs[0]:
                            row[key] = statistics.median(r[key] for r in rs)
                        if base:
                            row["loop_vs_numpy"] = row["loop_ms"] / base
                        row["in_loop_vs_alone"] = row["update_in_loop_ms"] / row["update_alone_ms"]
                        results.append(row)
                        print(
                            f"{busy:8} {size:5} {opt:4} {v:12} loop {row['loop_ms']:7.3f} ms"
                            f" ({row.get('loop_vs_numpy', float('nan')):.2f}x numpy)  update in loop"
                            f" {row['update_in_loop_ms']:7.3f} ms, alone {row['update_alone_ms']:7.3f}"
                            f" ms ({row['in_loop_vs_alone']:.1f}x)",
                            flush=True,
                        )
        finally:
            if hog:
                hog.kill()
                hog.wait()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "steps": args.steps, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
