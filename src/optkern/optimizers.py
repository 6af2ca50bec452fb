"""The optimizer classes, one per update rule of :mod:`optkern.registry`, built from the rule's
declaration: constructor arguments, defaults, semantics and state names follow torch.optim (2.x);
each docstring gives the update as formulas, for one parameter p with gradient g at step t (state
starting at zero unless said otherwise).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .optimizer import Optimizer
from .registry import check_execution_flags, make_class, rules
from .schedule_free import ScheduleFreeSwitch

__all__ = [r.cls for r in rules()] + ["Nesterov"]


class _ScheduleFree(ScheduleFreeSwitch):
    """``train()`` and ``eval()`` of the Schedule-Free rules (schedulefree's
    ``AdamWScheduleFree`` and ``SGDScheduleFree``): the parameter array holds y (where the
    gradient is taken) in train mode and x (the average, to evaluate and save) in eval mode; z is
    in the state. Each switch is one element-wise pass, in place (so references to the arrays see
    it), over every parameter that has taken a step, all checked before any moves; the mode is
    each group's ``train_mode`` (a bool), as in the package, and is saved in the state dict with
    the group. A step in eval mode is an error (before anything changes). Unlike the package, a
    new group starts in train mode (in the mode of the first group, once there is one). See
    :mod:`optkern.schedule_free`."""

    #: The hyperparameter between y and the other two points: beta1 (AdamW) or momentum (SGD).
    _interpolation = "beta1"

    def _sf_lock(self) -> Any:
        return self._lock  # type: ignore[attr-defined]

    def _sf_beta(self, group: Dict[str, Any]) -> float:
        return self._hyper(group)[self._interpolation]  # type: ignore[attr-defined]

    def _sf_pair(
        self, group: Dict[str, Any], gi: int, i: int, p: np.ndarray
    ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        s = self.state.get_by_id(p)  # type: ignore[attr-defined]
        if s is None or s.get("step", 0) <= 0 or "z" not in s:
            return None  # not stepped yet: y = x = z
        where = f"parameter {i} of param group {gi}"
        if not (
            isinstance(p, np.ndarray) and p.dtype in (np.float32, np.float64) and p.flags.c_contiguous
        ):
            raise TypeError(
                f"{where} is no longer a C-contiguous float32 or float64 array; cannot move it"
            )
        if not p.flags.writeable:
            raise ValueError(f"{where} is read-only; train()/eval() moves it in place")
        z = s["z"]
        if not (isinstance(z, np.ndarray) and z.dtype == p.dtype and z.shape == p.shape):
            what = f"{z.dtype} {z.shape}" if isinstance(z, np.ndarray) else type(z).__name__
            raise ValueError(f"the state 'z' of {where} is {what}, not {p.dtype} {p.shape}")
        return p, z

    def step(self, grads: Sequence[Optional[np.ndarray]], **kwargs: Any) -> Optional[float]:
        with self._lock:  # type: ignore[attr-defined]
            self._sf_refuse_eval_step()
            return super().step(grads, **kwargs)  # type: ignore[misc]

    def load_state_dict(self, state_dict: Any) -> None:
        if isinstance(state_dict, dict):
            self._sf_check_loaded_modes(state_dict.get("param_groups"))
        super().load_state_dict(state_dict)  # type: ignore[misc]


_MIXINS = {
    "ScheduleFreeAdamW": (_ScheduleFree,),
    "ScheduleFreeSGD": (
        type("_ScheduleFreeMomentum", (_ScheduleFree,), {"_interpolation": "momentum"}),
    ),
}

for _rule in rules():
    _cls = make_class(_rule, Optimizer)
    if _rule.cls in _MIXINS:
        _cls = type(
            _rule.cls,
            _MIXINS[_rule.cls] + (_cls,),
            {"__doc__": _cls.__doc__, "__module__": _cls.__module__},
        )
    globals()[_rule.cls] = _cls

SGD: Any = globals()["SGD"]


class Nesterov(SGD):  # type: ignore[misc, valid-type]
    r"""SGD with Nesterov momentum (``SGD(..., nesterov=True)``)::

        buf <- g  (first step),  then  buf <- momentum * buf + (1 - dampening) * g
        p   <- p - lr * (g + momentum * buf)

    Nesterov's correction evaluates the momentum step where it will land, which damps the
    overshoot of plain momentum. ``lr_in_velocity=True`` keeps the learning rate inside the
    buffer, as classic momentum (Keras' ``SGD(momentum=..., nesterov=True)``)::

        v <- -lr * g  (first step),  then  v <- momentum * v - lr * (1 - dampening) * g
        p <- p + momentum * v - lr * g

    State: ``momentum_buffer``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        *,
        lr_in_velocity: bool = False,
        maximize: bool = False,
        foreach: Any = None,
        fused: Any = None,
        differentiable: Any = False,
        capturable: Any = False,
    ) -> None:
        check_execution_flags(
            foreach=foreach, fused=fused, differentiable=differentiable, capturable=capturable
        )
        Optimizer.__init__(
            self,
            params,
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=True,
                lr_in_velocity=lr_in_velocity,
                maximize=maximize,
            ),
        )
