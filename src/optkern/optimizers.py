"""The optimizer classes. Constructor arguments, defaults, semantics and state names follow
torch.optim (2.x), plus the seed notes' own Momentum. Each docstring gives the update as formulas,
for one parameter p with gradient g at step t (state starting at zero unless said otherwise); with
``maximize=True`` the update uses -g.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import functional as F
from .optimizer import Optimizer

__all__ = ["SGD", "Nesterov", "Momentum", "RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW"]


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD::

        g   <- g + weight_decay * p
        buf <- g                                          (first step)
        buf <- momentum * buf + (1 - dampening) * g       (later steps)
        g   <- g + momentum * buf     if nesterov,  else  g <- buf      (when momentum != 0)
        p   <- p - lr * g

    State: ``momentum_buffer`` (when momentum != 0). Feeding it the gradient of the whole data set,
    one sample or a mini-batch gives BGD, SGD or mini-batch GD (see ``optkern.data.batches``).
    """

    _counts_steps = False
    _array_state_names = ("momentum_buffer",)

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize))

    def _state_spec(self, group: Dict[str, Any]) -> Dict[str, float]:
        return {}  # the momentum buffer is created by the first update: it becomes the gradient

    def _apply(self, group, params, grads, states, positions, grad_scale=1.0) -> None:
        bufs: Optional[List[Optional[np.ndarray]]] = None
        if F.check_nonnegative("momentum", group["momentum"]) != 0:
            bufs = [s.get("momentum_buffer") for s in states]
        F.sgd_(params, grads, bufs, lr=self._lr(group), momentum=group["momentum"],
               dampening=group["dampening"], weight_decay=group["weight_decay"],
               nesterov=group["nesterov"], maximize=group["maximize"], grad_scale=grad_scale,
               _positions=positions)
        if bufs is not None:
            for p, s, b in zip(params, states, bufs):
                if "momentum_buffer" not in s:
                    s["momentum_buffer"] = b
                    self.state[p] = s


class Nesterov(SGD):
    r"""SGD with Nesterov momentum (``SGD(..., nesterov=True)``)::

        buf <- g  (first step),  then  buf <- momentum * buf + (1 - dampening) * g
        p   <- p - lr * (g + momentum * buf)

    Nesterov's correction evaluates the momentum step where it will land, which damps the
    overshoot of plain momentum. State: ``momentum_buffer``.
    """

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9,
                 dampening: float = 0.0, weight_decay: float = 0.0, *,
                 maximize: bool = False) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=True, maximize=maximize)


class Momentum(Optimizer):
    r"""Gradient descent with momentum in the seed notes' exponentially weighted form::

        g <- g + weight_decay * p
        V <- beta * V + (1 - beta) * g        (V starts at zero)
        p <- p - lr * V

    This differs from ``SGD(momentum=beta)``, whose buffer is not damped by (1 - beta) and starts
    at the first gradient. State: ``momentum_buffer`` (V).
    """

    _counts_steps = False
    _array_state_names = ("momentum_buffer",)

    def __init__(self, params: Any, lr: float = 1e-3, beta: float = 0.9,
                 weight_decay: float = 0.0, *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay,
                                      maximize=maximize))

    def _state_spec(self, group: Dict[str, Any]) -> Dict[str, float]:
        return {"momentum_buffer": 0.0}

    def _apply(self, group, params, grads, states, positions, grad_scale=1.0) -> None:
        F.momentum_(params, grads, [s["momentum_buffer"] for s in states], lr=self._lr(group),
                    beta=group["beta"], weight_decay=group["weight_decay"],
                    maximize=group["maximize"], grad_scale=grad_scale, _positions=positions)


class RMSprop(Optimizer):
    r"""RMSprop, as torch.optim.RMSprop::

        g          <- g + weight_decay * p
        square_avg <- alpha * square_avg + (1 - alpha) * g^2
        avg        <- sqrt(square_avg) + eps
        centered:  grad_avg <- lerp(grad_avg, g, 1 - alpha);  avg <- sqrt(square_avg - grad_avg^2) + eps
        momentum > 0:  buf <- momentum * buf + g / avg;  p <- p - lr * buf
        otherwise:     p <- p - lr * g / avg

    State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered).
    """

    _array_state_names = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(self, params: Any, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, maximize=maximize))

    def _state_spec(self, group: Dict[str, Any]) -> Dict[str, float]:
        spec = {"square_avg": 0.0}
        if F.check_nonnegative("momentum", group["momentum"]) > 0:
            spec["momentum_buffer"] = 0.0
        if F.check_flag("centered", group["centered"]):
            spec["grad_avg"] = 0.0
        return spec

    def _apply(self, group, params, grads, states, positions, grad_scale=1.0) -> None:
        momentum = F.check_nonnegative("momentum", group["momentum"])
        centered = F.check_flag("centered", group["centered"])
        F.rmsprop_(params, grads, [s["square_avg"] for s in states],
                   [s["grad_avg"] for s in states] if centered else None,
                   [s["momentum_buffer"] for s in states] if momentum > 0 else None,
                   lr=self._lr(group), alpha=group["alpha"], eps=group["eps"],
                   weight_decay=group["weight_decay"], momentum=momentum, centered=centered,
                   maximize=group["maximize"], grad_scale=grad_scale, _positions=positions)


