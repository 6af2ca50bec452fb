"""Parity with torch.optim (skipped when torch is not installed): the same initial values and
gradient sequences give the same parameters and state after 100 steps, for every optimizer and
option set, and a state_dict moves both ways between the two and training continues identically."""

import numpy as np
import pytest
from helpers import gradient_sequence
import optim_db as db
from optim_db import CASES, case_id

import optkern as ok

torch = pytest.importorskip("torch")

RTOL, ATOL = 1e-5, 1e-6
# The rules with a torch.optim oracle in the optimizer database (the others: Momentum, the seed's
# form, has none; Lion and LAMB are checked against optax and lion-pytorch in
# test_oracle_parity.py, the Schedule-Free rules against schedulefree in
# test_oracle_parity_schedulefree.py), in the forms torch has (the textbook forms are checked
# against Keras in test_oracle_parity_keras.py).
TORCH_CASES = [
    (name, hp)
    for name, hp in CASES
    if db.entry(name).oracle("torch") and db.entry(name).oracle("torch").takes(db.entry(name), hp)
]
FUSED = {e.name for e in db.with_oracle("torch") if e.oracle("torch").fused}  # fused CPU kernels


def torch_optimizer(name, params, hp, fused=False):
    oracle = db.entry(name).oracle("torch")
    impl = {"fused": True} if fused else {"foreach": False}
    return oracle.load()(params, **oracle.kwargs(db.entry(name), hp), **impl)


def run_both(name, hp, size, steps, fused=False):
    p0 = (np.random.default_rng(1).standard_normal(size) * 0.5).astype(np.float32)
    mine = p0.copy()
    theirs = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = getattr(ok, name)([mine], **hp)
    topt = torch_optimizer(name, [theirs], hp, fused=fused)
    grads = gradient_sequence(size, steps, seed=5, scale=0.1)
    return opt, mine, topt, theirs, grads


def step_both(opt, mine, topt, theirs, g):
    opt.step([g])
    theirs.grad = torch.from_numpy(g.copy())
    topt.step()


def assert_same(opt, mine, topt, theirs):
    np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=RTOL, atol=ATOL)
    tstate = topt.state[theirs]
    if not tstate or all(v is None for v in tstate.values()):
        assert mine not in opt.state
        return
    state = opt.state[mine]
    names = {k for k, v in tstate.items() if v is not None}
    assert set(state) == names
    for key in names:
        expected = tstate[key]
        if key == "step":
            assert state["step"] == int(expected)
            continue
        expected = expected.numpy()
        finite = np.abs(expected[np.isfinite(expected)])
        scale = max(1.0, float(np.max(finite, initial=0.0)))
        np.testing.assert_allclose(state[key], expected, rtol=RTOL, atol=ATOL * scale, err_msg=key)


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_matches_torch_over_100_steps(case):
    name, hp = case
    opt, mine, topt, theirs, grads = run_both(name, hp, 1037, 100)
    for g in grads:
        step_both(opt, mine, topt, theirs, g)
    assert_same(opt, mine, topt, theirs)


@pytest.mark.parametrize("case", [c for c in TORCH_CASES if c[0] in FUSED], ids=case_id)
def test_matches_torch_fused_kernels(case):
    name, hp = case
    opt, mine, topt, theirs, grads = run_both(name, hp, 1037, 100, fused=True)
    for g in grads:
        step_both(opt, mine, topt, theirs, g)
    assert_same(opt, mine, topt, theirs)


def to_torch_state_dict(sd):
    state = {}
    for i, s in sd["state"].items():
        # a rule's carried numbers (NAdam's mu_product, ASGD's eta and mu) stay floats, which
        # torch's __setstate__ turns into its 0-d tensors
        state[i] = {
            k: (
                torch.tensor(float(v))
                if k == "step"
                else torch.from_numpy(v.copy())
                if isinstance(v, np.ndarray)
                else v
            )
            for k, v in s.items()
        }
    return {
        **sd,
        "state": state,
    }  # with our extra keys (step_count, skipped_steps): torch ignores them


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_state_dict_moves_both_ways(case):
    name, hp = case
    # optkern -> torch
    opt, mine, topt, theirs, grads = run_both(name, hp, 257, 60)
    for g in grads[:30]:
        opt.step([g])
    with torch.no_grad():
        theirs.copy_(torch.from_numpy(mine))
    topt.load_state_dict(to_torch_state_dict(opt.state_dict()))
    for g in grads[30:]:
        step_both(opt, mine, topt, theirs, g)
    assert_same(opt, mine, topt, theirs)

    # torch -> optkern
    opt, mine, topt, theirs, grads = run_both(name, hp, 257, 60)
    for g in grads[:30]:
        theirs.grad = torch.from_numpy(g.copy())
        topt.step()
    mine[...] = theirs.detach().numpy()
    opt.load_state_dict(topt.state_dict())
    for g in grads[30:]:
        step_both(opt, mine, topt, theirs, g)
    assert_same(opt, mine, topt, theirs)


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_gradients_propagate_as_in_torch(case, bad):
    name, hp = case
    opt, mine, topt, theirs, grads = run_both(name, hp, 64, 12)
    for t, g in enumerate(grads):
        g = g.copy()
        if t in (3, 7):
            g[[5, 17, 40]] = bad
        step_both(opt, mine, topt, theirs, g)
        ref = theirs.detach().numpy()
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(ref))
        np.testing.assert_array_equal(np.isposinf(mine), np.isposinf(ref))
        np.testing.assert_array_equal(np.isneginf(mine), np.isneginf(ref))
    assert_same(opt, mine, topt, theirs)
