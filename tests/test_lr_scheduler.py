"""optkern.lr_scheduler against closed forms and hand-computed numbers (no torch needed; the torch
parity tests are in test_lr_scheduler_torch.py)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

import optkern as ok
from optkern import lr_scheduler as S

REL = 1e-12  # the chainable forms drift from the closed forms by a few ulps per step


def make_sgd(lrs=(0.1, 0.03), **kw):
    """An SGD with one param group per lr."""
    groups = [{"params": [np.zeros(3, np.float32)], "lr": lr} for lr in lrs]
    return ok.SGD(groups, lr=lrs[0], **kw)


def lr_sequence(sched, n):
    """The lrs of steps 0..n: after construction, then after each of n scheduler steps. Also checks
    that get_last_lr() is what the optimizer's groups hold."""
    out = []
    for t in range(n + 1):
        if t:
            sched.step()
        last = sched.get_last_lr()
        assert last == [g["lr"] for g in sched.optimizer.param_groups]
        out.append(last)
    return out


def assert_close(got, want, abs_tol=0.0):
    assert len(got) == len(want)
    for t, (g, w) in enumerate(zip(got, want)):
        assert g == pytest.approx(w, rel=REL, abs=abs_tol), f"step {t}: {g} != {w}"


def cosine(base, t, T, eta_min):
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / T)) / 2


def linear(base, t, start, end, total):
    return base * (start + (end - start) * min(t, total) / total)


