"""Float64 NumPy references of the optimizers that are not one element-wise rule: the row-sparse
updates (torch's SparseAdam, Adagrad and SGD on sparse gradients), Muon and L-BFGS, written from
torch.optim's definitions (torch 2.13) and independent of optkern's code.

Row-sparse gradients are (indices, values) pairs; duplicate indices are summed in the order they
appear, as torch's ``coalesce`` does.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np


def coalesce(indices: np.ndarray, values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sorted unique rows, their summed values in float64), each row's duplicates added in the
    order they appear."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float64)
    rows = np.unique(indices)
    out = np.zeros((len(rows),) + values.shape[1:], dtype=np.float64)
    where = {int(r): k for k, r in enumerate(rows)}
    seen = np.zeros(len(rows), dtype=bool)
    for j, r in enumerate(indices):
        k = where[int(r)]
        out[k] = values[j] if not seen[k] else out[k] + values[j]
        seen[k] = True
    return rows, out


def to_dense(indices: np.ndarray, values: np.ndarray, rows: int) -> np.ndarray:
    """The dense float64 gradient of a row-sparse one (absent rows are zero)."""
    idx, vals = coalesce(indices, values)
    out = np.zeros((rows,) + vals.shape[1:], dtype=np.float64)
    out[idx] = vals
    return out


class SparseAdamRef:
    """torch.optim.SparseAdam for one dense parameter: only the rows present in the gradient are
    touched; the bias corrections come from the parameter's step count, which every step
    advances (an empty gradient included)."""

    def __init__(self, p0: np.ndarray, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
        self.p = np.array(p0, dtype=np.float64)
        self.exp_avg = np.zeros_like(self.p)
        self.exp_avg_sq = np.zeros_like(self.p)
        self.step_count = 0
        self.lr, (self.beta1, self.beta2), self.eps, self.maximize = lr, betas, eps, maximize

    def step(self, indices: np.ndarray, values: np.ndarray) -> None:
        self.step_count += 1
        if len(indices) == 0:
            return
        rows, g = coalesce(indices, values)
        if self.maximize:
            g = -g
        m, v = self.exp_avg[rows], self.exp_avg_sq[rows]
        m = m + (g - m) * (1 - self.beta1)
        v = v + (g * g - v) * (1 - self.beta2)
        self.exp_avg[rows], self.exp_avg_sq[rows] = m, v
        t = self.step_count
        step_size = self.lr * math.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)
        self.p[rows] -= step_size * (m / (np.sqrt(v) + self.eps))

    def state(self) -> dict:
        return {"step": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}


class SparseAdagradRef:
    """torch.optim.Adagrad on a sparse gradient: the rows present get ``sum += g^2`` and
    ``p -= clr * g / (sqrt(sum) + eps)``, clr = lr / (1 + (step - 1) * lr_decay); every step
    advances the step count."""

    def __init__(
        self, p0, lr=1e-2, lr_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, maximize=False
    ):
        self.p = np.array(p0, dtype=np.float64)
        self.sum = np.full_like(self.p, initial_accumulator_value)
        self.step_count = 0
        self.lr, self.lr_decay, self.eps, self.maximize = lr, lr_decay, eps, maximize

    def step(self, indices: np.ndarray, values: np.ndarray) -> None:
        self.step_count += 1
        if len(indices) == 0:
            return
        rows, g = coalesce(indices, values)
        if self.maximize:
            g = -g
        clr = self.lr / (1 + (self.step_count - 1) * self.lr_decay)
        s = self.sum[rows] + g * g
        self.sum[rows] = s
        self.p[rows] -= clr * g / (np.sqrt(s) + self.eps)

    def state(self) -> dict:
        return {"step": self.step_count, "sum": self.sum}


class SparseSGDRef:
    """torch.optim.SGD on a sparse gradient. Without momentum and weight decay only the rows
    present move (``p -= lr * g``); otherwise the update is SGD's on the dense gradient (zero on
    absent rows): torch's momentum buffer decays every row, and its weight decay adds
    ``weight_decay * p`` to every row."""

    def __init__(
        self, p0, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
        maximize=False,
    ):  # fmt: skip
        self.p = np.array(p0, dtype=np.float64)
        self.buf: Optional[np.ndarray] = None
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov, self.maximize = weight_decay, nesterov, maximize

    def step(self, indices: np.ndarray, values: np.ndarray) -> None:
        if self.momentum == 0 and self.weight_decay == 0:
            if len(indices) == 0:
                return
            rows, g = coalesce(indices, values)
            self.p[rows] -= self.lr * (-g if self.maximize else g)
            return
        g = to_dense(indices, values, self.p.shape[0]).reshape(self.p.shape)
        if self.maximize:
            g = -g
        if self.weight_decay != 0:
            g = g + self.weight_decay * self.p
        if self.momentum != 0:
            if self.buf is None:
                self.buf = g.copy()
            else:
                self.buf = self.momentum * self.buf + (1 - self.dampening) * g
            g = g + self.momentum * self.buf if self.nesterov else self.buf
        self.p -= self.lr * g


# -- Muon ------------------------------------------------------------------------------------------

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    G: np.ndarray, coefficients=MUON_COEFFICIENTS, steps: int = 5, eps: float = 1e-7
) -> np.ndarray:
    """torch.optim.Muon's orthogonalisation in float64: X = G / max(||G||_F, eps), transposed
    when it has more rows than columns, then ``steps`` times A = X X^T, B = b A + c A A,
    X = a X + B X; transposed back."""
    a, b, c = coefficients
    X = np.array(G, dtype=np.float64)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / max(float(np.sqrt(np.sum(X * X))), eps)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


def muon_adjusted_lr(lr: float, adjust_lr_fn: Optional[str], shape: Tuple[int, int]) -> float:
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, A / B))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))
    return lr


class MuonRef:
    """torch.optim.Muon for one 2-D parameter, in float64."""

    def __init__(
        self, p0, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
        ns_coefficients=MUON_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None,
    ):  # fmt: skip
        self.p = np.array(p0, dtype=np.float64)
        self.buf = np.zeros_like(self.p)
        self.lr, self.weight_decay, self.momentum, self.nesterov = (
            lr,
            weight_decay,
            momentum,
            nesterov,
        )
        self.coefficients, self.eps, self.ns_steps = ns_coefficients, eps, ns_steps
        self.adjust_lr_fn = adjust_lr_fn

    def step(self, g: np.ndarray) -> None:
        g = np.asarray(g, dtype=np.float64)
        mu = self.momentum
        self.buf = self.buf + (1 - mu) * (g - self.buf)  # buf.lerp_(g, 1 - mu)
        u = g + mu * (self.buf - g) if self.nesterov else self.buf  # g.lerp(buf, mu)
        O = newton_schulz(u, self.coefficients, self.ns_steps, self.eps)
        self.p = self.p * (1 - self.lr * self.weight_decay)
        self.p = self.p - muon_adjusted_lr(self.lr, self.adjust_lr_fn, self.p.shape) * O


# -- L-BFGS ----------------------------------------------------------------------------------------


def cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None) -> float:
    """torch.optim.lbfgs._cubic_interpolate, on Python floats."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def strong_wolfe(obj, x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """torch.optim.lbfgs._strong_wolfe on float64 vectors: obj(x, t, d) -> (f, g) at x + t d."""
    d_norm = float(np.max(np.abs(d)))
    g = g.copy()
    f_new, g_new = obj(x, t, d)
    ls_func_evals = 1
    gtd_new = float(g_new @ d)
    t_prev, f_prev, g_prev, gtd_prev = 0.0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new.copy()], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new.copy()], [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = cubic_interpolate(
            t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step)
        )
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new.copy(), gtd_new
        f_new, g_new = obj(x, t, d)
        ls_func_evals += 1
        gtd_new = float(g_new @ d)
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(
            bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
        )
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = obj(x, t, d)
        ls_func_evals += 1
        gtd_new = float(g_new @ d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new.copy(), gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new.copy(), gtd_new
    t = bracket[low_pos]
    return bracket_f[low_pos], bracket_g[low_pos], t, ls_func_evals


class LBFGSRef:
    """torch.optim.LBFGS on one flat float64 vector ``x``; ``closure(x) -> (loss, grad)``.
    The state keys are torch's."""

    def __init__(
        self, x0, lr=1.0, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
        history_size=100, line_search_fn=None,
    ):  # fmt: skip
        self.x = np.array(x0, dtype=np.float64).reshape(-1)
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        self.lr, self.max_iter, self.max_eval = lr, max_iter, max_eval
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change
        self.history_size, self.line_search_fn = history_size, line_search_fn
        self.state: dict = {"func_evals": 0, "n_iter": 0}
        self.evaluations: List[np.ndarray] = []  # every x the closure saw, in order

    def _eval(self, closure: Callable) -> Tuple[float, np.ndarray]:
        self.evaluations.append(self.x.copy())
        loss, grad = closure(self.x)
        return float(loss), np.asarray(grad, dtype=np.float64).reshape(-1).copy()

    def step(self, closure: Callable[[np.ndarray], Tuple[float, Any]]) -> float:
        state = self.state
        lr, max_iter, max_eval = self.lr, self.max_iter, self.max_eval
        tolerance_grad, tolerance_change = self.tolerance_grad, self.tolerance_change
        orig_loss, flat_grad = self._eval(closure)
        loss = orig_loss
        current_evals = 1
        state["func_evals"] += 1
        if np.max(np.abs(flat_grad)) <= tolerance_grad:
            return orig_loss
        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        H_diag = state.get("H_diag")
        prev_flat_grad, prev_loss = state.get("prev_flat_grad"), state.get("prev_loss")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:
                d = -flat_grad
                old_dirs, old_stps, ro = [], [], []
                H_diag = 1.0
            else:
                y = flat_grad - prev_flat_grad
                s = d * t
                ys = float(y @ s)
                if ys > 1e-10:
                    if len(old_dirs) == self.history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    H_diag = ys / float(y @ y)
                num_old = len(old_dirs)
                if "al" not in state:
                    state["al"] = [None] * self.history_size
                al = state["al"]
                q = -flat_grad
                for i in range(num_old - 1, -1, -1):
                    al[i] = float(old_stps[i] @ q) * ro[i]
                    q = q - al[i] * old_dirs[i]
                d = r = q * H_diag
                for i in range(num_old):
                    be_i = float(old_dirs[i] @ r) * ro[i]
                    r = r + (al[i] - be_i) * old_stps[i]
                d = r
            prev_flat_grad = flat_grad.copy()
            prev_loss = loss
            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / float(np.sum(np.abs(flat_grad)))) * lr
            else:
                t = lr
            gtd = float(flat_grad @ d)
            if gtd > -tolerance_change:
                break
            ls_func_evals = 0
            if self.line_search_fn is not None:
                if self.line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                x_init = self.x.copy()

                def obj(x, step, direction):
                    self.x = x + step * direction
                    out = self._eval(closure)
                    self.x = x.copy()
                    return out

                loss, flat_grad, t, ls_func_evals = strong_wolfe(
                    obj, x_init, t, d, loss, flat_grad, gtd, max_ls=max_eval - current_evals
                )
                self.x = self.x + t * d
                opt_cond = np.max(np.abs(flat_grad)) <= tolerance_grad
            else:
                self.x = self.x + t * d
                opt_cond = False
                if n_iter != max_iter:
                    loss, flat_grad = self._eval(closure)
                    opt_cond = np.max(np.abs(flat_grad)) <= tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals
            if n_iter == max_iter:
                break
            if current_evals >= max_eval:
                break
            if opt_cond:
                break
            if np.max(np.abs(d * t)) <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break
        state.update(
            d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=H_diag,
            prev_flat_grad=prev_flat_grad, prev_loss=prev_loss,
        )  # fmt: skip
        return orig_loss


