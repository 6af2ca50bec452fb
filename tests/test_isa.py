"""Every compiled ISA's kernels in one process (Highway-style per-target tests): each rule and
option set against the float64 reference on every ISA this machine runs, and the ISAs against each
other. The end-to-end OPTKERN_FORCE_ISA runs are the smoke tests of test_smoke.py."""

import numpy as np
import pytest
from helpers import bits, gradient_sequence, make
from optim_db import CASES, case_id
from reference import Reference
from test_reference import check_against_reference, grads_for, initial

import optkern as ok

ISAS = ok.available_isas()
SIZES = [17, 1023, pytest.param(100003, marks=pytest.mark.slow)]  # see test_reference.SIZES
# The active ISA's kernels meet the reference in test_reference.py (the same sizes, unaligned,
# and more): here every other one.
OTHER_ISAS = [isa for isa in ISAS if isa != ok.active_isa()]


@pytest.mark.parametrize("isa", OTHER_ISAS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_isa_matches_reference(case, size, isa):
    name, hp = case
    p0 = initial(size)
    p = make(p0, "unaligned")
    opt = getattr(ok, name)([p], **hp)
    opt._isa = isa
    ref = Reference(name, p0, **hp)
    for g in grads_for(size):
        opt.step([make(g, "unaligned")])
        ref.step(g)
    check_against_reference(opt, [p], [ref])


def run_on(isa, name, hp, threads=None, size=4099, steps=25):
    if threads is not None:
        ok.set_num_threads(threads)
        ok._core._testing.set_min_elements_per_thread(64)
    p = (np.random.default_rng(3).standard_normal(size) * 0.5).astype(np.float32)
    opt = getattr(ok, name)([p], **hp)
    opt._isa = isa
    for g in gradient_sequence(size, steps, seed=9, scale=0.1):
        opt.step([g])
    return p, opt.state.get(p, {})


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_isas_agree(case):
    """FMA builds (avx2, avx512) compute the same expressions: bit-identical; the scalar build
    (no FMA) within a few float32 roundings of them."""
    name, hp = case
    results = {isa: run_on(isa, name, hp) for isa in ISAS}
    fma = [i for i in ISAS if i != "scalar"]
    for isa in fma[1:]:
        assert bits(results[isa][0]) == bits(results[fma[0]][0]), isa
        for k, v in results[isa][1].items():
            if isinstance(v, np.ndarray):
                assert bits(v) == bits(results[fma[0]][1][k]), (isa, k)
    for isa in ISAS[1:]:
        np.testing.assert_allclose(results[isa][0], results["scalar"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_threads_do_not_change_results_on_any_isa(case, isa):
    name, hp = case
    one = run_on(isa, name, hp, threads=1)[0]
    two = run_on(isa, name, hp, threads=2)[0]
    assert bits(one) == bits(two)


def test_unknown_isa_is_refused():
    p, g = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="isa='sse9' is not available"):
        ok._core.step("sgd", [p], [g], {}, {"lr": 0.1}, isa="sse9")
    assert not p.any()
