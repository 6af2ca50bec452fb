"""optkern's new rules against their oracles, in float32, over many steps: Lion against optax.lion
and the lion-pytorch package; Rprop against torch.optim.Rprop on every input of torch's optimizer
test database (optim_db), single-tensor and foreach; LAMB against optax.lamb; AdEMAMix against
optax.contrib.ademamix. Each test needs its oracle and skips cleanly without it; the oracle stage
of CI (.ci/oracles.sh) installs them all and fails on such a skip.

The float64 references of tests/reference.py cover every option without the oracles; here the
kernels meet the oracles' own float32 arithmetic.
"""

from __future__ import annotations

import numpy as np
import optim_db as db
import pytest

import optkern as ok

STEPS = 30
SHAPES = [(37,), (5, 7), (1,), (64, 33), (2, 3, 4)]


def initial(shapes, seed=1):
    rng = np.random.default_rng(seed)
    return [(0.5 * rng.standard_normal(s)).astype(np.float32) for s in shapes]


def gradients(shapes, steps=STEPS, seed=2):
    """Per step, one float32 gradient per shape: N(0, 0.1^2) plus a bias, so signs persist over
    a few steps and flip at others."""
    rng = np.random.default_rng(seed)
    bias = [0.05 * rng.standard_normal(s) for s in shapes]
    return [
        [(0.1 * rng.standard_normal(s) + b).astype(np.float32) for s, b in zip(shapes, bias)]
        for _ in range(steps)
    ]


def assert_close(actual, desired, what, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(desired), rtol=rtol, atol=atol, err_msg=what
    )


# -- Lion: optax.lion and lion-pytorch -------------------------------------------------------------


def oracle_cases(name):
    """The option sets of ``name`` checked against its oracles: the database's oracle cases, and
    its reference cases with maximize (the oracles step on -g there)."""
    e = db.entry(name)
    return list(e.oracle_cases) + [hp for hp in e.cases if hp.get("maximize")]


LION_CASES = oracle_cases("Lion")


def lion_id(hp):
    return ",".join(f"{k}={v}" for k, v in hp.items()) or "defaults"


def run_optax_lion(hp, p0, grads):
    params, inner = run_optax("Lion", hp, p0, grads)
    return params, [np.asarray(inner.mu[f"p{i}"]) for i in range(len(p0))]


def run_optax(name, hp, p0, grads):
    """``name``'s optax oracle (optim_db), float32, from p0 over the gradient steps; maximize as
    steps on -g. Returns the params and optax's inner state (its moments, and count)."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    oracle = db.entry(name).oracle("optax")
    tx = oracle.load()(**oracle.kwargs(db.entry(name), hp))
    sign = -1.0 if hp.get("maximize", False) else 1.0  # optax has no maximize: it steps on -g
    params = {f"p{i}": jnp.asarray(x) for i, x in enumerate(p0)}
    state = tx.init(params)
    for gs in grads:
        g = {f"p{i}": jnp.asarray(sign * x) for i, x in enumerate(gs)}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return [np.asarray(params[f"p{i}"]) for i in range(len(p0))], state[0]


def run_optkern(name, hp, p0, grads):
    params = [x.copy() for x in p0]
    opt = getattr(ok, name)(params, **hp)
    for gs in grads:
        opt.step(gs)
    return params, opt


@pytest.mark.parametrize("hp", LION_CASES, ids=lion_id)
def test_lion_matches_optax(hp):
    p0, grads = initial(SHAPES), gradients(SHAPES)
    want_p, want_m = run_optax_lion(hp, p0, grads)
    params, opt = run_optkern("Lion", hp, p0, grads)
    for i, p in enumerate(params):
        assert p.dtype == want_p[i].dtype == np.float32
        assert_close(p, want_p[i], f"param {i}")
        assert set(opt.state[p]) == {"exp_avg"}  # lion-pytorch's name, no step count
        assert_close(opt.state[p]["exp_avg"], want_m[i], f"exp_avg {i}")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_lion_nonfinite_gradients_as_optax(bad):
    """jnp.sign(NaN) is NaN: a NaN gradient makes its element NaN in optax, and in optkern."""
    shapes = [(37,), (5, 7)]
    p0, grads = initial(shapes), gradients(shapes, steps=10)
    grads[3][0][[1, 4]] = bad
    hp = dict(lr=1e-3, weight_decay=0.1)
    want_p, want_m = run_optax_lion(hp, p0, grads)
    params, opt = run_optkern("Lion", hp, p0, grads)
    for i, p in enumerate(params):
        np.testing.assert_array_equal(np.isnan(p), np.isnan(want_p[i]))
        np.testing.assert_array_equal(np.isinf(opt.state[p]["exp_avg"]), np.isinf(want_m[i]))
        assert_close(p, want_p[i], f"param {i}")
    assert np.isnan(params[0][[1, 4]]).all() == (bad != bad)


@pytest.mark.parametrize("hp", [h for h in LION_CASES if not h.get("maximize")], ids=lion_id)
def test_lion_matches_lion_pytorch(hp):
    """lion-pytorch decays p before the signed step (p (1 - lr wd) - lr sign), optax adds wd p to
    the signed step: the same update up to rounding. Its state is exp_avg alone, as optkern's."""
    torch = pytest.importorskip("torch")
    lion_pytorch = pytest.importorskip("lion_pytorch")
    p0, grads = initial(SHAPES), gradients(SHAPES)
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
    topt = lion_pytorch.Lion(tparams, **hp)
    for gs in grads:
        for tp, g in zip(tparams, gs):
            tp.grad = torch.tensor(g)
        topt.step()
    params, opt = run_optkern("Lion", hp, p0, grads)
    sd = opt.state_dict()
    for i, (p, tp) in enumerate(zip(params, tparams)):
        assert_close(p, tp.detach().numpy(), f"param {i}")
        assert set(topt.state[tp]) == set(opt.state[p]) == set(sd["state"][i]) == {"exp_avg"}
        assert_close(opt.state[p]["exp_avg"], topt.state[tp]["exp_avg"].numpy(), f"exp_avg {i}")


