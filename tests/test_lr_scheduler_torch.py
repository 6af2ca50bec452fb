"""optkern.lr_scheduler against torch.optim.lr_scheduler, step by step (skipped without torch).

Each scheduler runs with the same arguments on an optkern optimizer and on a torch optimizer with
the same param groups; the lrs (and the cycled momentum or beta1) must agree to 1e-12 relative at
every step. State dicts are swapped between the two mid-way, and both must carry on together.
"""

from __future__ import annotations

import numpy as np
import pytest

import optkern as ok
from optkern import lr_scheduler as S

torch = pytest.importorskip("torch")
T = torch.optim.lr_scheduler

REL = 1e-12
LRS = (0.1, 0.03)

OPTIMIZERS = {  # kind: (optkern class, torch class, extra constructor arguments)
    "sgd": (ok.SGD, lambda: torch.optim.SGD, dict(momentum=0.9)),
    "adam": (ok.Adam, lambda: torch.optim.Adam, dict(betas=(0.9, 0.99))),
    "rmsprop": (ok.RMSprop, lambda: torch.optim.RMSprop, dict(momentum=0.5)),
}


def make_pair(kind):
    ours, theirs, kw = OPTIMIZERS[kind]
    ok_opt = ours([{"params": [np.zeros(3, np.float32)], "lr": lr} for lr in LRS], lr=LRS[0], **kw)
    torch_opt = theirs()(
        [{"params": [torch.zeros(3, requires_grad=True)], "lr": lr} for lr in LRS], lr=LRS[0], **kw
    )
    return ok_opt, torch_opt


def hyper(opt):
    """Each group's lr and its momentum (beta1 for Adam), as floats."""
    out = []
    for g in opt.param_groups:
        m = g["betas"][0] if "betas" in g else g.get("momentum")
        out.append((float(g["lr"]), None if m is None else float(m)))
    return out


def assert_same(sched, torch_sched, t):
    want = torch_sched.get_last_lr()
    assert sched.get_last_lr() == pytest.approx(want, rel=REL, abs=0), f"step {t}"
    ours, theirs = hyper(sched.optimizer), hyper(torch_sched.optimizer)
    for (lr, m), (tlr, tm) in zip(ours, theirs):
        assert lr == pytest.approx(tlr, rel=REL, abs=0), f"lr at step {t}"
        assert m == pytest.approx(tm, rel=REL, abs=0), f"momentum at step {t}"


def torch_step(torch_sched, *args):
    torch_sched.optimizer.step()  # no gradients: nothing moves, but torch sees the usual order
    torch_sched.step(*args)


# Each spec: optimizer kind, a builder taking the scheduler module (ours or torch's) and the
# optimizer, and the number of steps.
SPECS = {
    "LambdaLR": ("sgd", lambda L, o: L.LambdaLR(o, lambda t: 0.95**t * (1 + t % 3)), 15),
    "LambdaLR-list": (
        "sgd",
        lambda L, o: L.LambdaLR(o, [lambda t: 1 / (t + 1), lambda t: 0.9**t]),
        15,
    ),
    "StepLR": ("sgd", lambda L, o: L.StepLR(o, step_size=3, gamma=0.5), 20),
    "StepLR-every-step": ("adam", lambda L, o: L.StepLR(o, step_size=1, gamma=0.9), 30),
    "MultiStepLR": ("sgd", lambda L, o: L.MultiStepLR(o, milestones=[2, 5, 5, 9], gamma=0.3), 15),
    "MultiStepLR-at-0": ("sgd", lambda L, o: L.MultiStepLR(o, milestones=[0, 4], gamma=0.5), 8),
    "ExponentialLR": ("sgd", lambda L, o: L.ExponentialLR(o, gamma=0.93), 50),
    "CosineAnnealingLR": ("sgd", lambda L, o: L.CosineAnnealingLR(o, T_max=7, eta_min=0.001), 45),
    "CosineAnnealingLR-T1": ("sgd", lambda L, o: L.CosineAnnealingLR(o, T_max=1), 6),
    "CosineAnnealingLR-Tfloat": (
        "sgd",
        lambda L, o: L.CosineAnnealingLR(o, T_max=2.5, eta_min=0.01),
        12,
    ),
    "CosineAnnealingLR-long": ("adam", lambda L, o: L.CosineAnnealingLR(o, T_max=100), 250),
    "LinearLR": ("sgd", lambda L, o: L.LinearLR(o), 10),
    "LinearLR-to-zero": (
        "sgd",
        lambda L, o: L.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=8),
        12,
    ),
    "LinearLR-partial": (
        "sgd",
        lambda L, o: L.LinearLR(o, start_factor=0.5, end_factor=0.8, total_iters=3),
        6,
    ),
    "SequentialLR": (
        "sgd",
        lambda L, o: L.SequentialLR(
            o,
            [L.LinearLR(o, start_factor=0.1, total_iters=4), L.CosineAnnealingLR(o, T_max=10)],
            milestones=[5],
        ),
        25,
    ),
    "SequentialLR-3": (
        "sgd",
        lambda L, o: L.SequentialLR(
            o,
            [
                L.ExponentialLR(o, gamma=0.9),
                L.StepLR(o, step_size=2, gamma=0.5),
                L.MultiStepLR(o, milestones=[1, 3], gamma=0.5),
            ],
            milestones=[3, 7],
        ),
        15,
    ),
    "SequentialLR-lambda": (
        "sgd",
        lambda L, o: L.SequentialLR(
            o,
            [L.LinearLR(o, start_factor=0.2, total_iters=3), L.LambdaLR(o, lambda t: 1 / (t + 1))],
            milestones=[4],
        ),
        10,
    ),
    "OneCycleLR": ("sgd", lambda L, o: L.OneCycleLR(o, max_lr=1.0, total_steps=20), 20),
    "OneCycleLR-adam-linear-3phase": (
        "adam",
        lambda L, o: L.OneCycleLR(
            o,
            max_lr=[0.5, 0.2],
            total_steps=30,
            pct_start=0.25,
            anneal_strategy="linear",
            three_phase=True,
            base_momentum=[0.8, 0.85],
            max_momentum=0.9,
        ),
        30,
    ),
    "OneCycleLR-adam-cos-3phase": (
        "adam",
        lambda L, o: L.OneCycleLR(o, max_lr=0.5, total_steps=23, three_phase=True),
        23,
    ),
    "OneCycleLR-rmsprop": (
        "rmsprop",
        lambda L, o: L.OneCycleLR(o, max_lr=0.2, total_steps=12, pct_start=0.5),
        12,
    ),
    "OneCycleLR-epochs-no-momentum": (
        "sgd",
        lambda L, o: L.OneCycleLR(
            o,
            max_lr=0.3,
            epochs=3,
            steps_per_epoch=7,
            cycle_momentum=False,
            div_factor=10.0,
            final_div_factor=100.0,
        ),
        21,
    ),
}


