"""ScheduleFreeAdamW and ScheduleFreeSGD: train()/eval() (the parameter holds y or x), a step in
eval mode refused before anything changes, and the mode, z and the carried lr_max/weight_sum
through state_dict, pickle and optkern.checkpoint. Against the float64 reference of
reference.py; against the schedulefree package in test_oracle_parity_schedulefree.py."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import optim_db as db
from reference import Reference

import optkern as ok
from optkern import checkpoint

# Every Schedule-Free class of the optimizer database, at its reference case with most options.
CASES = [(e.name, max(e.cases, key=len)) for e in db.ENTRIES if e.schedule_free]
IDS = [name for name, _ in CASES]
RTOL, ATOL = 1e-5, 1e-6


def grads(n, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n) * 0.1).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("name, hp", CASES, ids=IDS)
def test_train_eval_switches_match_the_reference(name, hp):
    p0 = np.random.default_rng(1).standard_normal(37).astype(np.float32)
    p = p0.copy()
    opt = getattr(ok, name)([p], **hp)
    ref = Reference(name, p0, **hp)
    assert opt.param_groups[0]["train_mode"] is True
    opt.eval()  # before any step: no z yet, nothing moves (as in the package)
    ref.eval()
    np.testing.assert_array_equal(p, p0)
    opt.train()
    ref.train()
    for t, g in enumerate(grads(37, 30)):
        opt.step([g])
        ref.step(g.astype(np.float64))
        if t in (9, 20):
            opt.eval()
            ref.eval()
            assert opt.param_groups[0]["train_mode"] is False
            np.testing.assert_allclose(p, ref.p, rtol=RTOL, atol=ATOL, err_msg="x")
            opt.eval()  # a second eval() is a no-op
            np.testing.assert_allclose(p, ref.p, rtol=RTOL, atol=ATOL, err_msg="x twice")
            opt.train()
            ref.train()
    np.testing.assert_allclose(p, ref.p, rtol=RTOL, atol=ATOL, err_msg="y")
    np.testing.assert_allclose(opt.state[p]["z"], ref.state["z"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name, hp", CASES, ids=IDS)
def test_step_in_eval_mode_changes_nothing(name, hp):
    p = np.linspace(-1, 1, 9, dtype=np.float32)
    opt = getattr(ok, name)([p], **hp)
    opt.step([np.full(9, 0.5, np.float32)])
    opt.eval()
    before = (p.copy(), {k: np.copy(v) for k, v in opt.state[p].items()})
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step([np.full(9, 0.5, np.float32)])
    np.testing.assert_array_equal(p, before[0])
    for k, v in before[1].items():
        np.testing.assert_array_equal(opt.state[p][k], v)


@pytest.mark.parametrize("name, hp", CASES, ids=IDS)
def test_x_is_the_weighted_average_of_z(name, hp):
    """With weight_lr_power=0 and r=0 every weight is 1: x is the plain mean of z_1..z_t."""
    hp = dict(hp, weight_lr_power=0.0, r=0.0, warmup_steps=0)
    p = np.random.default_rng(2).standard_normal(11).astype(np.float32)
    opt = getattr(ok, name)([p], **hp)
    zs = []
    for g in grads(11, 12, seed=3):
        opt.step([g])
        zs.append(opt.state[p]["z"].astype(np.float64))
    opt.eval()
    np.testing.assert_allclose(p, np.mean(zs, axis=0), rtol=1e-4, atol=1e-5)


def _run(opt, p, gs):
    opt.train()
    for g in gs:
        opt.step([g])


@pytest.mark.parametrize("how", ["state_dict", "pickle", "checkpoint"])
@pytest.mark.parametrize("name, hp", CASES, ids=IDS)
def test_saved_in_eval_mode_resumes_bit_for_bit(name, hp, how, tmp_path):
    gs = grads(23, 20, seed=4)
    p = np.random.default_rng(5).standard_normal(23).astype(np.float32)
    opt = getattr(ok, name)([p], **hp)
    _run(opt, p, gs[:10])
    opt.eval()  # the package's way: save x, in eval mode
    saved_p = p.copy()
    q = saved_p.copy()
    if how == "state_dict":
        other = getattr(ok, name)([q], **hp)
        other.load_state_dict(opt.state_dict())
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(opt))
        q = other.param_groups[0]["params"][0]  # the optimizer's own copy of p
    else:
        checkpoint.save(opt, tmp_path / "sf")
        other = getattr(ok, name)([q], **hp)
        checkpoint.load(other, tmp_path / "sf")
    assert other.param_groups[0]["train_mode"] is False
    with pytest.raises(RuntimeError, match="eval mode"):
        other.step([gs[10]])
    _run(opt, p, gs[10:])
    _run(other, q, gs[10:])
    np.testing.assert_array_equal(p, q)
    for key in ("z", "exp_avg_sq", "lr_max", "weight_sum", "step"):
        if key in opt.state[p]:
            np.testing.assert_array_equal(other.state[q][key], opt.state[p][key])


def test_new_group_takes_the_current_mode_and_beta_is_in_the_open_interval():
    a, b = np.ones(3, np.float32), np.ones(4, np.float32)
    opt = ok.ScheduleFreeSGD([a], lr=0.1)
    opt.eval()
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["train_mode"] is False
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\)"):
        ok.ScheduleFreeSGD([np.ones(2, np.float32)], momentum=0.0)
    with pytest.raises(ValueError, match=r"beta1 must be in \(0, 1\)"):
        ok.ScheduleFreeAdamW([np.ones(2, np.float32)], betas=(0.0, 0.999))


def test_a_warmed_up_lr_float32_cannot_hold_is_refused_and_changes_nothing():
    """lr * t / warmup_steps, as the package computes it: warmup_steps=1e-300 at step 1 makes
    an lr of 1e297, refused before anything is written."""
    p = np.ones(5, np.float32)
    opt = ok.ScheduleFreeSGD([p], lr=0.1, warmup_steps=1e-300)
    with pytest.raises(ValueError, match="float32 cannot hold"):
        opt.step([np.ones(5, np.float32)])
    np.testing.assert_array_equal(p, np.ones(5, np.float32))
    assert p not in opt.state or opt.state[p].get("step", 0) == 0