def test_lion_defaults_are_lion_pytorchs():
    import inspect

    lion_pytorch = pytest.importorskip("lion_pytorch")
    theirs = inspect.signature(lion_pytorch.Lion).parameters
    mine = inspect.signature(ok.Lion).parameters
    for key in ("lr", "betas", "weight_decay"):
        assert theirs[key].default == mine[key].default, key


# -- Rprop: every input torch's optimizer test database gives for it -------------------------------


def rprop_optim_db_inputs():
    """(kwargs, desc) of every OptimizerInput optim_db gives for Rprop on CPU in float32, with
    torch's execution flags (differentiable), or one skip when torch or its test helpers are
    absent."""
    try:
        import torch
        from torch.testing._internal import common_optimizers as co
    except Exception as exc:  # torch, or expecttest (a test-only dependency of optim_db)
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"could not import torch: {exc}"))]
    (info,) = [i for i in co.optim_db if i.name == "Rprop"]
    inputs = co._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
    return [pytest.param(inp.kwargs, id=inp.desc) for inp in inputs]


RPROP_SHAPES = [(7, 13), (131,), (3, 5, 11), (1,)]


@pytest.mark.parametrize("impl", ["single", "foreach"])
@pytest.mark.parametrize("kwargs", rprop_optim_db_inputs())
def test_rprop_matches_torch_on_optim_db(kwargs, impl):
    """30 steps of biased N(0, 0.1^2) gradients (so signs persist and flip), float32: params and
    every state buffer (step, prev, step_size) against torch's single-tensor and foreach paths.
    differentiable=True is refused by optkern, as by every optimizer class (no autograd graph);
    the update is then compared with torch's differentiable=False run."""
    torch = pytest.importorskip("torch")
    kwargs = dict(kwargs)
    if kwargs.get("differentiable"):
        with pytest.raises(ValueError, match="differentiable=True is not supported"):
            ok.Rprop([np.zeros(3, np.float32)], **kwargs)
        kwargs["differentiable"] = False
    p0, grads = initial(RPROP_SHAPES), gradients(RPROP_SHAPES)
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
    topt = torch.optim.Rprop(tparams, **kwargs, foreach=impl == "foreach")
    for gs in grads:
        for tp, g in zip(tparams, gs):
            tp.grad = torch.tensor(g)
        topt.step()
    params, opt = run_optkern("Rprop", dict(kwargs, foreach=impl == "foreach"), p0, grads)
    for i, (p, tp) in enumerate(zip(params, tparams)):
        assert_close(p, tp.detach().numpy(), f"param {i}")
        tstate, state = topt.state[tp], opt.state[p]
        assert set(state) == set(tstate) == {"step", "prev", "step_size"}
        assert state["step"] == int(tstate["step"]) == STEPS
        for key in ("prev", "step_size"):
            assert state[key].dtype == np.float32 and state[key].shape == p.shape
            assert_close(state[key], tstate[key].numpy(), f"{key} {i}")
    # the param group in torch's layout
    mine, theirs = opt.state_dict()["param_groups"][0], topt.state_dict()["param_groups"][0]
    for key in ("lr", "etas", "step_sizes", "maximize"):
        assert mine[key] == theirs[key], key


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_rprop_nonfinite_gradients_as_torch(bad):
    """torch.sign(NaN) is 0: a NaN gradient moves nothing, keeps the step size and is kept as
    prev; an infinite one moves by the step size. float32, element by element."""
    torch = pytest.importorskip("torch")
    shapes = [(37,), (5, 7)]
    p0, grads = initial(shapes), gradients(shapes, steps=12)
    for t in (3, 4, 7):
        grads[t][0][[1, 4]] = bad
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
    topt = torch.optim.Rprop(tparams, foreach=False)
    for gs in grads:
        for tp, g in zip(tparams, gs):
            tp.grad = torch.tensor(g)
        topt.step()
    params, opt = run_optkern("Rprop", {}, p0, grads)
    for p, tp in zip(params, tparams):
        np.testing.assert_array_equal(p, tp.detach().numpy())
        for key in ("prev", "step_size"):
            np.testing.assert_array_equal(opt.state[p][key], topt.state[tp][key].numpy())


