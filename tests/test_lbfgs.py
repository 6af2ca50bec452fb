"""optkern.LBFGS against a float64 reference of torch.optim.LBFGS (tests/reference_algos.py):
trajectories on Rosenbrock, logistic regression and an ill-conditioned quadratic, with and
without the strong-Wolfe line search, with the history full and wrapping; the fused passes on
every ISA against NumPy; bit-identical results for any thread count; state dicts; bad input."""

import math

import numpy as np
import pytest

import optkern as ok
from helpers import digest
from reference_algos import LBFGSRef, logistic_problem, rosenbrock, split

ISAS = ok.available_isas()


def run_pair(f, x0, steps, shapes=None, **kw):
    """optkern.LBFGS (float32, parameters of ``shapes``) and the float64 reference, ``steps``
    steps each on the same problem; returns (optimizer, its parameters, reference)."""
    shapes = shapes or [(x0.size,)]
    ref = LBFGSRef(x0, **kw)
    params = [p.astype(np.float32).copy() for p in split(np.asarray(x0, np.float64), shapes)]
    opt = ok.LBFGS(params, **kw)

    def closure():
        x = np.concatenate([p.ravel() for p in params]).astype(np.float64)
        loss, g = f(x)
        return loss, [a.astype(np.float32) for a in split(g, shapes)]

    for _ in range(steps):
        ref.step(f)
        opt.step(closure)
    return opt, params, ref


def flat(params):
    return np.concatenate([p.ravel() for p in params]).astype(np.float64)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("history_size", [100, 3])
def test_logistic_regression_matches_reference(line_search_fn, history_size):
    _, _, f = logistic_problem(n=300, dim=12, seed=1)
    opt, params, ref = run_pair(
        f, np.zeros(13), 4, shapes=[(3, 4), (1,)], history_size=history_size,
        line_search_fn=line_search_fn,
    )  # fmt: skip
    np.testing.assert_allclose(flat(params), ref.x, rtol=1e-4, atol=2e-6)
    st = opt.state[params[0]]
    assert abs(st["func_evals"] - ref.state["func_evals"]) <= 2
    assert f(flat(params))[0] == pytest.approx(f(ref.x)[0], rel=1e-6)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_rosenbrock_matches_reference(line_search_fn):
    # Rosenbrock's valley amplifies rounding: compare the first steps tightly, then the minimum.
    x0 = np.array([-1.2, 1.0, 0.5, -0.3, 1.5])
    lr = 1.0 if line_search_fn else 0.1
    opt, params, ref = run_pair(rosenbrock, x0, 1, line_search_fn=line_search_fn, lr=lr)
    np.testing.assert_allclose(flat(params), ref.x, rtol=1e-4, atol=1e-4)
    assert opt.state[params[0]]["func_evals"] == ref.state["func_evals"]
    opt, params, ref = run_pair(
        rosenbrock, np.array([-1.2, 1.0]), 10, line_search_fn="strong_wolfe", max_iter=50
    )
    np.testing.assert_allclose(flat(params), [1.0, 1.0], atol=1e-3)
    np.testing.assert_allclose(ref.x, [1.0, 1.0], atol=1e-3)


def quadratic(n, seed=0, lo=0.1, hi=10.0):
    """0.5 sum a_i (x_i - c_i)^2, a log-uniform in [lo, hi] (float64)."""
    rng = np.random.default_rng(seed)
    a = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    c = rng.standard_normal(n)

    def f(x):
        r = x - c
        return 0.5 * float(np.sum(a * r * r)), a * r

    return f


def test_history_wraps():
    # history_size 5 fills in the first step and wraps many times; sizes cross the 4096-element
    # blocks and the vector lanes (5000 + 3 + 4097 elements in three arrays).
    f = quadratic(9100)
    shapes = [(50, 100), (3,), (4097,)]
    opt, params, ref = run_pair(f, np.zeros(9100), 3, shapes=shapes, history_size=5)
    st = opt.state[params[0]]
    assert len(st["old_dirs"]) == len(ref.state["old_dirs"]) == 5
    assert st["func_evals"] == ref.state["func_evals"] == 60
    np.testing.assert_allclose(flat(params), ref.x, atol=2e-5)
    for mine, theirs in zip(st["old_stps"], ref.state["old_stps"]):
        np.testing.assert_allclose(mine, theirs, atol=2e-5)
    # y = g - g_prev in float32 loses relative precision as the gradient shrinks (torch's too)
    np.testing.assert_allclose(st["ro"], ref.state["ro"], rtol=5e-2)
    assert st["H_diag"] == pytest.approx(ref.state["H_diag"], rel=5e-2)


