"""The digits MLP of :mod:`optkern.examples.mlp`, trained data-parallel over MPI:

    mpiexec -n 2 python -m optkern.examples.mlp --distributed          # DataParallel
    mpiexec -n 2 python -m optkern.examples.mlp --distributed zero     # ZeroRedundancyOptimizer

Every rank sees the same sequence of global mini-batches (``batches`` seeded per epoch) and takes
its share of each batch's rows; its mean gradient is weighted by its share, so the average over
the ranks is the gradient of the whole batch. The run therefore follows the single-process run
with the same batch size, up to float32 rounding (the rows' gradients are summed in another
order), and reaches the same accuracy: rank 0 also trains the single-process model and prints
both, with the largest difference between the final weights. Rounding differences can grow
over the ~940 steps of 10 epochs: with 2 ranks, 7 of the 8 optimizers gave the identical test
accuracy and Adagrad (lr 0.1, weights apart by 0.27 at the end) 98.10% against 98.05%, one
test digit of 2000.

This module does not import :mod:`optkern.examples.mlp` (which imports it for ``--distributed``):
the model class, the data loader and the hyperparameters come in as arguments.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from optkern.data import batches
from optkern.examples._common import OPTIMIZERS, format_table, make_optimizer


def _train(
    model_cls: Callable[..., Any],
    name: str,
    hyper: Dict[str, Any],
    data,
    hidden: Sequence[int],
    epochs: int,
    batch_size: int,
    seed: int,
    mode: str,
    comm,
) -> tuple:
    from optkern import distributed as okd

    X, y, X_test, y_test = data
    model = model_cls([X.shape[1], *hidden, 10], seed=seed)
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    if comm is None:
        opt = make_optimizer(name, model.params, **hyper)
    elif mode == "zero":
        opt = okd.ZeroRedundancyOptimizer(OPTIMIZERS[name], model.params, comm, **hyper)
    else:
        opt = okd.DataParallel(make_optimizer(name, model.params, **hyper), comm)
    for epoch in range(epochs):
        for Xb, yb in batches(X, y, batch_size=batch_size, seed=(seed, epoch)):
            lo, hi = len(Xb) * rank // size, len(Xb) * (rank + 1) // size
            if hi > lo:
                _, grads = model.loss_and_gradients(Xb[lo:hi], yb[lo:hi])
                share = np.float32((hi - lo) * size / len(Xb))
                if share != 1:
                    for g in grads:
                        g *= share
            else:  # more ranks than rows in this batch
                grads = [np.zeros_like(p) for p in model.params]
            opt.step(grads)
    return model, model.evaluate(X_test, y_test)[1]


def _wait_quietly(comm) -> None:
    """A barrier that sleeps while it waits (MPI's spins, taking the core rank 0 trains on)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.01)


def main_distributed(
    args: argparse.Namespace,
    model_cls: Callable[..., Any],
    load_data: Callable[..., Any],
    hyper: Dict[str, Dict[str, Any]],
) -> int:
    """``model_cls(sizes, seed=...)``, ``load_data(n_train, n_test, seed)`` and ``hyper[name]``
    are :mod:`optkern.examples.mlp`'s ``MLP``, ``load_data`` and ``DEFAULT_HYPER``."""
    from optkern import distributed as okd

    comm = okd.MPI.COMM_WORLD
    okd.install_excepthook(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    mode = args.distributed
    with np.errstate(over="ignore", invalid="ignore"):
        data = load_data(args.n_train, args.n_test, args.seed)
        rows: List[List[str]] = []
        for name in args.optimizers:
            t = time.perf_counter()
            model, acc = _train(
                model_cls,
                name,
                hyper.get(name, {}),
                data,
                args.hidden,
                args.epochs,
                args.batch_size,
                args.seed,
                mode,
                comm,
            )
            seconds = time.perf_counter() - t
            if rank == 0:
                t1 = time.perf_counter()
                single, acc1 = _train(
                    model_cls,
                    name,
                    hyper.get(name, {}),
                    data,
                    args.hidden,
                    args.epochs,
                    args.batch_size,
                    args.seed,
                    mode,
                    None,
                )
                seconds1 = time.perf_counter() - t1
                diff = max(float(np.max(np.abs(p - q))) for p, q in zip(model.params, single.params))
                rows.append(
                    [
                        name,
                        f"{100 * acc:.2f}",
                        f"{100 * acc1:.2f}",
                        f"{diff:.1e}",
                        f"{seconds:.1f}",
                        f"{seconds1:.1f}",
                    ]
                )
            _wait_quietly(comm)
    okd.check_identical(model.params, comm)
    if rank == 0:
        print(
            f"# digits MLP, {'ZeRO stage 1' if mode == 'zero' else 'DataParallel'} over "
            f"{size} ranks; global batch {args.batch_size} split across the ranks, "
            f"{args.epochs} epochs, hidden {tuple(args.hidden)}; every rank's weights are "
            "bit-identical (checked)"
        )
        print(
            format_table(
                [
                    "optimizer",
                    f"test acc % ({size} ranks)",
                    "test acc % (1 process)",
                    "max |w diff|",
                    f"s ({size} ranks)",
                    "s (1 process)",
                ],
                rows,
                args.markdown,
            )
        )
    return 0
