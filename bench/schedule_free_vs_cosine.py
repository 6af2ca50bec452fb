"""Schedule-Free AdamW without a schedule against AdamW with a cosine schedule (and with a
constant lr), on the examples' digit MLP at an equal budget: each method over the same lr grid,
the same initial weights and batch order, 3 seeds; prints each method's best mean test accuracy
and test loss over the grid (docs/choosing-an-optimizer.md quotes a run).

    python bench/schedule_free_vs_cosine.py [--epochs 10] [--seeds 3]
"""

from __future__ import annotations

import argparse

import numpy as np

import optkern as ok
from optkern._platform import describe_machine
from optkern.data import batches, num_batches
from optkern.examples._blas import blas_threads
from optkern.examples.mlp import MLP, load_data

LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def train(method: str, lr: float, data, epochs: int, seed: int, batch_size: int = 64):
    X, y, X_test, y_test = data
    model = MLP([X.shape[1], 128, 64, 10], seed=seed)
    total = epochs * num_batches(len(X), batch_size)
    if method == "ScheduleFreeAdamW":
        opt = ok.ScheduleFreeAdamW(model.params, lr=lr, warmup_steps=total // 20)
        sched = None
    else:
        opt = ok.AdamW(model.params, lr=lr)
        sched = (
            ok.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if method == "AdamW+cosine" else None
        )
    for epoch in range(epochs):
        for Xb, yb in batches(X, y, batch_size=batch_size, seed=(seed, epoch)):
            _, grads = model.loss_and_gradients(Xb, yb)
            opt.step(grads)
            if sched is not None:
                sched.step()
    if method == "ScheduleFreeAdamW":
        opt.eval()  # evaluate at x, as the method prescribes
    return model.evaluate(X_test, y_test)  # (loss, accuracy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    with blas_threads(1), np.errstate(over="ignore", invalid="ignore"):
        data = load_data()
        print(
            f"# {describe_machine()}; digit MLP 144-128-64-10, 6000 train / 2000 test, batch 64, "
            f"{args.epochs} epochs, seeds 0..{args.seeds - 1}; ScheduleFreeAdamW warmup 5% of steps"
        )
        print(f"{'method':<18} {'lr':>7} {'test acc (mean)':>16} {'test loss (mean)':>17}")
        best = {}
        for method in ("AdamW+cosine", "AdamW constant", "ScheduleFreeAdamW"):
            for lr in LRS:
                res = [train(method, lr, data, args.epochs, s) for s in range(args.seeds)]
                loss, acc = np.mean([r[0] for r in res]), np.mean([r[1] for r in res])
                print(f"{method:<18} {lr:7.0e} {100 * acc:15.2f}% {loss:17.4f}")
                if method not in best or acc > best[method][1]:
                    best[method] = (lr, acc, loss)
        print("\nbest lr per method (by mean test accuracy):")
        for method, (lr, acc, loss) in best.items():
            print(f"{method:<18} lr={lr:g}: {100 * acc:.2f}% test accuracy, test loss {loss:.4f}")


if __name__ == "__main__":
    main()
