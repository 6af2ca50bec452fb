"""Functional optimizer updates: one function per optimizer, over lists of arrays, with the state
passed in explicitly. For users who keep their own state; the optimizer classes call these.

Every function updates ``params`` and the state arrays in place with one fused C++ call over the
whole list, and returns None. Parameters are float32, float64, float16 or bfloat16 arrays (a
list may mix them), C-contiguous and writeable; each gradient is of any of these types whatever
its parameter's dtype (converted as it is read: no copy) and only read. Each state array is
shaped like its parameter (0-d arrays count as one element) and has its dtype (a float64
parameter's), or is float32 or bfloat16 (a float32 or 16-bit parameter's; one type for all the
states of a parameter), or is int8 state: uint8 codes, with a list of their float32 absmax
arrays (one per block of 256) passed beside the state list (``exp_avg_absmax=``, say), as the
optimizer classes keep it under ``state_dtype="int8"``. Everything (arrays, hyperparameter
ranges, step counts, the per-step scalars) is checked by the C++ core before anything is
written, so a call that raises changes nothing.

``step`` is the number of this update (1 on the first), an int for all parameters or a list with
one per parameter. ``grad_scale`` multiplies every gradient before it is used (a clipping
coefficient, say); ``maximize=True`` negates it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from . import _core, _lowbits
from .flat import FlatParams
from .registry import (
    ABSMAX_SUFFIX,
    as_flag,
    as_real,
    first_update_states,
    make_functional,
    rule,
    rules,
)
from .sparse import RowSparse

__all__: List[str] = []  # one <rule>_ per rule of optkern.registry, added at the end of this module

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


def _created_states(name: str) -> List[tuple]:
    """(state name, list argument, the flag or value that turns it on) of each state rule
    ``name`` creates at its first update (:func:`optkern.registry.first_update_states`)."""
    r = rule(name)
    by_name = {s.name: s for s in r.states}
    return [(st, by_name[st].arg, by_name[st].when) for st in first_update_states(r)]


#: _created_states of every rule, computed once: a step pays a dict lookup for it.
_CREATED = {r.name: _created_states(r.name) for r in rules()}


def _run(
    name: str,
    params: ArrayList,
    grads: ArrayList,
    states: dict,
    hyper: dict,
    step: Optional[Steps],
    grad_scale: Any,
    positions: Optional[Sequence[int]],
) -> None:
    """One fused update by rule ``name``: the core checks everything (ranges, arrays, step
    counts, per-step scalars) before writing anything. It takes floats, ints and bools; a call
    it refuses for a value of another type (a NumPy scalar, a 0-d array) changed nothing, and is
    made again with every real scalar as a float.

    A None entry in the list of a state the rule creates at its first update (SGD's momentum
    buffer) is a buffer that does not exist yet: every argument is checked first, then the new
    buffers are made as views of one block per dtype (the kernel streams them as one array),
    passed with a step count of 1 (the kernel then applies torch's first-step rule) and stored
    into the caller's list."""
    if type(grad_scale) is not float or not -FLOAT32_MAX <= grad_scale <= FLOAT32_MAX:
        grad_scale = check_real("grad_scale", grad_scale)
    if step is not None and type(step) is not int:
        step = _steps(step)
    made = []
    for state, arg, when in _CREATED[name]:
        entries = states.get(state)
        if not isinstance(entries, list) or id(None) not in map(id, entries):
            continue  # the core checks (or refuses) what it is
        hyper = _core.validate(name, _as_core(hyper))
        if not hyper[when]:
            continue  # not used under these options
        _check_dense_grads(params, grads, positions)  # before allocating anything
        if len(entries) != len(params):
            raise ValueError(
                f"{arg} has {len(entries)} entries but params has {len(params)}; they must "
                "match one to one"
            )
        fresh = [b is None for b in entries]
        filled = list(entries)
        new = [i for i, f in enumerate(fresh) if f]
        absmax = states.get(state + ABSMAX_SUFFIX)
        if isinstance(absmax, list):
            # int8 state: the new buffers as uint8 codes, each with a new absmax array where
            # its entry of the absmax list is None too (the codes of zeros, as the classes
            # start them; the first update overwrites them)
            if len(absmax) != len(params):
                raise ValueError(
                    f"{state}{ABSMAX_SUFFIX} has {len(absmax)} entries but params has "
                    f"{len(params)}; they must match one to one"
                )
            scales = list(absmax)
            mine = [i for i in new if absmax[i] is None]
            if mine:
                shapes = [params[i].shape for i in mine]
                codes = FlatParams(shapes, np.dtype(np.uint8))
                blocks = FlatParams([(_lowbits.blocks(params[i].size),) for i in mine])
                for i, c, a in zip(mine, codes, blocks):
                    c[...], a[...] = _lowbits.quantize(np.zeros(c.shape, np.float32), False)
                    filled[i], scales[i] = c, a
                states = {**states, state + ABSMAX_SUFFIX: scales}
                made.append((absmax, scales))
            new = [i for i in new if absmax[i] is not None]
        for dtype in dict.fromkeys(params[i].dtype for i in new):
            mine = [i for i in new if params[i].dtype == dtype]
            for i, view in zip(mine, FlatParams([params[i].shape for i in mine], dtype)):
                filled[i] = view
        states = {**states, state: filled}
        step = [1 if f else 2 for f in fresh]
        made.append((entries, filled))
    try:
        _core.step(name, params, grads, states, hyper, step, grad_scale, positions)
    except TypeError:
        if _PLAIN.issuperset(map(type, hyper.values())):
            raise
        _core.step(name, params, grads, states, _as_core(hyper), step, grad_scale, positions)
    for entries, filled in made:
        entries[:] = filled


def _check_dense_grads(params: ArrayList, grads: Any, positions: Optional[Sequence[int]]) -> None:
    """The core's checks of the dense gradients (a RowSparse one is checked by the step)."""
    if not isinstance(grads, (list, tuple)) or not any(isinstance(g, RowSparse) for g in grads):
        _core.check_grads(params, grads, positions=positions)
        return
    dense = [i for i, g in enumerate(grads) if not isinstance(g, RowSparse)]
    _core.check_grads(
        [params[i] for i in dense],
        [grads[i] for i in dense],
        positions=[(positions[i] if positions is not None else i) for i in dense],
    )


def _as_core(hyper: dict) -> dict:
    """Every real scalar as a float, every flag as a bool (TypeError naming one that is
    neither)."""
    return {
        k: as_flag(v) if isinstance(v, (bool, np.bool_)) else as_real(v) for k, v in hyper.items()
    }


# Every rule declared in C++ gets its function from its declaration (optkern.registry).
for _rule in rules():
    globals()[_rule.name + "_"] = make_functional(_rule, _run, __name__)
    __all__.append(_rule.name + "_")
