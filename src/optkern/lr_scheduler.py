"""Learning-rate schedules with the semantics of ``torch.optim.lr_scheduler`` (torch 2.x).

A scheduler writes the learning rate of every param group (``group["lr"]``), which the next
``opt.step(grads)`` uses::

    opt = ok.SGD([W, b], lr=0.1, momentum=0.9)
    sched = ok.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for epoch in range(100):
        for X, y in batches:
            opt.step(grads(X, y))
        sched.step()

In the formulas below ``t`` is ``last_epoch`` (the number of ``step()`` calls since construction)
and ``base_lr`` is the group's ``initial_lr``. As in torch, most schedules are *chainable*: a step
computes the next lr from the group's current lr (``lr <- gamma * lr``), so a change someone else
makes to ``group["lr"]`` carries on. Each docstring gives the closed form the chain follows when
nobody else touches the lr; the code uses torch's recursions, in torch's order of operations, so the
numbers are torch's own, step by step.

A state dict holds every attribute but the optimizer, under torch's names, so a scheduler checkpoint
can move between optkern and torch. Save and load the optimizer's state dict with it: the current
lr lives in the optimizer.
"""

from __future__ import annotations

import copy
import math
import numbers
import pickle
import types
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from .functional import check_flag, check_nonnegative, check_real
from .optimizer import Optimizer, check_depth
from .registry import as_real

__all__ = [
    "LRScheduler",
    "LambdaLR",
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "LinearLR",
    "SequentialLR",
    "OneCycleLR",
    "ReduceLROnPlateau",
]


# -- argument checks ---------------------------------------------------------------------------------


#: The largest last_epoch (and step count) a scheduler takes: a step number a float counts exactly.
MAX_EPOCH = 2**53


def _check_epoch(value: Any) -> int:
    v = _check_int("last_epoch", value, -1)
    if v > MAX_EPOCH:
        raise ValueError(f"last_epoch must be <= 2**53, got {v}")
    return v


def _check_lrs(values: Any, n: int, where: str) -> List[float]:
    """The lrs a schedule computed (or a state dict holds), one per group, each a real number
    that float32 holds; checked before any is written. Negative values pass, as in torch (a
    linear OneCycleLR ends a hair below zero at total_steps); the optimizer refuses them at its
    next step, with nothing changed."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise TypeError(f"{where} must be a list of {n} lrs, got {type(values).__name__}")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{where} has {len(values)} lrs but the optimizer has {n} param groups")
    return [check_real(f"{where}[{i}]", as_real(v)) for i, v in enumerate(values)]


def _kind(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "real"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "sequence"
    if isinstance(value, Mapping):
        return "mapping"
    return "other"


#: What a loaded attribute may be, by the kind of the attribute it replaces.
_COMPATIBLE = {
    "none": {"none", "int", "real"},
    "bool": {"bool"},
    "int": {"int"},
    "real": {"int", "real"},
    "str": {"str"},
    "sequence": {"sequence"},
    "mapping": {"mapping"},
}
#: Keys of torch's scheduler state dicts that optkern does not keep (ignored on load).
_TORCH_ONLY_KEYS = frozenset({"_get_lr_called_within_step", "verbose"})


def _check_optimizer(optimizer: Any) -> Optimizer:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an optkern Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(name: str, value: Any) -> float:
    v = check_real(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def _check_milestones(milestones: Any, strict: bool) -> List[int]:
    if isinstance(milestones, (str, bytes, Mapping)) or not isinstance(milestones, Iterable):
        raise TypeError(f"milestones must be a list of ints, got {type(milestones).__name__}")
    ms = [_check_int(f"milestones[{i}]", m, 0) for i, m in enumerate(milestones)]
    for i in range(1, len(ms)):
        if ms[i] < ms[i - 1] or (strict and ms[i] == ms[i - 1]):
            order = "increasing" if strict else "non-decreasing"
            raise ValueError(f"milestones must be {order}, got {ms}")
    return ms


def _per_group(name: str, value: Any, optimizer: Optimizer, check: Callable) -> List[float]:
    """``value`` (one number, or a list with one per param group) as a checked list, one per group."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values but the optimizer has {n} param groups")
        return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check(name, value)] * n


