"""optkern.functional with int8 state: each state list of uint8 codes with its list of float32
absmax arrays beside it (``exp_avg_absmax=``), the same bits as the optimizer classes under
``state_dtype="int8"``, and clear errors for absmax lists of the wrong length, shape or dtype."""

import inspect

import numpy as np
import optim_db as db
import pytest
from helpers import bits

import optkern as ok
from optkern import _lowbits, registry
from optkern import functional as F

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(7, 13), (300,), (1,)]
STEPS = 5


def _int8_cases():
    out = []
    for name, hp in db.richest():
        cls = getattr(ok, name)
        if any(not s.int8 for s in cls._rule.states) or not cls._rule.states:
            continue  # refused under int8 (tests/test_lowbits.py), or no state
        if cls._rule.switch:
            continue  # Schedule-Free: z is never int8
        out.append(pytest.param(name, hp, id=name))
    return out


CASES = _int8_cases()


def test_the_bitsandbytes_set_is_covered():
    names = {c.values[0] for c in CASES}
    assert {"Adam", "AdamW", "Lion", "SGD", "RMSprop", "Adagrad"} <= names


@pytest.mark.parametrize("half", [False, True], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name, hp", CASES)
def test_functional_int8_matches_the_class_bit_for_bit(name, hp, half):
    """The class takes a step (making its int8 state); the functional call then continues from
    copies of that state, and both take the same steps."""
    cls = getattr(ok, name)
    r = cls._rule
    rng = np.random.default_rng(3)
    dtype = BF16 if half else np.dtype(np.float32)
    ps = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in SHAPES]
    grads = [
        [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in SHAPES] for _ in range(STEPS)
    ]
    opt = cls(ps, **hp, state_dtype="int8")
    opt.step(grads[0])
    qs = [p.copy() for p in ps]
    group = opt.param_groups[0]
    core = r.to_core({k: v for k, v in group.items() if k != "params"})
    kwargs = {h.name: core[h.name] for h in r.hyper}
    kwargs["maximize"] = bool(group.get("maximize", False))
    lists, absmax = {}, {}
    for s in r.states:
        if s.name in opt.state[ps[0]]:
            lists[s.arg] = [opt.state[p][s.name].copy() for p in ps]
            key = s.name + registry.ABSMAX_SUFFIX
            absmax[key] = [opt.state[p][key].copy() for p in ps]
            assert lists[s.arg][0].dtype == np.uint8
    carried = {c.arg: [float(opt.state[p][c.name]) for p in ps] for c in r.carried}
    fn = getattr(F, r.name + "_")
    for t in range(1, STEPS):
        opt.step(grads[t])
        step = {"step": t + 1} if r.uses_step else {}
        fn(qs, grads[t], **lists, **carried, **absmax, **step, **kwargs)
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert bits(p) == bits(q), (name, i)
        for s in r.states:
            if s.arg in lists:
                assert bits(opt.state[p][s.name]) == bits(lists[s.arg][i]), (name, s.name)
                key = s.name + registry.ABSMAX_SUFFIX
                assert bits(opt.state[p][key]) == bits(absmax[key][i]), (name, key)


def test_every_int8_state_has_its_absmax_argument():
    for r in registry.rules():
        ps = inspect.signature(getattr(F, r.name + "_")).parameters
        for s in r.states:
            key = s.name + registry.ABSMAX_SUFFIX
            assert (key in ps) == s.int8, (r.name, key)
            if s.int8:
                assert ps[key].kind is inspect.Parameter.KEYWORD_ONLY and ps[key].default is None


def test_sgd_creates_int8_momentum_buffers_as_the_class_does():
    p, q = np.ones(300, np.float32), np.ones(300, np.float32)
    buf, scales = [None], [None]
    opt = ok.SGD([q], lr=0.1, momentum=0.9, state_dtype="int8")
    for t in range(3):
        g = np.full(300, 1.0 + t, np.float32)
        F.sgd_([p], [g], buf, momentum_buffer_absmax=scales, lr=0.1, momentum=0.9)
        opt.step([g])
    assert buf[0].dtype == np.uint8 and scales[0].shape == (2,)
    assert bits(p) == bits(q)
    assert bits(buf[0]) == bits(opt.state[q]["momentum_buffer"])
    assert bits(scales[0]) == bits(opt.state[q]["momentum_buffer_absmax"])


def _adam_int8(n=300):
    p = np.linspace(-1, 1, n).astype(np.float32)
    m, ma = _lowbits.quantize(np.zeros(n, np.float32), False)
    v, va = _lowbits.quantize(np.zeros(n, np.float32), True)
    return p, m, ma, v, va


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (
            lambda ma, va: dict(exp_avg_absmax=[np.zeros(5, np.float32)]),
            ValueError,
            r"exp_avg_absmax\[0\] has shape \(5,\) but must have shape \(2,\): one number per "
            "block of 256",
        ),
        (
            lambda ma, va: dict(exp_avg_absmax=[ma.astype(np.float64)]),
            TypeError,
            r"exp_avg_absmax\[0\] must be a float32 array",
        ),
        (
            lambda ma, va: dict(exp_avg_absmax=None),
            ValueError,
            "exp_avg_absmax is required: exp_avgs holds 8-bit codes",
        ),
        (
            lambda ma, va: dict(exp_avg_absmax=[ma, ma.copy()]),
            ValueError,
            "exp_avg_absmax",
        ),
        (
            lambda ma, va: dict(exp_avg_absmax=ma),
            TypeError,
            "exp_avg_absmax",
        ),
        (
            lambda ma, va: dict(exp_avg_absmax=[np.stack([ma, ma], 1)[:, 0]]),
            ValueError,
            r"exp_avg_absmax\[0\] must be C-contiguous",
        ),
    ],
)
def test_bad_absmax_lists_are_refused_before_anything_changes(change, exc, match):
    p, m, ma, v, va = _adam_int8()
    kw = dict(exp_avg_absmax=[ma], exp_avg_sq_absmax=[va])
    kw.update(change(ma, va))
    kw = {k: x for k, x in kw.items() if x is not None}
    before = [bits(a) for a in (p, m, v, ma, va)]
    g = np.ones(300, np.float32)
    with pytest.raises(exc, match=match):
        F.adam_([p], [g], [m], [v], step=1, **kw)
    assert [bits(a) for a in (p, m, v, ma, va)] == before


def test_an_absmax_list_beside_float_state_is_refused():
    p = np.zeros(300, np.float32)
    m, v = np.zeros(300, np.float32), np.zeros(300, np.float32)
    with pytest.raises((TypeError, ValueError), match="exp_avg_absmax"):
        F.adam_([p], [np.ones_like(p)], [m], [v], step=1, exp_avg_absmax=[np.zeros(2, np.float32)])
    assert not p.any() and not m.any()