# -- problems ---------------------------------------------------------------------------------------


def rosenbrock(x: np.ndarray) -> Tuple[float, np.ndarray]:
    """The n-dimensional Rosenbrock function and its gradient (float64)."""
    x = np.asarray(x, dtype=np.float64)
    a, b = x[:-1], x[1:]
    f = float(np.sum(100.0 * (b - a * a) ** 2 + (1 - a) ** 2))
    g = np.zeros_like(x)
    g[:-1] = -400.0 * a * (b - a * a) - 2 * (1 - a)
    g[1:] += 200.0 * (b - a * a)
    return f, g


def logistic_problem(n: int = 400, dim: int = 20, seed: int = 0, l2: float = 1e-3):
    """A seeded logistic-regression problem: (X, y, loss_and_grad(w)) with w = [weights, bias]
    and a small L2 term, in float64."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dim))
    w_true = rng.standard_normal(dim)
    y = (X @ w_true + 0.3 * rng.standard_normal(n) > 0).astype(np.float64)

    def loss_and_grad(w: np.ndarray) -> Tuple[float, np.ndarray]:
        w = np.asarray(w, dtype=np.float64)
        z = X @ w[:-1] + w[-1]
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * (w[:-1] @ w[:-1]))
        r = (1.0 / (1.0 + np.exp(-z)) - y) / n
        g = np.empty_like(w)
        g[:-1] = X.T @ r + l2 * w[:-1]
        g[-1] = r.sum()
        return loss, g

    return X, y, loss_and_grad


def split(flat: np.ndarray, shapes: Sequence[Tuple[int, ...]]) -> List[np.ndarray]:
    out, at = [], 0
    for s in shapes:
        n = int(np.prod(s, dtype=np.int64))
        out.append(flat[at : at + n].reshape(s))
        at += n
    return out
