"""Functional optimizer updates: one function per optimizer, over lists of arrays, with the state
passed in explicitly. For users who keep their own state; the optimizer classes call these.

Every function updates ``params`` and the state arrays in place with one fused C++ call over the
whole list, and returns None. Arrays must be float32, C-contiguous and writeable (gradients only
readable), with each state array shaped like its parameter; hyperparameters are checked here and
arrays in C++, all before anything is written, so a call that raises changes nothing.

``step`` is the number of this update (1 on the first), an int for all parameters or a list with
one per parameter. ``grad_scale`` multiplies every gradient before it is used (a clipping
coefficient, say); ``maximize=True`` negates it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from . import _core
from .flat import FlatParams

__all__ = [
    "sgd_",
    "momentum_",
    "rmsprop_",
    "adagrad_",
    "adadelta_",
    "adam_",
    "adamw_",
]

ArrayList = Sequence[np.ndarray]
Steps = Union[int, Sequence[int]]


# -- hyperparameter checks, shared with the optimizer classes --------------------------------------


#: The largest finite float32. The kernels compute in float32, so a larger hyperparameter would
#: become Inf there and silently fill the parameters with Inf and NaN.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_real(name: str, value: Any) -> float:
    """``value`` as a float, or TypeError/ValueError naming ``name`` unless it is a real number
    that float32 can hold (finite, magnitude at most about 3.4e38)."""
    kind = type(value)
    if kind is not float and kind is not int and (  # the common cases skip the slow ABC check
            isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float64's range
        v = math.inf
    if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
        raise ValueError(f"{name} must be finite (at most {FLOAT32_MAX:.4g} in magnitude, as "
                         f"float32 holds it), got {value!r}")
    return v


def check_nonnegative(name: str, value: Any) -> float:
    v = check_real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def check_unit(name: str, value: Any, *, inclusive_one: bool) -> float:
    """A value in [0, 1], or in [0, 1) when ``inclusive_one`` is False."""
    v = check_real(name, value)
    if v < 0 or v > 1 or (v == 1 and not inclusive_one):
        interval = "[0, 1]" if inclusive_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def check_flag(name: str, value: Any) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
    return bool(value)


def _scale(grad_scale: Any, maximize: Any) -> float:
    s = check_real("grad_scale", grad_scale)
    return -s if check_flag("maximize", maximize) else s


def _steps(step: Steps) -> Steps:
    # The C++ side checks each count (an integer >= 1, NumPy integers included).
    if isinstance(step, (list, tuple)) or (isinstance(step, (numbers.Integral, np.integer))
                                           and not isinstance(step, bool)):
        return step
    raise TypeError(f"step must be an int or a list of ints, got {type(step).__name__}")


def _require(name: str, value: Optional[ArrayList], why: str) -> ArrayList:
    if value is None:
        raise ValueError(f"{name} is required {why}")
    return value


# -- the updates ------------------------------------------------------------------------------------


def sgd_(
    params: ArrayList,
    grads: ArrayList,
    momentum_buffers: Optional[List[Optional[np.ndarray]]] = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """SGD as torch.optim.SGD (see :class:`optkern.SGD` for the formulas).

    ``momentum_buffers`` (needed when momentum != 0) is a list with one entry per parameter; a
    None entry is a buffer that does not exist yet: it is created, filled by torch's first-step
    rule (the buffer becomes the gradient) and stored back into the list.
    """
    lr = check_nonnegative("lr", lr)
    momentum = check_nonnegative("momentum", momentum)
    dampening = check_unit("dampening", dampening, inclusive_one=True)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    nesterov = check_flag("nesterov", nesterov)
    scale = _scale(grad_scale, maximize)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0")
    if momentum == 0:
        _core.sgd_step(params, grads, None, init_buffers=None, lr=lr, weight_decay=weight_decay,
                       momentum=0.0, dampening=dampening, nesterov=False, grad_scale=scale,
                       positions=_positions)
        return
    bufs = _require("momentum_buffers", momentum_buffers, "when momentum != 0")
    if not isinstance(bufs, list):
        raise TypeError("momentum_buffers must be a list (new buffers are stored into it), "
                        f"got {type(bufs).__name__}")
    fresh = [b is None for b in bufs]
    if any(fresh):
        _core.check_grads(params, grads, positions=_positions)  # before allocating anything
        if len(bufs) != len(params):
            raise ValueError(f"momentum_buffers has {len(bufs)} entries but params has "
                             f"{len(params)}; they must match one to one")
        # New buffers as views of one block: the kernel then streams them as one array.
        block = iter(FlatParams([p.shape for p, f in zip(params, fresh) if f]))
        filled = [next(block) if f else b for b, f in zip(bufs, fresh)]
    else:
        filled = bufs
    _core.sgd_step(params, grads, filled, init_buffers=fresh, lr=lr, weight_decay=weight_decay,
                   momentum=momentum, dampening=dampening, nesterov=nesterov, grad_scale=scale,
                   positions=_positions)
    if filled is not bufs:
        bufs[:] = filled


def momentum_(
    params: ArrayList,
    grads: ArrayList,
    velocities: ArrayList,
    *,
    lr: float,
    beta: float = 0.9,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """The seed notes' momentum: ``V = beta*V + (1-beta)*g; p -= lr*V``, V starting at zero."""
    lr = check_nonnegative("lr", lr)
    beta = check_unit("beta", beta, inclusive_one=False)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    scale = _scale(grad_scale, maximize)
    # None would make the C++ call below a plain SGD step: refuse it rather than drop the momentum.
    velocities = _require("velocities", velocities, "(one zero-initialised array per parameter)")
    # SGD's buffer update with dampening = momentum = beta, never taking the first-step shortcut.
    try:
        _core.sgd_step(params, grads, velocities, init_buffers=None, lr=lr,
                       weight_decay=weight_decay, momentum=beta, dampening=beta, nesterov=False,
                       grad_scale=scale, positions=_positions)
    except (TypeError, ValueError) as e:  # name the argument as the caller knows it
        raise type(e)(str(e).replace("momentum_buffers", "velocities")) from None


