"""ZeRO stage 1: optimizer state sharded across ranks (as DeepSpeed's stage 1 and torch's
ZeroRedundancyOptimizer do it)."""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np

import optkern as ok

from ._layout import Layout, flat_state, merge_meta, state_from_flat
from ._mpi import Collectives, clip_coefficient, combine_norms, configure_threads

__all__ = ["ZeroRedundancyOptimizer"]


def _aligned(n: int) -> np.ndarray:
    return ok.FlatParams([(n,)]).flat[:n]


def _block_of(arrays: Sequence[np.ndarray], layout: Layout) -> Optional[np.ndarray]:
    """The whole-layout vector the arrays are views of, if they already sit in one float32 block
    exactly as ``layout`` places them (``ok.FlatParams`` views, or one flat array); else None."""
    if not arrays or any(not isinstance(a, np.ndarray) for a in arrays):
        return None
    roots = []
    for a in arrays:
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            return None
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        roots.append(root)
    root = roots[0]
    if (
        any(r is not root for r in roots)
        or root.dtype != np.float32
        or root.ndim != 1
        or not root.flags.c_contiguous
    ):
        return None
    start = arrays[0].ctypes.data
    skip = start - root.ctypes.data
    if skip % 4 or skip < 0 or skip // 4 + layout.total > root.size:
        return None
    for a, off in zip(arrays, layout.offsets):
        if a.ctypes.data != start + 4 * off:
            return None
    return root[skip // 4 : skip // 4 + layout.total]


class ZeroRedundancyOptimizer:
    """``optimizer_class`` (any optkern optimizer) with its state split across the ranks of
    ``comm``: ZeRO stage 1.

        zero = ZeroRedundancyOptimizer(ok.Adam, [W1, b1, W2, b2], lr=1e-3)
        zero.step([gW1, gb1, gW2, gb2])   # this rank's gradients of its own batch

    The parameters are laid out in one float32 vector (group order, each on a 64-byte boundary,
    as :class:`optkern.FlatParams` places them). Each rank owns one contiguous slice of it (N
    nearly equal slices, boundaries on 16 elements) and keeps the optimizer state of that slice
    only: an inner ``optimizer_class`` over the slice, one 1-D view per parameter group. A step
    is

    1. a reduce-scatter of the gradients, divided by N: each rank gets the average gradient of
       its slice;
    2. with ``max_grad_norm`` or ``skip_if_nonfinite``: each rank's partial norm (float64),
       gathered and combined in rank order, so every rank computes the same global norm and
       takes the same decision (one tiny allgather);
    3. the inner optimizer's fused update of the slice;
    4. an allgather of the parameters, so every rank holds the whole updated model,
       bit-identical.

    **Parameters.** The user's arrays stay the user's arrays. If they already are views of one
    block in exactly this layout (``ok.FlatParams`` views, or a single flat array) that block is
    the storage and nothing is copied; otherwise they are copied into an internal vector at
    construction and the updated values are copied back into them after every step (write to
    them between steps only through a step, or call :meth:`refresh_from_params`). Likewise
    gradients given as views of a block in this layout (``FlatParams.zeros_like()``) are read
    in place; others are copied into a buffer first. With ``broadcast_params`` (default) rank
    0's initial parameters are sent to every rank.

    **What shards.** Every optimizer in optkern updates each element from that element's
    parameter, gradient and state alone, so splitting the vector anywhere gives exactly the
    update of the whole. A rule that looks at a whole array (LAMB's per-array trust ratio: any
    rule with a reduction pass, ``optimizer_class._rule.reduction``; Adafactor's factored
    second moment, ``_rule.factored``) does not shard this way and is refused (DataParallel runs it whole on every rank). Every parameter needs a gradient at every
    step (None is refused: an element-wise shard cannot skip one parameter).

    **Memory.** Optimizer state per rank is 1/N of the whole (:meth:`state_bytes`). Each rank
    also holds the whole parameter vector (and, when gradients are not given in the layout, a
    whole gradient buffer), as ZeRO stage 1 does.

    ``deterministic=True`` replaces MPI's reduce-scatter by an all-to-all plus a sum in rank
    order, so results do not depend on the MPI library's choice of algorithm (bitwise
    reproducible runs for a given N). ``timeout``, ``on_error``: see :class:`Collectives`.
    ``num_threads``: see :func:`configure_threads`.

    ``param_groups`` are the user-facing groups (the user's arrays, hyperparameters): change a
    learning rate there (or attach an ``ok.lr_scheduler`` to :attr:`optimizer`, which shares
    them); the inner optimizer picks the change up at the next step.
    """

    def __init__(
        self,
        optimizer_class: Type[ok.Optimizer],
        params: Any,
        comm=None,
        *,
        deterministic: bool = False,
        broadcast_params: bool = True,
        timeout: Optional[float] = None,
        on_error: str = "abort",
        num_threads: Any = "auto",
        **hyperparameters: Any,
    ) -> None:
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, ok.Optimizer)):
            raise TypeError(
                f"optimizer_class must be an optkern Optimizer class, got {optimizer_class!r}"
            )
        rule = getattr(optimizer_class, "_rule", None)
        if rule is not None and (rule.reduction or rule.factored):  # before any collective
            raise ValueError(
                f"ZeroRedundancyOptimizer cannot shard {optimizer_class.__name__}: its update "
                + (
                    "keeps factors per row and per column of each array and scales it by "
                    "norms over the whole array (a factored kernel)"
                    if rule.factored
                    else "scales each parameter array by a number computed from the whole "
                    "array (a reduction over it)"
                )
                + ", and ZeRO stage 1 splits the arrays element-wise across ranks; use "
                "DataParallel"
            )
        self._coll = Collectives(comm, timeout, on_error)
        self.comm = self._coll.comm
        self.optimizer_class = optimizer_class
        self.deterministic = bool(deterministic)
        #: An optimizer over the user's parameters that never steps and holds no state: its
        #: param_groups are this wrapper's (for schedulers and for checking state dicts).
        self.optimizer = optimizer_class(params, **hyperparameters)
        self.defaults = self.optimizer.defaults
        self.layout = Layout.of(self.optimizer.param_groups)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        block = _block_of(self._params, self.layout)
        self._zero_copy = block is not None
        self.flat = block if block is not None else _aligned(self.layout.total)
        if not self._zero_copy:
            self.layout.scatter_into(self.flat, self._params)
        self.ranges = self.layout.ranges(self._coll.size)
        self.lo, self.hi = self.ranges[self._coll.rank]
        with self._coll.guard("ZeroRedundancyOptimizer()"):
            configure_threads(self.comm, num_threads)
            if broadcast_params:
                self._coll.bcast(self.flat, "broadcast of the initial parameters")
                self._copy_out()
        self._gslice = _aligned(self.hi - self.lo)
        self._gflat: Optional[np.ndarray] = None  # whole gradient buffer, made when needed
        self._scratch = (
            np.zeros(self._coll.size * (self.hi - self.lo), np.float32)
            if self.deterministic and self._coll.size > 1
            else None
        )
        # the inner optimizer: one 1-D view per group that meets this rank's slice
        self._inner_map: List[Tuple[int, int, int]] = []
        groups = []
        for gi, (glo, ghi) in enumerate(self.layout.group_ranges):
            a, b = max(self.lo, glo), min(self.hi, ghi)
            if a < b:
                self._inner_map.append((gi, a, b))
                groups.append(dict(self._hyper(gi), params=[self.flat[a:b]]))
        self.inner: Optional[ok.Optimizer] = optimizer_class(groups) if groups else None
        self._inner_grads = [self._gslice[a - self.lo : b - self.lo] for _, a, b in self._inner_map]
        self.step_count = 0
        self.skipped_steps = 0

    # -- user-facing groups ---------------------------------------------------------------------

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def _hyper(self, gi: int) -> Dict[str, Any]:
        return {k: v for k, v in self.optimizer.param_groups[gi].items() if k != "params"}

    def _sync_hyperparameters(self) -> None:
        for k, (gi, _, _) in enumerate(self._inner_map):
            self.inner.param_groups[k].update(self._hyper(gi))

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (its shard)."""
        if self.inner is None:
            return 0
        return sum(
            v.nbytes
            for p in self.inner.state
            for v in self.inner.state[p].values()
            if isinstance(v, np.ndarray)
        )

    # -- stepping -------------------------------------------------------------------------------

    def _gradient_source(self, grads: Sequence[np.ndarray]) -> np.ndarray:
        if not isinstance(grads, (list, tuple)):
            raise TypeError(
                "grads must be a list or tuple of arrays aligned with the parameters, "
                f"got {type(grads).__name__}"
            )
        if len(grads) != len(self._params):
            raise ValueError(f"step() got {len(grads)} gradients for {len(self._params)} parameters")
        for i, (g, p) in enumerate(zip(grads, self._params)):
            if g is None:
                raise ValueError(
                    f"grads[{i}] is None: ZeroRedundancyOptimizer needs a gradient "
                    "for every parameter at every step (pass zeros)"
                )
            if not isinstance(g, np.ndarray) or g.dtype != np.float32 or g.shape != p.shape:
                what = f"{g.dtype} {g.shape}" if isinstance(g, np.ndarray) else type(g).__name__
                raise ValueError(f"grads[{i}] must be a float32 array of shape {p.shape}, got {what}")
        block = _block_of(list(grads), self.layout)
        if block is not None:
            return block
        if self._gflat is None:
            self._gflat = _aligned(self.layout.total)
        self.layout.scatter_into(self._gflat, grads)
        return self._gflat

    def step(
        self,
        grads: Sequence[np.ndarray],
        *,
        max_grad_norm: Optional[float] = None,
        norm_type: float = 2.0,
        skip_if_nonfinite: bool = False,
    ) -> Optional[float]:
        """One step with this rank's gradients (of its own batch): their average over the ranks
        updates the parameters on every rank. ``max_grad_norm``, ``norm_type`` and
        ``skip_if_nonfinite`` act on the averaged gradient as in ``Optimizer.step``; the return
        value is then its global norm before clipping (the same on every rank)."""
        coll = self._coll
        with coll.guard("ZeroRedundancyOptimizer.step"):
            check = max_grad_norm is not None or skip_if_nonfinite
            if check:
                p = _norm_type(norm_type)
                if max_grad_norm is not None and not float(max_grad_norm) >= 0:
                    raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm!r}")
            source = self._gradient_source(grads)
            coll.reduce_scatter(
                source,
                self._gslice,
                self.ranges,
                self.deterministic,
                self._scratch,
                "the reduce-scatter of the gradients",
            )
            if coll.size > 1:
                np.divide(self._gslice, np.float32(coll.size), out=self._gslice)
            total = None
            if check:
                partial = float(ok.grad_norms([self._gslice], p)[0]) if self._gslice.size else 0.0
                total = combine_norms(coll.allgather_float64(partial, "the gradient norm"), p)
                if skip_if_nonfinite and not math.isfinite(total):
                    self.skipped_steps += 1
                    return total
                if max_grad_norm is not None:
                    coef = clip_coefficient(float(max_grad_norm), total)
                    if coef != 1.0:
                        np.multiply(self._gslice, np.float32(coef), out=self._gslice)
            if self.inner is not None:
                self._sync_hyperparameters()
                self.inner.step(self._inner_grads)
            coll.allgatherv(self.flat, self.ranges, "the allgather of the parameters")
            self._copy_out()
            self.step_count += 1
            return total

    def _copy_out(self) -> None:
        if not self._zero_copy:
            for p, v in zip(self._params, self.layout.views(self.flat)):
                np.copyto(p, v)

    def refresh_from_params(self) -> None:
        """Copies the user's parameter arrays into the internal vector (after they were changed
        other than by a step; a no-op when the arrays are the storage)."""
        if not self._zero_copy:
            self.layout.scatter_into(self.flat, self._params)

    # -- state ----------------------------------------------------------------------------------

    def _local_flat_state(self) -> Tuple[List[Optional[Dict[str, Any]]], Dict[str, np.ndarray]]:
        """Per group (None where this rank holds none of it) and per name, this rank's slice."""
        meta: List[Optional[Dict[str, Any]]] = [None] * len(self.layout.group_ranges)
        flats: Dict[str, np.ndarray] = {}
        if self.inner is None:
            return meta, flats
        for k, (gi, a, b) in enumerate(self._inner_map):
            view = self.inner.param_groups[k]["params"][0]
            if view not in self.inner.state:
                meta[gi] = {"has_state": False, "step": None, "names": []}
                continue
            s = self.inner.state[view]
            names = sorted(n for n, v in s.items() if isinstance(v, np.ndarray))
            meta[gi] = {
                "has_state": True,
                "names": names,
                "step": int(s["step"]) if "step" in s else None,
                "numbers": {n: v for n, v in s.items() if isinstance(v, float)},
            }
            for n in names:
                if n not in flats:
                    flats[n] = np.zeros(self.hi - self.lo, np.float32)
                flats[n][a - self.lo : b - self.lo] = s[n]
        return meta, flats

    def local_state_dict(self) -> Dict[str, Any]:
        """This rank's shard: the inner optimizer's state dict (its parameters are the 1-D
        slices of the groups this rank owns) and where the shard sits."""
        sd = self.inner.state_dict() if self.inner is not None else {"state": {}, "param_groups": []}
        sd["step_count"] = self.step_count
        sd["skipped_steps"] = self.skipped_steps
        sd["zero"] = {
            "rank": self._coll.rank,
            "world_size": self._coll.size,
            "range": [self.lo, self.hi],
            "total": self.layout.total,
            "groups": [[gi, a, b] for gi, a, b in self._inner_map],
        }
        return sd

    def _gather_meta(self, local_meta) -> List[Dict[str, Any]]:
        return merge_meta(self._coll.allgather_object(local_meta, "gathering state metadata"))

    def state_dict(self) -> Dict[str, Any]:
        """The consolidated state of every rank (collective: every rank must call it), in the
        layout a single-process ``optimizer_class`` over the original parameters uses, so
        ``ok.save``, ``load_state_dict`` of a single-process optimizer and torch read it. Every
        rank gets the whole dict (it holds the whole state for a moment)."""
        coll = self._coll
        with coll.guard("ZeroRedundancyOptimizer.state_dict"):
            local_meta, local_flats = self._local_flat_state()
            meta = self._gather_meta(local_meta)
            names = sorted({n for m in meta for n in m["names"]})
            full: Dict[str, np.ndarray] = {}
            for n in names:
                buf = np.zeros(self.layout.total, np.float32)
                if n in local_flats:
                    buf[self.lo : self.hi] = local_flats[n]
                coll.allgatherv(buf, self.ranges, f"the allgather of state {n!r}")
                full[n] = buf
            state = state_from_flat(self.layout, meta, full)
            groups = []
            index = 0
            for gi, g in enumerate(self.param_groups):
                packed = copy.deepcopy(self._hyper(gi))
                packed["params"] = list(range(index, index + len(g["params"])))
                index += len(g["params"])
                groups.append(packed)
            return {
                "state": state,
                "param_groups": groups,
                "step_count": self.step_count,
                "skipped_steps": self.skipped_steps,
            }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a consolidated state dict (from :meth:`state_dict`, ``ok.save``'s optimizer or
        a single-process optimizer over the same parameters): checked whole by a
        single-process ``optimizer_class``, then each rank keeps its slice. Not collective."""
        with self._coll.guard("ZeroRedundancyOptimizer.load_state_dict"):
            self.optimizer.load_state_dict(state_dict)  # checks it (and holds it for a moment)
            self._load_from(self.optimizer)

    def _load_from(self, opt: ok.Optimizer) -> None:
        """Takes this rank's slice of a single-process optimizer's state, hyperparameters and
        counters, then empties that optimizer's state."""
        state = {
            i: opt.state[p]
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            if p in opt.state
        }
        meta, flats = flat_state(self.layout, {"state": state}, self.lo, self.hi)
        if opt is not self.optimizer:
            for g, h in zip(self.optimizer.param_groups, opt.param_groups):
                g.update({k: v for k, v in h.items() if k != "params"})
        self._load_local(meta, flats, opt.step_count, opt.skipped_steps)
        ids = []
        index = 0
        for g in opt.param_groups:
            ids.append(list(range(index, index + len(g["params"]))))
            index += len(g["params"])
        empty = {
            "state": {},
            "param_groups": [
                dict({k: v for k, v in g.items() if k != "params"}, params=i)
                for g, i in zip(opt.param_groups, ids)
            ],
        }
        opt.load_state_dict(empty)

    def _load_local(
        self,
        meta: Sequence[Dict[str, Any]],
        flats: Dict[str, np.ndarray],
        step_count: int,
        skipped_steps: int,
    ) -> None:
        """Installs this rank's slice ``flats`` (over ``[lo, hi)``) described by ``meta``."""
        if self.inner is not None:
            state = {}
            groups = []
            for k, (gi, a, b) in enumerate(self._inner_map):
                m = meta[gi]
                if m["has_state"]:
                    entry: Dict[str, Any] = {} if m["step"] is None else {"step": m["step"]}
                    entry.update(m.get("numbers", {}))  # the carried numbers (see flat_state)
                    for n in m["names"]:
                        entry[n] = flats[n][a - self.lo : b - self.lo]
                    state[k] = entry
                groups.append(dict(self._hyper(gi), params=[k]))
            self.inner.load_state_dict(
                {"state": state, "param_groups": groups, "step_count": step_count, "skipped_steps": 0}
            )
        self.step_count = step_count
        self.skipped_steps = skipped_steps

    def __repr__(self) -> str:
        return (
            f"ZeroRedundancyOptimizer({self.optimizer_class.__name__}, rank "
            f"{self._coll.rank} of {self._coll.size}, slice [{self.lo}, {self.hi}) of "
            f"{self.layout.total})"
        )


def _norm_type(norm_type: Any) -> float:
    if isinstance(norm_type, bool) or not isinstance(
        norm_type, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"norm_type must be a number > 0 or inf, got {norm_type!r}")
    p = float(norm_type)
    if not p > 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}")
    return p
