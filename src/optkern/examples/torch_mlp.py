"""A PyTorch model trained with optkern's kernels: ``optkern.torch`` in an ordinary torch loop.

The model is a torch MLP (autograd, ``nn.Linear`` + ReLU, cross-entropy) on the pen-drawn digits of
:func:`optkern.examples.datasets.make_digits` (made in code: nothing is downloaded). Each optimizer
trains it twice from the same initial weights on the same batches: once with ``torch.optim`` and
once with ``optkern.torch``, its drop-in twin; the table shows that both reach the same loss and
how long each training took. A ``torch.optim.lr_scheduler`` drives both (not the Schedule-Free
classes, which need none: they train in ``train()`` mode and are evaluated after ``eval()``).

Every optkern.torch class runs, each against the peer ``python -m optkern bench --torch`` uses
(:func:`optkern.benchmark.torch_bench.peers`): torch.optim's class on its fused or foreach path,
or the reference package where torch lacks the optimizer (lion-pytorch's Lion, schedulefree's
classes); a peer that is missing, or not a torch optimizer (optax's LAMB), leaves its columns
blank with the reason.

Needs torch (``pip install "optkern[torch]"``). ``python -m optkern.examples.torch_mlp --help``.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Dict, List, Sequence

from optkern.examples.datasets import make_digits

#: optkern.torch class -> its hyperparameters here (both sides take them); a class not listed
#: (a rule added since) runs at its defaults
HYPER: Dict[str, Dict[str, Any]] = {
    "SGD": {"lr": 0.1, "momentum": 0.9},
    "Nesterov": {"lr": 0.05, "momentum": 0.9},
    "Momentum": {"lr": 1.0, "beta": 0.9},
    "RMSprop": {"lr": 1e-3},
    "Adagrad": {"lr": 0.05},
    "Adadelta": {"lr": 1.0},
    "Adam": {"lr": 1e-3},
    "AdamW": {"lr": 1e-3, "weight_decay": 1e-2},
    "Adamax": {"lr": 2e-3},
    "NAdam": {"lr": 1e-3},
    "RAdam": {"lr": 1e-3},
    "ASGD": {"lr": 0.5},
    "Lion": {"lr": 1e-3},
    "Rprop": {"lr": 1e-4},  # a full-batch method: poor on minibatches
    "LAMB": {"lr": 1e-2},
    "ScheduleFreeAdamW": {"lr": 2.5e-3},
    "ScheduleFreeSGD": {"lr": 1.0},
    "Adafactor": {"lr": 1e-2},
}


def train(make_opt, model, X, y, epochs: int, batch_size: int, seed: int) -> Dict[str, Any]:
    import torch

    opt = make_opt(list(model.parameters()))
    switch = hasattr(opt, "eval") and hasattr(opt, "train")  # Schedule-Free: no schedule
    sched = None if switch else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if switch:
        opt.train()
    gen = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=gen)
        total = 0.0
        for start in range(0, len(X), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if sched is not None:
            sched.step()
        losses.append(total / len(X))
    if switch:
        opt.eval()  # the parameters hold x, the average, to evaluate
    return {"seconds": time.perf_counter() - t0, "losses": losses}


def run(
    optimizers: Sequence[str],
    n: int = 4000,
    hidden: int = 256,
    epochs: int = 5,
    batch_size: int = 64,
    seed: int = 0,
) -> List[Dict[str, Any]]:
    import numpy as np
    import torch

    import optkern.torch as okt
    from optkern.benchmark.torch_bench import peers

    Xn, yn = make_digits(n, seed=seed)
    X = torch.from_numpy(np.ascontiguousarray(Xn - Xn.mean(axis=0), dtype=np.float32))
    y = torch.from_numpy(yn.astype(np.int64))
    torch.manual_seed(seed)
    base = torch.nn.Sequential(
        torch.nn.Linear(X.shape[1], hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )
    table = peers()
    rows = []
    for name in optimizers:
        hp, peer = HYPER.get(name, {}), table[name]
        why = peer.missing(loop=True)
        mt, mo = copy.deepcopy(base), copy.deepcopy(base)
        rt = None
        if why is None:
            rt = train(lambda ps: peer.make(ps, hp), mt, X, y, epochs, batch_size, seed)
        ro = train(lambda ps: getattr(okt, name)(ps, **hp), mo, X, y, epochs, batch_size, seed)
        row: Dict[str, Any] = {"optimizer": name, "peer": peer.impl, "okt_loss": ro["losses"][-1]}
        with torch.no_grad():
            row["okt_train_acc"] = float((mo(X).argmax(1) == y).float().mean())
            if rt is not None:
                row["max_param_difference"] = max(
                    float((a - b).abs().max()) for a, b in zip(mt.parameters(), mo.parameters())
                )
        row["okt_s"] = ro["seconds"]
        if rt is None:
            row["peer_missing"] = why
        else:
            row.update(torch_loss=rt["losses"][-1], torch_s=rt["seconds"])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--optimizers", nargs="*", metavar="NAME", help="optkern.torch classes (default: all)"
    )
    p.add_argument("--n", type=int, default=4000, help="training digits")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        import torch

        import optkern.torch as okt
    except ImportError:
        raise SystemExit("this example needs torch: pip install 'optkern[torch]'")
    names = list(okt.RULES) if args.optimizers is None else args.optimizers
    unknown = [n for n in names if n not in okt.RULES]
    if unknown:
        p.error(f"argument --optimizers: unknown {unknown} (choose from {', '.join(okt.RULES)})")
    rows = run(names, args.n, args.hidden, args.epochs, args.batch_size, args.seed)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads; MLP "
        f"{144}-{args.hidden}-{args.hidden}-10 on {args.n} digits, {args.epochs} epochs, "
        f"batch {args.batch_size}, cosine schedule"
    )
    print(
        f"{'optimizer':<18} {'peer':>8} {'peer loss':>10} {'okt loss':>10} {'okt acc':>8} "
        f"{'max |dp|':>9} {'peer s':>8} {'okt s':>8}"
    )
    for r in rows:
        if "peer_missing" in r:
            print(
                f"{r['optimizer']:<18} {r['peer']:>8} {'':>10} {r['okt_loss']:10.4f} "
                f"{100 * r['okt_train_acc']:7.1f}% {'':>9} {'':>8} {r['okt_s']:8.2f}"
                f"  ({r['peer_missing']})"
            )
            continue
        print(
            f"{r['optimizer']:<18} {r['peer']:>8} {r['torch_loss']:10.4f} {r['okt_loss']:10.4f} "
            f"{100 * r['okt_train_acc']:7.1f}% {r['max_param_difference']:9.2e} "
            f"{r['torch_s']:8.2f} {r['okt_s']:8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
