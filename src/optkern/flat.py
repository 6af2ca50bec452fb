"""FlatParams: many parameters in one aligned float32 block, so a whole model steps in one
contiguous pass (one buffer for the optimizer instead of one per layer)."""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np

__all__ = ["FlatParams"]

ALIGN_ELEMENTS = 16  # each view starts on a 64-byte boundary (a cache line, an AVX-512 vector)

Shape = Tuple[int, ...]


def _aligned_zeros(n: int) -> np.ndarray:
    raw = np.zeros(n + ALIGN_ELEMENTS, dtype=np.float32)
    start = (-raw.ctypes.data // 4) % ALIGN_ELEMENTS
    return raw[start : start + n]


class FlatParams:
    """One 64-byte-aligned float32 block holding arrays of the given shapes as views.

        params = ok.FlatParams([(784, 128), (128,), (128, 10), (10,)])
        W1, b1, W2, b2 = params            # NumPy views into params.flat, zero-initialised
        grads = params.zeros_like()        # the same layout, for the gradients
        opt = ok.Adam([params.flat])       # one buffer: one contiguous pass per step
        ...                                # backward writes into the views of grads in place
        opt.step([grads.flat])

    Each view starts on a 64-byte boundary; the padding between views (fewer than 16 floats
    each) is zero in both blocks and stays zero under every optimizer here. Writing a view
    (``W1[...] = ...``, ``np.matmul(..., out=gW1)``) writes the block; rebinding a name does not.
    All views share the block's hyperparameters: use separate arrays for per-layer groups.
    """

    def __init__(self, shapes: Sequence[Union[Shape, int]]) -> None:
        self.shapes: List[Shape] = [
            (s,) if isinstance(s, (int, np.integer)) else tuple(s) for s in shapes
        ]
        for s in self.shapes:
            if any((not isinstance(d, (int, np.integer))) or d < 0 for d in s):
                raise ValueError(f"a shape must be a tuple of non-negative ints, got {s!r}")
        self.offsets: List[int] = []
        at = 0
        for s in self.shapes:
            self.offsets.append(at)
            size = int(np.prod(s, dtype=np.int64))
            at += -(-size // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
        self.flat = _aligned_zeros(at)
        self.views: List[np.ndarray] = [
            self.flat[o : o + int(np.prod(s, dtype=np.int64))].reshape(s)
            for o, s in zip(self.offsets, self.shapes)
        ]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray]) -> "FlatParams":
        """A block holding copies of ``arrays`` (any float dtype, converted to float32)."""
        arrays = [np.asarray(a) for a in arrays]
        out = cls([a.shape for a in arrays])
        for view, a in zip(out.views, arrays):
            view[...] = a
        return out

    @classmethod
    def filled(cls, shapes: Sequence[Union[Shape, int]], value: float) -> "FlatParams":
        """A block of the given shapes with every element (padding too) set to ``value``."""
        out = cls(shapes)
        if value != 0:
            out.flat[...] = value
        return out

    def __getstate__(self) -> dict:
        # The views are rebuilt from the block on unpickling: pickled one by one they would
        # come back as separate arrays, no longer sharing the block's memory.
        return {"shapes": self.shapes, "offsets": self.offsets, "flat": self.flat}

    def __setstate__(self, state: dict) -> None:
        self.shapes, self.offsets, self.flat = state["shapes"], state["offsets"], state["flat"]
        self.views = [
            self.flat[o : o + int(np.prod(s, dtype=np.int64))].reshape(s)
            for o, s in zip(self.offsets, self.shapes)
        ]

    def zeros_like(self) -> "FlatParams":
        """A zeroed block with the same layout (for gradients)."""
        return FlatParams(self.shapes)

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.views)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.views[i]

    def __repr__(self) -> str:
        return f"FlatParams({len(self.views)} arrays, {self.flat.size} floats)"
