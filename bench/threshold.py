#!/usr/bin/env python3
"""Where a second thread starts to pay: each optimizer's step at small sizes on 1 thread and on
2 threads with no threshold at all, interleaved, minimum of repeats. The break-even sizes set
DEFAULT_MIN_ELEMENTS_PER_THREAD and the work weights in src/cpp/multi_tensor.*.

Usage: python bench/threshold.py
"""

import numpy as np

import optkern as ok
from optkern.benchmark.runner import compare, machine

SIZES = [4096, 8192, 16384, 32768, 65536, 131072]


def main() -> None:
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores, {info['isa']}")
    threads, threshold = ok.get_num_threads(), ok._core._testing.min_elements_per_thread()
    try:
        for name, cls in (("SGD", ok.SGD), ("Adam", ok.Adam), ("Adadelta", ok.Adadelta)):
            for n in SIZES:
                params, grads = [np.zeros(n, np.float32)], [np.full(n, 1e-3, np.float32)]
                opt = cls(params)

                def on(k, floor):
                    def step():
                        ok.set_num_threads(k)
                        ok._core._testing.set_min_elements_per_thread(floor)
                        opt.step(grads)

                    return step

                s = compare(
                    {"one": on(1, threshold), "two": on(2, 1), "default": on(threads, threshold)}, 9
                )
                print(
                    f"{name:9}{n:8}: 1 thread {s['one'] * 1e6:7.1f} us, 2 threads "
                    f"{s['two'] * 1e6:7.1f} us ({s['one'] / s['two']:.2f}x); default "
                    f"{s['default'] * 1e6:7.1f} us"
                )
    finally:
        ok.set_num_threads(threads)
        ok._core._testing.set_min_elements_per_thread(threshold)


if __name__ == "__main__":
    main()
