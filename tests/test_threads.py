"""Results do not depend on the thread count: bit-identical for 1 and 2 threads, wherever the
split between threads falls (thread ranges cut through buffers at arbitrary points)."""

import numpy as np
import pytest
from helpers import bits, make
from reference import CASES, case_id

import optkern as ok

SIZES = [1023, 100003, 17, 5000, 0, 64]


def run(name, hp, threads, min_per_thread, steps=5):
    ok.set_num_threads(threads)
    ok._core._set_min_elements_per_thread(min_per_thread)
    rng = np.random.default_rng(42)
    params = [make(rng.standard_normal(n), "unaligned" if i % 2 else "aligned")
              for i, n in enumerate(SIZES)]
    opt = getattr(ok, name)(params, **hp)
    for _ in range(steps):
        opt.step([rng.standard_normal(n).astype(np.float32) for n in SIZES])
    return [bits(p) for p in params] + [bits(v) for p in params if p in opt.state
                                         for v in opt.state[p].values() if isinstance(v, np.ndarray)]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_and_two_threads_bit_identical(case):
    name, hp = case
    single = run(name, hp, threads=1, min_per_thread=1)
    for min_per_thread in (1, 7, 1000, 32768):
        assert run(name, hp, threads=2, min_per_thread=min_per_thread) == single


def test_thread_count_api():
    ok.set_num_threads(1)
    assert ok.get_num_threads() == 1
    ok.set_num_threads(2)
    assert ok.get_num_threads() == (2 if ok.build_info()["openmp"] else 1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        ok.set_num_threads(0)


def test_omp_num_threads_is_honoured(tmp_path):
    import subprocess
    import sys
    if not ok.build_info()["openmp"]:
        pytest.skip("built without OpenMP")
    out = subprocess.run([sys.executable, "-c", "import optkern; print(optkern.get_num_threads())"],
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "3"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
