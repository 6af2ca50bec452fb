"""optkern.functional: explicit state, the same numbers as the classes and the float64 reference."""

import numpy as np
import pytest
from helpers import bits, gradient_sequence
from reference import Reference

import optkern as ok
from optkern import functional as F


def test_adam_functional_matches_class_bit_for_bit():
    p0 = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    a, b = p0.copy(), p0.copy()
    opt = ok.Adam([a], lr=1e-3, weight_decay=0.01, amsgrad=True)
    m, v, vmax = (np.zeros(1000, np.float32) for _ in range(3))
    for t, g in enumerate(gradient_sequence(1000, 10, seed=1), start=1):
        opt.step([g])
        F.adam_(
            [b],
            [g],
            [m],
            [v],
            step=t,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            amsgrad=True,
            max_exp_avg_sqs=[vmax],
        )
    assert bits(a) == bits(b)
    assert bits(opt.state[a]["max_exp_avg_sq"]) == bits(vmax)


def test_per_parameter_steps():
    """Bias corrections come from each parameter's own step count."""
    ps = [np.ones(5, np.float32), np.ones(5, np.float32)]
    ms = [np.zeros(5, np.float32) for _ in ps]
    vs = [np.zeros(5, np.float32) for _ in ps]
    g = np.full(5, 0.5, np.float32)
    F.adamw_(ps, [g, g], ms, vs, step=[1, 50], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    r1, r50 = Reference("AdamW", np.ones(5), lr=0.1), Reference("AdamW", np.ones(5), lr=0.1)
    r1.step(g)
    r50.t = 49
    r50.step(g)
    np.testing.assert_allclose(ps[0], r1.p, rtol=1e-6)
    np.testing.assert_allclose(ps[1], r50.p, rtol=1e-6)
    assert not np.allclose(ps[0], ps[1])


def test_sgd_functional_creates_missing_buffers_in_the_list():
    p = np.zeros(4, np.float32)
    bufs = [None]
    g = np.arange(4, dtype=np.float32)
    F.sgd_([p], [g], bufs, lr=0.1, momentum=0.9)
    assert isinstance(bufs[0], np.ndarray)
    np.testing.assert_array_equal(bufs[0], g)  # torch's first step: the buffer is the gradient
    F.sgd_([p], [g], bufs, lr=0.1, momentum=0.9)
    np.testing.assert_allclose(bufs[0], 1.9 * g, rtol=1e-6)


def test_momentum_functional_is_the_seed_form():
    p = np.zeros(3, np.float32)
    v = np.zeros(3, np.float32)
    g = np.ones(3, np.float32)
    F.momentum_([p], [g], [v], lr=1.0, beta=0.9)
    np.testing.assert_allclose(v, 0.1, rtol=1e-6)  # (1 - beta) * g, from zero
    np.testing.assert_allclose(p, -0.1, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.5, -2.0, 0.0])
def test_grad_scale_multiplies_the_gradient(scale):
    g = np.random.default_rng(1).standard_normal(100).astype(np.float32)
    a, b = np.ones(100, np.float32), np.ones(100, np.float32)
    m1, v1, m2, v2 = (np.zeros(100, np.float32) for _ in range(4))
    F.adam_([a], [g], [m1], [v1], step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, grad_scale=scale)
    F.adam_(
        [b],
        [(g * np.float32(scale)).astype(np.float32)],
        [m2],
        [v2],
        step=1,
        lr=0.1,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
    )
    assert bits(a) == bits(b) and bits(m1) == bits(m2)


def test_maximize_is_a_negated_gradient():
    g = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    a, b = np.ones(64, np.float32), np.ones(64, np.float32)
    sa, sb = np.zeros(64, np.float32), np.zeros(64, np.float32)
    F.adagrad_([a], [g], [sa], step=1, lr=0.1, maximize=True)
    F.adagrad_([b], [-g], [sb], step=1, lr=0.1)
    assert bits(a) == bits(b)


