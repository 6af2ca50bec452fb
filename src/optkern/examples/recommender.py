"""A small recommender in NumPy: matrix factorisation of ratings, its embedding tables updated
with row-sparse gradients (:class:`optkern.RowSparse`).

The ratings are made in code (nothing is downloaded): users and items have hidden taste vectors
of rank 8, a rating is their dot product plus the user's and item's biases and noise, and items
are drawn by popularity (a Zipf law: a few items take most ratings, as in real catalogues). The
model predicts ``mu + b_u + c_i + <P_u, Q_i>`` with tables P (users x d), Q (items x d) and bias
vectors b, c, fitted by minibatch squared error with an L2 penalty on the rows a batch touches.

A batch of 1024 ratings touches at most 1024 rows of each table (fewer: a popular item or an
active user appears several times, and its rows' gradients are summed, as torch's coalesce
sums them). Each table's gradient is passed as ``ok.RowSparse(rows, values)``, so an optimizer
step reads and writes those rows only, whatever the size of the table: SparseAdam (only the
rows present are touched: their moments advance, the others keep theirs), Adagrad and SGD with
torch's sparse semantics. ``dense-adam`` steps Adam on the whole tables (their dense gradient,
zero outside the batch's rows): every row's moments decay at every step, which moves rows the
batch did not see, and costs a pass over both tables.

``python -m optkern.examples.recommender --markdown`` prints the table of
docs/choosing-an-optimizer.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import optkern as ok
from optkern._platform import describe_machine
from optkern.examples._common import format_table

#: Each method's optimizer and learning rate: the best final test RMSE over a grid of about 3x
#: steps (seed 0, 5 epochs; SGD's largest lr that did not diverge: 10 did).
METHODS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "SparseAdam": ("SparseAdam", {"lr": 1e-2}),
    "Adagrad": ("Adagrad", {"lr": 0.1}),
    "SGD": ("SGD", {"lr": 3.0}),
    "dense-adam": ("Adam", {"lr": 1e-2}),
}


def make_ratings(
    n_users: int = 20000,
    n_items: int = 5000,
    n_ratings: int = 300000,
    rank: int = 8,
    noise: float = 0.3,
    zipf: float = 1.1,
    seed: int = 0,
):
    """(users, items, ratings) of ``n_ratings`` observations, float32 ratings."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n_users, rank)) / np.sqrt(rank)
    V = rng.standard_normal((n_items, rank)) / np.sqrt(rank)
    bu = 0.3 * rng.standard_normal(n_users)
    bi = 0.5 * rng.standard_normal(n_items)
    pop = 1.0 / np.arange(1, n_items + 1) ** zipf
    items = rng.permutation(n_items)[rng.choice(n_items, n_ratings, p=pop / pop.sum())]
    users = rng.integers(0, n_users, n_ratings)
    r = 3.0 + bu[users] + bi[items] + np.sum(U[users] * V[items], axis=1)
    r += noise * rng.standard_normal(n_ratings)
    return users.astype(np.int64), items.astype(np.int64), r.astype(np.float32)