def test_history_wraps_with_line_search():
    # With the line search, float32 and float64 runs take different branches of it on this
    # problem (torch's float32 LBFGS leaves its float64 run as ours does; test_lbfgs_torch.py
    # compares with torch in float32): both reach the minimum.
    f = quadratic(9100, seed=2)
    shapes = [(50, 100), (3,), (4097,)]
    opt, params, ref = run_pair(
        f, np.zeros(9100), 4, shapes=shapes, history_size=5, line_search_fn="strong_wolfe"
    )
    assert len(opt.state[params[0]]["old_dirs"]) == 5
    assert f(flat(params))[0] < 1e-4 * f(np.zeros(9100))[0]
    np.testing.assert_allclose(flat(params), ref.x, atol=2e-2)


def test_state_dict_has_torchs_layout_and_resumes_identically():
    f = quadratic(700, seed=3)
    shapes = [(20, 30), (100,)]
    opt, params, _ = run_pair(f, np.zeros(700), 2, shapes=shapes, history_size=7)
    sd = opt.state_dict()
    assert list(sd["state"]) == [0]
    st = sd["state"][0]
    assert set(st) == {
        "func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
        "prev_flat_grad", "prev_loss", "al",
    }  # fmt: skip
    assert st["d"].shape == (700,) and st["d"].dtype == np.float32
    assert len(st["old_dirs"]) == len(st["old_stps"]) == len(st["ro"]) == 7
    assert len(st["al"]) == 7
    assert sd["param_groups"][0]["max_eval"] == 25
    # a copy: stepping on does not change it
    before = digest([sd])
    clone = [p.copy() for p in params]
    other = ok.LBFGS(clone, history_size=7)
    other.load_state_dict(sd)

    def closure_for(ps):
        def closure():
            loss, g = f(flat(ps))
            return loss, [a.astype(np.float32) for a in split(g, shapes)]

        return closure

    for _ in range(2):
        opt.step(closure_for(params))
        other.step(closure_for(clone))
    assert digest([sd]) == before
    for a, b in zip(params, clone):
        np.testing.assert_array_equal(a, b)


def run_bits(threads, isa=None):
    ok.set_num_threads(threads)
    ok._core._testing.set_min_elements_per_thread(64)
    f = quadratic(20000, seed=5)
    shapes = [(100, 150), (5000,)]
    params = [np.zeros(s, np.float32) for s in shapes]
    opt = ok.LBFGS(params, history_size=6, line_search_fn="strong_wolfe")

    def closure():
        loss, g = f(flat(params))
        return loss, [a.astype(np.float32) for a in split(g, shapes)]

    for _ in range(3):
        opt.step(closure)
    return digest([params, opt.state_dict()["state"]])


def test_bit_identical_for_any_thread_count():
    one = run_bits(1)
    assert run_bits(2) == one
    assert run_bits(3) == one


@pytest.mark.parametrize("isa", ISAS)
def test_passes_match_numpy(isa):
    rng = np.random.default_rng(7)
    sizes = [4097, 3, 300]
    n = sum(sizes)
    g = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    gf = np.concatenate(g)
    gp = rng.standard_normal(n).astype(np.float32)
    d = rng.standard_normal(n).astype(np.float32)
    S = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    Y = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    y, s = np.empty(n, np.float32), np.empty(n, np.float32)
    gp0 = gp.copy()
    new, per = ok._core.lbfgs_history(g, gp, d, 0.75, y, s, S, Y, isa=isa)
    np.testing.assert_array_equal(y, gf - gp0)
    np.testing.assert_allclose(s, np.float32(0.75) * d, rtol=1e-7)
    np.testing.assert_array_equal(gp, gf)
    f64 = [v.astype(np.float64) for v in (y, s, gf)]
    np.testing.assert_allclose(
        new, [f64[0] @ f64[1], f64[0] @ f64[0], f64[2] @ f64[1], f64[2] @ f64[0]], rtol=1e-5
    )
    for j in range(4):
        sj, yj = S[j].astype(np.float64), Y[j].astype(np.float64)
        want = [sj @ f64[0], sj @ f64[2], yj @ f64[0], yj @ f64[1], yj @ f64[2]]
        np.testing.assert_allclose(per[j], want, rtol=1e-4, atol=1e-3)
    cs, cy = [0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, 3.0]
    gtd, dmax = ok._core.lbfgs_direction(g, -0.3, S, cs, Y, cy, d, isa=isa)
    want = -0.3 * gf.astype(np.float64) + sum(
        b * yj.astype(np.float64) + a * sj.astype(np.float64) for sj, yj, a, b in zip(S, Y, cs, cy)
    )
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-5)
    assert gtd == pytest.approx(float(gf.astype(np.float64) @ d.astype(np.float64)), rel=1e-5)
    assert dmax == float(np.max(np.abs(d)))
    out = np.empty(n, np.float32)
    gtd, gmax = ok._core.lbfgs_take(g, out, d, isa=isa)
    np.testing.assert_array_equal(out, gf)
    assert gmax == float(np.max(np.abs(gf)))
    params = [np.empty(sz, np.float32) for sz in sizes]
    x = rng.standard_normal(n).astype(np.float32)
    ok._core.lbfgs_point(params, x, d, -0.5, isa=isa)
    np.testing.assert_allclose(np.concatenate(params), x + np.float32(-0.5) * d, rtol=1e-6, atol=1e-6)