# Each case: a scheduler built on an optimizer, the number of steps to run, and lr(base_lr, t) from
# the closed form.
CASES = {
    "LambdaLR": (
        lambda o: S.LambdaLR(o, lambda t: 0.95**t * (1 + t % 3)),
        12,
        lambda b, t: b * 0.95**t * (1 + t % 3),
    ),
    "StepLR": (lambda o: S.StepLR(o, step_size=3, gamma=0.5), 14, lambda b, t: b * 0.5 ** (t // 3)),
    "MultiStepLR": (
        lambda o: S.MultiStepLR(o, milestones=[2, 5, 5, 9], gamma=0.1),
        12,
        lambda b, t: b * 0.1 ** sum(m <= t for m in [2, 5, 5, 9]),
    ),
    "ExponentialLR": (lambda o: S.ExponentialLR(o, gamma=0.9), 30, lambda b, t: b * 0.9**t),
    "CosineAnnealingLR": (
        lambda o: S.CosineAnnealingLR(o, T_max=7, eta_min=0.001),
        40,
        lambda b, t: cosine(b, t, 7, 0.001),
    ),
    "LinearLR-warmup": (
        lambda o: S.LinearLR(o, start_factor=0.25, total_iters=4),
        10,
        lambda b, t: linear(b, t, 0.25, 1.0, 4),
    ),
    "LinearLR-decay": (
        lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=6),
        10,
        lambda b, t: linear(b, t, 1.0, 0.1, 6),
    ),
    "SequentialLR": (
        lambda o: S.SequentialLR(
            o,
            [S.LinearLR(o, start_factor=0.1, total_iters=4), S.CosineAnnealingLR(o, T_max=10)],
            milestones=[5],
        ),
        20,
        lambda b, t: linear(b, t, 0.1, 1.0, 4) if t < 5 else cosine(b, t - 5, 10, 0),
    ),
    "SequentialLR-3": (
        lambda o: S.SequentialLR(
            o,
            [
                S.ExponentialLR(o, gamma=0.9),
                S.StepLR(o, step_size=2, gamma=0.5),
                S.LambdaLR(o, lambda t: 1 / (t + 1)),
            ],
            milestones=[3, 7],
        ),
        12,
        lambda b, t: b * 0.9**t if t < 3 else b * 0.5 ** ((t - 3) // 2) if t < 7 else b / (t - 7 + 1),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_sequence_matches_closed_form(name):
    factory, n, ref = CASES[name]
    opt = make_sgd(lrs=(0.1, 0.03))  # two groups with different lrs, each scheduled from its own
    sched = factory(opt)
    assert sched.last_epoch == 0
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.03]
    assert sched.base_lrs == [0.1, 0.03]
    got = lr_sequence(sched, n)
    assert_close(got, [[ref(0.1, t), ref(0.03, t)] for t in range(n + 1)])
    assert sched.last_epoch == n


def test_hand_computed_numbers():
    def run(make, n, lr=0.3):
        return [x[0] for x in lr_sequence(make(make_sgd(lrs=(lr,))), n)]

    assert run(lambda o: S.StepLR(o, 2, gamma=0.5), 5, lr=1.0) == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert run(lambda o: S.MultiStepLR(o, [1, 3], gamma=0.5), 4, lr=1.0) == [1, 0.5, 0.5, 0.25, 0.25]
    assert run(lambda o: S.ExponentialLR(o, 0.5), 3, lr=1.0) == [1, 0.5, 0.25, 0.125]
    # LinearLR's defaults: a factor going 1/3 -> 1 over 5 steps, so 0.1 + 0.04 t for lr 0.3
    assert_close(run(lambda o: S.LinearLR(o), 7), [0.1, 0.14, 0.18, 0.22, 0.26, 0.3, 0.3, 0.3])
    # cosine over 4 steps: (1 + cos(pi t / 4)) / 2 = 1, (2 + sqrt 2) / 4, 1/2, (2 - sqrt 2) / 4, 0
    r = math.sqrt(2)
    assert_close(
        run(lambda o: S.CosineAnnealingLR(o, T_max=4), 8, lr=1.0),
        [1, (2 + r) / 4, 0.5, (2 - r) / 4, 0, (2 - r) / 4, 0.5, (2 + r) / 4, 1],
    )


def test_one_cycle_hand_computed_linear():
    # max_lr 1, div_factor 25 -> initial_lr 0.04, final_div_factor 1e4 -> min_lr 4e-6; 10 steps with
    # pct_start 0.3 -> warm-up over steps 0..2, then down over steps 2..9.
    opt = make_sgd(lrs=(0.5,), momentum=0.9)
    sched = S.OneCycleLR(opt, max_lr=1.0, total_steps=10, anneal_strategy="linear")
    lrs, moms = [], []
    for t in range(10):
        if t:
            sched.step()
        lrs.append(sched.get_last_lr()[0])
        moms.append(opt.param_groups[0]["momentum"])
    # Annealing a -> b as a + (b - a) * s rounds at about ulp(max_lr), in torch as in any closed
    # form, so near min_lr the lrs are compared to 1e-12 of max_lr.
    assert_close(lrs[:3], [0.04, 0.52, 1.0])
    assert_close(lrs[2:], [1 + (4e-6 - 1) * k / 7 for k in range(8)], abs_tol=REL * 1.0)
    assert lrs[-1] == pytest.approx(4e-6, rel=0, abs=REL * 1.0)
    assert_close(moms[:3], [0.95, 0.90, 0.85])
    assert_close(moms[2:], [0.85 + 0.1 * k / 7 for k in range(8)])
    g = opt.param_groups[0]
    assert (g["initial_lr"], g["max_lr"], g["min_lr"]) == (0.04, 1.0, 0.04 / 1e4)
    assert (g["max_momentum"], g["base_momentum"]) == (0.95, 0.85)


def one_cycle_ref(
    t,
    max_lr,
    total,
    pct,
    div=25.0,
    final_div=1e4,
    cos=True,
    three_phase=False,
    m_max=0.95,
    m_base=0.85,
):
    """(lr, momentum) of the 1cycle policy at step t, written out phase by phase."""
    lo = max_lr / div
    end = lo / final_div
    w = pct * total - 1  # last step of the warm-up
    if three_phase:
        phases = [
            (0, w, lo, max_lr, m_max, m_base),
            (w, 2 * w, max_lr, lo, m_base, m_max),
            (2 * w, total - 1, lo, end, m_max, m_max),
        ]
    else:
        phases = [(0, w, lo, max_lr, m_max, m_base), (w, total - 1, max_lr, end, m_base, m_max)]
    s, e, a, b, ma, mb = next((p for p in phases if t <= p[1]), phases[-1])
    p = (t - s) / (e - s)
    shape = (1 - math.cos(math.pi * p)) / 2 if cos else p  # 0 -> 1 as p goes 0 -> 1
    return a + (b - a) * shape, ma + (mb - ma) * shape


@pytest.mark.parametrize("cos", [True, False])
@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_closed_form_two_groups(cos, three_phase):
    total, pct = 40, 0.25
    opt = ok.Adam(
        [{"params": [np.zeros(2, np.float32)]}, {"params": [np.zeros(2, np.float32)]}],
        lr=1e-3,
        betas=(0.9, 0.99),
    )
    sched = S.OneCycleLR(
        opt,
        max_lr=[0.5, 0.2],
        total_steps=total,
        pct_start=pct,
        anneal_strategy="cos" if cos else "linear",
        three_phase=three_phase,
        base_momentum=[0.8, 0.85],
        max_momentum=0.9,
    )
    for t in range(total):
        if t:
            sched.step()
        for i, (max_lr, m_base) in enumerate([(0.5, 0.8), (0.2, 0.85)]):
            lr, m = one_cycle_ref(
                t, max_lr, total, pct, cos=cos, three_phase=three_phase, m_max=0.9, m_base=m_base
            )
            g = opt.param_groups[i]
            assert g["lr"] == pytest.approx(lr, rel=REL, abs=REL * max_lr), (t, i)  # see above
            assert g["betas"][0] == pytest.approx(m, rel=REL, abs=0), (t, i)
            assert g["betas"][1] == 0.99  # beta2 is left alone


def test_one_cycle_epochs_and_no_momentum_cycling():
    opt = ok.Adagrad([np.zeros(2, np.float32)], lr=0.1)  # no momentum, no betas
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        S.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    sched = S.OneCycleLR(opt, max_lr=1.0, epochs=2, steps_per_epoch=5, cycle_momentum=False)
    assert sched.total_steps == 10
    assert "momentum" not in opt.param_groups[0] and "max_momentum" not in opt.param_groups[0]
    for _ in range(10):  # torch allows one step past the last (step total_steps), then raises
        sched.step()
    before = (sched.last_epoch, sched.get_last_lr())
    with pytest.raises(ValueError, match="past total_steps=10"):
        sched.step()
    assert (sched.last_epoch, sched.get_last_lr()) == before  # a step that raises changes nothing


# -- ReduceLROnPlateau ---------------------------------------------------------------------------


def plateau_lrs(sched, metrics):
    out = [sched.get_last_lr()]
    for m in metrics:
        sched.step(m)
        out.append(sched.get_last_lr())
        assert out[-1] == [g["lr"] for g in sched.optimizer.param_groups]
    return [x if len(x) > 1 else x[0] for x in out]


def test_plateau_min_rel_patience():
    sched = S.ReduceLROnPlateau(make_sgd(lrs=(1.0,)), factor=0.5, patience=2)
    # best 10, 9; three bad steps (> patience 2) -> halve; best 8; three bad -> halve again
    assert plateau_lrs(sched, [10, 9, 9, 9, 9, 8, 8, 8, 8]) == [
        1,
        1,
        1,
        1,
        1,
        0.5,
        0.5,
        0.5,
        0.5,
        0.25,
    ]
    # an improvement smaller than threshold (relative) is a bad step
    sched = S.ReduceLROnPlateau(make_sgd(lrs=(1.0,)), threshold=0.1, patience=1)
    assert plateau_lrs(sched, [10, 9.5, 9.2, 8.9]) == [1, 1, 1, 0.1, 0.1]


def test_plateau_cooldown():
    sched = S.ReduceLROnPlateau(make_sgd(lrs=(1.0,)), patience=0, cooldown=2)
    got = plateau_lrs(sched, [5] * 7)
    assert_close(got, [1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])


def test_plateau_max_abs_and_rel():
    metrics = [1.0, 1.4, 1.6, 2.0, 2.2, 2.3, 2.4]
    sched = S.ReduceLROnPlateau(
        make_sgd(lrs=(1.0,)), mode="max", factor=0.5, patience=1, threshold=0.5, threshold_mode="abs"
    )
    assert plateau_lrs(sched, metrics) == [1, 1, 1, 1, 1, 1, 1, 0.5]
    sched = S.ReduceLROnPlateau(
        make_sgd(lrs=(1.0,)), mode="max", factor=0.5, patience=1, threshold=0.5, threshold_mode="rel"
    )
    assert plateau_lrs(sched, metrics) == [1, 1, 1, 1, 1, 0.5, 0.5, 0.25]


def test_plateau_min_lr_list_and_eps():
    sched = S.ReduceLROnPlateau(
        make_sgd(lrs=(1.0, 0.01)), factor=0.5, patience=0, min_lr=[0.3, 0.0], eps=0.004
    )
    # group 0 stops at its min_lr 0.3; group 1 stops once a cut would be 0.0025 <= eps
    assert_close(
        plateau_lrs(sched, [1] * 4), [[1, 0.01], [1, 0.01], [0.5, 0.005], [0.3, 0.005], [0.3, 0.005]]
    )


def test_plateau_state_dict_round_trip():
    metrics = [3, 2, 2, 2, 2.5, 1, 1, 1, 1, 1, 1, 1, 0.5, 0.7, 0.7]
    make = lambda o: S.ReduceLROnPlateau(o, patience=1, cooldown=1, factor=0.5)  # noqa: E731
    opt = make_sgd()
    sched = make(opt)
    plateau_lrs(sched, metrics[:6])
    osd, ssd = opt.state_dict(), pickle.loads(pickle.dumps(sched.state_dict()))
    assert "optimizer" not in ssd and ssd["best"] == 1 and ssd["mode"] == "min"
    want = plateau_lrs(sched, metrics[6:])
    opt2 = make_sgd()
    sched2 = make(opt2)
    opt2.load_state_dict(osd)
    sched2.load_state_dict(ssd)
    assert plateau_lrs(sched2, metrics[6:]) == want


# -- state dicts ---------------------------------------------------------------------------------


ONE_CYCLE = (lambda o: S.OneCycleLR(o, max_lr=[1.0, 0.4], total_steps=16, three_phase=True), 15)


@pytest.mark.parametrize("name", list(CASES) + ["OneCycleLR"])
def test_state_dict_round_trip(name):
    factory, n = ONE_CYCLE if name == "OneCycleLR" else CASES[name][:2]
    k = n // 2 + 1

    def with_momentum(seq, opt):
        return seq + [[g["momentum"] for g in opt.param_groups]]

    opt = make_sgd(momentum=0.9)
    sched = factory(opt)
    lr_sequence(sched, k)
    osd = opt.state_dict()
    ssd = pickle.loads(pickle.dumps(sched.state_dict()))  # picklable (lambdas are left out)
    assert "optimizer" not in ssd and ssd["last_epoch"] == k
    want = with_momentum(lr_sequence(sched, n - k), opt)

    opt2 = make_sgd(momentum=0.9)
    sched2 = factory(opt2)  # a fresh scheduler first, then the optimizer's state, as torch advises
    opt2.load_state_dict(osd)
    sched2.load_state_dict(ssd)
    assert sched2.last_epoch == k
    assert with_momentum(lr_sequence(sched2, n - k), opt2) == want


def test_state_dict_is_a_snapshot_and_loading_keeps_the_dict():
    opt = make_sgd()
    sched = S.MultiStepLR(opt, milestones=[2, 4])
    sd = sched.state_dict()
    sched.base_lrs.append(99.0)
    sched.milestones[7] = 1
    assert sd["base_lrs"] == [0.1, 0.03] and 7 not in sd["milestones"]
    sched2 = S.MultiStepLR(make_sgd(), milestones=[1])
    sched2.load_state_dict(sd)
    assert sched2.milestones == {2: 1, 4: 1}
    sched2.milestones[9] = 1
    assert 9 not in sd["milestones"]
    with pytest.raises(TypeError, match="mapping"):
        sched2.load_state_dict([("last_epoch", 3)])


def test_lambda_lr_state_keeps_callable_objects():
    class Warmup:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, t):
            return min(1.0, (t + 1) / self.steps)

    sched = S.LambdaLR(make_sgd(), [Warmup(4), lambda t: 1.0])
    sd = sched.state_dict()
    assert sd["lr_lambdas"] == [{"steps": 4}, None]
    fresh = Warmup(100)
    sched2 = S.LambdaLR(make_sgd(), [fresh, lambda t: 1.0])
    sched2.load_state_dict(sd)
    assert fresh.steps == 4


def test_resume_with_last_epoch():
    opt = make_sgd()
    with pytest.raises(ValueError, match="initial_lr"):
        S.StepLR(opt, step_size=2, last_epoch=3)
    sched = S.ExponentialLR(opt, gamma=0.5)
    for _ in range(3):
        sched.step()
    # a new chainable scheduler taking over at step 3 continues from the groups' current lrs
    # (torch's initial step then moves last_epoch to 4, leaving the lr as it is)
    resumed = S.ExponentialLR(opt, gamma=0.5, last_epoch=3)
    assert resumed.last_epoch == 4 and resumed.base_lrs == [0.1, 0.03]
    assert_close(lr_sequence(resumed, 2), [[0.1 * 0.5**t, 0.03 * 0.5**t] for t in (3, 4, 5)])


def test_chainable_forms_follow_outside_changes():
    opt = make_sgd(lrs=(1.0,))
    sched = S.ExponentialLR(opt, gamma=0.5)
    sched.step()
    opt.param_groups[0]["lr"] = 10.0  # someone else changes the lr between steps
    sched.step()
    assert sched.get_last_lr() == [5.0]
    lam = S.LambdaLR(opt, lambda t: 1.0)  # LambdaLR is not chainable: base_lr * lambda(t)
    assert lam.base_lrs == [1.0] and lam.get_last_lr() == [1.0]


# -- driving a real optimizer ----------------------------------------------------------------------


def test_scheduler_drives_sgd():
    p0 = np.linspace(-1, 1, 7).astype(np.float32)
    q0 = np.arange(5, dtype=np.float32)
    W, b = p0.copy(), q0.copy()
    g = np.full(7, 0.5, np.float32)
    h = np.full(5, -2.0, np.float32)
    opt = ok.SGD([{"params": [W]}, {"params": [b], "lr": 0.01}], lr=0.1)
    sched = S.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(6):
        opt.step([g, h])
        sched.step()
    # steps 0..5 used lr * 0.5 ** (t // 2): three pairs with factors 1, 0.5, 0.25
    total = 2 * (1 + 0.5 + 0.25)
    np.testing.assert_allclose(W, p0.astype(np.float64) - 0.1 * total * 0.5, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, q0.astype(np.float64) + 0.01 * total * 2.0, rtol=1e-6, atol=1e-7)


def test_one_cycle_drives_adam_beta1():
    W = np.zeros(4, np.float32)
    opt = ok.Adam([W], lr=1e-3)
    sched = S.OneCycleLR(opt, max_lr=0.1, total_steps=6, anneal_strategy="linear")
    betas1 = []
    for _ in range(5):
        betas1.append(opt.param_groups[0]["betas"][0])
        opt.step([np.ones(4, np.float32)])
        sched.step()
    assert_close(betas1, [one_cycle_ref(t, 0.1, 6, 0.3, cos=False)[1] for t in range(5)])
    # Adam's first step moves each weight by about lr (the update is m_hat / sqrt(v_hat) = 1)
    assert np.all(W < 0) and np.all(np.isfinite(W))


# -- bad arguments ---------------------------------------------------------------------------------


def _one_group_adagrad():
    return ok.Adagrad([np.zeros(2, np.float32)], lr=0.1)


BAD = [
    (lambda o: S.StepLR(o, step_size=0), ValueError, "step_size must be >= 1"),
    (lambda o: S.StepLR(o, step_size=2.5), TypeError, "step_size must be an int"),
    (lambda o: S.StepLR(o, step_size=2, gamma=0), ValueError, "gamma must be > 0"),
    (lambda o: S.StepLR(o, step_size=2, gamma="0.1"), TypeError, "gamma must be a real number"),
    (lambda o: S.MultiStepLR(o, milestones=[5, 3]), ValueError, "milestones must be non-decreasing"),
    (lambda o: S.MultiStepLR(o, milestones=[-1, 3]), ValueError, r"milestones\[0\] must be >= 0"),
    (lambda o: S.MultiStepLR(o, milestones=7), TypeError, "milestones must be a list"),
    (lambda o: S.MultiStepLR(o, milestones=[2], gamma=-0.5), ValueError, "gamma must be > 0"),
    (lambda o: S.ExponentialLR(o, gamma=0.0), ValueError, "gamma must be > 0"),
    (lambda o: S.ExponentialLR(o, gamma=float("nan")), ValueError, "gamma must be finite"),
    (lambda o: S.CosineAnnealingLR(o, T_max=0), ValueError, "T_max must be > 0"),
    (lambda o: S.CosineAnnealingLR(o, T_max=-5), ValueError, "T_max must be > 0"),
    (lambda o: S.CosineAnnealingLR(o, T_max=5, eta_min=-1e-3), ValueError, "eta_min must be >= 0"),
    (lambda o: S.LinearLR(o, start_factor=0), ValueError, r"start_factor must be in \(0, 1\]"),
    (lambda o: S.LinearLR(o, start_factor=1.5), ValueError, "start_factor"),
    (lambda o: S.LinearLR(o, end_factor=2.0), ValueError, r"end_factor must be in \[0, 1\]"),
    (lambda o: S.LinearLR(o, total_iters=0), ValueError, "total_iters must be >= 1"),
    (lambda o: S.LambdaLR(o, lr_lambda=0.5), TypeError, "must be callable"),
    (
        lambda o: S.LambdaLR(o, lr_lambda=[lambda t: 1.0]),
        ValueError,
        "1 functions but the optimizer has 2",
    ),
    (lambda o: S.SequentialLR(o, [], milestones=[]), ValueError, "at least one scheduler"),
    (
        lambda o: S.SequentialLR(o, [S.StepLR(o, 2), S.StepLR(o, 3)], milestones=[]),
        ValueError,
        "one milestone fewer than schedulers",
    ),
    (
        lambda o: S.SequentialLR(o, [S.StepLR(o, 2)] * 3, milestones=[4, 4]),
        ValueError,
        "milestones must be increasing",
    ),
    (
        lambda o: S.SequentialLR(o, [S.StepLR(o, 2), "x"], milestones=[3]),
        TypeError,
        r"schedulers\[1\] must be an LRScheduler",
    ),
    (
        lambda o: S.SequentialLR(o, [S.StepLR(o, 2), S.ReduceLROnPlateau(o)], milestones=[3]),
        ValueError,
        "needs a metric",
    ),
    (
        lambda o: S.SequentialLR(o, [S.StepLR(make_sgd(), 2)], milestones=[]),
        ValueError,
        "another optimizer",
    ),
    (lambda o: S.OneCycleLR(o, max_lr=1.0), ValueError, "needs total_steps"),
    (lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=0), ValueError, "total_steps must be >= 1"),
    (
        lambda o: S.OneCycleLR(o, max_lr=1.0, epochs=2, steps_per_epoch=0),
        ValueError,
        "steps_per_epoch must be >= 1",
    ),
    (
        lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=10, pct_start=1.5),
        ValueError,
        r"pct_start must be in \[0, 1\]",
    ),
    (
        lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=10, anneal_strategy="exp"),
        ValueError,
        "anneal_strategy must be 'cos' or 'linear'",
    ),
    (
        lambda o: S.OneCycleLR(o, max_lr=[1.0], total_steps=10),
        ValueError,
        "max_lr has 1 values but the optimizer has 2",
    ),
    (
        lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=10, div_factor=0),
        ValueError,
        "div_factor must be > 0",
    ),
    # torch fails here with ZeroDivisionError: a warm-up of pct_start * total_steps = 1 step
    (
        lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=10, pct_start=0.1),
        ValueError,
        "spans no steps",
    ),
    (
        lambda o: S.OneCycleLR(_one_group_adagrad(), max_lr=1.0, total_steps=10),
        ValueError,
        "neither 'momentum' nor 'betas'",
    ),
    (lambda o: S.ReduceLROnPlateau(o, mode="avg"), ValueError, "mode must be 'min' or 'max'"),
    (lambda o: S.ReduceLROnPlateau(o, threshold_mode="pct"), ValueError, "threshold_mode must be"),
    (lambda o: S.ReduceLROnPlateau(o, factor=1.0), ValueError, r"factor must be in \[0, 1\)"),
    (lambda o: S.ReduceLROnPlateau(o, min_lr=[0.0]), ValueError, "min_lr has 1 values"),
    (lambda o: S.ReduceLROnPlateau(o, patience=-1), ValueError, "patience must be >= 0"),
    (lambda o: S.ReduceLROnPlateau(o, cooldown=1.5), TypeError, "cooldown must be an int"),
    (
        lambda o: S.ExponentialLR([np.zeros(2, np.float32)], gamma=0.9),
        TypeError,
        "must be an optkern Optimizer",
    ),
    (lambda o: S.ExponentialLR(o, gamma=0.9, last_epoch=-2), ValueError, "last_epoch must be >= -1"),
]


