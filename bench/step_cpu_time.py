"""Single-thread CPU time per element of a 1M-element step: optkern.torch's RMSprop, SGD with
momentum, Adagrad and Adam against torch's foreach RMSprop and fused Adam (thread CPU time, so
waiting for a core on a shared machine does not count; minimum over rounds of 8 steps).

    R=15 python bench/step_cpu_time.py

Results: docs/torch.md, "What bounds RMSprop's 1M step".
"""

import os
import statistics
import time

import torch

import optkern.torch as okt
from optkern import _core

N = 1_000_000


def make(cls, **kw):
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(N, generator=g))
    p.grad = torch.randn(N, generator=g) * 1e-3
    return cls([p], **kw)


def main():
    torch.set_num_threads(1)
    _core.set_num_threads(1)
    cases = {
        "torch RMSprop foreach": make(torch.optim.RMSprop, lr=1e-3, foreach=True),
        "torch Adam fused": make(torch.optim.Adam, lr=1e-3, fused=True),
        "okt RMSprop": make(okt.RMSprop, lr=1e-3),
        "okt SGD(momentum)": make(okt.SGD, lr=1e-3, momentum=0.9),
        "okt Adagrad": make(okt.Adagrad, lr=1e-3),
        "okt Adam": make(okt.Adam, lr=1e-3),
    }
    res = {k: [] for k in cases}
    for o in cases.values():
        o.step()
    for _ in range(int(os.environ.get("R", "15"))):
        for k, o in cases.items():
            t0 = time.thread_time()
            for _ in range(8):
                o.step()
            res[k].append((time.thread_time() - t0) / 8)
    for k, v in res.items():
        print(
            f"{k:24} median {statistics.median(v) * 1e6:6.0f} us, min {min(v) * 1e6:6.0f} us"
            f" = {min(v) * 1e9 / N:.3f} ns/element"
        )
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()
