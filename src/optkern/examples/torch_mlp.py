"""A PyTorch model trained with optkern's kernels: ``optkern.torch`` in an ordinary torch loop.

The model is a torch MLP (autograd, ``nn.Linear`` + ReLU, cross-entropy) on the pen-drawn digits of
:func:`optkern.examples.datasets.make_digits` (made in code: nothing is downloaded). Each optimizer
trains it twice from the same initial weights on the same batches: once with ``torch.optim`` and
once with ``optkern.torch``, its drop-in twin; the table shows that both reach the same loss and
how long each training took. A ``torch.optim.lr_scheduler`` drives both.

Needs torch (``pip install "optkern[torch]"``). ``python -m optkern.examples.torch_mlp --help``.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Dict, List, Sequence

from optkern.examples.datasets import make_digits

#: name -> (hyperparameters, torch's fastest CPU path for it)
HYPER: Dict[str, Dict[str, Any]] = {
    "SGD": {"lr": 0.1, "momentum": 0.9},
    "RMSprop": {"lr": 1e-3},
    "Adagrad": {"lr": 0.05},
    "Adadelta": {"lr": 1.0},
    "Adam": {"lr": 1e-3},
    "AdamW": {"lr": 1e-3, "weight_decay": 1e-2},
}
TORCH_FLAGS = {
    "SGD": {"fused": True},
    "Adam": {"fused": True},
    "AdamW": {"fused": True},
    "Adagrad": {"fused": True},
    "RMSprop": {"foreach": True},
    "Adadelta": {"foreach": True},
}


def train(make_opt, model, X, y, epochs: int, batch_size: int, seed: int) -> Dict[str, Any]:
    import torch

    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
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
        sched.step()
        losses.append(total / len(X))
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
    rows = []
    for name in optimizers:
        hp = HYPER[name]
        mt, mo = copy.deepcopy(base), copy.deepcopy(base)
        rt = train(
            lambda ps: getattr(torch.optim, name)(ps, **hp, **TORCH_FLAGS[name]),
            mt,
            X,
            y,
            epochs,
            batch_size,
            seed,
        )
        ro = train(lambda ps: getattr(okt, name)(ps, **hp), mo, X, y, epochs, batch_size, seed)
        with torch.no_grad():
            acc = float((mo(X).argmax(1) == y).float().mean())
            drift = max(float((a - b).abs().max()) for a, b in zip(mt.parameters(), mo.parameters()))
        rows.append(
            {
                "optimizer": name,
                "torch_loss": rt["losses"][-1],
                "okt_loss": ro["losses"][-1],
                "okt_train_acc": acc,
                "max_param_difference": drift,
                "torch_s": rt["seconds"],
                "okt_s": ro["seconds"],
                "torch_path": next(iter(TORCH_FLAGS[name])),
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", nargs="*", default=list(HYPER), choices=list(HYPER))
    p.add_argument("--n", type=int, default=4000, help="training digits")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        raise SystemExit("this example needs torch: pip install 'optkern[torch]'")
    rows = run(args.optimizers, args.n, args.hidden, args.epochs, args.batch_size, args.seed)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads; MLP "
        f"{144}-{args.hidden}-{args.hidden}-10 on {args.n} digits, {args.epochs} epochs, "
        f"batch {args.batch_size}, cosine schedule"
    )
    print(
        f"{'optimizer':<10} {'torch loss':>10} {'okt loss':>10} {'okt acc':>8} "
        f"{'max |dp|':>9} {'torch s':>8} {'okt s':>8}  torch path"
    )
    for r in rows:
        print(
            f"{r['optimizer']:<10} {r['torch_loss']:10.4f} {r['okt_loss']:10.4f} "
            f"{100 * r['okt_train_acc']:7.1f}% {r['max_param_difference']:9.2e} "
            f"{r['torch_s']:8.2f} {r['okt_s']:8.2f}  {r['torch_path']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
