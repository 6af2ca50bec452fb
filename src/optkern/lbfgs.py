"""L-BFGS (torch.optim.LBFGS) for NumPy parameters, with a closure returning ``(loss, grads)``.

torch's two-loop recursion makes two passes over the whole history per iteration and pair (a dot
product, then an axpy, twice): about 10 k vector passes for k pairs. Here the recursion runs on
numbers: the history's inner products (s_i . y_j and y_i . y_j for every pair, kept from
iteration to iteration in two small matrices, and the new gradient's products with every s_i and
y_i) are computed in one fused pass over the history, the recursion then runs on k x k numbers,
and the direction (a combination of the gradient and the history) is written in a second fused
pass: 4 k vector reads per iteration. The iterates are torch's up to rounding: the same
algorithm, with its line search and stopping rules, and the same state (``state_dict()`` in
torch's layout).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _core
from .optimizer import Optimizer, require_float32
from .registry import Hyper, Rule, check_execution_flags

__all__ = ["LBFGS"]

_DOC = r"""L-BFGS (torch.optim.LBFGS), for float32 arrays (float64 ones are refused: its fused passes
are float32 only), one parameter group.

``step(closure)``: ``closure()`` evaluates the model at the parameters' current values and
returns ``(loss, grads)``, grads aligned with the parameters (None for a parameter without a
gradient: zeros). ``step`` calls it up to ``max_eval`` times and returns the first loss.

