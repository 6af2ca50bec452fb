"""Linear regression trained with BGD, SGD and mini-batch GD (MBGD).

The loss ``L(w, b) = mean((X w + b - y)^2) / 2`` is convex, with a closed-form minimiser (least
squares). Three ways of feeding the same data to the same optimizer (``optkern.SGD``, same
learning rate), as the classic course notes contrast them:

* BGD (``batch_size=None``): one update per epoch from the exact gradient. It converges linearly
  to the closed-form solution, to float32 precision.
* SGD (``batch_size=1``): n updates per epoch, each from one sample. It gets near the solution in
  a fraction of an epoch but, with a constant learning rate, never settles: the iterate keeps
  jittering around the minimum (a noise floor in the excess loss).
* MBGD (``batch_size=k``): in between: fewer, less noisy updates than SGD, more progress per epoch
  than BGD.

Run ``python -m optkern.examples.linear_regression --plot lr.png`` (or ``examples/linear_regression.py``).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Union

import numpy as np

import optkern as ok
from optkern.data import batches, num_batches
from optkern._platform import describe_machine
from optkern.examples._common import (
    fmt,
    format_table,
    new_figure,
    no_matplotlib_note,
    print_report,
    save_figure,
    Stopwatch,
)

#: method name -> batch size (None = full batch)
METHODS: Dict[str, Optional[int]] = {"BGD": None, "MBGD": 32, "SGD": 1}
#: epochs per method by default: BGD makes one update per epoch, so it gets more epochs
DEFAULT_EPOCHS: Dict[str, int] = {"BGD": 300, "MBGD": 30, "SGD": 30}


def make_data(n: int = 1000, d: int = 5, noise: float = 0.5, seed: int = 0):
    """``X`` (n, d) standard normal, ``y = X w_true + b_true + noise * N(0, 1)``, float32."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    w_true = rng.standard_normal(d)
    b_true = 0.5
    y = (X @ w_true + b_true + noise * rng.standard_normal(n)).astype(np.float32)
    return X, y


def closed_form(X: np.ndarray, y: np.ndarray):
    """The least-squares ``(w, b)``, solved in float64."""
    A = np.hstack([X.astype(np.float64), np.ones((X.shape[0], 1))])
    sol, *_ = np.linalg.lstsq(A, y.astype(np.float64), rcond=None)
    return sol[:-1], sol[-1]


def loss(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: Union[float, np.ndarray]) -> float:
    r = X.astype(np.float64) @ np.asarray(w, np.float64) + float(np.asarray(b).ravel()[0]) - y
    return 0.5 * float(np.mean(r * r))


