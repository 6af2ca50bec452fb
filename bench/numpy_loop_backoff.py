"""NumPy MLP training loop (batch 64) with optkern stepping: the late-helper backoff on
(default), off, and optkern on one thread, interleaved in rotating order, median ms per step.

    python bench/numpy_loop_backoff.py Adam 1024-1024-1024-10

R sets the rounds (default 12). Results: docs/threading.md, "Late helpers".
"""

import os
import statistics
import sys
import time

import numpy as np
import optkern as ok
from optkern import _core

name = sys.argv[1] if len(sys.argv) > 1 else "Adam"
dims = [int(d) for d in (sys.argv[2] if len(sys.argv) > 2 else "1024-1024-1024-10").split("-")]
rng = np.random.default_rng(0)
x = rng.standard_normal((64, dims[0])).astype(np.float32)
y = rng.integers(0, dims[-1], 64)


def make():
    r = np.random.default_rng(1)
    W = [
        (r.standard_normal((a, b)) * np.sqrt(2 / a)).astype(np.float32)
        for a, b in zip(dims, dims[1:])
    ]
    B = [np.zeros(b, np.float32) for b in dims[1:]]
    return W + B


def grads(P):
    L = len(dims) - 1
    W, B = P[:L], P[L:]
    acts = [x]
    for i in range(L):
        z = acts[-1] @ W[i] + B[i]
        acts.append(np.maximum(z, 0) if i < L - 1 else z)
    z = acts[-1]
    e = np.exp(z - z.max(1, keepdims=True))
    pr = e / e.sum(1, keepdims=True)
    pr[np.arange(64), y] -= 1
    d = pr / 64
    gW, gB = [None] * L, [None] * L
    for i in reversed(range(L)):
        gW[i] = acts[i].T @ d
        gB[i] = d.sum(0)
        if i:
            d = (d @ W[i].T) * (acts[i] > 0)
    return gW + gB


kw = {"momentum": 0.9} if name == "SGD" else {}
V = {}
for k in ("ad", "noad", "t1"):
    P = make()
    V[k] = (P, getattr(ok, name)(P, lr=1e-3, **kw))
T = {k: [] for k in V}


def one(k, rec):
    P, opt = V[k]
    if k == "noad":
        _core._testing.set_adaptive_threads(False)
    if k == "t1":
        ok.set_num_threads(1)
    t0 = time.perf_counter()
    opt.step(grads(P))
    t1 = time.perf_counter()
    if k == "noad":
        _core._testing.set_adaptive_threads(True)
    if k == "t1":
        ok.set_num_threads(2)
    if rec:
        T[k].append(t1 - t0)


for k in V:
    for _ in range(3):
        one(k, False)
s0 = _core._testing.pool_stats()
for r in range(int(os.environ.get("R", "12"))):
    ks = list(V)
    ks = ks[r % 3 :] + ks[: r % 3]
    for k in ks:
        for _ in range(10):
            one(k, True)
print(
    "numpy loop",
    name,
    dims,
    "load",
    os.getloadavg()[0],
    {k: _core._testing.pool_stats()[k] - s0[k] for k in s0},
)
for k in V:
    print(f"  {k:5s} {statistics.median(T[k]) * 1e3:7.3f} ms/step")
