"""Command line: ``python -m optkern info``, ``python -m optkern bench`` and
``python -m optkern demo``."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import List, Optional


def _info(_: argparse.Namespace) -> int:
    import optkern

    info = optkern.build_info()
    print(f"optkern {info['version']}")
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    print(f"active ISA: {info['active_isa']}")
    print(f"available ISAs: {', '.join(info['available_isas'])}")
    print(f"threads: {info['num_threads']} ({info.get('threads', 'none')})")
    print(_split_rule(info))
    print(f"compiler: {info['compiler']}")
    print("kernel builds:")
    for isa, flags in info["isa_flags"].items():
        print(f"  {isa:<7} {flags}")
    return 0


def _split_rule(info: dict) -> str:
    """When a call uses more than one thread, in time and in elements per weight of rule."""
    from .registry import rules

    by_weight: dict = {}
    for r in rules():
        by_weight.setdefault(r.weight, []).append(r.cls)
    lines = [
        f"  a call uses k threads when each one's share would take at least "
        f"{info['min_us_per_thread']:g} us on one thread",
        f"  (estimated at {info['ns_per_work']:g} ns per element of weight 1), i.e. at least, "
        "per thread:",
    ]
    for w, n in sorted(info["min_elements_per_thread_by_weight"].items()):
        names = ", ".join(by_weight.get(w, [])) + ("; clipping, norms" if w == 1 else "")
        lines.append(f"    {n:>7} elements at weight {w} ({names})")
    lines.append(
        "  smaller calls run on the calling thread, and so do calls after helpers that did not "
        "pay (docs/threading.md)"
    )
    return "\n".join(lines)


DEFAULT_PLOT = "optkern-demo.png"


def _demo(args: argparse.Namespace) -> int:
    """Trains the MLP of optkern.examples.mlp with each optimizer named (by default the
    examples' set, optkern.examples._common.OPTIMIZERS), at an equal budget."""
    import numpy as np

    from ._progress import ProgressBar
    from .examples import mlp
    from .examples._blas import blas_threads
    from ._platform import describe_machine

    names = args.optimizers
    wall = time.perf_counter()
    with blas_threads(args.blas_threads or None) as blas:
        print(
            f"# optkern demo: MLP {tuple(args.hidden)} on {args.n_train} pen-drawn 12x12 digits "
            f"(made in code), {args.epochs} epochs of batch {args.batch_size}, seed {args.seed}"
        )
        print(
            "# same initial weights and batch order for every optimizer; lr from "
            "`python -m optkern.examples.mlp --sweep`"
        )
        print(f"# {describe_machine()}, {blas}")
        sys.stdout.flush()
        bar = ProgressBar(len(names) * args.epochs) if not args.no_progress else None
        if bar is not None:
            bar.update(0, "making the data set", milestone=True)

        def progress(name: str, i: int, epoch: int, loss: float) -> None:
            if bar is not None:
                last = epoch + 1 == args.epochs
                bar.update(
                    i * args.epochs + epoch + 1,
                    f"{i + 1}/{len(names)} {name:<8} epoch {epoch + 1}/{args.epochs} "
                    f"loss {loss:.4f}" + (" done" if last else ""),
                    milestone=last,
                )

        try:
            out = mlp.run(
                names,
                n_train=args.n_train,
                n_test=args.n_test,
                hidden=args.hidden,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                progress=progress,
            )
        finally:
            if bar is not None:
                bar.close()
    print(mlp.table(out))
    best = max(out["results"].values(), key=lambda r: r["final_test_acc"])
    print(
        f"best test accuracy: {best['name']} {100 * best['final_test_acc']:.1f}% "
        f"({args.n_test} test digits); total time {time.perf_counter() - wall:.1f} s"
    )
    if not args.no_plot:
        written = mlp.plot(out, args.plot)
        if written is not None:
            print(f"loss curves written to {written}")
    bad = [r["name"] for r in out["results"].values() if not np.isfinite(r["final_train_loss"])]
    if bad:
        print(f"diverged: {', '.join(bad)}", file=sys.stderr)
    return 0


def _demo_parser(sub) -> None:
    from ._cli import nonnegative_int, positive_int, writable_file
    from .examples._common import MORE_OPTIMIZERS, OPTIMIZERS

    p = sub.add_parser(
        "demo",
        help=f"train a small MLP with {len(OPTIMIZERS)} optimizers (or any named) and compare them",
        description="Trains a NumPy MLP on digits made in code with each optimizer "
        "(same start, same batches, same epochs), prints final loss, accuracy and "
        "time per optimizer, and plots the loss curves when matplotlib is installed.",
    )
    p.add_argument(
        "--epochs", type=positive_int, default=10, help="epochs per optimizer (default 10)"
    )
    p.add_argument(
        "--n-train", type=positive_int, default=6000, help="training digits (default 6000)"
    )
    p.add_argument("--n-test", type=positive_int, default=2000, help="test digits (default 2000)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument(
        "--hidden",
        type=positive_int,
        nargs="*",
        default=[128, 64],
        help="hidden layer sizes (default 128 64)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument(
        "--optimizers",
        nargs="+",
        default=list(OPTIMIZERS),
        choices=[*OPTIMIZERS, *MORE_OPTIMIZERS],
        metavar="NAME",
        help=f"which to train (default: {' '.join(OPTIMIZERS)}; also: {' '.join(MORE_OPTIMIZERS)})",
    )
    p.add_argument(
        "--plot",
        metavar="PATH",
        type=writable_file,
        default=DEFAULT_PLOT,
        help=f"PNG of the loss curves (default ./{DEFAULT_PLOT}; needs matplotlib)",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--blas-threads",
        type=nonnegative_int,
        default=None,
        metavar="N",
        help="BLAS threads for the matrix products (default: the library's own "
        "setting, as in your training loop; 0 also means that)",
    )
    p.set_defaults(run=_demo)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, ISA, threads and build flags").set_defaults(run=_info)
    from .benchmark import add_parser as _bench_parser

    _bench_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
