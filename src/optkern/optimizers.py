"""The optimizer classes, one per update rule of :mod:`optkern.registry`, built from the rule's
declaration: constructor arguments, defaults, semantics and state names follow torch.optim (2.x);
each docstring gives the update as formulas, for one parameter p with gradient g at step t (state
starting at zero unless said otherwise).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from .optimizer import Optimizer
from .registry import check_execution_flags, make_class, rules

__all__ = [r.cls for r in rules()] + ["Nesterov"]


class _ScheduleFree:
    """``train()`` and ``eval()`` of the Schedule-Free rules (schedulefree's
    ``AdamWScheduleFree`` and ``SGDScheduleFree``): the parameter array holds y (where the
    gradient is taken) in train mode and x (the average, to evaluate and save) in eval mode; z is
    in the state. Each switch is one element-wise pass, in place (so references to the arrays see
    it), over every parameter that has taken a step; the mode is each group's ``train_mode``, as
    in the package, and is saved in the state dict with the group. A step in eval mode is an
    error (before anything changes). Unlike the package, a new group starts in train mode (in
    the mode of the first group, once there is one)."""

    #: The hyperparameter between y and the other two points: beta1 (AdamW) or momentum (SGD).
    _interpolation = "beta1"

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        with self._lock:  # type: ignore[attr-defined]
            groups = self.param_groups  # type: ignore[attr-defined]
            mode = bool(groups[0].get("train_mode", True)) if groups else True
            super().add_param_group(param_group)  # type: ignore[misc]
            groups[-1].setdefault("train_mode", mode)

    def train(self) -> None:
        """x -> y: p <- lerp(p, z, 1 - beta), for each group in eval mode."""
        self._switch(True)

    def eval(self) -> None:
        """y -> x: p <- lerp(p, z, 1 - 1/beta), for each group in train mode."""
        self._switch(False)

    def _switch(self, to_train: bool) -> None:
        def pairs(group: Dict[str, Any]) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
            for p in group["params"]:
                s = self.state.get_by_id(p)  # type: ignore[attr-defined]
                if s is not None and s.get("step", 0) > 0 and "z" in s:
                    yield p, s["z"]

        with self._lock:  # type: ignore[attr-defined]
            switch_schedule_free(
                self.param_groups,  # type: ignore[attr-defined]
                to_train,
                lambda group: self._hyper(group)[self._interpolation],  # type: ignore[attr-defined]
                pairs,
            )

    def step(self, grads: Sequence[Optional[np.ndarray]], **kwargs: Any) -> Optional[float]:
        with self._lock:  # type: ignore[attr-defined]
            if not all(bool(g.get("train_mode", True)) for g in self.param_groups):  # type: ignore[attr-defined]
                raise RuntimeError(
                    f"{type(self).__name__}.step() in eval mode: call train() "
                    "first (and eval() again before evaluating or saving)"
                )
            return super().step(grads, **kwargs)  # type: ignore[misc]


def switch_schedule_free(
    groups: Sequence[Dict[str, Any]],
    to_train: bool,
    beta: Callable[[Dict[str, Any]], float],
    pairs: Callable[[Dict[str, Any]], Iterable[Tuple[np.ndarray, np.ndarray]]],
) -> None:
    """Schedule-Free's mode switch over param groups (shared with ``optkern.torch``): each group
    not yet in the mode moves every (p, z) of ``pairs(group)`` by p <- lerp(p, z, w), with
    w = 1 - beta (x -> y, to train) or 1 - 1/beta (y -> x, to eval) and beta = ``beta(group)``,
    then records the mode in its ``train_mode``."""
    for group in groups:
        if bool(group.get("train_mode", True)) == to_train:
            continue
        b = beta(group)
        weight = np.float32(1.0 - b if to_train else 1.0 - 1.0 / b)
        for p, z in pairs(group):
            _lerp_(p, z, weight)
        group["train_mode"] = to_train


def _lerp_(p: np.ndarray, z: np.ndarray, weight: np.float32) -> None:
    """p <- torch.lerp(p, z, weight) in float32, in torch's form (see ``Lerp`` in src/cpp/kernel_api.hpp)."""
    diff = z - p
    if abs(weight) < 0.5:
        diff *= weight
        p += diff
    else:
        diff *= np.float32(1.0) - weight
        np.subtract(z, diff, out=p)


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
    overshoot of plain momentum. State: ``momentum_buffer``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        *,
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
                maximize=maximize,
            ),
        )