class Adagrad(Optimizer):
    r"""Adagrad, as torch.optim.Adagrad::

        g   <- g + weight_decay * p
        clr <- lr / (1 + (t - 1) * lr_decay)
        sum <- sum + g^2                      (sum starts at initial_accumulator_value)
        p   <- p - clr * g / (sqrt(sum) + eps)

    Each coordinate's step shrinks with the gradient it has seen, so rare (sparse) features keep
    large steps. State: ``step``, ``sum``.
    """

    _array_state_names = ("sum",)

    def __init__(self, params: Any, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize))

    def _check_group(self, group: Dict[str, Any]) -> None:
        F.check_nonnegative("initial_accumulator_value", group["initial_accumulator_value"])
        super()._check_group(group)

    def _state_spec(self, group: Dict[str, Any]) -> Dict[str, float]:
        return {"sum": F.check_nonnegative("initial_accumulator_value",
                                           group["initial_accumulator_value"])}

    def _apply(self, group, params, grads, states, positions, grad_scale=1.0) -> None:
        F.adagrad_(params, grads, [s["sum"] for s in states],
                   step=[s["step"] + 1 for s in states], lr=self._lr(group),
                   lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                   eps=group["eps"], maximize=group["maximize"], grad_scale=grad_scale,
                   _positions=positions)


class Adadelta(Optimizer):
    r"""Adadelta, as torch.optim.Adadelta::

        g          <- g + weight_decay * p
        square_avg <- rho * square_avg + (1 - rho) * g^2
        delta      <- sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
        acc_delta  <- rho * acc_delta + (1 - rho) * delta^2
        p          <- p - lr * delta

    State: ``step``, ``square_avg``, ``acc_delta``.
    """

    _array_state_names = ("square_avg", "acc_delta")

    def __init__(self, params: Any, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0.0, *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize))

    def _state_spec(self, group: Dict[str, Any]) -> Dict[str, float]:
        return {"square_avg": 0.0, "acc_delta": 0.0}

    def _apply(self, group, params, grads, states, positions, grad_scale=1.0) -> None:
        F.adadelta_(params, grads, [s["square_avg"] for s in states],
                    [s["acc_delta"] for s in states], lr=self._lr(group), rho=group["rho"],
                    eps=group["eps"], weight_decay=group["weight_decay"],
                    maximize=group["maximize"], grad_scale=grad_scale, _positions=positions)


class Adam(Optimizer):
    r"""Adam, as torch.optim.Adam (weight decay as an L2 term in the gradient)::

        g          <- g + weight_decay * p
        exp_avg    <- beta1 * exp_avg + (1 - beta1) * g        (computed as torch's lerp)
        exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * g^2
        amsgrad:   max_exp_avg_sq <- max(max_exp_avg_sq, exp_avg_sq), used for v below
        v          <- exp_avg_sq
        p          <- p - lr / (1 - beta1^t) * exp_avg / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    The bias corrections 1 - beta^t are computed in double from t. State: ``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).
    """

    _array_state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _decoupled = False

    def __init__(self, params: Any, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize))

    def _state_spec(self, group: Dict[str, Any]) -> Dict[str, float]:
        spec = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
        if F.check_flag("amsgrad", group["amsgrad"]):
            spec["max_exp_avg_sq"] = 0.0
        return spec

    def _apply(self, group, params, grads, states, positions, grad_scale=1.0) -> None:
        beta1, beta2 = _betas(group["betas"])
        amsgrad = F.check_flag("amsgrad", group["amsgrad"])
        F._adam(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                step=[s["step"] + 1 for s in states], lr=self._lr(group), beta1=beta1,
                beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=amsgrad,
                max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if amsgrad else None,
                maximize=group["maximize"], grad_scale=grad_scale, decoupled=self._decoupled,
                positions=positions)


class AdamW(Adam):
    r"""AdamW, as torch.optim.AdamW: Adam with the weight decay decoupled from the gradient::

        p <- p * (1 - lr * weight_decay)
        then Adam's update of p with g (no L2 term)

    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).
    """

    _decoupled = True

    def __init__(self, params: Any, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize)


def _betas(betas: Any) -> Tuple[Any, Any]:
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return betas[0], betas[1]
