"""Schedulers fed nonsense. Construction arguments, lambdas returning
junk or raising, huge last_epoch, foreign or mistyped state dicts, SequentialLR with odd
children, ReduceLROnPlateau with non-real metrics. Each refusal is a TypeError or ValueError and
leaves the optimizer's groups and the scheduler as they were."""

import math

import numpy as np
import pytest

import optkern as ok
from optkern import lr_scheduler as S


def opt2(lr=0.1):
    return ok.SGD(
        [{"params": [np.ones(3, np.float32)]}, {"params": [np.ones(2, np.float32)], "lr": 0.01}],
        lr=lr,
        momentum=0.9,
    )


def groups(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def sched_state(s):
    return s.state_dict()  # copies; children and callable objects as their own state


def refused_at_construction(make, exc=(TypeError, ValueError)):
    opt = opt2()
    before = groups(opt)
    with pytest.raises(exc):
        make(opt)
    assert groups(opt) == before  # no initial_lr left behind, lrs untouched


BAD_REALS = {
    "nan": math.nan,
    "inf": math.inf,
    "neg": -0.5,
    "bool": True,
    "str": "0.5",
    "none": None,
    "complex": 0.5j,
    "huge": 1e39,
    "list": [0.5],
    "array": np.ones(2),
}

CTORS = {
    "StepLR.gamma": lambda v: lambda o: S.StepLR(o, 2, gamma=v),
    "MultiStepLR.gamma": lambda v: lambda o: S.MultiStepLR(o, [1, 2], gamma=v),
    "ExponentialLR.gamma": lambda v: lambda o: S.ExponentialLR(o, gamma=v),
    "CosineAnnealingLR.T_max": lambda v: lambda o: S.CosineAnnealingLR(o, T_max=v),
    "CosineAnnealingLR.eta_min": lambda v: lambda o: S.CosineAnnealingLR(o, 5, eta_min=v),
    "LinearLR.start_factor": lambda v: lambda o: S.LinearLR(o, start_factor=v),
    "OneCycleLR.max_lr": lambda v: lambda o: S.OneCycleLR(o, max_lr=v, total_steps=10),
    "ReduceLROnPlateau.threshold": lambda v: lambda o: S.ReduceLROnPlateau(o, threshold=v),
}


@pytest.mark.parametrize("value", BAD_REALS)
@pytest.mark.parametrize("ctor", CTORS)
def test_nonsense_real_arguments_refused(ctor, value):
    refused_at_construction(CTORS[ctor](BAD_REALS[value]))


@pytest.mark.parametrize(
    "make",
    [
        lambda o: S.StepLR(o, step_size=0),
        lambda o: S.StepLR(o, step_size=-2),
        lambda o: S.StepLR(o, step_size=2.0),
        lambda o: S.StepLR(o, step_size=True),
        lambda o: S.StepLR(o, step_size="2"),
        lambda o: S.CosineAnnealingLR(o, T_max=0),
        lambda o: S.CosineAnnealingLR(o, T_max=-3),
        lambda o: S.LinearLR(o, total_iters=0),
        lambda o: S.LinearLR(o, end_factor=1.5),
        lambda o: S.LinearLR(o, start_factor=0),
        lambda o: S.OneCycleLR(o, max_lr=1.0),
        lambda o: S.OneCycleLR(o, 1.0, total_steps=0),
        lambda o: S.OneCycleLR(o, 1.0, total_steps=10, pct_start=1.5),
        lambda o: S.OneCycleLR(o, 1.0, total_steps=10, anneal_strategy="cubic"),
        lambda o: S.OneCycleLR(o, [1.0], total_steps=10),
        lambda o: S.OneCycleLR(o, 1.0, epochs=2, steps_per_epoch=0),
        lambda o: S.ReduceLROnPlateau(o, mode="median"),
        lambda o: S.ReduceLROnPlateau(o, factor=1.0),
        lambda o: S.ReduceLROnPlateau(o, factor=-0.1),
        lambda o: S.ReduceLROnPlateau(o, patience=-1),
        lambda o: S.ReduceLROnPlateau(o, threshold_mode="pct"),
        lambda o: S.ReduceLROnPlateau(o, min_lr=[0.1]),
        lambda o: S.ReduceLROnPlateau(o, cooldown=1.5),
    ],
)
def test_nonsense_construction_refused(make):
    refused_at_construction(make)


@pytest.mark.parametrize(
    "milestones", [[3, 1], [-1, 2], [1.0, 2], [True], "12", {1: 2}, None, [1, "2"], 5]
)
def test_nonsense_milestones_refused(milestones):
    refused_at_construction(lambda o: S.MultiStepLR(o, milestones))


def test_repeated_milestones_decay_twice_like_torch():
    opt = opt2()
    s = S.MultiStepLR(opt, [2, 2], gamma=0.5)
    s.step()
    s.step()
    assert s.get_last_lr() == [0.1 * 0.25, 0.01 * 0.25]


# -- last_epoch (finding: unbounded) -------------------------------------------------------------


@pytest.mark.parametrize("last_epoch", [2**53 + 1, 2**63, 10**30, -2, -(2**70)])
@pytest.mark.parametrize("cls", ["StepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR"])
def test_last_epoch_out_of_range_refused(cls, last_epoch):
    args = {"StepLR": (2,), "ExponentialLR": (0.5,), "CosineAnnealingLR": (5,), "LinearLR": ()}[cls]

    def make(o):
        for g in o.param_groups:
            g["initial_lr"] = g["lr"]
        return getattr(S, cls)(o, *args, last_epoch=last_epoch)

    opt = opt2()
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    before = groups(opt)
    with pytest.raises(ValueError):
        make(opt)
    assert groups(opt) == before


@pytest.mark.parametrize("cls", ["StepLR", "ExponentialLR", "LinearLR"])
def test_last_epoch_at_the_bound_works(cls):
    opt = opt2()
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    args = {"StepLR": (2,), "ExponentialLR": (1.0,), "LinearLR": ()}[cls]
    s = getattr(S, cls)(opt, *args, last_epoch=2**53 - 1)
    assert s.last_epoch == 2**53


# -- lambdas returning junk or raising (finding: lrs written before they were checked) ------------

JUNK = {
    "str": "x",
    "none": None,
    "nan": math.nan,
    "inf": math.inf,
    "complex": 1j,
    "list": [1.0],
    "array": np.ones(2),
    "huge": 1e300,
    "bool": True,
    "str-array": np.array("0.5"),
    "object-array": np.array(0.5, dtype=object),
}


@pytest.mark.parametrize("junk", JUNK)
def test_lambda_returning_junk_at_construction_refused(junk):
    value = JUNK[junk]
    refused_at_construction(lambda o: S.LambdaLR(o, lambda t: value))


@pytest.mark.parametrize("junk", JUNK)
def test_lambda_returning_junk_later_changes_nothing(junk):
    value = JUNK[junk]
    opt = opt2()
    s = S.LambdaLR(opt, lambda t: 0.5 if t < 2 else value)
    s.step()
    before_groups, before = groups(opt), sched_state(s)
    with pytest.raises((TypeError, ValueError)):
        s.step()
    assert groups(opt) == before_groups and sched_state(s) == before
    assert not any(isinstance(v, np.ndarray) for g in opt.param_groups for v in g.values())


def test_negative_lr_is_written_as_torch_does_and_refused_by_the_step():
    """Left as torch: a schedule may compute a negative lr (a linear OneCycleLR ends just below
    zero at total_steps); the scheduler writes it, and the optimizer's step refuses it with
    nothing changed."""
    p = np.ones(3, np.float32)
    opt = ok.SGD([p], lr=0.1)
    s = S.LambdaLR(opt, lambda t: 1.0 if t < 1 else -1.0)
    s.step()
    assert opt.param_groups[0]["lr"] == -0.1
    with pytest.raises(ValueError, match="lr"):
        opt.step([np.ones(3, np.float32)])
    assert np.all(p == 1.0) and opt.step_count == 0


@pytest.mark.parametrize("exc", [RuntimeError, ZeroDivisionError, KeyboardInterrupt])
def test_lambda_raising_changes_nothing(exc):
    opt = opt2()
    calls = []

    def fn(t):
        calls.append(t)
        if t == 2:
            raise exc("no")
        return 1.0 / (t + 1)

    s = S.LambdaLR(opt, [fn, lambda t: 1.0])
    s.step()
    before_groups, before = groups(opt), sched_state(s)
    with pytest.raises(exc):
        s.step()
    assert groups(opt) == before_groups and sched_state(s) == before


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.array(0.5), 1, 0])
def test_lambda_returning_real_scalars_accepted(value):
    opt = opt2()
    s = S.LambdaLR(opt, lambda t: value)
    assert s.get_last_lr() == [0.1 * float(value), 0.01 * float(value)]
    assert all(type(g["lr"]) is float for g in opt.param_groups)


