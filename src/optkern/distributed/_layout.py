"""The flat layout of a model's parameters that both wrappers, and sharded checkpoints, use.

Parameters are laid out in group order, each starting on a 16-element (64-byte) boundary, as
:class:`optkern.FlatParams` lays them out; the last one ends the layout (no tail padding). The
layout depends only on the parameters' shapes, never on the number of ranks, so a sharded
checkpoint written by N ranks can be read by M. Optimizer state is flattened the same way: one
vector per state name (``exp_avg``, ...) over the whole layout, zero in the padding.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._mpi import split

ALIGN = 16


class Layout:
    def __init__(self, group_shapes: Sequence[Sequence[Tuple[int, ...]]]) -> None:
        self.shapes: List[Tuple[int, ...]] = []
        self.group_of: List[int] = []
        self.offsets: List[int] = []
        self.sizes: List[int] = []
        self.group_ranges: List[Tuple[int, int]] = []
        at = 0
        for gi, shapes in enumerate(group_shapes):
            start = -(-at // ALIGN) * ALIGN
            for shape in shapes:
                at = -(-at // ALIGN) * ALIGN
                size = int(np.prod(shape, dtype=np.int64))
                self.shapes.append(tuple(shape))
                self.group_of.append(gi)
                self.offsets.append(at)
                self.sizes.append(size)
                at += size
            self.group_ranges.append((start, at))
        self.total = at
        # groups are contiguous and cover [0, total) once padding is given to the group before
        for gi in range(len(self.group_ranges) - 1):
            self.group_ranges[gi] = (self.group_ranges[gi][0], self.group_ranges[gi + 1][0])

    @classmethod
    def of(cls, param_groups: Sequence[Mapping[str, Any]]) -> "Layout":
        return cls([[p.shape for p in g["params"]] for g in param_groups])

    def ranges(self, parts: int) -> List[Tuple[int, int]]:
        return split(self.total, parts, ALIGN)

    def params_of_group(self, gi: int) -> List[int]:
        return [i for i, g in enumerate(self.group_of) if g == gi]

    def describe(self) -> Dict[str, Any]:
        return {
            "shapes": [list(s) for s in self.shapes],
            "group_of": self.group_of,
            "total": self.total,
        }

    def scatter_into(
        self, flat: np.ndarray, arrays: Sequence[Optional[np.ndarray]], lo: int = 0
    ) -> None:
        """Copies each array's part that falls in ``[lo, lo + flat.size)`` into ``flat``."""
        hi = lo + flat.size
        for off, size, a in zip(self.offsets, self.sizes, arrays):
            a_lo, a_hi = max(off, lo), min(off + size, hi)
            if a is None or a_lo >= a_hi:
                continue
            flat[a_lo - lo : a_hi - lo] = np.asarray(a).reshape(-1)[a_lo - off : a_hi - off]

    def views(self, flat: np.ndarray) -> List[np.ndarray]:
        """Each parameter's view of a whole-layout vector."""
        return [flat[o : o + n].reshape(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]


def flat_state(
    layout: Layout, sd: Mapping[str, Any], lo: int, hi: int
) -> Tuple[List[Dict[str, Any]], Dict[str, np.ndarray]]:
    """From a state dict in optkern's layout (parameter ids 0, 1, ... in group order): per group
    ``{"has_state", "step", "names"}`` and, per state name, the float32 vector of ``[lo, hi)``.

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
    for name in all_names:
        flat = np.zeros(hi - lo, np.float32)
        layout.scatter_into(
            flat,
            [None if state.get(i) is None else state[i].get(name) for i in range(len(layout.shapes))],
            lo,
        )
        flats[name] = flat
    return meta, flats


def state_from_flat(
    layout: Layout, meta: Sequence[Mapping[str, Any]], flats: Mapping[str, np.ndarray]
) -> Dict[int, Dict[str, Any]]:
    """The inverse of :func:`flat_state` over the whole layout: ``{param id: {name: array}}``
    (arrays are views of ``flats``)."""
    state: Dict[int, Dict[str, Any]] = {}
    views = {name: layout.views(flat) for name, flat in flats.items()}
    for i, gi in enumerate(layout.group_of):
        m = meta[gi]
        if not m["has_state"]:
            continue
        entry: Dict[str, Any] = {}
        if m["step"] is not None:
            entry["step"] = m["step"]
        entry.update(m.get("numbers", {}))
        for name in m["names"]:
            entry[name] = views[name][i]
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


__all__ = ["Layout", "ALIGN", "flat_state", "state_from_flat", "merge_meta", "split"]