@pytest.mark.parametrize("name", SPECS)
def test_sequence_matches_torch(name):
    kind, build, n = SPECS[name]
    ok_opt, torch_opt = make_pair(kind)
    sched, torch_sched = build(S, ok_opt), build(T, torch_opt)
    assert sched.last_epoch == torch_sched.last_epoch
    for t in range(n + 1):
        if t:
            sched.step()
            torch_step(torch_sched)
        assert_same(sched, torch_sched, t)
        assert sched.last_epoch == torch_sched.last_epoch


@pytest.mark.parametrize("name", SPECS)
def test_state_dicts_move_between_optkern_and_torch(name):
    kind, build, n = SPECS[name]
    ok_opt, torch_opt = make_pair(kind)
    sched, torch_sched = build(S, ok_opt), build(T, torch_opt)
    for _ in range(n // 2):
        sched.step()
        torch_step(torch_sched)
    ours, theirs = sched.state_dict(), torch_sched.state_dict()
    assert set(theirs) - {"_get_lr_called_within_step"} <= set(ours)  # torch's names, all there
    sched.load_state_dict(theirs)
    torch_sched.load_state_dict(ours)
    for t in range(n // 2, n + 1):
        if t > n // 2:
            sched.step()
            torch_step(torch_sched)
        assert_same(sched, torch_sched, t)


def test_one_cycle_past_total_steps_raises_like_torch():
    ok_opt, torch_opt = make_pair("sgd")
    sched = S.OneCycleLR(ok_opt, max_lr=1.0, total_steps=5)
    torch_sched = T.OneCycleLR(torch_opt, max_lr=1.0, total_steps=5)
    for _ in range(5):
        sched.step()
        torch_step(torch_sched)
    with pytest.raises(ValueError):
        torch_step(torch_sched)
    with pytest.raises(ValueError):
        sched.step()


PLATEAU = {
    "min-rel": dict(patience=3),
    "min-abs-cooldown": dict(
        patience=2, threshold=0.05, threshold_mode="abs", cooldown=3, factor=0.5
    ),
    "max-rel": dict(mode="max", patience=1, threshold=0.01, factor=0.7),
    "max-abs-min-lrs": dict(
        mode="max", patience=0, threshold=0.0, threshold_mode="abs", min_lr=[0.02, 0.001], factor=0.5
    ),
    "eps": dict(patience=1, factor=0.9, min_lr=0.05, eps=0.003),
}


@pytest.mark.parametrize("name", PLATEAU)
def test_reduce_on_plateau_matches_torch(name):
    kw = PLATEAU[name]
    rng = np.random.default_rng(7)
    trend = np.maximum(1.0, 5.0 - 0.1 * np.arange(80)) + rng.normal(0, 0.05, 80)
    metrics = -trend if kw.get("mode") == "max" else trend
    ok_opt, torch_opt = make_pair("sgd")
    sched, torch_sched = S.ReduceLROnPlateau(ok_opt, **kw), T.ReduceLROnPlateau(torch_opt, **kw)
    for t, m in enumerate(metrics):
        if t == 40:  # swap state dicts half-way
            ours, theirs = sched.state_dict(), torch_sched.state_dict()
            assert set(theirs) <= set(ours)
            sched.load_state_dict(theirs)
            torch_sched.load_state_dict(ours)
        sched.step(float(m))
        torch_step(torch_sched, float(m))
        assert_same(sched, torch_sched, t)
        assert (sched.best, sched.num_bad_epochs, sched.cooldown_counter) == (
            torch_sched.best,
            torch_sched.num_bad_epochs,
            torch_sched.cooldown_counter,
        )
    assert sched.get_last_lr() != [0.1, 0.03]  # the schedule did reduce the lrs
