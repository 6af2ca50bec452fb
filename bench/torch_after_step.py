"""optkern.torch's step right after a torch op: is torch's OpenMP pool in the way?

torch's CPU wheel runs its intra-op parallelism on libgomp, whose worker threads keep spinning
for a while after each parallel region (OMP_WAIT_POLICY unset). This script times one okt step
right after a torch.optim fused step (the situation of a training loop: the step follows
backward) and right after a 5 ms sleep, on optkern's pool (late-helper backoff on), the pool
with the backoff off, optkern on one thread, and the "gomp" backend (optkern's chunks on torch's
own OpenMP team, docs/threading.md), in shuffled order, medians over rounds. Run it with
OMP_WAIT_POLICY=passive or TT=1 (torch.set_num_threads(1)) to see torch's pool's share.

    python bench/torch_after_step.py SGD 1000000
    OMP_WAIT_POLICY=passive python bench/torch_after_step.py SGD 1000000
    TT=1 python bench/torch_after_step.py SGD 1000000

R sets the rounds (default 60). Results: docs/torch.md, "Why the 1M step and the loop".
"""

import os
import random
import statistics
import sys
import time

import torch

import optkern.torch as okt
from optkern import _core


def timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "SGD"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    if int(os.environ.get("TT", "0")):
        torch.set_num_threads(int(os.environ["TT"]))
    gen = torch.Generator().manual_seed(0)
    pt = torch.nn.Parameter(torch.randn(n, generator=gen))
    pt.grad = torch.randn(n, generator=gen) * 1e-3
    ot = getattr(torch.optim, name)([pt], lr=1e-3, fused=True)
    po = torch.nn.Parameter(torch.randn(n, generator=gen))
    po.grad = torch.randn(n, generator=gen) * 1e-3
    oo = getattr(okt, name)([po], lr=1e-3)

    def noad():
        _core._testing.set_adaptive_threads(False)
        t = timed(oo.step)
        _core._testing.set_adaptive_threads(True)
        return t

    def one_thread():
        threads = _core.get_num_threads()
        _core.set_num_threads(1)
        t = timed(oo.step)
        _core.set_num_threads(threads)
        return t

    def step():
        return timed(oo.step)

    # Each variant: (parallel backend, timed step). The backend is set before the torch op, so
    # that switching it (a dlopen of an already loaded library) does not land between the two.
    variants = {
        "pool": ("pool", step),
        "pool, backoff off": ("pool", noad),
        "1 thread": ("pool", one_thread),
        "gomp (torch's team)": ("gomp", step),
    }
    restore = _core.parallel_backend()[0]
    for pre_name, pre in (
        ("after a torch step", ot.step),
        ("after a 5 ms sleep", lambda: time.sleep(0.005)),
    ):
        res = {k: [] for k in variants}
        tor = []
        for backend, f in variants.values():
            _core.set_parallel_backend(backend)
            pre()
            f()
        s0 = _core._testing.pool_stats()
        for _ in range(int(os.environ.get("R", "60"))):
            order = list(variants)
            random.shuffle(order)
            for k in order:
                _core.set_parallel_backend(variants[k][0])
                tor.append(timed(pre))
                res[k].append(variants[k][1]())
        st = {k: _core._testing.pool_stats()[k] - s0[k] for k in s0}
        _core.set_parallel_backend(restore)
        print(
            f"{name} {n} {pre_name}: torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY')}, load {os.getloadavg()[0]:.1f}; "
            f"torch step median {statistics.median(tor) * 1e6:.0f} us; pool {st}"
        )
        print(
            "   okt step median us: "
            + ", ".join(f"{k} {statistics.median(v) * 1e6:.0f}" for k, v in res.items())
        )


if __name__ == "__main__":
    main()
