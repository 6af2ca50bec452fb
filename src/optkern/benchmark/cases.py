"""What the benchmark measures: each optimizer's step as optkern runs it, as well as NumPy allows
(``out=`` arguments, one preallocated scratch array, no other temporaries), and as torch's fastest
CPU path runs it (fused where torch has a fused CPU kernel, else foreach).

Every implementation is built by a factory ``make(params, grads) -> step`` over lists of float32
arrays; ``step()`` applies one update in place. Hyperparameters are the defaults of each optimizer
(momentum 0.9 where there is one).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import optkern as ok

Arrays = List[np.ndarray]
Step = Callable[[], None]
Factory = Callable[[Arrays, Arrays], Step]


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    bytes_per_element: int  # moved per element per step, in place: 4 * (reads + writes)
    optkern: Factory
    numpy: Optional[Factory]  # None: no hand-written NumPy version (yet)
    torch_name: str  # torch.optim class
    torch_kwargs: Dict = field(default_factory=dict)
    torch_fused: bool = False  # torch has a fused CPU kernel for it
    # A rule torch.optim lacks is compared with its own reference package instead (the column
    # "torch" then names it): a factory like the others, and the package's name.
    oracle: Optional[Factory] = None
    oracle_impl: str = ""
    oracle_modules: Tuple[str, ...] = ()  # what the oracle imports
    # The shape of the n elements measured (None: a vector). A factored rule (Adafactor) is
    # measured on a matrix, where its row and column factors are what it keeps.
    shape: Optional[Callable[[int], Tuple[int, ...]]] = None

    def peer_missing(self) -> Optional[str]:
        """Why the "torch" column cannot be measured here (a package missing, or no such class
        in torch.optim), else None. Only torch is imported to find out (the column needs it)."""
        for module in self.oracle_modules or ("torch",):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        if self.oracle is None:
            import torch

            if not hasattr(torch.optim, self.torch_name):
                return f"torch.optim has no {self.torch_name}"
        return None

    def torch(self, params: Arrays, grads: Arrays) -> Step:
        if self.oracle is not None:
            return self.oracle(params, grads)
        import torch

        impl = {"fused": True} if self.torch_fused else {"foreach": True}
        opt = getattr(torch.optim, self.torch_name)(
            _torch_params(params, grads), **self.torch_kwargs, **impl
        )
        return opt.step

    @property
    def torch_impl(self) -> str:
        if self.oracle is not None:
            return self.oracle_impl
        return "fused" if self.torch_fused else "foreach"


def _torch_params(params: Arrays, grads: Arrays) -> list:
    """torch Parameters sharing the arrays' memory, each with its gradient set."""
    import torch

    tparams = []
    for p, g in zip(params, grads):
        t = torch.nn.Parameter(torch.from_numpy(p))
        t.grad = torch.from_numpy(g)
        tparams.append(t)
    return tparams


def _optkern(cls, **hp) -> Factory:
    def make(params: Arrays, grads: Arrays) -> Step:
        opt = cls(params, **hp)
        return lambda: opt.step(grads)

    return make


def _numpy(update) -> Factory:
    """A NumPy update of one array at a time, with its own state and one scratch array."""

    def make(params: Arrays, grads: Arrays) -> Step:
        slots = [(p, g, _Slots(p)) for p, g in zip(params, grads)]
        t = [0]

        def step() -> None:
            t[0] += 1
            for p, g, s in slots:
                update(p, g, s, t[0])

        return step

    return make


class _Slots:
    """Lazily created state and scratch arrays for one parameter."""

    def __init__(self, p: np.ndarray) -> None:
        self._shape = p.shape

    def __getattr__(self, name: str) -> np.ndarray:
        arr = np.zeros(self._shape, np.float32)
        setattr(self, name, arr)
        return arr


LR, MOMENTUM = 1e-3, 0.9


def _np_sgd(p, g, s, t):
    np.multiply(g, -LR, out=s.tmp)
    p += s.tmp


def _np_sgd_momentum(p, g, s, t):
    s.buf *= MOMENTUM
    s.buf += g
    np.multiply(s.buf, -LR, out=s.tmp)
    p += s.tmp


def _np_nesterov(p, g, s, t):
    s.buf *= MOMENTUM
    s.buf += g
    np.multiply(s.buf, MOMENTUM, out=s.tmp)
    s.tmp += g
    s.tmp *= -LR
    p += s.tmp


def _np_momentum(p, g, s, t):
    s.v *= MOMENTUM
    np.multiply(g, 1 - MOMENTUM, out=s.tmp)
    s.v += s.tmp
    np.multiply(s.v, -LR, out=s.tmp)
    p += s.tmp


