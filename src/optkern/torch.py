"""optkern's kernels for PyTorch training on the CPU: drop-in ``torch.optim`` classes.

    import optkern.torch as okt
    opt = okt.Adam(model.parameters(), lr=1e-3)      # same arguments as torch.optim.Adam
    loss.backward(); opt.step(); opt.zero_grad()

Each class subclasses ``torch.optim.Optimizer`` and steps ``p.grad`` of CPU float32 tensors in
place with one fused C++ call per param group (through :mod:`optkern.functional`, on NumPy views
that share the tensors' memory: nothing is copied). Param groups, ``step(closure)``,
``zero_grad``, step hooks, named parameters, ``torch.optim.lr_scheduler``, ``state_dict`` /
``load_state_dict`` in torch's own layout (a state dict moves both ways between ``okt.Adam`` and
``torch.optim.Adam``) and ``torch.save`` all behave as in ``torch.optim``.

A tensor optkern cannot update in place (not on the CPU, not float32, complex, sparse gradient,
not contiguous, conjugate/negative view bits) raises TypeError/ValueError naming the parameter;
there is no silent copy and no fallback: use ``torch.optim`` for such parameters (a separate
optimizer over them works). ``differentiable=True`` and ``capturable=True`` are refused;
``foreach`` and ``fused`` are accepted with any value torch accepts (optkern's step is always one
fused multi-tensor call).

Every rule of :mod:`optkern.registry` gets a class, its entry in the table ``RULES`` derived from
its declaration: a rule torch also has takes torch's constructor signature (checked against the
declaration: a rule whose declaration disagrees gets no class, and ``UNMAPPED`` says why), the
Schedule-Free rules the schedulefree package's arguments and its ``train()``/``eval()`` switch,
the others optkern's own arguments. Two facts no signature or declaration says are kept below
with their reasons (``_FIRST_UPDATE``, ``_FLAG_RULES``), and ``Nesterov`` is SGD's entry with
optkern.Nesterov's arguments.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import weakref
from operator import is_
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

try:
    from torch.autograd.graph import increment_version
except ImportError:  # torch < 2.1: autograd's version check does not see optkern's update

    def increment_version(tensors: Any) -> None:
        pass


try:  # torch's global step hooks, which optkern's step runs itself (see _OktOptimizer.step)
    from torch.optim.optimizer import _global_optimizer_post_hooks as _GLOBAL_POST_HOOKS
    from torch.optim.optimizer import _global_optimizer_pre_hooks as _GLOBAL_PRE_HOOKS
except ImportError:  # a torch that keeps them elsewhere: its own wrapper runs every hook
    _GLOBAL_POST_HOOKS = _GLOBAL_PRE_HOOKS = None

from . import _core
from . import functional as F
from .sparse import RowSparse
from ._torch_threads import use_torch_openmp
from .flat import FlatParams
from .registry import as_flag, as_real
from .schedule_free import ScheduleFreeSwitch

use_torch_openmp(torch)  # optkern's chunks on torch's own OpenMP team (docs/threading.md)

__all__ = ["RULES", "UNMAPPED", "PACKAGE_PEERS"]  # and a class per entry of RULES, added below


# -- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateBuf:
    """A state tensor shaped like its parameter. ``arg``: the functional function's keyword for
    the list of them. ``init``: "zeros", "first_grad" (created by the first update: it becomes
    the gradient, torch's SGD rule) or the name of a default whose value fills it. ``when``: the
    group entry that must be truthy (> 0) for the buffer to exist."""

    name: str
    arg: str
    init: str = "zeros"
    when: Optional[str] = None
    #: How its shape follows the parameter's (registry.State.shape): "like_param", or a kind
    #: that gives another shape (Adafactor's row and column factors) or none for some shapes.
    shape: str = "like_param"

    def shape_for(self, p: torch.Tensor) -> Optional[Tuple[int, ...]]:
        """Its shape for parameter ``p``, or None where ``p`` keeps no such state."""
        if self.shape == "like_param":
            return tuple(p.shape)
        return _core.state_shape(self.shape, tuple(p.shape))


@dataclass(frozen=True)
class CarriedNum:
    """A number per parameter carried from step to step (NAdam's ``mu_product``, ASGD's ``eta``
    and ``mu``, Schedule-Free's ``lr_max`` and ``weight_sum``), passed to the functional function
    as a list of floats (keyword ``arg``). ``tensor``: kept in the state as a 0-d float32 CPU
    tensor, as torch keeps its own; else as a Python float (double), as optkern's classes and the
    schedulefree package keep theirs (a tensor would be cast to float32 by torch's
    ``load_state_dict``). ``init``: its first value, a number or the group entry it starts at."""

    name: str
    arg: str
    init: Any
    tensor: bool = True


@dataclass(frozen=True)
class Rule:
    """One optimizer: its torch signature, state and the functional call it maps to.

    ``args``/``kwonly``: torch's constructor arguments after ``params``, in torch's order, with
    torch's defaults (positional-or-keyword, then keyword-only). ``fixed``: group entries that are
    not arguments. ``step``: the state has torch's ``step``, a 0-d float32 CPU tensor.
    ``step_kw``: the functional function takes the step count. ``eager``: state is created in
    the constructor (torch's Adagrad). ``fn``: the functional function, or a group entry and the
    two functions it chooses between. ``kw``: functional keyword -> group entry, or
    ``("betas", i)`` for an item of a tuple entry. ``switch``: for a rule with ``train()`` /
    ``eval()`` (Schedule-Free), the hyperparameter (optkern's name) that interpolates between
    its points.
    """

    torch_name: Optional[str]
    args: Tuple[Tuple[str, Any], ...]
    kwonly: Tuple[Tuple[str, Any], ...]
    state: Tuple[StateBuf, ...]
    fn: Any
    kw: Dict[str, Any]
    step: bool = True
    step_kw: bool = False
    eager: bool = False
    fixed: Dict[str, Any] = field(default_factory=dict)
    carried: Tuple[CarriedNum, ...] = ()
    registry_name: str = ""
    switch: Optional[str] = None
    #: Sparse COO gradients (nn.Embedding(sparse=True), EmbeddingBag): how the rule takes them
    #: (registry.Rows; None: refused, as torch refuses them), whether it takes only them
    #: (SparseAdam), and whether torch keeps its ``step`` as a Python int (SparseAdam).
    rows: Any = None
    sparse_only: bool = False
    int_step: bool = False


#: Filled below from :mod:`optkern.registry`, one entry per class.
RULES: Dict[str, Rule] = {}


# -- checks ----------------------------------------------------------------------------------------


def _scalar(name: str, value: Any) -> Any:
    """A hyperparameter as a Python number (a 1-element tensor, as torch accepts for lr and
    betas, becomes its value); anything else goes to optkern's checks as it is."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return value.item()
    return value


#: Hyperparameter types whose equality means the same value to optkern's checks.
_PLAIN_SCALARS = (float, int, bool)
_profiler_enabled = torch.autograd._profiler_enabled  # torch.profiler or autograd's profiler on
_F32 = torch.float32
_STRIDED = torch.strided
_COO = torch.sparse_coo


def _why_not(t: torch.Tensor, what: str) -> Optional[str]:
    """Why optkern cannot update (or read) ``t`` in place, or None."""
    if not isinstance(t, torch.Tensor):
        return f"{what} is a {type(t).__name__}, not a torch.Tensor"
    if t.is_sparse or t.layout != torch.strided:
        return f"{what} has layout {t.layout} (optkern needs dense tensors)"
    if t.device.type != "cpu":
        return f"{what} is on {t.device} (optkern steps CPU tensors)"
    if t.dtype != torch.float32:
        return f"{what} has dtype {t.dtype} (optkern steps float32)"
    if not t.is_contiguous():
        return f"{what} is not contiguous (stride {t.stride()}; call .contiguous() on it first)"
    if t.is_conj() or t.is_neg():
        return f"{what} has a lazy conjugate/negative bit (resolve it first)"
    return None


def _np(t: torch.Tensor) -> np.ndarray:
    """A NumPy view sharing ``t``'s memory (never a copy); a 0-d tensor's as one element, the
    shape the kernels take for it."""
    a = t.detach().numpy()
    return a.reshape(1) if a.ndim == 0 else a


def _meta(t: Optional[torch.Tensor]) -> Optional[Tuple[Any, ...]]:
    """What makes a NumPy view of ``t`` exact: the address, shape, strides and dtype. A view is
    reused only while these are unchanged (an in-place transpose, ``p.data = p.data.view(...)``
    or a ``set_`` keeps the address but changes the rest)."""
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype)


#: Whether a tensor still has the layout of a detached alias taken when its view was made: the
#: same storage, offset, shape and strides, in one call. (A dtype reinterpretation of the same
#: bytes keeps all four; a parameter's is refused by torch, a state's needs shape-preserving
#: same-size dtypes and would make torch.optim itself fail.)
_IS_SET_TO = torch.Tensor.is_set_to


class _Entry:
    """Cached NumPy views of one parameter, its gradient and its state tensors, each valid while
    the tensor keeps the layout it had when the view was made (``is_set_to`` a detached alias;
    the gradient, held weakly, by :func:`_meta`)."""

    __slots__ = (
        "ref", "lo", "nbytes", "pview", "grad", "gmeta", "galias", "sdict", "tensors", "tlive",
        "trefs", "views",
        "steps", "cviews",
    )  # fmt: skip

    def __init__(self, p: torch.Tensor) -> None:
        self.ref = p.detach()
        self.lo, self.nbytes = p.data_ptr(), p.numel() * p.element_size()
        self.pview = _np(p)
        self.grad = None
        self.gmeta: Tuple[Any, ...] = ()
        self.galias = False  # the gradient shares memory with the parameter (p.grad = p.data)
        self.sdict = None
        self.tensors: Tuple[Any, ...] = ()
        self.tlive: List[Any] = []  # the state tensors (not None) and their aliases
        self.trefs: List[Any] = []
        self.views: Tuple[Any, ...] = ()
        self.steps = None
        self.cviews: Tuple[Any, ...] = ()


_MISSING = object()


def _sparse_adam_checks(defaults: Dict[str, Any]) -> None:
    """torch.optim.SparseAdam's checks of its arguments, in its order and words (it checks them
    before the parameters)."""
    lr, eps, betas = defaults["lr"], defaults["eps"], defaults["betas"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 < lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 < eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


class _IntStep:
    """A parameter's step kept as a Python int in its state dict (torch's SparseAdam), read and
    written as the 0-d array view of a tensor step is: ``int(x)``, ``x[()] = n``."""

    __slots__ = ("st",)

    def __init__(self, st: Dict[str, Any]) -> None:
        self.st = st

    def __int__(self) -> int:
        return int(self.st["step"])

    def __setitem__(self, key: Any, value: Any) -> None:
        self.st["step"] = int(value)


class _Plan:
    """One group's update, checked by the core but not run, and what to write back after."""

    __slots__ = ("call", "params", "entries", "lists", "steps", "fresh")

    def __init__(self, call, params, entries, lists, steps, fresh) -> None:
        self.call, self.params, self.entries = call, params, entries
        self.lists, self.steps, self.fresh = lists, steps, fresh


# -- the base class --------------------------------------------------------------------------------


class _OktOptimizer(torch.optim.Optimizer):
    _rule: Rule
    _rule_name: str
    _carried_names: Tuple[str, ...] = ()  # carried numbers kept as 0-d float32 tensors
    _float_names: Tuple[str, ...] = ()  # carried numbers kept as Python floats
    _first_update_names: Tuple[str, ...] = ()  # buffers the first update makes (SGD's)

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        bound = self.__signature__.bind(params, *args, **kwargs)  # TypeError as torch's would be
        bound.apply_defaults()
        defaults = dict(bound.arguments)
        del defaults["params"]
        defaults.update(self._rule.fixed)
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if "betas" in defaults:
            defaults["betas"] = tuple(defaults["betas"])
        if self._rule.sparse_only:  # torch's SparseAdam checks these first, with these words
            _sparse_adam_checks(defaults)
        self._okt_cache: Dict[torch.Tensor, _Entry] = {}
        #: id(group) -> (group, functional name, types and values of its hyperparameters, the
        #: core's validated dict of them): see _call
        self._okt_checked: Dict[int, Tuple[Any, ...]] = {}
        #: [runs of the kernels]: advanced by the core right after them, so a step that is
        #: interrupted after its kernels ran still completes its bookkeeping (see _step)
        self._okt_runs = [0]
        super().__init__(params, defaults)
        if self._rule.eager:  # torch's Adagrad creates its state in the constructor
            for group in self.param_groups:
                for p in group["params"]:
                    self._init_state(p, group)

    # torch's Optimizer calls this for every group, the constructor's included
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            self._check_group(group, gi)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_group(self, group: Dict[str, Any], gi: int) -> None:
        cls = type(self).__name__
        for flag in ("differentiable", "capturable"):
            if group.get(flag):
                alt = self._rule.torch_name or ("SGD" if cls == "Momentum" else None)
                raise ValueError(
                    f"optkern.torch.{cls} does not support {flag}=True (param group {gi}): its "
                    f"step runs in C++ outside autograd and CUDA graphs"
                    + (f"; use torch.optim.{alt} for that" if alt else "")
                )
        for i, p in enumerate(group["params"]):
            why = _why_not(p, self._label(group, gi, i))
            if why and self._rule.sparse_only and (p.is_sparse or p.is_complex()):
                raise ValueError(  # torch's SparseAdam's words
                    f"Sparse params at indices [[{gi}, {i}]]: SparseAdam requires dense parameter "
                    "tensors"
                    if p.is_sparse
                    else f"Complex params at indices [[{gi}, {i}]]: SparseAdam does not support "
                    "complex parameters"
                )
            if why:
                raise TypeError(
                    f"optkern.torch.{cls} cannot update it in place: {why}; "
                    f"use torch.optim for such parameters"
                )
        self._prepare(group, [], [], {}, [])  # optkern validates the hyperparameters

    @staticmethod
    def _label(group: Dict[str, Any], gi: int, i: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return f"parameter {names[i]!r} (param group {gi}, index {i})"
        return f"parameter {i} of param group {gi}"

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._okt_cache = {}
        self._okt_checked = {}
        self._okt_runs = [0]
        rule = self._rule
        for group in self.param_groups:
            for name, default in rule.args + rule.kwonly:
                group.setdefault(name, default)
            group.update(rule.fixed)
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    self._normalize_state(p, st)

    def _normalize_state(self, p: torch.Tensor, st: Dict[str, Any]) -> None:
        """Loaded state in the layout the kernels take: contiguous float32 CPU tensors, a 0-d
        float32 ``step``; converted once here, never at a step."""
        for key in list(st):
            v = st[key]
            if key in self._float_names:
                st[key] = float(v)
            elif key == "step" and self._rule.int_step:
                st[key] = int(v)
            elif key == "step" or key in self._carried_names:
                if key != "step" or self._rule.step:
                    if not (
                        isinstance(v, torch.Tensor)
                        and v.dtype == torch.float32
                        and v.device.type == "cpu"
                        and v.dim() == 0
                    ):
                        st[key] = torch.tensor(float(v), dtype=torch.float32)
            elif v is None:
                del st[key]  # an old torch SGD checkpoint's absent momentum buffer
            elif isinstance(v, torch.Tensor) and tuple(v.shape) == self._shape_of(key, p):
                if _why_not(v, key) is not None:
                    st[key] = v.detach().to(device="cpu", dtype=torch.float32).contiguous()

    def _shape_of(self, key: str, p: torch.Tensor) -> Optional[Tuple[int, ...]]:
        buf = next((b for b in self._rule.state if b.name == key), None)
        return tuple(p.shape) if buf is None else buf.shape_for(p)

    def _init_state(self, p: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        st = self.state[p]
        if self._rule.step:
            st["step"] = 0 if self._rule.int_step else torch.tensor(0.0, dtype=torch.float32)
        for buf in self._rule.state:
            if buf.init != "first_grad" and (buf.when is None or group[buf.when]):
                if buf.shape != "like_param":  # a factor's shape, or none for this parameter
                    shape = buf.shape_for(p)
                    if shape is not None:
                        st[buf.name] = torch.zeros(shape, dtype=torch.float32)
                elif buf.init == "zeros":
                    st[buf.name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                else:
                    st[buf.name] = self._filled(p, buf, group)
        for c in self._rule.carried:
            init = c.init if not isinstance(c.init, str) else _scalar(c.init, group[c.init])
            st[c.name] = torch.tensor(float(init), dtype=torch.float32) if c.tensor else float(init)
        return st

    def _filled(self, p: torch.Tensor, buf: StateBuf, group: Dict[str, Any]) -> torch.Tensor:
        """A buffer filled with a hyperparameter: the constructor's value for a rule whose state
        is created in the constructor (torch's Adagrad), else the group's (torch's Rprop)."""
        src = self.defaults if self._rule.eager else group
        return torch.full_like(
            p, float(_scalar(buf.init, src[buf.init])), memory_format=torch.contiguous_format
        )

    # -- the step -------------------------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One update of every parameter that has a gradient; ``closure`` (re-evaluating the
        model and returning the loss) runs first, with gradients enabled.

        Step hooks (the optimizer's and torch's global ones) run as torch.optim runs them; the
        step is labelled ``Optimizer.step#<class>.step`` in a profile, as torch labels its own,
        but the label is only made while a profiler is on (torch's wrapper makes one at every
        step, about 5 us: a fifth of a small model's step)."""
        if type(self).step is not _OktOptimizer.step or _GLOBAL_PRE_HOOKS is None:
            return self._step(closure)  # torch's wrapper runs the hooks (a subclass's own step)
        if _profiler_enabled():
            with torch.autograd.profiler.record_function(
                f"Optimizer.step#{type(self).__name__}.step"
            ):
                return self._hooked_step(closure)
        return self._hooked_step(closure)

    # torch's Optimizer wraps a step not marked hooked in its own hook-running wrapper
    step.hooked = _GLOBAL_PRE_HOOKS is not None  # type: ignore[attr-defined]

    def _hooked_step(self, closure: Optional[Callable[[], Any]]) -> Any:
        args: Tuple[Any, ...] = (self,) if closure is None else (self, closure)
        kwargs: Dict[str, Any] = {}
        pre = _GLOBAL_PRE_HOOKS, self._optimizer_step_pre_hooks
        if pre[0] or pre[1]:  # as torch's wrapper: a hook may return new (args, kwargs)
            for hook in [*pre[0].values(), *pre[1].values()]:
                result = hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(
                            f"{type(self).step} must return None or a tuple of (new_args, "
                            f"new_kwargs), but got {result}."
                        )
        out = self._step(*args[1:], **kwargs)
        self._optimizer_step_code()
        post = self._optimizer_step_post_hooks, _GLOBAL_POST_HOOKS
        if post[0] or post[1]:
            for hook in [*post[0].values(), *post[1].values()]:
                hook(self, args, kwargs)
        return out

    def _step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        self._before_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_mode = torch.is_grad_enabled()
        if grad_mode:  # state tensors are made outside autograd, as torch.optim's step does
            torch.set_grad_enabled(False)
        try:
            self._update()
        finally:
            if grad_mode:
                torch.set_grad_enabled(True)
        return loss

    def _before_step(self) -> None:
        """Raises before anything changes if the optimizer cannot step now (Schedule-Free in eval
        mode)."""

    def _update(self) -> None:
        """Every group checked and prepared first (state a parameter lacks is made then, and
        taken back if a later group is refused), then one run of every group's kernels, then the
        bookkeeping: a refused step changes nothing, as with optkern's NumPy classes."""
        undo: List[Tuple[Any, Any, Any]] = []
        plans: List[_Plan] = []
        try:
            for gi, group in enumerate(self.param_groups):
                plan = self._plan_group(gi, group, undo)
                if plan is not None:
                    plans.append(plan)
        except BaseException:
            self._undo(undo)
            raise
        if not plans:
            return
        runs = self._okt_runs[0]
        try:
            _core.run([pl.call for pl in plans], counter=self._okt_runs)
            for pl in plans:
                self._write_back(pl)
        except BaseException:
            if self._okt_runs[0] == runs:  # the kernels did not run: nothing changed
                self._undo(undo)
            else:  # they ran (a Ctrl-C during the bookkeeping): finish it, which is idempotent
                for pl in plans:
                    self._write_back(pl)
            raise

    def _undo(self, undo: List[Tuple[Any, Any, Any]]) -> None:
        for where, key, old in reversed(undo):
            if old is _MISSING:
                where.pop(key, None)
            else:
                where[key] = old

    def _set(self, undo: list, where: Any, key: Any, value: Any) -> None:
        undo.append((where, key, where.get(key, _MISSING) if key in where else _MISSING))
        where[key] = value

    def _plan_group(self, gi: int, group: Dict[str, Any], undo: list) -> Optional[_Plan]:
        rule = self._rule
        names = [b.name for b in rule.state if b.when is None or group[b.when]]
        cnames = list(self._carried_names)
        fnames = self._float_names
        # tensors, checked by identity (an int step is read from the state dict itself)
        keys = names + cnames + (["step"] if rule.step and not rule.int_step else [])
        params: List[torch.Tensor] = []
        pviews: List[np.ndarray] = []
        gviews: List[np.ndarray] = []
        entries: List[_Entry] = []
        reshaped: Dict[int, Tuple[int, ...]] = {}  # position -> rows view of a sparse gradient
        state = self.state
        cache = self._okt_cache
        # The hot loop: a cached entry is reused while the parameter's memory, its gradient
        # tensor and its state tensors are the very objects (and layouts) the views were made of.
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            e = cache.get(p)
            try:
                fresh = e is None or not p.is_set_to(e.ref) or p.dtype is not e.ref.dtype
            except RuntimeError:  # no storage now (sparse, meta): _why_not says what it is
                fresh = True
            if fresh:
                why = _why_not(p, self._label(group, gi, i))
                if why:
                    raise TypeError(
                        f"optkern.torch.{type(self).__name__} cannot update it in place: {why}"
                    )
                e = cache[p] = _Entry(p)
            row_grad = None
            if g.layout is _COO:  # nn.Embedding(sparse=True) and the like
                row_grad, rows_shape = self._row_sparse(g, p, group, gi, i)
            elif rule.sparse_only:
                raise RuntimeError(
                    f"{type(self).__name__} does not support dense gradients, please consider "
                    "Adam instead"
                )
            else:
                # The gradient is held weakly and its view only during the call: zero_grad()
                # must free it, as with torch.optim (else every parameter costs a second gradient).
                try:
                    gm = (g.data_ptr(), g.shape, g.stride(), g.dtype)
                except RuntimeError:  # no storage (sparse, meta): the checks below say what it is
                    gm = None
                if gm is None or e.grad is None or e.grad() is not g or e.gmeta != gm:
                    if not (
                        g.is_cpu
                        and g.dtype is _F32
                        and g.layout is _STRIDED
                        and g.is_contiguous()
                        and not g.is_conj()
                        and not g.is_neg()
                    ):
                        why = _why_not(g, f"the gradient of {self._label(group, gi, i)}")
                        raise TypeError(f"optkern.torch.{type(self).__name__} cannot use it: {why}")
                    if g.shape != p.shape:
                        raise ValueError(
                            f"the gradient of {self._label(group, gi, i)} has shape "
                            f"{tuple(g.shape)}, the parameter {tuple(p.shape)}"
                        )
                    # a gradient of the parameter's shape and dtype: its bytes span as many
                    e.grad, e.gmeta = weakref.ref(g), gm
                    e.galias = gm[0] < e.lo + e.nbytes and e.lo < gm[0] + e.nbytes
            st = state.get(p) if keys else e.sdict  # SGD without momentum keeps no state
            if not st and keys:
                if p not in state:
                    undo.append((state, p, _MISSING))
                st = self._init_state(p, group)
            if keys:
                stale = (
                    st is not e.sdict
                    or len(e.tensors) != len(keys)
                    or not all(map(is_, map(st.get, keys), e.tensors))
                )
                if stale or not all(map(_IS_SET_TO, e.tlive, e.trefs)):
                    self._refresh_state(e, st, names, p, group, gi, i, undo)
            params.append(p)
            if row_grad is not None:
                gviews.append(row_grad)
                if rows_shape is not None:  # sparse in more than the first dimension
                    reshaped[len(pviews)] = rows_shape
                pviews.append(e.pview if rows_shape is None else e.pview.reshape(rows_shape))
                entries.append(e)
                continue
            pviews.append(e.pview)
            # p.grad = p.data (torch allows it): the kernels read a copy, never the memory they write
            gv = g.numpy()
            if not gv.ndim:
                gv = gv.reshape(1)
            gviews.append(gv.copy() if e.galias else gv)
            entries.append(e)
        if not params:
            return None
        lists = {n: [e.views[k] for e in entries] for k, n in enumerate(names)}
        for k, shape in reshaped.items():  # their states viewed as the parameter is
            for n in names:
                if lists[n][k] is not None:
                    lists[n][k] = lists[n][k].reshape(shape)
        for k, n in enumerate(cnames):  # the carried numbers, read from their float32 tensors
            lists[n] = [float(e.cviews[k]) for e in entries]
        for n in fnames:  # or kept as floats in the state
            lists[n] = [e.sdict[n] for e in entries]
        steps = [int(e.steps) + 1 for e in entries] if rule.step else None
        try:
            call, fresh = self._prepare(group, pviews, gviews, lists, steps)
        except (TypeError, ValueError) as err:  # say which tensors the indices name
            idx = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            where = "; ".join(f"[{k}] = {self._label(group, gi, i)}" for k, i in enumerate(idx))
            raise type(err)(
                f"{err} (param group {gi}; the indices count its parameters that "
                f"have a gradient: {where})"
            ) from None
        return _Plan(call, params, entries, lists, steps, fresh)

    def _row_sparse(
        self, g: torch.Tensor, p: torch.Tensor, group: Dict[str, Any], gi: int, i: int
    ) -> Tuple[Any, Optional[Tuple[int, ...]]]:
        """A sparse COO gradient as an optkern.RowSparse (its indices and values, no copy where
        they are contiguous), and the shape to view the parameter and its states as when it is
        sparse in more than its first dimension (rows of the flattened sparse dimensions); torch's
        errors where torch refuses it."""
        rows = self._rule.rows
        name = type(self).__name__
        if rows is None:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if rows.refused_when is not None and _scalar(
            rows.refused_when, group.get(rows.refused_when, 0)
        ):
            raise RuntimeError(f"{rows.refused_when} option is not compatible with sparse gradients")
        label = f"the gradient of {self._label(group, gi, i)}"
        if g.device.type != "cpu" or g.dtype is not _F32:
            raise TypeError(
                f"optkern.torch.{name} cannot use it: {label} is a sparse {g.dtype} tensor on "
                f"{g.device} (optkern steps CPU float32)"
            )
        if g.shape != p.shape or p.dim() == 0:
            raise ValueError(f"{label} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")
        sd = g.sparse_dim()
        ind, vals = g._indices(), g._values().detach()
        if sd == 1:
            idx, shape = ind[0], None
        else:  # row-major position within the sparse dimensions
            idx = ind[0].clone()
            for d in range(1, sd):
                idx.mul_(p.shape[d]).add_(ind[d])
            shape = (math.prod(p.shape[:sd]), *p.shape[sd:])
        if not vals.is_contiguous():
            vals = vals.contiguous()
        return RowSparse(idx.contiguous().numpy(), vals.numpy()), shape

    def _write_back(self, pl: _Plan) -> None:
        """A group's bookkeeping after its kernels ran: step counts and carried numbers into
        their tensors, buffers the first update made into the state (each write idempotent)."""
        rule = self._rule
        if rule.step:
            for e, s in zip(pl.entries, pl.steps):
                e.steps[()] = s
        for k, n in enumerate(self._carried_names):  # written back as torch keeps them: float32
            for e, v in zip(pl.entries, pl.lists[n]):
                e.cviews[k][()] = v
        for n in self._float_names:
            for e, v in zip(pl.entries, pl.lists[n]):
                e.sdict[n] = v
        names = [b.name for b in rule.state if b.name in pl.lists]
        for name in pl.fresh:  # buffers the first update created: keep them as tensors
            k = names.index(name)
            for p, e, v in zip(pl.params, pl.entries, pl.lists[name]):
                if e.views[k] is None:
                    t = torch.from_numpy(v.reshape(p.shape))  # shares the buffer's memory
                    self.state[p][name] = t
                    e.tensors = e.tensors[:k] + (t,) + e.tensors[k + 1 :]
                    e.tlive.append(t)
                    e.trefs.append(t.detach())
                    e.views = e.views[:k] + (v,) + e.views[k + 1 :]
        increment_version(pl.params)  # autograd sees the in-place update, as with torch.optim

    def _refresh_state(
        self,
        e: _Entry,
        st: Dict[str, Any],
        names: List[str],
        p: torch.Tensor,
        group: Dict[str, Any],
        gi: int,
        i: int,
        undo: list,
    ) -> None:
        label = self._label(group, gi, i)
        views = []
        for n in names:
            t = st.get(n)
            buf = next(b for b in self._rule.state if b.name == n)
            shape = buf.shape_for(p)
            if shape is None:  # this parameter keeps no such state (Adafactor's variance of a matrix)
                if t is not None:
                    raise ValueError(
                        f"state {n!r} of {label}: a parameter of shape {tuple(p.shape)} keeps "
                        f"none (a {buf.shape} state)"
                    )
                views.append(None)
                continue
            if t is None and buf.shape != "like_param":
                t = torch.zeros(shape, dtype=torch.float32)
                self._set(undo, st, n, t)
            elif t is None:
                if buf.init == "first_grad":
                    views.append(None)
                    continue
                t = (
                    torch.zeros_like(p, memory_format=torch.contiguous_format)
                    if buf.init == "zeros"
                    else self._filled(p, buf, group)
                )
                self._set(undo, st, n, t)
            elif not isinstance(t, torch.Tensor):
                raise TypeError(f"state {n!r} of {label} is a {type(t).__name__}, not a tensor")
            elif _why_not(t, f"state {n!r} of {label}") or tuple(t.shape) != shape:
                t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
                if tuple(t.shape) != shape:
                    raise ValueError(
                        f"state {n!r} of {label} has shape {tuple(t.shape)}, the "
                        f"parameter {tuple(p.shape)}"
                        + ("" if shape == tuple(p.shape) else f", which needs {shape}")
                    )
                self._set(undo, st, n, t)
            views.append(_np(t))
        if self._rule.step and self._rule.int_step:  # a Python int, as torch's SparseAdam keeps it
            if type(st.get("step")) is not int:
                self._set(undo, st, "step", int(st.get("step") or 0))
            e.steps = _IntStep(st)
        elif self._rule.step:
            s = st.get("step")
            if not (
                isinstance(s, torch.Tensor)
                and s.dtype == torch.float32
                and s.dim() == 0
                and s.device.type == "cpu"
            ):
                s = torch.tensor(float(0 if s is None else s), dtype=torch.float32)
                self._set(undo, st, "step", s)
            e.steps = s.numpy()
        cviews = []
        for c in self._rule.carried:
            v = st.get(c.name)
            if not c.tensor:
                if v is None:
                    v = c.init if not isinstance(c.init, str) else group[c.init]
                self._set(undo, st, c.name, float(_scalar(c.name, v)))
                continue
            if not (
                isinstance(v, torch.Tensor)
                and v.dtype == torch.float32
                and v.dim() == 0
                and v.device.type == "cpu"
            ):
                if v is None:
                    init = c.init if not isinstance(c.init, str) else group[c.init]
                    v = init
                v = torch.tensor(float(_scalar(c.name, v)), dtype=torch.float32)
                self._set(undo, st, c.name, v)
            cviews.append(v.numpy())
        e.cviews = tuple(cviews)
        e.sdict = st
        e.tensors = (
            tuple(st.get(n) for n in names)
            + tuple(st[c.name] for c in self._rule.carried if c.tensor)
            + ((st["step"],) if self._rule.step and not self._rule.int_step else ())
        )
        e.tlive = [t for t in e.tensors if t is not None]
        e.trefs = [t.detach() for t in e.tlive]
        e.views = tuple(views)

    def _prepare(
        self,
        group: Dict[str, Any],
        pviews: List[np.ndarray],
        gviews: List[np.ndarray],
        lists: Dict[str, List[Any]],
        steps: Optional[List[int]],
    ) -> Tuple[Any, List[str]]:
        """The group's update, checked by the core (arrays, step counts, hyperparameters, the
        per-step scalars) but not run; and the names of the buffers it creates (SGD's momentum
        at its first update, made here in one block and passed in place of the None entries)."""
        rule = self._rule
        fn_name = rule.fn if isinstance(rule.fn, str) else rule.fn[2 if group[rule.fn[0]] else 1]
        core_name = fn_name[:-1]
        values = [
            _scalar(f"{src[0]}[{src[1]}]", group[src[0]][src[1]])
            if isinstance(src, tuple)
            else _scalar(src, group[src])
            for src in rule.kw.values()
        ]
        types = list(map(type, values))
        # The hyperparameters the core checked before for this group, if unchanged (the same
        # values and types): their validated dict is reused.
        known = self._okt_checked.get(id(group))
        if (
            known is not None
            and known[0] is group
            and known[1] == fn_name
            and known[2] == types
            and known[3] == values
        ):
            hyper = known[4]
        else:
            hyper = _core.validate(
                core_name,
                {
                    k: as_flag(v) if isinstance(v, (bool, np.bool_)) else as_real(v)
                    for k, v in zip(rule.kw, values)
                },
            )
            if all(t in _PLAIN_SCALARS for t in types):  # checked: remember them
                self._okt_checked[id(group)] = (group, fn_name, types, values, hyper)
        states = {  # by name: a list the group does not use is None
            b.name: lists.get(b.name, []) if b.when is None or group[b.when] else None
            for b in rule.state
        }
        states.update((c.name, lists.get(c.name, [])) for c in rule.carried)
        fresh: List[str] = []
        call_steps = steps if rule.step_kw else None
        for name in self._first_update_names:
            entries = states.get(name)
            if not entries or id(None) not in map(id, entries):
                continue
            if hyper.get("momentum", 1.0) == 0:  # SGD without momentum: no buffer at all
                states[name] = None
                continue
            made = iter(FlatParams([p.shape for p, b in zip(pviews, entries) if b is None]))
            flags = [b is None for b in entries]
            entries[:] = [next(made) if f else b for b, f in zip(entries, flags)]
            call_steps = [1 if f else 2 for f in flags]  # step 1: the buffer becomes the gradient
            fresh.append(name)
        call = _core.prepare(
            core_name, pviews, gviews, states, hyper, steps=call_steps, grad_scale=1.0
        )
        return call, fresh


# -- Schedule-Free's train()/eval() ---------------------------------------------------------------


class _ScheduleFreeSwitch(ScheduleFreeSwitch):
    """``train()`` / ``eval()`` as the schedulefree package's ``AdamWScheduleFree`` and
    ``SGDScheduleFree``: the parameter holds y (where the gradient is taken) in train mode and x
    (the average, to evaluate and save) in eval mode; each switch is one in-place lerp towards
    ``state["z"]``, every parameter checked before any moves (:mod:`optkern.schedule_free`, the
    same switch as optkern's NumPy classes). The mode is each group's ``train_mode`` (a bool),
    saved with the group; a step in eval mode raises RuntimeError before anything runs or
    changes. Unlike the package, a new group starts in train mode (in the first group's mode,
    once there is one), as in optkern's NumPy classes.

    optkern counts steps per parameter (``step``, ``lr_max``, ``weight_sum`` in each parameter's
    state), the package per group (``k``, ``lr_max``, ``weight_sum`` in the group); they agree
    while every parameter has a gradient at every step. ``state_dict()`` also writes the group
    counters where the group's parameters agree on them, so the package loads it;
    ``load_state_dict`` takes the package's layout too (each parameter with a ``z`` gets the
    group's counters)."""

    _GROUP_COUNTERS = ("k", "lr_max", "weight_sum", "scheduled_lr")

    def _sf_beta(self, group: Dict[str, Any]) -> float:
        from . import registry

        reg = registry.rule(self._rule.registry_name)  # type: ignore[attr-defined]
        core = _core.validate(reg.name, reg.to_core(group, lr=0.0))
        return core[self._rule.switch]  # type: ignore[attr-defined]

    def _sf_pair(
        self, group: Dict[str, Any], gi: int, i: int, p: torch.Tensor
    ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        st = self.state.get(p)  # type: ignore[attr-defined]
        if not st or "z" not in st or float(st.get("step", 0)) <= 0:
            return None  # not stepped yet: y = x = z
        label = self._label(group, gi, i)  # type: ignore[attr-defined]
        why = _why_not(p, label)
        if why:
            raise TypeError(f"optkern.torch.{type(self).__name__} cannot move it: {why}")
        z = st["z"]
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != tuple(p.shape):
            what = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"the state 'z' of {label} is {what}, not shaped as its parameter")
        if _why_not(z, "z"):
            # a loaded z in another dtype or layout: read from a float32 copy (the kernels
            # convert it the same way at the next step)
            z = z.detach().to(device="cpu", dtype=torch.float32).contiguous()
        return _np(p), _np(z)

    def _sf_moved(self, params: List[Any]) -> None:
        increment_version(params)

    def _before_step(self) -> None:
        self._sf_refuse_eval_step()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if isinstance(state_dict, dict):
            self._sf_check_loaded_modes(state_dict.get("param_groups"))
        self._sf_load_state_dict(state_dict)

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        for group, packed in zip(self.param_groups, sd["param_groups"]):  # type: ignore[attr-defined]
            seen = set()
            for p in group["params"]:
                st = self.state.get(p)  # type: ignore[attr-defined]
                if st and "step" in st:
                    seen.add((int(st["step"]), st["lr_max"], st["weight_sum"]))
            if len(seen) <= 1:  # the package's group counters, where its parameters agree
                k, lr_max, weight_sum = seen.pop() if seen else (0, -1.0, 0.0)
                packed.update(k=k, lr_max=lr_max, weight_sum=weight_sum)
        return sd

    def _sf_load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        for group in self.param_groups:  # type: ignore[attr-defined]
            if "k" not in group:
                continue
            k, lr_max, weight_sum = group["k"], group.get("lr_max", -1.0), group["weight_sum"]
            for key in self._GROUP_COUNTERS:
                group.pop(key, None)
            for p in group["params"]:
                st = self.state.get(p)  # type: ignore[attr-defined]
                if st and "z" in st and "step" not in st:  # the package's layout
                    st["step"] = torch.tensor(float(k), dtype=torch.float32)
                    st["lr_max"], st["weight_sum"] = float(lr_max), float(weight_sum)
        self._okt_cache = {}


# -- the classes -----------------------------------------------------------------------------------


def _make(name: str, rule: Rule, doc: str) -> type:
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    params += [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in rule.args
    ]
    params += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in rule.kwonly
    ]
    bind_sig = inspect.Signature(params[1:])
    bases = (_ScheduleFreeSwitch, _OktOptimizer) if rule.switch else (_OktOptimizer,)
    cls = type(
        name,
        bases,
        {
            "_rule": rule,
            "_rule_name": name,
            "__signature__": bind_sig,
            "__doc__": doc,
            "_carried_names": tuple(c.name for c in rule.carried if c.tensor),
            "_float_names": tuple(c.name for c in rule.carried if not c.tensor),
            "_first_update_names": tuple(b.name for b in rule.state if b.init == "first_grad"),
            "__module__": __name__,
            "__qualname__": name,
        },
    )
    return cls


#: Where a Schedule-Free class's arguments come from: the schedulefree package's classes.
PACKAGE_PEERS = {
    "ScheduleFreeAdamW": "schedulefree.AdamWScheduleFree",
    "ScheduleFreeSGD": "schedulefree.SGDScheduleFree",
}


def _doc(name: str) -> str:
    import optkern

    rule = RULES[name]
    if rule.torch_name:
        same = (
            f"Same arguments, defaults, state and state_dict layout as torch.optim.{rule.torch_name}"
        )
    elif rule.switch:
        same = (
            f"Same arguments and defaults as {PACKAGE_PEERS[name]}, and its train()/eval() "
            "switch (see below); state_dict in torch's layout"
        )
    else:
        same = "No torch counterpart; state_dict in torch's layout"
    doc = (
        f"{name} on CPU float32 torch tensors, stepped in place by optkern's kernels.\n\n"
        f"{same}. The update, as optkern.{name} computes it:\n\n"
        + (getattr(optkern, name).__doc__ or "")
    )
    if rule.switch:
        doc += "\n\n" + (_ScheduleFreeSwitch.__doc__ or "")
    return doc


# -- the table from the registry -------------------------------------------------------------------

_KWONLY_NO_TORCH = (
    ("maximize", False),
    ("foreach", None),
    ("fused", None),
    ("differentiable", False),
    ("capturable", False),
)  # as optkern's own classes

# What neither torch's signature nor a declaration says, explained:
#: torch's SGD creates its momentum buffer at the first update, as the gradient itself
#: (optkern.functional.sgd_ does that for a None entry of its list); other buffers start filled.
_FIRST_UPDATE = {"SGD": "momentum_buffer"}
#: torch's SparseAdam refuses dense gradients ("please consider Adam instead"), though optkern's
#: rule updates every row with one; and it keeps its step as a Python int, not a tensor.
_SPARSE_ONLY = {"SparseAdam"}
_INT_STEP = {"SparseAdam"}
#: torch's Adam takes decoupled_weight_decay=True to be AdamW; the registry declares the two as
#: separate rules (flag, the rule it selects).
_FLAG_RULES = {"Adam": ("decoupled_weight_decay", "adamw")}


def _torch_signature(theirs: type) -> Tuple[Tuple[Tuple[str, Any], ...], ...]:
    ps = list(inspect.signature(theirs).parameters.values())[1:]
    args = tuple((p.name, p.default) for p in ps if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    kwonly = tuple((p.name, p.default) for p in ps if p.kind is inspect.Parameter.KEYWORD_ONLY)
    if len(args) + len(kwonly) != len(ps):
        raise ValueError(f"torch.optim.{theirs.__name__} takes *args or **kwargs")
    return args, kwonly


def _from_registry(r: Any) -> Rule:
    """The table entry of registry rule ``r``. A rule torch also has takes torch's signature
    (order, kinds, defaults) after checking that it has every argument the declaration names,
    with the same default; the group entries torch sets without an argument (AdamW's
    ``decoupled_weight_decay``) and whether it creates state in the constructor (Adagrad) are
    read off an instance of torch's class. ValueError says where they disagree."""
    from . import optimizers

    by_core = {h.name: h for h in r.hyper}

    def torch_name(core: Optional[str]) -> Optional[str]:
        if core is None:
            return None
        h = by_core[core]
        if h.slot >= 0:
            raise ValueError(f"{r.cls}: state starts at {core}, an item of {h.torch}")
        return h.torch

    declared = r.torch_args()
    theirs = getattr(torch.optim, r.cls, None)
    flag = _FLAG_RULES.get(r.cls)
    fixed: Dict[str, Any] = {}
    eager = False
    switch = None
    if theirs is not None:
        args, kwonly = _torch_signature(theirs)
        have = dict(args + kwonly)
        for name, default in declared + [("maximize", False)]:
            if name not in have:
                raise ValueError(
                    f"torch.optim.{r.cls} has no argument {name!r}, which the registry declares"
                )
            if have[name] != default:
                raise ValueError(
                    f"torch.optim.{r.cls}'s {name} defaults to {have[name]!r}, "
                    f"the registry's to {default!r}"
                )
        extra = set(have) - {n for n, _ in declared} - {n for n, _ in _KWONLY_NO_TORCH}
        extra -= {flag[0]} if flag else set()
        if extra:
            raise ValueError(
                f"torch.optim.{r.cls} takes {sorted(extra)}, which the registry does not declare"
            )
        try:
            made = theirs([torch.zeros(1, requires_grad=True)])
        except Exception as err:  # noqa: BLE001 (said in UNMAPPED)
            raise ValueError(f"torch.optim.{r.cls} with its defaults fails: {err}") from None
        fixed = {k: v for k, v in made.defaults.items() if k not in have}
        eager = bool(made.state)
    elif hasattr(getattr(optimizers, r.cls, None), "eval"):
        # Schedule-Free: the schedulefree package's arguments, the declaration's then foreach
        # (default True where torch has its foreach ops, as the package's); optkern's flags after.
        switch = getattr(optimizers, r.cls)._interpolation
        args = tuple(declared) + (("foreach", hasattr(torch, "_foreach_mul_")),)
        kwonly = tuple(kv for kv in _KWONLY_NO_TORCH if kv[0] != "foreach")
    else:
        args, kwonly = tuple(declared), _KWONLY_NO_TORCH
    # optkern's options torch lacks (the textbook forms) stay out: torch's signature, their defaults
    kw: Dict[str, Any] = {
        h.name: (h.torch if h.slot < 0 else (h.torch, h.slot)) for h in r.hyper if not h.optkern_only
    }
    kw["maximize"] = "maximize"
    # only what the functional function takes (Adagrad's initial_accumulator_value fills state)
    takes = inspect.signature(getattr(F, f"{r.name}_")).parameters
    kw = {k: v for k, v in kw.items() if k in takes}
    first = _FIRST_UPDATE.get(r.cls)
    return Rule(
        r.cls if theirs is not None else None,
        args=args,
        kwonly=kwonly,
        state=tuple(
            StateBuf(
                s.name,
                s.arg,
                init="first_grad"
                if s.name == first
                else "zeros"
                if s.init is None
                else str(torch_name(s.init)),
                when=torch_name(s.when),
                shape=s.shape,
            )
            for s in r.states
        ),
        fn=(flag[0], f"{r.name}_", f"{flag[1]}_") if flag else f"{r.name}_",
        kw=kw,
        step=r.counts_steps,
        step_kw=r.uses_step,
        eager=eager,
        fixed=fixed,
        carried=tuple(
            CarriedNum(
                c.name,
                c.arg,
                c.init if c.init_from is None else torch_name(c.init_from),
                tensor=theirs is not None,
            )
            for c in r.carried
        ),
        registry_name=r.name,
        switch=switch,
        rows=r.rows if r.rows is not None and r.rows.accepted else None,
        sparse_only=r.cls in _SPARSE_ONLY,
        int_step=r.cls in _INT_STEP,
    )


def _nesterov(sgd: Rule) -> Rule:
    """optkern's Nesterov (SGD with nesterov=True, momentum 0.9 by default; no torch class, it
    saves as torch's SGD): SGD's entry with optkern.Nesterov's arguments."""
    from . import optimizers

    ps = list(inspect.signature(optimizers.Nesterov).parameters.values())[1:]
    args = tuple((p.name, p.default) for p in ps if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return replace(sgd, args=args, fixed={"nesterov": True})


# Rules of the registry without a class, and why (a disagreement between the declaration and
# torch's signature); ``optkern.torch.<name>`` raises AttributeError with the reason.
UNMAPPED: Dict[str, str] = {}


@contextlib.contextmanager
def _environment_kept():
    """Undoes what torch writes to os.environ meanwhile. The first torch.optim optimizer a
    process builds imports torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR; optkern.torch
    builds one of each of torch's classes at import (to read their defaults), and importing or
    using optkern changes no environment variable (docs/threading.md, tested)."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _add_registry_rules() -> None:
    from . import registry

    for r in registry.rules():
        try:
            RULES[r.cls] = _from_registry(r)
        except ValueError as err:
            UNMAPPED[r.cls] = str(err)
            continue
        if r.cls == "SGD":
            RULES["Nesterov"] = _nesterov(RULES["SGD"])
    for name in RULES:
        globals()[name] = _make(name, RULES[name], _doc(name))
        if name not in __all__:
            __all__.append(name)


with _environment_kept():
    _add_registry_rules()

# torch.optim's classes that are not one element-wise rule (their own module).
from ._torch_algos import LBFGS, Muon  # noqa: E402

__all__ += ["Muon", "LBFGS"]


def __getattr__(name: str) -> Any:
    if name in UNMAPPED:
        raise AttributeError(f"optkern.torch has no {name}: {UNMAPPED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
