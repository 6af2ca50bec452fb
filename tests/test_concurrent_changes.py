"""param_groups and state changed while step, state_dict and
load_state_dict run, from another thread or from inside the step (a callable lr). A step never
loses a concurrent hyperparameter update, never takes an unchecked value as checked, and is not
broken by another thread clearing the state; a callable lr cannot re-enter the optimizer."""

import sys
import threading

import numpy as np
import pytest
import optim_db as db
from helpers import digest

import optkern as ok


class Sneaky:
    """A 0-d real scalar (as a torch tensor is) whose conversion runs code: it stands for another
    thread changing the group between the optimizer's read and its write-back."""

    ndim = 0

    def __init__(self, value, action):
        self.value, self.action = value, action

    def __float__(self):
        self.action()
        return self.value


# -- lost updates (finding: the check wrote back what it had read over a newer value) -------------


def test_lr_set_during_the_check_is_not_lost():
    p = np.zeros(4, np.float32)
    opt = ok.SGD([p], lr=0.1)
    group = opt.param_groups[0]
    group["lr"] = Sneaky(0.1, lambda: group.__setitem__("lr", 0.5))
    opt.step([np.ones(4, np.float32)])
    assert group["lr"] == 0.5  # the newer value stays
    assert np.allclose(p, -0.1)  # this step used what it read
    opt.step([np.ones(4, np.float32)])
    assert np.allclose(p, -0.6)  # and the next one the newer value


@pytest.mark.parametrize(
    "key, bad",
    [("eps", -1.0), ("weight_decay", float("nan")), ("betas", (2.0, 0.5)), ("amsgrad", "yes")],
)
def test_value_set_during_the_check_is_checked_before_use(key, bad):
    p = np.zeros(4, np.float32)
    opt = ok.Adam([p], lr=0.1)
    group = opt.param_groups[0]
    group["lr"] = Sneaky(0.1, lambda: group.__setitem__(key, bad))
    opt.step([np.ones(4, np.float32)])
    assert group[key] is bad  # not overwritten by the value read before
    before = digest([p, opt.state_dict()])
    with pytest.raises((TypeError, ValueError)):
        opt.step([np.ones(4, np.float32)])  # not taken as checked
    assert digest([p, opt.state_dict()]) == before


def test_lr_set_during_add_param_group_check_is_not_lost():
    opt = ok.SGD([np.zeros(2, np.float32)], lr=0.1)
    group = {"params": [np.zeros(3, np.float32)]}

    def change():
        opt.param_groups[0]["lr"] = 0.7

    group["lr"] = Sneaky(0.2, change)
    opt.add_param_group(group)
    assert opt.param_groups[0]["lr"] == 0.7 and opt.param_groups[1]["lr"] == 0.2


# -- a callable lr re-entering the optimizer (finding: allowed, recursed or half-applied) ----------


def reentering(action):
    p = np.zeros(4, np.float32)
    opt = ok.Adam([p], lr=0.1)
    opt.step([np.ones(4, np.float32)])
    opt.param_groups[0]["lr"] = lambda t: (action(opt), 0.1)[1]
    return opt, p


REENTRY = {
    "step": lambda o: o.step([np.ones(4, np.float32)]),
    "add_param_group": lambda o: o.add_param_group({"params": [np.zeros(2, np.float32)]}),
    "load_state_dict": lambda o: o.load_state_dict(o.state_dict()),
    "step-with-clipping": lambda o: o.step([np.ones(4, np.float32)], max_grad_norm=1.0),
}


@pytest.mark.parametrize("what", REENTRY)
def test_callable_lr_reentering_raises_runtime_error(what):
    opt, p = reentering(REENTRY[what])
    sd = opt.state_dict()
    before = digest([p, sd["state"], sd["step_count"]])
    with pytest.raises(RuntimeError, match="callable lr"):
        opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    assert digest([p, sd["state"], sd["step_count"]]) == before
    opt.param_groups[0]["lr"] = 0.1
    assert len(opt.param_groups) == 1
    opt.step([np.ones(4, np.float32)])  # the flag was reset
    assert opt.step_count == 2


