"""The float64 references of reference.py (OracleReference) against their oracles, each skipped
when its oracle is not installed: torch.optim 2.13 (every optimizer input of torch's own test
database for that optimizer on CPU), optax (lion, lamb, contrib.ademamix), lion-pytorch and
schedulefree. Each oracle runs in float32 (its single-tensor and foreach paths) against the
float64 reference at the tolerance the kernels must meet, and in float64 against it at 1e-10,
which pins the order of operations.

Without any oracle, the invariants at the end still check the references."""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import pytest
from optim_db import ENTRIES, entry, with_oracle
from reference import OracleReference

STEPS = 30
TOL = {np.float32: (1e-5, 1e-6), np.float64: (1e-10, 1e-12)}
# Odd sizes and 0-, 1-, 2- and 3-D shapes; (1, 9) and (9, 1) are factored with one row / column.
# The last two get gradients near 1e-6, where Adafactor's eps1 floors (eps1^2 on the estimate,
# eps1 on the mean of the row factor) take effect.
SHAPES = [(), (1,), (37,), (5, 7), (1, 9), (9, 1), (3, 4, 5), (130, 3), (4, 3), (5,)]
TINY = 2


def case_id(name, hp):
    return name + "(" + ",".join(f"{k}={v}" for k, v in hp.items()) + ")"


def gradients(shapes, steps=STEPS, seed=0):
    """Per step, one float32 gradient per shape: N(0, 0.1^2) plus a bias (so Rprop meets runs of
    equal signs, not only flips) and, on every fourth step, some exact zeros (sign 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        gs = []
        for i, s in enumerate(shapes):
            g = 0.1 * rng.standard_normal(s) + 0.03
            if len(SHAPES) - TINY <= i < len(SHAPES):
                g *= 1e-5
            g = g.astype(np.float32)
            if t % 4 == 3 and g.size:
                g.reshape(-1)[rng.random(g.size) < 0.2] = 0.0
            gs.append(g)
        out.append(gs)
    return out


def initial(shapes, seed=1):
    rng = np.random.default_rng(seed)
    return [(0.5 * rng.standard_normal(s)).astype(np.float32) for s in shapes]


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    expected = np.asarray(expected, dtype=np.float64)
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(np.max(finite, initial=0.0)))  # state may be far larger than params
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol * scale, err_msg=what
    )


# -- torch.optim --------------------------------------------------------------------------------

#: Every rule whose torch oracle has inputs in torch's optim_db, and the option sets checked beside
#: them, from the optimizer database.
TORCH_RULES = tuple(e.name for e in with_oracle("torch") if e.oracle("torch").optim_db)
ORACLE_CASES = [(e.name, hp) for e in ENTRIES for hp in e.oracle_cases]
NOT_SEMANTICS = {"foreach", "differentiable", "capturable", "fused"}  # how torch runs, not what


def torch_inputs():
    """(name, kwargs) for every optim_db input of the torch rules on CPU float32, and a skip
    (with its reason) for each one whose kwargs do not apply to a float array's update."""
    try:
        import torch
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as exc:  # torch, or its test helpers (they import expecttest), absent
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"no torch oracle: {exc}"))]
    out = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in TORCH_RULES:
            continue
        sig = inspect.signature(getattr(OracleReference, "_" + name.lower())).parameters
        for oi in info.optim_inputs_func(device="cpu", dtype=torch.float32):
            kwargs = {k: v for k, v in oi.kwargs.items() if k not in NOT_SEMANTICS}
            pid = f"{name}-{oi.desc}"
            reason = None
            if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
                reason = "a Tensor hyperparameter (optkern takes floats)"
            elif oi.params is not None:
                reason = "its own params"
            elif set(kwargs) - set(sig) - {"maximize"}:
                reason = f"kwargs {sorted(set(kwargs) - set(sig))} not in the reference"
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            out.append(pytest.param(name, kwargs, id=pid, marks=marks))
    # Branches optim_db does not reach in 30 steps (ASGD's averaging from t0 on, RAdam's
    # rectification switch with other betas, Adafactor's explicit eps1) come from ORACLE_CASES.
    out += [
        pytest.param(name, hp, id="case-" + case_id(name, hp))
        for name, hp in ORACLE_CASES
        if name in TORCH_RULES
    ]
    return out


