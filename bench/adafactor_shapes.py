"""Time one ``optkern.Adafactor([p]).step([g])`` for matrices of 4M float32 elements in several
aspect ratios (and a 4M vector), the minimum and median of 15 steps after 3 warm-up steps.

The factored driver's cost should depend on the element count, not on the shape: compare every
line with (2000, 2000). Run: ``python bench/adafactor_shapes.py [repeats]`` (the machine's load
matters: run it twice, interleaved with the build you compare against).
"""

import sys
import time

import numpy as np

import optkern as ok

SHAPES = [
    (4_000_000,),
    (2000, 2000),
    (1, 4_000_000),
    (16, 250_000),
    (64, 62_500),
    (4000, 1000),
    (250_000, 16),
    (2, 2, 1_000_000),
]


def main(repeats=15):
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        p = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        opt = ok.Adafactor([p])
        for _ in range(3):
            opt.step([g])
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            opt.step([g])
            ts.append(time.perf_counter() - t)
        print(f"{str(shape):>20} {min(ts) * 1e3:7.2f} ms  median {np.median(ts) * 1e3:7.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
