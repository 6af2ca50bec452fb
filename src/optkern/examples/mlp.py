"""A small MLP in NumPy (ReLU hidden layers, softmax cross-entropy) trained with each optimizer.

The data are the pen-drawn digits of :func:`optkern.examples.datasets.make_digits` (12x12
images, ten classes, made in code: nothing is downloaded). Forward and backward passes are plain
NumPy in float32; the update of every layer's weights and biases is one ``opt.step(grads)``
call into optkern, which changes the arrays in place.

Every optimizer starts from the same initial weights and sees the same mini-batches in the same
order (``optkern.data.batches`` seeded per epoch), for the same number of epochs: an equal
budget. Learning rates are in :data:`DEFAULT_HYPER`; they were picked with ``--sweep`` (the lowest
validation loss over a grid, see :func:`sweep`).

``python -m optkern demo`` runs this; ``python -m optkern.examples.mlp --help`` has more options.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from optkern.data import batches, num_batches
from optkern._platform import describe_machine
from optkern.examples._common import (
    MORE_OPTIMIZERS,
    OPTIMIZERS,
    describe,
    fmt,
    format_table,
    make_optimizer,
    new_figure,
    no_matplotlib_note,
    print_report,
    save_figure,
    Stopwatch,
)
from optkern.examples._blas import blas_threads
from optkern.examples.datasets import make_digits

#: Hyperparameters of each optimizer for this problem (6000 digits, batch 64, hidden (128, 64),
#: 10 epochs). Each lr is the one with the lowest validation loss in
#: ``python -m optkern.examples.mlp --sweep`` (lr from 1e-4 to 10 in steps of about 3x, seed 0);
#: the other hyperparameters are the defaults.
DEFAULT_HYPER: Dict[str, Dict[str, Any]] = {
    "SGD": {"lr": 1.0},
    "Momentum": {"lr": 1.0, "beta": 0.9},
    "Nesterov": {"lr": 0.1, "momentum": 0.9},
    "RMSprop": {"lr": 1e-3},
    "Adagrad": {"lr": 0.1},
    "Adadelta": {"lr": 3.0},
    "Adam": {"lr": 3e-3},
    "AdamW": {"lr": 3e-3, "weight_decay": 1e-2},
    "NAdam": {"lr": 3e-3},
    "RAdam": {"lr": 1e-2},
    "ASGD": {"lr": 3.0},
}


class MLP:
    """``x -> [Linear -> ReLU] * len(hidden) -> Linear -> softmax``, float32, He-initialised.

    ``params`` is the flat list ``[W1, b1, W2, b2, ...]`` (the arrays the optimizer updates in
    place) and :meth:`gradients` returns the gradients in the same order.
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.params: List[np.ndarray] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            W = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
            self.params += [W, np.zeros(fan_out, np.float32)]

    @property
    def layers(self) -> List[Tuple[np.ndarray, np.ndarray]]:
        return list(zip(self.params[0::2], self.params[1::2]))

    def logits(self, X: np.ndarray) -> np.ndarray:
        h = X
        layers = self.layers
        for W, b in layers[:-1]:
            h = np.maximum(h @ W + b, 0.0)
        W, b = layers[-1]
        return h @ W + b

    def loss_and_gradients(self, X: np.ndarray, y: np.ndarray) -> Tuple[float, List[np.ndarray]]:
        """Mean softmax cross-entropy of the batch and its gradients ``[dW1, db1, ...]``."""
        acts = [X]
        h = X
        layers = self.layers
        for W, b in layers[:-1]:
            h = np.maximum(h @ W + b, 0.0)
            acts.append(h)
        W, b = layers[-1]
        z = h @ W + b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        m = len(y)
        rows = np.arange(m)
        loss = float(np.mean(np.log(s[:, 0]) - z[rows, y]))
        dz = e / s
        dz[rows, y] -= 1.0
        dz *= np.float32(1.0 / m)
        grads: List[np.ndarray] = []
        for i in range(len(layers) - 1, -1, -1):
            W, _ = layers[i]
            a = acts[i]
            grads.append(dz.sum(axis=0))
            grads.append(a.T @ dz)
            if i > 0:
                dz = dz @ W.T
                dz *= acts[i] > 0  # ReLU: acts[i] is the ReLU output of layer i - 1
        grads.reverse()  # -> [dW1, db1, dW2, db2, ...]
        return loss, grads

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
        """``(mean cross-entropy, accuracy)`` over a whole set."""
        z = self.logits(X).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = float(-np.mean(logp[np.arange(len(y)), y]))
        return loss, float(np.mean(np.argmax(z, axis=1) == y))


