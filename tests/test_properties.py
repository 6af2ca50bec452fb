"""Property-based tests (hypothesis) over random sizes, hyperparameters and gradient scales: the
kernels agree with the references, never crash, propagate NaN and Inf as the formulas say, and do
not depend on how the work is split between threads."""

import numpy as np
import pytest
import optim_db as db
from helpers import bits, make
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import Reference

import optkern as ok

RTOL, ATOL = 1e-5, 1e-6
PROPERTY_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def real(lo, hi):
    """Floats in [lo, hi] that float32 can hold: the kernels compute in float32, so a
    hyperparameter of 1e-300 is 0 there (in torch too), while the float64 reference keeps it."""
    return st.floats(lo, hi, allow_subnormal=False).map(lambda x: 0.0 if abs(x) < 1e-30 else x)


unit = real(0.0, 1.0)
lr = real(0.0, 0.05)
decay = st.one_of(st.just(0.0), real(0.0, 0.1))
eps = real(1e-8, 1e-3)  # much smaller eps meets float32 denormals at tiny gradients


@st.composite
def sgd_family(draw):
    kind = draw(st.sampled_from(["SGD", "Nesterov", "Momentum"]))
    hp = dict(lr=draw(lr), weight_decay=draw(decay), maximize=draw(st.booleans()))
    if kind == "SGD":
        nesterov = draw(st.booleans())
        hp.update(
            momentum=draw(real(0.01, 0.99) if nesterov else st.one_of(st.just(0.0), unit)),
            dampening=0.0 if nesterov else draw(unit),
            nesterov=nesterov,
        )
    elif kind == "Nesterov":
        hp.update(momentum=draw(real(0.01, 0.99)))
    else:
        hp.update(beta=draw(real(0.0, 0.99)))
    return kind, hp


@st.composite
def adaptive(draw):
    kind = draw(st.sampled_from(["RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW"]))
    hp = dict(weight_decay=draw(decay), maximize=draw(st.booleans()), eps=draw(eps))
    if kind == "RMSprop":
        centered = draw(st.booleans())
        # centered with alpha near 0 makes square_avg - grad_avg^2 a float32 cancellation (it
        # can round below zero: NaN, in torch as here), so centered runs keep alpha >= 0.5.
        hp.update(
            lr=draw(real(0.0, 0.01)),
            centered=centered,
            alpha=draw(real(0.5, 1.0) if centered else unit),
            momentum=draw(st.one_of(st.just(0.0), real(0.0, 0.95))),
        )
    elif kind == "Adagrad":
        hp.update(
            lr=draw(lr), lr_decay=draw(real(0.0, 0.5)), initial_accumulator_value=draw(real(0.0, 1.0))
        )
    elif kind == "Adadelta":
        hp.update(lr=draw(real(0.0, 1.0)), rho=draw(unit))
    else:
        hp.update(
            lr=draw(real(0.0, 0.01)),
            amsgrad=draw(st.booleans()),
            betas=(draw(real(0.0, 0.99)), draw(real(0.0, 0.9999))),
        )
    return kind, hp


any_optimizer = st.one_of(sgd_family(), adaptive())
#: Every class of the optimizer database at its reference option sets (the strategies above draw
#: the first classes' hyperparameters freely), or at the random ones above.
any_class = st.one_of(any_optimizer, st.sampled_from(db.CASES))


def run(kind, hp, size, steps, scale, seed, layout="aligned", dtype=None, nonfinite=()):
    rng = np.random.default_rng(seed)
    p0 = (rng.standard_normal(size) * 0.5).astype(np.float32)
    p = make(p0, layout)
    opt = getattr(ok, kind)([p], **hp)
    ref = Reference(kind, p0, dtype=dtype, **hp)
    for _ in range(steps):
        g = (rng.standard_normal(size) * scale).astype(np.float32)
        for index, value in nonfinite:
            if index < size:
                g[index] = value
        opt.step([make(g, layout)])
        ref.step(g)
    return opt, p, ref


def magnitude(a):
    """The largest finite magnitude in a, at least 1."""
    return max(1.0, float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0)))


