"""Hostile input, exhaustively: every optimizer class and every function of optkern.functional,
fed wrong dtypes, layouts, shapes, counts, aliasing buffers, None, Python lists and bad
hyperparameters. Each call raises TypeError or ValueError naming what is wrong, and every buffer
and the optimizer's state stay bit-identical (checked by hashing everything before and after)."""

import numpy as np
import pytest
from helpers import digest

import optkern as ok
from optkern import functional as F


def snapshot(opt, params, grads=()):
    return digest([params, [g for g in grads if isinstance(g, np.ndarray)], opt.state_dict()])


# -- regressions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, hp", [
    ("Adam", dict(lr=-1.0)), ("AdamW", dict(eps=float("nan"))), ("Momentum", dict(lr=-1.0)),
    ("Adagrad", dict(eps=-1.0)), ("RMSprop", dict(alpha=2.0)), ("Adadelta", dict(rho=-0.5)),
    ("Adam", dict(amsgrad=True, lr=-1.0)),
])
def test_bad_hyperparameter_on_first_step_creates_no_state(kind, hp):
    """Regression: the state of a parameter was created before the group's hyperparameters were
    checked, so a first step() that raised left zero-filled state (and step 0) behind."""
    p = np.ones(4, np.float32)
    opt = getattr(ok, kind)([p])
    opt.param_groups[0].update(hp)
    before = snapshot(opt, [p])
    with pytest.raises(ValueError):
        opt.step([np.ones(4, np.float32)])
    assert len(opt.state) == 0 and snapshot(opt, [p]) == before


def test_momentum_without_velocities_is_refused():
    """Regression: momentum_(params, grads, None) ran a plain SGD step (the C++ call treats a
    missing buffer list as 'no momentum'), silently dropping the momentum."""
    p, g = np.ones(4, np.float32), np.ones(4, np.float32)
    before = digest([p, g])
    with pytest.raises(ValueError, match="velocities is required"):
        F.momentum_([p], [g], None, lr=0.1)
    with pytest.raises(TypeError, match=r"velocities\[0\] must be a float32"):
        F.momentum_([p], [g], [np.zeros(4)], lr=0.1)
    assert digest([p, g]) == before


@pytest.mark.parametrize("value", [1e39, -1e39, 10**400, np.float64(3.5e38)])
def test_hyperparameter_beyond_float32_is_refused(value):
    """Regression: lr=1e39 is finite in double but Inf in the float32 kernels, which filled the
    parameters with Inf/NaN; 10**400 raised OverflowError instead of ValueError."""
    p, g = np.ones(4, np.float32), np.ones(4, np.float32)
    m, v = np.zeros(4, np.float32), np.zeros(4, np.float32)
    before = digest([p, g, m, v])
    with pytest.raises(ValueError, match="lr must be finite"):
        F.adam_([p], [g], [m], [v], step=1, lr=value, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="grad_scale must be finite"):
        F.sgd_([p], [g], lr=0.1, grad_scale=value)
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        ok.AdamW([p], weight_decay=value)
    assert digest([p, g, m, v]) == before


@pytest.mark.parametrize("step", [2**63, 2**70, [1, 2**64]])
def test_step_count_beyond_64_bits_is_a_value_error(step):
    """Regression: a step count beyond 64 bits raised OverflowError from the binding."""
    ps = [np.ones(4, np.float32), np.ones(3, np.float32)]
    gs = [np.ones(4, np.float32), np.ones(3, np.float32)]
    sums = [np.zeros(4, np.float32), np.zeros(3, np.float32)]
    before = digest([ps, gs, sums])
    with pytest.raises(ValueError, match=r"steps\[\d\] is out of range"):
        F.adagrad_(ps, gs, sums, step=step, lr=0.1)
    assert digest([ps, gs, sums]) == before