def test_lambda_list_with_a_non_callable_refused():
    refused_at_construction(lambda o: S.LambdaLR(o, [lambda t: 1.0, 3.0]))


def test_lambda_list_of_wrong_length_refused():
    refused_at_construction(lambda o: S.LambdaLR(o, [lambda t: 1.0]))


def test_lr_made_junk_by_someone_else_refused_by_chainable_step():
    opt = opt2()
    s = S.ExponentialLR(opt, 0.5)
    opt.param_groups[0]["lr"] = "0.1"
    before = sched_state(s)
    with pytest.raises(TypeError):
        s.step()
    assert sched_state(s) == before and opt.param_groups[1]["lr"] == 0.01


def test_chainable_lr_overflow_refused_before_writing():
    opt = opt2()
    s = S.ExponentialLR(opt, 1e30)
    s.step()  # 0.1 * 1e30
    before_groups, before = groups(opt), sched_state(s)
    with pytest.raises(ValueError):
        s.step()  # 1e29 * 1e30 is beyond float32
    assert groups(opt) == before_groups and sched_state(s) == before


# -- load_state_dict (finding: foreign attributes accepted, not atomic) ----------------------------


def stepped_steplr():
    opt = opt2()
    s = S.StepLR(opt, 2, gamma=0.5)
    for _ in range(3):
        s.step()
    return opt, s