class Factorisation:
    """``mu + b[u] + c[i] + <P[u], Q[i]>``: two tables and two bias vectors, float32."""

    def __init__(self, n_users: int, n_items: int, dim: int, mu: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.P = (0.1 * rng.standard_normal((n_users, dim))).astype(np.float32)
        self.Q = (0.1 * rng.standard_normal((n_items, dim))).astype(np.float32)
        self.b = np.zeros(n_users, np.float32)
        self.c = np.zeros(n_items, np.float32)
        self.mu = np.float32(mu)

    @property
    def params(self) -> List[np.ndarray]:
        return [self.P, self.Q, self.b, self.c]

    def predict(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        return self.mu + self.b[u] + self.c[i] + np.sum(self.P[u] * self.Q[i], axis=1)

    def sparse_gradients(self, u: np.ndarray, i: np.ndarray, r: np.ndarray, l2: float):
        """(mean squared error, RowSparse gradients of P, Q, b, c): one row of values per rating
        (a user or item rated twice in the batch is listed twice; the optimizer sums them)."""
        Pu, Qi = self.P[u], self.Q[i]
        err = self.predict(u, i) - r
        m = np.float32(2.0 / len(r))
        e = (err * m)[:, None]
        lam = np.float32(2.0 * l2 / len(r))
        dP = e * Qi + lam * Pu
        dQ = e * Pu + lam * Qi
        db = e[:, 0] + lam * self.b[u]
        dc = e[:, 0] + lam * self.c[i]
        grads = [
            ok.RowSparse(u, dP.astype(np.float32)),
            ok.RowSparse(i, dQ.astype(np.float32)),
            ok.RowSparse(u, db.astype(np.float32)),
            ok.RowSparse(i, dc.astype(np.float32)),
        ]
        return float(np.mean(err * err)), grads

    def rmse(self, u: np.ndarray, i: np.ndarray, r: np.ndarray) -> float:
        out = 0.0
        for lo in range(0, len(r), 65536):
            d = self.predict(u[lo : lo + 65536], i[lo : lo + 65536]) - r[lo : lo + 65536]
            out += float(np.sum(d.astype(np.float64) ** 2))
        return float(np.sqrt(out / len(r)))


def train(
    method: str,
    data,
    n_users: int,
    n_items: int,
    dim: int = 16,
    epochs: int = 5,
    batch_size: int = 1024,
    l2: float = 0.02,
    seed: int = 0,
    hyper: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    (u, i, r), (u_test, i_test, r_test) = data
    model = Factorisation(n_users, n_items, dim, float(np.mean(r)), seed)
    name, hp = METHODS[method]
    opt = getattr(ok, name)(model.params, **{**hp, **(hyper or {})})
    dense = method.startswith("dense")
    rng = np.random.default_rng(seed)
    test_rmse: List[float] = []
    step_seconds = 0.0
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(len(r))
        for lo in range(0, len(r), batch_size):
            b = order[lo : lo + batch_size]
            _, grads = model.sparse_gradients(u[b], i[b], r[b], l2)
            if dense:  # the same gradient as whole tables, zero outside the batch's rows
                grads = [g.to_dense(p.shape[0]) for g, p in zip(grads, model.params)]
            t0 = time.perf_counter()
            opt.step(grads)
            step_seconds += time.perf_counter() - t0
            steps += 1
        test_rmse.append(model.rmse(u_test, i_test, r_test))
    return dict(
        method=method,
        optimizer=name,
        hyper={**hp, **(hyper or {})},
        test_rmse=test_rmse,
        train_rmse=model.rmse(u, i, r),
        step_ms=1e3 * step_seconds / max(1, steps),
    )


def run(
    methods: Sequence[str] = tuple(METHODS),
    n_users: int = 20000,
    n_items: int = 5000,
    n_ratings: int = 300000,
    dim: int = 16,
    epochs: int = 5,
    batch_size: int = 1024,
    seed: int = 0,
) -> Dict[str, Any]:
    u, i, r = make_ratings(n_users, n_items, n_ratings, seed=seed)
    n_test = len(r) // 10
    data = ((u[n_test:], i[n_test:], r[n_test:]), (u[:n_test], i[:n_test], r[:n_test]))
    baseline = float(np.sqrt(np.mean((r[:n_test] - np.mean(r[n_test:])) ** 2)))
    results = {
        m: train(m, data, n_users, n_items, dim, epochs, batch_size, seed=seed) for m in methods
    }
    return dict(results=results, baseline_rmse=baseline, noise_rmse=0.3)


def table(out: Dict[str, Any], markdown: bool = False) -> str:
    rows = []
    for m, res in out["results"].items():
        rows.append(
            [m, ", ".join(f"{k}={v:g}" for k, v in res["hyper"].items())]
            + [f"{x:.4f}" for x in res["test_rmse"]]
            + [f"{res['step_ms']:.3f}"]
        )
    n = len(next(iter(out["results"].values()))["test_rmse"])
    return format_table(
        ["method", "hyper"] + [f"test RMSE ep {k + 1}" for k in range(n)] + ["ms per step"],
        rows,
        markdown,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--ratings", type=int, default=300000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    print(f"# {describe_machine()}")
    t = time.perf_counter()
    out = run(
        args.methods, args.users, args.items, args.ratings, args.dim, args.epochs,
        args.batch_size, args.seed,
    )  # fmt: skip
    print(
        f"# {args.users} users x {args.items} items, {args.ratings} ratings (10% test), dim "
        f"{args.dim}, batch {args.batch_size}; predicting the mean: test RMSE "
        f"{out['baseline_rmse']:.4f}; the noise alone: {out['noise_rmse']} "
        f"({time.perf_counter() - t:.0f} s)"
    )
    print(table(out, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
