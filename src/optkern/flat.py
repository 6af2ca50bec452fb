"""FlatParams: many parameters in one aligned float32 (or float64) block, so a whole model steps
in one contiguous pass (one buffer for the optimizer instead of one per layer)."""

from __future__ import annotations

from typing import Any, Iterator, List, Sequence, Tuple, Union

import numpy as np

__all__ = ["FlatParams"]

ALIGN_BYTES = 64  # each view starts on a 64-byte boundary (a cache line, an AVX-512 vector)
ALIGN_ELEMENTS = 16  # of float32: ALIGN_BYTES // 4

Shape = Tuple[int, ...]

#: The element types the kernels take.
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def element_type(dtype: Any) -> np.dtype:
    """``dtype`` as a NumPy dtype the kernels take (float32 or float64), else TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _aligned_zeros(n: int, dtype: np.dtype = DTYPES[0]) -> np.ndarray:
    per = ALIGN_BYTES // dtype.itemsize
    raw = np.zeros(n + per, dtype=dtype)
    start = (-raw.ctypes.data // dtype.itemsize) % per
    return raw[start : start + n]


class FlatParams:
    """One 64-byte-aligned block of ``dtype`` (float32 by default, or float64) holding arrays of
    the given shapes as views.

        params = ok.FlatParams([(784, 128), (128,), (128, 10), (10,)])
        W1, b1, W2, b2 = params            # NumPy views into params.flat, zero-initialised
        grads = params.zeros_like()        # the same layout, for the gradients
        opt = ok.Adam([params.flat])       # one buffer: one contiguous pass per step
        ...                                # backward writes into the views of grads in place
        opt.step([grads.flat])

    Each view starts on a 64-byte boundary; the padding between views (under 64 bytes each) is
    zero in both blocks and stays zero under every optimizer here. Writing a view
    (``W1[...] = ...``, ``np.matmul(..., out=gW1)``) writes the block; rebinding a name does not.
    All views share the block's hyperparameters: use separate arrays for per-layer groups.
    """

    def __init__(self, shapes: Sequence[Union[Shape, int]], dtype: Any = np.float32) -> None:
        self.dtype = element_type(dtype)
        self.shapes: List[Shape] = [
            (s,) if isinstance(s, (int, np.integer)) else tuple(s) for s in shapes
        ]
        for s in self.shapes:
            if any((not isinstance(d, (int, np.integer))) or d < 0 for d in s):
                raise ValueError(f"a shape must be a tuple of non-negative ints, got {s!r}")
        self.offsets: List[int] = []
        per = ALIGN_BYTES // self.dtype.itemsize
        at = 0
        for s in self.shapes:
            self.offsets.append(at)
            size = int(np.prod(s, dtype=np.int64))
            at += -(-size // per) * per
        self.flat = _aligned_zeros(at, self.dtype)
        self.views: List[np.ndarray] = [
            self.flat[o : o + int(np.prod(s, dtype=np.int64))].reshape(s)
            for o, s in zip(self.offsets, self.shapes)
        ]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], dtype: Any = np.float32) -> "FlatParams":
        """A block holding copies of ``arrays`` (any real dtype, converted to ``dtype``)."""
        arrays = [np.asarray(a) for a in arrays]
        out = cls([a.shape for a in arrays], dtype)
        for view, a in zip(out.views, arrays):
            view[...] = a
        return out

    @classmethod
    def filled(
        cls, shapes: Sequence[Union[Shape, int]], value: float, dtype: Any = np.float32
    ) -> "FlatParams":
        """A block of the given shapes with every element (padding too) set to ``value``."""
        out = cls(shapes, dtype)
        if value != 0:
            out.flat[...] = value
        return out

    def __getstate__(self) -> dict:
        # The views are rebuilt from the block on unpickling: pickled one by one they would
        # come back as separate arrays, no longer sharing the block's memory.
        return {"shapes": self.shapes, "offsets": self.offsets, "flat": self.flat}

    def __setstate__(self, state: dict) -> None:
        self.shapes, self.offsets, self.flat = state["shapes"], state["offsets"], state["flat"]
        self.dtype = self.flat.dtype
        self.views = [
            self.flat[o : o + int(np.prod(s, dtype=np.int64))].reshape(s)
            for o, s in zip(self.offsets, self.shapes)
        ]

    def zeros_like(self) -> "FlatParams":
        """A zeroed block with the same layout and dtype (for gradients)."""
        return FlatParams(self.shapes, self.dtype)

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.views)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.views[i]

    def __repr__(self) -> str:
        return f"FlatParams({len(self.views)} arrays, {self.flat.size} x {self.dtype})"
