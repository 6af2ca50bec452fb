"""Float64 NumPy references of every update rule, written from the formulas in the optimizer
docstrings (torch.optim's semantics, in torch's order of operations), independent of the C++
kernels.

Each reference optimizer keeps one parameter in float64 and its state in a dict named as torch
names it; ``step(g)`` applies one update with a float64 gradient.

Each rule is written from its oracle's source, in the oracle's order of operations:
torch.optim 2.13 (the single-tensor path) for the torch rules; ``optax.lion`` (hard sign, with the
defaults of the ``lion-pytorch`` package and its state name ``exp_avg``) for Lion; ``optax.lamb``
(Adam direction plus decoupled decay, scaled per array by norm(p) / norm(u), 1 where either norm
is 0; state named as torch names Adam's) for LAMB; ``schedulefree.AdamWScheduleFree`` and
``SGDScheduleFree`` (with their ``train()`` / ``eval()`` switch between the points y and x) for
the Schedule-Free rules. ``Reference`` keeps optkern's layout; ``OracleReference`` the oracle
packages' (test_reference_oracles.py checks the formulas against the packages themselves).
"""

from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np


def lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """torch.lerp as torch evaluates it (the form matters for Inf and NaN)."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def torch_sign(x: np.ndarray) -> np.ndarray:
    """torch.sign: (x > 0) - (x < 0), so 0 for NaN (numpy's and jax's sign give NaN)."""
    return (x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)


def _norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(x, dtype=np.float64))))


#: Rules whose update is the sign of a float32 quantity (Lion's sign(beta1 * m + (1 - beta1) * g),
#: Rprop's sign(g * prev), where a product below float32's smallest subnormal is 0, not a sign):
#: a float64 evaluation flips the sign wherever the argument is within a float32 rounding of 0,
#: and moves that element by 2 lr, so no float32 implementation (optax's included) meets it element
#: by element. Their reference evaluates in float32 by default, in the oracle's order of operations
#: (NumPy's float32 arithmetic, independent of the kernels).
FLOAT32_RULES = ("Lion", "Rprop")


#: The rules whose parameter holds y (train mode) or x (eval mode): see ``train`` and ``eval``.
SCHEDULE_FREE = ("ScheduleFreeAdamW", "ScheduleFreeSGD")


class Reference:
    """``dtype=np.float32`` evaluates the same formulas in float32 (in torch's order of
    operations), for inputs whose float64 result float32 cannot represent (gradients of 1e20).
    The default is float64, float32 for the rules of ``FLOAT32_RULES``."""

    #: Schedule-Free: also keep the step and the group's lr_max and weight_sum in the parameter's
    #: state, as optkern does (the package keeps them in the group only).
    counters_in_state = True
    #: Adafactor's ``eps=(None, ...)`` means the machine epsilon of the parameter's dtype: float32
    #: for optkern. A check against torch in float64 sets this to float64's.
    machine_eps = float(np.finfo(np.float32).eps)

    def __init__(self, name: str, p0: np.ndarray, dtype: Any = None, **hp: Any) -> None:
        if dtype is None:
            dtype = np.float32 if name in FLOAT32_RULES else np.float64
        self.name = name
        self.dtype = dtype
        self.p = np.array(p0, dtype=dtype)
        self.hp = hp
        self.state: Dict[str, Any] = {}
        self.t = 0
        # Schedule-Free's per-group counters, as schedulefree names them. optkern's classes start
        # in train mode (the package in eval mode: ReferenceNew starts there).
        self.group = {"k": 0, "weight_sum": 0.0, "lr_max": -1.0, "train_mode": True}

    def zeros(self, key: str, fill: float = 0.0) -> np.ndarray:
        if key not in self.state:
            self.state[key] = np.full_like(self.p, fill)
        return self.state[key]

    def step(self, grad: np.ndarray, grad_scale: float = 1.0) -> None:
        if self.name in SCHEDULE_FREE and not self.group["train_mode"]:
            raise RuntimeError("Schedule-Free: step() in eval mode; call train() first")
        g = np.asarray(grad, dtype=self.dtype) * grad_scale
        if self.hp.get("maximize", False):
            g = -g
        with np.errstate(all="ignore"):  # NaN and Inf are expected inputs in some tests
            getattr(self, "_" + self.name.lower())(
                g, **{k: v for k, v in self.hp.items() if k != "maximize"}
            )
        self.t += 1

    # -- the rules -------------------------------------------------------------------------------

    def _sgd(
        self,
        g,
        lr=1e-3,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        lr_in_velocity=False,
    ):
        p = self.p
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0 and lr_in_velocity:  # classic momentum: the buffer is the velocity
            v = self.state.get("momentum_buffer")
            v = -lr * g if v is None else momentum * v - lr * (1 - dampening) * g
            self.state["momentum_buffer"] = v
            self.p = p + (momentum * v - lr * g if nesterov else v)
            return
        if momentum != 0:
            buf = self.state.get("momentum_buffer")
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            self.state["momentum_buffer"] = buf
            g = g + momentum * buf if nesterov else buf
        self.p = p - lr * g

    def _nesterov(
        self, g, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, lr_in_velocity=False
    ):
        self._sgd(
            g,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=True,
            lr_in_velocity=lr_in_velocity,
        )

    def _momentum(self, g, lr=1e-3, beta=0.9, weight_decay=0.0):
        if weight_decay != 0:
            g = g + weight_decay * self.p
        v = beta * self.zeros("momentum_buffer") + (1 - beta) * g
        self.state["momentum_buffer"] = v
        self.p = self.p - lr * v

    def _rmsprop(
        self,
        g,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0.0,
        momentum=0.0,
        centered=False,
        eps_inside_sqrt=False,
        lr_in_velocity=False,
    ):
        p = self.p
        if weight_decay != 0:
            g = g + weight_decay * p
        sq = alpha * self.zeros("square_avg") + ((1 - alpha) * g) * g
        self.state["square_avg"] = sq
        var = sq
        if centered:
            ga = lerp(self.zeros("grad_avg"), g, 1 - alpha)
            self.state["grad_avg"] = ga
            var = sq - ga * ga
        avg = np.sqrt(var + eps) if eps_inside_sqrt else np.sqrt(var) + eps
        if momentum > 0 and lr_in_velocity:  # the buffer holds the steps, lr inside
            buf = momentum * self.zeros("momentum_buffer") + (lr * g) / avg
            self.state["momentum_buffer"] = buf
            self.p = p - buf
        elif momentum > 0:
            buf = momentum * self.zeros("momentum_buffer") + g / avg
            self.state["momentum_buffer"] = buf
            self.p = p - lr * buf
        else:
            self.p = p - (lr * g) / avg
        self.state["step"] = self.t + 1

    def _adagrad(
        self,
        g,
        lr=1e-2,
        lr_decay=0.0,
        weight_decay=0.0,
        initial_accumulator_value=0.0,
        eps=1e-10,
        eps_inside_sqrt=False,
    ):
        p = self.p
        t = self.t + 1
        if weight_decay != 0:
            g = g + weight_decay * p
        clr = lr / (1 + (t - 1) * lr_decay)
        s = self.zeros("sum", initial_accumulator_value) + g * g
        self.state["sum"] = s
        denom = np.sqrt(s + eps) if eps_inside_sqrt else np.sqrt(s) + eps
        self.p = p - (clr * g) / denom
        self.state["step"] = t

    def _adadelta(self, g, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0):
        p = self.p
        if weight_decay != 0:
            g = g + weight_decay * p
        sq = rho * self.zeros("square_avg") + ((1 - rho) * g) * g
        acc = self.zeros("acc_delta")
        delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * g
        self.state["square_avg"] = sq
        self.state["acc_delta"] = rho * acc + ((1 - rho) * delta) * delta
        self.p = p - lr * delta
        self.state["step"] = self.t + 1

    def _adam(
        self,
        g,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        decoupled=False,
    ):
        p = self.p
        t = self.t + 1
        beta1, beta2 = betas
        if weight_decay != 0:
            if decoupled:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        m = lerp(self.zeros("exp_avg"), g, 1 - beta1)
        v = beta2 * self.zeros("exp_avg_sq") + ((1 - beta2) * g) * g
        self.state["exp_avg"], self.state["exp_avg_sq"] = m, v
        if amsgrad:
            v = np.maximum(self.zeros("max_exp_avg_sq"), v)  # NaN-propagating, as torch.maximum
            self.state["max_exp_avg_sq"] = v
        bc1 = 1 - beta1**t
        bc2 = 1 - beta2**t
        denom = np.sqrt(v) / math.sqrt(bc2) + eps
        self.p = p - ((lr / bc1) * m) / denom
        self.state["step"] = t

    def _adamw(self, g, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        self._adam(
            g, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, decoupled=True
        )

    def _adamax(self, g, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        p = self.p
        t = self.t + 1
        beta1, beta2 = betas
        if weight_decay != 0:
            g = g + weight_decay * p
        m = lerp(self.zeros("exp_avg"), g, 1 - beta1)
        u = np.maximum(beta2 * self.zeros("exp_inf"), np.abs(g) + eps)  # NaN-propagating
        self.state["exp_avg"], self.state["exp_inf"] = m, u
        self.p = p - ((lr / (1 - beta1**t)) * m) / u
        self.state["step"] = t

    def _sparseadam(self, g, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        # torch.optim.SparseAdam on a gradient listing every row (a dense one): Adam with eps
        # outside the bias correction, in torch's order of operations
        t = self.t + 1
        beta1, beta2 = betas
        m = self.zeros("exp_avg")
        v = self.zeros("exp_avg_sq")
        m = m + (g - m) * (1 - beta1)
        v = v + (g * g - v) * (1 - beta2)
        self.state["exp_avg"], self.state["exp_avg_sq"] = m, v
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        self.p = self.p - step_size * (m / (np.sqrt(v) + eps))
        self.state["step"] = t

    def _nadam(
        self,
        g,
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        momentum_decay=4e-3,
        decoupled_weight_decay=False,
    ):
        p = self.p
        t = self.t + 1
        beta1, beta2 = betas
        bias_correction2 = 1 - beta2**t
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
        mu_product = self.state.get("mu_product", 1.0) * mu  # carried in the state, as torch
        m = lerp(self.zeros("exp_avg"), g, 1 - beta1)
        v = beta2 * self.zeros("exp_avg_sq") + ((1 - beta2) * g) * g
        denom = np.sqrt(v / bias_correction2) + eps
        p = p + (-lr * (1.0 - mu) / (1.0 - mu_product)) * (g / denom)
        p = p + ((-lr * mu_next) / (1.0 - mu_product * mu_next)) * (m / denom)
        self.p = p
        self.state.update(exp_avg=m, exp_avg_sq=v, mu_product=mu_product, step=t)

    def _radam(
        self, g, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False
    ):
        p = self.p
        t = self.t + 1
        beta1, beta2 = betas
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        m = lerp(self.zeros("exp_avg"), g, 1 - beta1)
        v = beta2 * self.zeros("exp_avg_sq") + ((1 - beta2) * g) * g
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        m_hat = m / bias_correction1
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * (beta2**t) / bias_correction2
        if rho_t > 5.0:
            rect = (
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            ) ** 0.5
            adaptive = (bias_correction2**0.5) / (np.sqrt(v) + eps)
            p = p - m_hat * lr * adaptive * rect
        else:
            p = p - m_hat * lr
        self.p = p
        self.state.update(exp_avg=m, exp_avg_sq=v, step=t)

    def _asgd(self, g, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0):
        p = self.p
        t = self.t + 1
        eta = self.state.get("eta", lr)  # the rate of this step, set by the previous one
        mu = self.state.get("mu", 1.0)
        if weight_decay != 0:
            g = g + weight_decay * p
        p = p * (1 - lambd * eta)
        p = p + (-eta) * g
        ax = self.zeros("ax")
        ax = ax + (p - ax) * mu if mu != 1 else p.copy()
        self.p = p
        self.state.update(
            ax=ax, step=t, eta=lr / ((1 + lambd * lr * t) ** alpha), mu=1 / max(1, t - t0)
        )

    def _lion(self, g, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        beta1, beta2 = betas
        m = self.zeros("exp_avg")
        # optax's jnp.sign: sign(0) = 0, sign(NaN) = NaN (lion-pytorch's torch sign gives 0 for NaN)
        u = np.sign((1.0 - beta1) * g + beta1 * m)
        if weight_decay != 0:
            u = u + weight_decay * self.p
        self.p = self.p + (-lr) * u
        self.state["exp_avg"] = (1 - beta2) * g + beta2 * m

    def _rprop(self, g, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50)):
        etaminus, etaplus = etas
        step_size_min, step_size_max = step_sizes
        t = self.t + 1
        prev = self.zeros("prev")
        step_size = self.zeros("step_size", lr)
        # torch's sign: a NaN product (a NaN gradient or prev, or 0 * Inf) counts as 0, so the
        # step size stays, and a NaN gradient moves nothing (but is kept as prev).
        sign = torch_sign(g * prev)
        factor = np.where(sign > 0, etaplus, np.where(sign < 0, etaminus, 1.0))
        step_size = np.clip(step_size * factor, step_size_min, step_size_max)  # NaN stays NaN
        g = np.where(sign < 0, 0.0, g)  # where the sign flipped: no move, and prev forgets it
        self.p = self.p - torch_sign(g) * step_size
        self.state.update(prev=g.astype(self.dtype), step_size=step_size, step=t)

    def _adafactor(self, g, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0):
        p = self.p
        t = self.t + 1
        eps1, eps2 = eps
        if eps1 is None:
            eps1 = self.machine_eps
        one_minus_beta2_t = t**beta2_decay
        rho_t = min(lr, 1 / (t**0.5))
        # Python's max, as torch uses it on .item() values: a NaN norm gives eps2 (and below, 1).
        alpha = max(eps2, _norm(p) / (p.size**0.5) if p.size else math.nan) * rho_t
        if weight_decay != 0:
            p = p * (1 - lr * weight_decay)
        if g.ndim > 1:
            if "row_var" not in self.state:
                self.state["row_var"] = np.zeros(g.shape[:-1] + (1,), self.dtype)
                self.state["col_var"] = np.zeros(g.shape[:-2] + (1,) + g.shape[-1:], self.dtype)
            # An empty row or column averages 0 / 0 = NaN, as in torch (no warning here).
            with np.errstate(invalid="ignore", divide="ignore"):
                row_mean = np.sum(g * g, axis=-1, keepdims=True) / g.shape[-1]
                col_mean = np.sum(g * g, axis=-2, keepdims=True) / g.shape[-2]
                row_var = lerp(self.state["row_var"], row_mean, one_minus_beta2_t)
                col_var = lerp(self.state["col_var"], col_mean, one_minus_beta2_t)
                var_estimate = row_var @ col_var  # the outer product of each row and column factor
                row_var_mean = np.sum(row_var, axis=-2, keepdims=True) / row_var.shape[-2]
                var_estimate = var_estimate / np.maximum(row_var_mean, eps1)
            self.state.update(row_var=row_var, col_var=col_var)
        else:
            variance = lerp(self.zeros("variance"), g * g, one_minus_beta2_t)
            var_estimate = variance.copy()
            self.state["variance"] = variance
        with np.errstate(invalid="ignore", divide="ignore"):  # eps1 = 0: 1 / 0 and 0 * inf, as torch
            update = 1 / np.sqrt(np.maximum(var_estimate, eps1 * eps1)) * g
        if update.size:  # torch divides by zero on an empty parameter
            denom = max(1.0, _norm(update) / ((update.size**0.5) * d))
            p = p + (-alpha / denom) * update
        self.p = p
        self.state["step"] = t

    def _ademamix(
        self,
        g,
        lr=1e-3,
        betas=(0.9, 0.999, 0.9999),
        alpha=2.0,
        beta3_warmup=None,
        alpha_warmup=None,
        eps=1e-8,
        weight_decay=0.0,
    ):
        beta1, beta2, beta3 = betas
        t = self.t + 1
        if alpha_warmup is not None and t < alpha_warmup:  # linear from 0
            alpha = alpha * t / alpha_warmup
        if beta3_warmup is not None and t < beta3_warmup:
            # the slow average's half-life grows linearly from beta1's to beta3's
            def half_life(b):
                return math.log(0.5) / math.log(b + 1e-8) - 1

            a = t / beta3_warmup
            beta3 = 0.5 ** (1 / ((1 - a) * half_life(beta1) + a * half_life(beta3) + 1))
        fast = beta1 * self.zeros("exp_avg_fast") + (1 - beta1) * g
        slow = beta3 * self.zeros("exp_avg_slow") + (1 - beta3) * g
        sq = beta2 * self.zeros("exp_avg_sq") + (1 - beta2) * g * g
        denom = np.sqrt(sq) / math.sqrt(1 - beta2**t) + eps
        update = (fast / (1 - beta1**t) + alpha * slow) / denom
        self.p = self.p - lr * (update + weight_decay * self.p)
        self.state.update(exp_avg_fast=fast, exp_avg_slow=slow, exp_avg_sq=sq, step=t)

    def _lamb(self, g, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        beta1, beta2 = betas
        t = self.t + 1
        m = (1 - beta1) * g + beta1 * self.zeros("exp_avg")
        v = (1 - beta2) * g**2 + beta2 * self.zeros("exp_avg_sq")
        u = (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)
        if weight_decay != 0:
            u = u + weight_decay * self.p
        # The trust ratio of the whole array; 1 where either norm is 0 (NaN stays NaN).
        p_norm, u_norm = _norm(self.p), _norm(u)
        ratio = 1.0 if p_norm == 0.0 or u_norm == 0.0 else p_norm / u_norm
        self.p = self.p + (-lr) * (u * ratio)
        self.state.update(exp_avg=m, exp_avg_sq=v, step=t)

    # -- schedulefree ----------------------------------------------------------------------------

    def _schedule_hp(self):
        keys = ("lr", "warmup_steps", "r", "weight_lr_power")
        defaults = {
            "lr": 0.0025 if self.name == "ScheduleFreeAdamW" else 1.0,
            "warmup_steps": 0,
            "r": 0.0,
            "weight_lr_power": 2.0,
        }
        return {k: self.hp.get(k, defaults[k]) for k in keys}

    def _schedule_free_weights(self, lr, warmup_steps, r, weight_lr_power):
        """The package's per-group scalars for step k+1: the warmed-up rate and the weight c of
        the new point in the average. Advances k, weight_sum and lr_max."""
        grp = self.group
        if self.counters_in_state:  # optkern's layout: the step and the numbers it carries
            grp["k"] = self.t
            for key in ("lr_max", "weight_sum"):
                if key in self.state:
                    grp[key] = self.state[key]
        k = grp["k"]
        sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
        lr = lr * sched
        grp["lr_max"] = lr_max = max(lr, grp["lr_max"])
        weight = ((k + 1) ** r) * (lr_max**weight_lr_power)
        grp["weight_sum"] = weight_sum = grp["weight_sum"] + weight
        ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
        grp["k"] = k + 1
        if self.counters_in_state:
            self.state.update(step=k + 1, lr_max=grp["lr_max"], weight_sum=grp["weight_sum"])
        return lr, ckp1, k

    def _schedulefreeadamw(
        self,
        g,
        lr=0.0025,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        r=0.0,
        weight_lr_power=2.0,
    ):
        beta1, beta2 = betas
        lr, ckp1, k = self._schedule_free_weights(lr, warmup_steps, r, weight_lr_power)
        bias_correction2 = 1 - beta2 ** (k + 1)
        y = self.p
        z = y.copy() if k == 0 or "z" not in self.state else self.state["z"]  # z starts at y
        v = beta2 * self.zeros("exp_avg_sq") + (1 - beta2) * (g * g)
        denom = np.sqrt(v / bias_correction2) + eps
        gn = g / denom
        if weight_decay != 0:
            gn = gn + weight_decay * y  # the decay is taken at y
        y = lerp(y, z, ckp1)
        y = y + (lr * (beta1 * (1 - ckp1) - 1)) * gn
        self.state.update(z=z - lr * gn, exp_avg_sq=v)
        self.p = y

    def _schedulefreesgd(
        self, g, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0
    ):
        lr, ckp1, k = self._schedule_free_weights(lr, warmup_steps, r, weight_lr_power)
        y = self.p
        z = y.copy() if k == 0 or "z" not in self.state else self.state["z"]  # z starts at y
        if weight_decay != 0:
            g = g + weight_decay * y
        y = lerp(y, z, ckp1)
        y = y + (lr * (momentum * (1 - ckp1) - 1)) * g
        self.state["z"] = z - lr * g
        self.p = y

    def _interpolation(self) -> float:
        """beta1 (AdamW) or momentum (SGD): the weight of y between x and z."""
        if self.name == "ScheduleFreeAdamW":
            return self.hp.get("betas", (0.9, 0.999))[0]
        return self.hp.get("momentum", 0.9)

    def train(self) -> None:
        """x -> y = (1 - beta) x + beta z, as the package's ``train()`` (a no-op before the
        first step: there is no z yet)."""
        if not self.group["train_mode"]:
            if "z" in self.state:
                self.p = lerp(self.p, self.state["z"], 1 - self._interpolation())
            self.group["train_mode"] = True

    def eval(self) -> None:
        """y -> x = (y - (1 - beta) z) / beta, as the package's ``eval()``: the lerp from y
        towards z with weight 1 - 1/beta (negative)."""
        if self.group["train_mode"]:
            if "z" in self.state:
                self.p = lerp(self.p, self.state["z"], 1 - 1 / self._interpolation())
            self.group["train_mode"] = False


class OracleReference(Reference):
    """A reference in the layout of the oracle packages: float64 by default for every rule (the
    oracles' float64 runs pin the order of operations), Schedule-Free's counters per param group
    (``k``, ``weight_sum``, ``lr_max`` and ``train_mode`` in ``self.group``, as the package keeps
    them) starting in eval mode, and ``skip()`` for a step of the group in which this parameter
    had no gradient."""

    counters_in_state = False  # the package's layout

    def __init__(self, name: str, p0: np.ndarray, dtype: Any = np.float64, **hp: Any) -> None:
        super().__init__(name, p0, dtype, **hp)
        # The package starts in eval mode (optkern's classes in train mode: see Reference).
        self.group["train_mode"] = False

    def skip(self) -> None:
        """The group stepped but this parameter had no gradient."""
        if self.name in SCHEDULE_FREE:
            self._schedule_free_weights(**self._schedule_hp())