def load_data(n_train: int = 6000, n_test: int = 2000, seed: int = 0, size: int = 12):
    """Train and test digits (from different seeds), centred by the training mean."""
    X, y = make_digits(n_train, size=size, seed=seed)
    X_test, y_test = make_digits(n_test, size=size, seed=seed + 1000)
    mean = X.mean(axis=0)
    X -= mean
    X_test -= mean
    return X, y, X_test, y_test


def _to_eval(opt: Any) -> None:
    """Optimizers that train at one point and are evaluated at another (Schedule-Free: y and
    x) switch with ``eval()`` / ``train()``; the others have neither."""
    if callable(getattr(opt, "eval", None)):
        opt.eval()


def _to_train(opt: Any) -> None:
    if callable(getattr(opt, "train", None)):
        opt.train()


def train(
    name: str,
    hyper: Dict[str, Any],
    data,
    hidden: Sequence[int] = (128, 64),
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, float], None]] = None,
) -> Dict[str, Any]:
    """Trains a fresh MLP (initialised from ``seed``) with optimizer ``name`` and returns the
    per-epoch training loss (mean over that epoch's batches), test loss and test accuracy, the
    final ones, and the training time (forward, backward and update; not the evaluations)."""
    X, y, X_test, y_test = data
    model = MLP([X.shape[1], *hidden, 10], seed=seed)
    opt = make_optimizer(name, model.params, **hyper)
    per_epoch = num_batches(len(X), batch_size)
    train_loss, test_loss, test_acc = [], [], []
    watch = Stopwatch()
    for epoch in range(epochs):
        total = 0.0
        with watch:
            for Xb, yb in batches(X, y, batch_size=batch_size, seed=(seed, epoch)):
                loss, grads = model.loss_and_gradients(Xb, yb)
                opt.step(grads)
                total += loss
        train_loss.append(total / per_epoch)
        _to_eval(opt)
        tl, ta = model.evaluate(X_test, y_test)
        test_loss.append(tl)
        test_acc.append(ta)
        if on_epoch is not None:
            on_epoch(epoch, train_loss[-1])
        if epoch + 1 < epochs:
            _to_train(opt)
    _to_eval(opt)
    final_train_loss, train_acc = model.evaluate(X, y)
    return dict(
        name=name,
        hyper=dict(hyper),
        train_loss=np.array(train_loss),
        test_loss=np.array(test_loss),
        test_acc=np.array(test_acc),
        final_train_loss=final_train_loss,
        train_acc=train_acc,
        final_test_loss=test_loss[-1],
        final_test_acc=test_acc[-1],
        time_s=watch.seconds,
        finite=bool(np.isfinite(final_train_loss)),
    )


def run(
    optimizers: Optional[Sequence[str]] = None,
    hyper: Optional[Dict[str, Dict]] = None,
    n_train: int = 6000,
    n_test: int = 2000,
    hidden: Sequence[int] = (128, 64),
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    progress: Optional[Callable[[str, int, int, float], None]] = None,
) -> Dict[str, Any]:
    """Trains one MLP per optimizer at an equal budget; returns ``{"results": {name: ...}}``.

    ``progress(name, optimizer_index, epoch, train_loss)`` is called after every epoch.
    """
    names = list(OPTIMIZERS if optimizers is None else optimizers)
    hyper = {**DEFAULT_HYPER, **(hyper or {})}
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging run ends as NaN, reported
        data = load_data(n_train, n_test, seed)
        results = {}
        for i, name in enumerate(names):
            cb = None if progress is None else (lambda e, l, i=i, n=name: progress(n, i, e, l))
            results[name] = train(
                name, hyper.get(name, {}), data, hidden, epochs, batch_size, seed, cb
            )
    return dict(
        results=results,
        settings=dict(
            n_train=n_train,
            n_test=n_test,
            hidden=tuple(hidden),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
        ),
    )