def _np_rmsprop(p, g, s, t, lr=1e-2, alpha=0.99, eps=1e-8):
    s.sq *= alpha
    np.multiply(g, g, out=s.tmp)
    s.tmp *= 1 - alpha
    s.sq += s.tmp
    np.sqrt(s.sq, out=s.tmp)
    s.tmp += eps
    np.divide(g, s.tmp, out=s.tmp)
    s.tmp *= -lr
    p += s.tmp


def _np_adagrad(p, g, s, t, lr=1e-2, eps=1e-10):
    np.multiply(g, g, out=s.tmp)
    s.sum += s.tmp
    np.sqrt(s.sum, out=s.tmp)
    s.tmp += eps
    np.divide(g, s.tmp, out=s.tmp)
    s.tmp *= -lr
    p += s.tmp


def _np_adadelta(p, g, s, t, lr=1.0, rho=0.9, eps=1e-6):
    s.sq *= rho
    np.multiply(g, g, out=s.tmp)
    s.tmp *= 1 - rho
    s.sq += s.tmp
    np.add(s.sq, eps, out=s.tmp)
    np.sqrt(s.tmp, out=s.tmp)  # std
    np.add(s.acc, eps, out=s.delta)
    np.sqrt(s.delta, out=s.delta)
    s.delta /= s.tmp
    s.delta *= g
    s.acc *= rho
    np.multiply(s.delta, s.delta, out=s.tmp)
    s.tmp *= 1 - rho
    s.acc += s.tmp
    s.delta *= -lr
    p += s.delta


def _np_adam(p, g, s, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decoupled=False, amsgrad=False):
    if decoupled:
        p *= 1 - lr * wd
    np.subtract(g, s.m, out=s.tmp)
    s.tmp *= 1 - b1
    s.m += s.tmp
    s.v *= b2
    np.multiply(g, g, out=s.tmp)
    s.tmp *= 1 - b2
    s.v += s.tmp
    v = s.v
    if amsgrad:
        np.maximum(s.vmax, s.v, out=s.vmax)
        v = s.vmax
    np.sqrt(v, out=s.tmp)
    s.tmp *= 1 / math.sqrt(1 - b2**t)
    s.tmp += eps
    np.divide(s.m, s.tmp, out=s.tmp)
    s.tmp *= -lr / (1 - b1**t)
    p += s.tmp


CASES: Dict[str, Case] = {
    c.key: c
    for c in [
        Case("sgd", "SGD", 12, _optkern(ok.SGD, lr=LR), _numpy(_np_sgd), "SGD", dict(lr=LR), True),
        Case(
            "sgd-momentum",
            "SGD momentum",
            20,
            _optkern(ok.SGD, lr=LR, momentum=MOMENTUM),
            _numpy(_np_sgd_momentum),
            "SGD",
            dict(lr=LR, momentum=MOMENTUM),
            True,
        ),
        Case(
            "nesterov",
            "Nesterov",
            20,
            _optkern(ok.Nesterov, lr=LR, momentum=MOMENTUM),
            _numpy(_np_nesterov),
            "SGD",
            dict(lr=LR, momentum=MOMENTUM, nesterov=True),
            True,
        ),
        Case(
            "momentum",
            "Momentum (seed)",
            20,
            _optkern(ok.Momentum, lr=LR, beta=MOMENTUM),
            _numpy(_np_momentum),
            "SGD",
            dict(lr=LR, momentum=MOMENTUM, dampening=MOMENTUM),
            True,
        ),
        Case("rmsprop", "RMSprop", 20, _optkern(ok.RMSprop), _numpy(_np_rmsprop), "RMSprop"),
        Case(
            "adagrad",
            "Adagrad",
            20,
            _optkern(ok.Adagrad),
            _numpy(_np_adagrad),
            "Adagrad",
            torch_fused=True,
        ),
        Case("adadelta", "Adadelta", 28, _optkern(ok.Adadelta), _numpy(_np_adadelta), "Adadelta"),
        Case("adam", "Adam", 28, _optkern(ok.Adam), _numpy(_np_adam), "Adam", torch_fused=True),
        Case(
            "adamw",
            "AdamW",
            28,
            _optkern(ok.AdamW),
            _numpy(lambda p, g, s, t: _np_adam(p, g, s, t, wd=1e-2, decoupled=True)),
            "AdamW",
            torch_fused=True,
        ),
        Case(
            "amsgrad",
            "Adam amsgrad",
            36,
            _optkern(ok.Adam, amsgrad=True),
            _numpy(lambda p, g, s, t: _np_adam(p, g, s, t, amsgrad=True)),
            "Adam",
            dict(amsgrad=True),
            True,
        ),
    ]
}


