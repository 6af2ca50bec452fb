"""Row-sparse gradients: the gradient of an embedding table (or any parameter) where only some
rows are nonzero, given as the rows' indices and their values.

    g = ok.RowSparse(indices, values)   # values[j] is the gradient of row indices[j]
    opt = ok.SparseAdam([table]); opt.step([g])

``ok.SparseAdam``, ``ok.Adagrad`` and ``ok.SGD`` take a RowSparse in ``step``'s gradient list
for any of their parameters. Rows not listed have a zero gradient; an index listed more than once
has its values summed, in the order they appear (as torch's ``coalesce``). How each optimizer
treats the rows (torch's semantics):

- SparseAdam: only the rows present are touched (their moments advance; the others keep theirs),
  with bias corrections from the parameter's step count, which every step advances.
- Adagrad: the rows present get ``sum += g^2`` and their update; ``weight_decay`` must be 0.
- SGD without momentum: the rows present move by ``-lr * g``. With momentum the update is SGD's
  on the dense gradient (the buffer decays on every row), made in one pass over the table without
  building that gradient. ``weight_decay`` must be 0.

Other optimizers refuse a RowSparse gradient (as torch's refuse sparse gradients).
"""

from __future__ import annotations

from typing import Any, List, Tuple

import numpy as np

__all__ = ["RowSparse"]


class RowSparse:
    """A row-sparse gradient: ``values[j]`` is the gradient of row ``indices[j]`` of a parameter
    of shape ``(rows, *values.shape[1:])``.

    ``indices``: a 1-D array (or sequence) of integers; kept as a C-contiguous int64 array (a
    copy only when it is not one already). ``values``: a float32 array of shape
    ``(len(indices), *row_shape)``, C-contiguous, not copied. Indices are checked against the
    parameter at ``step`` (each must be in ``[0, rows)``), before anything is written.
    """

    __slots__ = ("_indices", "_values")

    def __init__(self, indices: Any, values: Any) -> None:
        if isinstance(indices, RowSparse) or isinstance(values, RowSparse):
            raise TypeError("RowSparse(indices, values) takes two arrays, not a RowSparse")
        idx = np.asarray(indices)
        if idx.dtype == np.bool_ or idx.dtype.kind not in "iu":
            raise TypeError(f"RowSparse indices must be integers, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"RowSparse indices must be 1-D, got shape {idx.shape}")
        if idx.dtype.kind == "u" and idx.size and int(idx.max()) > np.iinfo(np.int64).max:
            raise ValueError("RowSparse indices must fit in int64")
        if idx.dtype != np.int64 or not idx.flags.c_contiguous:
            idx = np.ascontiguousarray(idx, dtype=np.int64)
        if not isinstance(values, np.ndarray):
            raise TypeError(
                f"RowSparse values must be a float32 NumPy array, got {type(values).__name__}"
            )
        if values.dtype != np.float32:
            raise TypeError(
                f"RowSparse values must be float32 (for float32 and float64 parameters alike), "
                f"got dtype {values.dtype}"
            )
        if values.ndim < 1 or values.shape[0] != idx.shape[0]:
            raise ValueError(
                f"RowSparse values must have shape (len(indices), ...) = ({idx.shape[0]}, ...), "
                f"got {values.shape}"
            )
        if not values.flags.c_contiguous:
            raise ValueError(
                "RowSparse values must be C-contiguous (np.ascontiguousarray() makes a copy)"
            )
        self._indices = idx
        self._values = values

    @property
    def indices(self) -> np.ndarray:
        return self._indices

    @property
    def values(self) -> np.ndarray:
        return self._values

    @property
    def nnz(self) -> int:
        """How many rows are listed (duplicates counted)."""
        return int(self._indices.shape[0])

    @property
    def row_shape(self) -> Tuple[int, ...]:
        return tuple(self._values.shape[1:])

    def to_dense(self, rows: int) -> np.ndarray:
        """The dense float32 gradient of a parameter with ``rows`` rows (duplicates summed in
        order, in float32, as the optimizers sum them)."""
        idx = self._indices
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= rows):
            raise ValueError(f"RowSparse indices must be in [0, {rows}) for {rows} rows")
        out = np.zeros((rows,) + self.row_shape, dtype=np.float32)
        np.add.at(out, idx, self._values)  # unbuffered: duplicates in order of appearance
        return out

    def coalesced(self) -> Tuple[np.ndarray, np.ndarray]:
        """(the distinct rows listed, ascending; their gradients, duplicates summed in the order
        they appear, float32): the rows a step touches and what it applies to them."""
        rows, inverse = np.unique(self._indices, return_inverse=True)
        out = np.zeros((len(rows),) + self.row_shape, dtype=np.float32)
        np.add.at(out, inverse.reshape(-1), self._values)
        return rows, out

    def __reduce__(self) -> Any:
        return (RowSparse, (self._indices, self._values))

    def __repr__(self) -> str:
        return f"RowSparse(nnz={self.nnz}, row_shape={self.row_shape})"


def for_norms(grads: List[Any]) -> List[Any]:
    """``grads`` with each RowSparse replaced by its coalesced values (flat): the same norms as
    the dense gradients it stands for."""
    return [g.coalesced()[1].reshape(-1) if isinstance(g, RowSparse) else g for g in grads]


def check_row_sources(params: List[Any], grads: List[Any]) -> None:
    """ValueError if a RowSparse gradient's values share memory with a parameter (which a step
    would write while reading them); the core checks this within a group, this across groups."""
    for i, g in enumerate(grads):
        if isinstance(g, RowSparse) and g.values.size:
            for j, p in enumerate(params):
                if isinstance(p, np.ndarray) and np.may_share_memory(g.values, p):
                    raise ValueError(
                        f"grads[{i}].values (a RowSparse) shares memory with parameter {j}; "
                        "every buffer an optimizer writes must be separate from all others"
                    )


def _register() -> None:
    from . import _core

    _core._set_row_sparse_type(RowSparse)


_register()
