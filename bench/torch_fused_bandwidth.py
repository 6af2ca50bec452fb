"""torch's fused CPU step against optkern.torch's at 50M elements, as a share of the in-place
streaming bandwidth measured in the same run.

At 50M elements (200 MB per array) a step streams its arrays from memory once; both libraries'
steps are one fused pass, so neither can be much faster than the memory lets it. This script
prints each step's bytes per second (parameter and state read and written, gradient read: 4
bytes each) over the yardstick of ``python -m optkern bench``, optkern's in-place stream
``a += s*b`` (12 bytes per element), all timed in shuffled order, medians of the repeats.

    python bench/torch_fused_bandwidth.py [repeats]     (default 9)

Results: docs/torch.md ("Speed").
"""

import statistics
import sys

import numpy as np
import torch

import optkern.torch as okt
from optkern import _core, _platform
from optkern.benchmark.runner import shuffled_times
from optkern.benchmark.torch_bench import HYPER

N = 50_000_000
# bytes per element: p read and written, g read, each state array read and written
BYTES = {"SGD": 20, "Adam": 28, "AdamW": 28, "Adagrad": 20}  # SGD with momentum 0.9 (HYPER)


def main(repeats: int = 9) -> None:
    a, b = np.ones(N, np.float32), np.ones(N, np.float32)
    steps = {"stream": lambda: _core.stream_axpy([a], [b], 1e-9)}
    keep = []
    for name in BYTES:
        for side, make in (
            ("torch", lambda ps, n=name: getattr(torch.optim, n)(ps, fused=True, **HYPER[n])),
            ("okt", lambda ps, n=name: getattr(okt, n)(ps, **HYPER[n])),
        ):
            p = torch.nn.Parameter(torch.randn(N))
            p.grad = torch.randn(N) * 1e-3
            opt = make([p])
            opt.step()  # state allocated, pages touched
            keep.append((p, opt))
            steps[f"{name}/{side}"] = opt.step
    med = {k: statistics.median(v) for k, v in shuffled_times(steps, repeats).items()}
    stream = 12 * N / med["stream"]
    print(
        f"# {_platform.describe_machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"in-place stream a += s*b: {stream / 1e9:.1f} GB/s ({med['stream'] * 1e3:.1f} ms)")
    for name, nbytes in BYTES.items():
        cells = []
        for side in ("torch", "okt"):
            t = med[f"{name}/{side}"]
            cells.append(
                f"{side} {t * 1e3:6.1f} ms {nbytes * N / t / 1e9:5.1f} GB/s "
                f"({nbytes * N / t / stream:4.0%})"
            )
        x = med[f"{name}/torch"] / med[f"{name}/okt"]
        print(f"{name:8s} fused  " + "   ".join(cells) + f"   x = {x:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
