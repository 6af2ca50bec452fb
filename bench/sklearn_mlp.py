"""scikit-learn's MLPClassifier with its own Adam against optkern's Adam swapped in.

    python bench/sklearn_mlp.py [--hidden 1024 1024] [--samples 1000] [--epochs 3] [--rounds 3]

The two fits are interleaved in rounds (sklearn, optkern, sklearn, optkern, ...) on the same
float32 data and the same seed. Per epoch it reports the time of scikit-learn's forward and
backward pass (its ``_backprop``: the matrix products on NumPy's BLAS threads), of the update
(``update_params``) and of the whole fit, medians over rounds. optkern's step runs between
scikit-learn's matrix products, so this shows whether optkern's threads slow the BLAS down.
Needs scikit-learn (skipped with a message otherwise); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--features", type=int, default=784)
    p.add_argument("--batch-size", type=int, default=200, help="scikit-learn's 'auto' (200)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
        from sklearn.neural_network import _multilayer_perceptron as mlp_mod
        from sklearn.neural_network._stochastic_optimizers import AdamOptimizer
        import sklearn
    except ImportError:
        print("scikit-learn is not installed: nothing measured (pip install scikit-learn)")
        return 0
    import optkern as ok

    class OptkernAdam(AdamOptimizer):
        """scikit-learn's Adam interface, optkern's fused step (same lr, betas, eps)."""

        def __init__(self, params, learning_rate_init=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-8):
            super().__init__(params, learning_rate_init, beta_1, beta_2, epsilon)
            self._ok = ok.Adam(params, lr=learning_rate_init, betas=(beta_1, beta_2), eps=epsilon)

        def update_params(self, params, grads):
            self._ok.step(grads)

    timers = {"fwd_bwd": 0.0, "update": 0.0}
    real_backprop = MLPClassifier._backprop

    def timed_backprop(self, *a, **kw):
        t = time.perf_counter()
        try:
            return real_backprop(self, *a, **kw)
        finally:
            timers["fwd_bwd"] += time.perf_counter() - t

    def timed(update):
        def wrapper(self, params, grads):
            t = time.perf_counter()
            try:
                return update(self, params, grads)
            finally:
                timers["update"] += time.perf_counter() - t

        return wrapper

    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.samples, args.features), dtype=np.float32)
    y = rng.integers(0, 10, args.samples)
    impls = {"sklearn": AdamOptimizer, "optkern": OptkernAdam}
    raw = {name: {"fwd_bwd": [], "update": [], "fit": []} for name in impls}
    real_adam = mlp_mod.AdamOptimizer
    MLPClassifier._backprop = timed_backprop
    patched = {cls: cls.update_params for cls in (AdamOptimizer, OptkernAdam)}
    for cls, fn in patched.items():
        cls.update_params = timed(fn)
    try:
        for _ in range(args.rounds):
            for name, cls in impls.items():
                mlp_mod.AdamOptimizer = cls
                clf = MLPClassifier(
                    hidden_layer_sizes=tuple(args.hidden),
                    solver="adam",
                    batch_size=args.batch_size,
                    max_iter=args.epochs,
                    tol=0.0,
                    n_iter_no_change=10**9,
                    random_state=0,
                )
                timers.update(fwd_bwd=0.0, update=0.0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    t = time.perf_counter()
                    clf.fit(X, y)
                    fit = time.perf_counter() - t
                assert clf.coefs_[0].dtype == np.float32
                assert isinstance(clf._optimizer, cls)
                n = clf.n_iter_
                raw[name]["fwd_bwd"].append(timers["fwd_bwd"] / n)
                raw[name]["update"].append(timers["update"] / n)
                raw[name]["fit"].append(fit / n)
    finally:
        mlp_mod.AdamOptimizer = real_adam
        MLPClassifier._backprop = real_backprop
        for cls, fn in patched.items():
            cls.update_params = fn

    print(
        f"# scikit-learn {sklearn.__version__} MLPClassifier {tuple(args.hidden)}, "
        f"{args.samples}x{args.features} float32, batch {args.batch_size}, {args.epochs} "
        f"epochs; optkern {ok.__version__} ({ok.active_isa()}, {ok.get_num_threads()} "
        f"threads); medians of {args.rounds} interleaved rounds, ms per epoch"
    )
    print(f"{'Adam':<10}{'fwd+bwd':>10}{'update':>10}{'fit':>10}")
    med = {}
    for name in impls:
        med[name] = {k: statistics.median(v) for k, v in raw[name].items()}
        print(
            f"{name:<10}"
            + "".join(f"{med[name][k] * 1e3:10.1f}" for k in ("fwd_bwd", "update", "fit"))
        )
    ratio = med["optkern"]["fwd_bwd"] / med["sklearn"]["fwd_bwd"]
    print(
        f"forward+backward with optkern's Adam / with scikit-learn's: {ratio:.2f}x; "
        f"fit: {med['optkern']['fit'] / med['sklearn']['fit']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "raw_seconds_per_epoch": raw, "median_seconds_per_epoch": med},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