DEEP = [0.1]
for _ in range(100):
    DEEP = [DEEP]

FOREIGN = {
    "unknown-key": {"bogus": 1},
    "optimizer-like": {"step": 5},
    "dunder": {"__class__": int},
    "non-str-key": {3: 4},
    "last_epoch-str": {"last_epoch": "3"},
    "last_epoch-float": {"last_epoch": 3.0},
    "last_epoch-bool": {"last_epoch": True},
    "last_epoch-huge": {"last_epoch": 2**60},
    "last_epoch-neg": {"last_epoch": -5},
    "base_lrs-short": {"base_lrs": [0.1]},
    "base_lrs-nan": {"base_lrs": [math.nan, 0.1]},
    "base_lrs-str": {"base_lrs": "ab"},
    "base_lrs-inf": {"base_lrs": [math.inf, 0.1]},
    "_last_lr-junk": {"_last_lr": [None, 0.1]},
    "gamma-str": {"gamma": "0.5"},
    "gamma-list": {"gamma": [0.5]},
    "step_size-float": {"step_size": 2.5},
    "step_size-none": {"step_size": None},
    "_step_count-neg": {"_step_count": -1},
    "deep": {"base_lrs": [0.1, DEEP]},
}


@pytest.mark.parametrize("case", FOREIGN)
def test_foreign_or_mistyped_state_dict_refused_atomically(case):
    opt, s = stepped_steplr()
    sd = s.state_dict()
    sd["last_epoch"] = 1  # a valid change that must not be applied when the rest is refused
    sd.update(FOREIGN[case])
    before_groups, before = groups(opt), sched_state(s)
    with pytest.raises((TypeError, ValueError)):
        s.load_state_dict(sd)
    assert groups(opt) == before_groups and sched_state(s) == before