Each iteration (torch's algorithm): with y = g - g_prev and s = t d, the pair (s, y) joins the
history (at most ``history_size`` pairs, the oldest dropped) when y . s > 1e-10, with
H = y . s / y . y; the two-loop recursion over the history gives d = -H_k g (d = -g on the first
iteration); the step length t is lr (min(1, 1 / sum|g|) * lr on the first iteration), or the
result of a strong-Wolfe line search (``line_search_fn="strong_wolfe"``); then p <- p + t d.
Stops after ``max_iter`` iterations or ``max_eval`` evaluations, when max|g| <=
``tolerance_grad``, when g . d > -``tolerance_change``, or when max|t d| or the change of the loss
is below ``tolerance_change``.

State (of the first parameter, in torch's layout): ``func_evals``, ``n_iter``, ``d``, ``t``,
``old_dirs`` (the y's), ``old_stps`` (the s's), ``ro``, ``H_diag``, ``prev_flat_grad``,
``prev_loss`` and ``al``; vectors are flat float32 arrays over all parameters in order."""

_RULE = Rule(
    name="lbfgs",
    cls="LBFGS",
    doc=_DOC,
    counts_steps=False,
    uses_step=False,
    kernel="",
    weight=0,
    hyper=(
        Hyper("lr", "nonnegative", 1.0, "lr", -1),
        Hyper("max_iter", "count", 20, "max_iter", -1),
        Hyper("max_eval", "count", None, "max_eval", -1),
        Hyper("tolerance_grad", "real", 1e-7, "tolerance_grad", -1),
        Hyper("tolerance_change", "real", 1e-9, "tolerance_change", -1),
        Hyper("history_size", "count", 100, "history_size", -1),
        Hyper("line_search_fn", "choice", None, "line_search_fn", -1),
    ),
    states=(),
)

#: The pair (s, y) joins the history only when y . s exceeds this (torch's constant).
CURVATURE_MIN = 1e-10
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_GROUPS_ERROR = "LBFGS doesn't support per-parameter options (parameter groups)"


def _count(name: str, value: Any, lo: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if int(value) < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def _real(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def validate(core: Dict[str, Any], labels: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """LBFGS's hyperparameters, checked (max_eval None means max_iter * 5 // 4, as torch)."""
    name = (labels or {}).get
    out: Dict[str, Any] = {}
    lr = _real(name("lr", "lr"), core["lr"])
    if not 0.0 <= lr <= _FLOAT32_MAX:
        raise ValueError(f"Invalid learning rate: {core['lr']!r}")
    out["lr"] = lr
    out["max_iter"] = _count("max_iter", core["max_iter"], 0)
    max_eval = core["max_eval"]
    out["max_eval"] = (
        out["max_iter"] * 5 // 4 if max_eval is None else _count("max_eval", max_eval, 0)
    )
    out["tolerance_grad"] = _real("tolerance_grad", core["tolerance_grad"])
    out["tolerance_change"] = _real("tolerance_change", core["tolerance_change"])
    out["history_size"] = _count("history_size", core["history_size"], 1)
    fn = core["line_search_fn"]
    if fn is not None and fn != "strong_wolfe":
        raise ValueError(f"line_search_fn must be None or 'strong_wolfe', got {fn!r}")
    out["line_search_fn"] = fn
    if core.get("maximize", False) is not False:
        raise ValueError("LBFGS has no maximize option (torch.optim.LBFGS neither)")
    out["maximize"] = False
    return out


# -- the fused passes (C++, optkern._core: one call each, threads split by fixed blocks) -------------
#
# _core.lbfgs_history(g, gp, d, t, y, s, S, Y): y <- g - gp, s <- t d, gp <- g; returns
#     ([y.s, y.y, g.s, g.y], [[s_j.y, s_j.g, y_j.y, y_j.s, y_j.g] for each pair j]).
# _core.lbfgs_direction(g, cg, S, cs, Y, cy, d): d <- cg g + sum_j (cy_j y_j + cs_j s_j);
#     returns (g.d, max|d|).
# _core.lbfgs_take(g, out, d): out <- g (flat); returns (g.d, max|g|).
# _core.lbfgs_point(params, x, d, t): p <- x + t d.
# g is a list of arrays (the closure's gradients, or views of a flat copy); the other vectors are
# flat float32 arrays over all parameters in order.


# -- the history ----------------------------------------------------------------------------------


class _History:
    """The (s, y) pairs, oldest first, with their inner products: SY[i, j] = s_i . y_j and
    YY[i, j] = y_i . y_j. Arrays of dropped pairs are reused for new ones."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.S: List[np.ndarray] = []
        self.Y: List[np.ndarray] = []
        self.ro: List[float] = []
        self.SY = np.zeros((0, 0))
        self.YY = np.zeros((0, 0))
        self.spare: List[Tuple[np.ndarray, np.ndarray]] = []

    def clear(self) -> None:
        self.spare += list(zip(self.S, self.Y))
        self.S, self.Y, self.ro = [], [], []
        self.SY = np.zeros((0, 0))
        self.YY = np.zeros((0, 0))

    def take(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """Arrays for a candidate pair (s, y), not yet in the history."""
        while self.spare:
            s, y = self.spare.pop()
            if s.size == n:
                return s, y
        return np.empty(n, np.float32), np.empty(n, np.float32)

    def push(self, s: np.ndarray, y: np.ndarray, ro: float, new: np.ndarray, per: np.ndarray):
        """Appends the pair (dropping the oldest when full), its products from _core.lbfgs_history."""
        k = len(self.S)
        SY = np.empty((k + 1, k + 1))
        YY = np.empty((k + 1, k + 1))
        SY[:k, :k], YY[:k, :k] = self.SY, self.YY
        SY[:k, k] = per[:, 0]  # s_j . y
        SY[k, :k] = per[:, 3]  # s . y_j
        YY[:k, k] = YY[k, :k] = per[:, 2]
        SY[k, k] = new[0]
        YY[k, k] = new[1]
        self.S.append(s)
        self.Y.append(y)
        self.ro.append(ro)
        if k == self.size:
            self.spare.append((self.S.pop(0), self.Y.pop(0)))
            self.ro.pop(0)
            SY, YY = SY[1:, 1:], YY[1:, 1:]
        self.SY, self.YY = np.ascontiguousarray(SY), np.ascontiguousarray(YY)

    def two_loop(
        self, H: float, gS: np.ndarray, gY: np.ndarray
    ) -> Tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """torch's two-loop recursion on the inner products: d = -H_k g as cg g + sum cy_j y_j +
        cs_j s_j; returns (cg, cs, cy, al). A diverging run overflows to inf and NaN silently,
        as torch's recursion on tensors does."""
        k = len(self.S)
        ro, SY, YY = self.ro, self.SY, self.YY
        qc = np.zeros(k)  # q = -g + sum_j qc_j y_j
        al = np.zeros(k)
        with np.errstate(all="ignore"):
            for i in range(k - 1, -1, -1):
                al[i] = (-gS[i] + float(SY[i, i + 1 :] @ qc[i + 1 :])) * ro[i]
                qc[i] = -al[i]
            rs = np.zeros(k)  # r = H q + sum_j rs_j s_j
            for i in range(k):
                yr = H * (-gY[i] + float(YY[i] @ qc)) + float(rs[:i] @ SY[:i, i])
                rs[i] = al[i] - yr * ro[i]
            return -H, rs, H * qc, al


# -- the algorithm ---------------------------------------------------------------------------------


class Saved:
    """The state torch's LBFGS keeps (on its first parameter), as the engine works with it:
    vectors as flat float32 NumPy arrays, numbers as Python floats. ``tokens``: the objects
    the state's history lists held when read, by which the engine knows its cached inner
    products still describe them."""

    __slots__ = (
        "func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
        "prev_flat_grad", "prev_loss", "al", "tokens",
    )  # fmt: skip

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, values.get(name))


class StateIO:
    """How an optimizer's state dict holds the engine's values (optkern.LBFGS: as they are;
    optkern.torch.LBFGS: as tensors sharing the arrays' memory)."""

    def read(self, state: Dict[str, Any]) -> Saved:
        ro = state.get("ro")
        return Saved(
            func_evals=int(state.get("func_evals", 0)),
            n_iter=int(state.get("n_iter", 0)),
            d=state.get("d"),
            t=_number(state.get("t")),
            old_dirs=list(state.get("old_dirs") or ()),
            old_stps=list(state.get("old_stps") or ()),
            ro=None if ro is None else [float(r) for r in ro],
            H_diag=_number(state.get("H_diag")),
            prev_flat_grad=state.get("prev_flat_grad"),
            prev_loss=_number(state.get("prev_loss")),
            al=None if state.get("al") is None else [_number(a) for a in state["al"]],
            tokens=tuple(state.get("old_dirs") or ()) + tuple(state.get("old_stps") or ()),
        )

    def write(self, state: Dict[str, Any], saved: Saved) -> tuple:
        """Stores the engine's values; returns the tokens of the history lists now there."""
        state.update(
            func_evals=saved.func_evals,
            n_iter=saved.n_iter,
            d=saved.d,
            t=saved.t,
            old_dirs=list(saved.old_dirs),
            old_stps=list(saved.old_stps),
            ro=list(saved.ro),
            H_diag=saved.H_diag,
            prev_flat_grad=saved.prev_flat_grad,
            prev_loss=saved.prev_loss,
        )
        if saved.al is not None:
            state["al"] = list(saved.al)
        return tuple(saved.old_dirs) + tuple(saved.old_stps)

    def scalar(self, value: float) -> float:
        """A number of the history (ro, H_diag) as the state keeps it: exactly (optkern.torch
        keeps them in float32 tensors, as torch, and rounds them here, so that a run resumed
        from its state dict reads the very values the running one uses)."""
        return value

    def counts(self, state: Dict[str, Any], func_evals: int, n_iter: int) -> None:
        """Records the counters alone (a step that returns before iterating)."""
        state["func_evals"] = func_evals
        state["n_iter"] = n_iter


def _number(v: Any) -> Any:
    return None if v is None else float(v)


class Engine:
    """torch's L-BFGS step (its two-loop recursion on the history's inner products, its
    strong-Wolfe line search, its stopping rules) over parameters given as NumPy arrays, with a
    cache of the history's inner products that outlives a step."""

    def __init__(self) -> None:
        self.history: Optional[_History] = None
        self.tokens: tuple = ()

    def memory(self, saved: Saved, history_size: int, sizes: List[int]) -> _History:
        """The history as the state holds it: rebuilt when the state's lists are not the arrays
        it last left there (a loaded state dict), its inner products recomputed with the very sums
        the history pass makes, so a loaded run goes on as the saved one would have."""
        h = self.history
        if (
            h is not None
            and h.size == history_size
            and len(saved.tokens) == len(self.tokens)
            and all(a is b for a, b in zip(saved.tokens, self.tokens))
        ):
            return h
        h = _History(history_size)
        if saved.old_dirs:
            n = sum(sizes)
            for name, vs in (("old_dirs", saved.old_dirs), ("old_stps", saved.old_stps)):
                for i, v in enumerate(vs):
                    if not isinstance(v, np.ndarray) or v.shape != (n,) or v.dtype != np.float32:
                        raise ValueError(
                            f"state {name}[{i}] must be a flat float32 vector of {n} elements"
                        )
            if len(saved.old_stps) != len(saved.old_dirs) or len(saved.ro or ()) != len(
                saved.old_dirs
            ):
                raise ValueError("state old_dirs, old_stps and ro must have the same length")
            h.Y = list(saved.old_dirs)
            h.S = list(saved.old_stps)
            h.ro = list(saved.ro)
            h.SY, h.YY = _core.lbfgs_gram(h.S, h.Y, sizes)
        self.history = h
        self.tokens = saved.tokens
        return h

    def step(
        self,
        core: Dict[str, Any],
        params: List[np.ndarray],
        state: Dict[str, Any],
        evaluate: Callable[[], Tuple[Any, List[np.ndarray]]],
        io: StateIO,
    ) -> Any:
        """One step: ``evaluate()`` returns (loss, gradients as NumPy arrays aligned with
        ``params``) at the parameters' current values. Returns the first loss as evaluated."""
        lr, max_iter, max_eval = core["lr"], core["max_iter"], core["max_eval"]
        tolerance_grad, tolerance_change = core["tolerance_grad"], core["tolerance_change"]
        sizes = [p.size for p in params]
        n = sum(sizes)
        saved = io.read(state)
        orig_loss, g = evaluate()
        loss = _loss_value(orig_loss)
        current_evals = 1
        saved.func_evals += 1
        if _max_abs(g) <= tolerance_grad:
            io.counts(state, saved.func_evals, saved.n_iter)
            return orig_loss

        hist = self.memory(saved, core["history_size"], sizes)
        d, t, H_diag = saved.d, saved.t, saved.H_diag
        prev_flat_grad, prev_loss, al = saved.prev_flat_grad, saved.prev_loss, saved.al
        for name, v in (("d", d), ("prev_flat_grad", prev_flat_grad)):
            if v is not None and (v.shape != (n,) or v.dtype != np.float32):
                raise ValueError(f"state {name} must be a flat float32 vector of {n} elements")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            saved.n_iter += 1
            if saved.n_iter == 1:
                hist.clear()
                H_diag = 1.0
                if d is None:
                    d = np.empty(n, np.float32)
                if prev_flat_grad is None:
                    prev_flat_grad = np.empty(n, np.float32)
                _core.lbfgs_take(g, prev_flat_grad, d)
                gtd, d_max = _core.lbfgs_direction(g, -1.0, [], [], [], [], d)
            else:
                s_new, y_new = hist.take(n)
                new, per = _core.lbfgs_history(
                    g, prev_flat_grad, d, float(t), y_new, s_new, hist.S, hist.Y
                )
                ys, yy = new[0], new[1]
                gS = np.append(per[:, 1], new[2])
                gY = np.append(per[:, 4], new[3])
                if ys > CURVATURE_MIN:
                    dropped = len(hist.S) == hist.size
                    hist.push(s_new, y_new, io.scalar(1.0 / ys), new, per)
                    H_diag = io.scalar(ys / yy)
                    if dropped:
                        gS, gY = gS[1:], gY[1:]
                else:
                    hist.spare.append((s_new, y_new))
                    gS, gY = gS[:-1], gY[:-1]
                if al is None or len(al) != hist.size:
                    al = [None] * hist.size
                cg, cs, cy, a = hist.two_loop(float(H_diag), gS, gY)
                al[: len(a)] = [float(x) for x in a]
                gtd, d_max = _core.lbfgs_direction(g, cg, hist.S, cs.tolist(), hist.Y, cy.tolist(), d)
            prev_loss = loss
            if saved.n_iter == 1:
                t = min(1.0, 1.0 / _core.grad_norms(list(g), 1.0)[1]) * lr
            else:
                t = lr
            if gtd > -tolerance_change:
                break
            ls_func_evals = 0
            if core["line_search_fn"] is not None:
                loss, g, t, ls_func_evals, g_max = _strong_wolfe(
                    evaluate, params, t, d, d_max, loss, g, gtd, max_eval - current_evals, n
                )
                opt_cond = g_max <= tolerance_grad
            else:
                _core.stream_axpy(list(params), _views(d, params), t)
                opt_cond = False
                if n_iter != max_iter:
                    loss_obj, g = evaluate()
                    loss = _loss_value(loss_obj)
                    opt_cond = _max_abs(g) <= tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            saved.func_evals += ls_func_evals
            if n_iter == max_iter:
                break
            if current_evals >= max_eval:
                break
            if opt_cond:
                break
            if abs(t) * d_max <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break
        saved.d, saved.t, saved.H_diag = d, t, H_diag
        saved.old_dirs, saved.old_stps, saved.ro = list(hist.Y), list(hist.S), list(hist.ro)
        saved.prev_flat_grad, saved.prev_loss, saved.al = prev_flat_grad, prev_loss, al
        self.tokens = io.write(state, saved)
        return orig_loss


def _loss_value(loss: Any) -> float:
    """A closure's loss as a float (a tensor detached first, as torch's LBFGS reads it)."""
    detach = getattr(loss, "detach", None)
    return float(detach() if callable(detach) else loss)


def _max_abs(grads: Sequence[np.ndarray]) -> float:
    return _core.grad_norms(list(grads), math.inf)[1] if grads else 0.0


def _strong_wolfe(
    evaluate: Callable[[], Tuple[Any, List[np.ndarray]]],
    params: List[np.ndarray],
    t: float,
    d: np.ndarray,
    d_norm: float,
    f: float,
    g: List[np.ndarray],
    gtd: float,
    max_ls: int,
    n: int,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
) -> Tuple[float, List[np.ndarray], float, int, float]:
    """torch's _strong_wolfe: (loss, grads, t, evaluations, max|grads|) at the step length it
    settles on, where it leaves the parameters (x + t d). Each evaluation's gradient is copied
    (the closure may reuse its arrays) in the pass that takes its g.d and max|g|."""
    x = np.empty(n, np.float32)
    _core.lbfgs_take(params, x, d)
    g0 = np.empty(n, np.float32)
    _, g0_max = _core.lbfgs_take(g, g0, d)

    def at(step: float) -> Tuple[float, np.ndarray, float, float]:
        _core.lbfgs_point(params, x, d, step)
        loss, grads = evaluate()
        out = np.empty(n, np.float32)
        gtd_new, g_max = _core.lbfgs_take(grads, out, d)
        return _loss_value(loss), out, gtd_new, g_max

    f_new, g_new, gtd_new, m_new = at(t)
    ls_func_evals = 1
    t_prev, f_prev, g_prev, gtd_prev, m_prev = 0.0, f, g0, gtd, g0_max
    done = False
    ls_iter = 0
    bracket: List[float] = []
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            bracket_m = [m_prev, m_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g, bracket_m = [t], [f_new], [g_new], [m_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            bracket_m = [m_prev, m_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(
            t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step)
        )
        t_prev, f_prev, g_prev, gtd_prev, m_prev = tmp, f_new, g_new, gtd_new, m_new
        f_new, g_new, gtd_new, m_new = at(t)
        ls_func_evals += 1
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f = [0.0, t], [f, f_new]
        bracket_g, bracket_m = [g0, g_new], [g0_max, m_new]
        bracket_gtd = [gtd, gtd_new]  # unused: torch's loop below stops at once here
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(
            bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
        )
        hi, lo = max(bracket), min(bracket)
        eps = 0.1 * (hi - lo)
        if min(hi - t, t - lo) < eps:
            if insuf_progress or t >= hi or t <= lo:
                t = hi - eps if abs(t - hi) < abs(t - lo) else lo + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new, gtd_new, m_new = at(t)
        ls_func_evals += 1
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
            bracket_m[high_pos] = m_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
                bracket_m[high_pos] = bracket_m[low_pos]
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new, gtd_new
            bracket_m[low_pos] = m_new
    t = bracket[low_pos]
    _core.lbfgs_point(params, x, d, t)
    return (
        bracket_f[low_pos],
        _views(bracket_g[low_pos], params),
        t,
        ls_func_evals,
        (bracket_m[low_pos]),
    )


# -- the optimizer --------------------------------------------------------------------------------


class LBFGS(Optimizer):
    __doc__ = _DOC
    _rule = _RULE
    _transient_attrs = Optimizer._transient_attrs + ("_engine",)

    def __init__(
        self,
        params: Any,
        lr: float = 1,
        max_iter: int = 20,
        max_eval: Optional[int] = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: Optional[str] = None,
        *,
        foreach: Any = None,
        fused: Any = None,
        differentiable: Any = False,
        capturable: Any = False,
    ) -> None:
        check_execution_flags(
            foreach=foreach, fused=fused, differentiable=differentiable, capturable=capturable
        )
        if max_eval is None:
            max_eval = _count("max_iter", max_iter, 0) * 5 // 4
        self._engine: Optional[Engine] = Engine()
        defaults = dict(
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
        )
        super().__init__(params, defaults)

    def _validate(
        self, core: Dict[str, Any], labels: Optional[Dict[str, str]] = None
    ) -> Dict[str, Any]:
        return validate(core, labels)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        with self._lock:
            if self.param_groups:
                raise ValueError(_GROUPS_ERROR)
            super().add_param_group(param_group)
            try:
                require_float32(self.param_groups[0]["params"], "params", "LBFGS")
            except TypeError:
                self.param_groups.pop()
                raise

    @property
    def _params(self) -> List[np.ndarray]:
        return self.param_groups[0]["params"]

    def _evaluate(self, closure: Callable[[], Any]) -> Tuple[Any, List[np.ndarray]]:
        """Calls the closure: (its loss as returned, its gradients checked against the
        parameters, None entries as zeros)."""
        out = closure()
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(
                "the closure must return (loss, grads), grads aligned with the parameters; got "
                f"{type(out).__name__}"
            )
        loss, grads = out
        params = self._params
        if not isinstance(grads, (list, tuple)) or isinstance(grads, np.ndarray):
            raise TypeError(
                f"the closure's grads must be a list of arrays, got {type(grads).__name__}"
            )
        if len(grads) != len(params):
            raise ValueError(
                f"the closure returned {len(grads)} gradients for {len(params)} parameters"
            )
        grads = [np.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        _core.check_grads(params, grads)
        require_float32(grads, "grads", "LBFGS")
        try:
            float(loss)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"the closure's loss must be a real number, got {type(loss).__name__}"
            ) from e
        return loss, grads

    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Runs up to ``max_iter`` L-BFGS iterations; returns the closure's first loss."""
        if not callable(closure):
            raise TypeError(
                f"LBFGS.step needs a closure returning (loss, grads), got {type(closure).__name__}"
            )
        with self._lock:
            if self._in_lr:
                self._not_reentered("step()")
            core = self._hyper(self.param_groups[0])
            params = self._params
            state = self.state.get_by_id(params[0])
            if state is None:
                state = {}
                self.state[params[0]] = state
            if self._engine is None:  # after unpickling (a transient attribute)
                self._engine = Engine()
            self._counter[0] += 1
            return self._engine.step(core, params, state, lambda: self._evaluate(closure), _IO)


_IO = StateIO()


def _views(flat: np.ndarray, params: Sequence[np.ndarray]) -> List[np.ndarray]:
    """``flat`` cut into views shaped like the parameters."""
    out, at = [], 0
    for p in params:
        out.append(flat[at : at + p.size].reshape(p.shape))
        at += p.size
    return out


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None) -> float:
    """The minimiser of the cubic through (x1, f1, g1) and (x2, f2, g2), within bounds (torch's
    _cubic_interpolate, from minFunc's polyinterp)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0