@contextlib.contextmanager
def torch_default_dtype(torch, dtype):
    # torch keeps scalar state (step, mu_product, eta, mu) in the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def torch_state_value(v):
    return v.detach().numpy() if v.ndim else float(v)


@pytest.mark.parametrize("impl", ["single", "foreach", "float64"])
@pytest.mark.parametrize("name, kwargs", torch_inputs())
def test_torch_rule_matches_reference(name, kwargs, impl):
    torch = pytest.importorskip("torch")
    dtype = np.float64 if impl == "float64" else np.float32
    tdtype = torch.float64 if impl == "float64" else torch.float32
    p0 = initial(SHAPES)
    with torch_default_dtype(torch, tdtype):
        params = [torch.nn.Parameter(torch.tensor(x, dtype=tdtype)) for x in p0]
        opt = getattr(torch.optim, name)(params, foreach=(impl == "foreach"), **kwargs)
        refs = [OracleReference(name, x, **kwargs) for x in p0]
        if impl == "float64":
            for r in refs:
                r.machine_eps = float(np.finfo(np.float64).eps)
        for gs in gradients(SHAPES):
            for p, g in zip(params, gs):
                p.grad = torch.tensor(g, dtype=tdtype)
            opt.step()
            for r, g in zip(refs, gs):
                r.step(g)
    for i, (p, r) in enumerate(zip(params, refs)):
        assert_close(p.detach().numpy(), r.p, dtype, f"param {i} {SHAPES[i]}")
        tstate = opt.state[p]
        assert set(tstate) == set(r.state), "state names differ from torch's"
        for key, value in r.state.items():
            assert_close(torch_state_value(tstate[key]), value, dtype, f"{key} of {SHAPES[i]}")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "case", [c for c in ORACLE_CASES if c[0] in TORCH_RULES], ids=lambda c: case_id(*c)
)
def test_torch_rule_nonfinite_gradients(case, bad):
    """NaN and Inf in a few gradient elements on two steps: the reference's NaN, +Inf and -Inf
    land where torch's do (float64, so that only the rule's own arithmetic decides)."""
    torch = pytest.importorskip("torch")
    name, hp = case
    shapes = [(37,), (5, 7)]
    p0 = initial(shapes)
    with torch_default_dtype(torch, torch.float64):
        params = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float64)) for x in p0]
        opt = getattr(torch.optim, name)(params, foreach=False, **hp)
        refs = [OracleReference(name, x, **hp) for x in p0]
        for r in refs:
            r.machine_eps = float(np.finfo(np.float64).eps)
        for t, gs in enumerate(gradients(shapes, 12)):
            for p, g, r in zip(params, gs, refs):
                if t in (3, 7):
                    g.reshape(-1)[[1, 4]] = bad
                p.grad = torch.tensor(g, dtype=torch.float64)
                r.step(g)
            opt.step()
    for p, r in zip(params, refs):
        np.testing.assert_allclose(p.detach().numpy(), r.p, rtol=1e-10, atol=1e-12)
        for key, value in r.state.items():
            np.testing.assert_allclose(
                torch_state_value(opt.state[p][key]), value, rtol=1e-10, atol=1e-12, err_msg=key
            )


@pytest.mark.parametrize("name", TORCH_RULES)
def test_reference_defaults_are_torchs(name):
    torch = pytest.importorskip("torch")
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    mine = inspect.signature(getattr(OracleReference, "_" + name.lower())).parameters
    for key, par in mine.items():
        if key in ("self", "g"):
            continue
        if key not in theirs:  # a switch of the reference's own (Adam's decoupled: AdamW), off
            assert par.default is False, key
            continue
        assert theirs[key].default == par.default, key
    # what torch takes and the reference lacks, optkern's class lacks too (Adam's
    # decoupled_weight_decay: optkern has AdamW for it)
    missing = set(theirs) - set(mine) - NOT_SEMANTICS - {"params", "maximize"}
    assert not missing & set(inspect.signature(entry(name).cls).parameters)


