"""The registry of update rules: every declared rule is covered by every test and benchmark set,
its class and functional function follow its declaration, and the C++ core checks by itself what
the declaration says (hyperparameter ranges, the per-step scalars, the lists it walks)."""

import inspect
import math
import sys
import threading
import typing

import numpy as np
import pytest
import optim_db as db
import test_concurrency
import test_fuzz
import test_input_checks
from helpers import digest
from optim_db import CASES
from reference import Reference

import optkern as ok
from optkern import functional as F
from optkern.benchmark import cases as bench_cases

RULES = ok.registry.rules()
IDS = [r.cls for r in RULES]


# -- every rule in every set ---------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_every_rule_is_in_every_test_and_benchmark_set(rule):
    assert hasattr(Reference, "_" + rule.cls.lower()), "no float64 reference formula"
    assert rule.cls in db.DB and db.entry(rule.cls).rule == rule, "not in optim_db"
    assert rule.cls in {name for name, _ in CASES}, "no reference case in optim_db"
    assert any(f is getattr(F, rule.name + "_") for f, _, _ in test_input_checks.FUNCTIONS.values())
    assert rule.cls in {k for k, _ in test_input_checks.CLASSES}
    assert rule.cls in test_fuzz.CLASS_HPS
    assert rule.name + "_" in test_fuzz.DERIVED + list(test_fuzz.HAND_DRAWN)
    assert rule.cls in {k for k, _ in test_concurrency.CONFIGS}
    assert any(
        rule.cls in (c.label, c.torch_name) or c.key == rule.name for c in bench_cases.CASES.values()
    )
    assert rule.cls in ok.__all__ and rule.name + "_" in F.__all__


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_class_follows_the_declaration(rule):
    cls = getattr(ok, rule.cls)
    params = list(inspect.signature(cls).parameters.values())
    assert params[0].name == "params"
    positional = [(p.name, p.default) for p in params[1:] if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == rule.torch_args()
    kw_only = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    assert kw_only == dict(
        rule.own_args(),  # the options torch lacks (textbook forms), keyword-only
        maximize=False,
        foreach=None,
        fused=None,
        differentiable=False,
        capturable=False,
    )
    assert rule.doc.splitlines()[0] in cls.__doc__
    opt = cls([np.zeros(3, np.float32)])
    assert opt.defaults == dict(rule.torch_args() + rule.own_args(), maximize=False)
    # type checkers and typing.get_type_hints resolve the annotations; None is an Optional
    hints = typing.get_type_hints(cls.__init__)
    for name, default in rule.torch_args() + rule.own_args():
        if default is None:
            assert hints[name] == typing.Optional[float], name
        elif isinstance(default, tuple) and None in default:
            assert typing.Optional[float] in typing.get_args(hints[name]), name


#: torch.optim 2.13's optimizer classes. A rule torch has keeps torch's state names (compared name
#: by name with torch's own state in test_torch_parity.py); a rule torch lacks keeps its origin's
#: (Lion lion-pytorch's, AdEMAMix its authors' class's), so a new one needs no line here.
TORCH_OPTIMIZERS = {
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "ASGD",
    "Rprop",
    "Adafactor",
    "SparseAdam",
    "LBFGS",
}


def test_every_state_name_is_torchs():
    names = {s.name for r in RULES if r.cls in TORCH_OPTIMIZERS for s in r.states}
    assert names <= {
        "momentum_buffer",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "sum",
        "square_avg",
        "grad_avg",
        "acc_delta",
        "exp_inf",
        "ax",
        "prev",
        "step_size",
        "z",
        "row_var",
        "col_var",
        "variance",
    }
    carried = {c.name for r in RULES for c in r.carried}
    # schedulefree's lr_max and weight_sum are per group there, per parameter here.
    assert carried <= {"mu_product", "eta", "mu", "lr_max", "weight_sum"}


# -- the core checks by itself ---------------------------------------------------------------------


def arrays(n=5):
    return np.ones(n, np.float32), np.full(n, 0.5, np.float32)


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_private_core_refuses_out_of_range_hyperparameters(rule):
    p, g = arrays()
    states = {s.name: [np.zeros(5, np.float32)] for s in rule.states}
    before = digest([p, g, states])
    for h in rule.hyper:
        bad = {
            "flag": "yes",
            "nonnegative": -5.0,
            "unit": 1.5,
            "unit_open": 1.0,
            "open_unit": 0.0,
            "above_one": 1.0,
            "one_or_more": 0.5,
            "nonpositive": 0.5,
        }[h.range]
        with pytest.raises((TypeError, ValueError), match=h.name):
            ok._core.step(rule.name, [p], [g], states, {h.name: bad}, steps=1)
        if h.range != "flag":
            with pytest.raises(ValueError, match=h.name + " must be finite"):
                ok._core.step(rule.name, [p], [g], states, {h.name: math.nan}, steps=1)
    assert digest([p, g, states]) == before
    with pytest.raises(ValueError, match="no hyperparameter 'bogus'"):
        ok._core.step(rule.name, [p], [g], states, {"bogus": 1.0}, steps=1)


def test_sgd_with_negative_lr_is_refused_by_the_core():
    p, g = arrays()
    with pytest.raises(ValueError, match="lr must be >= 0"):
        ok._core.step("sgd", [p], [g], {}, {"lr": -5.0})
    assert (p == 1).all()


# -- #11 item 4: derived per-step scalars ---------------------------------------------------------


@pytest.mark.parametrize(
    "hp",
    [dict(lr=1e38), dict(lr=1e30, betas=(1 - 1e-9, 0.999))],
    ids=["lr=1e38", "lr=1e30,beta1=1-1e-9"],
)
def test_adam_step_size_beyond_float32_is_refused(hp):
    params = [np.ones(4, np.float32), np.ones(3, np.float32)]
    opt = ok.Adam([{"params": params[:1]}, {"params": params[1:], "lr": 1e-3}], **hp)
    grads = [np.ones(4, np.float32), np.ones(3, np.float32)]
    before = digest([params, opt.state_dict()])
    with pytest.raises(ValueError, match=r"lr / \(1 - beta1\^step\) is .* float32 cannot hold"):
        opt.step(grads)
    assert digest([params, opt.state_dict()]) == before and opt.step_count == 0
    assert not opt.state


def test_adagrad_and_adamw_derived_scalars_are_checked():
    p, g = arrays()
    with pytest.raises(ValueError, match="1 - lr \\* weight_decay"):
        F.adamw_(
            [p],
            [g],
            [np.zeros(5, np.float32)],
            [np.zeros(5, np.float32)],
            step=1,
            lr=3e38,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=3e38,
        )
    assert (p == 1).all()


# -- #11 item 1: lists copied before Python code runs ---------------------------------------------


class Shrinking:
    """A step count whose __index__ empties the list it sits in."""

    def __init__(self, owner, value=1):
        self.owner, self.value = owner, value

    def __index__(self):
        self.owner.clear()
        for _ in range(100):
            [object() for _ in range(50)]  # reuse the freed memory
        return self.value


@pytest.mark.parametrize("fn", ["adam_", "adagrad_"])
def test_step_index_that_mutates_its_list_is_harmless(fn):
    n = 100
    params = [np.ones(3, np.float32) for _ in range(n)]
    grads = [np.ones(3, np.float32) for _ in range(n)]
    steps: list = []
    steps.extend(Shrinking(steps, 1 + i % 3) for i in range(n))
    if fn == "adam_":
        F.adam_(
            params,
            grads,
            [np.zeros(3, np.float32) for _ in range(n)],
            [np.zeros(3, np.float32) for _ in range(n)],
            step=steps,
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
        )
    else:
        F.adagrad_(params, grads, [np.zeros(3, np.float32) for _ in range(n)], step=steps, lr=0.1)
    assert steps == [] and all((p < 1).all() for p in params)


# -- #11 item 3: a callable lr once per group per step ---------------------------------------------


def test_callable_lr_runs_once_per_group_per_step_and_errors_change_nothing():
    calls = []

    def schedule(name, fail_at=None):
        def lr(t):
            calls.append((name, t))
            if t == fail_at:
                raise RuntimeError("schedule failed")
            return 0.1 / t

        return lr

    params = [np.ones(4, np.float32), np.ones(4, np.float32)]
    opt = ok.Adam(
        [
            {"params": params[:1], "lr": schedule("a")},
            {"params": params[1:], "lr": schedule("b", fail_at=3)},
        ]
    )
    assert calls == []  # not called at construction
    g = [np.ones(4, np.float32)] * 2
    opt.step(g)
    opt.step(g)
    assert calls == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    before = digest([params, opt.state_dict()])
    with pytest.raises(RuntimeError, match="schedule failed"):
        opt.step(g)
    assert digest([params, opt.state_dict()]) == before and opt.step_count == 2
    np.testing.assert_allclose(params[0], params[1])


# -- #11 item 2: a step is all or nothing as Python sees it ----------------------------------------


def _interrupt_at(k):
    """A trace function raising KeyboardInterrupt at the k-th traced event inside optkern."""
    count = [0]

    def trace(frame, event, arg):
        if "optkern" not in frame.f_code.co_filename:
            return trace
        count[0] += 1
        if count[0] == k:
            raise KeyboardInterrupt
        return trace

    return trace, count


@pytest.mark.parametrize(
    "kind, hp", [("Adam", {}), ("SGD", dict(momentum=0.9)), ("RMSprop", dict(centered=True))]
)
def test_keyboard_interrupt_anywhere_leaves_a_whole_step_or_none(kind, hp):
    def build():
        params = [np.ones(5, np.float32), np.ones(3, np.float32)]
        return getattr(ok, kind)(
            [{"params": params[:1]}, {"params": params[1:], "lr": 0.01}], **hp
        ), params

    g = [np.full(5, 0.5, np.float32), np.full(3, 0.5, np.float32)]
    base_opt, base = build()
    base_opt.step(g)
    after_one = digest([base, base_opt.state_dict()])
    base_opt.step(g)
    after_two = digest([base, base_opt.state_dict()])
    outcomes = set()
    for k in range(1, 4000):  # until a step runs through: about 400 line events today
        opt, params = build()
        opt.step(g)
        assert digest([params, opt.state_dict()]) == after_one
        trace, count = _interrupt_at(k)
        sys.settrace(trace)
        try:
            opt.step(g, max_grad_norm=1e6)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
        state = digest([params, opt.state_dict()])
        assert state in (after_one, after_two), f"half a step after event {k}"
        outcomes.add(state == after_two)
        if not interrupted:
            break
    assert not interrupted, "the step never ran through: raise the bound"
    assert outcomes == {False, True}
    opt.step(g)  # and it goes on normally


# -- #11 item 10: torch's flags and 0-d scalars -----------------------------------------------------


class ZeroD:
    """A 0-d tensor-like: __float__, ndim 0, a float dtype (torch is not imported)."""

    ndim = 0
    dtype = "torch.float32"

    def __init__(self, v):
        self.v = v

    def __float__(self):
        return float(self.v)


@pytest.mark.parametrize(
    "value",
    [
        np.float32(0.25),
        np.float64(0.25),
        np.array(0.25),
        np.array(0.25, np.float32),
        ZeroD(0.25),
        np.int64(2),
    ],
    ids=["f32", "f64", "0-d", "0-d f32", "tensor-like", "int64"],
)
def test_real_0d_scalars_are_accepted_and_stored_as_floats(value):
    opt = ok.Adam(
        [np.zeros(3, np.float32)],
        lr=value,
        betas=(value if not isinstance(value, np.int64) else 0.5, np.array(0.9)),
        eps=value,
    )
    g = opt.param_groups[0]
    assert type(g["lr"]) is float and g["lr"] == float(value)
    assert type(g["betas"][0]) is float and type(g["betas"][1]) is float
    opt.param_groups[0]["weight_decay"] = np.float32(0.5)
    opt.step([np.ones(3, np.float32)])
    assert type(opt.param_groups[0]["weight_decay"]) is float


def test_torch_tensor_hyperparameters_when_torch_is_installed():
    torch = pytest.importorskip("torch")
    opt = ok.Adam(
        [np.zeros(3, np.float32)],
        lr=torch.tensor(0.01),
        betas=(torch.tensor(0.8), torch.tensor(0.99)),
    )
    assert (
        opt.param_groups[0]["lr"] == pytest.approx(0.01) and type(opt.param_groups[0]["lr"]) is float
    )
    with pytest.raises(TypeError):
        ok.Adam([np.zeros(3, np.float32)], lr=torch.tensor([0.01, 0.02]))


@pytest.mark.parametrize("bad", [np.array([0.1]), np.bool_(True), np.array(True), 1j, "0.1"])
def test_non_scalars_and_bools_are_still_refused(bad):
    with pytest.raises(TypeError, match="lr must be a real number"):
        ok.SGD([np.zeros(3, np.float32)], lr=bad)


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_torch_execution_flags(rule):
    cls = getattr(ok, rule.cls)
    p = [np.zeros(3, np.float32)]
    for flags in [
        dict(foreach=None),
        dict(foreach=False),
        dict(foreach=True),
        dict(fused=None),
        dict(fused=True),
        dict(fused=False),
        dict(differentiable=False),
        dict(capturable=False),
    ]:
        cls(p, **flags).step([np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        cls(p, differentiable=True)
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        cls(p, capturable=True)
    with pytest.raises(TypeError, match="foreach must be None or a bool"):
        cls(p, foreach="yes")


# -- #11 item 11: add_param_group under the optimizer's lock ---------------------------------------


def test_add_param_group_waits_for_the_lock():
    opt = ok.SGD([np.zeros(3, np.float32)])
    added = threading.Event()

    def add():
        opt.add_param_group({"params": [np.zeros(2, np.float32)]})
        added.set()

    with opt._lock:
        t = threading.Thread(target=add)
        t.start()
        assert not added.wait(0.2)  # blocked while a step (or another change) holds the lock
    t.join(5)
    assert added.is_set() and len(opt.param_groups) == 2


def test_concurrent_overlapping_groups_never_both_added():
    for _ in range(50):
        opt = ok.SGD([np.zeros(3, np.float32)])
        shared = np.zeros(4, np.float32)
        errors = []

        def add(view):
            try:
                opt.add_param_group({"params": [view]})
            except ValueError as e:
                errors.append(e)

        ts = [threading.Thread(target=add, args=(v,)) for v in (shared[:3], shared[1:])]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(opt.param_groups) == 2 and len(errors) == 1
        opt.step([np.ones(3, np.float32), np.ones(3, np.float32)])


def test_step_index_cannot_change_an_array_after_it_was_checked():
    """Step counts are converted (running __index__) before any array is inspected: an __index__
    that makes a parameter read-only is seen by the array check, which refuses the call."""
    p, g = arrays()
    m, v = np.zeros(5, np.float32), np.zeros(5, np.float32)

    class Sneaky:
        def __index__(self):
            p.flags.writeable = False
            return 1

    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        F.adam_([p], [g], [m], [v], step=[Sneaky()], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    assert (p == 1).all() and not m.any()


# -- the optimizer database's defaults ----------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_derived_database_defaults_are_valid_for_every_rule(rule):
    """What a rule the registry adds gets in tests/optim_db.py without an override: reference
    cases and an attack set that its class takes and steps, its float64 reference runs, and under
    the attack set every state the rule declares exists."""
    cls = getattr(ok, rule.cls)
    for hp in db.derived_cases(rule):
        p = np.full((3, 4), 0.5, np.float32)
        opt = cls([p], **hp)
        ref = Reference(rule.cls, p.copy(), **hp)
        g = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
        for _ in range(3):
            opt.step([g])
            ref.step(g)
        np.testing.assert_allclose(p, ref.p, rtol=1e-4, atol=1e-5)
    on = db.all_states_on(rule)
    p = np.ones(5, np.float32)
    opt = cls([p], **on)
    opt.step([np.ones(5, np.float32)])
    core = rule.to_core(opt.param_groups[0])
    assert set(rule.state_shapes(core, (5,))) == {
        s.name for s in rule.states if s.shape_for((5,)) is not None
    }
    assert set(rule.state_shapes(core, (5,))) <= set(opt.state[p])


def test_database_overrides_name_real_classes_and_fields():
    assert set(db.OVERRIDES) <= set(db.DB)
    fields = {"cases", "attack", "oracles", "oracle_cases", "mpi", "tol"}
    assert all(set(over) <= fields for over in db.OVERRIDES.values())
    # every class of optkern is in the database, under its own rule
    assert [e.cls for e in db.ENTRIES] == db.optimizer_classes()
    assert all(e.rule is e.cls._rule for e in db.ENTRIES)
