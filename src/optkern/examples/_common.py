"""Small helpers shared by the examples: optimizer construction, tables, optional plotting."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

import optkern as ok


def _presets() -> Dict[str, List[type]]:
    """Rule class name -> the presets of it that optkern exports (optkern.Nesterov: SGD with
    nesterov=True), in export order."""
    out: Dict[str, List[type]] = {}
    for name in ok._classes.__all__:
        cls = getattr(ok, name)
        if getattr(cls, "_preset", None) is not None:
            out.setdefault(cls.__mro__[1].__name__, []).append(cls)
    return out


def _compared() -> Dict[str, Callable[..., ok.Optimizer]]:
    out: Dict[str, Callable[..., ok.Optimizer]] = {}
    presets = _presets()
    for r in ok.registry.rules():
        if r.example_lr is not None:
            out[r.cls] = getattr(ok, r.cls)
            out.update((p.__name__, p) for p in presets.get(r.cls, []))
    return out


#: The optimizer classes the examples compare by default, by name: every rule that declares the
#: learning rate they train it at (``example_lr`` in its declaration, src/cpp/rules/), followed
#: by the presets of its class (Nesterov after SGD), in the registry's order.
OPTIMIZERS: Dict[str, Callable[..., ok.Optimizer]] = _compared()

#: The registry's other optimizer classes (Lion, Rprop, LAMB, ...): not in the examples' default
#: comparisons, but selectable by name, at their default learning rate
#: (``python -m optkern.examples.mlp --sweep --optimizers Lion LAMB``).
MORE_OPTIMIZERS: Dict[str, Callable[..., ok.Optimizer]] = {
    r.cls: getattr(ok, r.cls) for r in ok.registry.rules() if r.cls not in OPTIMIZERS
}


def rule_of(name: str) -> "ok.registry.Rule":
    """The registry's rule of an optimizer class named ``name`` (a preset: its base's)."""
    cls = getattr(ok, name)
    by_cls = {r.cls: r for r in ok.registry.rules()}
    return next(by_cls[c.__name__] for c in cls.__mro__ if c.__name__ in by_cls)


def example_hyper(name: str) -> Dict[str, Any]:
    """The hyperparameters the examples train rule class ``name`` at: its declared example
    learning rate, the other hyperparameters at their defaults ({} without one)."""
    lr = rule_of(name).example_lr
    return {} if lr is None else {"lr": lr}


def is_plain(name: str) -> bool:
    """Whether class ``name`` steps without a per-coordinate scale (no running average of
    squares: SGD, Momentum, Nesterov, ASGD), drawn dashed in the examples' plots."""
    return not any(s.nonnegative for s in rule_of(name).states)


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
