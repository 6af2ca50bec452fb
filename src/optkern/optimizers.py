"""The optimizer classes, one per update rule of :mod:`optkern.registry`, built from the rule's
declaration: constructor arguments, defaults, semantics and state names follow torch.optim (2.x);
each docstring gives the update as formulas, for one parameter p with gradient g at step t (state
starting at zero unless said otherwise).
"""

from __future__ import annotations

from typing import Any

from .optimizer import Optimizer
from .registry import check_execution_flags, make_class, rules

__all__ = [r.cls for r in rules()] + ["Nesterov"]

for _rule in rules():
    globals()[_rule.cls] = make_class(_rule, Optimizer)

SGD: Any = globals()["SGD"]


class Nesterov(SGD):  # type: ignore[misc, valid-type]
    r"""SGD with Nesterov momentum (``SGD(..., nesterov=True)``)::

        buf <- g  (first step),  then  buf <- momentum * buf + (1 - dampening) * g
        p   <- p - lr * (g + momentum * buf)

    Nesterov's correction evaluates the momentum step where it will land, which damps the
    overshoot of plain momentum. State: ``momentum_buffer``.
    """

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9,
                 dampening: float = 0.0, weight_decay: float = 0.0, *,
                 maximize: bool = False, foreach: Any = None, fused: Any = None,
                 differentiable: Any = False, capturable: Any = False) -> None:
        check_execution_flags(foreach=foreach, fused=fused, differentiable=differentiable,
                              capturable=capturable)
        Optimizer.__init__(self, params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                              weight_decay=weight_decay, nesterov=True,
                                              maximize=maximize))