def sweep(
    optimizers: Optional[Sequence[str]] = None,
    lrs: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0),
    n_train: int = 6000,
    n_val: int = 2000,
    epochs: int = 10,
    batch_size: int = 64,
    hidden: Sequence[int] = (128, 64),
    seed: int = 0,
) -> Dict[str, Dict[float, Tuple[float, float]]]:
    """``(validation loss, validation accuracy)`` of every optimizer at every lr (other
    hyperparameters as in :data:`DEFAULT_HYPER`), on a validation set drawn with its own seed
    (not the test set). A run that diverges gets ``(inf, 0)``."""
    names = list(OPTIMIZERS if optimizers is None else optimizers)
    X, y = make_digits(n_train, seed=seed)
    X_val, y_val = make_digits(n_val, seed=seed + 2000)
    mean = X.mean(axis=0)
    data = (X - mean, y, X_val - mean, y_val)
    out: Dict[str, Dict[float, Tuple[float, float]]] = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for name in names:
            out[name] = {}
            for lr in lrs:
                h = {**DEFAULT_HYPER.get(name, {}), "lr": lr}
                r = train(name, h, data, hidden, epochs, batch_size, seed)
                ok_ = r["finite"] and np.isfinite(r["final_test_loss"])
                out[name][lr] = (
                    (r["final_test_loss"], r["final_test_acc"]) if ok_ else (float("inf"), 0.0)
                )
    return out


def sweep_summary(
    res: Dict[str, Dict[float, Tuple[float, float]]], markdown: bool = False, within: float = 0.01
) -> str:
    """Per optimizer: the lr with the lowest validation loss, the best accuracy, and the range of
    learning rates whose accuracy is within ``within`` of that best (how forgiving it is)."""
    rows = []
    for name, by_lr in res.items():
        lrs = sorted(by_lr)
        best_loss_lr = min(lrs, key=lambda lr: by_lr[lr][0])
        best_acc = max(acc for _, acc in by_lr.values())
        good = [lr for lr in lrs if by_lr[lr][1] >= best_acc - within]
        rows.append(
            [
                name,
                f"{best_loss_lr:g}",
                f"{100 * best_acc:.1f}%",
                f"{min(good):g} .. {max(good):g}",
                len(good),
            ]
        )
    return format_table(
        [
            "optimizer",
            "lr (lowest val loss)",
            "best val acc",
            f"lrs within {100 * within:g} pt of best acc",
            "grid points",
        ],
        rows,
        markdown,
    )


def plot_sweep(
    res: Dict[str, Dict[float, Tuple[float, float]]], path: str, epochs: int
) -> Optional[str]:
    fig = new_figure(figsize=(6.5, 4.2))
    if fig is None:
        no_matplotlib_note()
        return None
    ax = fig.subplots()
    for i, (name, by_lr) in enumerate(res.items()):
        lrs = sorted(by_lr)
        ls = "--" if name in ("SGD", "Momentum", "Nesterov") else "-"
        ax.semilogx(
            lrs,
            [100 * by_lr[lr][1] for lr in lrs],
            marker="o",
            ms=3,
            ls=ls,
            color=f"C{i}",
            label=name,
        )
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation accuracy after {epochs} epochs (%)")
    ax.set_title("MLP on digits: sensitivity to the learning rate")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def table(out: Dict[str, Any], markdown: bool = False) -> str:
    rows = []
    for name, r in out["results"].items():
        rows.append(
            [
                name,
                describe(r["hyper"]),
                fmt(r["final_train_loss"]),
                f"{100 * r['train_acc']:.1f}%",
                fmt(r["final_test_loss"]),
                f"{100 * r['final_test_acc']:.1f}%",
                f"{r['time_s']:.2f}",
            ]
        )
    return format_table(
        [
            "optimizer",
            "hyperparameters",
            "train loss",
            "train acc",
            "test loss",
            "test acc",
            "time s",
        ],
        rows,
        markdown,
    )


