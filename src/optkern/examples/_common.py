"""Small helpers shared by the examples: optimizer construction, tables, optional plotting."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

import optkern as ok

#: Every optimizer class the examples compare, by display name.
OPTIMIZERS: Dict[str, Callable[..., ok.Optimizer]] = {
    "SGD": ok.SGD,
    "Momentum": ok.Momentum,
    "Nesterov": ok.Nesterov,
    "RMSprop": ok.RMSprop,
    "Adagrad": ok.Adagrad,
    "Adadelta": ok.Adadelta,
    "Adam": ok.Adam,
    "AdamW": ok.AdamW,
    "NAdam": ok.NAdam,
    "RAdam": ok.RAdam,
    "ASGD": ok.ASGD,
}

#: The registry's other optimizer classes (Adamax, Lion, Rprop, LAMB, ...): not in the examples'
#: default comparisons, whose tables and tests cover the ones above, but selectable by name
#: (``python -m optkern.examples.mlp --sweep --optimizers Lion LAMB``).
MORE_OPTIMIZERS: Dict[str, Callable[..., ok.Optimizer]] = {
    r.cls: getattr(ok, r.cls) for r in ok.registry.rules() if r.cls not in OPTIMIZERS
}


def make_optimizer(name: str, params: List[np.ndarray], **hyper: Any) -> ok.Optimizer:
    try:
        cls = {**OPTIMIZERS, **MORE_OPTIMIZERS}[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; choose from {', '.join([*OPTIMIZERS, *MORE_OPTIMIZERS])}"
        ) from None
    return cls(params, **hyper)


def describe(hyper: Dict[str, Any]) -> str:
    """``lr=0.1, momentum=0.9`` for a table cell."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hyper.items())


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False
) -> str:
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        lines = [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    fmt = "  ".join("{:<%d}" % widths[0] if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    out = [fmt.format(*headers), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*r) for r in cells]
    return "\n".join(out)


def new_figure(*args: Any, **kwargs: Any):
    """A matplotlib ``Figure`` (no pyplot, so no GUI backend and no global state), or None when
    matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(*args, **kwargs)


def save_figure(fig: Any, path: str) -> str:
    import os

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return os.path.abspath(path)


def no_matplotlib_note(stream=None) -> None:
    print(
        "matplotlib is not installed: no plot written (pip install 'optkern[plot]')",
        file=sys.stderr if stream is None else stream,
    )


class Stopwatch:
    """Accumulates the time spent inside ``with watch:`` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._t


def print_report(out: Any, table: Any, plot: Any, markdown: bool, plot_path: Any) -> int:
    """The end of every example's main(): its table, then its plot when asked for."""
    print(table(out, markdown))
    if plot_path:
        written = plot(out, plot_path)
        if written:
            print(f"plot written to {written}")
    return 0


def fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e5:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"
