"""Gradient clipping and gradient norms, with torch.nn.utils' semantics.

The classic remedies for exploding gradients (see docs/design.md, Origins) are clipping and a lower learning rate; for
vanishing ones, watching each layer's gradient norm. Norms are computed in C++ in one read pass,
summed in double over fixed blocks in a fixed order: the same value for any thread count. The
gradients may be float32 or float64 arrays, mixed in one list (0-d arrays are one element);
clipping scales each in its own dtype.
To clip inside an optimizer step, without rewriting the gradients, use
``opt.step(grads, max_grad_norm=...)``.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from . import _core
from .functional import check_nonnegative

__all__ = ["clip_grad_norm_", "clip_grad_value_", "grad_norms"]

Grads = Union[np.ndarray, Sequence[np.ndarray]]


def _grad_list(grads: Grads) -> List[np.ndarray]:
    if isinstance(grads, np.ndarray):
        return [grads]  # as torch accepts a single tensor
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads must be an array or a list of arrays, got {type(grads).__name__}")
    if len(grads) == 0:
        raise ValueError("grads is empty: there is nothing to clip")
    return list(grads)


def check_norm_type(norm_type: Any) -> float:
    """A norm order p > 0 or inf (torch's 0 "norm", a count of non-zeros, is not a norm)."""
    if isinstance(norm_type, bool) or not isinstance(
        norm_type, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"norm_type must be a number > 0 or inf, got {norm_type!r}")
    p = float(norm_type)
    if not p > 0:  # also NaN
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}")
    return p


def total_norm(
    grads: List[np.ndarray], norm_type: float, positions: Optional[Sequence[int]] = None
) -> float:
    """The norm of all gradients together (validated, nothing written)."""
    return _core.grad_norms(grads, norm_type, positions=positions)[1]


def grad_norms(grads: Grads, norm_type: float = 2.0) -> np.ndarray:
    """Each array's norm, as a float64 array: for watching layers whose gradients vanish or
    explode."""
    return _core.grad_norms(_grad_list(grads), check_norm_type(norm_type))[0]


def clip_grad_norm_(
    grads: Grads, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> float:
    """Scales the gradients in place so that their total norm is at most ``max_norm``, as
    torch.nn.utils.clip_grad_norm_::

        total = ||concat(grads)||_p
        coef  = max_norm / (total + 1e-6)
        grads *= coef              (only when coef < 1, or total is NaN)

    Returns the total norm before clipping. With ``error_if_nonfinite`` a NaN or infinite total
    raises RuntimeError and changes nothing; without it, a NaN total makes every gradient NaN and
    an infinite one makes them 0 (or NaN where they were infinite), as in torch.
    """
    max_norm = check_nonnegative("max_norm", max_norm)
    p = check_norm_type(norm_type)
    grads = _grad_list(grads)
    total = total_norm(grads, p)
    if not math.isfinite(total) and error_if_nonfinite:
        raise RuntimeError(
            f"the total norm of order {p} of the gradients is non-finite "
            f"({total}), so it cannot be clipped; nothing was changed "
            "(set error_if_nonfinite=False to clip anyway)"
        )
    coef = clip_coefficient(max_norm, total)
    if coef != 1.0:
        _core.scale_(grads, coef)
    return total


def clip_coefficient(max_norm: float, total: float) -> float:
    """torch's factor, clamped to at most 1 (NaN stays NaN); 1.0 means leave the gradients."""
    coef = max_norm / (total + 1e-6)
    return coef if not coef >= 1.0 else 1.0


def clip_grad_value_(grads: Grads, clip_value: float) -> None:
    """Clamps every gradient element to [-clip_value, clip_value] in place (NaN stays NaN), as
    torch.nn.utils.clip_grad_value_."""
    c = check_nonnegative("clip_value", clip_value)
    _core.clamp_(_grad_list(grads), -c, c)