def test_rprop_defaults_are_torchs():
    import inspect

    torch = pytest.importorskip("torch")
    theirs = inspect.signature(torch.optim.Rprop).parameters
    mine = inspect.signature(ok.Rprop).parameters
    for key in ("lr", "etas", "step_sizes", "maximize", "foreach", "differentiable", "capturable"):
        assert theirs[key].default == mine[key].default, key


# -- LAMB: optax.lamb ------------------------------------------------------------------------------

LAMB_CASES = oracle_cases("LAMB")
# The trust ratio is per array: one array of zeros (norm(p) = 0 until it moves) and one whose
# gradient is always zero (norm(u) = 0 without decay) take the ratio 1; one array spans several
# reduction blocks (4096 elements).
LAMB_SHAPES = SHAPES + [(6, 6), (11,), (3, 4100)]


def lamb_inputs():
    p0, grads = initial(LAMB_SHAPES), gradients(LAMB_SHAPES)
    p0[-3][...] = 0.0
    for gs in grads:
        gs[-2][...] = 0.0
    return p0, grads


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("hp", LAMB_CASES, ids=lion_id)
def test_lamb_matches_optax(hp, threads):
    p0, grads = lamb_inputs()
    want, inner = run_optax("LAMB", hp, p0, grads)
    before = ok.get_num_threads(), ok._core._testing.min_elements_per_thread()
    ok.set_num_threads(threads)
    ok._core._testing.set_min_elements_per_thread(1)
    try:
        params, opt = run_optkern("LAMB", hp, p0, grads)
    finally:
        ok.set_num_threads(before[0])
        ok._core._testing.set_min_elements_per_thread(before[1])
    for i, p in enumerate(params):
        assert_close(p, want[i], f"param {i} {LAMB_SHAPES[i]}")
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"] == int(inner.count) == STEPS
        assert_close(state["exp_avg"], np.asarray(inner.mu[f"p{i}"]), f"exp_avg {i}")
        assert_close(state["exp_avg_sq"], np.asarray(inner.nu[f"p{i}"]), f"exp_avg_sq {i}")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_lamb_nonfinite_gradients_as_optax(bad):
    """A NaN or Inf in one gradient element: the array's norm of u is NaN or Inf, and the whole
    array ends where optax's does (NaN, or NaN and zero steps); the other arrays are unaffected."""
    shapes = [(37,), (5, 7)]
    p0, grads = initial(shapes), gradients(shapes, steps=10)
    grads[3][0][[1, 4]] = bad
    hp = dict(weight_decay=0.01)
    want, inner = run_optax("LAMB", hp, p0, grads)
    params, opt = run_optkern("LAMB", hp, p0, grads)
    for i, p in enumerate(params):
        np.testing.assert_array_equal(np.isnan(p), np.isnan(want[i]))
        np.testing.assert_array_equal(np.isinf(p), np.isinf(want[i]))
        assert_close(p, want[i], f"param {i}")
        for key, theirs in (("exp_avg", inner.mu), ("exp_avg_sq", inner.nu)):
            np.testing.assert_array_equal(
                np.isnan(opt.state[p][key]), np.isnan(np.asarray(theirs[f"p{i}"])), key
            )
    assert np.isnan(params[0]).all() and np.isfinite(params[1]).all()


