"""Plain gradient descent ("SGD" on a deterministic loss) against Momentum and Nesterov on an
ill-conditioned problem.

Two problems, both two-dimensional so the paths can be drawn:

* ``quadratic``: ``f(x, y) = (x^2 + kappa * y^2) / 2`` (condition number ``kappa``, default 100),
  started at ``(-10, 1)``. The largest stable step of gradient descent is set by the steep ``y``
  direction (``lr < 2 / kappa``); at the best such step ``y`` flips sign on every update (the
  oscillation across the valley that textbooks describe) while ``x`` creeps along it at a
  rate ``(kappa - 1) / (kappa + 1)`` per step. Momentum averages the alternating ``y`` steps away
  and keeps the consistent ``x`` steps, converging at about ``sqrt(momentum)`` per step.
* ``rosenbrock``: ``f(x, y) = (1 - x)^2 + 100 (y - x^2)^2``, started at ``(-1.2, 1)``, minimum at
  ``(1, 1)`` in a long curved valley.

For a fair comparison every method gets the same number of steps and the learning rate that does
best for it on one grid (``lr_grid``, geometric); momentum is 0.9 for all momentum methods. The
methods: ``SGD`` (plain), ``SGD+momentum`` (torch's heavy ball, ``SGD(momentum=0.9)``),
``Momentum`` (the seed's ``V = beta V + (1 - beta) g`` form) and ``Nesterov``.

Run ``python -m optkern.examples.ill_conditioned --plot ic.png`` (or ``examples/ill_conditioned.py``).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

import optkern as ok
from optkern._platform import describe_machine
from optkern.examples._common import (
    fmt,
    format_table,
    new_figure,
    no_matplotlib_note,
    print_report,
    save_figure,
)

METHODS: Dict[str, Callable[[list, float], ok.Optimizer]] = {
    "SGD": lambda p, lr: ok.SGD(p, lr=lr),
    "SGD+momentum": lambda p, lr: ok.SGD(p, lr=lr, momentum=0.9),
    "Momentum": lambda p, lr: ok.Momentum(p, lr=lr, beta=0.9),
    "Nesterov": lambda p, lr: ok.Nesterov(p, lr=lr, momentum=0.9),
}


class Problem:
    def __init__(
        self,
        name: str,
        f: Callable,
        grad: Callable,
        start: Tuple[float, float],
        minimum: Tuple[float, float],
        steep: Optional[int] = None,
    ) -> None:
        self.name, self.f, self.grad = name, f, grad
        self.start, self.minimum = np.array(start, np.float64), np.array(minimum, np.float64)
        self.steep = steep  # index of the coordinate along the steepest curvature, if there is one


def quadratic(kappa: float = 100.0) -> Problem:
    h = np.array([1.0, kappa])
    return Problem(
        f"quadratic, kappa={kappa:g}",
        lambda p: 0.5 * float(np.sum(h * p * p)),
        lambda p: h * p,
        (-10.0, 1.0),
        (0.0, 0.0),
        steep=1,
    )


def rosenbrock() -> Problem:
    def f(p):
        x, y = p
        return float((1 - x) ** 2 + 100 * (y - x * x) ** 2)

    def grad(p):
        x, y = p
        return np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])

    return Problem("Rosenbrock", f, grad, (-1.2, 1.0), (1.0, 1.0))


PROBLEMS = {"quadratic": quadratic, "rosenbrock": rosenbrock}


def descend(
    problem: Problem, make: Callable[[list, float], ok.Optimizer], lr: float, steps: int
) -> Dict[str, Any]:
    """``steps`` updates from the problem's start. Returns the path (steps+1, 2), the loss after
    each step and whether it diverged (a non-finite or exploding loss stops the run)."""
    p = problem.start.astype(np.float32)
    opt = make([p], lr)
    path = [p.astype(np.float64)]
    losses = [problem.f(path[0])]
    diverged = False
    with np.errstate(all="ignore"):
        for _ in range(steps):
            g = problem.grad(p.astype(np.float64)).astype(np.float32)
            if not np.all(np.isfinite(g)):
                diverged = True
                break
            opt.step([g])
            q = p.astype(np.float64)
            fq = problem.f(q)
            if not np.isfinite(fq) or fq > 1e6 * max(losses[0], 1.0):
                diverged = True
                break
            path.append(q)
            losses.append(fq)
    return dict(path=np.array(path), losses=np.array(losses), diverged=diverged, lr=lr)


def reversal_fraction(path: np.ndarray) -> float:
    """Fraction of consecutive update pairs that point against each other (negative dot
    product): 1 for a pure zig-zag, 0 for a path that never turns back."""
    d = np.diff(path, axis=0)
    if len(d) < 2:
        return 0.0
    dots = np.sum(d[1:] * d[:-1], axis=1)
    moving = np.linalg.norm(d[1:], axis=1) * np.linalg.norm(d[:-1], axis=1) > 0
    return float(np.mean(dots[moving] < 0)) if np.any(moving) else 0.0


def steep_oscillation(
    path: np.ndarray, minimum: np.ndarray, index: int, visible: float = 1e-3
) -> Tuple[int, Optional[int]]:
    """For the steep coordinate ``c = path[:, index] - minimum[index]``: how many steps flip its
    sign while ``|c| > visible * |c_0|`` (crossings of the valley floor that can be seen), and
    the number of steps after which it stays below that (the oscillation has settled; None if it
    has not by the end of the path)."""
    c = path[:, index] - minimum[index]
    big = np.abs(c) > visible * abs(c[0])
    flips = np.sign(c[1:]) != np.sign(c[:-1])
    count = int(np.sum(flips & big[:-1]))
    settled = int(np.nonzero(big)[0].max()) + 1 if np.any(big) else 0
    return count, (None if big[-1] else settled)


def steps_to(losses: np.ndarray, tol: float) -> Optional[int]:
    below = np.nonzero(losses < tol)[0]
    return int(below[0]) if len(below) else None


def run(
    problem: str = "quadratic",
    steps: int = 200,
    kappa: float = 100.0,
    lr_grid: Union[Sequence[float], Dict[str, Sequence[float]], None] = None,
    tol: float = 1e-6,
    methods: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """For each method, tries every lr in ``lr_grid`` (one grid, or a dict of grids by method) for
    ``steps`` steps and keeps the one with the lowest final loss. Returns ``{"problem", "results": {name: {...}}}`` with, per method,
    the best ``lr``, its ``path`` and ``losses`` (``diverged=True`` and no path when every lr
    diverged), ``final_loss``, ``distance`` to the minimum,
    ``steps_to_tol`` (first step with loss < tol, or None), ``reversal_fraction`` and, for the
    quadratic, ``steep_flips`` / ``steep_settled`` (see :func:`steep_oscillation`)."""
    prob = quadratic(kappa) if problem == "quadratic" else PROBLEMS[problem]()
    if lr_grid is None:
        lr_grid = np.geomspace(1e-4, 1.0, 33)
    names = list(METHODS if methods is None else methods)
    results = {}
    for name in names:
        best = None
        grid = lr_grid[name] if isinstance(lr_grid, dict) else lr_grid
        for lr in grid:
            r = descend(prob, METHODS[name], float(lr), steps)
            if r["diverged"]:
                continue
            if best is None or r["losses"][-1] < best["losses"][-1]:
                best = r
        if best is None:
            results[name] = dict(
                diverged=True,
                lr=None,
                final_loss=float("inf"),
                path=None,
                losses=None,
                distance=float("inf"),
                steps_to_tol=None,
            )
            continue
        best["final_loss"] = float(best["losses"][-1])
        best["distance"] = float(np.linalg.norm(best["path"][-1] - prob.minimum))
        best["steps_to_tol"] = steps_to(best["losses"], tol)
        best["reversal_fraction"] = reversal_fraction(best["path"])
        if prob.steep is not None:
            best["steep_flips"], best["steep_settled"] = steep_oscillation(
                best["path"], prob.minimum, prob.steep
            )
        results[name] = best
    grids = {n: list(lr_grid[n] if isinstance(lr_grid, dict) else lr_grid) for n in names}
    return dict(problem=prob, steps=steps, tol=tol, results=results, grids=grids)


def table(out: Dict[str, Any], markdown: bool = False) -> str:
    rows = []
    steep = out["problem"].steep is not None
    for name, r in out["results"].items():
        if r["diverged"]:
            rows.append([name, "diverged"] + [""] * (6 if steep else 4))
            continue
        row = [
            name,
            fmt(r["lr"], 3),
            fmt(r["final_loss"]),
            fmt(r["distance"]),
            "-" if r["steps_to_tol"] is None else r["steps_to_tol"],
            f"{r['reversal_fraction']:.2f}",
        ]
        if steep:
            row += [
                r["steep_flips"],
                f">{out['steps']}" if r["steep_settled"] is None else r["steep_settled"],
            ]
        rows.append(row)
    single = all(len(g) == 1 for g in out["grids"].values())
    headers = [
        "method",
        "lr" if single else "best lr",
        f"f after {out['steps']} steps",
        "distance to minimum",
        f"steps to f<{out['tol']:g}",
        "reversals",
    ]
    if steep:
        headers += ["y sign flips", "y settled after"]
    return format_table(headers, rows, markdown)


def plot(out: Dict[str, Any], path: str) -> Optional[str]:
    fig = new_figure(figsize=(11, 4.2))
    if fig is None:
        no_matplotlib_note()
        return None
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.4, 1]))
    prob = out["problem"]
    runs = {k: r for k, r in out["results"].items() if not r["diverged"]}
    paths = np.concatenate([r["path"] for r in runs.values()])
    lo = np.minimum(paths.min(0), prob.minimum)
    hi = np.maximum(paths.max(0), prob.minimum)
    pad = 0.08 * (hi - lo) + 1e-3
    xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], 300)
    ys = np.linspace(lo[1] - pad[1], hi[1] + pad[1], 300)
    Xg, Yg = np.meshgrid(xs, ys)
    Z = np.vectorize(lambda a, b: prob.f(np.array([a, b])))(Xg, Yg)
    ax1.contour(Xg, Yg, np.log10(Z + 1e-12), levels=20, colors="0.8", linewidths=0.6)
    for i, (name, r) in enumerate(out["results"].items()):
        if r["diverged"]:
            continue
        p = r["path"]
        style = ["-", "--", ":", "-."][i % 4]
        ax1.plot(
            p[:, 0],
            p[:, 1],
            marker=".",
            ls=style,
            ms=2,
            lw=0.9,
            color=f"C{i}",
            label=f"{name} (lr={r['lr']:.3g})",
        )
        ax2.semilogy(np.maximum(r["losses"], 1e-20), ls=style, color=f"C{i}", label=name)
    ax1.plot(*prob.minimum, "k*", ms=10)
    ax1.set_title(f"{prob.name}: paths from ({prob.start[0]:g}, {prob.start[1]:g})")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("f")
    single = all(len(g) == 1 for g in out["grids"].values())
    ax2.set_title("loss" if single else "loss, each method at its best lr")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="quadratic")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per run (default 200 quadratic, 3000 Rosenbrock)",
    )
    parser.add_argument("--kappa", type=float, default=100.0, help="condition number (quadratic)")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="one lr for every method instead of tuning over the grid",
    )
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of paths and losses")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (200 if args.problem == "quadratic" else 3000)
    tol = 1e-6 if args.problem == "quadratic" else 1e-4
    # The seed's Momentum steps by lr * V with V an average (damped by 1 - beta): give it
    # lr / (1 - beta) so that its steady-state step matches the others'.
    grid = (
        None
        if args.lr is None
        else {m: [args.lr / (1 - 0.9) if m == "Momentum" else args.lr] for m in METHODS}
    )
    out = run(args.problem, steps=steps, kappa=args.kappa, tol=tol, lr_grid=grid)
    how = (
        "lr tuned per method over 33 values from 1e-4 to 1 (geometric)"
        if grid is None
        else f"lr={args.lr:g} for every method (Momentum: lr/(1-beta))"
    )
    print(f"# {out['problem'].name}, {steps} steps, {how}; momentum 0.9")
    print(f"# {describe_machine()}")
    return print_report(out, table, plot, args.markdown, args.plot)


if __name__ == "__main__":
    raise SystemExit(main())
