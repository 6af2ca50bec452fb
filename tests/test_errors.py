"""Bad inputs: each gets a TypeError or ValueError naming the argument, its index and what was
expected, and leaves every parameter, gradient and the optimizer's state bit-identical."""

import math

import numpy as np
import pytest
import optim_db as db
from helpers import digest

import optkern as ok
from optkern import functional as F


def fresh(n=33, kind="Adam", steps=2, **hp):
    """An optimizer over three parameters, already stepped (so it has state)."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(n,), (4, 5), (7,)]]
    opt = getattr(ok, kind)(params, **hp)
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    return opt, params


def good_grads(params):
    return [np.full(p.shape, 0.5, np.float32) for p in params]


def everything(opt, params, grads):
    return digest(
        [
            params,
            [g for g in grads if isinstance(g, np.ndarray)],
            {i: opt.state[p] for i, p in enumerate(params) if p in opt.state},
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        ]
    )


def bad_grad_cases(params):
    p0, p1, _ = params
    g = good_grads(params)
    cases = {
        "float16": (
            [g[0].astype(np.float16), g[1], g[2]],
            TypeError,
            r"grads\[0\] must be a float32 or float64",
        ),
        "int": (
            [g[0], g[1].astype(np.int32), g[2]],
            TypeError,
            r"grads\[1\] must be a float32 or float64",
        ),
        "big-endian": ([g[0], g[1], g[2].astype(">f4")], TypeError, r"grads\[2\] .*byte order"),
        "list": (
            [g[0].tolist(), g[1], g[2]],
            TypeError,
            r"grads\[0\] must be a float32 or float64 NumPy array, got list",
        ),
        "scalar": (
            [g[0], g[1], np.float32(1)],
            TypeError,
            r"grads\[2\] must be a float32 or float64 NumPy array",
        ),
        "strided": (
            [np.zeros(2 * p0.size, np.float32)[::2], g[1], g[2]],
            ValueError,
            r"grads\[0\] must be C-contiguous",
        ),
        "transposed": (
            [g[0], np.zeros((5, 4), np.float32).T, g[2]],
            ValueError,
            r"grads\[1\] must be C-contiguous",
        ),
        "shape": (
            [g[0], np.zeros((5, 4), np.float32), g[2]],
            ValueError,
            r"grads\[1\] has shape \(5, 4\) but params\[1\] has shape \(4, 5\)",
        ),
        "flattened": ([g[0], g[1].ravel(), g[2]], ValueError, r"grads\[1\] has shape \(20,\)"),
        # a 0-d array is one element, here for a parameter of 4 x 5
        "0-d": ([g[0], g[1], np.array(1.0, np.float32)], ValueError, r"grads\[2\] has shape \(\)"),
        "too few": ([g[0], g[1]], ValueError, r"got 2 gradients for 3 parameters"),
        "too many": (g + [g[0]], ValueError, r"got 4 gradients for 3 parameters"),
        "is the param": (
            [p0, g[1], g[2]],
            ValueError,
            r"shares memory with params\[0\]|params\[0\] shares memory",
        ),
        "overlaps a param": (
            [g[0], g[1], p1.ravel()[:7]],
            ValueError,
            r"grads\[2\] shares memory with params\[1\]|params\[1\] shares memory with grads\[2\]",
        ),
        "unaligned": (
            [np.frombuffer(bytearray(4 * p0.size + 1), np.float32, p0.size, offset=1), g[1], g[2]],
            ValueError,
            r"grads\[0\] is not aligned",
        ),
    }
    return cases


CASE_NAMES = [
    "float16",
    "int",
    "big-endian",
    "list",
    "scalar",
    "strided",
    "transposed",
    "shape",
    "flattened",
    "0-d",
    "too few",
    "too many",
    "is the param",
    "overlaps a param",
    "unaligned",
]


@pytest.mark.parametrize("kind, hp", db.richest(), ids=[n for n, _ in db.richest()])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_gradient_changes_nothing(kind, hp, case):
    opt, params = fresh(kind=kind, **hp)
    grads, exc, pattern = bad_grad_cases(params)[case]
    before = everything(opt, params, grads)
    with pytest.raises(exc, match=pattern):
        opt.step(grads)
    assert everything(opt, params, grads) == before


def test_first_step_failure_creates_no_state():
    params = [np.zeros(5, np.float32), np.zeros(3, np.float32)]
    opt = ok.Adam(params)
    with pytest.raises(TypeError):
        opt.step([np.zeros(5, np.float32), np.zeros(3, np.float16)])
    assert len(opt.state) == 0
    sgd = ok.SGD(params, momentum=0.9)
    with pytest.raises(ValueError):
        sgd.step([np.zeros(5, np.float32), np.zeros(4, np.float32)])
    assert len(sgd.state) == 0


def test_grads_must_be_a_list():
    opt, params = fresh()
    for bad in [np.zeros((3, 33), np.float32), None, 3, "grads"]:
        with pytest.raises(TypeError, match="grads must be a list or tuple"):
            opt.step(bad)


def test_error_in_second_group_leaves_first_group_untouched():
    a, b = np.ones(4, np.float32), np.ones(6, np.float32)
    opt = ok.Adam([{"params": [a]}, {"params": [b], "lr": 0.1}])
    before = digest([a, b])
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(5,\)"):
        opt.step([np.ones(4, np.float32), np.ones(5, np.float32)])
    assert digest([a, b]) == before and len(opt.state) == 0
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step([np.ones(4, np.float32), np.ones(6, np.float32)])
    assert digest([a, b]) == before and len(opt.state) == 0


def test_gradient_index_in_message_counts_across_groups_and_skips():
    a, b, c = (np.ones(n, np.float32) for n in (2, 3, 4))
    opt = ok.SGD([{"params": [a, b]}, {"params": [c]}], lr=0.1)
    with pytest.raises(TypeError, match=r"grads\[2\]"):
        opt.step([None, np.ones(3, np.float32), np.ones(4, np.float16)])
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        opt.step([None, np.ones(3, np.float16), np.ones(4, np.float32)])


# -- bad parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, exc, pattern",
    [
        ([], ValueError, "empty parameter list"),
        ([np.zeros(3, np.float16)], TypeError, r"params\[0\] must be a float32 or float64"),
        (
            [np.zeros(3, np.float32), [1.0, 2.0]],
            TypeError,
            r"params\[1\] must be a float32 or float64 NumPy array, got list",
        ),
        (
            [None],
            TypeError,
            r"params\[0\] must be a float32 or float64 NumPy array, got NoneType",
        ),
        (
            [np.zeros(6, np.float32)[::2]],
            ValueError,
            r"params\[0\] must be C-contiguous.*lose the update",
        ),
        ([np.zeros((3, 4), np.float32).T], ValueError, r"params\[0\] must be C-contiguous"),
        ({np.float32(1)}, TypeError, "not a set"),
        ("abc", TypeError, "must be a list"),
        (5, TypeError, "must be a list"),
    ],
)
def test_bad_params_rejected(params, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ok.Adam(params)


def test_read_only_param_rejected():
    p = np.zeros(3, np.float32)
    p.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        ok.SGD([p])


def test_parameter_listed_twice_or_overlapping_rejected():
    p = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match=r"params\[1\] shares memory with params\[0\]"):
        ok.SGD([p, p])
    with pytest.raises(ValueError, match="shares memory"):
        ok.SGD([p[:6], p[4:]])
    with pytest.raises(ValueError, match="more than one parameter group"):
        ok.SGD([{"params": [p]}, {"params": [p]}])
    opt = ok.SGD([p[:5]])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [opt.param_groups[0]["params"][0]]})
    with pytest.raises(ValueError, match="shares memory"):
        opt.add_param_group({"params": [p[3:]]})
    assert len(opt.param_groups) == 1


def test_disjoint_views_of_one_buffer_are_fine():
    buf = np.zeros(10, np.float32)
    opt = ok.SGD([buf[:5], buf[5:]], lr=1.0)
    opt.step([np.ones(5, np.float32), np.full(5, 2.0, np.float32)])
    np.testing.assert_array_equal(buf, [-1] * 5 + [-2] * 5)


# -- bad hyperparameters ---------------------------------------------------------------------------

NAN, INF = math.nan, math.inf

BAD_HPARAMS = [
    ("SGD", dict(lr=-0.1), ValueError, "lr must be >= 0"),
    ("SGD", dict(lr=NAN), ValueError, "lr must be finite"),
    ("SGD", dict(lr=INF), ValueError, "lr must be finite"),
    ("SGD", dict(lr="0.1"), TypeError, "lr must be a real number"),
    ("SGD", dict(lr=None), TypeError, "lr must be a real number"),
    ("SGD", dict(momentum=-0.9), ValueError, "momentum must be >= 0"),
    ("SGD", dict(momentum=NAN), ValueError, "momentum must be finite"),
    ("SGD", dict(weight_decay=-1e-4), ValueError, "weight_decay must be >= 0"),
    ("SGD", dict(dampening=-0.1), ValueError, r"dampening must be in \[0, 1\]"),
    ("SGD", dict(nesterov=True), ValueError, "nesterov momentum requires momentum > 0"),
    ("SGD", dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "dampening == 0"),
    ("SGD", dict(nesterov="yes"), TypeError, "nesterov must be a bool"),
    ("SGD", dict(maximize=1), TypeError, "maximize must be a bool"),
    ("Momentum", dict(beta=1.0), ValueError, r"beta must be in \[0, 1\)"),
    ("Momentum", dict(beta=-0.5), ValueError, r"beta must be in \[0, 1\)"),
    ("RMSprop", dict(alpha=NAN), ValueError, "alpha must be finite"),
    ("RMSprop", dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\]"),
    ("RMSprop", dict(eps=-1e-8), ValueError, "eps must be >= 0"),
    ("RMSprop", dict(momentum=-1), ValueError, "momentum must be >= 0"),
    ("RMSprop", dict(centered=None), TypeError, "centered must be a bool"),
    ("Adagrad", dict(lr_decay=-1), ValueError, "lr_decay must be >= 0"),
    (
        "Adagrad",
        dict(initial_accumulator_value=-0.1),
        ValueError,
        "initial_accumulator_value must be >= 0",
    ),
    ("Adagrad", dict(eps=NAN), ValueError, "eps must be finite"),
    ("Adadelta", dict(rho=1.1), ValueError, r"rho must be in \[0, 1\]"),
    ("Adadelta", dict(lr=-1), ValueError, "lr must be >= 0"),
    ("Adam", dict(betas=(1.0, 0.999)), ValueError, r"beta1 must be in \[0, 1\)"),
    ("Adam", dict(betas=(0.9, NAN)), ValueError, "beta2 must be finite"),
    ("Adam", dict(betas=(0.9, -0.1)), ValueError, r"beta2 must be in \[0, 1\)"),
    ("Adam", dict(betas=0.9), TypeError, "betas must be a pair"),
    ("Adam", dict(betas=(0.9, 0.99, 0.9)), TypeError, "betas must be a pair"),
    ("Adam", dict(eps=-1e-8), ValueError, "eps must be >= 0"),
    ("Adam", dict(weight_decay=NAN), ValueError, "weight_decay must be finite"),
    ("Adam", dict(amsgrad="no"), TypeError, "amsgrad must be a bool"),
    ("AdamW", dict(weight_decay=-0.01), ValueError, "weight_decay must be >= 0"),
]


@pytest.mark.parametrize("kind, hp, exc, pattern", BAD_HPARAMS)
def test_bad_hyperparameter_rejected_at_construction(kind, hp, exc, pattern):
    with pytest.raises(exc, match=pattern):
        getattr(ok, kind)([np.zeros(3, np.float32)], **hp)


@pytest.mark.parametrize("kind, hp, exc, pattern", BAD_HPARAMS)
def test_bad_hyperparameter_set_between_steps_changes_nothing(kind, hp, exc, pattern):
    base = {"SGD": dict(momentum=0.9)}.get(kind, {}) if "nesterov" not in hp else {}
    opt, params = fresh(kind=kind, **base)
    opt.param_groups[0].update(hp)
    grads = good_grads(params)
    before = everything(opt, params, grads)
    with pytest.raises(exc, match=pattern):
        opt.step(grads)
    assert everything(opt, params, grads) == before


def test_bad_hyperparameter_in_added_group_rejected():
    opt = ok.Adam([np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.add_param_group({"params": [np.zeros(2, np.float32)], "lr": -1})
    assert len(opt.param_groups) == 1


# -- the functional layer checks the same way ------------------------------------------------------


def test_functional_rejects_and_changes_nothing():
    p = np.ones(8, np.float32)
    g = np.ones(8, np.float32)
    m, v = np.zeros(8, np.float32), np.zeros(8, np.float32)
    before = digest([p, g, m, v])
    with pytest.raises(ValueError, match=r"steps\[0\] must be >= 1"):
        F.adam_([p], [g], [m], [v], step=0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(TypeError, match="step must be an int"):
        F.adam_([p], [g], [m], [v], step=1.5, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="exp_avg_sqs has 2 arrays but params has 1"):
        F.adam_([p], [g], [m], [v, v], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] shares memory with exp_avgs\[0\]"):
        F.adam_([p], [g], [m], [m], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="max_exp_avg_sqs is required when amsgrad=True"):
        F.adam_([p], [g], [m], [v], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True)
    with pytest.raises(ValueError, match="grad_scale must be finite"):
        F.sgd_([p], [g], lr=0.1, grad_scale=NAN)
    with pytest.raises(ValueError, match="momentum_buffers is required"):
        F.sgd_([p], [g], lr=0.1, momentum=0.9)
    assert digest([p, g, m, v]) == before


def test_gradients_may_share_memory_with_each_other():
    a, b = np.zeros(4, np.float32), np.zeros(4, np.float32)
    g = np.ones(4, np.float32)
    ok.SGD([a, b], lr=1.0).step([g, g])
    np.testing.assert_array_equal(a, -1)
    np.testing.assert_array_equal(b, -1)