def train(
    X: np.ndarray,
    y: np.ndarray,
    batch_size: Optional[int],
    epochs: int,
    lr: float,
    seed: int = 0,
    evals_per_epoch: int = 20,
    loss_star: float = 0.0,
) -> Dict[str, Any]:
    """Trains ``(w, b)`` from zero with ``optkern.SGD(lr)`` on batches of ``batch_size``.

    Returns the final parameters, the excess loss ``L - L*`` measured ``evals_per_epoch`` times
    per epoch (once per update for BGD) as ``curve_epochs`` / ``curve_excess``, the path of
    ``(w[0], w[1])`` at those points, and the mean and standard deviation of the excess loss
    over the last epoch (the noise floor). ``time_s`` counts training only, not the evaluations.
    """
    n, d = X.shape
    w = np.zeros(d, np.float32)
    b = np.zeros(1, np.float32)
    opt = ok.SGD([w, b], lr=lr)
    per_epoch = num_batches(n, batch_size)
    every = max(1, per_epoch // evals_per_epoch)
    rng = np.random.default_rng(seed)
    xs, excess, path = [0.0], [loss(X, y, w, b) - loss_star], [w[:2].copy()]
    last_epoch = []
    watch = Stopwatch()
    updates = 0
    for epoch in range(epochs):
        with watch:
            it = batches(X, y, batch_size=batch_size, seed=rng)
        for i in range(per_epoch):
            with watch:
                Xb, yb = next(it)
                r = Xb @ w + b[0] - yb
                dw = Xb.T @ r
                dw *= np.float32(1.0 / len(yb))
                db = np.array([r.mean()], np.float32)
                opt.step([dw, db])
            updates += 1
            if (i + 1) % every == 0 or i + 1 == per_epoch:
                e = loss(X, y, w, b) - loss_star
                xs.append(epoch + (i + 1) / per_epoch)
                excess.append(e)
                path.append(w[:2].copy())
                if epoch == epochs - 1:
                    last_epoch.append(e)
    return dict(
        w=w,
        b=float(b[0]),
        updates=updates,
        time_s=watch.seconds,
        curve_epochs=np.array(xs),
        curve_excess=np.array(excess),
        path=np.array(path),
        final_excess=excess[-1],
        last_epoch_mean=float(np.mean(last_epoch)),
        last_epoch_std=float(np.std(last_epoch)),
    )


def run(
    n: int = 1000,
    d: int = 5,
    noise: float = 0.5,
    lr: float = 0.1,
    epochs: Union[int, Dict[str, int], None] = None,
    methods: Optional[Dict[str, Optional[int]]] = None,
    seed: int = 0,
    evals_per_epoch: int = 20,
) -> Dict[str, Any]:
    """Trains with every method in ``methods`` (name -> batch size; default BGD / MBGD(32) / SGD)
    and compares with the closed form. ``epochs`` is an int for all methods or a dict by name.

    Returns ``{"w_star", "b_star", "loss_star", "results": {name: {...}}}`` where each result
    has, besides what :func:`train` returns, ``batch_size``, ``epochs`` and ``max_abs_error``
    (largest difference between the trained ``(w, b)`` and the closed-form one).
    """
    methods = dict(METHODS if methods is None else methods)
    if epochs is None:
        epochs = {k: DEFAULT_EPOCHS.get(k, 30) for k in methods}
    elif isinstance(epochs, int):
        epochs = {k: epochs for k in methods}
    X, y = make_data(n, d, noise, seed)
    w_star, b_star = closed_form(X, y)
    loss_star = loss(X, y, w_star, b_star)
    results = {}
    for name, bs in methods.items():
        r = train(
            X,
            y,
            bs,
            epochs[name],
            lr,
            seed=seed + 1,
            evals_per_epoch=evals_per_epoch,
            loss_star=loss_star,
        )
        r["batch_size"] = bs
        r["epochs"] = epochs[name]
        r["max_abs_error"] = float(max(np.max(np.abs(r["w"] - w_star)), abs(r["b"] - b_star)))
        results[name] = r
    return dict(
        w_star=w_star,
        b_star=float(b_star),
        loss_star=loss_star,
        results=results,
        settings=dict(n=n, d=d, noise=noise, lr=lr, seed=seed),
    )


def table(out: Dict[str, Any], markdown: bool = False) -> str:
    rows = []
    for name, r in out["results"].items():
        bs = "n (full)" if r["batch_size"] is None else r["batch_size"]
        rows.append(
            [
                name,
                bs,
                r["epochs"],
                r["updates"],
                fmt(r["final_excess"]),
                fmt(r["last_epoch_mean"]),
                fmt(r["last_epoch_std"]),
                fmt(r["max_abs_error"]),
                f"{r['time_s']:.3f}",
            ]
        )
    return format_table(
        [
            "method",
            "batch",
            "epochs",
            "updates",
            "final L-L*",
            "last-epoch mean L-L*",
            "last-epoch std",
            "max abs err vs closed form",
            "train s",
        ],
        rows,
        markdown,
    )


def plot(out: Dict[str, Any], path: str, path_epochs: int = 3) -> Optional[str]:
    """Excess loss against epochs (log-log) and the path of (w0, w1); None without matplotlib."""
    fig = new_figure(figsize=(11, 4.2))
    if fig is None:
        no_matplotlib_note()
        return None
    ax1, ax2 = fig.subplots(1, 2)
    colors = {"BGD": "C0", "MBGD": "C2", "SGD": "C3"}
    for name, r in out["results"].items():
        x = r["curve_epochs"][1:]
        ax1.loglog(
            x, np.maximum(r["curve_excess"][1:], 1e-16), label=name, color=colors.get(name), lw=1.2
        )
    s = out["settings"]
    ax1.set_xlabel("epochs (passes over the data)")
    ax1.set_ylabel("L(w, b) - L*  (excess loss over the closed form)")
    ax1.set_title(f"linear regression, n={s['n']}, d={s['d']}, lr={s['lr']}")
    ax1.legend()
    ax1.grid(True, which="major", alpha=0.3)
    for name, r in out["results"].items():
        keep = r["curve_epochs"] <= (r["epochs"] if r["batch_size"] is None else path_epochs)
        p = r["path"][keep]
        label = name if r["batch_size"] is None else f"{name} (first {path_epochs} epochs)"
        ax2.plot(p[:, 0], p[:, 1], ".-", ms=2, lw=0.6, label=label, color=colors.get(name), alpha=0.8)
    ax2.plot(*out["w_star"][:2], "k*", ms=12, label="closed form")
    ax2.set_xlabel("w[0]")
    ax2.set_ylabel("w[1]")
    ax2.set_title("path of (w[0], w[1]) from zero")
    ax2.legend()
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="samples (default 1000)")
    parser.add_argument("--d", type=int, default=5, help="features (default 5)")
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs for every method (default BGD 300, MBGD 30, SGD 30)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the curves (matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    out = run(n=args.n, d=args.d, noise=args.noise, lr=args.lr, epochs=args.epochs, seed=args.seed)
    print(
        f"# linear regression: n={args.n}, d={args.d}, noise={args.noise}, lr={args.lr}, "
        f"seed={args.seed}; L* = {out['loss_star']:.6f}"
    )
    print(f"# {describe_machine()}")
    return print_report(out, table, plot, args.markdown, args.plot)


if __name__ == "__main__":
    raise SystemExit(main())