def _lrs(optimizer: Optimizer) -> List[float]:
    """The current lr of every param group, each checked to be a number a scheduler can scale."""
    lrs = []
    for i, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise TypeError(
                f"param_groups[{i}]['lr'] must be a number for a scheduler to set it, "
                f"got {type(lr).__name__}: {lr!r}"
            )
        lrs.append(lr)
    return lrs


# -- the base class ----------------------------------------------------------------------------------


class LRScheduler:
    r"""Base class of the schedulers, as torch's ``LRScheduler`` (``_LRScheduler``).

    Construction records each group's lr as ``group["initial_lr"]`` (unless the group has one
    already) and in ``base_lrs``, then takes the initial step, ``last_epoch`` -1 -> 0, which sets the
    lr of step 0. Each :meth:`step` then does ``last_epoch += 1`` and writes :meth:`get_lr` into the
    groups; :meth:`get_last_lr` returns what was written. To resume after step k, pass
    ``last_epoch=k`` (the groups must then hold ``initial_lr``), or load a :meth:`state_dict`.

    A subclass implements :meth:`get_lr`, or :meth:`_factor` for a chainable schedule that
    multiplies each group's current lr by one factor: ``lr_t = factor(t) * lr_{t-1}``.
    """

    #: Attributes a state dict leaves out (or, in a subclass, packs its own way).
    _unsaved: Sequence[str] = ("optimizer",)

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        self.optimizer = _check_optimizer(optimizer)
        last_epoch = _check_epoch(last_epoch)
        _lrs(optimizer)
        for i, group in enumerate(optimizer.param_groups):
            if last_epoch != -1 and "initial_lr" not in group:
                raise ValueError(
                    f"param_groups[{i}] has no 'initial_lr', which resuming a scheduler "
                    f"with last_epoch={last_epoch} needs (load the optimizer's state "
                    "dict first, or use last_epoch=-1 for a fresh run)"
                )
        added = [g for g in optimizer.param_groups if "initial_lr" not in g]
        saved = [(g, g["lr"]) for g in optimizer.param_groups]
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        try:
            self.base_lrs: List[float] = _check_lrs(
                [group["initial_lr"] for group in optimizer.param_groups],
                len(optimizer.param_groups),
                "initial_lr",
            )
            self.last_epoch = last_epoch
            self._initial_step()
        except BaseException:  # a schedule that fails at step 0 leaves the optimizer as it was
            for group in added:
                group.pop("initial_lr", None)
            for group, lr in saved:
                group["lr"] = lr
            raise

    def _initial_step(self) -> None:
        self._step_count = 0  # step() calls, the initial one included (kept for torch's state dict)
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def step(self) -> None:
        """Advances the schedule by one step and sets each group's lr. Call it after
        ``opt.step(grads)``."""
        self._update_lr()
        self._step_count += 1

    def _update_lr(self, epoch: Optional[int] = None) -> None:
        """Moves to the next step (or, when ``epoch`` is given, to that step, computing its lr by
        the closed form where the class has one) and writes the lrs. Nothing changes if it raises."""
        previous = self.last_epoch
        try:
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed_form = getattr(self, "_get_closed_form_lr", None)
                values = closed_form() if closed_form is not None else self.get_lr()
            values = _check_lrs(
                values,
                len(self.optimizer.param_groups),
                f"the lrs {type(self).__name__} computed for step {self.last_epoch}",
            )
        except BaseException:
            self.last_epoch = previous
            raise
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._write_extra()
        self._last_lr = list(values)

    def _write_extra(self) -> None:
        """Writes what get_lr() computed besides the lrs (OneCycleLR's momentum), once the lrs
        passed their check."""

    def get_lr(self) -> List[float]:
        """The lr of each group at step ``last_epoch``; :meth:`step` calls it (read the lrs with
        :meth:`get_last_lr`). By default each group's current lr times :meth:`_factor`."""
        factor = self._factor()
        return [lr * factor for lr in _lrs(self.optimizer)]

    def _factor(self) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement get_lr() or _factor()")

    def get_last_lr(self) -> List[float]:
        """The lr of each param group as set by the last step."""
        return list(self._last_lr)

    def state_dict(self) -> Dict[str, Any]:
        """Every attribute but the optimizer (copies), under the names torch uses."""
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if k not in self._unsaved}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restores the attributes saved by :meth:`state_dict` (the dict itself is not kept or
        changed). The dict is checked whole first, and nothing changes if it is refused: keys
        must be this scheduler's attributes (torch's ``_get_lr_called_within_step`` is
        ignored), each value of the kind of the attribute it replaces (an int for an int, a
        number for a float, a list for a list, ...), ``last_epoch`` in [-1, 2**53] and the lrs
        finite real numbers, one per group."""
        self.__dict__.update(self._loaded(state_dict))

    def _loaded(self, state_dict: Any) -> Dict[str, Any]:
        """The attributes ``state_dict`` would set, checked, as copies."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        own = vars(self)
        out: Dict[str, Any] = {}
        for key, value in state_dict.items():
            if key in self._unsaved or key in _TORCH_ONLY_KEYS:
                continue
            if not isinstance(key, str) or key not in own:
                raise ValueError(
                    f"state_dict has the key {key!r}, which is no attribute of "
                    f"{type(self).__name__} (a state dict of another scheduler?)"
                )
            current = own[key]
            if _kind(value) not in _COMPATIBLE.get(_kind(current), {_kind(value)}):
                raise TypeError(
                    f"state_dict[{key!r}] must be like {type(current).__name__} "
                    f"{_short(current)}, got {type(value).__name__}: "
                    f"{_short(value)}"
                )
            check_depth(value, f"state_dict[{key!r}]")
            out[key] = copy.deepcopy(value)
        n = len(self.optimizer.param_groups)
        if "last_epoch" in out:
            out["last_epoch"] = _check_epoch(out["last_epoch"])
        if "_step_count" in out:
            out["_step_count"] = _check_int("_step_count", out["_step_count"], 0)
        for key in ("base_lrs", "_last_lr"):
            if key in out:
                out[key] = _check_lrs(out[key], n, f"state_dict[{key!r}]")
        return out


