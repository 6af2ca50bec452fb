"""Adafactor's and LAMB's step at 50M elements against passes that move the same bytes.

The main benchmark rates every step against one yardstick, the in-place stream ``a += s*b``
(two reads and one write per element). Adafactor makes three passes, two of them read-only
(p and g; then g), and LAMB two (p, g, m, v read and m, v written; then p, m, v read and p
written). Where a machine's reads, not its writes, bound a pass, a read-only pass moves fewer
bytes per second than the in-place stream, and a step with such passes cannot reach the
yardstick's rate however good its kernel. This script times each step beside the passes that
move exactly its bytes, built from optkern's own streaming kernels (``_core.stream_axpy`` for
the read-read-write passes, ``optkern.grad_norms`` for the read-only ones), interleaved in
shuffled order, minimum of the repeats, and prints:

- %stream: the step's bytes per second over the in-place stream's (the main benchmark's %bw);
- %bound: the time of its same-bytes passes over the step's time (100% = the step is as fast as
  streaming its bytes can be on this machine).

    python bench/pass_bounds.py [repeats]      (default 9)

Results: bench/README.md ("Adafactor and LAMB at 50M").
"""

import sys

import numpy as np

import optkern as ok
from optkern import _core, _platform
from optkern.benchmark.runner import shuffled_times

N = 50_000_000
SHAPE = (5000, 10000)  # the main benchmark's Adafactor matrix at 50M (cases.matrix_shape)


def main(repeats: int = 9) -> None:
    rng = np.random.default_rng(0)

    def arr(shape=(N,), scale=1.0):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    pa, ga = arr(SHAPE), arr(SHAPE, 1e-3)
    adafactor = ok.Adafactor([pa])
    pl, gl = arr(), arr(scale=1e-3)
    lamb = ok.LAMB([pl])
    adafactor.step([ga])  # state allocated, pages touched
    lamb.step([gl])
    a, b, c, d = arr(), arr(), arr(), arr()

    cases = {
        "Adafactor": lambda: adafactor.step([ga]),
        "LAMB": lambda: lamb.step([gl]),
        # a += s*b: the yardstick, and the traffic of Adafactor's pass 2 (p, g read; p written)
        "stream": lambda: _core.stream_axpy([a], [b], 1e-9),
        "read 2": lambda: ok.grad_norms([a, b]),  # Adafactor's pass 0: p and g read
        "read 1": lambda: ok.grad_norms([b]),  # Adafactor's pass 1: g read
        # LAMB's pass 1: p, g, m, v read, m and v written (two in-place streams)
        "stream x2": lambda: _core.stream_axpy([c, d], [a, b], 1e-9),
    }
    cases["stream"]()
    best = {k: min(v) for k, v in shuffled_times(cases, repeats).items()}

    stream_rate = 12 * N / best["stream"]
    # LAMB's pass 2 (p, m, v read; p written) = one in-place stream + one read-only array
    bounds = {
        "Adafactor": (24, best["read 2"] + best["read 1"] + best["stream"]),
        "LAMB": (40, best["stream x2"] + best["stream"] + best["read 1"]),
    }
    print(f"# {_platform.describe_machine()}, {ok.get_num_threads()} threads")
    print(f"{N // 1_000_000}M elements, min of {repeats} shuffled repeats")
    for k in ("stream", "read 2", "read 1", "stream x2"):
        nbytes = {"stream": 12, "read 2": 8, "read 1": 4, "stream x2": 24}[k]
        print(f"  {k:10s} {best[k] * 1e3:7.1f} ms  {nbytes * N / best[k] / 1e9:5.1f} GB/s")
    for k, (nbytes, bound) in bounds.items():
        t = best[k]
        print(
            f"{k:10s} {t * 1e3:7.1f} ms  {nbytes * N / t / 1e9:5.1f} GB/s  "
            f"%stream {nbytes * N / t / stream_rate:4.0%}  same-bytes passes {bound * 1e3:6.1f} ms"
            f"  %bound {bound / t:4.0%}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
