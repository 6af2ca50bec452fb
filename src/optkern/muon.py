"""Muon (torch.optim.Muon): momentum, then the update orthogonalised by a Newton-Schulz iteration,
for 2-D parameters (the hidden layers' weight matrices; use AdamW for the rest).

The momentum (and Nesterov's look-ahead) is one fused pass that also sums the squares of the
update; the Newton-Schulz iteration is 3 matrix products per step through NumPy's BLAS, in
``ns_dtype`` (float32 by default); the decoupled weight decay and the scaled update are one more
fused pass.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _core
from .optimizer import Optimizer, _pack, require_float32
from .registry import Hyper, Rule, State, as_flag, check_execution_flags

__all__ = ["Muon", "newton_schulz", "NS_COEFFICIENTS", "adjusted_lr"]

#: torch.optim.Muon's default Newton-Schulz coefficients (a, b, c) (Keller Jordan's).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7
NS_STEPS = 5
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
#: What ``ns_dtype`` takes: the element type of the Newton-Schulz matrix products.
NS_DTYPES = {"float32": np.float32, "float64": np.float64}

_DOC = r"""Muon (torch.optim.Muon) for 2-D float32 arrays (float64 ones are refused: its fused passes
are float32 only)::

    buf <- buf + (1 - momentum) * (g - buf)            (buf.lerp_(g, 1 - momentum), buf from 0)
    u   <- g + momentum * (buf - g) if nesterov else buf
    X   <- u / max(||u||_F, eps), transposed if it has more rows than columns
    repeat ns_steps times:  A = X X^T;  B = b A + c A A;  X = a X + B X      ((a, b, c) =
                                                                             ns_coefficients)
    p   <- p * (1 - lr * weight_decay) - lr' * X        (X transposed back)

with lr' = lr * sqrt(max(1, rows / cols)) (adjust_lr_fn None or "original") or
lr * 0.2 * sqrt(max(rows, cols)) ("match_rms_adamw"). State: ``momentum_buffer``.

``ns_dtype`` (keyword only): the element type of the Newton-Schulz products, "float32" (the
default) or "float64". torch computes them in bfloat16, which is fast only where the CPU has
bfloat16 matrix units; its orthogonalised update then differs from a float32 one by about 1%
(bfloat16 keeps 8 bits), so optkern's parameters agree with torch's to about lr * 1e-2 per step.
``optkern.torch.Muon`` also offers bfloat16, through torch, to match torch bit for bit."""

_RULE = Rule(
    name="muon",
    cls="Muon",
    doc=_DOC,
    counts_steps=False,
    uses_step=False,
    kernel="",
    weight=0,
    hyper=(
        Hyper("lr", "nonnegative", 1e-3, "lr", -1),
        Hyper("weight_decay", "nonnegative", 0.1, "weight_decay", -1),
        Hyper("momentum", "nonnegative", 0.95, "momentum", -1),
        Hyper("nesterov", "flag", True, "nesterov", -1),
        Hyper("ns_a", "real", NS_COEFFICIENTS[0], "ns_coefficients", 0),
        Hyper("ns_b", "real", NS_COEFFICIENTS[1], "ns_coefficients", 1),
        Hyper("ns_c", "real", NS_COEFFICIENTS[2], "ns_coefficients", 2),
        Hyper("eps", "real", EPS, "eps", -1),
        Hyper("ns_steps", "count", NS_STEPS, "ns_steps", -1),
        Hyper("adjust_lr_fn", "choice", None, "adjust_lr_fn", -1),
    ),
    states=(State("momentum_buffer", "momentum_buffers", None, None),),
)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _real(name: str, value: Any, lo: Optional[float] = None) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    v = float(value)
    if not math.isfinite(v) or abs(v) > _FLOAT32_MAX:
        raise ValueError(f"{name} must be finite (as float32 holds it), got {value!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} should be >= {lo:g} but is: {value!r}")
    return v


def validate(core: Dict[str, Any], labels: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Muon's hyperparameters (the core's names: ns_coefficients as ns_a, ns_b, ns_c), checked,
    as floats, a bool, an int and a str (or None)."""
    name = (labels or {}).get
    out: Dict[str, Any] = {}
    out["lr"] = _real(name("lr", "lr"), core["lr"], 0.0)
    out["weight_decay"] = _real(name("weight_decay", "weight_decay"), core["weight_decay"], 0.0)
    out["momentum"] = _real(name("momentum", "momentum"), core["momentum"], 0.0)
    nesterov = as_flag(core["nesterov"])
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}: {nesterov!r}")
    out["nesterov"] = nesterov
    for k, slot in (("ns_a", 0), ("ns_b", 1), ("ns_c", 2)):
        out[k] = _real(f"ns_coefficients[{slot}]", core[k])
    out["eps"] = _real(name("eps", "eps"), core["eps"])
    steps = core["ns_steps"]
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"ns_steps must be an int, got {type(steps).__name__}: {steps!r}")
    if not 0 <= int(steps) < 100:
        raise ValueError(
            f"ns_steps must be >= 0 and less than 100 for computational efficiency, got {steps}"
        )
    out["ns_steps"] = int(steps)
    fn = core["adjust_lr_fn"]
    if fn not in ADJUST_LR_FNS or isinstance(fn, (bool, np.bool_)):
        raise ValueError(f"Adjust learning rate function {fn} is not supported")
    out["adjust_lr_fn"] = fn
    if as_flag(core.get("maximize", False)) is not False:
        raise ValueError("Muon has no maximize option (torch.optim.Muon neither)")
    out["maximize"] = False
    return out