def assert_matches(opt, p, ref, rtol=RTOL, atol=ATOL):
    """Every array to rtol, or to atol times the array's largest magnitude: random
    hyperparameters (alpha = 1 leaves RMSprop dividing by eps) can take values to 1e6 or 1e18,
    and where they cancel to a small result float32 can only be as exact as the inputs were.
    The fixed, well-conditioned option sets of test_reference.py hold the plain rtol/atol."""
    np.testing.assert_allclose(p, ref.p, rtol=rtol, atol=atol * magnitude(ref.p))
    if p in opt.state:
        for key, value in ref.state.items():
            if not isinstance(value, np.ndarray):  # the step, a carried number (kept in double)
                assert opt.state[p][key] == pytest.approx(value, rel=1e-12), key
            else:
                np.testing.assert_allclose(
                    opt.state[p][key], value, rtol=rtol, atol=atol * magnitude(value), err_msg=key
                )


@PROPERTY_SETTINGS
@given(
    case=any_class,
    size=st.integers(0, 300),
    steps=st.integers(1, 5),
    scale=st.sampled_from([0.0, 1e-20, 1e-3, 1.0]),
    seed=st.integers(0, 2**32 - 1),
    layout=st.sampled_from(["aligned", "unaligned"]),
)
def test_agrees_with_float64_reference(case, size, steps, scale, seed, layout):
    kind, hp = case
    opt, p, ref = run(kind, hp, size, steps, scale, seed, layout)
    assert_matches(opt, p, ref)


@PROPERTY_SETTINGS
@given(
    case=any_optimizer,
    size=st.integers(1, 300),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_huge_gradients_behave_as_float32_formulas(case, size, steps, seed):
    """Gradients of 1e20: squares overflow to Inf for some hyperparameters, in torch as here. The
    same formulas evaluated in float32 NumPy give the same values, NaNs and Infs."""
    kind, hp = case
    opt, p, ref = run(kind, hp, size, steps, 1e20, seed, dtype=np.float32)
    for mine, theirs in [(p, ref.p)] + [
        (opt.state[p][k], v) for k, v in ref.state.items() if k != "step" and p in opt.state
    ]:
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs))
        np.testing.assert_array_equal(np.isinf(mine), np.isinf(theirs))
    # Two float32 evaluations differ by rounding (FMA here, not in NumPy), a few ulps per step.
    assert_matches(opt, p, ref, rtol=1e-4, atol=1e-5)


@PROPERTY_SETTINGS
@given(
    case=any_optimizer,
    size=st.integers(1, 200),
    seed=st.integers(0, 2**32 - 1),
    bad=st.lists(
        st.tuples(st.integers(0, 199), st.sampled_from([np.nan, np.inf, -np.inf])),
        min_size=1,
        max_size=4,
    ),
)
def test_nan_and_inf_propagate_as_the_formulas_say(case, size, seed, bad):
    kind, hp = case
    opt, p, ref = run(kind, hp, size, 3, 1.0, seed, nonfinite=bad)
    np.testing.assert_array_equal(np.isnan(p), np.isnan(ref.p))
    np.testing.assert_array_equal(np.isposinf(p), np.isposinf(ref.p))
    np.testing.assert_array_equal(np.isneginf(p), np.isneginf(ref.p))
    assert_matches(opt, p, ref)


@settings(deadline=None)
@given(
    case=any_class,
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    min_per_thread=st.integers(1, 4000),
    seed=st.integers(0, 2**32 - 1),
)
def test_thread_split_never_changes_a_bit(case, sizes, min_per_thread, seed):
    kind, hp = case
    results = []
    for threads, threshold in [(1, 1), (2, min_per_thread)]:
        ok.set_num_threads(threads)
        ok._core._testing.set_min_elements_per_thread(threshold)
        rng = np.random.default_rng(seed)
        params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        opt = getattr(ok, kind)(params, **hp)
        for _ in range(3):
            opt.step([rng.standard_normal(n).astype(np.float32) for n in sizes])
        results.append([bits(x) for x in params])
    assert results[0] == results[1]