def test_state_dict_whose_keys_are_a_subset_loads():
    """ExponentialLR's attributes are all StepLR's too, of the same kinds: it loads (as torch)."""
    sd = S.ExponentialLR(opt2(), 0.5).state_dict()
    opt, s = stepped_steplr()
    s.load_state_dict(sd)
    assert s.gamma == 0.5 and s.last_epoch == 0 and s.step_size == 2


@pytest.mark.parametrize(
    "other",
    [
        lambda o: S.CosineAnnealingLR(o, 5),
        lambda o: S.LinearLR(o),
        lambda o: S.OneCycleLR(o, 1.0, total_steps=10),
        lambda o: S.MultiStepLR(o, [1]),
    ],
)
def test_state_dict_of_another_scheduler_class_refused(other):
    sd = other(opt2()).state_dict()
    opt, s = stepped_steplr()
    before = sched_state(s)
    with pytest.raises((TypeError, ValueError)):
        s.load_state_dict(sd)
    assert sched_state(s) == before


def test_torch_only_key_ignored():
    opt, s = stepped_steplr()
    sd = s.state_dict()
    sd["_get_lr_called_within_step"] = False
    s.load_state_dict(sd)
    assert "_get_lr_called_within_step" not in vars(s)


def test_ints_accepted_where_floats_are_stored():
    opt, s = stepped_steplr()
    sd = s.state_dict()
    sd["gamma"] = 1
    sd["base_lrs"] = [1, 0]
    s.load_state_dict(sd)
    assert s.gamma == 1 and s.base_lrs == [1, 0]


@pytest.mark.parametrize(
    "bad",
    [
        {"lr_lambdas": "x"},
        {"lr_lambdas": [1, 2]},
        {"lr_lambdas": [None, None, None]},
        {"lr_lambdas": [{1: 2}]},
    ],
)
def test_lambdalr_bad_saved_lambdas_refused(bad):
    class Scale:
        def __init__(self):
            self.k = 1.0

        def __call__(self, t):
            return self.k

    opt = opt2()
    fns = [Scale(), Scale()]
    s = S.LambdaLR(opt, fns)
    sd = s.state_dict()
    sd.update(bad)
    sd["last_epoch"] = 7
    before = sched_state(s)
    with pytest.raises((TypeError, ValueError)):
        s.load_state_dict(sd)
    assert sched_state(s) == before and [f.k for f in fns] == [1.0, 1.0]


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "median"},
        {"threshold_mode": "pct"},
        {"factor": -1.0},
        {"min_lrs": [math.nan, 0.0]},
        {"best": "low"},
        {"num_bad_epochs": 1.5},
        {"eps": "x"},
        {"cooldown_counter": None},
    ],
)
def test_plateau_bad_state_dict_refused_atomically(bad):
    opt = opt2()
    s = S.ReduceLROnPlateau(opt, patience=1)
    s.step(1.0)
    sd = s.state_dict()
    sd["last_epoch"] = 9
    sd.update(bad)
    before = sched_state(s)
    with pytest.raises((TypeError, ValueError)):
        s.load_state_dict(sd)
    assert sched_state(s) == before


# -- SequentialLR ------------------------------------------------------------------------------------


def test_sequential_with_a_plateau_child_refused():
    opt = opt2()
    refused = [S.ExponentialLR(opt, 0.5), S.ReduceLROnPlateau(opt)]
    with pytest.raises(ValueError):
        S.SequentialLR(opt, refused, [2])