# -- schedules ---------------------------------------------------------------------------------------


class LambdaLR(LRScheduler):
    r"""The initial lr times a function of the step::

        lr_t = base_lr * lr_lambda(t)

    ``lr_lambda`` is one function for all groups, or a list with one per group. A state dict holds
    the attributes of callable objects (``__dict__``), not plain functions or lambdas.
    """

    _unsaved = ("optimizer", "lr_lambdas")

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Union[Callable[[int], float], Sequence[Callable[[int], float]]],
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(optimizer)
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(
                    f"lr_lambda has {len(lr_lambda)} functions but the optimizer has {n} param groups"
                )
            lambdas = list(lr_lambda)
        else:
            lambdas = [lr_lambda] * n
        for i, fn in enumerate(lambdas):
            if not callable(fn):
                raise TypeError(f"lr_lambda[{i}] must be callable, got {type(fn).__name__}")
        self.lr_lambdas = lambdas
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        t = self.last_epoch
        return [
            base_lr * check_real(f"lr_lambda[{i}]({t})", as_real(fn(t)))
            for i, (fn, base_lr) in enumerate(zip(self.lr_lambdas, self.base_lrs))
        ]

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["lr_lambdas"] = [
            None
            if isinstance(fn, types.FunctionType) or not hasattr(fn, "__dict__")
            else copy.deepcopy(fn.__dict__)
            for fn in self.lr_lambdas
        ]
        return sd

    def __getstate__(self) -> Dict[str, Any]:
        # A lambda or a function defined inside another cannot be pickled (as in torch): wrap it
        # so that pickle says so clearly, while copy.deepcopy keeps the function as it is.
        state = dict(vars(self))
        state["lr_lambdas"] = [
            _LocalFunction(fn, i) if _is_local_function(fn) else fn
            for i, fn in enumerate(self.lr_lambdas)
        ]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        state["lr_lambdas"] = [
            fn.fn if isinstance(fn, _LocalFunction) else fn for fn in state["lr_lambdas"]
        ]
        self.__dict__.update(state)

    def load_state_dict(self, state_dict: Mapping) -> None:
        loaded = self._loaded(state_dict)
        saved = state_dict.get("lr_lambdas") or []
        if (
            not isinstance(saved, (list, tuple))
            or len(saved) > len(self.lr_lambdas)
            or not all(
                s is None or (isinstance(s, Mapping) and all(isinstance(k, str) for k in s))
                for s in saved
            )
        ):
            raise ValueError(
                f"state_dict['lr_lambdas'] must be a list of at most "
                f"{len(self.lr_lambdas)} entries, each None or a dict of attributes"
            )
        for fn, entry in zip(self.lr_lambdas, saved):
            if entry is not None and not hasattr(fn, "__dict__"):
                raise ValueError(
                    "state_dict['lr_lambdas'] holds attributes for a function that has none"
                )
            check_depth(entry, "state_dict['lr_lambdas']")
        self.__dict__.update(loaded)
        for fn, entry in zip(self.lr_lambdas, saved):
            if entry is not None:
                fn.__dict__.update(copy.deepcopy(entry))


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:60] + "..."


