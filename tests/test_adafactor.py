"""Adafactor, the factored kernel: against its float64 reference over every option and shapes of
1, 2 and 3 dimensions (one row, one column, odd sizes, empty arrays), on every compiled ISA;
bit-identical for 1, 2 and 3 threads; the functional form; and arrays or state of the wrong shape
refused with nothing changed. Parity with torch is in test_torch_parity_optim_db.py."""

import warnings

import numpy as np
import pytest
from helpers import bits, digest, make
from optim_db import CASES, case_id
from reference import Reference

import optkern as ok
from optkern import functional as F

ISAS = ok.available_isas()
OPTIONS = [hp for name, hp in CASES if name == "Adafactor"] + [
    dict(lr=0.05, eps=(None, 1e-2), weight_decay=0.01, d=2.0),
]
# 1-, 2- and 3-D; one row, one column; odd sizes past the vector widths and the tile sizes;
# empty arrays of every kind (no rows, no columns, no matrices).
SHAPES = [
    (37,),
    (5, 7),
    (1, 9),
    (9, 1),
    (3, 4, 5),
    (130, 3),
    (67, 129),
    (2, 3, 1, 33),
    (3, 17000),  # rows longer than the kernel's column block (16384) and its float runs (1024)
    (1, 70000),  # one row in many column tiles
    (20, 17000),  # two row tiles by three column tiles
    (50000, 3),  # tall and narrow: many ranges of rows in the host step
    (2, 3, 17000),  # a batch of one-row-tile matrices, each in three column tiles
    (2, 0, 17000),
    (1,),
    (0,),
    (0, 5),
    (4, 0),
    (0, 3, 4),
]
STEPS = 30
RTOL, ATOL = 1e-5, 1e-6


def initial(shapes, seed=1):
    rng = np.random.default_rng(seed)
    return [(0.5 * rng.standard_normal(s)).astype(np.float32) for s in shapes]


def gradients(shapes, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return [
        [(0.1 * rng.standard_normal(s) + 0.02).astype(np.float32) for s in shapes]
        for _ in range(steps)
    ]


def close(actual, expected, what):
    expected = np.asarray(expected, np.float64)
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(np.max(finite, initial=0.0)))
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=RTOL, atol=ATOL * scale, err_msg=what
    )


def state_names(shape):
    return {"step", "row_var", "col_var"} if len(shape) >= 2 else {"step", "variance"}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["aligned", "unaligned"])
@pytest.mark.parametrize("hp", OPTIONS, ids=lambda hp: case_id(("Adafactor", hp)))
def test_matches_reference_on_every_shape_and_isa(hp, layout, isa):
    p0 = initial(SHAPES)
    params = [make(p, layout) for p in p0]
    opt = ok.Adafactor(params, **hp)
    opt._isa = isa
    refs = [Reference("Adafactor", p, **hp) for p in p0]
    for gs in gradients(SHAPES):
        opt.step([make(g, layout) for g in gs])
        with warnings.catch_warnings():  # NumPy's mean of an empty array of factors
            warnings.simplefilter("ignore", RuntimeWarning)
            for r, g in zip(refs, gs):
                r.step(g)
    for shape, p, r in zip(SHAPES, params, refs):
        with np.errstate(invalid="ignore"):
            close(p, r.p, f"param {shape}")
        state = opt.state[p]
        assert set(state) == state_names(shape) == set(r.state), shape
        assert state["step"] == STEPS
        for key, value in r.state.items():
            if key != "step":
                assert state[key].shape == value.shape, (shape, key)
                close(state[key], value, f"{key} of {shape}")


def test_factored_state_is_small_and_torch_shaped():
    w, b = np.zeros((300, 200), np.float32), np.zeros(200, np.float32)
    opt = ok.Adafactor([w, b])
    opt.step([np.ones_like(w), np.ones_like(b)])
    assert opt.state[w]["row_var"].shape == (300, 1)
    assert opt.state[w]["col_var"].shape == (1, 200)
    assert "variance" not in opt.state[w] and "row_var" not in opt.state[b]
    assert opt.state[b]["variance"].shape == (200,)