@pytest.mark.parametrize(
    "children", ["none", "empty", "not-scheduler", "other-optimizer", "tuple-of-one-scheduler"]
)
def test_sequential_with_odd_children_refused(children):
    opt = opt2()
    a = S.ExponentialLR(opt, 0.5)
    kids = {
        "none": None,
        "empty": [],
        "not-scheduler": [a, 3],
        "other-optimizer": [a, S.ExponentialLR(opt2(), 0.5)],
        "tuple-of-one-scheduler": a,
    }[children]
    with pytest.raises((TypeError, ValueError)):
        S.SequentialLR(opt, kids, [2])


@pytest.mark.parametrize("milestones", [[], [2, 3], [0.5], [-1], ["2"], [True]])
def test_sequential_with_odd_milestones_refused(milestones):
    opt = opt2()
    kids = [S.ExponentialLR(opt, 0.5), S.StepLR(opt, 2)]
    with pytest.raises((TypeError, ValueError)):
        S.SequentialLR(opt, kids, milestones)


def test_sequential_same_child_twice_runs():
    opt = opt2()
    a = S.ExponentialLR(opt, 0.5)
    s = S.SequentialLR(opt, [a, a], [2])
    for _ in range(4):
        s.step()
    assert all(math.isfinite(lr) and lr > 0 for lr in s.get_last_lr())


def test_sequential_load_refused_atomically_when_one_child_is_bad():
    opt = opt2()
    kids = [S.ExponentialLR(opt, 0.5), S.StepLR(opt, 2)]
    s = S.SequentialLR(opt, kids, [2])
    for _ in range(3):
        s.step()
    sd = s.state_dict()
    sd["last_epoch"] = 1
    sd["_schedulers"][0]["last_epoch"] = 0
    sd["_schedulers"][1]["gamma"] = "junk"
    before = [sched_state(s)] + [sched_state(k) for k in kids]
    with pytest.raises(TypeError):
        s.load_state_dict(sd)
    assert [sched_state(s)] + [sched_state(k) for k in kids] == before


@pytest.mark.parametrize("bad", [None, [], "ab", [{}, {}, {}]])
def test_sequential_load_with_bad_children_list_refused(bad):
    opt = opt2()
    s = S.SequentialLR(opt, [S.ExponentialLR(opt, 0.5), S.StepLR(opt, 2)], [2])
    sd = s.state_dict()
    sd["_schedulers"] = bad
    before = sched_state(s)
    with pytest.raises((TypeError, ValueError)):
        s.load_state_dict(sd)
    assert sched_state(s) == before


# -- ReduceLROnPlateau metrics (finding: non-real metrics accepted) -----------------------------------


@pytest.mark.parametrize(
    "metric",
    [
        "1.0",
        b"1",
        True,
        np.bool_(False),
        1j,
        None,
        [1.0],
        np.array([1.0]),
        np.ones((1, 1)),
        {"loss": 1.0},
        object(),
        np.array("1.0"),
        np.array(b"1.0"),
        np.array(1.0, object),
    ],
    ids=[
        "str",
        "bytes",
        "bool",
        "np-bool",
        "complex",
        "None",
        "list",
        "array-1",
        "array-1x1",
        "dict",
        "object",
        "array-str",
        "array-bytes",
        "array-object",
    ],
)
def test_plateau_refuses_non_real_metrics(metric):
    opt = opt2()
    s = S.ReduceLROnPlateau(opt, patience=0)
    s.step(1.0)
    before, before_groups = sched_state(s), groups(opt)
    with pytest.raises(TypeError):
        s.step(metric)
    assert sched_state(s) == before and groups(opt) == before_groups