def _is_local_function(fn: Any) -> bool:
    return isinstance(fn, types.FunctionType) and (
        "<lambda>" in fn.__qualname__ or "<locals>" in fn.__qualname__
    )


class _LocalFunction:
    """A lambda in a LambdaLR being copied or pickled: deepcopy gives the function back,
    pickle raises a clear error."""

    def __init__(self, fn: Callable, index: int) -> None:
        self.fn, self.index = fn, index

    def __deepcopy__(self, memo: Dict[int, Any]) -> Callable:
        return self.fn

    def __reduce__(self) -> Any:
        raise pickle.PicklingError(
            f"cannot pickle this LambdaLR: lr_lambda[{self.index}] is "
            f"{self.fn.__qualname__!r}, a lambda or a function defined inside another, which "
            "pickle cannot store (torch's LambdaLR cannot either); use a module-level function "
            "or a callable object"
        )


class StepLR(LRScheduler):
    r"""Decays the lr by ``gamma`` every ``step_size`` steps::

        lr_t = base_lr * gamma ** (t // step_size)

    Chainable: ``lr_t = gamma * lr_{t-1}`` when t is a positive multiple of step_size, else
    ``lr_{t-1}``.
    """

    def __init__(
        self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1
    ) -> None:
        self.step_size = _check_int("step_size", step_size, 1)
        self.gamma = _check_positive("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def _factor(self) -> float:
        t = self.last_epoch
        return 1.0 if t == 0 or t % self.step_size != 0 else self.gamma

    def _get_closed_form_lr(self) -> List[float]:
        return [
            base_lr * self.gamma ** (self.last_epoch // self.step_size) for base_lr in self.base_lrs
        ]


class MultiStepLR(LRScheduler):
    r"""Decays the lr by ``gamma`` at each milestone::

        lr_t = base_lr * gamma ** (number of milestones <= t)

    Chainable: ``lr_t = gamma ** n * lr_{t-1}`` when t appears n times in ``milestones``.
    Milestones are non-negative ints in non-decreasing order; one repeated n times decays by
    gamma ** n there (torch's rule).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Iterable[int],
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.milestones = Counter(_check_milestones(milestones, strict=False))
        self.gamma = _check_positive("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def _factor(self) -> float:
        n = self.milestones.get(self.last_epoch, 0)
        return self.gamma**n if n else 1.0

    def _get_closed_form_lr(self) -> List[float]:
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [base_lr * self.gamma**passed for base_lr in self.base_lrs]


class ExponentialLR(LRScheduler):
    r"""Decays the lr by ``gamma`` every step::

    lr_t = base_lr * gamma ** t            (chainable: lr_t = gamma * lr_{t-1})
    """

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = _check_positive("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def _factor(self) -> float:
        return 1.0 if self._is_initial else self.gamma

    def _get_closed_form_lr(self) -> List[float]:
        return [base_lr * self.gamma**self.last_epoch for base_lr in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    r"""Cosine annealing from base_lr down to ``eta_min`` over ``T_max`` steps (SGDR without
    restarts)::

        lr_t = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2

    Past T_max the cosine goes on, back up to base_lr at 2 T_max and so on. Chainable, as torch::

        lr_t = eta_min + (lr_{t-1} - eta_min) * (1 + cos(pi t / T_max)) / (1 + cos(pi (t-1) / T_max))
        lr_t = lr_{t-1} + (base_lr - eta_min) * (1 - cos(pi / T_max)) / 2
                                                           when (t - 1 - T_max) % (2 T_max) == 0
    """

    def __init__(
        self, optimizer: Optimizer, T_max: float, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        _check_positive("T_max", T_max)
        self.T_max = T_max
        self.eta_min = check_nonnegative("eta_min", eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        lrs = _lrs(self.optimizer)
        t, T, eta_min = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return lrs
        if (t - 1 - T) % (2 * T) == 0:  # leaving the minimum, where the ratio below is 0/0
            return [
                lr + (base_lr - eta_min) * (1 - math.cos(math.pi / T)) / 2
                for lr, base_lr in zip(lrs, self.base_lrs)
            ]
        return [
            (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * (lr - eta_min)
            + eta_min
            for lr in lrs
        ]

    def _get_closed_form_lr(self) -> List[float]:
        return [
            self.eta_min
            + (base_lr - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
            for base_lr in self.base_lrs
        ]


class LinearLR(LRScheduler):
    r"""Scales the lr by a factor going linearly from ``start_factor`` to ``end_factor`` over
    ``total_iters`` steps, then constant (a linear warm-up, with the defaults)::

        lr_t = base_lr * (start_factor
                          + (end_factor - start_factor) * min(t, total_iters) / total_iters)

    Chainable, as torch: ``lr_0 = start_factor * lr``, then for 0 < t <= total_iters
    ``lr_t = lr_{t-1} * (1 + (end - start) / (total_iters * start + (t - 1) * (end - start)))``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        self.start_factor = check_real("start_factor", start_factor)
        if not 0 < self.start_factor <= 1:
            raise ValueError(f"start_factor must be in (0, 1], got {start_factor!r}")
        self.end_factor = check_real("end_factor", end_factor)
        if not 0 <= self.end_factor <= 1:
            raise ValueError(f"end_factor must be in [0, 1], got {end_factor!r}")
        self.total_iters = _check_int("total_iters", total_iters, 1)
        super().__init__(optimizer, last_epoch)

    def _factor(self) -> float:
        t, start, end = self.last_epoch, self.start_factor, self.end_factor
        if t == 0:
            return start
        if self._is_initial or t > self.total_iters:
            return 1.0
        return 1.0 + (end - start) / (self.total_iters * start + (t - 1) * (end - start))

    def _get_closed_form_lr(self) -> List[float]:
        start, end = self.start_factor, self.end_factor
        return [
            base_lr
            * (start + (end - start) * min(self.total_iters, self.last_epoch) / self.total_iters)
            for base_lr in self.base_lrs
        ]


class SequentialLR(LRScheduler):
    r"""Runs ``schedulers`` one after another, switching at ``milestones``::

        lr_t = schedulers[i] at step t - milestones[i-1]      for milestones[i-1] <= t < milestones[i]

    (with milestones[-1] = 0). All schedulers drive the same optimizer; each later one restarts
    from base_lr at its milestone (by its closed form where it has one, as torch).
    """

    _unsaved = ("optimizer", "_schedulers")

    def __init__(
        self,
        optimizer: Optimizer,
        schedulers: Sequence[LRScheduler],
        milestones: Sequence[int],
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(optimizer)
        if isinstance(schedulers, LRScheduler) or not isinstance(schedulers, (list, tuple)):
            raise TypeError(
                f"schedulers must be a list of schedulers, got {type(schedulers).__name__}"
            )
        if len(schedulers) == 0:
            raise ValueError("SequentialLR needs at least one scheduler")
        for i, s in enumerate(schedulers):
            if not isinstance(s, LRScheduler):
                raise TypeError(f"schedulers[{i}] must be an LRScheduler, got {type(s).__name__}")
            if isinstance(s, ReduceLROnPlateau):
                raise ValueError(
                    f"schedulers[{i}] is a ReduceLROnPlateau, which SequentialLR cannot "
                    "run: its step() needs a metric"
                )
            if s.optimizer is not optimizer:
                raise ValueError(f"schedulers[{i}] drives another optimizer than the one given")
        milestones = _check_milestones(milestones, strict=True)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                f"SequentialLR needs one milestone fewer than schedulers, got "
                f"{len(schedulers)} schedulers and {len(milestones)} milestones"
            )
        _check_epoch(last_epoch)
        self.optimizer = optimizer
        self._schedulers = list(schedulers)
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        # Undo the initial step each scheduler took when it was built, then take it again for the
        # scheduler that runs at step 0 only.
        for group, base_lr in zip(optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr
        self._undo_initial_steps(self)
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    @classmethod
    def _undo_initial_steps(cls, sched: LRScheduler) -> None:
        if isinstance(sched, SequentialLR):
            for s in sched._schedulers:
                cls._undo_initial_steps(s)
        else:
            sched.last_epoch -= 1

    def step(self) -> None:
        epoch = self.last_epoch + 1
        i = bisect_right(self._milestones, epoch)
        sched = self._schedulers[i]
        if i > 0 and self._milestones[i - 1] == epoch:
            sched._update_lr(0)
        else:
            sched.step()  # if the child refuses, nothing changed, here either
        self.last_epoch = epoch
        self._last_lr = sched.get_last_lr()

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return sd

    def load_state_dict(self, state_dict: Mapping) -> None:
        saved = state_dict.get("_schedulers") if isinstance(state_dict, Mapping) else None
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self._schedulers):
            raise ValueError(
                f"state_dict['_schedulers'] must be a list of {len(self._schedulers)} "
                "scheduler state dicts"
            )
        # Everything checked (this scheduler's and every child's) before anything is set.
        mine = {k: v for k, v in state_dict.items() if k != "_schedulers"}
        loaded = self._loaded(mine)
        children = [
            s._loaded(sd) if type(s).load_state_dict is LRScheduler.load_state_dict else None
            for s, sd in zip(self._schedulers, saved)
        ]
        for s, sd, checked in zip(self._schedulers, saved, children):
            if checked is None:  # a child with its own load (LambdaLR, nested SequentialLR, ...)
                s._loaded(
                    sd
                    if not isinstance(s, SequentialLR)
                    else {k: v for k, v in sd.items() if k != "_schedulers"}
                )
        self.__dict__.update(loaded)
        for s, sd, checked in zip(self._schedulers, saved, children):
            if checked is not None:
                s.__dict__.update(checked)
            else:
                s.load_state_dict(sd)


def _phase(
    end_step: float, start_lr: str, end_lr: str, start_momentum: str, end_momentum: str
) -> Dict[str, Any]:
    """One phase of OneCycleLR: the step it ends at and the group entries it anneals between
    (torch's layout, so that state dicts match)."""
    return {
        "end_step": end_step,
        "start_lr": start_lr,
        "end_lr": end_lr,
        "start_momentum": start_momentum,
        "end_momentum": end_momentum,
    }


class OneCycleLR(LRScheduler):
    r"""The 1cycle policy (Smith & Topin, "Super-Convergence"), stepped once per batch. With
    ``initial_lr = max_lr / div_factor`` and ``min_lr = initial_lr / final_div_factor``, over
    ``total_steps`` (or ``epochs * steps_per_epoch``) steps and with ``w = pct_start * total_steps``::

        t in [0, w - 1]:              lr anneals initial_lr -> max_lr,  momentum max -> base
        t in [w - 1, total_steps - 1]: lr anneals max_lr -> min_lr,      momentum base -> max

    and with ``three_phase=True``: up over [0, w-1], back down to initial_lr over [w-1, 2w-2], then
    down to min_lr over [2w-2, total_steps-1] (momentum: max -> base -> max, then max). Annealing
    from a to b over [s, e] at step t, with ``p = (t - s) / (e - s)``::

        cos:     b + (a - b) / 2 * (1 + cos(pi * p))
        linear:  a + (b - a) * p

    With ``cycle_momentum`` the optimizer's ``momentum`` is cycled, or beta1 of its ``betas``. The
    groups get ``initial_lr``, ``max_lr``, ``min_lr`` (and ``max_momentum``, ``base_momentum``)
    entries, as in torch. Stepping past ``total_steps`` raises ValueError.
    """

    _unsaved = ("optimizer", "_momenta")  # _momenta: the step being taken's, not state

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: Union[float, Sequence[float]],
        total_steps: Optional[int] = None,
        epochs: Optional[int] = None,
        steps_per_epoch: Optional[int] = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: Union[float, Sequence[float]] = 0.85,
        max_momentum: Union[float, Sequence[float]] = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        _lrs(_check_optimizer(optimizer))
        if total_steps is not None:
            self.total_steps = _check_int("total_steps", total_steps, 1)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = _check_int("epochs", epochs, 1) * _check_int(
                "steps_per_epoch", steps_per_epoch, 1
            )
        else:
            raise ValueError("OneCycleLR needs total_steps, or epochs and steps_per_epoch")
        pct_start = check_real("pct_start", pct_start)
        if not 0 <= pct_start <= 1:
            raise ValueError(f"pct_start must be in [0, 1], got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self._anneal_func_type = anneal_strategy
        div_factor = _check_positive("div_factor", div_factor)
        final_div_factor = _check_positive("final_div_factor", final_div_factor)
        max_lrs = _per_group("max_lr", max_lr, optimizer, _check_positive)
        self.cycle_momentum = check_flag("cycle_momentum", cycle_momentum)
        if self.cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError(
                    f"{type(optimizer).__name__} has neither 'momentum' nor 'betas' "
                    "to cycle; pass cycle_momentum=False"
                )
            self.use_beta1 = "betas" in optimizer.defaults
            max_momentums = _per_group("max_momentum", max_momentum, optimizer, check_nonnegative)
            base_momentums = _per_group("base_momentum", base_momentum, optimizer, check_nonnegative)

        w, T = float(pct_start * self.total_steps), self.total_steps
        if check_flag("three_phase", three_phase):
            self._schedule_phases = [
                _phase(w - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                _phase(
                    float(2 * pct_start * T) - 2,
                    "max_lr",
                    "initial_lr",
                    "base_momentum",
                    "max_momentum",
                ),
                _phase(T - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
            ]
        else:
            self._schedule_phases = [
                _phase(w - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                _phase(T - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"),
            ]

        if _check_epoch(last_epoch) == -1:
            for i, group in enumerate(optimizer.param_groups):
                group["initial_lr"] = max_lrs[i] / div_factor
                group["max_lr"] = max_lrs[i]
                group["min_lr"] = group["initial_lr"] / final_div_factor
                if self.cycle_momentum:
                    if self.use_beta1:
                        group["betas"] = (max_momentums[i], *group["betas"][1:])
                    else:
                        group["momentum"] = max_momentums[i]
                    group["max_momentum"] = max_momentums[i]
                    group["base_momentum"] = base_momentums[i]
        super().__init__(optimizer, last_epoch)

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self._anneal_func_type == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self) -> List[float]:
        t = self.last_epoch
        if t > self.total_steps:
            raise ValueError(f"OneCycleLR stepped to step {t}, past total_steps={self.total_steps}")
        start = 0.0
        for i, phase in enumerate(self._schedule_phases):
            end = phase["end_step"]
            if t <= end or i == len(self._schedule_phases) - 1:
                break
            start = end
        if end == start:
            raise ValueError(
                f"OneCycleLR phase {i} spans no steps (total_steps={self.total_steps}): "
                "pick pct_start so that pct_start * total_steps != 1"
            )
        pct = (t - start) / (end - start)
        lrs, momenta = [], []
        for group in self.optimizer.param_groups:
            lrs.append(self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct))
            if self.cycle_momentum:
                momenta.append(
                    self._anneal(group[phase["start_momentum"]], group[phase["end_momentum"]], pct)
                )
        self._momenta = momenta  # written with the lrs, after their check (_write_extra)
        return lrs

    def _write_extra(self) -> None:
        momenta, self._momenta = getattr(self, "_momenta", []), []
        for group, m in zip(self.optimizer.param_groups, momenta):
            if self.use_beta1:
                group["betas"] = (m, *group["betas"][1:])
            else:
                group["momentum"] = m


class ReduceLROnPlateau(LRScheduler):
    r"""Reduces the lr when a metric has stopped improving: ``step(metric)`` once per evaluation.

    A metric improves on the best so far when (mode, threshold_mode)::

        min, rel: metric < best * (1 - threshold)      max, rel: metric > best * (1 + threshold)
        min, abs: metric < best - threshold            max, abs: metric > best + threshold

    After more than ``patience`` steps in a row without improvement, each group's lr becomes
    ``max(lr * factor, min_lr)`` (unless that changes it by ``eps`` or less) and the next
    ``cooldown`` steps count no bad steps. ``min_lr`` is one number or one per group.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: Union[float, Sequence[float]] = 0,
        eps: float = 1e-8,
    ) -> None:
        self.optimizer = _check_optimizer(optimizer)
        self.factor = check_real("factor", factor)
        if not 0 <= self.factor < 1:
            raise ValueError(f"factor must be in [0, 1), got {factor!r}")
        self.min_lrs = _per_group("min_lr", min_lr, optimizer, check_nonnegative)
        self.default_min_lr = None if isinstance(min_lr, (list, tuple)) else self.min_lrs[0]
        self.patience = _check_int("patience", patience, 0)
        self.cooldown = _check_int("cooldown", cooldown, 0)
        self.eps = check_nonnegative("eps", eps)
        self.last_epoch = 0
        self._last_lr = _lrs(optimizer)
        self._init_is_better(mode, check_nonnegative("threshold", threshold), threshold_mode)
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def _init_is_better(self, mode: str, threshold: float, threshold_mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.mode, self.threshold, self.threshold_mode = mode, threshold, threshold_mode
        self.mode_worse = math.inf if mode == "min" else -math.inf

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min":
            return a < (
                best * (1.0 - self.threshold)
                if self.threshold_mode == "rel"
                else best - self.threshold
            )
        return a > (
            best * (self.threshold + 1.0) if self.threshold_mode == "rel" else best + self.threshold
        )

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def step(self, metrics: float) -> None:  # type: ignore[override]
        """Records one evaluation of the metric and reduces the lrs if it has plateaued. The
        metric is a real number (a NumPy scalar, a 0-d array or tensor); NaN counts as no
        improvement, as in torch. Anything else raises TypeError with nothing changed."""
        value = as_real(metrics)
        if type(value) is not float and type(value) is not int:
            raise TypeError(
                f"metrics must be a real number, got {type(metrics).__name__}: {_short(metrics)}"
            )
        current = float(value)
        # Computed first and set last: if reducing the lrs raises, nothing changed.
        best, bad, cooldown = self.best, self.num_bad_epochs, self.cooldown_counter
        if self._is_better(current, best):
            best, bad = current, 0
        else:
            bad += 1
        if cooldown > 0:
            cooldown -= 1
            bad = 0  # bad steps during the cooldown do not count
        if bad > self.patience:
            self._reduce_lr()
            cooldown, bad = self.cooldown, 0
        self.last_epoch += 1
        self.best, self.num_bad_epochs, self.cooldown_counter = best, bad, cooldown
        self._last_lr = _lrs(self.optimizer)

    def _reduce_lr(self) -> None:
        groups = self.optimizer.param_groups
        min_lrs = self.min_lrs
        if len(groups) != len(min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"the optimizer has {len(groups)} param groups but min_lr was "
                    f"given for {len(self.min_lrs)}; set min_lrs to one per group"
                )
            min_lrs = [self.default_min_lr] * len(groups)
        lrs = _lrs(self.optimizer)  # every lr checked before any is written
        for group, lr, min_lr in zip(groups, lrs, min_lrs):
            new_lr = max(float(lr) * self.factor, min_lr)
            if float(lr) - new_lr > self.eps:
                group["lr"] = new_lr
        self.min_lrs = min_lrs

    def load_state_dict(self, state_dict: Mapping) -> None:
        loaded = self._loaded(state_dict)
        mode = loaded.get("mode", self.mode)
        threshold_mode = loaded.get("threshold_mode", self.threshold_mode)
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise ValueError(
                f"state_dict has mode {mode!r} and threshold_mode "
                f"{threshold_mode!r}; they must be 'min'/'max' and 'rel'/'abs'"
            )
        for key in ("factor", "threshold", "eps"):
            if key in loaded:
                loaded[key] = check_nonnegative(f"state_dict[{key!r}]", loaded[key])
        if "min_lrs" in loaded:
            loaded["min_lrs"] = [
                check_nonnegative(f"state_dict['min_lrs'][{i}]", v)
                for i, v in enumerate(loaded["min_lrs"])
            ]
        self.__dict__.update(loaded)
        self._init_is_better(self.mode, self.threshold, self.threshold_mode)