# -- optax: Lion, LAMB, AdEMAMix --------------------------------------------------------------------

#: The option sets of every rule with an optax oracle (optax has no maximize).
OPTAX_CASES = [
    (e.name, hp)
    for e in with_oracle("optax")
    for hp in (e.oracle_cases or e.cases)
    if not hp.get("maximize")
]
# The trust ratio is per array: one array of zeros (norm(p) = 0 until it moves) and one whose
# gradient is always zero (norm(u) = 0 without decay) take the ratio 1.
OPTAX_SHAPES = SHAPES + [(6, 6), (11,)]


def optax_transform(name, hp):
    oracle = entry(name).oracle("optax")
    return oracle.load()(**oracle.kwargs(entry(name), hp))


def run_optax(name, hp, dtype, bad=None):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    p0 = initial(OPTAX_SHAPES)
    p0[-2][...] = 0.0
    with jax.enable_x64(dtype == np.float64):
        tx = optax_transform(name, hp)
        params = {f"p{i}": jnp.asarray(x, dtype=dtype) for i, x in enumerate(p0)}
        state = tx.init(params)
        refs = [OracleReference(name, x, **hp) for x in p0]
        for t, gs in enumerate(gradients(OPTAX_SHAPES)):
            gs[-1][...] = 0.0
            if bad is not None and t in (3, 7):
                gs[2][[1, 4]] = bad  # the (37,) array
            grads = {f"p{i}": jnp.asarray(g, dtype=dtype) for i, g in enumerate(gs)}
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            for r, g in zip(refs, gs):
                r.step(g)
        return {k: np.asarray(v) for k, v in params.items()}, state, refs


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", OPTAX_CASES, ids=lambda c: case_id(*c))
def test_optax_rule_matches_reference(case, dtype):
    name, hp = case
    params, state, refs = run_optax(name, hp, dtype)
    inner = state[0]  # the scale_by_* transform's state: its moments (and count)
    states = entry(name).oracle("optax").states
    assert {key for key, _ in states} == set(refs[0].state) - {"step"}
    for i, r in enumerate(refs):
        assert_close(params[f"p{i}"], r.p, dtype, f"param {i} {OPTAX_SHAPES[i]}")
        for key, field in states:
            assert_close(np.asarray(getattr(inner, field)[f"p{i}"]), r.state[key], dtype, key)
        if "step" in r.state:
            assert int(inner.count) == r.state["step"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("case", OPTAX_CASES, ids=lambda c: case_id(*c))
def test_optax_rule_nonfinite_gradients(case, bad):
    """Lion: NaN reaches the parameter where the gradient is NaN (jnp.sign(NaN) is NaN); LAMB: a
    NaN in the update's norm makes the whole array NaN. Float64, NaN and Inf where optax's are."""
    name, hp = case
    params, _, refs = run_optax(name, hp, np.float64, bad=bad)
    for i, r in enumerate(refs):
        np.testing.assert_allclose(params[f"p{i}"], r.p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "case",
    [(e.name, hp) for e in with_oracle("lion_pytorch") for hp in e.oracle_cases or e.cases],
    ids=lambda c: case_id(*c),
)
def test_lion_matches_lion_pytorch(case, dtype):
    """lion-pytorch decays p before the signed step (p (1 - lr wd) - lr sign), optax adds wd p to
    the signed step: the same update, up to rounding."""
    torch = pytest.importorskip("torch")
    lion_pytorch = pytest.importorskip("lion_pytorch")
    _, hp = case
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    p0 = initial(SHAPES)
    params = [torch.nn.Parameter(torch.tensor(x, dtype=tdtype)) for x in p0]
    opt = lion_pytorch.Lion(params, **hp)
    refs = [OracleReference("Lion", x, **hp) for x in p0]
    for gs in gradients(SHAPES):
        for p, g, r in zip(params, gs, refs):
            p.grad = torch.tensor(g, dtype=tdtype)
            r.step(g)
        opt.step()
    for p, r in zip(params, refs):
        assert_close(p.detach().numpy(), r.p, dtype, "param")
        assert set(opt.state[p]) == set(r.state) == {"exp_avg"}
        assert_close(opt.state[p]["exp_avg"].numpy(), r.state["exp_avg"], dtype, "exp_avg")


def test_lion_defaults_are_lion_pytorchs():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    theirs = inspect.signature(lion_pytorch.Lion).parameters
    mine = inspect.signature(OracleReference._lion).parameters
    for key in ("lr", "betas", "weight_decay"):
        assert theirs[key].default == mine[key].default, key


# -- schedulefree -------------------------------------------------------------------------------

#: The option sets of every rule with a schedulefree oracle.
SF_CASES = [(e.name, hp) for e in with_oracle("schedulefree") for hp in (e.oracle_cases or e.cases)]


def sf_class(name):
    return entry(name).oracle("schedulefree").load()


@pytest.mark.parametrize("impl", ["single", "foreach", "float64"])
@pytest.mark.parametrize("case", SF_CASES, ids=lambda c: case_id(*c))
def test_schedule_free_matches_reference(case, impl):
    """Steps in train mode with one parameter skipped (no gradient) on every third step; an
    eval()/train() round trip in the middle (x compared); x compared at the end."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("schedulefree")
    name, hp = case
    dtype = np.float64 if impl == "float64" else np.float32
    tdtype = torch.float64 if impl == "float64" else torch.float32
    p0 = initial(SHAPES)
    params = [torch.nn.Parameter(torch.tensor(x, dtype=tdtype)) for x in p0]
    kwargs = entry(name).oracle("schedulefree").kwargs(entry(name), hp)
    opt = sf_class(name)(params, foreach=(impl == "foreach"), **kwargs)
    refs = [OracleReference(name, x, **hp) for x in p0]

    def compare(what):
        for i, (p, r) in enumerate(zip(params, refs)):
            assert_close(p.detach().numpy(), r.p, dtype, f"{what} {SHAPES[i]}")
            if r.state:
                assert set(opt.state[p]) == set(r.state)
                for key, value in r.state.items():
                    assert_close(opt.state[p][key].numpy(), value, dtype, key)
        group = opt.param_groups[0]
        for key in ("k", "lr_max", "train_mode"):
            assert group[key] == refs[0].group[key], key
        assert_close(group["weight_sum"], refs[0].group["weight_sum"], np.float64, "weight_sum")

    with pytest.raises(RuntimeError):
        refs[0].step(np.zeros(SHAPES[0]))  # the package raises too: it starts in eval mode
    opt.train()
    for r in refs:
        r.train()
    for t, gs in enumerate(gradients(SHAPES)):
        for i, (p, g, r) in enumerate(zip(params, gs, refs)):
            if i == 2 and t % 3 == 0:
                p.grad = None
                r.skip()
            else:
                p.grad = torch.tensor(g, dtype=tdtype)
                r.step(g)
        opt.step()
        if t == STEPS // 2:
            opt.eval()
            for r in refs:
                r.eval()
            compare("x mid-run")
            opt.train()
            for r in refs:
                r.train()
    compare("y")
    opt.eval()
    for r in refs:
        r.eval()
    compare("x")


def test_schedule_free_step_in_eval_mode_is_an_error_in_the_package():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    for e in with_oracle("schedulefree"):
        with pytest.raises(Exception, match="train mode"):
            sf_class(e.name)([p]).step()


@pytest.mark.parametrize("name", [e.name for e in with_oracle("schedulefree")])
def test_schedule_free_defaults_are_the_packages(name):
    pytest.importorskip("schedulefree")
    theirs = inspect.signature(sf_class(name)).parameters
    mine = inspect.signature(getattr(OracleReference, "_" + name.lower())).parameters
    for key, par in mine.items():
        if key not in ("self", "g"):
            assert theirs[key].default == par.default, key
    assert set(theirs) - set(mine) == {"params", "foreach"}


# -- invariants of the references themselves (no oracle needed) ---------------------------------


def run_reference(name, hp, shape=(6, 7), steps=STEPS, seed=3):
    (p0,) = initial([shape], seed=seed)
    r = OracleReference(name, p0, **hp)
    if entry(name).schedule_free:
        r.train()
    for (g,) in gradients([shape], steps, seed=seed):
        r.step(g)
    return p0, r


@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: case_id(*c))
def test_every_case_runs_100_finite_steps(case):
    name, hp = case
    p0, r = run_reference(name, hp, steps=100)
    assert np.all(np.isfinite(r.p)) and not np.array_equal(r.p, p0)
    for value in r.state.values():
        assert np.all(np.isfinite(value))


def test_lion_moves_each_element_by_lr_or_not_at_all():
    p = np.linspace(-1, 1, 11)
    r = OracleReference("Lion", p, lr=0.25)
    for g in ([1.0] * 5 + [0.0] + [-1.0] * 5, np.zeros(11)):
        before = r.p.copy()
        r.step(np.asarray(g))
        assert set(np.round(np.abs(r.p - before), 12)) <= {0.0, 0.25}


def test_rprop_step_sizes_stay_in_bounds_and_flips_forget():
    _, r = run_reference("Rprop", dict(lr=0.01, step_sizes=(1e-3, 0.02)))
    assert r.state["step_size"].min() >= 1e-3 and r.state["step_size"].max() <= 0.02
    r = OracleReference("Rprop", np.zeros(2), lr=0.1)
    r.step(np.array([1.0, 1.0]))
    r.step(np.array([-1.0, 1.0]))  # first element flips: no move, prev forgets, step shrinks
    np.testing.assert_array_equal(r.state["prev"], [0.0, 1.0])
    np.testing.assert_allclose(r.state["step_size"], [0.05, 0.12])
    np.testing.assert_allclose(r.p, [-0.1, -0.22])


def test_adafactor_factors_a_rank_one_square_exactly():
    """At step 1 the factored estimate row_var col_var / mean(row_var) is g^2 itself when g^2 is
    an outer product: the update is then sign(g) (Adam's first step), scaled by alpha."""
    a, b = np.array([0.5, 1.0, 2.0]), np.array([1.0, 3.0, 0.25, 2.0])
    g = np.outer(a, b) * np.array([[1, -1, 1, 1], [-1, 1, 1, -1], [1, 1, -1, 1]])
    p0 = np.full((3, 4), 0.2)
    r = OracleReference("Adafactor", p0, lr=0.5, eps=(1e-30, 1e-3))
    r.step(g)
    alpha = 0.2 * 0.5  # RMS(p) * min(lr, 1/sqrt(1))
    np.testing.assert_allclose(r.p, p0 - alpha * np.sign(g), rtol=1e-12)
    assert r.state["row_var"].shape == (3, 1) and r.state["col_var"].shape == (1, 4)


def test_lamb_step_is_lr_times_norm_p_per_array():
    p0, r = run_reference("LAMB", dict(lr=1e-2), steps=1)
    before = OracleReference("LAMB", p0, lr=1e-2)
    np.testing.assert_allclose(
        np.linalg.norm(r.p - before.p), 1e-2 * np.linalg.norm(p0.astype(np.float64)), rtol=1e-12
    )
    r = OracleReference("LAMB", np.zeros(4), lr=1e-2)  # norm(p) = 0: ratio 1, a plain Adam step
    r.step(np.array([1.0, -2.0, 0.0, 3.0]))
    np.testing.assert_allclose(r.p, -1e-2 * np.array([1, -1, 0, 1]) / (1 + 1e-6), rtol=1e-6)


@pytest.mark.parametrize("name", [e.name for e in ENTRIES if e.schedule_free])
def test_schedule_free_x_is_the_average_of_the_z_iterates(name):
    """With r = 0, weight_lr_power = 0 and no warmup every weight is 1: after t steps, x (the
    eval point) is the plain mean of z_1..z_t; and eval() then train() gives y back."""
    (p0,) = initial([(9,)])
    r = OracleReference(name, p0, lr=0.05, weight_lr_power=0.0)
    r.train()
    zs = []
    for (g,) in gradients([(9,)], 20):
        r.step(g)
        zs.append(r.state["z"].copy())
    y = r.p.copy()
    r.eval()
    np.testing.assert_allclose(r.p, np.mean(zs, axis=0), rtol=1e-12, atol=1e-14)
    r.train()
    np.testing.assert_allclose(r.p, y, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError):
        r.eval(), r.step(np.zeros(9))