@pytest.mark.parametrize("metric", [np.float32(2.0), np.float64(2.0), np.array(2.0), 2, np.int64(2)])
def test_plateau_takes_real_scalars(metric):
    opt = opt2()
    s = S.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    s.step(1.0)
    s.step(metric)  # worse: reduced
    assert s.get_last_lr() == [0.05, 0.005] and s.best == 1.0


@pytest.mark.parametrize("metric", [math.nan, math.inf, -math.inf])
def test_plateau_nonfinite_metrics_behave_as_torch(metric):
    """NaN never improves (torch: comparisons with NaN are false); inf and -inf compare."""
    opt = opt2()
    s = S.ReduceLROnPlateau(opt, patience=5)
    s.step(1.0)
    s.step(metric)
    if metric == -math.inf:
        assert s.best == -math.inf and s.num_bad_epochs == 0
    else:
        assert s.best == 1.0 and s.num_bad_epochs == 1


# -- partial updates when a step fails (findings) ---------------------------------------------------


def test_one_cycle_writes_no_momentum_when_an_lr_is_refused():
    """Regression: OneCycleLR wrote each group's momentum while computing the lrs, so a refused
    lr (a group's max_lr set to NaN) left group 0's momentum changed."""
    opt = opt2()
    s = S.OneCycleLR(opt, 1.0, total_steps=10)
    opt.param_groups[1]["max_lr"] = math.nan
    before_groups, before = groups(opt), sched_state(s)
    with pytest.raises(ValueError):
        s.step()
    assert groups(opt) == before_groups and sched_state(s) == before


@pytest.mark.parametrize("use_betas", [False, True])
def test_one_cycle_still_cycles_momentum(use_betas):
    opt = (
        ok.Adam([np.ones(2, np.float32)], lr=0.1)
        if use_betas
        else ok.SGD([np.ones(2, np.float32)], lr=0.1, momentum=0.9)
    )
    s = S.OneCycleLR(opt, 1.0, total_steps=10)
    seen = []
    for _ in range(9):
        s.step()
        g = opt.param_groups[0]
        seen.append(g["betas"][0] if use_betas else g["momentum"])
    assert min(seen) == pytest.approx(0.85) and seen[-1] == pytest.approx(0.95)
    assert "_momenta" not in s.state_dict()


def test_sequential_last_epoch_kept_when_a_child_refuses():
    """Regression: SequentialLR advanced its last_epoch before the child's step, which could
    refuse (a lambda returning junk): the two then disagreed for the rest of the run."""
    opt = ok.SGD([np.ones(2, np.float32)], lr=0.1)
    a = S.LambdaLR(opt, lambda e: 1.0 if e < 2 else "x")
    s = S.SequentialLR(opt, [a, S.StepLR(opt, 2)], [5])
    s.step()
    before = (s.last_epoch, a.last_epoch, groups(opt))
    with pytest.raises(TypeError):
        s.step()
    assert (s.last_epoch, a.last_epoch, groups(opt)) == before


def test_plateau_unchanged_when_reducing_raises():
    """Regression: ReduceLROnPlateau counted the step (last_epoch, num_bad_epochs) before
    _reduce_lr raised for a group added without a min_lr."""
    opt = ok.SGD([np.ones(2, np.float32)], lr=0.1)
    s = S.ReduceLROnPlateau(opt, patience=0, min_lr=[0.0])
    opt.add_param_group({"params": [np.ones(2, np.float32)]})
    s.step(1.0)
    before, before_groups = sched_state(s), groups(opt)
    with pytest.raises(RuntimeError):
        s.step(2.0)
    assert sched_state(s) == before and groups(opt) == before_groups


def test_plateau_lr_made_junk_refused_before_any_write():
    opt = opt2()
    s = S.ReduceLROnPlateau(opt, patience=0)
    s.step(1.0)
    opt.param_groups[1]["lr"] = "fast"
    before, before_groups = sched_state(s), groups(opt)
    with pytest.raises(TypeError):
        s.step(2.0)
    assert sched_state(s) == before and groups(opt) == before_groups