def test_callable_lr_loading_a_checkpoint_is_refused(tmp_path):
    p = np.zeros(4, np.float32)
    opt = ok.Adam([p], lr=0.1)
    opt.step([np.ones(4, np.float32)])
    ok.save(opt, tmp_path / "c.npz")
    opt.param_groups[0]["lr"] = lambda t: (ok.load(opt, tmp_path / "c.npz"), 0.1)[1]
    with pytest.raises(ok.CheckpointError) as info:
        opt.step([np.ones(4, np.float32)])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert opt.step_count == 1


@pytest.mark.parametrize("what", ["state_dict", "len", "repr"])
def test_callable_lr_may_read_the_optimizer(what):
    p = np.zeros(4, np.float32)
    opt = ok.Adam([p], lr=0.1)
    seen = []
    read = {
        "state_dict": lambda: seen.append(opt.state_dict()["step_count"]),
        "len": lambda: seen.append(len(opt.state)),
        "repr": lambda: seen.append(repr(opt)),
    }[what]
    opt.param_groups[0]["lr"] = lambda t: (read(), 0.1)[1]
    opt.step([np.ones(4, np.float32)])
    opt.step([np.ones(4, np.float32)])
    assert len(seen) == 2 and opt.step_count == 2


def test_callable_lr_raising_resets_the_flag():
    p = np.zeros(4, np.float32)
    opt = ok.Adam([p], lr=0.1)

    def bad(t):
        raise ZeroDivisionError

    opt.param_groups[0]["lr"] = bad
    with pytest.raises(ZeroDivisionError):
        opt.step([np.ones(4, np.float32)])
    opt.param_groups[0]["lr"] = 0.1
    opt.add_param_group({"params": [np.zeros(2, np.float32)]})
    opt.step([np.ones(4, np.float32), np.ones(2, np.float32)])


def test_callable_lr_clearing_the_state_starts_fresh():
    p = np.zeros(4, np.float32)
    opt = ok.Adam([p], lr=0.1)
    opt.step([np.ones(4, np.float32)])
    opt.param_groups[0]["lr"] = lambda t: (opt.state.clear(), 0.1)[1]
    opt.step([np.ones(4, np.float32)])
    assert opt.state[p]["step"] == 1


def test_callable_lr_appending_a_group_behind_the_lock():
    """A group appended to the list directly (no add_param_group) during a step is not part of
    that step; the next step wants its gradient."""
    p = np.zeros(4, np.float32)
    opt = ok.SGD([p], lr=0.1)
    extra = {"params": [np.zeros(2, np.float32)], "lr": 0.1}
    opt.param_groups[0]["lr"] = lambda t: (
        opt.param_groups.append(extra) if extra not in opt.param_groups else None,
        0.1,
    )[1]
    opt.step([np.ones(4, np.float32)])
    assert np.allclose(p, -0.1) and len(opt.param_groups) == 2
    with pytest.raises(ValueError, match="gradients"):
        opt.step([np.ones(4, np.float32)])


