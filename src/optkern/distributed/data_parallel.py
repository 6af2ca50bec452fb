"""Data parallelism: every rank holds the whole model and optimizer, gradients are averaged."""

from __future__ import annotations

import hashlib
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

import optkern as ok

from ._layout import ALIGN
from ._mpi import MPI, Collectives, DistributedError, configure_threads, split

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

    A gradient may be None (that parameter is skipped, as in ``Optimizer.step``) when it is None
    on every rank. ``timeout``, ``on_error``: see :class:`Collectives`; ``num_threads``: see
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
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        self.optimizer = optimizer
        self._coll = Collectives(comm, timeout, on_error)
        self.comm = self._coll.comm
        self.deterministic = bool(deterministic)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        n = len(self._params)
        sizes = [int(p.size) for p in self._params]
        # reverse parameter order: the first bucket holds the last parameters
        offsets = [0] * n
        at = 0
        for i in reversed(range(n)):
            at = -(-at // ALIGN) * ALIGN
            offsets[i] = at
            at += sizes[i]
        self._flat = ok.FlatParams([(max(at, 1),)]).flat[:at]
        self.grad_buffers: List[np.ndarray] = [
            self._flat[o : o + s].reshape(p.shape) for o, s, p in zip(offsets, sizes, self._params)
        ]
        limit = max(1, int(bucket_mb * 2**20) // 4)
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
        if hi > lo or not self._buckets:
            self._buckets.append((lo, hi))
        self._members = [
            [i for i in range(n) if self._bucket_of[i] == b] for b in range(len(self._buckets))
        ]
        self._ready = [False] * n
        self._launched = 0
        self._requests: List[Any] = []
        self._scratch: Optional[np.ndarray] = None
        #: a ring allreduce's bytes sent per rank and step
        self.bytes_per_step = 2 * (self._coll.size - 1) * self._flat.nbytes // self._coll.size
        with self._coll.guard("DataParallel()"):
            configure_threads(self.comm, num_threads)
            if broadcast_params:
                for p in self._params:
                    self._coll.bcast(p, "the broadcast of the initial parameters")

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
        for i, g in enumerate(grads):
            if self._ready[i] or (g is None and only_new):
                continue
            view = self.grad_buffers[i]
            if g is None:
                view[...] = 0
            elif not isinstance(g, np.ndarray) or g.shape != view.shape:
                what = g.shape if isinstance(g, np.ndarray) else type(g).__name__
                raise ValueError(f"grads[{i}] must be an array of shape {view.shape}, got {what}")
            elif not (g.ctypes.data == view.ctypes.data and g.dtype == np.float32):
                np.copyto(view, g, casting="same_kind")
            self._ready[i] = True

    def _launch_ready(self) -> None:
        """Starts a non-blocking Allreduce of each bucket, in order, whose gradients are in."""
        while self._launched < len(self._buckets) and all(
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

    def _finish(self) -> None:
        coll = self._coll
        if coll.size > 1:
            if self._requests:
                coll.wait(self._requests, "the non-blocking allreduce of the gradients")
            for b in range(self._launched if not self.deterministic else 0, len(self._buckets)):
                lo, hi = self._buckets[b]
                if self.deterministic:
                    self._reduce_deterministic(lo, hi)
                else:  # blocking: Open MPI's blocking Allreduce is much faster than its Iallreduce
                    coll.allreduce(self._flat[lo:hi], "the allreduce of the gradients")
            np.divide(self._flat, np.float32(coll.size), out=self._flat)
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

    def allreduce_(self, grads: Sequence[Optional[np.ndarray]]) -> List[Optional[np.ndarray]]:
        """Averages ``grads`` over the ranks without stepping; returns the averaged gradients
        (views of the internal buffer)."""
        with self._coll.guard("DataParallel.allreduce_"):
            self._take(grads, only_new=False)
            self._finish()
            out = [v if g is not None else None for v, g in zip(self.grad_buffers, grads)]
            self._ready = [False] * len(self._params)
            self._launched = 0
            return out

    def step(self, grads: Sequence[Optional[np.ndarray]], **kwargs: Any) -> Optional[float]:
        """Averages the gradients over the ranks (those ``start`` already took are not copied
        again), then ``optimizer.step`` with them and ``kwargs`` (``max_grad_norm``,
        ``norm_type``, ``skip_if_nonfinite``): its return value."""
        with self._coll.guard("DataParallel.step"):
            if self._coll.size == 1 and not any(self._ready):
                return self.optimizer.step(grads, **kwargs)  # nothing to average: no copy
            averaged = self.allreduce_(grads)
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
