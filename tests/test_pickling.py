"""Pickling and deep-copying optimizers, schedulers and FlatParams: training resumes bit for bit
from the copy, for every reference case of the optimizer database; the copy has its own lock and
its state packed as the original's; what cannot be pickled says why."""

import copy
import pickle
import resource
import sys

import numpy as np
import pytest
from helpers import digest
from optim_db import CASES, case_id
from test_checkpoint import stepped

import optkern as ok
from optkern import lr_scheduler


def _grads(params, t):
    rng = np.random.default_rng(1000 + t)
    return [rng.standard_normal(p.shape).astype(np.float32) for p in params]


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pickled_training_state_resumes_bit_identically(case, how):
    name, hp = case
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(7, 3), (5,), (1,)]]
    opt = getattr(ok, name)([{"params": params[:2]}, {"params": params[2:]}], **hp)
    sched = lr_scheduler.ExponentialLR(opt, gamma=0.9)
    for t in range(4):
        opt.step(_grads(params, t))
        sched.step()
    if how == "pickle":
        params2, opt2, sched2 = pickle.loads(pickle.dumps((params, opt, sched)))
    else:
        params2, opt2, sched2 = copy.deepcopy((params, opt, sched))
    assert opt2.param_groups[0]["params"][0] is params2[0]
    assert sched2.optimizer is opt2
    for t in range(4, 10):
        opt.step(_grads(params, t))
        sched.step()
        opt2.step(_grads(params2, t))
        sched2.step()
    assert digest(params) == digest(params2)
    assert digest(opt.state_dict()) == digest(opt2.state_dict())
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_unpickled_optimizer_has_its_own_lock_and_packed_state():
    opt, params = stepped()
    opt2 = pickle.loads(pickle.dumps(opt))
    assert opt2._lock is not opt._lock
    with opt2._lock:  # an RLock: re-entrant
        with opt2._lock:
            pass
    ps2 = [p for g in opt2.param_groups for p in g["params"]]
    a = opt2.state[ps2[0]]["exp_avg"]
    b = opt2.state[ps2[1]]["exp_avg"]
    assert np.shares_memory(a.base if a.base is not None else a, b)  # one block per group


class Cached(ok.SGD):
    _transient_attrs = ("_scratch",)


def test_transient_attrs_convention():
    p = np.zeros(3, np.float32)
    opt = Cached([p], lr=0.1)
    opt._scratch = {"big": np.zeros(10)}
    opt._cache_things = [1, 2]
    opt._other = threading_lock = __import__("threading").Lock()
    opt2 = pickle.loads(pickle.dumps(opt))
    assert opt2._scratch == {} and opt2._cache_things == []
    assert opt2._other is not threading_lock and opt2._other.acquire(blocking=False)


def _module_level_lambda(t):
    return 0.5**t


class Warmup:
    def __init__(self, n):
        self.n = n

    def __call__(self, t):
        return min(1.0, (t + 1) / self.n)


@pytest.mark.parametrize(
    "make",
    [
        lambda o: lr_scheduler.StepLR(o, 2, gamma=0.5),
        lambda o: lr_scheduler.MultiStepLR(o, [1, 3, 3], gamma=0.5),
        lambda o: lr_scheduler.ExponentialLR(o, 0.9),
        lambda o: lr_scheduler.CosineAnnealingLR(o, 5, eta_min=0.001),
        lambda o: lr_scheduler.LinearLR(o, 0.25, 1.0, 4),
        lambda o: lr_scheduler.OneCycleLR(o, 0.5, total_steps=20),
        lambda o: lr_scheduler.LambdaLR(o, _module_level_lambda),
        lambda o: lr_scheduler.LambdaLR(o, Warmup(4)),
        lambda o: lr_scheduler.SequentialLR(
            o, [lr_scheduler.LinearLR(o, 0.5, 1.0, 2), lr_scheduler.ExponentialLR(o, 0.9)], [3]
        ),
    ],
    ids=[
        "step",
        "multistep",
        "exp",
        "cos",
        "linear",
        "onecycle",
        "lambda-fn",
        "lambda-obj",
        "sequential",
    ],
)
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_every_scheduler_pickles_and_resumes(make, how):
    p = np.ones(4, np.float32)
    opt = ok.SGD([p], lr=0.1, momentum=0.9)
    sched = make(opt)
    for t in range(3):
        opt.step([np.full(4, 0.1 * t, np.float32)])
        sched.step()
    copy_ = (
        pickle.loads(pickle.dumps((p, opt, sched)))
        if how == "pickle"
        else copy.deepcopy((p, opt, sched))
    )
    p2, opt2, sched2 = copy_
    for t in range(3, 8):
        opt.step([np.full(4, 0.1 * t, np.float32)])
        sched.step()
        opt2.step([np.full(4, 0.1 * t, np.float32)])
        sched2.step()
    assert p.tobytes() == p2.tobytes() and sched.get_last_lr() == sched2.get_last_lr()


def test_reduce_lr_on_plateau_pickles():
    p = np.ones(4, np.float32)
    opt = ok.SGD([p], lr=0.1)
    sched = lr_scheduler.ReduceLROnPlateau(opt, patience=1)
    for m in [1.0, 1.0, 1.0]:
        sched.step(m)
    opt2, sched2 = pickle.loads(pickle.dumps((opt, sched)))
    for m in [1.0, 1.0, 0.5, 1.0, 1.0]:
        sched.step(m)
        sched2.step(m)
    assert sched.get_last_lr() == sched2.get_last_lr() and sched.best == sched2.best


def test_lambda_scheduler_cannot_be_pickled_but_can_be_deepcopied():
    p = np.ones(2, np.float32)
    opt = ok.SGD([p], lr=0.1)
    sched = lr_scheduler.LambdaLR(opt, lambda t: 0.9**t)
    with pytest.raises(pickle.PicklingError, match=r"lr_lambda\[0\] is '.*<lambda>'.*module-level"):
        pickle.dumps(sched)
    twin = copy.deepcopy(sched)
    twin.step()
    assert twin.get_last_lr() == [pytest.approx(0.09)]
    assert callable(twin.lr_lambdas[0]) and twin.lr_lambdas[0](2) == pytest.approx(0.81)


def test_flat_params_pickle_keeps_views_on_the_block():
    f = ok.FlatParams([(3, 4), (5,)])
    opt = ok.Adam([f.flat], lr=0.1)
    f2, opt2 = pickle.loads(pickle.dumps((f, opt)))
    assert opt2.param_groups[0]["params"][0] is f2.flat
    f2.views[0][...] = 1.0
    assert f2.flat[:12].sum() == 12.0
    opt2.step([np.ones_like(f2.flat)])
    assert np.shares_memory(f2.views[1], f2.flat)


class Estimator:
    def fit(self):
        self.coef_ = np.zeros(3, np.float32)
        self.opt_ = ok.Adam([self.coef_], lr=0.1)
        self.opt_.step([np.ones(3, np.float32)])
        return self


def test_sklearn_style_estimator_with_optimizer_pickles():
    est = pickle.loads(pickle.dumps(Estimator().fit()))
    assert est.opt_.param_groups[0]["params"][0] is est.coef_
    est.opt_.step([np.ones(3, np.float32)])
    assert est.coef_[0] < -0.1


def test_peak_rss_helper_is_usable():  # documents how the 1 GiB figure in the report was taken
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0 and sys.platform