# -- other threads -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fast_switching():
    """Threads switch every 10 us instead of 5 ms, so the races below interleave finely."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


#: Every class of the optimizer database, with the options that keep every state, at a small lr.
OPTIONS = dict(db.richest())
CLASSES = list(OPTIONS)


def make(kind, params):
    return getattr(ok, kind)(params, **dict(OPTIONS[kind], lr=1e-3))


def run_threads(*fns, seconds=None):
    errors = []

    def wrap(fn):
        def go():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        return go

    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return errors


def consistent(opt):
    for g in opt.param_groups:
        for p in g["params"]:
            s = opt.state.get_by_id(p)
            if s is not None and "step" in s:
                assert 0 <= s["step"] <= opt.step_count
                for v in s.values():
                    if isinstance(v, np.ndarray):
                        assert v.shape == p.shape and v.dtype == np.float32


@pytest.mark.parametrize("kind", CLASSES)
def test_state_cleared_by_another_thread_while_stepping(kind):
    """Regression: ParamState.clear() was MutableMapping's (popitem in a loop, each iterating the
    live dict), so the clearing thread died of 'dictionary changed size during iteration' when a
    step added state meanwhile (8 of 30 runs of 200 steps). Now one assignment; iteration runs
    over a snapshot."""
    sys.setswitchinterval(1e-6)
    for _ in range(8):
        ps = [np.zeros(50, np.float32) for _ in range(20)]
        gs = [np.ones(50, np.float32) for _ in range(20)]
        opt = make(kind, ps)
        stop = threading.Event()

        def stepper():
            try:
                for _ in range(200):
                    opt.step(gs)
            finally:
                stop.set()

        def clearer():
            while not stop.is_set():
                opt.state.clear()
                list(opt.state)
                len(opt.state)

        assert run_threads(stepper, clearer) == []
        assert opt.step_count == 200
        consistent(opt)


@pytest.mark.parametrize("kind", CLASSES)
def test_state_entries_deleted_by_another_thread_while_stepping(kind):
    ps = [np.zeros(10, np.float32) for _ in range(10)]
    gs = [np.ones(10, np.float32) for _ in range(10)]
    opt = make(kind, ps)
    stop = threading.Event()

    def stepper():
        try:
            for _ in range(300):
                opt.step(gs)
        finally:
            stop.set()

    def deleter():
        i = 0
        while not stop.is_set():
            opt.state.pop(ps[i % 10], None)
            i += 1

    assert run_threads(stepper, deleter) == []
    consistent(opt)


@pytest.mark.parametrize("kind", CLASSES)
def test_lr_changed_by_another_thread_final_value_kept(kind):
    ps = [np.zeros(20, np.float32) for _ in range(5)]
    gs = [np.ones(20, np.float32) for _ in range(5)]
    opt = make(kind, ps)
    values = [np.float32(1e-3 * (1 + i % 7)) for i in range(3000)]  # converted on each check
    stop = threading.Event()

    def stepper():
        while not stop.is_set():
            opt.step(gs)

    def writer():
        try:
            for v in values:
                opt.param_groups[0]["lr"] = v
        finally:
            stop.set()

    assert run_threads(stepper, writer) == []
    opt.step(gs)
    assert opt.param_groups[0]["lr"] == float(values[-1])


@pytest.mark.parametrize("kind", CLASSES)
def test_param_groups_list_replaced_by_another_thread(kind):
    ps = [np.zeros(8, np.float32) for _ in range(4)]
    gs = [np.ones(8, np.float32) for _ in range(4)]
    opt = make(kind, [{"params": ps[:2]}, {"params": ps[2:]}])
    stop = threading.Event()

    def stepper():
        try:
            for _ in range(500):
                opt.step(gs)
        finally:
            stop.set()

    def replacer():
        while not stop.is_set():
            opt.param_groups = list(reversed(opt.param_groups))

    assert run_threads(stepper, replacer) == []
    assert np.allclose(ps[0], ps[3])  # every parameter got every step


@pytest.mark.parametrize("kind", CLASSES)
def test_groups_added_by_another_thread_while_stepping(kind):
    ps = [np.zeros(8, np.float32) for _ in range(4)]
    opt = make(kind, ps)
    errors = []
    stop = threading.Event()

    def stepper():
        try:
            for _ in range(300):
                n = sum(len(g["params"]) for g in opt.param_groups)
                try:
                    opt.step([np.ones(8, np.float32)] * n)
                except ValueError as e:  # a group was added between counting and stepping
                    assert "gradients" in str(e)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def adder():
        while not stop.is_set() and len(opt.param_groups) < 30:
            opt.add_param_group({"params": [np.zeros(8, np.float32)]})

    assert run_threads(stepper, adder) == [] and errors == []
    consistent(opt)


@pytest.mark.parametrize("kind", CLASSES)
def test_state_dict_and_load_state_dict_racing_steps(kind):
    ps = [np.zeros(16, np.float32) for _ in range(6)]
    gs = [np.ones(16, np.float32) for _ in range(6)]
    opt = make(kind, ps)
    opt.step(gs)
    stop = threading.Event()

    def stepper():
        try:
            for _ in range(200):
                opt.step(gs)
        finally:
            stop.set()

    def loader():
        while not stop.is_set():
            sd = opt.state_dict()
            opt.load_state_dict(sd)

    assert run_threads(stepper, loader) == []
    consistent(opt)
    # every parameter started equal and took the same gradients: parameters and states still
    # equal (counts included), so no snapshot and no load split a step
    assert len({p.tobytes() for p in ps}) == 1
    assert len({digest([opt.state[p]]) for p in ps}) == 1