def test_empty_lists_update_nothing_but_are_still_checked():
    F.adam_([], [], [], [], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    F.rmsprop_([], [], [], lr=1e-2, alpha=0.99, eps=1e-8)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        F.adam_([], [], [], [], step=1, lr=-1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match=r"steps\[0\] must be >= 1"):
        F.adam_([], [], [], [], step=0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="float32 cannot hold"):  # the scalars of step 1 too
        F.adam_([], [], [], [], step=1, lr=1e38, beta1=0.9, beta2=0.999, eps=1e-8)


def _shape(fn):
    """A signature without annotations: names, kinds and defaults."""
    import inspect

    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


# The signatures the first rules' functions were written with (before their bodies were derived).
def _rmsprop_(
    params,
    grads,
    square_avgs,
    grad_avgs=None,
    momentum_buffers=None,
    *,
    lr,
    alpha,
    eps,
    weight_decay=0.0,
    momentum=0.0,
    centered=False,
    eps_inside_sqrt=False,
    lr_in_velocity=False,
    maximize=False,
    grad_scale=1.0,
    _positions=None,
): ...
def _adagrad_(
    params,
    grads,
    state_sums,
    *,
    step,
    lr,
    lr_decay=0.0,
    weight_decay=0.0,
    eps=1e-10,
    eps_inside_sqrt=False,
    maximize=False,
    grad_scale=1.0,
    _positions=None,
): ...
def _adadelta_(
    params,
    grads,
    square_avgs,
    acc_deltas,
    *,
    lr,
    rho,
    eps,
    weight_decay=0.0,
    maximize=False,
    grad_scale=1.0,
    _positions=None,
): ...
def _adam_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay=0.0,
    amsgrad=False,
    max_exp_avg_sqs=None,
    maximize=False,
    grad_scale=1.0,
    _positions=None,
): ...
def _adamw_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay=1e-2,
    amsgrad=False,
    max_exp_avg_sqs=None,
    maximize=False,
    grad_scale=1.0,
    _positions=None,
): ...


def test_first_rules_keep_their_signatures_with_bodies_from_the_declaration():
    for ref in (_rmsprop_, _adagrad_, _adadelta_, _adam_, _adamw_):
        fn = getattr(F, ref.__name__[1:])
        assert _shape(fn) == _shape(ref), ref.__name__
        assert fn.__module__ == "optkern.functional" and fn.__doc__


def test_a_stub_that_disagrees_with_the_declaration_is_refused():
    from optkern.registry import make_functional, rule

    def adam_(
        params,
        grads,
        exp_avgs,
        max_exp_avg_sqs,
        *,
        step,
        lr,
        beta3,
        maximize=False,
        grad_scale=1.0,
        _positions=None,
    ):
        """no exp_avg_sqs, an unknown beta3"""

    with pytest.raises(TypeError, match=r"unknown \['beta3'\], missing \['exp_avg_sqs'\]"):
        make_functional(rule("adam"), F._run, like=adam_)


def test_textbook_forms_through_the_functions_match_the_classes():
    """The textbook options (eps_inside_sqrt, lr_in_velocity) reach the kernels through
    optkern.functional as through the classes: the same bits over steps with a changing lr."""
    p0 = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    grads = gradient_sequence(1000, 12, seed=2, scale=0.1)
    lrs = [0.01 * (1 + t % 3) for t in range(len(grads))]  # the forms differ when lr changes

    def run(cls_name, hp, functional):
        a, b = p0.copy(), p0.copy()
        opt = getattr(ok, cls_name)([a], **hp)
        for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
            opt.param_groups[0]["lr"] = lr
            opt.step([g])
            functional(b, g, t, dict(hp, lr=lr))
        assert bits(a) == bits(b), cls_name
        return opt.state[a]

    buf = [None]
    state = run(
        "SGD",
        dict(momentum=0.9, nesterov=True, lr_in_velocity=True),
        lambda p, g, t, hp: F.sgd_([p], [g], buf, **hp),
    )
    assert bits(state["momentum_buffer"]) == bits(buf[0])

    sq, mb, ga = (np.zeros(1000, np.float32) for _ in range(3))
    hp = dict(alpha=0.9, eps=1e-4, momentum=0.5, centered=True)
    hp.update(eps_inside_sqrt=True, lr_in_velocity=True)
    state = run(
        "RMSprop",
        hp,
        lambda p, g, t, hp: F.rmsprop_([p], [g], [sq], [ga], [mb], **hp),
    )
    assert bits(state["momentum_buffer"]) == bits(mb)

    sums = np.full(1000, 0.1, np.float32)
    state = run(
        "Adagrad",
        dict(eps=1e-3, initial_accumulator_value=0.1, eps_inside_sqrt=True),
        lambda p, g, t, hp: F.adagrad_(
            [p], [g], [sums], step=t, eps=hp["eps"], lr=hp["lr"], eps_inside_sqrt=True
        ),
    )
    assert bits(state["sum"]) == bits(sums)
