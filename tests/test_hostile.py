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