# Every further rule of the registry, at its defaults: p and g read, p and each state array read
# and written. A rule with a reduction pass (LAMB) makes two passes: the first reads p, g and the
# state and writes the state (8 + 8n bytes), the second reads p and the state and writes p
# (8 + 4n). There is no NumPy version until one is written for it above.
# A factored rule (Adafactor) on a matrix makes three passes: p and g read (the norm of p and the
# row and column sums of g^2), g read (the norm of the update), p and g read and p written: 24
# bytes; its row and column factors are a vanishing fraction of that.
def _registry_bytes(rule) -> int:
    n = sum(s.when is None for s in rule.states)
    if rule.factored:
        return 24
    return 16 + 12 * n if rule.reduction else 12 + 8 * n


def matrix_shape(n: int) -> Tuple[int, ...]:
    """The matrix a factored rule is measured on: rows of 1000 columns (10000 from 10M elements
    on: 1M is 1000 x 1000, 50M is 5000 x 10000); a vector where that does not divide n."""
    cols = 10000 if n >= 10_000_000 else 1000
    return (n // cols, cols) if n % cols == 0 and n >= cols else (n,)


for _rule in ok.registry.rules():
    if _rule.name not in CASES and not any(
        c.label == _rule.cls or c.torch_name == _rule.cls for c in CASES.values()
    ):
        CASES[_rule.name] = Case(
            _rule.name,
            _rule.cls,
            _registry_bytes(_rule),
            _optkern(getattr(ok, _rule.cls)),
            None,
            _rule.cls,
            shape=matrix_shape if _rule.factored else None,
        )


#: What a rule's declared peer (registry.Rule.peer) needs, by its package: the column's label,
#: the modules it imports, and whether it is a torch optimizer (optax's are functions of jax
#: arrays, timed on the step alone).
PEER_PACKAGES: Dict[str, Tuple[str, Tuple[str, ...], bool]] = {
    "lion_pytorch": ("lion-pt", ("torch", "lion_pytorch"), True),
    "optax": ("optax", ("jax", "optax"), False),
    "schedulefree": ("sf-pt", ("torch", "schedulefree"), True),
}


def _resolve(dotted: str) -> Callable:
    """``module.name`` (``optax.contrib.x``: the longest importable module), imported."""
    import importlib

    parts = dotted.split(".")
    for k in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        return functools.reduce(getattr, parts[k:], obj)
    raise ImportError(dotted)


def _optax(dotted: str, lr: float) -> Callable[[Arrays, Arrays], Step]:
    """An optax optimizer (``optax.lamb``) at lr and its other defaults, one jitted
    update-and-apply with the params and state donated (so XLA may update them in place),
    waited for each step."""

    def make(params: Arrays, grads: Arrays) -> Step:
        import jax
        import optax

        tx = _resolve(dotted)(lr)
        p = [jax.numpy.asarray(x) for x in params]
        g = [jax.numpy.asarray(x) for x in grads]
        holder = [p, tx.init(p)]

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def update(p, state, g):
            u, state = tx.update(g, state, p)
            return optax.apply_updates(p, u), state

        def step() -> None:
            holder[0], holder[1] = update(holder[0], holder[1], g)
            jax.block_until_ready(holder[0])

        return step

    return make


def _torch_peer(dotted: str) -> Factory:
    """A package's torch optimizer class at its defaults (its own default path), on tensors
    sharing the arrays; a Schedule-Free class in train mode (the package starts in eval)."""

    def make(params: Arrays, grads: Arrays) -> Step:
        opt = _resolve(dotted)(_torch_params(params, grads))
        if dotted.startswith("schedulefree."):
            opt.train()
        return opt.step

    return make


# A rule torch.optim lacks is compared with the peer it declares (lion-pytorch's Lion, optax's
# LAMB, schedulefree's classes) where the package is one of PEER_PACKAGES.
for _rule in ok.registry.rules():
    _package = (_rule.peer or "").split(".")[0]
    if _rule.name in CASES and _package in PEER_PACKAGES:
        _label, _modules, _is_torch = PEER_PACKAGES[_package]
        _lr = next(h.default for h in _rule.hyper if h.name == "lr")
        CASES[_rule.name] = dataclasses.replace(
            CASES[_rule.name],
            oracle=_torch_peer(_rule.peer) if _is_torch else _optax(_rule.peer, _lr),
            oracle_impl=_label,
            oracle_modules=_modules,
        )


def torch_available() -> Optional[str]:
    """torch's version when it can be imported, else None."""
    try:
        import torch
    except Exception:  # not installed, or broken
        return None
    return str(torch.__version__)