def run(shapes, hp, threads, isa=None, steps=12):
    ok.set_num_threads(threads)
    ok._core._testing.set_min_elements_per_thread(64)
    params = initial(shapes, seed=5)
    opt = ok.Adafactor(params, **hp)
    opt._isa = isa
    for gs in gradients(shapes, steps, seed=7):
        opt.step(gs)
    return params, opt


@pytest.mark.parametrize("isa", ISAS)
def test_bit_identical_for_any_thread_count(isa):
    before = ok.get_num_threads(), ok._core._testing.min_elements_per_thread()
    shapes = [(300, 257), (3, 70, 90), (5000,), (9, 1), (1, 2000), (1, 70000), (3, 50000)]
    shapes += [(50000, 3), (20, 17000), (2, 17, 17000), (4, 3, 17000)] + [(4, 5)] * 20
    try:
        results = [run(shapes, dict(weight_decay=0.1), n, isa) for n in (1, 2, 3)]
    finally:
        ok.set_num_threads(before[0])
        ok._core._testing.set_min_elements_per_thread(before[1])
    (p1, o1), *rest = results
    for pn, on in rest:
        for a, b in zip(p1, pn):
            assert bits(a) == bits(b)
            for k, v in o1.state[a].items():
                if isinstance(v, np.ndarray):
                    assert bits(v) == bits(on.state[b][k]), k


def test_isas_agree():
    shapes = [(67, 129), (301,), (2, 9, 40)]
    results = {isa: run(shapes, dict(weight_decay=0.1), 1, isa)[0] for isa in ISAS}
    fma = [i for i in ISAS if i != "scalar"]
    for isa in fma[1:]:
        for a, b in zip(results[isa], results[fma[0]]):
            assert bits(a) == bits(b), isa
    for isa in ISAS[1:]:
        for a, b in zip(results[isa], results["scalar"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_functional_matches_the_class():
    shapes = [(6, 5), (11,), (2, 3, 4)]
    p0 = initial(shapes)
    mine = [p.copy() for p in p0]
    opt = ok.Adafactor([p.copy() for p in p0], lr=0.02, weight_decay=0.1)
    rows = [np.zeros((6, 1), np.float32), None, np.zeros((2, 3, 1), np.float32)]
    cols = [np.zeros((1, 5), np.float32), None, np.zeros((2, 1, 4), np.float32)]
    variances = [None, np.zeros(11, np.float32), None]
    for t, gs in enumerate(gradients(shapes, 10), start=1):
        F.adafactor_(mine, gs, rows, cols, variances, step=t, lr=0.02, weight_decay=0.1)
        opt.step(gs)
    for a, b in zip(mine, opt.param_groups[0]["params"]):
        assert bits(a) == bits(b)
    assert bits(rows[0]) == bits(opt.state[opt.param_groups[0]["params"][0]]["row_var"])


def test_eps1_none_is_float32_epsilon_and_kept_as_none():
    opt = ok.Adafactor([np.zeros(3, np.float32)])
    assert opt.param_groups[0]["eps"] == (None, 1e-3)
    assert opt.state_dict()["param_groups"][0]["eps"] == (None, 1e-3)
    shapes = [(4, 6)]
    a, b = initial(shapes), initial(shapes)
    oa = ok.Adafactor(a, eps=(None, 1e-3))
    ob = ok.Adafactor(b, eps=(float(np.finfo(np.float32).eps), 1e-3))
    for gs in gradients(shapes, 5):
        oa.step(gs)
        ob.step(gs)
    assert bits(a[0]) == bits(b[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta2_decay=0.1), "beta2_decay must be <= 0"),
        (dict(d=0.5), "d must be >= 1"),
        (dict(eps=(-1.0, 1e-3)), "eps1 must be >= 0"),
        (dict(eps=(None, None)), "eps2 must be a real number"),
        (dict(lr=-1.0), "lr must be >= 0"),
    ],
)
def test_torchs_ranges_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ok.Adafactor([np.zeros(3, np.float32)], **kwargs)


# -- hostile inputs: refused with nothing changed -------------------------------------------------