def rmsprop_(
    params: ArrayList,
    grads: ArrayList,
    square_avgs: ArrayList,
    grad_avgs: Optional[ArrayList] = None,
    momentum_buffers: Optional[ArrayList] = None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """RMSprop as torch.optim.RMSprop (see :class:`optkern.RMSprop`). ``grad_avgs`` is needed
    when centered, ``momentum_buffers`` when momentum > 0; all state starts at zero."""
    lr = check_nonnegative("lr", lr)
    alpha = check_unit("alpha", alpha, inclusive_one=True)
    eps = check_nonnegative("eps", eps)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    momentum = check_nonnegative("momentum", momentum)
    centered = check_flag("centered", centered)
    scale = _scale(grad_scale, maximize)
    gavg = _require("grad_avgs", grad_avgs, "when centered=True") if centered else None
    bufs = _require("momentum_buffers", momentum_buffers, "when momentum > 0") if momentum > 0 else None
    _core.rmsprop_step(params, grads, square_avgs, bufs, gavg, lr=lr, alpha=alpha, eps=eps,
                       weight_decay=weight_decay, momentum=momentum, grad_scale=scale,
                       positions=_positions)


def adagrad_(
    params: ArrayList,
    grads: ArrayList,
    state_sums: ArrayList,
    *,
    step: Steps,
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """Adagrad as torch.optim.Adagrad (see :class:`optkern.Adagrad`)."""
    lr = check_nonnegative("lr", lr)
    lr_decay = check_nonnegative("lr_decay", lr_decay)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    eps = check_nonnegative("eps", eps)
    scale = _scale(grad_scale, maximize)
    _core.adagrad_step(params, grads, state_sums, steps=_steps(step), lr=lr, lr_decay=lr_decay,
                       eps=eps, weight_decay=weight_decay, grad_scale=scale, positions=_positions)


def adadelta_(
    params: ArrayList,
    grads: ArrayList,
    square_avgs: ArrayList,
    acc_deltas: ArrayList,
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """Adadelta as torch.optim.Adadelta (see :class:`optkern.Adadelta`)."""
    lr = check_nonnegative("lr", lr)
    rho = check_unit("rho", rho, inclusive_one=True)
    eps = check_nonnegative("eps", eps)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    scale = _scale(grad_scale, maximize)
    _core.adadelta_step(params, grads, square_avgs, acc_deltas, lr=lr, rho=rho, eps=eps,
                        weight_decay=weight_decay, grad_scale=scale, positions=_positions)


def _adam(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay,
          amsgrad, max_exp_avg_sqs, maximize, grad_scale, decoupled, positions) -> None:
    lr = check_nonnegative("lr", lr)
    beta1 = check_unit("beta1", beta1, inclusive_one=False)
    beta2 = check_unit("beta2", beta2, inclusive_one=False)
    eps = check_nonnegative("eps", eps)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    amsgrad = check_flag("amsgrad", amsgrad)
    scale = _scale(grad_scale, maximize)
    vmax = _require("max_exp_avg_sqs", max_exp_avg_sqs, "when amsgrad=True") if amsgrad else None
    _core.adam_step(params, grads, exp_avgs, exp_avg_sqs, vmax, steps=_steps(step), lr=lr,
                    beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    decoupled=decoupled, grad_scale=scale, positions=positions)


def adam_(
    params: ArrayList,
    grads: ArrayList,
    exp_avgs: ArrayList,
    exp_avg_sqs: ArrayList,
    *,
    step: Steps,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    max_exp_avg_sqs: Optional[ArrayList] = None,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """Adam as torch.optim.Adam, weight decay as an L2 term (see :class:`optkern.Adam`)."""
    _adam(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1, beta2=beta2,
          eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, max_exp_avg_sqs=max_exp_avg_sqs,
          maximize=maximize, grad_scale=grad_scale, decoupled=False, positions=_positions)


def adamw_(
    params: ArrayList,
    grads: ArrayList,
    exp_avgs: ArrayList,
    exp_avg_sqs: ArrayList,
    *,
    step: Steps,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    max_exp_avg_sqs: Optional[ArrayList] = None,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """AdamW as torch.optim.AdamW, weight decay decoupled (see :class:`optkern.AdamW`)."""
    _adam(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1, beta2=beta2,
          eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, max_exp_avg_sqs=max_exp_avg_sqs,
          maximize=maximize, grad_scale=grad_scale, decoupled=True, positions=_positions)
