"""Logistic regression on sparse binary features: adaptive methods against plain SGD.

The course notes optkern grew from (docs/design.md, Origins): "if the data is sparse, use an adaptive method (Adagrad, Adadelta, RMSprop,
Adam)". Here each sample switches on ``k`` of ``D`` binary features, drawn with Zipf-like
frequencies (feature ``j`` with probability proportional to ``1 / (j + 1)^zipf``), so a few
features appear in most samples and most features appear in very few. Every feature carries
signal: labels are drawn from ``sigmoid(x . w_true + b_true)`` with ``w_true ~ N(0, scale^2)``.

A single learning rate cannot suit both kinds of feature: one small enough for the frequent
features (whose gradient is present in every batch) moves a rare feature's weight very little in
the few batches that contain it. Adagrad, RMSprop and Adam divide each coordinate's step by the
size of its own past gradients, so rare features take large steps.

The comparison is at an equal budget: the same epochs, batch size, batch order and starting
point (zero) for every optimizer, each with the learning rate that gives the lowest log-loss on
a validation set (one grid for all); the table reports the held-out test set.

Run ``python -m optkern.examples.sparse_logistic --plot sparse.png`` (or ``examples/sparse_logistic.py``).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence

import numpy as np

from optkern.data import batches, num_batches
from optkern._platform import describe_machine
from optkern.examples._common import (
    MORE_OPTIMIZERS,
    OPTIMIZERS,
    fmt,
    format_table,
    is_plain,
    make_optimizer,
    new_figure,
    no_matplotlib_note,
    print_report,
    save_figure,
    Stopwatch,
)

#: every optimizer the examples compare (optkern.examples._common.OPTIMIZERS), each at its best lr
DEFAULT_OPTIMIZERS = tuple(OPTIMIZERS)
DEFAULT_LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def make_data(
    n: int,
    n_features: int = 1000,
    active: int = 10,
    zipf: float = 1.1,
    scale: float = 1.5,
    seed: int = 0,
    w_true: Optional[np.ndarray] = None,
    b_true: float = -0.5,
):
    """``(X, y, w_true)``: X (n, n_features) float32 of 0/1 with about ``active`` ones a row."""
    rng = np.random.default_rng(seed)
    if w_true is None:
        w_true = rng.normal(0.0, scale, n_features)
    probs = 1.0 / np.arange(1, n_features + 1) ** zipf
    probs /= probs.sum()
    cols = rng.choice(n_features, size=(n, active), p=probs)
    X = np.zeros((n, n_features), np.float32)
    X[np.arange(n)[:, None], cols] = 1.0
    logits = X.astype(np.float64) @ w_true + b_true
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return X, y, w_true


def log_loss(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    z = (X @ np.asarray(w, np.float32)).astype(np.float64) + b
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def accuracy(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    return float(np.mean(((X @ w + b) > 0) == (y > 0.5)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def train(
    name: str,
    lr: float,
    X: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    seed: int,
    X_eval: Optional[np.ndarray] = None,
    y_eval: Optional[np.ndarray] = None,
    evals_per_epoch: int = 4,
) -> Dict[str, Any]:
    """Trains ``(w, b)`` from zero with optimizer ``name`` at ``lr``; the evaluation-set log-loss
    is recorded ``evals_per_epoch`` times per epoch (``curve``)."""
    n, d = X.shape
    w = np.zeros(d, np.float32)
    b = np.zeros(1, np.float32)
    opt = make_optimizer(name, [w, b], lr=lr)  # the other hyperparameters at their defaults
    rng = np.random.default_rng(seed)
    per_epoch = num_batches(n, batch_size)
    every = max(1, per_epoch // evals_per_epoch)
    curve_x, curve = [0.0], []
    if X_eval is not None:
        curve.append(log_loss(X_eval, y_eval, w, float(b[0])))
    watch = Stopwatch()
    for epoch in range(epochs):
        for i, (Xb, yb) in enumerate(batches(X, y, batch_size=batch_size, seed=rng)):
            with watch:
                err = _sigmoid(Xb @ w + b[0]) - yb
                dw = Xb.T @ err
                dw *= np.float32(1.0 / len(yb))
                db = np.array([err.mean()], np.float32)
                opt.step([dw, db])
            if X_eval is not None and ((i + 1) % every == 0 or i + 1 == per_epoch):
                curve_x.append(epoch + (i + 1) / per_epoch)
                curve.append(log_loss(X_eval, y_eval, w, float(b[0])))
    return dict(
        w=w,
        b=float(b[0]),
        time_s=watch.seconds,
        curve_epochs=np.array(curve_x),
        curve=np.array(curve),
    )


def run(
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    lr_grid: Sequence[float] = DEFAULT_LR_GRID,
    n_train: int = 5000,
    n_val: int = 2000,
    n_test: int = 5000,
    n_features: int = 1000,
    active: int = 10,
    zipf: float = 1.1,
    epochs: int = 3,
    batch_size: int = 32,
    seed: int = 0,
) -> Dict[str, Any]:
    """For each optimizer: the lr in ``lr_grid`` with the lowest validation log-loss after the
    budget, then that run's test log-loss and accuracy and its validation curve.

    Returns ``{"results": {name: {...}}, "bayes_test_loss", "feature_counts", ...}``; each result
    has ``lr``, ``test_loss``, ``test_acc``, ``val_loss``, ``rare_error`` / ``frequent_error``
    (RMS distance of the learned weights from ``w_true`` over the rare features, seen in 1 to 10
    training samples, and over the frequent ones, seen in more than 10% of them), ``time_s``
    and the grid's validation losses ``sweep``.
    """
    X, y, w_true = make_data(n_train, n_features, active, zipf, seed=seed)
    X_val, y_val, _ = make_data(n_val, n_features, active, zipf, seed=seed + 1, w_true=w_true)
    X_test, y_test, _ = make_data(n_test, n_features, active, zipf, seed=seed + 2, w_true=w_true)
    counts = X.sum(axis=0)
    rare = (counts >= 1) & (counts <= 10)
    frequent = counts > 0.1 * n_train
    results = {}
    for name in optimizers:
        sweep = {}
        best = None
        for lr in lr_grid:
            with np.errstate(all="ignore"):
                r = train(name, float(lr), X, y, epochs, batch_size, seed + 3)
                val = log_loss(X_val, y_val, r["w"], r["b"])
            if not np.isfinite(val):
                val = float("inf")
            sweep[float(lr)] = val
            if best is None or val < best[0]:
                best = (val, float(lr))
        val, lr = best
        r = train(name, lr, X, y, epochs, batch_size, seed + 3, X_val, y_val)
        err = r["w"].astype(np.float64) - w_true
        results[name] = dict(
            lr=lr,
            val_loss=val,
            sweep=sweep,
            time_s=r["time_s"],
            test_loss=log_loss(X_test, y_test, r["w"], r["b"]),
            test_acc=accuracy(X_test, y_test, r["w"], r["b"]),
            rare_error=float(np.sqrt(np.mean(err[rare] ** 2))) if rare.any() else None,
            frequent_error=(float(np.sqrt(np.mean(err[frequent] ** 2))) if frequent.any() else None),
            curve_epochs=r["curve_epochs"],
            curve=r["curve"],
        )
    return dict(
        results=results,
        bayes_test_loss=log_loss(X_test, y_test, w_true, -0.5),
        bayes_test_acc=accuracy(X_test, y_test, w_true, -0.5),
        feature_counts=counts,
        n_rare=int(rare.sum()),
        n_frequent=int(frequent.sum()),
        settings=dict(
            n_train=n_train,
            n_features=n_features,
            active=active,
            zipf=zipf,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            lr_grid=list(lr_grid),
        ),
    )


def table(out: Dict[str, Any], markdown: bool = False) -> str:
    rows = []
    for name, r in sorted(out["results"].items(), key=lambda kv: kv[1]["test_loss"]):
        rows.append(
            [
                name,
                fmt(r["lr"], 3),
                fmt(r["test_loss"]),
                f"{100 * r['test_acc']:.1f}%",
                fmt(r["rare_error"], 3),
                fmt(r["frequent_error"], 3),
                f"{r['time_s']:.2f}",
            ]
        )
    rows.append(
        [
            "(true weights)",
            "",
            fmt(out["bayes_test_loss"]),
            f"{100 * out['bayes_test_acc']:.1f}%",
            "0",
            "0",
            "",
        ]
    )
    return format_table(
        [
            "optimizer",
            "best lr",
            "test log-loss",
            "test acc",
            f"RMS err, {out['n_rare']} rare w",
            f"RMS err, {out['n_frequent']} frequent w",
            "train s",
        ],
        rows,
        markdown,
    )


def plot(out: Dict[str, Any], path: str) -> Optional[str]:
    fig = new_figure(figsize=(11, 4.2))
    if fig is None:
        no_matplotlib_note()
        return None
    ax1, ax2 = fig.subplots(1, 2)
    for i, (name, r) in enumerate(out["results"].items()):
        ls = "--" if is_plain(name) else "-"
        ax1.plot(
            r["curve_epochs"], r["curve"], ls=ls, color=f"C{i}", label=f"{name} (lr={r['lr']:g})"
        )
        lrs = sorted(r["sweep"])
        ax2.semilogx(
            lrs, [min(r["sweep"][lr], 1.0) for lr in lrs], "o", ls=ls, ms=3, color=f"C{i}", label=name
        )
    ax1.axhline(out["bayes_test_loss"], color="k", lw=0.6, ls=":", label="true weights (test)")
    s = out["settings"]
    ax1.set_xlabel("epochs")
    ax1.set_ylabel("validation log-loss")
    ax1.set_title(f"sparse logistic regression, D={s['n_features']}, batch {s['batch_size']}")
    ax1.set_ylim(top=0.75)
    ax1.legend(fontsize=8)
    ax1.grid(True, alpha=0.3)
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel(f"validation log-loss after {s['epochs']} epochs (capped at 1)")
    ax2.set_title("learning-rate sweep")
    ax2.grid(True, alpha=0.3)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the curves and the sweep")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=list(DEFAULT_OPTIMIZERS),
        choices=[*OPTIMIZERS, *MORE_OPTIMIZERS],
        metavar="NAME",
        help="optkern classes to compare (default: the examples' set)",
    )
    args = parser.parse_args(argv)
    out = run(
        optimizers=args.optimizers,
        n_train=args.n_train,
        n_features=args.features,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    counts = out["feature_counts"]
    print(
        f"# sparse logistic regression: {args.n_train} samples, {args.features} binary features, "
        f"~{out['settings']['active']} active a row; feature frequency from "
        f"{int(counts.max())} samples down to {int(np.median(counts))} (median) and "
        f"{int(counts.min())}; rare = seen 1-10 times, frequent = in >10% of samples"
    )
    print(
        f"# {args.epochs} epochs of batch {args.batch_size} for every optimizer; lr chosen on a "
        f"validation set from {', '.join(f'{v:g}' for v in DEFAULT_LR_GRID)}"
    )
    print(f"# {describe_machine()}")
    return print_report(out, table, plot, args.markdown, args.plot)


if __name__ == "__main__":
    raise SystemExit(main())