def functional_args():
    p = [np.ones((4, 3), np.float32), np.ones(5, np.float32)]
    g = [np.full((4, 3), 0.5, np.float32), np.full(5, 0.5, np.float32)]
    rows = [np.zeros((4, 1), np.float32), None]
    cols = [np.zeros((1, 3), np.float32), None]
    variances = [None, np.zeros(5, np.float32)]
    return p, g, rows, cols, variances


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a[2].__setitem__(0, np.zeros((4, 3), np.float32)), r"needs \(4, 1\)"),
        (lambda a: a[3].__setitem__(0, np.zeros((3, 1), np.float32)), r"needs \(1, 3\)"),
        (lambda a: a[3].__setitem__(0, np.zeros((1, 3, 1), np.float32)), r"needs \(1, 3\)"),
        (lambda a: a[2].__setitem__(0, None), "is None, but a 2-d parameter needs it"),
        (lambda a: a[4].__setitem__(1, None), "is None, but a 1-d parameter needs it"),
        (lambda a: a[4].__setitem__(0, np.zeros((4, 3), np.float32)), "must be None"),
        (lambda a: a[2].__setitem__(1, np.zeros((5, 1), np.float32)), "must be None"),
        (lambda a: a[4].__setitem__(1, np.zeros(4, np.float32)), "has shape"),
        (lambda a: a[2].__setitem__(0, np.zeros((4, 1), np.float64)), "float32"),
        (lambda a: a[3].__setitem__(0, a[2][0].reshape(1, 4)[:, :3]), "shares memory"),
    ],
)
def test_functional_refuses_bad_state_and_changes_nothing(change, match):
    args = functional_args()
    change(args)
    before = digest([x for lst in args for x in lst if x is not None])
    with pytest.raises((ValueError, TypeError), match=match):
        F.adafactor_(*args, step=1)
    assert digest([x for lst in args for x in lst if x is not None]) == before


def trained(shapes, steps=3):
    params = initial(shapes)
    opt = ok.Adafactor(params)
    for gs in gradients(shapes, steps):
        opt.step(gs)
    return params, opt


def test_load_refuses_state_of_another_shape_and_changes_nothing():
    params, opt = trained([(4, 3), (5,)])
    good = opt.state_dict()
    before = digest([opt.state_dict()["state"], *params])

    def attempt(sd, match):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert digest([opt.state_dict()["state"], *params]) == before

    # state of a 1-D parameter loaded for the 2-D one
    sd = opt.state_dict()
    sd["state"][0] = sd["state"][1]
    attempt(sd, "keeps no 'variance'")
    # row factor of the wrong shape; a full-size second moment for a factored parameter
    sd = opt.state_dict()
    sd["state"][0]["row_var"] = np.zeros((3, 1), np.float32)
    attempt(sd, r"needs \(4, 1\)")
    sd = opt.state_dict()
    sd["state"][0]["col_var"] = np.zeros((4, 3), np.float32)
    attempt(sd, r"needs \(1, 3\)")
    # a needed state None (as torch writes absent ones) or missing
    sd = opt.state_dict()
    sd["state"][0]["row_var"] = None
    attempt(sd, "lacks 'row_var'")
    sd = opt.state_dict()
    del sd["state"][1]["variance"]
    attempt(sd, "lacks 'variance'")
    # what torch writes for a state the shape does not call for: None, skipped
    sd = opt.state_dict()
    sd["state"][1]["row_var"] = None
    opt.load_state_dict(sd)
    opt.load_state_dict(good)


def test_step_with_a_state_of_the_wrong_shape_changes_nothing():
    params, opt = trained([(4, 3), (5,)])
    opt.state[params[0]]["row_var"] = np.zeros((4, 3), np.float32)
    before = digest([params, opt.state[params[0]], opt.state[params[1]]])
    with pytest.raises(ValueError, match=r"needs \(4, 1\)"):
        opt.step([np.ones((4, 3), np.float32), np.ones(5, np.float32)])
    assert digest([params, opt.state[params[0]], opt.state[params[1]]]) == before
