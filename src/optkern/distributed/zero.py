"""ZeRO stage 1: optimizer state sharded across ranks (as DeepSpeed's stage 1 and torch's
ZeroRedundancyOptimizer do it)."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np

import optkern as ok

from ._agree import (
    StepDigest,
    agree,
    describe_groups,
    describe_params,
    require_float32,
)
from ._layout import Layout, flat_state, merge_meta, state_from_flat
from ._mpi import (
    Collectives,
    check_num_threads,
    clip_coefficient,
    combine_norms,
    configure_threads,
)

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
        self._coll = Collectives(comm, timeout, on_error)
        self.comm = self._coll.comm
        self.optimizer_class = optimizer_class
        self.deterministic = bool(deterministic)
        with self._coll.guard("ZeroRedundancyOptimizer()"):
            num_threads = check_num_threads(num_threads)
            #: An optimizer over the user's parameters that never steps and holds no state: its
            #: param_groups are this wrapper's (for schedulers and for checking state dicts).
            self.optimizer = optimizer_class(params, **hyperparameters)
            # before any collective whose size depends on them: the ranks agree on everything
            agree(
                self._coll,
                [
                    ("the call", "ZeroRedundancyOptimizer()"),
                    ("the wrapper", "ZeroRedundancyOptimizer"),
                    ("the optimizer class", optimizer_class.__qualname__),
                    ("deterministic", repr(self.deterministic)),
                    ("broadcast_params", repr(bool(broadcast_params))),
                ]
                + describe_params(self.optimizer.param_groups)
                + describe_groups(self.optimizer.param_groups),
                "the ZeroRedundancyOptimizer construction",
            )
            require_float32(
                [p for g in self.optimizer.param_groups for p in g["params"]],
                "ZeroRedundancyOptimizer",
            )
            rule = optimizer_class._rule
            if rule.reduction or rule.factored:  # the same class on every rank: all refuse
                err = ValueError(
                    f"ZeroRedundancyOptimizer cannot shard {optimizer_class.__name__}: its "
                    "update "
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
                err.raised_on_every_rank = True  # type: ignore[attr-defined]
                raise err
            self._shadow_switch()
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
                hyper = self._hyper(gi)
                hyper.pop("param_names", None)  # one unnamed view per group
                groups.append(dict(hyper, params=[self.flat[a:b]]))
        self.inner: Optional[ok.Optimizer] = optimizer_class(groups) if groups else None
        self._inner_grads = [self._gslice[a - self.lo : b - self.lo] for _, a, b in self._inner_map]
        self.step_count = 0
        self.skipped_steps = 0
        self._step_digest = StepDigest()

    # -- user-facing groups ---------------------------------------------------------------------

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def _hyper(self, gi: int) -> Dict[str, Any]:
        return {k: v for k, v in self.optimizer.param_groups[gi].items() if k != "params"}

    def _sync_hyperparameters(self) -> None:
        # not train_mode: the inner optimizer's mode says where its slice is (see _switch)
        for k, (gi, _, _) in enumerate(self._inner_map):
            hyper = self._hyper(gi)
            hyper.pop("train_mode", None)
            hyper.pop("param_names", None)
            self.inner.param_groups[k].update(hyper)

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
            if not isinstance(g, np.ndarray) or g.dtype != np.float32:
                what = f"dtype {g.dtype}" if isinstance(g, np.ndarray) else type(g).__name__
                raise TypeError(f"grads[{i}] must be a float32 array of shape {p.shape}, got {what}")
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}] must have shape {p.shape}, got {g.shape}")
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
            p = _norm_type(norm_type) if check else 2.0
            if max_grad_norm is not None and not float(max_grad_norm) >= 0:
                raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm!r}")
            source = self._gradient_source(grads)
            # First, as every collective call of this wrapper: the ranks agree (the call, the
            # hyperparameters, the step's options, the counters) before anything changes.
            options = {
                "max_grad_norm": max_grad_norm,
                "norm_type": norm_type,
                "skip_if_nonfinite": bool(skip_if_nonfinite),
            }
            counters = {"step_count": self.step_count, "skipped_steps": self.skipped_steps}
            call = "ZeroRedundancyOptimizer.step"
            agree(
                coll,
                lambda: self._step_digest.fields(call, self.param_groups, options, counters),
                "this ZeroRedundancyOptimizer step",
                self._step_digest.digest(call, self.param_groups, options, counters),
            )
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
            if not all(g.get("train_mode", True) for g in self.param_groups):
                err = RuntimeError(
                    f"{self.optimizer_class.__name__}.step() in eval mode: call train() first "
                    "(and eval() again before evaluating or saving)"
                )
                err.raised_on_every_rank = True  # type: ignore[attr-defined]
                raise err
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

    # -- Schedule-Free's train()/eval() ---------------------------------------------------------

    def train(self) -> None:
        """Schedule-Free: every parameter to y, where gradients are taken (collective: call it
        on every rank). Each rank moves its slice with the z it holds, then the parameters are
        gathered, as after a step."""
        self._switch(True)

    def eval(self) -> None:
        """Schedule-Free: every parameter to x, to evaluate or save (collective: call it on
        every rank)."""
        self._switch(False)

    def _switch(self, to_train: bool) -> None:
        what = "train" if to_train else "eval"
        if not hasattr(self.optimizer_class, "eval"):
            raise TypeError(
                f"{self.optimizer_class.__name__} has no train()/eval() (only the Schedule-Free "
                "optimizers switch modes)"
            )
        coll = self._coll
        with coll.guard(f"ZeroRedundancyOptimizer.{what}"):
            agree(
                coll,
                [
                    ("the call", f"ZeroRedundancyOptimizer.{what}()"),
                    ("step_count", str(self.step_count)),
                ]
                + describe_groups(self.param_groups),
                f"ZeroRedundancyOptimizer.{what}()",
            )
            if self.inner is not None:
                self._sync_hyperparameters()
                getattr(self.inner, what)()
            for g in self.param_groups:
                g["train_mode"] = to_train
            coll.allgatherv(self.flat, self.ranges, "the allgather of the parameters")
            self._copy_out()

    def _shadow_switch(self) -> None:
        """The state-less optimizer that holds the user's groups has nothing to move: its
        train()/eval() would only flip the flag, so they point here instead."""
        if not hasattr(self.optimizer_class, "eval"):
            return

        def refuse(*_: Any) -> None:
            raise RuntimeError(
                "this optimizer only holds a ZeroRedundancyOptimizer's groups (its state is "
                "sharded across ranks): call train()/eval() on the ZeroRedundancyOptimizer, "
                "on every rank"
            )

        self.optimizer.train = refuse  # type: ignore[method-assign]
        self.optimizer.eval = refuse  # type: ignore[method-assign]

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
            agree(
                coll,
                [("the call", "ZeroRedundancyOptimizer.state_dict()")],
                "ZeroRedundancyOptimizer.state_dict()",
            )
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
        single-process ``optimizer_class``, then each rank keeps its slice. Not collective.
        Everything is checked before anything changes."""
        with self._coll.guard("ZeroRedundancyOptimizer.load_state_dict"):
            whole = self.whole_optimizer()
            whole.load_state_dict(state_dict)  # checks it
            self._prepare_load_from(whole)()

    def whole_optimizer(self) -> ok.Optimizer:
        """A new single-process ``optimizer_class`` over the user's parameters with these
        groups' hyperparameters (and names), holding no state."""
        groups = []
        for g in self.param_groups:
            group = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            names = g.get("param_names")
            group["params"] = list(zip(names, g["params"])) if names is not None else g["params"]
            groups.append(group)
        opt = self.optimizer_class(groups)
        for group, g in zip(opt.param_groups, self.param_groups):
            if "train_mode" in g:
                group["train_mode"] = g["train_mode"]
        return opt

    def _prepare_load_from(self, opt: ok.Optimizer) -> Callable[[], None]:
        """This rank's slice of a single-process optimizer's state, hyperparameters and
        counters, checked: returns the function that installs them (``opt`` is only read)."""
        state = {
            i: opt.state[p]
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            if p in opt.state
        }
        meta, flats = flat_state(self.layout, {"state": state}, self.lo, self.hi)
        groups = []
        index = 0
        for g in opt.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(index, index + len(g["params"])))
            index += len(g["params"])
            groups.append(packed)
        return self._prepare_install(groups, meta, flats, opt.step_count, opt.skipped_steps)

    def _prepare_install(
        self,
        groups: Optional[List[Dict[str, Any]]],
        meta: Sequence[Dict[str, Any]],
        flats: Dict[str, np.ndarray],
        step_count: Any,
        skipped_steps: Any,
    ) -> Callable[[], None]:
        """Checks this rank's slice ``flats`` (over ``[lo, hi)``) described by ``meta``, with
        the user-facing groups' hyperparameters ``groups`` (a state dict's ``param_groups``;
        None keeps the current ones) and the counters, by the optimizers' own state-dict
        checks; returns the function that installs them (which then cannot fail)."""
        from optkern.optimizer import _load_step

        shadow_sd = None
        if groups is not None:
            shadow_sd = {"state": {}, "param_groups": groups}
            self.optimizer._parse_state_dict(shadow_sd)

            def hyper(gi: int) -> Dict[str, Any]:
                return {k: v for k, v in groups[gi].items() if k != "params"}
        else:
            hyper = self._hyper
        step_count = _load_step(step_count, "step_count")
        skipped_steps = _load_step(skipped_steps, "skipped_steps")
        inner_sd = None
        if self.inner is not None:
            state = {}
            inner_groups = []
            for k, (gi, a, b) in enumerate(self._inner_map):
                m = meta[gi]
                if m["has_state"]:
                    entry: Dict[str, Any] = {} if m["step"] is None else {"step": m["step"]}
                    entry.update(m.get("numbers", {}))  # the carried numbers (see flat_state)
                    for n in m["names"]:
                        entry[n] = flats[n][a - self.lo : b - self.lo]
                    state[k] = entry
                h = hyper(gi)
                h.pop("param_names", None)  # the inner groups hold one unnamed view each
                inner_groups.append(dict(h, params=[k]))
            inner_sd = {
                "state": state,
                "param_groups": inner_groups,
                "step_count": step_count,
                "skipped_steps": 0,
            }
            self.inner._parse_state_dict(inner_sd)

        def install() -> None:
            if shadow_sd is not None:
                self.optimizer.load_state_dict(shadow_sd)
            if inner_sd is not None:
                self.inner.load_state_dict(inner_sd)
            self.step_count = step_count
            self.skipped_steps = skipped_steps

        return install

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