@pytest.mark.parametrize("make, exc, match", BAD)
def test_bad_arguments_rejected(make, exc, match):
    with pytest.raises(exc, match=match):
        make(make_sgd())


def test_rejected_one_cycle_leaves_groups_alone():
    opt = make_sgd(momentum=0.5)
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ValueError):
        S.OneCycleLR(opt, max_lr=1.0, total_steps=10, base_momentum=[0.8])
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before


def test_non_numeric_lr_rejected():
    opt = make_sgd()
    opt.param_groups[1]["lr"] = lambda step: 0.1  # a scheduled lr is not something to schedule
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['lr'\] must be a number"):
        S.StepLR(opt, step_size=2)
    assert all("initial_lr" not in g for g in opt.param_groups)


def test_exported():
    assert ok.lr_scheduler is S and "lr_scheduler" in ok.__all__
    sched = ok.lr_scheduler.CosineAnnealingLR(make_sgd(), T_max=100)
    sched.step()
    for cls in (
        S.LambdaLR,
        S.StepLR,
        S.MultiStepLR,
        S.ExponentialLR,
        S.CosineAnnealingLR,
        S.LinearLR,
        S.SequentialLR,
        S.OneCycleLR,
        S.ReduceLROnPlateau,
    ):
        assert issubclass(cls, S.LRScheduler) and "lr" in cls.__doc__
