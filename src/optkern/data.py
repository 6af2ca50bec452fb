"""Feeding data to an optimizer: full batch (BGD), single samples (SGD) or mini-batches (MBGD).

    for X_b, y_b in ok.data.batches(X, y, batch_size=64, seed=epoch_seed):
        grads = model.backward(X_b, y_b)
        opt.step(grads)

One call is one epoch: every row of the arrays is visited exactly once.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator as _Iterator
from collections.abc import Mapping, Set
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np

__all__ = ["batches", "num_batches"]

Batch = Union[np.ndarray, Tuple[np.ndarray, ...]]


def _check_batch_size(batch_size: Any) -> Optional[int]:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (numbers.Integral, np.integer)):
        raise TypeError(
            "batch_size must be None (the full batch) or an int >= 1, got "
            f"{type(batch_size).__name__}: {batch_size!r}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None for the full batch), got {batch_size}")
    return int(batch_size)


def num_batches(n: int, batch_size: Optional[int] = None, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields in one epoch over ``n`` rows (an int >= 0)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (numbers.Integral, np.integer)):
        raise TypeError(f"n must be an int >= 0 (a number of rows), got {type(n).__name__}: {n!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0 (a number of rows), got {n}")
    n = int(n)
    if not isinstance(drop_last, (bool, np.bool_)):
        raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__}: {drop_last!r}")
    size = _check_batch_size(batch_size)
    if n == 0:
        return 0
    if size is None:
        return 1
    return n // size if drop_last else -(-n // size)


def batches(
    *arrays: Any,
    batch_size: Optional[int] = None,
    shuffle: bool = True,
    seed: Any = None,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """One epoch over ``arrays`` (which share their first dimension), in batches of rows.

    ``batch_size``
        ``None``: the whole arrays in one batch (batch gradient descent, BGD); ``1``: one row at a
        time (stochastic gradient descent, SGD); ``k``: mini-batches of ``k`` rows (MBGD). The
        last batch holds the remaining ``n % k`` rows unless ``drop_last`` is true, in which case
        it is skipped (asking for that when ``k > n`` would yield nothing and raises instead).
    ``shuffle``
        Visit the rows in a random order: one permutation of ``range(n)`` per call, drawn from
        ``np.random.default_rng(seed)``. Each batch is then a new array (fancy indexing copies only
        that batch's rows). With ``shuffle=False`` the rows come in order and every batch is a
        view (a slice) of the input, so nothing is copied. With ``batch_size=None`` there is
        nothing to shuffle for the update (the full-batch gradient does not depend on row order),
        so the arrays themselves are yielded, unshuffled and uncopied, and no random number is
        drawn.
    ``seed``
        Anything ``np.random.default_rng`` accepts. The same int gives the same order on every
        call, which is reproducible but also means *every epoch sees the same order* if you pass
        the same int each epoch. For a different but reproducible order per epoch pass
        ``seed=(base_seed, epoch)``, or make one ``rng = np.random.default_rng(base_seed)`` and
        pass ``seed=rng`` every epoch (the generator advances). ``seed=None`` draws fresh entropy
        from the operating system on each call: a different order every epoch, not reproducible.

    Yields the batch of the single array, or a tuple with one batch per array when given several,
    so ``for X_b, y_b in batches(X, y, batch_size=32): ...``. Inputs that are not NumPy arrays
    are converted once with ``np.asarray``.

    Raises ``ValueError`` for no arrays, a 0-d array, arrays whose first dimensions differ, or a
    ``batch_size`` below 1, and ``TypeError`` for a ``batch_size`` that is not an int or None.
    All checks happen when ``batches`` is called, not at the first ``next()``.
    """
    if len(arrays) == 0:
        raise ValueError("batches() needs at least one array")
    arrs = []
    for i, a in enumerate(arrays):
        if isinstance(a, (_Iterator, Mapping, Set, str, bytes)):
            raise TypeError(
                f"array {i} is a {type(a).__name__}; batches() takes arrays (or "
                "sequences np.asarray turns into one), not iterators, generators, "
                "dicts, sets or strings"
            )
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(
                f"array {i} is a masked array; its batches would drop the mask (pass "
                ".filled(...), or the unmasked rows)"
            )
        a = np.asarray(a)
        if a.ndim == 0:
            raise ValueError(
                f"array {i} is a scalar (0-d); batches() needs arrays with a first "
                "dimension to split into rows"
            )
        arrs.append(a)
    n = arrs[0].shape[0]
    for i, a in enumerate(arrs[1:], start=1):
        if a.shape[0] != n:
            lengths = ", ".join(f"array {j}: {b.shape[0]}" for j, b in enumerate(arrs))
            raise ValueError(
                "arrays passed to batches() must have the same length (first "
                f"dimension); got {lengths}"
            )
    size = _check_batch_size(batch_size)
    if not isinstance(shuffle, (bool, np.bool_)):
        raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}: {shuffle!r}")
    if not isinstance(drop_last, (bool, np.bool_)):
        raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__}: {drop_last!r}")
    if drop_last and size is not None and size > n > 0:
        raise ValueError(
            f"drop_last=True with batch_size={size} larger than the {n} rows would "
            "yield no batch at all"
        )
    # Draw the permutation now, so the generator's order is fixed by the call (and a bad seed
    # fails here, not at the first next()).
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(
            f"seed must be None, an int, a sequence of ints or a Generator, not "
            f"{seed!r} (a bool, which NumPy would take as the int {int(seed)})"
        )
    order = None
    if shuffle and size is not None and n > 0:
        order = np.random.default_rng(seed).permutation(n)
    return _generate(arrs, n, size, order, bool(drop_last))


def _generate(
    arrs, n: int, size: Optional[int], order: Optional[np.ndarray], drop_last: bool
) -> Iterator[Batch]:
    single = len(arrs) == 1
    if n == 0:
        return
    if size is None:
        yield arrs[0] if single else tuple(arrs)
        return
    stop_at = n - n % size if drop_last else n
    for start in range(0, stop_at, size):
        stop = min(start + size, n)
        if order is None:
            batch = tuple(a[start:stop] for a in arrs)  # views: no copy
        else:
            idx = order[start:stop]
            batch = tuple(a[idx] for a in arrs)
        yield batch[0] if single else batch