def adjusted_lr(lr: float, adjust_lr_fn: Optional[str], shape: Tuple[int, ...]) -> float:
    """The learning rate of the orthogonalised update of a (rows, cols) parameter (torch's
    ``_adjust_lr``)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class _Workspace:
    """The matrices of one Newton-Schulz iteration for a (rows, cols) shape: X and Y shaped like
    the parameter, A and B square in the smaller dimension. Kept from step to step."""

    def __init__(self, shape: Tuple[int, int], dtype: Any) -> None:
        r = min(shape)
        self.X = np.empty(shape, dtype)
        self.Y = np.empty(shape, dtype)
        self.A = np.empty((r, r), dtype)
        self.B = np.empty((r, r), dtype)
        # The fused passes read and write float32: products in another type go through this.
        self.U = self.X if dtype == np.float32 else np.empty(shape, np.float32)


def _iterate(work: _Workspace, coefficients: Tuple[float, float, float], steps: int) -> np.ndarray:
    """The Newton-Schulz iterations on ``work.X`` (already normalised); returns the array that
    holds the result (X or Y). A matrix with more rows than columns is iterated as torch iterates
    its transpose, without transposing: A = X^T X and X = a X + X B (B is symmetric)."""
    a, b, c = coefficients
    X, Y, A, B = work.X, work.Y, work.A, work.B
    wide = X.shape[0] <= X.shape[1]
    for _ in range(steps):
        if wide:
            np.matmul(X, X.T, out=A)
        else:
            np.matmul(X.T, X, out=A)
        np.matmul(A, A, out=B)
        B *= c
        A *= b  # A is not needed after this
        B += A  # B = b A + c A A
        if wide:
            np.matmul(B, X, out=Y)
        else:
            np.matmul(X, B, out=Y)
        X *= a
        Y += X  # Y = a X + B X
        X, Y = Y, X
    return X


def newton_schulz(
    G: np.ndarray,
    coefficients: Sequence[float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = EPS,
    dtype: Any = np.float32,
) -> np.ndarray:
    """torch.optim.Muon's orthogonalisation of a 2-D array, in ``dtype`` (a new array):
    X = G / max(||G||_F, eps), then ``steps`` times A = X X^T, B = b A + c A A, X = a X + B X
    (on the transpose when G has more rows than columns)."""
    G = np.asarray(G)
    if G.ndim != 2:
        raise ValueError(f"newton_schulz takes a 2-D array, got shape {G.shape}")
    work = _Workspace(G.shape, dtype)
    work.X[...] = G
    norm = float(np.sqrt(np.sum(np.square(G, dtype=np.float64))))
    work.X /= max(norm, eps)
    a, b, c = (float(x) for x in coefficients)
    return _iterate(work, (a, b, c), int(steps)).copy()


class Muon(Optimizer):
    __doc__ = _DOC
    _rule = _RULE
    _transient_attrs = Optimizer._transient_attrs + ("_workspaces",)

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: Optional[str] = None,
        *,
        ns_dtype: Any = "float32",
        foreach: Any = None,
        fused: Any = None,
        differentiable: Any = False,
        capturable: Any = False,
    ) -> None:
        check_execution_flags(
            foreach=foreach, fused=fused, differentiable=differentiable, capturable=capturable
        )
        self.ns_dtype = _ns_dtype(ns_dtype)
        self._workspaces: Dict[Tuple[int, int], _Workspace] = {}
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)

    def _validate(
        self, core: Dict[str, Any], labels: Optional[Dict[str, str]] = None
    ) -> Dict[str, Any]:
        return validate(core, labels)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        with self._lock:
            super().add_param_group(param_group)
            params = self.param_groups[-1]["params"]
            bad = [p for p in params if p.ndim != 2]
            if bad:
                self.param_groups.pop()
                raise ValueError(
                    "Muon only supports 2D parameters whereas we found a parameter with "
                    f"size: {bad[0].shape}"
                )
            before = sum(len(g["params"]) for g in self.param_groups[:-1])
            try:
                require_float32(params, "params", "Muon", list(range(before, before + len(params))))
            except TypeError:
                self.param_groups.pop()
                raise

    def _workspace(self, shape: Tuple[int, int]) -> _Workspace:
        if self._workspaces is None:  # after unpickling (a transient attribute)
            self._workspaces = {}
        work = self._workspaces.get(shape)
        if work is None or work.X.dtype != self.ns_dtype:
            work = self._workspaces[shape] = _Workspace(shape, self.ns_dtype)
        return work

    def step(
        self,
        grads: Sequence[Optional[np.ndarray]],
        *,
        max_grad_norm: Optional[float] = None,
        norm_type: float = 2.0,
        skip_if_nonfinite: bool = False,
    ) -> Optional[float]:
        """One Muon update of every parameter whose gradient is not None (arguments as
        :meth:`optkern.Optimizer.step`)."""
        with self._lock:
            if self._in_lr:
                self._not_reentered("step()")
            work = self._plan(grads)
            for _, params, group_grads, positions in work:
                _core.check_grads(params, group_grads, positions=positions)
                require_float32(group_grads, "grads", "Muon", positions)
            hyper = [self._hyper(group) for group, *_ in work]
            norm, scale, skip = self._clipping(work, max_grad_norm, norm_type, skip_if_nonfinite)
            if skip:
                self.skipped_steps += 1
                return norm
            for (group, params, group_grads, _), core in zip(work, hyper):
                self._step_group(group, core, params, group_grads, scale)
            self._counter[0] += 1
            return norm

    def _step_group(
        self,
        group: Dict[str, Any],
        core: Dict[str, Any],
        params: List[np.ndarray],
        grads: List[np.ndarray],
        scale: float,
    ) -> None:
        states = [self.state.get_by_id(p) for p in params]
        missing = [i for i, s in enumerate(states) if s is None or "momentum_buffer" not in s]
        if missing:
            fresh = [dict(states[i] or {}) for i in missing]
            _pack(
                fresh,
                "momentum_buffer",
                [params[i].shape for i in missing],
                0.0,
                [params[i].dtype for i in missing],
            )
            for i, s in zip(missing, fresh):
                self.state[params[i]] = s
                states[i] = s
        coefficients = (core["ns_a"], core["ns_b"], core["ns_c"])
        decay = 1.0 - core["lr"] * core["weight_decay"]
        for p, g, s in zip(params, grads, states):
            work = self._workspace(p.shape)
            sumsq = _core.muon_momentum(
                g,
                s["momentum_buffer"],
                work.U,
                momentum=core["momentum"],
                nesterov=core["nesterov"],
                grad_scale=scale,
            )
            if work.U is not work.X:
                work.X[...] = work.U
            work.X /= max(math.sqrt(sumsq), core["eps"])
            out = _iterate(work, coefficients, core["ns_steps"])
            if out.dtype != np.float32:
                work.U[...] = out
                out = work.U
            lr = adjusted_lr(core["lr"], core["adjust_lr_fn"], p.shape)
            _core.muon_update(p, out, decay=decay, coeff=-lr)


def _ns_dtype(value: Any) -> Any:
    for name, dtype in NS_DTYPES.items():
        if value == name or value is dtype or (isinstance(value, np.dtype) and value == dtype):
            return dtype
    raise ValueError(
        f"ns_dtype must be one of {', '.join(map(repr, NS_DTYPES))}, got {value!r} (bfloat16: "
        "optkern.torch.Muon, through torch)"
    )
