"""Functional optimizer updates: one function per optimizer, over lists of arrays, with the state
passed in explicitly. For users who keep their own state; the optimizer classes call these.

Every function updates ``params`` and the state arrays in place with one fused C++ call over the
whole list, and returns None. Parameters are float32 or float64 arrays (a list may mix them),
C-contiguous and writeable; each gradient is float32 or float64 whatever its parameter's dtype
(converted as it is read: no copy) and only read; each state array has its parameter's dtype
and shape (0-d arrays count as one element). Everything (arrays, hyperparameter ranges, step
counts, the per-step scalars) is checked by the C++ core before anything is written, so a call
that raises changes nothing.

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
from .registry import as_flag, as_real, make_functional, rule, rules
from .sparse import RowSparse

__all__ = [
    "sgd_",
    "momentum_",
    "rmsprop_",
    "adagrad_",
    "adadelta_",
    "adam_",
    "adamw_",
]  # and one <rule>_ per further rule of optkern.registry (added at the end of this module)

ArrayList = Sequence[np.ndarray]
Steps = Union[int, Sequence[int]]


# -- hyperparameter checks, shared with the optimizer classes --------------------------------------


#: The largest finite float32. Hyperparameters are held to it for every dtype: the float32 kernels
#: become Inf there and silently fill the parameters with Inf and NaN.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_real(name: str, value: Any) -> float:
    """``value`` as a float, or TypeError/ValueError naming ``name`` unless it is a real number
    that float32 can hold (finite, magnitude at most about 3.4e38)."""
    kind = type(value)
    if (
        kind is not float
        and kind is not int
        and (  # the common cases skip the slow ABC check
            isinstance(value, bool) or not isinstance(value, numbers.Real)
        )
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float64's range
        v = math.inf
    if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
        raise ValueError(
            f"{name} must be finite (at most {FLOAT32_MAX:.4g} in magnitude, as "
            f"float32 holds it), got {value!r}"
        )
    return v


def check_nonnegative(name: str, value: Any) -> float:
    v = check_real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def check_flag(name: str, value: Any) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
    return bool(value)


def _steps(step: Steps) -> Steps:
    # The C++ side checks each count (an integer >= 1, NumPy integers included).
    if isinstance(step, (list, tuple)) or (
        isinstance(step, (numbers.Integral, np.integer)) and not isinstance(step, bool)
    ):
        return step
    raise TypeError(f"step must be an int or a list of ints, got {type(step).__name__}")


#: Types the core takes as they are (a NumPy scalar or 0-d array is turned into a float first).
_PLAIN = frozenset((float, int, bool))


def _run(
    rule: str,
    params: ArrayList,
    grads: ArrayList,
    states: dict,
    hyper: dict,
    step: Optional[Steps],
    grad_scale: Any,
    positions: Optional[Sequence[int]],
) -> None:
    """One fused update by ``rule``: the core checks everything (ranges, arrays, step counts,
    per-step scalars) before writing anything. It takes floats, ints and bools; a call it
    refuses for a value of another type (a NumPy scalar, a 0-d array) changed nothing, and is
    made again with every real scalar as a float."""
    if type(grad_scale) is not float or not -FLOAT32_MAX <= grad_scale <= FLOAT32_MAX:
        grad_scale = check_real("grad_scale", grad_scale)
    if step is not None and type(step) is not int:
        step = _steps(step)
    try:
        _core.step(rule, params, grads, states, hyper, step, grad_scale, positions)
    except TypeError:
        if _PLAIN.issuperset(map(type, hyper.values())):
            raise
        hyper = {
            k: as_flag(v) if isinstance(v, (bool, np.bool_)) else as_real(v) for k, v in hyper.items()
        }
        _core.step(rule, params, grads, states, hyper, step, grad_scale, positions)


# -- the updates ------------------------------------------------------------------------------------
# The first rules' functions keep the signatures they were written with (lr required, their own
# order of state lists); rmsprop_ ... adamw_ take only that signature from the stubs below, their
# bodies derived from the declaration as every later rule's function is (see the end of this
# module). Two keep a written body: sgd_ creates missing momentum buffers (torch's first-step
# rule, which the declaration does not say) and momentum_ refuses velocities=None with a
# ValueError (the core would run plain SGD without a list; every other required list is a
# TypeError there).


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
    lr_in_velocity: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """SGD as torch.optim.SGD, or with ``lr_in_velocity=True`` classic momentum (see
    :class:`optkern.SGD` for the formulas).

    ``momentum_buffers`` (needed when momentum != 0) is a list with one entry per parameter; a
    None entry is a buffer that does not exist yet: it is created, filled by torch's first-step
    rule (the buffer becomes the gradient) and stored back into the list.
    """
    hyper = {
        "lr": lr,
        "momentum": momentum,
        "dampening": dampening,
        "weight_decay": weight_decay,
        "nesterov": nesterov,
        "lr_in_velocity": lr_in_velocity,
        "maximize": maximize,
    }
    if (type(momentum) is float or type(momentum) is int) and momentum == 0:
        # Plain SGD (the common case): the core checks every value in the one call.
        _run("sgd", params, grads, {}, hyper, None, grad_scale, _positions)
        return
    core = _core.validate(
        "sgd",
        {k: as_flag(v) if isinstance(v, (bool, np.bool_)) else as_real(v) for k, v in hyper.items()},
    )
    if core["momentum"] == 0:
        _run("sgd", params, grads, {}, core, None, grad_scale, _positions)
        return
    bufs = momentum_buffers
    if bufs is None:
        raise ValueError("momentum_buffers is required when momentum != 0")
    if not isinstance(bufs, list):
        raise TypeError(
            "momentum_buffers must be a list (new buffers are stored into it), "
            f"got {type(bufs).__name__}"
        )
    fresh = [b is None for b in bufs]
    filled: List[Any] = bufs
    if any(fresh):
        dense = [i for i, g in enumerate(grads) if not isinstance(g, RowSparse)]  # the core
        _core.check_grads(  # checks a RowSparse itself; these before allocating anything
            [params[i] for i in dense],
            [grads[i] for i in dense],
            positions=[(_positions[i] if _positions is not None else i) for i in dense],
        )
        if len(bufs) != len(params):
            raise ValueError(
                f"momentum_buffers has {len(bufs)} entries but params has "
                f"{len(params)}; they must match one to one"
            )
        # New buffers as views of one block per dtype: the kernel then streams them as one array.
        filled = list(bufs)
        new = [i for i, f in enumerate(fresh) if f]
        for dtype in dict.fromkeys(params[i].dtype for i in new):
            mine = [i for i in new if params[i].dtype == dtype]
            for i, view in zip(mine, FlatParams([params[i].shape for i in mine], dtype)):
                filled[i] = view
    # A buffer's first step (step 1) takes torch's first-step rule: it becomes the gradient.
    steps = [1 if f else 2 for f in fresh]
    _run("sgd", params, grads, {"momentum_buffer": filled}, core, steps, grad_scale, _positions)
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
    """Momentum in its exponentially weighted form: ``V = beta*V + (1-beta)*g; p -= lr*V``, V
    starting at zero (see :class:`optkern.Momentum`)."""
    if velocities is None:  # refused rather than run as plain SGD without its momentum
        raise ValueError("velocities is required (one zero-initialised array per parameter)")
    hyper = {"lr": lr, "beta": beta, "weight_decay": weight_decay, "maximize": maximize}
    _run(
        "momentum",
        params,
        grads,
        {"momentum_buffer": velocities},
        hyper,
        None,
        grad_scale,
        _positions,
    )


def _declared(name: str) -> Any:
    """The function of rule ``name`` with the decorated stub's signature and docstring, its body
    derived from the declaration (:func:`optkern.registry.make_functional`)."""
    return lambda stub: make_functional(rule(name), _run, like=stub)


@_declared("rmsprop")
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
    eps_inside_sqrt: bool = False,
    lr_in_velocity: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """RMSprop as torch.optim.RMSprop, or in the textbook forms (see :class:`optkern.RMSprop`).
    ``grad_avgs`` is needed when centered, ``momentum_buffers`` when momentum > 0; all state
    starts at zero."""


@_declared("adagrad")
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
    eps_inside_sqrt: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
    _positions: Optional[Sequence[int]] = None,
) -> None:
    """Adagrad as torch.optim.Adagrad, or with ``eps_inside_sqrt=True`` in the textbook form (see
    :class:`optkern.Adagrad`)."""


@_declared("adadelta")
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


@_declared("adam")
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


@_declared("adamw")
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


# Every further rule declared in C++ gets its function from its declaration.
for _rule in rules():
    if _rule.name + "_" not in globals():
        globals()[_rule.name + "_"] = make_functional(_rule, _run)
        __all__.append(_rule.name + "_")
