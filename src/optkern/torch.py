"""optkern's kernels for PyTorch training on the CPU: drop-in ``torch.optim`` classes.

    import optkern.torch as okt
    opt = okt.Adam(model.parameters(), lr=1e-3)      # same arguments as torch.optim.Adam
    loss.backward(); opt.step(); opt.zero_grad()

Each class subclasses ``torch.optim.Optimizer`` and steps ``p.grad`` of CPU tensors in place with
one fused C++ call for all its param groups (NumPy views that share the tensors' memory: nothing
is copied). Param groups, ``step(closure)``, ``zero_grad``, step and state-dict hooks, named
parameters, ``torch.optim.lr_scheduler``, ``state_dict`` / ``load_state_dict`` in torch's own
layout (a state dict moves both ways between ``okt.Adam`` and ``torch.optim.Adam``), pickling
and ``torch.save`` behave as in ``torch.optim``.

A drop-in refuses nothing torch accepts. A class with a torch.optim counterpart is built by
torch's own constructor (its checks, their order and messages, its param groups and the state it
makes there), and a param group the kernels cannot serve runs torch's own implementation, with
the state in torch's layout, so its results and checkpoints are exactly torch's; a
:class:`TorchFallbackWarning` names the reason once. The kernels cannot serve
``differentiable=True``, ``capturable=True``, a parameter or gradient that is not a dense CPU
tensor of a dtype the kernels take (float32, float64, float16, and bfloat16 with ml_dtypes
installed), a lazy conjugate or negative bit, or hyperparameters outside the ranges the kernels
take; what they serve is decided per group at
every step from these facts (:attr:`Binding.dtypes` comes from the rule's declaration), so a
group moves to the kernels as soon as they can serve it (a model built on the meta device and
then ``to_empty()``'d, say). A parameter that is not contiguous is stepped through a contiguous
copy that is written back. The classes torch lacks (Momentum, Lion, LAMB, the Schedule-Free
ones) have nothing to fall back to: they refuse such groups with TypeError or ValueError naming
the parameter, at the step (parameters are taken as given at construction, as torch takes them).

optkern's precision options (``state_dtype``, ``stochastic_rounding``, ``master_weights``) are
keyword-only arguments of every class, after torch's, meaning what they mean on optkern's own
classes; 16-bit parameters are computed in float32 and rounded once, so results agree with
torch's 16-bit step within 16-bit rounding (docs/torch.md). A group that would need torch's
step is refused under a precision option, which torch's implementation lacks.

Every rule of :mod:`optkern.registry` gets a class, its :class:`Binding` in ``RULES`` derived from
its declaration: a rule torch also has takes torch's constructor signature (checked against the
declaration: a rule whose declaration disagrees gets no class, and ``UNMAPPED`` says why), the
Schedule-Free rules the schedulefree package's arguments and its ``train()``/``eval()`` switch,
the others optkern's own arguments; a preset of a rule's class (optkern.Nesterov) gets one too.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from dataclasses import dataclass, replace
from operator import is_
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

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

try:  # the dtype of torch's step counts and carried numbers (float64 under a float64 default)
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # pragma: no cover - torch < 2.1

    def _get_scalar_dtype() -> torch.dtype:
        return torch.float32


from . import _core, _lowbits, registry
from ._torch_threads import use_torch_openmp
from .flat import FlatParams
from .registry import as_flag
from .schedule_free import ScheduleFreeSwitch
from .sparse import RowSparse

use_torch_openmp(torch)  # optkern's chunks on torch's own OpenMP team (docs/threading.md)

__all__ = ["RULES", "UNMAPPED", "Binding", "TorchFallbackWarning"]  # and a class per binding


class TorchFallbackWarning(UserWarning):
    """A param group that optkern's kernels cannot serve runs torch.optim's own implementation
    (said once per optimizer and reason)."""


# -- how a class maps onto a rule of the registry ------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """One ``optkern.torch`` class: the rule it runs and the constructor it takes.

    ``args``/``kwonly``: the constructor's arguments after ``params`` (positional-or-keyword,
    then keyword-only) with their defaults: torch.optim's own where ``torch_cls`` (the torch
    class of the same algorithm) is set. ``fixed``: group entries that are not arguments
    (AdamW's ``decoupled_weight_decay``, Nesterov's ``nesterov``). ``eager``: torch's class makes
    the state in its constructor (Adagrad). ``variants``: (flag, rule) pairs, the rule a group
    runs while its flag is true (torch's Adam with ``decoupled_weight_decay=True`` is AdamW).
    ``dtypes``: the parameter dtypes the kernels take for this rule. ``sparse_only``: torch's
    class takes sparse gradients only (SparseAdam: a dense one runs torch's step, which refuses
    it); ``int_step``: torch's class keeps a parameter's ``step`` as a Python int (SparseAdam)."""

    name: str
    rule: registry.Rule
    torch_cls: Optional[type]
    args: Tuple[Tuple[str, Any], ...]
    kwonly: Tuple[Tuple[str, Any], ...]
    fixed: Dict[str, Any]
    eager: bool = False
    variants: Tuple[Tuple[str, registry.Rule], ...] = ()
    dtypes: FrozenSet[torch.dtype] = frozenset({torch.float32, torch.float64})
    sparse_only: bool = False
    int_step: bool = False

    @property
    def torch_name(self) -> Optional[str]:
        return None if self.torch_cls is None else self.torch_cls.__name__

    @property
    def registry_name(self) -> str:
        return self.rule.name

    @property
    def switch(self) -> Optional[str]:
        return self.rule.switch

    def rule_for(self, group: Dict[str, Any]) -> registry.Rule:
        for flag, rule in self.variants:
            if group.get(flag):
                return rule
        return self.rule


#: One binding per class, filled below from :mod:`optkern.registry`.
RULES: Dict[str, Binding] = {}
#: Rules of the registry without a class, and why; ``optkern.torch.<name>`` raises
#: AttributeError with the reason.
UNMAPPED: Dict[str, str] = {}


# -- tensors the kernels can serve ---------------------------------------------------------------

_STRIDED = torch.strided
_COO = torch.sparse_coo
_BF16 = torch.bfloat16
#: The element types optkern.torch steps on the kernels, as torch's, and the NumPy dtype each is
#: viewed as (sharing the tensor's memory): float32, float64, float16 and, where ml_dtypes is
#: installed, bfloat16 (NumPy has none: its bytes are viewed as ml_dtypes.bfloat16).
_NUMPY_OF = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
}
if _lowbits.BFLOAT16 is not None:
    _NUMPY_OF[_BF16] = _lowbits.BFLOAT16
_KERNEL_DTYPES: FrozenSet[torch.dtype] = frozenset(_NUMPY_OF)
_NUMPY_KERNEL = frozenset(_NUMPY_OF.values())
_HALF: FrozenSet[torch.dtype] = frozenset({torch.float16, _BF16})
#: The dtype of the state tensors of a float32, float16 or bfloat16 parameter per state_dtype
#: (int8 state: uint8 codes, with a float32 absmax per block beside them).
_STATE_TORCH = {"float32": torch.float32, "bfloat16": _BF16, "int8": torch.uint8}
_MASTER = _lowbits.MASTER
_ABSMAX = _lowbits.ABSMAX_SUFFIX
_profiler_enabled = torch.autograd._profiler_enabled  # torch.profiler or autograd's profiler on
#: Whether a tensor still has the layout of a detached alias taken when its view was made: the
#: same storage, offset, shape and strides, in one call (the dtype is compared beside it).
_IS_SET_TO = torch.Tensor.is_set_to
_MISSING = object()
#: Hyperparameter types whose equality means the same value to the core's checks.
_PLAIN = (float, int, bool)


def _scalar(value: Any) -> Any:
    """A 1-element tensor (torch takes lr and betas as tensors) as its value."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if type(value) is tuple:
        return tuple(_scalar(v) for v in value)
    return value


def _plain(values: List[Any]) -> bool:
    """Whether every value is a plain number (or a tuple of them): equal ones mean the same to
    the core, and none can change in place."""
    for v in values:
        if type(v) is tuple:
            if not all(type(x) in _PLAIN or x is None for x in v):
                return False
        elif type(v) not in _PLAIN:
            return False
    return True


def _tensor_reason(t: Any, dtypes: FrozenSet[torch.dtype]) -> Optional[str]:
    """Why the kernels cannot update (or read) ``t`` in place, or None. Not being contiguous
    is no reason: such a tensor is read or stepped through a contiguous copy."""
    if not isinstance(t, torch.Tensor):
        return f"is a {type(t).__name__}, not a torch.Tensor"
    if t.layout is not _STRIDED:
        return f"has layout {t.layout}"
    if t.device.type != "cpu":
        return f"is on {t.device}"
    if t.dtype not in dtypes:
        if t.dtype is _BF16 and _lowbits.BFLOAT16 is None:
            return "has dtype torch.bfloat16 (the kernels take it with ml_dtypes installed)"
        return f"has dtype {t.dtype}"
    if t.is_conj() or t.is_neg():
        return "has a lazy conjugate/negative bit"
    return None


def _np(t: torch.Tensor) -> np.ndarray:
    """A NumPy view sharing ``t``'s memory (never a copy); a 0-d tensor's as one element, the
    shape the kernels take for it."""
    t = t.detach()
    a = t.view(torch.int16).numpy().view(_lowbits.BFLOAT16) if t.dtype is _BF16 else t.numpy()
    return a.reshape(1) if a.ndim == 0 else a


class _Entry:
    """Cached NumPy views of one parameter and its state tensors, each valid while the tensor
    keeps the layout it had when the view was made (``is_set_to`` a detached alias, and the
    dtype). ``stage``: for a parameter that is not contiguous, the contiguous copy the kernels
    update in its place (copied in before the step, back after it)."""

    __slots__ = (
        "param", "ref", "dtype", "shape", "lo", "hi", "pview", "stage", "sdict", "keys",
        "tensors", "tlive", "trefs", "views", "steps", "cviews", "aviews", "mview",
    )  # fmt: skip

    def __init__(self, p: torch.Tensor) -> None:
        self.param = p  # the cache is keyed by id(p): this holds p, so the id stays p's
        self.ref = p.detach()
        self.dtype = p.dtype
        self.shape = tuple(p.shape)  # a gradient's must be the same
        self.stage = None if p.is_contiguous() else p.detach().contiguous()
        self.pview = _np(p if self.stage is None else self.stage)
        self.lo = self.pview.ctypes.data
        self.hi = self.lo + self.pview.nbytes
        self.sdict: Any = None
        self.keys: Any = None  # the list of state keys the views were made for
        self.tensors: Tuple[Any, ...] = ()
        self.tlive: List[Any] = []  # the state tensors (not None) and their aliases
        self.trefs: List[Any] = []
        self.views: Tuple[Any, ...] = ()
        self.steps: Any = None
        self.cviews: Tuple[Any, ...] = ()
        self.aviews: Tuple[Any, ...] = ()  # the int8 states' absmax
        self.mview: Any = None  # the master copy of a 16-bit parameter


class _Keys:
    """What a group's hyperparameters and the optimizer's precision options imply for its
    parameters' state: the arrays kept (``names``), their absmax arrays (``absmax``, int8 state),
    whether 16-bit parameters keep a master copy, the carried numbers, and the state keys whose
    tensors the cached views were made of (``keys``: the arrays, the absmax arrays, the master
    copy, the carried numbers where kept as tensors, the step)."""

    __slots__ = ("names", "absmax", "master", "carried", "keys")

    def __init__(
        self,
        rule: registry.Rule,
        hyper: Dict[str, Any],
        b: "Binding",
        state_dtype: str = "float32",
        master: bool = False,
    ) -> None:
        self.names = [s.name for s in rule.states if s.when is None or hyper[s.when]]
        self.absmax = [n + _ABSMAX for n in self.names] if state_dtype == "int8" else []
        self.master = master
        self.carried = rule.carried_names
        self.keys = (
            self.names
            + self.absmax
            + ([_MASTER] if master else [])
            + (list(self.carried) if b.torch_cls is not None else [])
            + (["step"] if rule.counts_steps and not b.int_step else [])  # an int: read each step
        )


class _Plan:
    """One group's update, checked by the core but not run, and what to write back after."""

    __slots__ = ("call", "params", "entries", "lists", "steps", "rule")

    def __init__(self, call, params, entries, lists, steps, rule) -> None:
        self.call, self.params, self.entries = call, params, entries
        self.lists, self.steps, self.rule = lists, steps, rule


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


class _Refused(Exception):
    """A group the kernels cannot serve: the reason, and the error a class without a torch
    implementation raises for it."""

    def __init__(self, error: type, message: str) -> None:
        super().__init__(message)
        self.error = error


def _block(shapes: List[Tuple[torch.dtype, Tuple[int, ...]]], start: float) -> List[torch.Tensor]:
    """New state tensors of these dtypes and shapes, filled with ``start``: those of each dtype
    the kernels take (and int8 state's uint8 codes) as views of one aligned block (the kernels
    then stream a group's state as one array), any other dtype (a group torch's own step runs)
    as tensors of their own."""
    out: List[Any] = [None] * len(shapes)
    for dtype in dict.fromkeys(d for d, _ in shapes):
        mine = [i for i, (d, _) in enumerate(shapes) if d == dtype]
        if dtype in _KERNEL_DTYPES or dtype is torch.uint8:
            np_dtype = np.dtype(np.uint8) if dtype is torch.uint8 else _NUMPY_OF[dtype]
            block = FlatParams.filled([shapes[i][1] for i in mine], start, np_dtype)
            for i, view in zip(mine, block):
                out[i] = (
                    torch.from_numpy(view.view(np.int16)).view(_BF16)
                    if dtype is _BF16
                    else torch.from_numpy(view)
                )
        else:
            for i in mine:
                out[i] = torch.full(shapes[i][1], start, dtype=dtype)
    return out


def _unhooked_step(cls: type) -> Callable:
    """torch's step of ``cls`` without the wrapper that runs the step hooks (optkern's own step
    already ran them): the function under ``profile_hook_step``."""
    fn = cls.step
    if getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__"):
        return fn.__wrapped__
    return fn


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


# -- the base class --------------------------------------------------------------------------------


class _OktOptimizer(torch.optim.Optimizer):
    _binding: Binding

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        bound = self.__signature__.bind(params, *args, **kwargs)  # TypeError as torch's would be
        bound.apply_defaults()
        given = dict(bound.arguments)
        params = given.pop("params")
        b = self._binding
        # optkern's precision options (keyword-only, for the whole optimizer, as optkern's own
        # classes take them): checked first, never passed to torch
        precision = [given.pop(name) for name, _, _ in registry.PRECISION_ARGS]
        self.state_dtype, self.stochastic_rounding, self.master_weights = _lowbits.check_precision(
            b.rule, *precision
        )
        self._okt_reset()
        if b.torch_cls is not None:
            # torch's own constructor: its checks in its order with its messages (hyperparameters
            # before parameters), its param groups, defaults and the state it makes (Adagrad)
            theirs = set(inspect.signature(b.torch_cls).parameters)
            fixed = {k: v for k, v in b.fixed.items() if k in theirs}
            made = b.torch_cls(params, **given, **fixed)
            self.__dict__.update(made.__dict__)
            self._patch_step_function()
            self._okt_shadow = made
            for gi, group in enumerate(self.param_groups):
                self._check_state_dtype(group, gi)
            return
        if given.get("fused") and given.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        for flag in ("differentiable", "capturable"):
            if given.get(flag):
                raise ValueError(
                    f"optkern.torch.{type(self).__name__} does not support {flag}=True: its "
                    "step runs in C++ outside autograd and CUDA graphs, and torch.optim has no "
                    f"{type(self).__name__} to run instead"
                )
        self._okt_validate(given)  # before the parameters, as torch's classes check theirs
        super().__init__(params, {**given, **b.fixed})

    def _check_state_dtype(self, group: Dict[str, Any], gi: int) -> None:
        """TypeError for a float64 parameter under a state_dtype other than float32 (its state
        is float64), as optkern's own classes refuse it."""
        if self.state_dtype == "float32":
            return
        for i, p in enumerate(group["params"]):
            if isinstance(p, torch.Tensor) and p.dtype is torch.float64:
                raise TypeError(
                    f"{self._label(group, gi, i)} is float64, whose state is float64; "
                    f"state_dtype={self.state_dtype!r} applies to float32, float16 and bfloat16 "
                    "parameters"
                )

    def _precise(self) -> bool:
        """Whether a precision option is not its default (torch's own step has none of them)."""
        return self.state_dtype != "float32" or self.stochastic_rounding or self.master_weights

    def _storage(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of parameter ``p``'s state tensors: float64 for a float64 parameter, else
        the state_dtype's (float32 by default, for 16-bit parameters too)."""
        if p.dtype is torch.float64:
            return p.dtype
        return _STATE_TORCH[self.state_dtype]

    def _okt_reset(self) -> None:
        """The caches, made empty (at construction and whenever the state is replaced)."""
        #: id(parameter) -> its cached views (see _plan_group); keyed by id because hashing a
        #: tensor is a Python call (torch.Tensor.__hash__), the entry holds the parameter
        self._okt_cache: Dict[int, _Entry] = {}
        #: id(group) -> (group, rule, hyperparameter names and values, the core's validated dict
        #: of them, the group's _Keys)
        self._okt_checked: Dict[int, Tuple[Any, ...]] = {}
        #: [runs of the kernels]: advanced by the core right after them, so a step that is
        #: interrupted after its kernels ran still completes its bookkeeping (see _update);
        #: also the step count that keys stochastic rounding's noise (kept when the state is
        #: replaced: load_state_dict sets it from the dict)
        self._okt_runs = self.__dict__.get("_okt_runs") or [0]
        self._okt_warned: set = set()

    def _okt_validate(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """A group's hyperparameters as the kernels take them (in the core's names), checked by
        the core: TypeError or ValueError naming the argument."""
        rule = self._binding.rule_for(group)
        values = {k: _scalar(v) for k, v in group.items() if k != "params"}
        core = rule.to_core(values)
        core["maximize"] = as_flag(values.get("maximize", False))
        return _core.validate(rule.name, core)

    def _okt_torch(self) -> torch.optim.Optimizer:
        """The instance of the torch class that runs the groups the kernels cannot serve (made
        when first needed after unpickling); its state and groups are pointed at this
        optimizer's before each use."""
        shadow = self.__dict__.get("_okt_shadow")
        if shadow is None:
            with _environment_kept(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shadow = self._binding.torch_cls([torch.zeros(1, requires_grad=True)])
            self._okt_shadow = shadow
        return shadow

    # torch's Optimizer calls this for every group, the constructor's included
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if "state_dtype" in self.__dict__:  # (torch's constructor adds the first groups)
                self._check_state_dtype(group, len(self.param_groups) - 1)
            if self._binding.torch_cls is None:  # torch checks a new group's hyperparameters
                self._okt_validate(group)  # no further; a step may
        except Exception:
            self.param_groups.pop()
            raise

    @staticmethod
    def _label(group: Dict[str, Any], gi: int, i: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return f"parameter {names[i]!r} (param group {gi}, index {i})"
        return f"parameter {i} of param group {gi}"

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        for name, _, _ in registry.PRECISION_ARGS:
            state[name] = getattr(self, name)
        state["_okt_runs"] = list(self._okt_runs)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, _, default in registry.PRECISION_ARGS:  # a pickle from before they existed
            self.__dict__.setdefault(name, default)
        self._okt_reset()
        self.__dict__.pop("_okt_shadow", None)
        b = self._binding
        if b.torch_cls is not None:
            # torch's class normalizes what it loads (group entries of older versions, a step
            # saved as a number): let it do so on these very groups and state dicts
            self._okt_torch().__setstate__({"state": self.state, "param_groups": self.param_groups})
            return
        for group in self.param_groups:
            for name, default in b.args + b.kwonly:
                group.setdefault(name, default)
            group.update(b.fixed)
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    self._normalize_state(st)

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict; with stochastic rounding also ``step_count`` (the steps taken,
        which key the noise; torch ignores the entry), as optkern's own classes write it."""
        sd = super().state_dict()
        if self.stochastic_rounding:
            sd["step_count"] = self._okt_runs[0]
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's load, except that state in optkern's precision forms keeps its dtype where
        torch would cast it to the parameter's (int8 codes and their absmax, master copies, and
        every state of a 16-bit parameter or under a state_dtype): the next step converts what
        is not in this optimizer's form, explicitly (see ``_convert_state``)."""
        count = state_dict.get("step_count") if isinstance(state_dict, dict) else None
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0
        ):  # checked before anything is loaded
            raise ValueError(f"step_count must be an int >= 0, got {count!r}")
        kept = self._kept_forms(state_dict)
        super().load_state_dict(state_dict)
        for p, key, value in kept:
            st = self.state.get(p)
            if st is not None and key in st:
                st[key] = value.to(device=p.device)
        if self.stochastic_rounding:
            if count is None:  # torch's dict: the parameters' own step counts tell it
                steps = [st["step"] for st in self.state.values() if "step" in st]
                count = max((int(s) for s in steps), default=0)
            self._okt_runs[0] = int(count)

    def _kept_forms(self, sd: Any) -> List[Tuple[torch.Tensor, Any, torch.Tensor]]:
        """(parameter, key, tensor) of the loaded state whose dtype torch's load would change
        but optkern's forms keep; nothing for a dict torch's load refuses anyway."""
        try:
            ids = [i for g in sd["param_groups"] for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            saved = sd["state"]
        except (KeyError, TypeError):
            return []
        if len(ids) != len(params) or not isinstance(saved, dict):
            return []
        kept = []
        for i, p in zip(ids, params):
            entry = saved.get(i)
            if not isinstance(entry, dict) or not isinstance(p, torch.Tensor):
                continue
            ours = p.dtype in _HALF or self.state_dtype != "float32"
            for key, value in entry.items():
                if not isinstance(value, torch.Tensor) or key == "step":
                    continue
                if (
                    value.dtype is torch.uint8
                    or key == _MASTER
                    or (isinstance(key, str) and key.endswith(_ABSMAX))
                    or (ours and value.is_floating_point())
                ):
                    kept.append((p, key, value))
        return kept

    def _normalize_state(self, st: Dict[str, Any]) -> None:
        """Loaded state of a class without a torch counterpart: the step a 0-d tensor, carried
        numbers Python floats (in double), an absent buffer (None) dropped."""
        rule = self._binding.rule
        for key in list(st):
            v = st[key]
            if key == "step" and rule.counts_steps and not isinstance(v, torch.Tensor):
                st[key] = torch.tensor(float(v), dtype=_get_scalar_dtype())
            elif key in rule.carried_names:
                st[key] = float(v)
            elif v is None:
                del st[key]

    # -- state a parameter lacks ----------------------------------------------------------------

    def _init_state(
        self, p: torch.Tensor, group: Dict[str, Any], rule: registry.Rule, core: Dict[str, Any]
    ) -> Dict[str, Any]:
        """A new state dict for ``p``, in torch's layout: the step count, every array the rule
        keeps under these hyperparameters (each at its start value, shaped as declared) and the
        carried numbers. Arrays of the group are made later, in one block per name."""
        st: Dict[str, Any] = {}
        if rule.counts_steps:
            st["step"] = 0 if self._binding.int_step else torch.tensor(0.0, dtype=_get_scalar_dtype())
        as_tensor = self._binding.torch_cls is not None
        for name, start in rule.carried_spec(core).items():
            st[name] = torch.tensor(start, dtype=_get_scalar_dtype()) if as_tensor else start
        return st

    def _start(self, group: Dict[str, Any], name: str, core: Dict[str, Any]) -> float:
        """The value state ``name`` starts at: its hyperparameter's, from the constructor's
        arguments for a rule whose torch class makes the state there (Adagrad), as torch does,
        else from the group's (torch's Rprop)."""
        s = self._binding.rule.state(name)
        if s.init is None:
            return 0.0
        if self._binding.eager:
            return float(self._okt_validate(self.defaults)[s.init])
        return float(core[s.init])

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
        taken back if the step does not happen); then the groups the kernels cannot serve, by
        torch's implementation; then one run of every other group's kernels and the
        bookkeeping. A step the kernels refuse changes nothing."""
        undo: List[Tuple[Any, Any, Any]] = []
        plans: List[_Plan] = []
        refused: List[Tuple[int, Dict[str, Any], _Refused]] = []
        try:
            for gi, group in enumerate(self.param_groups):
                mark = len(undo)
                try:
                    plan = self._plan_group(gi, group, undo)
                except _Refused as why:
                    self._undo(undo[mark:])
                    del undo[mark:]
                    refused.append((gi, group, why))
                    continue
                if plan is not None:
                    plans.append(plan)
            if refused:
                self._torch_step(refused)
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

    def _torch_step(self, refused: List[Tuple[int, Dict[str, Any], _Refused]]) -> None:
        """The groups the kernels cannot serve, stepped by torch's own implementation on this
        optimizer's state (torch's layout); a class torch lacks raises instead."""
        b = self._binding
        if b.torch_cls is None or self._precise():
            gi, _, why = refused[0]
            options = ", ".join(
                f"{n}={getattr(self, n)!r}"
                for n, _, d in registry.PRECISION_ARGS
                if getattr(self, n) != d
            )
            raise why.error(
                f"optkern.torch.{type(self).__name__} cannot step param group {gi}: {why}"
                + (
                    f" (torch.optim.{b.torch_name}'s own implementation, which runs what the "
                    f"kernels cannot, has no {options})"
                    if b.torch_cls is not None
                    else ""
                )
            )
        for gi, _, why in refused:
            key = str(why)
            if key not in self._okt_warned:
                self._okt_warned.add(key)
                warnings.warn(
                    f"optkern.torch.{type(self).__name__}: param group {gi} runs "
                    f"torch.optim.{b.torch_name}'s own implementation ({why}); its results and "
                    "state are torch's",
                    TorchFallbackWarning,
                    stacklevel=5,
                )
        shadow = self._okt_torch()
        shadow.defaults = self.defaults
        shadow.state = self.state
        shadow.param_groups = [group for _, group, _ in refused]
        for attr in ("grad_scale", "found_inf"):  # set on the optimizer by torch's GradScaler
            if attr in self.__dict__:
                setattr(shadow, attr, self.__dict__[attr])
        _unhooked_step(type(shadow))(shadow)

    def _undo(self, undo: List[Tuple[Any, Any, Any]]) -> None:
        for where, key, old in reversed(undo):
            if old is _MISSING:
                where.pop(key, None)
            else:
                where[key] = old

    def _set(self, undo: list, where: Any, key: Any, value: Any) -> None:
        undo.append((where, key, where[key] if key in where else _MISSING))
        where[key] = value

    def _refuse(self, error: type, message: str) -> None:
        raise _Refused(error, message)

    def _plan_group(self, gi: int, group: Dict[str, Any], undo: list) -> Optional[_Plan]:
        """The kernels' update of one group, checked by the core but not run; None if no
        parameter has a gradient. Raises _Refused when the kernels cannot serve the group."""
        b = self._binding
        for flag in ("differentiable", "capturable"):
            if group.get(flag):
                self._refuse(
                    ValueError, f"{flag}=True: the kernels run outside autograd and CUDA graphs"
                )
        rule, hyper, ks = self._hyper(group)
        names, cnames, keys = ks.names, ks.carried, ks.keys
        if self.state_dtype != "float32":
            self._check_state_dtype(group, gi)  # a parameter cast to float64 since
        tensor_carried = b.torch_cls is not None
        params: List[torch.Tensor] = []
        pviews: List[np.ndarray] = []
        gviews: List[np.ndarray] = []
        entries: List[_Entry] = []
        new: List[Tuple[int, torch.Tensor, _Entry]] = []  # whose state or views are (re)made
        reshaped: Dict[int, Tuple[int, ...]] = {}  # position -> rows view (a sparse gradient's)
        rows_shape: Optional[Tuple[int, ...]] = None
        state = self.state
        cache = self._okt_cache
        dtypes = b.dtypes
        # The hot loop: a cached entry is reused while the parameter, its state dict and its
        # state tensors are the very objects, with the layouts, the views were made of.
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            e = cache.get(id(p))
            try:
                fresh = e is None or e.param is not p or not _IS_SET_TO(p, e.ref)
                fresh = fresh or p.dtype is not e.dtype
            except Exception:  # no storage (meta, sparse): the reason below says what it is
                fresh = True
            if fresh:
                why = _tensor_reason(p, dtypes)
                if why:
                    self._refuse(TypeError, f"{self._label(group, gi, i)} {why}")
                e = cache[id(p)] = _Entry(p)
            # The gradient's view is made at every step and held only during the call:
            # zero_grad() must free the gradient, as with torch.optim.
            if g.layout is _COO:  # nn.Embedding(sparse=True) and the like
                gv, rows_shape = self._row_grad(g, p, rule, group, gi, i, hyper)
                if rows_shape is not None:  # sparse in more than its first dimension
                    reshaped[len(pviews)] = rows_shape
            else:
                if b.sparse_only:
                    self._refuse(
                        RuntimeError,
                        f"the gradient of {self._label(group, gi, i)} is dense, which "
                        f"torch.optim.{b.torch_name} refuses",
                    )
                try:  # any dtype the kernels take, whatever its parameter's
                    gv = g.numpy() if g.dtype is not _BF16 else _np(g)
                except Exception:
                    gv = self._grad_view(g, group, gi, i)
                if gv.shape != e.shape or gv.dtype not in _NUMPY_KERNEL:
                    gv = self._grad_view(g, group, gi, i, e)
                if not gv.flags.c_contiguous:
                    gv = np.ascontiguousarray(gv)  # read through a contiguous copy
                elif not gv.ndim:
                    gv = gv.reshape(1)
            if e.stage is not None:
                e.stage.copy_(p)  # the kernels step the copy; it is written back after them
            if keys:
                st = state.get(p)
                if not st:
                    if p not in state:
                        undo.append((state, p, _MISSING))
                    st = self._init_state(p, group, rule, hyper)
                    state[p] = st
                    new.append((i, p, e))
                    e.sdict = None
                elif not (
                    st is e.sdict
                    and (e.keys is keys or e.keys == keys)
                    and all(map(is_, map(st.get, keys), e.tensors))
                    and all(map(_IS_SET_TO, e.tlive, e.trefs))
                ):
                    new.append((i, p, e))
                    e.sdict = None
            params.append(p)
            pviews.append(e.pview if rows_shape is None else e.pview.reshape(rows_shape))
            gviews.append(gv)
            entries.append(e)
            rows_shape = None
        if not params:
            return None
        fresh_names = self._complete_state(new, group, gi, rule, hyper, ks, undo) if new else ()
        lists = {n: [e.views[k] for e in entries] for k, n in enumerate(names)}
        for k, n in enumerate(ks.absmax):  # int8 state: each array's absmax beside it
            lists[n] = [e.aviews[k] for e in entries]
        if ks.master and any(e.mview is not None for e in entries):
            lists[_MASTER] = [e.mview for e in entries]
        for k, shape in reshaped.items():  # their states viewed as the parameter is
            for n in names:
                if lists[n][k] is not None:
                    lists[n][k] = lists[n][k].reshape(shape)
        for k, n in enumerate(cnames):
            if tensor_carried:  # read from their 0-d tensors, as torch keeps them
                lists[n] = [float(e.cviews[k]) for e in entries]
            else:  # kept as Python floats in the state
                lists[n] = [e.sdict[n] for e in entries]
        if rule.counts_steps:
            steps: Any = [int(e.steps) + 1 for e in entries]
        elif fresh_names:  # a buffer the first update makes (SGD's): step 1 tells the kernel
            steps = [1 if id(e) in fresh_names else 2 for e in entries]
        else:
            steps = None
        states = {s.name: lists.get(s.name) for s in rule.states}
        states.update((n, lists[n]) for n in cnames)
        states.update((n, lists[n]) for n in ks.absmax)
        if _MASTER in lists:
            states[_MASTER] = lists[_MASTER]
        idx = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        positions = seed = None
        if self.stochastic_rounding:
            # the noise is keyed by the step (the optimizer's count of steps, as optkern's own
            # classes key it) and each parameter's index in the optimizer (group order)
            base = sum(len(g["params"]) for g in self.param_groups[:gi])
            positions, seed = [base + i for i in idx], self._okt_runs[0] + 1
        try:
            call = self._prepare(rule, pviews, gviews, states, hyper, steps, entries, positions, seed)
        except (TypeError, ValueError) as err:  # say which tensors the indices name
            shown = enumerate(idx) if positions is None else zip(positions, idx)
            where = "; ".join(f"[{k}] = {self._label(group, gi, i)}" for k, i in shown)
            counted = (
                "its parameters that have a gradient"
                if positions is None
                else "the optimizer's parameters"
            )
            self._refuse(
                type(err),
                f"{err} (param group {gi}; the indices count {counted}: {where})",
            )
        return _Plan(call, params, entries, lists, steps if rule.counts_steps else None, rule)

    def _row_grad(
        self,
        g: torch.Tensor,
        p: torch.Tensor,
        rule: registry.Rule,
        group: Dict[str, Any],
        gi: int,
        i: int,
        hyper: Dict[str, Any],
    ) -> Tuple[RowSparse, Optional[Tuple[int, ...]]]:
        """A sparse COO gradient as an optkern.RowSparse (its indices and values, no copy where
        they are contiguous), and the shape to view the parameter and its states as when it is
        sparse in more than its first dimension (rows of the flattened sparse dimensions).
        Refuses the group where the rule takes no sparse gradient, or not under these
        hyperparameters (torch's step then raises torch's error, or runs it), or where the
        kernels take no such rows (a float64 gradient: the row values are float32)."""
        label = f"the gradient of {self._label(group, gi, i)}"
        rows = rule.rows
        if rows is None or not rows.accepted:
            self._refuse(
                TypeError,
                f"{label} is sparse, which {rule.cls} does not take (sparse gradients go to "
                + ", ".join(r.cls for r in registry.rules() if r.rows and r.rows.accepted)
                + ")",
            )
        if rows.refused_when is not None and hyper[rows.refused_when]:
            self._refuse(
                ValueError,
                f"{label} is sparse, which {rule.cls} refuses when {rows.refused_when} != 0",
            )
        if (
            g.device.type != "cpu"
            or g.dtype is not torch.float32
            or p.dtype
            not in (
                torch.float32,
                torch.float64,
            )
        ):
            self._refuse(
                TypeError,
                f"{label} is a sparse {g.dtype} tensor on {g.device}: the kernels take float32 rows",
            )
        if tuple(g.shape) != tuple(p.shape) or p.dim() == 0:
            raise ValueError(f"{label} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")
        sd = g.sparse_dim()
        ind, vals = g._indices(), g._values().detach()
        if ind.numel():  # torch checks no sparse tensor's indices by default: its step would
            # read and write outside the parameter, so this is refused, not handed to it
            bad = (ind < 0) | (ind >= torch.tensor(p.shape[:sd]).unsqueeze(1))
            if bad.any():
                d, k = (int(x) for x in bad.nonzero()[0])
                raise ValueError(
                    f"{label} lists index {int(ind[d, k])} in dimension {d} (entry {k}), outside "
                    f"[0, {p.shape[d]})"
                )
        if sd == 1:
            idx, shape = ind[0], None
        else:  # row-major position within the sparse dimensions
            idx = ind[0].clone()
            for d in range(1, sd):
                idx.mul_(p.shape[d]).add_(ind[d])
            shape = (math.prod(p.shape[:sd]), *p.shape[sd:])
            vals = vals.reshape(vals.shape[0], *p.shape[sd:])
        if not vals.is_contiguous():
            vals = vals.contiguous()
        return RowSparse(idx.contiguous().numpy(), vals.numpy()), shape

    def _grad_view(
        self, g: torch.Tensor, group: Dict[str, Any], gi: int, i: int, e: Optional[_Entry] = None
    ) -> np.ndarray:
        """The NumPy view of a gradient that ``g.numpy()`` did not give as the kernels take it:
        one that requires grad (a view of it, detached), or a refusal naming what it is."""
        label = f"the gradient of {self._label(group, gi, i)}"
        p = group["params"][i]
        why = _tensor_reason(g, _KERNEL_DTYPES)
        if why:
            self._refuse(TypeError, f"{label} {why}")
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"{label} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")
        return _np(g)

    def _complete_state(
        self,
        new: List[Tuple[int, torch.Tensor, _Entry]],
        group: Dict[str, Any],
        gi: int,
        rule: registry.Rule,
        hyper: Dict[str, Any],
        ks: _Keys,
        undo: list,
    ) -> set:
        """The state the listed parameters lack made (arrays of one name in one block, so a
        group's state streams as one), state loaded in another layout converted once (to
        contiguous tensors of the state's dtype: the parameter's, or the state_dtype's for
        16-bit parameters and under a state_dtype; int8 codes with their absmax dequantised, or
        values quantised, as the optimizer keeps them), and their cached views made again.
        Returns the ids of the entries whose buffer their first update makes (SGD's)."""
        first = registry.first_update_states(rule)
        made_first = set()
        names = ks.names
        missing: Dict[str, List[Tuple[torch.Tensor, _Entry, Tuple[int, ...]]]] = {}
        masters: List[torch.Tensor] = []
        for i, p, e in new:
            st = self.state[p]
            label = self._label(group, gi, i)
            target = self._storage(p)
            # torch's own layout (state in the parameter's dtype) or optkern's precision forms
            torch_layout = self.state_dtype == "float32" and p.dtype not in _HALF
            for n in names:
                shape = rule.state(n).shape_for(tuple(p.shape))
                t = st.get(n)
                if shape is None:  # this parameter keeps no such state (Adafactor's variance)
                    if t is not None:
                        raise ValueError(
                            f"state {n!r} of {label}: a parameter of shape {tuple(p.shape)} "
                            f"keeps none (a {rule.state(n).shape} state)"
                        )
                    continue
                if t is None:
                    missing.setdefault(n, []).append((p, e, shape))
                    if n in first:
                        made_first.add(id(e))
                    continue
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"state {n!r} of {label} is a {type(t).__name__}, not a tensor")
                if tuple(t.shape) != shape:
                    raise ValueError(
                        f"state {n!r} of {label} has shape {tuple(t.shape)}, the "
                        f"parameter {tuple(p.shape)}"
                        + ("" if shape == tuple(p.shape) else f", which needs {shape}")
                    )
                if torch_layout and t.dtype is not torch.uint8 and n + _ABSMAX not in st:
                    if t.dtype != p.dtype and self._binding.torch_cls is not None:
                        # a parameter cast after its state was made (torch's load casts the
                        # state it loads): torch's step keeps the state's dtype, or refuses
                        self._refuse(
                            TypeError,
                            f"state {n!r} of {label} has dtype {t.dtype}, the parameter {p.dtype}",
                        )
                    if (
                        _tensor_reason(t, self._binding.dtypes)
                        or t.dtype != p.dtype
                        or not t.is_contiguous()
                    ):
                        converted = t.detach().to(device="cpu", dtype=p.dtype).contiguous()
                        self._set(undo, st, n, converted)
                else:
                    self._convert_state(st, n, t, target, rule, label, undo)
            if ks.master and p.dtype in _HALF:
                m = st.get(_MASTER)
                if m is None:
                    masters.append(p)
                elif not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(p.shape):
                    what = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                    raise ValueError(
                        f"state {_MASTER!r} of {label} is {what}, not shaped as its parameter "
                        f"{tuple(p.shape)}"
                    )
                elif m.dtype is not torch.float32 or not m.is_contiguous() or m.device.type != "cpu":
                    self._set(undo, st, _MASTER, m.detach().to("cpu", torch.float32).contiguous())
            elif _MASTER in st:  # a copy this parameter does not use (as optkern's classes drop it)
                self._pop(undo, st, _MASTER)
            for key in ("step",) if rule.counts_steps else ():
                s = st.get(key)
                if self._binding.int_step:  # a Python int, as torch's SparseAdam keeps it
                    if type(s) is not int:
                        self._set(undo, st, key, int(s or 0))
                elif not (isinstance(s, torch.Tensor) and s.dim() == 0 and s.device.type == "cpu"):
                    value = 0.0 if s is None else float(s)
                    self._set(undo, st, key, torch.tensor(value, dtype=_get_scalar_dtype()))
            for c in rule.carried:
                v = st.get(c.name)
                if v is None:
                    v = rule.carried_spec(hyper)[c.name]
                if self._binding.torch_cls is None:
                    if not isinstance(v, float):
                        self._set(undo, st, c.name, float(v))
                elif not (isinstance(v, torch.Tensor) and v.dim() == 0 and v.device.type == "cpu"):
                    self._set(undo, st, c.name, torch.tensor(float(v), dtype=_get_scalar_dtype()))
        for n, where in missing.items():
            start = self._start(group, n, hyper)
            tensors = _block([(self._storage(p), shape) for p, _, shape in where], start)
            int8 = [(p, t) for (p, _, _), t in zip(where, tensors) if t.dtype is torch.uint8]
            if int8:  # the codes of the start value, and a block of their absmax arrays
                absmax = _block([(torch.float32, (_lowbits.blocks(t.numel()),)) for _, t in int8], 0)
                nonneg = rule.state(n).nonnegative
                for (p, t), a in zip(int8, absmax):
                    codes, scale = _lowbits.quantize(
                        np.full(tuple(t.shape), start, np.float32), nonneg
                    )
                    t.numpy()[...] = codes
                    a.numpy()[...] = scale
                    self._set(undo, self.state[p], n + _ABSMAX, a)
            for (p, _, _), t in zip(where, tensors):
                self._set(undo, self.state[p], n, t)
        if masters:  # float32 copies of the 16-bit parameters, in one block
            copies = _block([(torch.float32, tuple(p.shape)) for p in masters], 0)
            for p, m in zip(masters, copies):
                m.copy_(p.detach())
                self._set(undo, self.state[p], _MASTER, m)
        for _, p, e in new:
            self._refresh_entry(p, e, rule, ks)
        return made_first

    def _convert_state(
        self,
        st: Dict[str, Any],
        n: str,
        t: torch.Tensor,
        target: torch.dtype,
        rule: registry.Rule,
        label: str,
        undo: list,
    ) -> None:
        """State ``n`` (tensor ``t``, shaped right) brought to the optimizer's form, as optkern's
        own classes convert a loaded state: int8 codes (uint8, with their ``<n>_absmax``)
        dequantised for a float state, float values quantised for int8 state, float values of
        another dtype converted (bfloat16 and float16 into float32 exactly; float32 into
        bfloat16 rounded to nearest even)."""
        key = n + _ABSMAX
        nonneg = rule.state(n).nonnegative
        if t.dtype is torch.uint8:  # int8 codes
            a = st.get(key)
            blocks = _lowbits.blocks(t.numel())
            if (
                not isinstance(a, torch.Tensor)
                or tuple(a.shape) != (blocks,)
                or not (a.is_floating_point() and a.device.type == "cpu")
            ):
                what = (
                    f"dtype {a.dtype}, shape {tuple(a.shape)} on {a.device}"
                    if isinstance(a, torch.Tensor)
                    else type(a).__name__
                )
                raise ValueError(
                    f"state {n!r} of {label} holds uint8 codes: {key!r} must be a float32 CPU "
                    f"tensor of one absmax per block of {_lowbits.BLOCK} ({blocks} for "
                    f"{t.numel()} elements), got {what}"
                )
            if target is torch.uint8:
                if not t.is_contiguous():
                    self._set(undo, st, n, t.contiguous())
                if a.dtype is not torch.float32 or not a.is_contiguous():
                    self._set(undo, st, key, a.to(torch.float32).contiguous())
                return
            values = _lowbits.dequantize(_np(t.contiguous()), _np(a.to(torch.float32)), nonneg)
            self._set(undo, st, n, torch.from_numpy(values).to(target).contiguous())
            self._pop(undo, st, key)
            return
        if key in st:  # an absmax without codes: left from another form
            self._pop(undo, st, key)
        if target is torch.uint8:
            values = t.detach().to(device="cpu", dtype=torch.float32).numpy()
            codes, absmax = _lowbits.quantize(values, nonneg)
            self._set(undo, st, n, torch.from_numpy(codes))
            self._set(undo, st, key, torch.from_numpy(absmax))
        elif t.dtype != target or t.device.type != "cpu" or not t.is_contiguous():
            self._set(undo, st, n, t.detach().to(device="cpu", dtype=target).contiguous())

    def _pop(self, undo: list, where: Any, key: Any) -> None:
        undo.append((where, key, where[key]))
        del where[key]

    def _refresh_entry(self, p: torch.Tensor, e: _Entry, rule: registry.Rule, ks: _Keys) -> None:
        st = self.state[p]
        names = ks.names
        e.views = tuple(None if st.get(n) is None else _np(st[n]) for n in names)
        e.aviews = tuple(None if st.get(n) is None else _np(st[n]) for n in ks.absmax)
        e.mview = _np(st[_MASTER]) if ks.master and st.get(_MASTER) is not None else None
        if not rule.counts_steps:
            e.steps = None
        else:
            e.steps = _IntStep(st) if self._binding.int_step else st["step"].numpy()
        e.cviews = (
            tuple(st[n].numpy() for n in rule.carried_names)
            if self._binding.torch_cls is not None
            else ()
        )
        e.sdict = st
        e.keys = ks.keys
        e.tensors = tuple(st.get(k) for k in ks.keys)
        e.tlive = [t for t in e.tensors if t is not None]
        e.trefs = [t.detach() for t in e.tlive]

    def _hyper(self, group: Dict[str, Any]) -> Tuple[registry.Rule, Dict[str, Any], "_Keys"]:
        """The group's rule, its hyperparameters as the core validated them and the state keys
        they imply, checked again only when a value changed (plain numbers are compared; a
        tensor is read every step). Values the kernels do not take refuse the group."""
        rule = self._binding.rule_for(group)
        known = self._okt_checked.get(id(group))
        if known is not None and known[0] is group and known[1] is rule:
            values = [group.get(k) for k in known[2]]
            if all(map(is_, values, known[3])) or (_plain(values) and values == known[3]):
                return rule, known[4], known[5]
        try:
            hyper = self._okt_validate(group)
        except (TypeError, ValueError) as err:
            self._refuse(type(err), f"{err}, which the kernels do not take")
        ks = _Keys(rule, hyper, self._binding, self.state_dtype, self.master_weights)
        keys = tuple(dict.fromkeys([h.torch for h in rule.hyper] + ["maximize"]))
        values = [group.get(k) for k in keys]
        if _plain(values):  # checked: remember them (a tensor may change in place)
            self._okt_checked[id(group)] = (group, rule, keys, values, hyper, ks)
        return rule, hyper, ks

    def _prepare(
        self,
        rule: registry.Rule,
        pviews: List[np.ndarray],
        gviews: List[np.ndarray],
        states: Dict[str, Any],
        hyper: Dict[str, Any],
        steps: Any,
        entries: List[_Entry],
        positions: Optional[List[int]] = None,
        noise_seed: Optional[int] = None,
    ) -> Any:
        """The group's update, checked by the core (arrays, step counts, hyperparameters, the
        per-step scalars) but not run. A gradient that shares memory with its parameter (torch
        allows ``p.grad = p.data``) is read from a copy: the kernels never read memory they
        write."""
        extra = {} if noise_seed is None else {"positions": positions, "noise_seed": noise_seed}
        try:
            return _core.prepare(
                rule.name, pviews, gviews, states, hyper, steps=steps, grad_scale=1.0, **extra
            )
        except ValueError:
            shared = [
                k
                for k, (e, g) in enumerate(zip(entries, gviews))
                if isinstance(g, np.ndarray)
                and g.ctypes.data < e.hi
                and e.lo < g.ctypes.data + g.nbytes
            ]
            if not shared:
                raise
            for k in shared:
                gviews[k] = gviews[k].copy()
            return _core.prepare(
                rule.name, pviews, gviews, states, hyper, steps=steps, grad_scale=1.0, **extra
            )

    def _write_back(self, pl: _Plan) -> None:
        """A group's bookkeeping after its kernels ran: step counts and carried numbers into
        their tensors (or floats), staged parameters copied back (each write idempotent)."""
        if pl.steps is not None:
            for e, s in zip(pl.entries, pl.steps):
                e.steps[()] = s
        for k, n in enumerate(pl.rule.carried_names):
            if self._binding.torch_cls is not None:  # written back as torch keeps them
                for e, v in zip(pl.entries, pl.lists[n]):
                    e.cviews[k][()] = v
            else:
                for e, v in zip(pl.entries, pl.lists[n]):
                    e.sdict[n] = v
        for p, e in zip(pl.params, pl.entries):
            if e.stage is not None:
                p.copy_(e.stage)
        increment_version(pl.params)  # autograd sees the in-place update, as with torch.optim


# -- Schedule-Free's train()/eval() ---------------------------------------------------------------


class _ScheduleFreeSwitch(ScheduleFreeSwitch):
    """``train()`` / ``eval()`` as the schedulefree package's classes: the parameter holds y
    (where the gradient is taken) in train mode and x (the average, to evaluate and save) in
    eval mode; each switch is one in-place lerp towards ``state["z"]``, every parameter checked
    before any moves (:mod:`optkern.schedule_free`, the same switch as optkern's NumPy classes).
    The mode is each group's ``train_mode`` (a bool), saved with the group; a step in eval mode
    raises RuntimeError before anything runs or changes. Unlike the package, a new group starts
    in train mode (in the first group's mode, once there is one), as in optkern's NumPy classes.

    optkern counts steps per parameter (``step``, ``lr_max``, ``weight_sum`` in each parameter's
    state), the package per group (``k``, ``lr_max``, ``weight_sum`` in the group); they agree
    while every parameter has a gradient at every step. ``state_dict()`` also writes the group
    counters where the group's parameters agree on them, so the package loads it;
    ``load_state_dict`` takes the package's layout too (each parameter with a ``z`` gets the
    group's counters)."""

    _GROUP_COUNTERS = ("k", "lr_max", "weight_sum", "scheduled_lr")

    def _sf_beta(self, group: Dict[str, Any]) -> float:
        values = dict(group, lr=0.0)  # the lr is not what the switch uses
        return self._okt_validate(values)[self._binding.switch]  # type: ignore[attr-defined]

    def _sf_pair(
        self, group: Dict[str, Any], gi: int, i: int, p: torch.Tensor
    ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        st = self.state.get(p)  # type: ignore[attr-defined]
        if not st or "z" not in st or float(st.get("step", 0)) <= 0:
            return None  # not stepped yet: y = x = z
        label = self._label(group, gi, i)  # type: ignore[attr-defined]
        why = _tensor_reason(p, self._binding.dtypes)  # type: ignore[attr-defined]
        if why:
            raise TypeError(f"optkern.torch.{type(self).__name__} cannot move {label}: it {why}")
        z = st["z"]
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != tuple(p.shape):
            what = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"the state 'z' of {label} is {what}, not shaped as its parameter")
        if _tensor_reason(z, self._binding.dtypes) or z.dtype != p.dtype:  # type: ignore[attr-defined]
            # a loaded z in another dtype or device: read from a copy (the kernels convert it
            # the same way at the next step)
            z = z.detach().to(device="cpu", dtype=p.dtype)
        if not p.is_contiguous():  # moved through a contiguous copy, written back after
            stage = p.detach().contiguous()
            self._okt_sf_staged.append((p, stage))
            return _np(stage), _np(z.contiguous())
        return _np(p), _np(z.contiguous())

    def _switch(self, to_train: bool) -> None:
        self._okt_sf_staged: List[Tuple[torch.Tensor, torch.Tensor]] = []
        try:
            super()._switch(to_train)
        finally:
            self._okt_sf_staged = []

    def _sf_moved(self, params: List[Any]) -> None:
        with torch.no_grad():
            for p, stage in self._okt_sf_staged:
                p.copy_(stage)
        increment_version(params)

    def _before_step(self) -> None:
        self._sf_refuse_eval_step()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if isinstance(state_dict, dict):
            self._sf_check_loaded_modes(state_dict.get("param_groups"))
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
                    st["step"] = torch.tensor(float(k), dtype=_get_scalar_dtype())
                    st["lr_max"], st["weight_sum"] = float(lr_max), float(weight_sum)
        self._okt_cache = {}

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


# -- the classes -----------------------------------------------------------------------------------


def _make(b: Binding) -> type:
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    params += [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in b.args
    ]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in b.kwonly]
    params += [  # optkern's precision options, after torch's arguments
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
        for n, _, d in registry.PRECISION_ARGS
    ]
    bases = (_ScheduleFreeSwitch, _OktOptimizer) if b.switch else (_OktOptimizer,)
    return type(
        b.name,
        bases,
        {
            "_binding": b,
            "__signature__": inspect.Signature(params[1:]),
            "__doc__": _doc(b),
            "__module__": __name__,
            "__qualname__": b.name,
        },
    )


def _doc(b: Binding) -> str:
    import optkern

    if b.torch_cls is not None:
        same = (
            f"Same arguments, defaults, checks, state and state_dict layout as "
            f"torch.optim.{b.torch_name}, whose own implementation runs a param group the "
            "kernels cannot serve"
        )
    elif b.switch:
        same = (
            "Same arguments and defaults as the schedulefree package's class, and its "
            "train()/eval() switch (see below); state_dict in torch's layout"
        )
    else:
        same = "No torch counterpart; state_dict in torch's layout"
    doc = (
        f"{b.name} on CPU torch tensors, stepped in place by optkern's kernels.\n\n"
        f"{same}. The update, as optkern.{b.name} computes it:\n\n"
        + (getattr(optkern, b.name).__doc__ or "")
    )
    if b.switch:
        doc += "\n\n" + (_ScheduleFreeSwitch.__doc__ or "")
    return doc


# -- the bindings from the registry ----------------------------------------------------------------

_KWONLY_NO_TORCH = tuple(
    (name, default) for name, _, default in registry.EXECUTION_FLAGS
)  # as optkern's own classes


#: torch's classes that take sparse gradients only and keep a parameter's step as a Python int
#: (torch.optim.SparseAdam: "does not support dense gradients, please consider Adam instead").
_TORCH_SPARSE_ONLY = frozenset({"SparseAdam"})


def _torch_signature(theirs: type) -> Tuple[Tuple[Tuple[str, Any], ...], ...]:
    ps = list(inspect.signature(theirs).parameters.values())[1:]
    args = tuple((p.name, p.default) for p in ps if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    kwonly = tuple((p.name, p.default) for p in ps if p.kind is inspect.Parameter.KEYWORD_ONLY)
    if len(args) + len(kwonly) != len(ps):
        raise ValueError(f"torch.optim.{theirs.__name__} takes *args or **kwargs")
    return args, kwonly


def _torch_fixed(theirs: type) -> Tuple[Dict[str, Any], bool]:
    """The group entries an instance of torch's class sets without an argument, and whether its
    constructor makes state (read off an instance with one parameter)."""
    try:
        made = theirs([torch.zeros(1, requires_grad=True)])
    except Exception as err:  # noqa: BLE001 (said in UNMAPPED)
        raise ValueError(f"torch.optim.{theirs.__name__} with its defaults fails: {err}") from None
    have = set(inspect.signature(theirs).parameters)
    return {k: v for k, v in made.defaults.items() if k not in have}, bool(made.state)


def _kernel_dtypes(r: registry.Rule) -> FrozenSet[torch.dtype]:
    """The parameter dtypes the kernels take for rule ``r``: the declaration's, where it says
    (``Rule.dtypes``), else every element type the kernels are built for."""
    declared = getattr(r, "dtypes", None)
    dtypes = frozenset(getattr(torch, n) for n in declared) if declared else _KERNEL_DTYPES
    if r.factored or r.switch:
        # factored state is kept in the parameter's type (float32 or float64, as optkern's own
        # classes keep it); Schedule-Free's train()/eval() moves the parameter towards z in its
        # own type: 16-bit parameters run torch's step, or are refused where torch has none
        dtypes -= _HALF
    return dtypes


def _bind(r: registry.Rule) -> Binding:
    """The binding of registry rule ``r``. A rule torch also has takes torch's signature (order,
    kinds, defaults) after checking that it has every argument the declaration names, with the
    same default; a torch argument the declaration lacks must be a flag that selects another
    rule: the rule whose torch class derives from this one and fixes the flag on (Adam's
    ``decoupled_weight_decay``: AdamW). ValueError says where they disagree."""
    declared = r.torch_args()
    theirs = getattr(torch.optim, r.cls, None)
    dtypes = _kernel_dtypes(r)
    if theirs is None:
        if r.switch:
            # the schedulefree package's arguments: the declaration's then foreach (default True
            # where torch has its foreach ops, as the package's); optkern's flags after
            args = tuple(declared) + (("foreach", hasattr(torch, "_foreach_mul_")),)
            kwonly = tuple(kv for kv in _KWONLY_NO_TORCH if kv[0] != "foreach")
        else:
            args, kwonly = tuple(declared), _KWONLY_NO_TORCH
        return Binding(r.cls, r, None, args, kwonly, {}, dtypes=dtypes)
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
    variants = []
    for other in registry.rules():
        derived = getattr(torch.optim, other.cls, None)
        if derived is None or derived is theirs or not issubclass(derived, theirs):
            continue
        fixed_there, _ = _torch_fixed(derived)
        variants += [(flag, other) for flag in sorted(extra) if fixed_there.get(flag) is True]
    extra -= {flag for flag, _ in variants}
    if extra:
        raise ValueError(
            f"torch.optim.{r.cls} takes {sorted(extra)}, which the registry does not declare"
        )
    fixed, eager = _torch_fixed(theirs)
    sparse_only = r.cls in _TORCH_SPARSE_ONLY
    return Binding(
        r.cls,
        r,
        theirs,
        args,
        kwonly,
        fixed,
        eager,
        tuple(variants),
        dtypes,
        sparse_only,
        sparse_only,
    )


def _preset(name: str, cls: type) -> Optional[Binding]:
    """The binding of a preset of a rule's class in optkern (``_preset``: the group entries its
    constructor fixes; optkern.Nesterov): its base's binding with the preset's arguments."""
    base = next((RULES[c.__name__] for c in cls.__mro__[1:] if c.__name__ in RULES), None)
    if base is None:
        return None
    ps = list(inspect.signature(cls).parameters.values())[1:]
    args = tuple((p.name, p.default) for p in ps if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return replace(base, name=name, args=args, fixed={**base.fixed, **cls._preset})


def _add_registry_rules() -> None:
    from . import _classes

    presets = [n for n in _classes.__all__ if hasattr(getattr(_classes, n), "_preset")]
    for r in registry.rules():
        try:
            RULES[r.cls] = _bind(r)
        except ValueError as err:
            UNMAPPED[r.cls] = str(err)
            continue
        for name in presets:  # right after the class it presets
            b = _preset(name, getattr(_classes, name))
            if b is not None and b.rule is r and name not in RULES:
                RULES[name] = b
    for name, b in RULES.items():
        globals()[name] = _make(b)
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