def test_nan_gradient_max_is_nan():
    g = [np.array([1.0, np.nan, -3.0], np.float32)]
    out, d = np.empty(3, np.float32), np.ones(3, np.float32)
    _, gmax = ok._core.lbfgs_take(g, out, d)
    assert math.isnan(gmax)


# -- bad input ------------------------------------------------------------------------------------


def test_one_param_group_only():
    a, b = np.zeros(3, np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="doesn't support per-parameter options"):
        ok.LBFGS([{"params": [a]}, {"params": [b]}])
    opt = ok.LBFGS([a])
    with pytest.raises(ValueError, match="doesn't support per-parameter options"):
        opt.add_param_group({"params": [b]})


@pytest.mark.parametrize(
    "kw, err",
    [
        ({"lr": -1.0}, ValueError),
        ({"lr": float("nan")}, ValueError),
        ({"max_iter": 2.5}, TypeError),
        ({"max_iter": -1}, ValueError),
        ({"history_size": 0}, ValueError),
        ({"max_eval": "10"}, TypeError),
        ({"line_search_fn": "armijo"}, ValueError),
        ({"tolerance_grad": "x"}, TypeError),
        ({"differentiable": True}, ValueError),
    ],
)
def test_bad_hyperparameters(kw, err):
    with pytest.raises(err):
        ok.LBFGS([np.zeros(3, np.float32)], **kw)


def test_float64_refused_naming_the_argument():
    # LBFGS's fused passes are float32 only
    with pytest.raises(TypeError, match=r"params\[1\] must be a float32 array, got dtype float64"):
        ok.LBFGS([np.zeros(3, np.float32), np.zeros(2, np.float64)])
    p = np.ones(3, np.float32)
    opt = ok.LBFGS([p])
    with pytest.raises(TypeError, match=r"grads\[0\] must be a float32 array, got dtype float64"):
        opt.step(lambda: (1.0, [np.ones(3, np.float64)]))
    np.testing.assert_array_equal(p, 1.0)


def test_bad_closures_change_nothing():
    p = np.ones(4, np.float32)
    opt = ok.LBFGS([p])
    good = (1.0, [np.ones(4, np.float32)])
    cases = [
        (lambda: 1.0, TypeError),
        (lambda: (1.0, np.ones(4, np.float32)), TypeError),
        (lambda: (1.0, [np.ones(3, np.float32)]), ValueError),
        (lambda: (1.0, [np.ones(4, np.float64)]), TypeError),
        (lambda: (1.0, [np.ones(4, np.float32), np.ones(4, np.float32)]), ValueError),
        (lambda: ("loss", good[1]), TypeError),
    ]
    for closure, err in cases:
        with pytest.raises(err):
            opt.step(closure)
        np.testing.assert_array_equal(p, 1.0)
    with pytest.raises(TypeError, match="closure"):
        opt.step([np.ones(4, np.float32)])


def test_none_gradient_is_zero():
    a, b = np.ones(3, np.float32), np.ones(2, np.float32)
    opt = ok.LBFGS([a, b], lr=0.1, max_iter=3)

    def closure():
        return float(np.sum(a * a)), [2 * a, None]

    opt.step(closure)
    np.testing.assert_array_equal(b, 1.0)
    assert np.all(a < 1.0)


def test_returns_first_loss_and_stops_at_optimum():
    p = np.zeros(3, np.float32)
    opt = ok.LBFGS([p])
    calls = []

    def closure():
        calls.append(1)
        return 7.0, [np.zeros(3, np.float32)]

    assert opt.step(closure) == 7.0
    assert len(calls) == 1 and opt.state[p]["func_evals"] == 1 and opt.state[p]["n_iter"] == 0


def test_written_arrays_must_be_separate():
    n = 8
    g = [np.ones(n, np.float32)]
    gp = np.zeros(n, np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        ok._core.lbfgs_history(g, gp, gp, 1.0, np.empty(n, np.float32), gp, [], [])
    with pytest.raises(ValueError, match="elements"):
        ok._core.lbfgs_take(g, np.empty(n + 1, np.float32), np.empty(n, np.float32))
    with pytest.raises(TypeError):
        ok._core.lbfgs_take(g, np.empty(n, np.float64), np.empty(n, np.float32))
    with pytest.raises(ValueError, match="read-only"):
        ro = np.empty(n, np.float32)
        ro.flags.writeable = False
        ok._core.lbfgs_take(g, ro, np.empty(n, np.float32))
