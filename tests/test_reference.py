"""Every optimizer and option set against its float64 reference: 100 steps, rtol 1e-5 / atol 1e-6,
on sizes around the vector widths and on buffers that are not 64-byte aligned."""

import functools

import numpy as np
import pytest
from helpers import gradient_sequence, make
import optim_db as db
from optim_db import CASES, case_id
from reference import Reference

import optkern as ok

# 100003 elements: split across threads, several vector bodies; slow (the float64 reference's
# temporaries), so in the slow lane. The thread split's results are bit-identical to one
# thread's at that size (test_threads.py, every case), which meets the reference here at 1023.
SIZES = [0, 1, 15, 17, 1023, pytest.param(100003, marks=pytest.mark.slow)]
STEPS = 100


@functools.lru_cache(maxsize=None)
def grads_for(size: int):
    # Gradients of scale 0.1 keep momentum buffers (up to ~10 gradients deep) near magnitude 1,
    # where float32 rounding stays well inside atol 1e-6 even as values cross zero.
    return gradient_sequence(size, STEPS, seed=size, scale=0.1)


def initial(size: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(size) * 0.5).astype(np.float32)


def check_against_reference(opt, params, refs):
    """Every parameter and state entry against the reference, at the rule's tolerance in the
    optimizer database (rtol 1e-5 / atol 1e-6: the contract)."""
    rtol, atol = db.entry(type(opt).__name__).tol
    for p, ref in zip(params, refs):
        np.testing.assert_allclose(p, ref.p, rtol=rtol, atol=atol, err_msg="param")
        if not ref.state:
            assert p not in opt.state  # like torch: plain SGD keeps no state
            continue
        state = opt.state[p]
        for key, value in ref.state.items():
            if key == "step":
                assert state["step"] == value
            else:
                # State can be far larger than the parameters (RMSprop's momentum buffer holds
                # normalised steps, ~10): its absolute tolerance scales with its magnitude.
                scale = max(1.0, float(np.max(np.abs(value), initial=0.0)))
                np.testing.assert_allclose(
                    state[key], value, rtol=rtol, atol=atol * scale, err_msg=key
                )
        assert set(state) == set(ref.state), "state names differ from torch's"


@pytest.mark.parametrize("layout", ["aligned", "unaligned"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_class_matches_reference(case, size, layout):
    name, hp = case
    p0 = initial(size)
    p = make(p0, layout)
    opt = getattr(ok, name)([p], **hp)
    ref = Reference(name, p0, **hp)
    for g in grads_for(size):
        opt.step([make(g, layout)])
        ref.step(g)
    check_against_reference(opt, [p], [ref])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_many_buffers_and_groups(case):
    """One call per group over buffers of assorted sizes and shapes; two groups with different
    hyperparameters; one parameter skipped (grad None) on some steps."""
    name, hp = case
    shapes = [(3, 5), (17,), (0,), (64, 33), (1,), (2, 3, 4)]
    p0 = [initial(int(np.prod(s)), seed=i).reshape(s) for i, s in enumerate(shapes)]
    params = [make(x, "unaligned" if i % 2 else "aligned") for i, x in enumerate(p0)]
    other = dict(hp, lr=hp.get("lr", 1e-3) * 0.5)
    opt = getattr(ok, name)([{"params": params[:4]}, {"params": params[4:], "lr": other["lr"]}], **hp)
    refs = [Reference(name, x, **(hp if i < 4 else other)) for i, x in enumerate(p0)]
    rng = np.random.default_rng(7)
    for t in range(40):
        grads = [(0.1 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
        skip = 1 if t % 3 == 0 else None
        opt.step([None if i == skip else g for i, g in enumerate(grads)])
        for i, (ref, g) in enumerate(zip(refs, grads)):
            if i != skip:
                ref.step(g)
    check_against_reference(opt, params, refs)


def test_hyperparameters_change_between_steps():
    p0 = initial(100)
    p = p0.copy()
    opt = ok.Adam([p], lr=1e-3)
    ref = Reference("Adam", p0, lr=1e-3)
    for t, g in enumerate(gradient_sequence(100, 20, seed=3)):
        if t == 10:
            opt.param_groups[0]["lr"] = 5e-3
            opt.param_groups[0]["betas"] = (0.5, 0.9)
            ref.hp.update(lr=5e-3, betas=(0.5, 0.9))
        opt.step([g])
        ref.step(g)
    check_against_reference(opt, [p], [ref])


def test_switching_amsgrad_on_creates_its_state():
    p0 = initial(50)
    p = p0.copy()
    opt = ok.Adam([p])
    opt.step([np.ones(50, np.float32)])
    opt.param_groups[0]["amsgrad"] = True
    opt.step([np.ones(50, np.float32)])
    assert opt.state[p]["step"] == 2
    np.testing.assert_array_equal(opt.state[p]["max_exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_parameters_of_any_shape_are_updated_in_place():
    W = np.ones((4, 3), np.float32)
    before = W.__array_interface__["data"][0]
    ok.SGD([W], lr=0.5).step([np.ones((4, 3), np.float32)])
    assert W.__array_interface__["data"][0] == before
    np.testing.assert_array_equal(W, np.full((4, 3), 0.5, np.float32))


def test_state_lookup_follows_changes_between_steps():
    """The per-group state cache never updates an array that is no longer the one in use."""
    a, b, c = (np.zeros(4, np.float32) for _ in range(3))
    g = np.ones(4, np.float32)
    opt = ok.Adam([a, b], lr=0.1)
    opt.step([g, g])
    opt.param_groups[0]["params"][1] = c  # swapped in place, same length
    opt.step([g, g])
    assert opt.state[c]["step"] == 1 and opt.state[b]["step"] == 1 and c[0] < 0
    before = a.copy()
    opt.state[a] = {
        "step": 0,
        "exp_avg": np.zeros(4, np.float32),
        "exp_avg_sq": np.zeros(4, np.float32),
    }  # reset by hand
    opt.step([g, g])
    assert opt.state[a]["step"] == 1
    np.testing.assert_allclose(a, before - 0.1, rtol=1e-5)  # a first step again: moves by lr
    sd = opt.state_dict()
    opt.step([g, g])
    opt.load_state_dict(sd)
    assert opt.state[a]["step"] == 1
    opt.state[a]["exp_avg"] = np.full(4, 7.0, np.float32)  # an array replaced inside the dict
    opt.step([g, g])
    assert opt.state[a]["exp_avg"][0] == pytest.approx(0.9 * 7.0 + 0.1, rel=1e-6)
