"""Where a torch training step's time goes: zero_grad, forward, backward and the optimizer step,
each timed inside the loop of ``python -m optkern bench --torch`` (MLP 784-1024-1024-10, 1.86M
parameters, batch 64), for torch's fused optimizer, optkern.torch, optkern.torch on one thread
and torch's foreach path, interleaved in shuffled order; medians over rounds of 8 steps.

A step timed alone and a step inside a loop differ: inside the loop it follows backward, whose
matmuls leave the caches and torch's OpenMP workers in their own state. This shows whether a
faster step makes a faster loop, and where the rest of the loop's time goes.

    python bench/torch_loop_phases.py Adam        (R=30 rounds by default; R=60 for more)

Results: docs/torch.md ("Speed").
"""

import copy
import os
import random
import statistics
import sys
import time

import torch

import optkern.torch as okt
from optkern import _core, _platform
from optkern.benchmark.torch_bench import HYPER, _mlp

PHASES = ("zero_grad", "forward", "backward", "step")


def main(name: str, rounds: int, per_round: int = 8) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 784, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    hp = HYPER.get(name, {})
    model0 = _mlp(0)
    threads = _core.get_num_threads()

    def one_thread(on: bool) -> None:
        _core.set_num_threads(1 if on else threads)

    configs = {
        "torch fused": (lambda ps: getattr(torch.optim, name)(ps, fused=True, **hp), None),
        "okt": (lambda ps: getattr(okt, name)(ps, **hp), None),
        "okt 1 thread": (lambda ps: getattr(okt, name)(ps, **hp), one_thread),
        "torch foreach": (lambda ps: getattr(torch.optim, name)(ps, foreach=True, **hp), None),
    }
    runs = {}
    for key, (make, around) in configs.items():
        model = copy.deepcopy(model0)
        runs[key] = (model, make(model.parameters()), around)
    samples = {k: [] for k in runs}

    def run(key: str) -> None:
        model, opt, around = runs[key]
        per = [[] for _ in PHASES]
        for _ in range(per_round):
            t0 = time.perf_counter()
            opt.zero_grad()
            t1 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            if around:
                around(True)
            opt.step()
            if around:
                around(False)
            t4 = time.perf_counter()
            for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                per[k].append(dt)
        samples[key].append([statistics.median(v) for v in per])

    for r in range(rounds + 2):  # the first two rounds warm up
        order = list(runs)
        random.shuffle(order)
        for key in order:
            run(key)
    print(
        f"# {_platform.describe_machine()}; torch {torch.__version__}, {torch.get_num_threads()}"
        f" threads; {name}, medians of {rounds} rounds of {per_round} steps, ms"
    )
    print(f"{'':14s}" + "".join(f"{p:>10s}" for p in PHASES) + f"{'sum':>10s}")
    for key, rows in samples.items():
        med = [statistics.median(col) * 1e3 for col in zip(*rows[2:])]
        print(f"{key:14s}" + "".join(f"{v:10.3f}" for v in med) + f"{sum(med):10.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "Adam", int(os.environ.get("R", "30")))
