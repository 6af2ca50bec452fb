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

Everything per-optimizer lives in the table ``RULES`` below: the first eight entries are written
by hand; every other rule of :mod:`optkern.registry` gets its entry from its declaration, with
torch's constructor signature as the authority for the arguments of a rule torch also has
(checked against the declaration: a rule whose declaration disagrees gets no class, and
``UNMAPPED`` says why).
"""

from __future__ import annotations

import inspect
import weakref
from operator import is_
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

try:
    from torch.autograd.graph import increment_version
except ImportError:  # torch < 2.1: autograd's version check does not see optkern's update

    def increment_version(tensors: Any) -> None:
        pass


from . import functional as F
from ._torch_threads import use_torch_openmp

use_torch_openmp(torch)  # optkern's chunks on torch's own OpenMP team (docs/threading.md)

__all__ = [
    "SGD",
    "Nesterov",
    "Momentum",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adam",
    "AdamW",
    "RULES",
    "UNMAPPED",
]


# -- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateBuf:
    """A state tensor shaped like its parameter. ``init``: "zeros", "first_grad" (created by the
    first update: it becomes the gradient, torch's SGD rule) or the name of a default whose value
    fills it. ``when``: the group entry that must be truthy (> 0) for the buffer to exist."""

    name: str
    init: str = "zeros"
    when: Optional[str] = None


@dataclass(frozen=True)
class CarriedNum:
    """A number per parameter carried from step to step (NAdam's ``mu_product``, ASGD's ``eta``
    and ``mu``): a 0-d float32 CPU tensor in the state, as torch keeps it, passed to the functional
    function as a list of floats after the state lists. ``init``: its first value, a number or
    the name of the group entry it starts at."""

    name: str
    init: Any


@dataclass(frozen=True)
class Rule:
    """One optimizer: its torch signature, state and the functional call it maps to.

    ``args``/``kwonly``: torch's constructor arguments after ``params``, in torch's order, with
    torch's defaults (positional-or-keyword, then keyword-only). ``fixed``: group entries that are
    not arguments. ``step``: the state has torch's ``step``, a 0-d float32 CPU tensor.
    ``step_kw``: the functional function takes the step count. ``eager``: state is created in
    the constructor (torch's Adagrad). ``fn``: the functional
    function, or a group entry and the two functions it chooses between. ``buffers``: the state
    lists passed positionally after params and grads. ``kw``: functional keyword -> group entry,
    ``("betas", i)`` for an item of a tuple entry, or ``"@name"`` for the list of state buffer
    ``name`` (None unless it exists for the group).
    """

    torch_name: Optional[str]
    args: Tuple[Tuple[str, Any], ...]
    kwonly: Tuple[Tuple[str, Any], ...]
    state: Tuple[StateBuf, ...]
    fn: Any
    buffers: Tuple[str, ...]
    kw: Dict[str, Any]
    step: bool = True
    step_kw: bool = False
    eager: bool = False
    fixed: Dict[str, Any] = field(default_factory=dict)
    carried: Tuple[CarriedNum, ...] = ()


_LR_WD_MAX = {"lr": "lr", "weight_decay": "weight_decay", "maximize": "maximize"}
_ADAM_KW = dict(
    _LR_WD_MAX,
    beta1=("betas", 0),
    beta2=("betas", 1),
    eps="eps",
    amsgrad="amsgrad",
    max_exp_avg_sqs="@max_exp_avg_sq",
)
_ADAM_STATE = (
    StateBuf("exp_avg"),
    StateBuf("exp_avg_sq"),
    StateBuf("max_exp_avg_sq", when="amsgrad"),
)

RULES: Dict[str, Rule] = {
    "SGD": Rule(
        "SGD",
        args=(
            ("lr", 1e-3),
            ("momentum", 0),
            ("dampening", 0),
            ("weight_decay", 0),
            ("nesterov", False),
        ),
        kwonly=(("maximize", False), ("foreach", None), ("differentiable", False), ("fused", None)),
        state=(StateBuf("momentum_buffer", init="first_grad", when="momentum"),),
        fn="sgd_",
        buffers=("momentum_buffer",),
        step=False,
        kw=dict(_LR_WD_MAX, momentum="momentum", dampening="dampening", nesterov="nesterov"),
    ),
    "Nesterov": Rule(  # optkern's SGD(nesterov=True); saves as torch's SGD
        "SGD",
        args=(("lr", 1e-3), ("momentum", 0.9), ("dampening", 0), ("weight_decay", 0)),
        kwonly=(("maximize", False), ("foreach", None), ("differentiable", False), ("fused", None)),
        fixed={"nesterov": True},
        state=(StateBuf("momentum_buffer", init="first_grad", when="momentum"),),
        fn="sgd_",
        buffers=("momentum_buffer",),
        step=False,
        kw=dict(_LR_WD_MAX, momentum="momentum", dampening="dampening", nesterov="nesterov"),
    ),
    "Momentum": Rule(  # the seed notes' V = beta*V + (1-beta)*g; no torch class
        None,
        args=(("lr", 1e-3), ("beta", 0.9), ("weight_decay", 0)),
        kwonly=(("maximize", False), ("foreach", None), ("differentiable", False), ("fused", None)),
        state=(StateBuf("momentum_buffer"),),
        fn="momentum_",
        buffers=("momentum_buffer",),
        step=False,
        kw=dict(_LR_WD_MAX, beta="beta"),
    ),
    "RMSprop": Rule(
        "RMSprop",
        args=(
            ("lr", 1e-2),
            ("alpha", 0.99),
            ("eps", 1e-8),
            ("weight_decay", 0),
            ("momentum", 0),
            ("centered", False),
            ("capturable", False),
            ("foreach", None),
            ("maximize", False),
            ("differentiable", False),
        ),
        kwonly=(),
        state=(
            StateBuf("square_avg"),
            StateBuf("momentum_buffer", when="momentum"),
            StateBuf("grad_avg", when="centered"),
        ),
        fn="rmsprop_",
        buffers=("square_avg", "grad_avg", "momentum_buffer"),
        kw=dict(_LR_WD_MAX, alpha="alpha", eps="eps", momentum="momentum", centered="centered"),
    ),
    "Adagrad": Rule(
        "Adagrad",
        args=(
            ("lr", 1e-2),
            ("lr_decay", 0),
            ("weight_decay", 0),
            ("initial_accumulator_value", 0),
            ("eps", 1e-10),
            ("foreach", None),
        ),
        kwonly=(("maximize", False), ("differentiable", False), ("fused", None)),
        state=(StateBuf("sum", init="initial_accumulator_value"),),
        eager=True,
        fn="adagrad_",
        buffers=("sum",),
        step_kw=True,
        kw=dict(_LR_WD_MAX, lr_decay="lr_decay", eps="eps"),
    ),
    "Adadelta": Rule(
        "Adadelta",
        args=(("lr", 1.0), ("rho", 0.9), ("eps", 1e-6), ("weight_decay", 0), ("foreach", None)),
        kwonly=(("capturable", False), ("maximize", False), ("differentiable", False)),
        state=(StateBuf("square_avg"), StateBuf("acc_delta")),
        fn="adadelta_",
        buffers=("square_avg", "acc_delta"),
        kw=dict(_LR_WD_MAX, rho="rho", eps="eps"),
    ),
    "Adam": Rule(
        "Adam",
        args=(
            ("lr", 1e-3),
            ("betas", (0.9, 0.999)),
            ("eps", 1e-8),
            ("weight_decay", 0),
            ("amsgrad", False),
        ),
        kwonly=(
            ("foreach", None),
            ("maximize", False),
            ("capturable", False),
            ("differentiable", False),
            ("fused", None),
            ("decoupled_weight_decay", False),
        ),
        state=_ADAM_STATE,
        fn=("decoupled_weight_decay", "adam_", "adamw_"),
        buffers=("exp_avg", "exp_avg_sq"),
        kw=_ADAM_KW,
        step_kw=True,
    ),
    "AdamW": Rule(
        "AdamW",
        args=(
            ("lr", 1e-3),
            ("betas", (0.9, 0.999)),
            ("eps", 1e-8),
            ("weight_decay", 1e-2),
            ("amsgrad", False),
        ),
        kwonly=(
            ("maximize", False),
            ("foreach", None),
            ("capturable", False),
            ("differentiable", False),
            ("fused", None),
        ),
        fixed={"decoupled_weight_decay": True},
        state=_ADAM_STATE,
        fn=("decoupled_weight_decay", "adam_", "adamw_"),
        buffers=("exp_avg", "exp_avg_sq"),
        kw=_ADAM_KW,
        step_kw=True,
    ),
}


# -- checks ----------------------------------------------------------------------------------------


def _scalar(name: str, value: Any) -> Any:
    """A hyperparameter as a Python number (a 1-element tensor, as torch accepts for lr and
    betas, becomes its value); anything else goes to optkern's checks as it is."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return value.item()
    return value


_F32 = torch.float32
_STRIDED = torch.strided


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
    return t.detach().numpy()  # shares memory; never copies


class _Entry:
    """Cached NumPy views of one parameter, its gradient and its state tensors."""

    __slots__ = ("ptr", "pview", "grad", "gptr", "sdict", "tensors", "views", "steps", "cviews")

    def __init__(self, p: torch.Tensor) -> None:
        self.ptr = p.data_ptr()
        self.pview = _np(p)
        self.grad = None
        self.gptr = 0
        self.sdict = None
        self.tensors: Tuple[Any, ...] = ()
        self.views: Tuple[Any, ...] = ()
        self.steps = None
        self.cviews: Tuple[Any, ...] = ()


# -- the base class --------------------------------------------------------------------------------


class _OktOptimizer(torch.optim.Optimizer):
    _rule: Rule
    _rule_name: str
    _carried_names: Tuple[str, ...] = ()

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
        self._okt_cache: Dict[torch.Tensor, _Entry] = {}
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
            if why:
                raise TypeError(
                    f"optkern.torch.{cls} cannot update it in place: {why}; "
                    f"use torch.optim for such parameters"
                )
        self._call(group, [], [], {}, [], dry=True)  # optkern validates the hyperparameters

    @staticmethod
    def _label(group: Dict[str, Any], gi: int, i: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return f"parameter {names[i]!r} (param group {gi}, index {i})"
        return f"parameter {i} of param group {gi}"

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._okt_cache = {}
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
            if key == "step" or key in self._carried_names:
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
            elif isinstance(v, torch.Tensor) and v.shape == p.shape:
                if _why_not(v, key) is not None:
                    st[key] = v.detach().to(device="cpu", dtype=torch.float32).contiguous()

    def _init_state(self, p: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        st = self.state[p]
        if self._rule.step:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
        for buf in self._rule.state:
            if buf.init != "first_grad" and (buf.when is None or group[buf.when]):
                if buf.init == "zeros":
                    st[buf.name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                else:
                    st[buf.name] = self._filled(p, buf, group)
        for c in self._rule.carried:
            init = c.init if not isinstance(c.init, str) else _scalar(c.init, group[c.init])
            st[c.name] = torch.tensor(float(init), dtype=torch.float32)
        return st

    def _filled(self, p: torch.Tensor, buf: StateBuf, group: Dict[str, Any]) -> torch.Tensor:
        """A buffer filled with a hyperparameter: the constructor's value for a rule whose state
        is created in the constructor (torch's Adagrad), else the group's (torch's Rprop)."""
        src = self.defaults if self._rule.eager else group
        return torch.full_like(
            p, float(_scalar(buf.init, src[buf.init])), memory_format=torch.contiguous_format
        )

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One update of every parameter that has a gradient; ``closure`` (re-evaluating the
        model and returning the loss) runs first, with gradients enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group)
        return loss

    def _step_group(self, gi: int, group: Dict[str, Any]) -> None:
        rule = self._rule
        names = [b.name for b in rule.state if b.when is None or group[b.when]]
        cnames = list(self._carried_names)
        keys = names + cnames + (["step"] if rule.step else [])
        params: List[torch.Tensor] = []
        pviews: List[np.ndarray] = []
        gviews: List[np.ndarray] = []
        entries: List[_Entry] = []
        state = self.state
        cache = self._okt_cache
        # The hot loop: a cached entry is reused while the parameter's memory, its gradient
        # tensor and its state tensors are the very objects the views were made from.
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            e = cache.get(p)
            if e is None or e.ptr != p.data_ptr():
                why = _why_not(p, self._label(group, gi, i))
                if why:
                    raise TypeError(
                        f"optkern.torch.{type(self).__name__} cannot update it in place: {why}"
                    )
                e = cache[p] = _Entry(p)
            # The gradient is held weakly and its view only during the call: zero_grad()
            # must free it, as with torch.optim (else every parameter costs a second gradient).
            if e.grad is None or e.grad() is not g or e.gptr != g.data_ptr():
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
                e.grad, e.gptr = weakref.ref(g), g.data_ptr()
            st = state.get(p) if keys else e.sdict  # SGD without momentum keeps no state
            if not st and keys:
                st = self._init_state(p, group)
            if keys and (
                st is not e.sdict
                or len(e.tensors) != len(keys)
                or not all(map(is_, map(st.get, keys), e.tensors))
            ):
                self._refresh_state(e, st, names, p, group, gi, i)
            params.append(p)
            pviews.append(e.pview)
            gviews.append(g.numpy())
            entries.append(e)
        if not params:
            return
        lists = {n: [e.views[k] for e in entries] for k, n in enumerate(names)}
        for k, n in enumerate(cnames):  # the carried numbers, read from their float32 tensors
            lists[n] = [float(e.cviews[k]) for e in entries]
        steps = None
        if rule.step:
            steps = [int(e.steps) + 1 for e in entries]
        try:
            self._call(group, pviews, gviews, lists, steps)
        except (TypeError, ValueError) as err:  # say which tensors the indices name
            idx = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            where = "; ".join(f"[{k}] = {self._label(group, gi, i)}" for k, i in enumerate(idx))
            raise type(err)(
                f"{err} (param group {gi}; the indices count its parameters that "
                f"have a gradient: {where})"
            ) from None
        if rule.step:
            for e, s in zip(entries, steps):
                e.steps[()] = s
        for k, n in enumerate(cnames):  # written back as torch keeps them: float32
            for e, v in zip(entries, lists[n]):
                e.cviews[k][()] = v
        fresh = [b.name for b in rule.state if b.init == "first_grad" and b.name in lists]
        for name in fresh:  # buffers the first update created: keep them as tensors
            k = names.index(name)
            for p, e, v in zip(params, entries, lists[name]):
                if e.views[k] is None:
                    t = torch.from_numpy(v)  # shares the buffer's memory
                    state[p][name] = t
                    e.tensors = e.tensors[:k] + (t,) + e.tensors[k + 1 :]
                    e.views = e.views[:k] + (v,) + e.views[k + 1 :]
        increment_version(params)  # autograd sees the in-place update, as with torch.optim

    def _refresh_state(
        self,
        e: _Entry,
        st: Dict[str, Any],
        names: List[str],
        p: torch.Tensor,
        group: Dict[str, Any],
        gi: int,
        i: int,
    ) -> None:
        label = self._label(group, gi, i)
        views = []
        for n in names:
            t = st.get(n)
            buf = next(b for b in self._rule.state if b.name == n)
            if t is None:
                if buf.init == "first_grad":
                    views.append(None)
                    continue
                t = st[n] = (
                    torch.zeros_like(p, memory_format=torch.contiguous_format)
                    if buf.init == "zeros"
                    else self._filled(p, buf, group)
                )
            elif _why_not(t, f"state {n!r} of {label}") or t.shape != p.shape:
                st[n] = t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
                if t.shape != p.shape:
                    raise ValueError(
                        f"state {n!r} of {label} has shape {tuple(t.shape)}, the "
                        f"parameter {tuple(p.shape)}"
                    )
            views.append(_np(t))
        if self._rule.step:
            s = st.get("step")
            if not (
                isinstance(s, torch.Tensor)
                and s.dtype == torch.float32
                and s.dim() == 0
                and s.device.type == "cpu"
            ):
                s = st["step"] = torch.tensor(float(0 if s is None else s), dtype=torch.float32)
            e.steps = s.numpy()
        cviews = []
        for c in self._rule.carried:
            v = st.get(c.name)
            if not (
                isinstance(v, torch.Tensor)
                and v.dtype == torch.float32
                and v.dim() == 0
                and v.device.type == "cpu"
            ):
                if v is None:
                    init = c.init if not isinstance(c.init, str) else group[c.init]
                    v = init
                v = st[c.name] = torch.tensor(float(_scalar(c.name, v)), dtype=torch.float32)
            cviews.append(v.numpy())
        e.cviews = tuple(cviews)
        e.sdict = st
        e.tensors = (
            tuple(st.get(n) for n in names)
            + tuple(st[c.name] for c in self._rule.carried)
            + ((st["step"],) if self._rule.step else ())
        )
        e.views = tuple(views)

    def _call(
        self,
        group: Dict[str, Any],
        pviews: List[np.ndarray],
        gviews: List[np.ndarray],
        lists: Dict[str, List[Any]],
        steps: Optional[List[int]],
        dry: bool = False,
    ) -> None:
        rule = self._rule
        fn_name = rule.fn if isinstance(rule.fn, str) else rule.fn[2 if group[rule.fn[0]] else 1]
        fn = getattr(F, fn_name)
        kwargs: Dict[str, Any] = {}
        for kw, src in rule.kw.items():
            if isinstance(src, tuple):
                kwargs[kw] = _scalar(f"{src[0]}[{src[1]}]", group[src[0]][src[1]])
            elif src.startswith("@"):
                kwargs[kw] = lists.get(src[1:], [] if dry else None)
            else:
                kwargs[kw] = _scalar(src, group[src])
        if rule.step_kw:
            kwargs["step"] = steps if steps is not None else []
        bufs = []
        for n in rule.buffers:
            needed = any(b.name == n and (b.when is None or group[b.when]) for b in rule.state)
            bufs.append(lists.get(n, []) if needed else None)
        bufs += [lists.get(c.name, []) for c in rule.carried]
        fn(pviews, gviews, *bufs, **kwargs)


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
    cls = type(
        name,
        (_OktOptimizer,),
        {
            "_rule": rule,
            "_rule_name": name,
            "__signature__": bind_sig,
            "__doc__": doc,
            "_carried_names": tuple(c.name for c in rule.carried),
            "__module__": __name__,
            "__qualname__": name,
        },
    )
    return cls


def _doc(name: str) -> str:
    import optkern

    rule = RULES[name]
    same = (
        f"Same arguments, defaults, state and state_dict layout as torch.optim.{rule.torch_name}"
        if rule.torch_name
        else "No torch counterpart; state_dict in torch's layout"
    )
    return (
        f"{name} on CPU float32 torch tensors, stepped in place by optkern's kernels.\n\n"
        f"{same}. The update, as optkern.{name} computes it:\n\n"
        + (getattr(optkern, name).__doc__ or "")
    )


SGD = _make("SGD", RULES["SGD"], _doc("SGD"))
Nesterov = _make("Nesterov", RULES["Nesterov"], _doc("Nesterov"))
Momentum = _make("Momentum", RULES["Momentum"], _doc("Momentum"))
RMSprop = _make("RMSprop", RULES["RMSprop"], _doc("RMSprop"))
Adagrad = _make("Adagrad", RULES["Adagrad"], _doc("Adagrad"))
Adadelta = _make("Adadelta", RULES["Adadelta"], _doc("Adadelta"))
Adam = _make("Adam", RULES["Adam"], _doc("Adam"))
AdamW = _make("AdamW", RULES["AdamW"], _doc("AdamW"))


# -- every other rule of the registry --------------------------------------------------------------

_KWONLY_NO_TORCH = (
    ("maximize", False),
    ("foreach", None),
    ("fused", None),
    ("differentiable", False),
    ("capturable", False),
)  # as optkern's own classes


def _from_registry(r: Any) -> Rule:
    """The table entry of registry rule ``r``. A rule torch also has takes torch's signature
    (order, kinds, defaults) after checking that it has every argument the declaration names,
    with the same default; ValueError says where they disagree."""
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
    if theirs is not None:
        sig = inspect.signature(theirs)
        ps = list(sig.parameters.values())[1:]
        args = tuple(
            (p.name, p.default) for p in ps if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        kwonly = tuple((p.name, p.default) for p in ps if p.kind is inspect.Parameter.KEYWORD_ONLY)
        if len(args) + len(kwonly) != len(ps):
            raise ValueError(f"torch.optim.{r.cls} takes *args or **kwargs")
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
        if extra:
            raise ValueError(
                f"torch.optim.{r.cls} takes {sorted(extra)}, which the registry does not declare"
            )
    else:
        args, kwonly = tuple(declared), _KWONLY_NO_TORCH
    kw: Dict[str, Any] = {h.name: (h.torch if h.slot < 0 else (h.torch, h.slot)) for h in r.hyper}
    kw["maximize"] = "maximize"
    return Rule(
        r.cls if theirs is not None else None,
        args=args,
        kwonly=kwonly,
        state=tuple(
            StateBuf(
                s.name,
                init="zeros" if s.init is None else str(torch_name(s.init)),
                when=torch_name(s.when),
            )
            for s in r.states
        ),
        fn=f"{r.name}_",
        buffers=tuple(s.name for s in r.states),
        kw=kw,
        step=r.counts_steps,
        step_kw=r.uses_step,
        carried=tuple(
            CarriedNum(c.name, c.init if c.init_from is None else torch_name(c.init_from))
            for c in r.carried
        ),
    )


# Rules of the registry without a class above, and why (a disagreement between the declaration and
# torch's signature); ``optkern.torch.<name>`` raises AttributeError with the reason.
UNMAPPED: Dict[str, str] = {}


def _add_registry_rules() -> None:
    from . import optimizers, registry

    for r in registry.rules():
        if r.cls in RULES:
            continue
        if hasattr(getattr(optimizers, r.cls, None), "eval"):
            # Schedule-Free's train()/eval() switch between the y and x points is not built here.
            UNMAPPED[r.cls] = (
                "its train()/eval() switch is not in optkern.torch yet; use "
                f"optkern.{r.cls} on NumPy arrays, or the schedulefree package"
            )
            continue
        try:
            RULES[r.cls] = _from_registry(r)
        except ValueError as err:
            UNMAPPED[r.cls] = str(err)
            continue
        globals()[r.cls] = _make(r.cls, RULES[r.cls], _doc(r.cls))
        __all__.append(r.cls)


_add_registry_rules()


def __getattr__(name: str) -> Any:
    if name in UNMAPPED:
        raise AttributeError(f"optkern.torch has no {name}: {UNMAPPED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
