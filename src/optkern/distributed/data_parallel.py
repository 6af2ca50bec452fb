"""Data parallelism: every rank holds the whole model and optimizer, gradients are averaged."""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import optkern as ok

from ._agree import (
    SUM_SLOTS,
    RanksDisagree,
    StepDigest,
    agree,
    describe_groups,
    describe_params,
    explain,
    require_float32,
    sums_agree,
    to_sum_slots,
)
from ._layout import ALIGN
from ._mpi import (
    MPI,
    Collectives,
    DistributedError,
    check_num_threads,
    check_positive_real,
    configure_threads,
    split,
)

__all__ = ["DataParallel", "params_digest", "check_identical"]


def params_digest(arrays: Sequence[np.ndarray]) -> bytes:
    """A 16-byte BLAKE2 digest of the arrays' bytes (shapes and dtypes included)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.digest()


def check_identical(arrays: Sequence[np.ndarray], comm=None) -> None:
    """Raises DistributedError unless ``arrays`` hold the same bytes on every rank of ``comm``
    (collective: one allgather of a digest)."""
    comm = MPI.COMM_WORLD if comm is None else comm
    digests = comm.allgather(params_digest(arrays))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedError(f"ranks {differ} hold parameters that differ from rank 0's")


def _switch(optimizer: ok.Optimizer, mode: str) -> None:
    method = getattr(optimizer, mode, None)
    if method is None:
        raise TypeError(
            f"{type(optimizer).__name__} has no train()/eval() (only the Schedule-Free "
            "optimizers switch modes)"
        )
    method()


class DataParallel:
    """Wraps an optkern optimizer so that every rank steps with the gradient averaged over all
    ranks of ``comm`` (each rank computing the gradient of its own batch).

        opt = ok.Adam(model_params, lr=1e-3)
        dp = DataParallel(opt)               # broadcasts rank 0's parameters to every rank
        ...
        dp.step(grads)                       # Allreduce (average), then opt.step locally

    Gradients are copied into one float32 buffer laid out in reverse parameter order (the last
    layers, whose gradients a backward pass computes first, come first) and averaged with
    in-place Allreduce calls of at most ``bucket_mb`` MiB each (one parameter larger than that
    is one bucket). ``grad_buffers`` gives that buffer's view for each parameter: a backward
    pass that writes its gradients there (``np.matmul(..., out=...)``) saves the copy.

    **Overlap.** ``start(grads)`` takes the gradients known so far (None for the others, in the
    same list shape as ``step``) and starts a non-blocking Allreduce (``Iallreduce``) of every
    bucket all of whose gradients are in, in bucket order; call it as the backward pass proceeds
    and ``step`` takes the rest (with blocking Allreduce calls). MPI libraries progress
    non-blocking collectives mostly inside MPI calls: :meth:`progress` (a test of the
    outstanding requests) between layers helps them along. Measure before relying on it: Open
    MPI 5's non-blocking collectives (libnbc) took 15-40x longer than the blocking Allreduce
    for 4 MB buckets over shared memory here (docs/distributed.md), which no overlap repays.

    **Same decision everywhere.** After the average, every rank holds the same gradient bytes
    (MPI's Allreduce gives every rank the same result in Open MPI and MPICH; with
    ``deterministic=True`` this is guaranteed by construction), so ``max_grad_norm`` and
    ``skip_if_nonfinite`` compute the same norm and take the same decision on every rank, and
    every rank ends each step with bit-identical parameters (:func:`check_identical` checks).

    ``deterministic=True``: each bucket is reduced by an all-to-all, a sum in rank order and an
    allgather (the bytes of a ring allreduce), so the result does not depend on the MPI library's
    algorithm: runs are bitwise reproducible for a given N. Buckets are then reduced one after
    another at ``step`` (``start`` only copies).

    A gradient None on some ranks only counts as zeros there and the parameter steps on every
    rank (torch DDP's find_unused_parameters); None on every rank skips it everywhere, as in
    ``Optimizer.step``. The ranks must be built and stepped alike: anything that differs raises
    :class:`RanksDisagree` on every rank (docs/distributed.md, "Ranks must agree").
    ``timeout``, ``on_error``: see :class:`Collectives`; ``num_threads``: see
    :func:`configure_threads`.
    """

    def __init__(
        self,
        optimizer: ok.Optimizer,
        comm=None,
        bucket_mb: float = 25.0,
        *,
        deterministic: bool = False,
        broadcast_params: bool = True,
        timeout: Optional[float] = None,
        on_error: str = "abort",
        num_threads: Any = "auto",
    ) -> None:
        if not isinstance(optimizer, ok.Optimizer):
            raise TypeError(
                f"DataParallel wraps an optkern optimizer, got {type(optimizer).__name__}"
            )
        self._coll = Collectives(comm, timeout, on_error)
        self.comm = self._coll.comm
        with self._coll.guard("DataParallel()"):
            bucket_mb = check_positive_real(bucket_mb, "bucket_mb")
            num_threads = check_num_threads(num_threads)
            self.optimizer = optimizer
            self.deterministic = bool(deterministic)
            self._params = [p for g in optimizer.param_groups for p in g["params"]]
            # before any collective whose size depends on them: the ranks agree on everything
            agree(
                self._coll,
                [
                    ("the call", "DataParallel()"),
                    ("the wrapper", "DataParallel"),
                    ("the optimizer class", type(optimizer).__qualname__),
                    ("bucket_mb", repr(bucket_mb)),
                    ("deterministic", repr(self.deterministic)),
                    ("broadcast_params", repr(bool(broadcast_params))),
                ]
                + describe_params(optimizer.param_groups)
                + describe_groups(optimizer.param_groups),
                "the DataParallel construction",
            )
            require_float32(self._params, "DataParallel")
            self._build(bucket_mb)
            configure_threads(self.comm, num_threads)
            if broadcast_params:
                for p in self._params:
                    self._coll.bcast(p, "the broadcast of the initial parameters")

    def _build(self, bucket_mb: float) -> None:
        n = len(self._params)
        sizes = [int(p.size) for p in self._params]
        # reverse parameter order: the first bucket holds the last parameters
        offsets = [0] * n
        at = 0
        for i in reversed(range(n)):
            at = -(-at // ALIGN) * ALIGN
            offsets[i] = at
            at += sizes[i]
        # after the gradients, a tail summed with them: per parameter 1 where this rank has a
        # gradient (the sum says whether any rank has), then the step's agreement digest
        self._grads_end = at
        self._tail = at + n + SUM_SLOTS
        self._flat = ok.FlatParams([(self._tail,)]).flat[: self._tail]
        self.grad_buffers: List[np.ndarray] = [
            self._flat[o : o + s].reshape(p.shape) for o, s, p in zip(offsets, sizes, self._params)
        ]
        self._present = self._flat[at : at + n]
        self._digest_slots = self._flat[at + n : self._tail]
        limit = max(1, int(min(bucket_mb, 2.0**40) * 2**20) // 4)
        self._buckets: List[Tuple[int, int]] = []  # [lo, hi) of the flat buffer
        self._bucket_of = [0] * n
        lo = hi = 0
        for i in reversed(range(n)):
            end = offsets[i] + sizes[i]
            if hi > lo and end - lo > limit:
                self._buckets.append((lo, hi))
                lo = offsets[i]
            self._bucket_of[i] = len(self._buckets)
            hi = end
        self._buckets.append((lo, self._tail))  # the last bucket carries the tail
        self._members = [
            [i for i in range(n) if self._bucket_of[i] == b] for b in range(len(self._buckets))
        ]
        self._ready = [False] * n
        self._launched = 0
        self._requests: List[Any] = []
        self._scratch: Optional[np.ndarray] = None
        self._step_digest = StepDigest()
        self._call = "DataParallel.step"
        #: a ring allreduce's bytes sent per rank and step
        self.bytes_per_step = 2 * (self._coll.size - 1) * self._flat.nbytes // self._coll.size

    # -- what the optimizer has -----------------------------------------------------------------

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def state_dict(self):
        """The optimizer's state dict (the same on every rank)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def train(self) -> None:
        """Schedule-Free's switch to train mode (every rank holds the whole state: local)."""
        _switch(self.optimizer, "train")

    def eval(self) -> None:
        """Schedule-Free's switch to eval mode (every rank holds the whole state: local)."""
        _switch(self.optimizer, "eval")

    @property
    def buckets(self) -> List[Tuple[int, int]]:
        return list(self._buckets)

    # -- gradients ------------------------------------------------------------------------------

    def _take(self, grads: Sequence[Optional[np.ndarray]], only_new: bool) -> None:
        if not isinstance(grads, (list, tuple)):
            raise TypeError(
                "grads must be a list or tuple of arrays aligned with the parameters, "
                f"got {type(grads).__name__}"
            )
        if len(grads) != len(self._params):
            raise ValueError(
                f"got {len(grads)} gradients for {len(self._params)} parameters; "
                "pass one per parameter (None for none), in group order"
            )
        # every gradient checked before any is copied: a bad one changes nothing
        for i, g in enumerate(grads):
            if g is None or self._ready[i]:
                continue
            view = self.grad_buffers[i]
            if not isinstance(g, np.ndarray):
                raise TypeError(
                    f"grads[{i}] must be a float32 array of shape {view.shape} or None, "
                    f"got {type(g).__name__}"
                )
            if g.dtype != np.float32:
                raise TypeError(
                    f"grads[{i}] must be a float32 array (as its float32 parameter), "
                    f"got dtype {g.dtype}"
                )
            if g.shape != view.shape:
                raise ValueError(f"grads[{i}] must have shape {view.shape}, got {g.shape}")
        for i, g in enumerate(grads):
            if self._ready[i] or (g is None and only_new):
                continue
            view = self.grad_buffers[i]
            if g is None:
                view[...] = 0
                self._present[i] = 0.0
            else:
                if g.ctypes.data != view.ctypes.data:
                    np.copyto(view, g)
                self._present[i] = 1.0
            self._ready[i] = True

    def _launch_ready(self) -> None:
        """Starts a non-blocking Allreduce of each bucket, in order, whose gradients are in (not
        the last one: its tail holds the step's digest, known only at ``step``)."""
        while self._launched < len(self._buckets) - 1 and all(
            self._ready[i] for i in self._members[self._launched]
        ):
            lo, hi = self._buckets[self._launched]
            if self._coll.size > 1 and hi > lo and not self.deterministic:
                self._requests.append(
                    self.comm.Iallreduce(MPI.IN_PLACE, self._flat[lo:hi], op=MPI.SUM)
                )
            self._launched += 1

    def start(self, grads: Sequence[Optional[np.ndarray]]) -> None:
        """Takes the gradients that are ready (None: not yet) and starts averaging the buckets
        they complete, without waiting."""
        with self._coll.guard("DataParallel.start"):
            self._take(grads, only_new=True)
            self._launch_ready()
            self.progress()

    def progress(self) -> None:
        """Lets MPI move the started reductions along (returns at once)."""
        if self._requests:
            MPI.Request.Testall(self._requests)

    def _finish(self, options: Dict[str, Any]) -> List[bool]:
        """Sums every bucket over the ranks, checks that the ranks agree (hyperparameters,
        ``options``, counters) and averages the gradients; returns which parameters have a
        gradient on some rank."""
        coll = self._coll
        inner = self.optimizer
        counters = {"step_count": inner.step_count, "skipped_steps": inner.skipped_steps}
        if coll.size > 1:
            to_sum_slots(
                self._step_digest.digest(self._call, inner.param_groups, options, counters),
                self._digest_slots,
            )
            if self._requests:
                coll.wait(self._requests, "the non-blocking allreduce of the gradients")
            for b in range(self._launched if not self.deterministic else 0, len(self._buckets)):
                lo, hi = self._buckets[b]
                if self.deterministic:
                    self._reduce_deterministic(lo, hi)
                else:  # blocking: Open MPI's blocking Allreduce is much faster than its Iallreduce
                    coll.allreduce(self._flat[lo:hi], "the allreduce of the gradients")
            self._requests = []
            if not sums_agree(self._digest_slots, coll.size):
                fields = self._step_digest.fields(self._call, inner.param_groups, options, counters)
                everyone = coll.allgather_object(fields, "the descriptions of the step")
                raise RanksDisagree(explain(everyone, "this DataParallel step"))
            grads = self._flat[: self._grads_end]
            np.divide(grads, np.float32(coll.size), out=grads)
        return [bool(v > 0) for v in self._present]

    def _reset(self) -> None:
        self._ready = [False] * len(self._params)
        self._launched = 0
        self._requests = []

    def _reduce_deterministic(self, lo: int, hi: int) -> None:
        coll = self._coll
        ranges = split(hi - lo, coll.size)
        mine = ranges[coll.rank][1] - ranges[coll.rank][0]
        need = coll.size * max(hi2 - lo2 for lo2, hi2 in ranges)
        if self._scratch is None or self._scratch.size < need:
            self._scratch = np.empty(need, np.float32)
        bucket = self._flat[lo:hi]
        a, b = ranges[coll.rank]
        out = np.empty(mine, np.float32)
        coll.reduce_scatter(
            bucket, out, ranges, True, self._scratch, "the all-to-all of the gradients"
        )
        bucket[a:b] = out
        coll.allgatherv(bucket, ranges, "the allgather of the gradients")

    def _averaged(
        self, grads: Sequence[Optional[np.ndarray]], options: Dict[str, Any]
    ) -> List[Optional[np.ndarray]]:
        try:
            self._take(grads, only_new=False)
            used = self._finish(options)
        finally:
            self._reset()
        return [v if u else None for v, u in zip(self.grad_buffers, used)]

    def allreduce_(self, grads: Sequence[Optional[np.ndarray]]) -> List[Optional[np.ndarray]]:
        """Averages ``grads`` over the ranks without stepping; returns the averaged gradients
        (views of the internal buffer; None for a parameter no rank has a gradient for)."""
        with self._coll.guard("DataParallel.allreduce_"):
            self._call = "DataParallel.allreduce_"
            return self._averaged(grads, {})

    def step(self, grads: Sequence[Optional[np.ndarray]], **kwargs: Any) -> Optional[float]:
        """Averages the gradients over the ranks (those ``start`` already took are not copied
        again), then ``optimizer.step`` with them and ``kwargs`` (``max_grad_norm``,
        ``norm_type``, ``skip_if_nonfinite``): its return value.

        A gradient None on some ranks only counts as zeros there (as torch DDP's
        find_unused_parameters does), and the parameter steps on every rank; None on every
        rank skips it everywhere."""
        with self._coll.guard("DataParallel.step"):
            if self._coll.size == 1 and not any(self._ready):
                # nothing to average: no copy; a gradient the averaging path would refuse (it
                # averages float32) is refused here too, with one rank as with several
                for i, g in enumerate(grads if isinstance(grads, (list, tuple)) else ()):
                    if isinstance(g, np.ndarray) and g.dtype != np.float32:
                        raise TypeError(
                            f"grads[{i}] must be a float32 array (as its float32 parameter), "
                            f"got dtype {g.dtype}"
                        )
                return self.optimizer.step(grads, **kwargs)
            self._call = "DataParallel.step"
            averaged = self._averaged(grads, kwargs)
            return self.optimizer.step(averaged, **kwargs)

    def check_identical(self) -> None:
        """Raises DistributedError unless every rank's parameters are bit-identical."""
        check_identical(self._params, self.comm)

    def __repr__(self) -> str:
        return (
            f"DataParallel({type(self.optimizer).__name__}, rank {self._coll.rank} of "
            f"{self._coll.size}, {len(self._buckets)} buckets, "
            f"{'deterministic' if self.deterministic else 'MPI allreduce'})"
        )