def test_lamb_defaults_are_optaxs():
    import inspect

    optax = pytest.importorskip("optax")
    theirs = inspect.signature(optax.lamb).parameters
    mine = inspect.signature(ok.LAMB).parameters
    assert mine["lr"].default == 1e-3  # optax's learning_rate has no default
    assert mine["betas"].default == (theirs["b1"].default, theirs["b2"].default)
    assert mine["eps"].default == theirs["eps"].default
    # optax's weight_decay default is 0.0 as well
    assert mine["weight_decay"].default == theirs["weight_decay"].default


# -- AdEMAMix: optax.contrib.ademamix ---------------------------------------------------------------

ADEMAMIX_CASES = list(db.entry("AdEMAMix").oracle_cases or db.entry("AdEMAMix").cases)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("hp", ADEMAMIX_CASES, ids=lion_id)
def test_ademamix_matches_optax(hp, threads):
    """optkern's float32 kernels against optax's float32 arithmetic, the warmups as optax
    schedules (optim_db._ademamix_schedules): parameters and the three moments."""
    p0, grads = initial(SHAPES), gradients(SHAPES, steps=60)
    want, inner = run_optax("AdEMAMix", hp, p0, grads)
    before = ok.get_num_threads(), ok._core._testing.min_elements_per_thread()
    ok.set_num_threads(threads)
    ok._core._testing.set_min_elements_per_thread(1)
    try:
        params, opt = run_optkern("AdEMAMix", hp, p0, grads)
    finally:
        ok.set_num_threads(before[0])
        ok._core._testing.set_min_elements_per_thread(before[1])
    for i, p in enumerate(params):
        assert_close(p, want[i], f"param {i} {SHAPES[i]}")
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"}
        assert state["step"] == int(inner.count) == 60
        for key, field in db.entry("AdEMAMix").oracle("optax").states:
            assert_close(state[key], np.asarray(getattr(inner, field)[f"p{i}"]), f"{key} {i}")


def test_ademamix_warmups_change_the_steps_as_optax_schedules():
    """The warmups matter far beyond the oracles' tolerance (1e-5): a run warming alpha and beta3
    up ends 1e-3 or more from one without, so the warmed-up cases above check the schedules."""
    p0, grads = initial(SHAPES), gradients(SHAPES, steps=20)
    hp = dict(lr=0.01, betas=(0.9, 0.999, 0.99))
    warm, _ = run_optkern("AdEMAMix", dict(hp, beta3_warmup=30, alpha_warmup=30), p0, grads)
    cold, _ = run_optkern("AdEMAMix", hp, p0, grads)
    assert all(np.max(np.abs(w - c)) > 1e-3 for w, c in zip(warm, cold))


def test_ademamix_defaults_are_the_authors():
    """The authors' class's defaults (optax's alpha defaults to 5.0, its lr has none); optax's
    b1, b2, b3, eps and weight_decay defaults are the same."""
    import inspect

    optax = pytest.importorskip("optax")
    theirs = inspect.signature(optax.contrib.ademamix).parameters
    mine = inspect.signature(ok.AdEMAMix).parameters
    assert mine["betas"].default == tuple(theirs[b].default for b in ("b1", "b2", "b3"))
    assert mine["eps"].default == theirs["eps"].default
    assert mine["weight_decay"].default == theirs["weight_decay"].default
    assert (mine["lr"].default, mine["alpha"].default) == (1e-3, 2.0)
    assert mine["beta3_warmup"].default is mine["alpha_warmup"].default is None
