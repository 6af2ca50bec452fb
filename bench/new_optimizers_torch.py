"""Draft: the torch baselines of the new optimizers, before optkern has them.

Times one step of torch's foreach and single-tensor paths for every new optimizer that torch
ships (NAdam, RAdam, ASGD, Rprop, Adafactor), and the packages' paths for Lion (lion-pytorch) and
Schedule-Free (schedulefree), at 1M and 50M float32 elements in one parameter (Adafactor: a
matrix of 1000 rows, so its factored path runs). Beside each size, optkern's in-place streaming
kernel (a += s*b, 12 bytes per element) gives the bandwidth the GB/s column is measured against.
GB/s counts the bytes the update must move per element (docs/new-optimizers-draft.md): a fused
kernel's floor, not what torch's several passes actually move. Minimum over interleaved repeats.

    python bench/new_optimizers_torch.py [--sizes 1M,50M] [--repeats 5] [--only NAdam,Rprop]

When optkern has a rule, its row goes here beside torch's, for the "3x torch's foreach" target.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

import optkern as ok

# name -> (bytes per element of a fused step, how to build it)
BYTES = {
    "NAdam": 28,
    "RAdam": 28,
    "ASGD": 20,
    "Rprop": 28,
    "Adafactor": 24,
    "Lion": 20,
    "ScheduleFreeAdamW": 28,
    "ScheduleFreeSGD": 20,
}
ROWS = 1000  # Adafactor's matrix: ROWS x n / ROWS


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def time_per_step(step: Callable[[], None], batch: int) -> float:
    start = time.perf_counter()
    for _ in range(batch):
        step()
    return (time.perf_counter() - start) / batch


def compare(steps: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    for step in steps.values():  # the first step allocates the state
        step()
    batches = {
        k: max(1, min(1000, math.ceil(0.2 / max(time_per_step(s, 1), 1e-9))))
        for k, s in steps.items()
    }
    best = {k: math.inf for k in steps}
    for _ in range(repeats):
        for k, s in steps.items():
            best[k] = min(best[k], time_per_step(s, batches[k]))
    return best


def torch_steps(name: str, n: int) -> List[Tuple[str, Callable[[], None]]]:
    import torch

    rng = np.random.default_rng(0)
    shape = (ROWS, n // ROWS) if name == "Adafactor" else (n,)

    def make(factory, restore_grad=False, **impl):
        p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)))
        g = torch.from_numpy((1e-3 * rng.standard_normal(shape)).astype(np.float32))
        p.grad = g.clone()
        opt = factory([p], **impl)
        if hasattr(opt, "train"):
            opt.train()
        if not restore_grad:
            return opt.step

        def step():  # the package divides p.grad in place: give every step the same gradient
            p.grad.copy_(g)
            opt.step()

        return step

    out = []
    if hasattr(torch.optim, name):
        cls = getattr(torch.optim, name)
        out.append(("foreach", make(cls, foreach=True)))
        out.append(("single", make(cls, foreach=False)))
    elif name == "Lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            return []
        out.append(("lion-pytorch", make(Lion)))
    else:
        try:
            import schedulefree
        except ImportError:
            return []
        cls = {
            "ScheduleFreeAdamW": schedulefree.AdamWScheduleFree,
            "ScheduleFreeSGD": schedulefree.SGDScheduleFree,
        }[name]
        # AdamWScheduleFree divides p.grad in place: each timed step first copies the gradient
        # back (8 more bytes per element, inside the time).
        restore = name == "ScheduleFreeAdamW"
        out.append(("foreach", make(cls, restore, foreach=True)))
        out.append(("single", make(cls, restore, foreach=False)))
    return out


def stream_step(n: int) -> Callable[[], None]:
    a = np.zeros(n, np.float32)
    b = np.ones(n, np.float32)
    return lambda: ok._core.stream_axpy([a], [b], 1e-7)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,50M")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default=",".join(BYTES))
    args = ap.parse_args()
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; optkern "
        f"{ok.__version__} ({ok.active_isa()}, {ok.get_num_threads()} threads); "
        f"{os.cpu_count()} cores"
    )
    print(f"{'optimizer':18} {'size':>5} {'impl':>13} {'ms/step':>9} {'GB/s':>7} {'%bw':>5}")
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        for name in args.only.split(","):
            steps = dict(torch_steps(name, size))
            if not steps:
                print(f"{name:18} {size:>5} (oracle package not installed)")
                continue
            steps["stream"] = stream_step(size)
            best = compare(steps, args.repeats)
            stream_gbps = 12 * size / best.pop("stream") / 1e9
            for impl, sec in best.items():
                gbps = BYTES[name] * size / sec / 1e9
                label = f"{size // 10**6}M" if size >= 10**6 else str(size)
                print(
                    f"{name:18} {label:>5} {impl:>13} {sec * 1e3:9.3f} {gbps:7.1f} "
                    f"{100 * gbps / stream_gbps:4.0f}%"
                )
            del steps
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