def plot(out: Dict[str, Any], path: str) -> Optional[str]:
    """Training loss and test accuracy per epoch; None (and a note) without matplotlib."""
    fig = new_figure(figsize=(11, 4.2))
    if fig is None:
        no_matplotlib_note()
        return None
    ax1, ax2 = fig.subplots(1, 2)
    for i, (name, r) in enumerate(out["results"].items()):
        ls = "--" if name in ("SGD", "Momentum", "Nesterov") else "-"
        x = np.arange(1, len(r["train_loss"]) + 1)
        ax1.semilogy(x, r["train_loss"], ls=ls, color=f"C{i}", label=name)
        ax2.plot(x, 100 * r["test_acc"], ls=ls, color=f"C{i}", label=name)
    s = out["settings"]
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (mean cross-entropy over the epoch)")
    ax1.set_title(f"MLP {s['hidden']} on {s['n_train']} digits, batch {s['batch_size']}")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title(f"test accuracy ({s['n_test']} digits)")
    lo = min(100 * r["test_acc"].min() for r in out["results"].values())
    ax2.set_ylim(max(lo, 80.0) - 1, 100.5)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--hidden", type=int, nargs="*", default=[128, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--optimizers", nargs="*", default=list(OPTIMIZERS), choices=[*OPTIMIZERS, *MORE_OPTIMIZERS]
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="print validation accuracy over a grid of learning rates instead",
    )
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the curves")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        metavar="N",
        help="BLAS threads for the matrix products (default: the library's own "
        "setting, as in your training loop; 0 also means that)",
    )
    parser.add_argument(
        "--distributed",
        nargs="?",
        const="dp",
        choices=["dp", "zero"],
        help="train over MPI ranks (run under mpiexec; needs optkern[mpi]): "
        "dp (default) or zero; see optkern.examples.mlp_distributed",
    )
    args = parser.parse_args(argv)
    if args.blas_threads is not None and args.blas_threads < 0:
        parser.error("--blas-threads must be >= 0")
    if args.distributed:
        from optkern.examples.mlp_distributed import main_distributed

        with blas_threads(args.blas_threads or None):
            return main_distributed(args, MLP, load_data, DEFAULT_HYPER)
    with blas_threads(args.blas_threads or None) as blas:
        print(f"# {describe_machine()}, {blas}")
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    if args.sweep:
        t = time.perf_counter()
        res = sweep(
            args.optimizers,
            n_train=args.n_train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            hidden=args.hidden,
            seed=args.seed,
        )
        lrs = sorted(next(iter(res.values())))
        rows = []
        for name in res:
            best = min(lrs, key=lambda lr: res[name][lr][0])
            rows.append(
                [name]
                + [
                    ("*" if lr == best else "") + f"{fmt(res[name][lr][0], 3)} / "
                    f"{100 * res[name][lr][1]:.1f}"
                    for lr in lrs
                ]
            )
        print(
            f"# validation loss / accuracy (%) after {args.epochs} epochs, batch "
            f"{args.batch_size}, hidden {tuple(args.hidden)}, * = lowest loss "
            f"({time.perf_counter() - t:.0f} s)"
        )
        print(format_table(["optimizer \\ lr"] + [f"{lr:g}" for lr in lrs], rows, args.markdown))
        print()
        print(sweep_summary(res, args.markdown))
        if args.plot:
            written = plot_sweep(res, args.plot, args.epochs)
            if written:
                print(f"plot written to {written}")
        return 0
    out = run(
        args.optimizers,
        n_train=args.n_train,
        n_test=args.n_test,
        hidden=args.hidden,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    return print_report(out, table, plot, args.markdown, args.plot)


if __name__ == "__main__":
    sys.exit(main())
