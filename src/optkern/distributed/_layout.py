"""The flat layout of a model's parameters that both wrappers, and sharded checkpoints, use.

Parameters are laid out in group order, each starting on a 16-element boundary, as
:class:`optkern.FlatParams` lays them out; the last one ends the layout (no tail padding). The
layout depends only on the parameters' shapes and dtypes, never on the number of ranks, so a
sharded checkpoint written by N ranks can be read by M. Ranks own ranges of this element layout.

Each element type has its own vector (a :class:`Part`): the parameters of that dtype, in the
same order, each on a 64-byte boundary (16 float32 or 8 float64 elements). A range of the
element layout is a contiguous range of each part (:meth:`Part.at`), so a rank's range is one
slice per part, and float32 and float64 values are reduced, stored and checkpointed in their
own type. With one dtype, its part is the element layout itself.

Optimizer state is flattened the same way: one vector per state name and part (``exp_avg`` for
float32, ``exp_avg.float64`` for float64: :func:`key`), zero in the padding.
"""

from __future__ import annotations

import bisect
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._mpi import split

ALIGN = 16
#: The bytes each part's arrays are aligned to (``optkern.FlatParams``'s alignment).
ALIGN_BYTES = 64
FLOAT32 = np.dtype(np.float32)


def _place(
    group_shapes: Sequence[Sequence[Tuple[int, ...]]], align: int
) -> Tuple[List[int], List[int], List[Tuple[int, int]], int]:
    """Offsets and sizes of the arrays, each group's range and the total, for ``align``."""
    offsets: List[int] = []
    sizes: List[int] = []
    group_ranges: List[Tuple[int, int]] = []
    at = 0
    for shapes in group_shapes:
        start = -(-at // align) * align
        for shape in shapes:
            at = -(-at // align) * align
            size = int(np.prod(shape, dtype=np.int64))
            offsets.append(at)
            sizes.append(size)
            at += size
        group_ranges.append((start, at))
    # groups are contiguous and cover [0, total) once padding is given to the group before
    for gi in range(len(group_ranges) - 1):
        group_ranges[gi] = (group_ranges[gi][0], group_ranges[gi + 1][0])
    return offsets, sizes, group_ranges, at


def key(name: str, dtype: np.dtype) -> str:
    """The name of state ``name``'s vector for the part of ``dtype`` (a float32 part's is the
    state's name, as in checkpoints written before parts had other types)."""
    return name if dtype == FLOAT32 else f"{name}.{dtype.name}"


class Part:
    """The parameters of one dtype, laid out in their own vector (see the module's text)."""

    def __init__(self, layout: "Layout", dtype: np.dtype) -> None:
        self.dtype = dtype
        #: the parameters (indices into the layout) held by this part, in order
        self.members = [i for i, d in enumerate(layout.dtypes) if d == dtype]
        groups = [
            [layout.shapes[i] for i in self.members if layout.group_of[i] == gi]
            for gi in range(len(layout.group_ranges))
        ]
        self.offsets, self.sizes, self.group_ranges, self.total = _place(
            groups, ALIGN_BYTES // dtype.itemsize
        )
        self.shapes = [layout.shapes[i] for i in self.members]
        # the layout's element where each member ends, for at()
        self._ends = [layout.offsets[i] + layout.sizes[i] for i in self.members]
        self._starts = [layout.offsets[i] for i in self.members]

    def at(self, x: int) -> int:
        """The position in this part of element ``x`` of the layout (a range boundary): where
        the first member that ends after ``x`` starts, or ``x``'s place inside it."""
        k = bisect.bisect_right(self._ends, x)
        if k == len(self.members):
            return self.total
        return self.offsets[k] + max(0, x - self._starts[k])

    def ranges(self, element_ranges: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
        return [(self.at(lo), self.at(hi)) for lo, hi in element_ranges]

    def views(self, flat: np.ndarray) -> List[np.ndarray]:
        """Each member's view of a whole-part vector."""
        return [flat[o : o + n].reshape(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]

    def scatter_into(
        self, flat: np.ndarray, arrays: Sequence[Optional[np.ndarray]], lo: int = 0
    ) -> None:
        """Copies each member's array (``arrays`` indexed by parameter) into the part of it
        that falls in ``[lo, lo + flat.size)`` of this part."""
        hi = lo + flat.size
        for off, size, i in zip(self.offsets, self.sizes, self.members):
            a = arrays[i]
            a_lo, a_hi = max(off, lo), min(off + size, hi)
            if a is None or a_lo >= a_hi:
                continue
            flat[a_lo - lo : a_hi - lo] = np.asarray(a).reshape(-1)[a_lo - off : a_hi - off]


class Layout:
    def __init__(
        self,
        group_shapes: Sequence[Sequence[Tuple[int, ...]]],
        dtypes: Optional[Sequence[Any]] = None,
    ) -> None:
        self.shapes: List[Tuple[int, ...]] = [tuple(s) for g in group_shapes for s in g]
        self.group_of: List[int] = [gi for gi, g in enumerate(group_shapes) for _ in g]
        self.offsets, self.sizes, self.group_ranges, self.total = _place(group_shapes, ALIGN)
        self.dtypes: List[np.dtype] = (
            [FLOAT32] * len(self.shapes) if dtypes is None else [np.dtype(d) for d in dtypes]
        )
        if len(self.dtypes) != len(self.shapes):
            raise ValueError(f"{len(self.dtypes)} dtypes for {len(self.shapes)} shapes")
        #: one part per dtype, float32 first, then float64
        self.parts: List[Part] = [
            Part(self, d) for d in sorted(set(self.dtypes), key=lambda d: d.itemsize)
        ]

    @classmethod
    def of(cls, param_groups: Sequence[Mapping[str, Any]]) -> "Layout":
        return cls(
            [[p.shape for p in g["params"]] for g in param_groups],
            [p.dtype for g in param_groups for p in g["params"]],
        )

    def ranges(self, parts: int) -> List[Tuple[int, int]]:
        return split(self.total, parts, ALIGN)

    def params_of_group(self, gi: int) -> List[int]:
        return [i for i, g in enumerate(self.group_of) if g == gi]

    def part(self, dtype: np.dtype) -> Part:
        return next(p for p in self.parts if p.dtype == dtype)

    def keys(self, names: Sequence[str]) -> List[Tuple[str, str, Part]]:
        """(key, state name, part) for each state name and part."""
        return [(key(n, part.dtype), n, part) for n in names for part in self.parts]

    def describe(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "shapes": [list(s) for s in self.shapes],
            "group_of": self.group_of,
            "total": self.total,
        }
        if any(d != FLOAT32 for d in self.dtypes):  # float32 layouts read as they always did
            out["dtypes"] = [d.name for d in self.dtypes]
        return out


def flat_state(
    layout: Layout, sd: Mapping[str, Any], lo: int, hi: int
) -> Tuple[List[Dict[str, Any]], Dict[str, np.ndarray]]:
    """From a state dict in optkern's layout (parameter ids 0, 1, ... in group order): per group
    ``{"has_state", "step", "names"}`` and, per state name and part (:func:`key`), the vector of
    that part's range for the layout's ``[lo, hi)``, in the part's dtype.

    Sharding by element needs the state of every parameter of a group to be alike (the same
    names and step count), as it is when every step gave every parameter a gradient; otherwise
    ValueError (save a consolidated checkpoint instead)."""
    state = sd["state"]
    n_groups = len(layout.group_ranges)
    meta: List[Dict[str, Any]] = []
    for gi in range(n_groups):
        ids = layout.params_of_group(gi)
        entries = [state.get(i) for i in ids]
        have = [e is not None for e in entries]
        if not any(have):
            meta.append({"has_state": False, "step": None, "names": []})
            continue
        if not all(have):
            raise ValueError(
                f"param group {gi}: some parameters have optimizer state and some "
                "do not (some steps left them out), which a sharded layout cannot "
                "hold; save a consolidated checkpoint instead"
            )
        first = entries[0]
        names = sorted(k for k, v in first.items() if isinstance(v, np.ndarray))
        # a rule's carried numbers (NAdam's mu_product, ASGD's eta and mu): floats, alike for
        # every parameter of the group when each step gave each a gradient, kept with the step
        numbers = {k: v for k, v in first.items() if isinstance(v, float)}
        others = sorted(k for k in first if k not in names and k not in numbers)
        if others not in ([], ["step"]):
            raise ValueError(
                f"param group {gi}: state entries {others} are not arrays, a step "
                "count or numbers, which a sharded layout cannot hold"
            )
        step = first.get("step")
        for i, e in zip(ids, entries):
            for k, v in e.items():  # element-wise sharding: states shaped like their parameter
                if isinstance(v, np.ndarray) and v.shape != tuple(layout.shapes[i]):
                    raise ValueError(
                        f"param group {gi}: parameter {i}'s state {k!r} has shape {v.shape}, "
                        f"not its parameter's {tuple(layout.shapes[i])} (a factored state, "
                        "as Adafactor's), which a sharded layout cannot hold; save a "
                        "consolidated checkpoint instead"
                    )
            if (
                sorted(k for k, v in e.items() if isinstance(v, np.ndarray)) != names
                or e.get("step") != step
                or {k: v for k, v in e.items() if isinstance(v, float)} != numbers
            ):
                raise ValueError(
                    f"param group {gi}: parameter {i}'s state differs from the "
                    "group's first parameter's (names, step count or carried "
                    "numbers); save a consolidated checkpoint instead"
                )
        meta.append(
            {
                "has_state": True,
                "step": None if step is None else int(step),
                "names": names,
                "numbers": numbers,
            }
        )
    all_names = sorted({n for m in meta for n in m["names"]})
    flats: Dict[str, np.ndarray] = {}
    for k, name, part in layout.keys(all_names):
        a, b = part.at(lo), part.at(hi)
        flat = np.zeros(b - a, part.dtype)
        part.scatter_into(
            flat,
            [None if state.get(i) is None else state[i].get(name) for i in range(len(layout.shapes))],
            a,
        )
        flats[k] = flat
    return meta, flats


def state_from_flat(
    layout: Layout, meta: Sequence[Mapping[str, Any]], flats: Mapping[str, np.ndarray]
) -> Dict[int, Dict[str, Any]]:
    """The inverse of :func:`flat_state` over the whole layout: ``{param id: {name: array}}``
    (arrays are views of ``flats``, one whole-part vector per :func:`key`)."""
    state: Dict[int, Dict[str, Any]] = {}
    views: Dict[Tuple[str, int], np.ndarray] = {}
    for part in layout.parts:
        for name in {n for m in meta for n in m["names"]}:
            for i, v in zip(part.members, part.views(flats[key(name, part.dtype)])):
                views[name, i] = v
    for i, gi in enumerate(layout.group_of):
        m = meta[gi]
        if not m["has_state"]:
            continue
        entry: Dict[str, Any] = {}
        if m["step"] is not None:
            entry["step"] = m["step"]
        entry.update(m.get("numbers", {}))
        for name in m["names"]:
            entry[name] = views[name, i]
        state[i] = entry
    return state


def merge_meta(metas: Sequence[Sequence[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """One per-group description from every rank's (a rank that holds no part of a group says
    nothing about it)."""
    out: List[Dict[str, Any]] = []
    for gi in range(len(metas[0])):
        known = [m[gi] for m in metas if m[gi] is not None]
        out.append(dict(known[0]) if known else {"has_state": False, "step": None, "names": []})
    return out


__all__ = ["Layout", "Part", "ALIGN", "key", "flat_state", "state_from_flat", "merge_meta", "split"]
