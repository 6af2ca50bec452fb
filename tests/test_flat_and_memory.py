"""FlatParams, and the promise that a step allocates nothing after the first one."""

import gc
import tracemalloc

import numpy as np
import pytest
import optim_db as db
from optim_db import CASES, case_id

import optkern as ok


def test_flat_params_layout():
    fp = ok.FlatParams([(3, 4), 5, (0,), (2, 2, 2)])
    W, b, empty, T = fp
    assert (W.shape, b.shape, empty.shape, T.shape) == ((3, 4), (5,), (0,), (2, 2, 2))
    assert fp.flat.ctypes.data % 64 == 0
    for view in fp:
        assert view.ctypes.data % 64 == 0 or view.size == 0
        assert np.shares_memory(view, fp.flat) or view.size == 0
        assert view.flags.c_contiguous and view.dtype == np.float32
    W[...] = 1.0
    b[...] = 2.0
    assert fp.flat.sum() == 12 + 10  # padding untouched
    assert len(fp) == 4 and fp[1] is b


def test_flat_params_from_arrays_copies_values():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    fp = ok.FlatParams.from_arrays([a, np.ones(3)])
    np.testing.assert_array_equal(fp[0], a)
    a[0, 0] = 99
    assert fp[0][0, 0] == 0


def test_flat_params_step_equals_separate_arrays():
    rng = np.random.default_rng(0)
    shapes = [(20, 7), (7,), (7, 3), (3,)]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads_seq = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(5)]
    separate = [v.copy() for v in values]
    opt_a = ok.AdamW(separate, lr=0.01)
    flat = ok.FlatParams.from_arrays(values)
    gflat = flat.zeros_like()
    opt_b = ok.AdamW([flat.flat], lr=0.01)
    for grads in grads_seq:
        opt_a.step(grads)
        for view, g in zip(gflat, grads):
            view[...] = g
        opt_b.step([gflat.flat])
    for a, b in zip(separate, flat):
        np.testing.assert_array_equal(a, b)
    assert not np.any(
        flat.flat[
            np.setdiff1d(
                np.arange(flat.flat.size),
                np.concatenate([np.arange(o, o + v.size) for o, v in zip(flat.offsets, flat)]),
            )
        ]
    )


def test_flat_params_rejects_bad_shapes():
    with pytest.raises(ValueError, match="non-negative ints"):
        ok.FlatParams([(3, -1)])


# Every class at the options that keep all its state in the main suite; every other reference
# case (the same Python path with fewer states) in the slow lane.
ALLOCATION_CASES = [
    c if c in db.richest() else pytest.param(c, marks=pytest.mark.slow)
    for c in CASES + [c for c in db.richest() if c not in CASES]
]


@pytest.mark.parametrize("case", ALLOCATION_CASES, ids=case_id)
def test_step_allocates_nothing_after_the_first(case):
    """After the first step (which creates the state), steps allocate no arrays: what
    tracemalloc sees is Python's bookkeeping (small lists), a tiny fraction of one buffer."""
    name, hp = case
    params = [np.zeros(250_000, np.float32), np.zeros((300, 100), np.float32)]
    grads = [np.full(p.shape, 1e-3, np.float32) for p in params]
    opt = getattr(ok, name)(params, **hp)
    opt.step(grads)
    opt.step(grads, max_grad_norm=10.0)
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(5):
            opt.step(grads)
            opt.step(grads, max_grad_norm=10.0, skip_if_nonfinite=True)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current - base < 1_000, "steps kept memory"
    assert peak - base < 20_000, "a step allocated more than bookkeeping (one buffer is 1 MB)"


def test_benchmark_runs_end_to_end(tmp_path, capsys):
    """A tiny run of `python -m optkern bench` (timings are not asserted: this is not a
    benchmark, only a check that it works and writes what it says)."""
    from optkern.__main__ import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--optimizers",
                "sgd",
                "adam",
                "--sizes",
                "1k",
                "20k",
                "--repeats",
                "1",
                "--studies",
                "main",
                "small",
                "--no-torch",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "Adam" in text and "SGD" in text and "overhead per buffer" in text
    import json

    data = json.loads(out.read_text())
    assert {r["optimizer"] for r in data["main"]} == {"sgd", "adam"}
    assert all(r["optkern"]["seconds"] > 0 for r in data["main"])
