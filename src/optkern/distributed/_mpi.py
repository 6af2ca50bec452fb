"""MPI plumbing shared by the wrappers: the communicator, waiting with a deadline, aborting the
job when one rank fails, the deterministic reduction and the threads per rank."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

try:
    from mpi4py import MPI
except ImportError as e:  # pragma: no cover - exercised only without mpi4py
    raise ImportError(
        "optkern.distributed needs mpi4py and an MPI library: pip install 'optkern[mpi]' "
        "(mpi4py and Open MPI's wheel), or mpi4py built against the system's MPI"
    ) from e

import optkern as ok

__all__ = [
    "MPI",
    "DistributedError",
    "Collectives",
    "split",
    "configure_threads",
    "default_threads",
    "check_num_threads",
    "check_positive_real",
    "install_excepthook",
    "TIMEOUT_ENV",
]

#: Seconds a rank waits in one collective before it gives up and aborts the job (unset: forever).
TIMEOUT_ENV = "OPTKERN_MPI_TIMEOUT"


class DistributedError(RuntimeError):
    """A collective that did not complete (timeout) or ranks that disagree."""

    #: True for an error that every rank raises at the same point (ranks that disagree, a
    #: checkpoint some rank cannot read): a guarded section re-raises it instead of aborting.
    raised_on_every_rank = False


# -- the wrappers' arguments (one checker for DataParallel, ZeRO and configure_threads) ----------


def check_num_threads(value: Any, name: str = "num_threads") -> Any:
    """``"auto"``, None, or a thread count that ``optkern.set_num_threads`` takes (an int, not a
    bool, from 1 to its maximum): returned as given (an int for a count)."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f'{name} must be "auto", None or an int >= 1, got {type(value).__name__}: {value!r}'
        )
    top = int(ok.build_info()["max_threads"])
    if not 1 <= int(value) <= top:
        raise ValueError(f"{name} must be from 1 to {top}, got {int(value)}")
    return int(value)


def check_positive_real(value: Any, name: str) -> float:
    """A finite real number > 0 (an int or float, NumPy's included; not a bool or a string)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a number > 0, got {type(value).__name__}: {value!r}")
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def split(total: int, parts: int, align: int = 1) -> List[Tuple[int, int]]:
    """``parts`` contiguous ranges covering ``[0, total)``, as equal as ``align`` allows (each
    boundary a multiple of ``align``; the last range ends at ``total``)."""
    units = -(-total // align)
    out = []
    for r in range(parts):
        lo = min(total, (units * r // parts) * align)
        hi = min(total, (units * (r + 1) // parts) * align)
        out.append((lo, hi))
    return out


def _timeout_from_env() -> Optional[float]:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return value


class Collectives:
    """One wrapper's communicator and how it waits and fails.

    Every collective runs under a watchdog: with a ``timeout`` (seconds, default
    ``$OPTKERN_MPI_TIMEOUT``, else none) a rank that waits longer in one collective aborts the
    whole job with a message naming the collective. ``on_error="abort"`` (the default with more than one
    rank) turns an exception raised inside a wrapper's step, save or load on one rank into
    ``comm.Abort(1)`` after printing it, because the other ranks would otherwise wait forever in
    the next collective; ``"raise"`` re-raises it (the caller must then end the job itself).
    """

    def __init__(
        self,
        comm: Optional["MPI.Intracomm"],
        timeout: Optional[float] = None,
        on_error: str = "abort",
    ) -> None:
        self.comm = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(self.comm, MPI.Intracomm):
            raise TypeError(
                f"comm must be an mpi4py intracommunicator, got {type(self.comm).__name__}"
            )
        if on_error not in ("abort", "raise"):
            raise ValueError(f'on_error must be "abort" or "raise", got {on_error!r}')
        self.timeout = (
            _timeout_from_env() if timeout is None else check_positive_real(timeout, "timeout")
        )
        self.on_error = on_error
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.bytes_sent = 0  # what this rank handed to collectives, for the benchmark
        self._watchdog: Optional[_Watchdog] = None

    # -- failing ------------------------------------------------------------------------------

    def abort(self, message: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(
            f"optkern.distributed: rank {self.rank} of {self.size}: {message}; "
            "calling MPI_Abort so that no rank waits forever\n"
        )
        sys.stderr.flush()
        self.comm.Abort(1)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Runs a section that holds collectives: an exception on one rank ends every rank."""
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            yield
        except BaseException as e:
            if (
                self.size == 1
                or self.on_error == "raise"
                or self._depth > 1
                or getattr(e, "raised_on_every_rank", False)
            ):
                raise  # the outermost section reports it; every rank raises an agreed error
            self.abort(f"{what} raised {type(e).__name__}: {e}")
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def deadline(self, what: str) -> Iterator[None]:
        """Runs a blocking collective under the watchdog: past ``timeout`` seconds the job is
        aborted with a message naming ``what``. Blocking calls release the GIL in mpi4py, so
        the watchdog thread runs while this one waits inside MPI."""
        if self.timeout is None or self.size == 1:
            yield
            return
        if self._watchdog is None:
            self._watchdog = _Watchdog(self)
        self._watchdog.arm(what)
        try:
            yield
        finally:
            self._watchdog.disarm()

    def wait(self, requests: Sequence["MPI.Request"], what: str) -> None:
        with self.deadline(what):
            MPI.Request.Waitall(list(requests))

    # Blocking collectives throughout: Open MPI's non-blocking ones (libnbc) were 10-40x slower
    # for megabyte buffers on this machine (Iallreduce of 4 MB: 15-26 ms against 0.6-0.9 ms).

    def allgather_object(self, obj, what: str) -> list:
        """Small metadata from every rank (pickled)."""
        if self.size == 1:
            return [obj]
        with self.deadline(what):
            return self.comm.allgather(obj)

    def bcast_object(self, obj, what: str, root: int = 0):
        if self.size == 1:
            return obj
        with self.deadline(what):
            return self.comm.bcast(obj, root=root)

    def barrier(self, what: str) -> None:
        if self.size > 1:
            with self.deadline(what):
                self.comm.Barrier()

    def allgather_float64(self, value: float, what: str) -> np.ndarray:
        """One float64 from every rank, in rank order (the same array on every rank)."""
        out = np.empty(self.size, np.float64)
        out[self.rank] = value
        if self.size > 1:
            with self.deadline(what):
                self.comm.Allgather(MPI.IN_PLACE, out)
        return out

    def bcast(self, buf: np.ndarray, what: str, root: int = 0) -> None:
        if self.size > 1 and buf.size:
            with self.deadline(what):
                self.comm.Bcast(buf, root=root)

    def allreduce(self, buf: np.ndarray, what: str) -> None:
        """Sums ``buf`` over the ranks, in place."""
        if self.size > 1 and buf.size:
            self.bytes_sent += 2 * (self.size - 1) * buf.nbytes // self.size
            with self.deadline(what):
                self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def allgatherv(self, buf: np.ndarray, ranges: Sequence[Tuple[int, int]], what: str) -> None:
        """Every rank's range of ``buf`` (1-D) to every rank, in place."""
        if self.size == 1:
            return
        counts = [hi - lo for lo, hi in ranges]
        displs = [lo for lo, _ in ranges]
        self.bytes_sent += counts[self.rank] * buf.itemsize * (self.size - 1)
        with self.deadline(what):
            self.comm.Allgatherv(MPI.IN_PLACE, [buf, counts, displs, _mpi_type(buf)])

    def reduce_scatter(
        self,
        send: np.ndarray,
        recv: np.ndarray,
        ranges: Sequence[Tuple[int, int]],
        deterministic: bool,
        scratch: Optional[np.ndarray],
        what: str,
    ) -> None:
        """``recv`` (this rank's range) = the sum over ranks of ``send[range]``.

        MPI's own reduce-scatter sums in an order its algorithm picks (which may change with the
        message size, the rank count or the library). ``deterministic`` instead sends each range
        to its owner with one all-to-all (the same bytes as a ring reduce-scatter) and the owner
        adds the N pieces in rank order: the result depends only on the inputs and N.
        """
        counts = [hi - lo for lo, hi in ranges]
        mine = counts[self.rank]
        if self.size == 1:
            if recv.size:
                recv[...] = send[ranges[0][0] : ranges[0][1]]
            return
        self.bytes_sent += (send.size - mine) * send.itemsize
        t = _mpi_type(send)
        if not deterministic:
            with self.deadline(what):
                if len(set(counts)) == 1 and ranges[-1][1] == send.size:
                    self.comm.Reduce_scatter_block(send, [recv, t], op=MPI.SUM)
                else:
                    self.comm.Reduce_scatter(send, [recv, t], counts, op=MPI.SUM)
            return
        assert scratch is not None and scratch.size >= self.size * mine
        displs = [lo for lo, _ in ranges]
        with self.deadline(what):
            self.comm.Alltoallv(
                [send, counts, displs, t],
                [scratch, [mine] * self.size, [i * mine for i in range(self.size)], t],
            )
        if mine:
            np.copyto(recv, scratch[:mine])
            for i in range(1, self.size):
                np.add(recv, scratch[i * mine : (i + 1) * mine], out=recv)


class _Watchdog:
    """One daemon thread per Collectives that aborts the job when an armed deadline passes."""

    def __init__(self, owner: Collectives) -> None:
        import threading

        self.owner = owner
        self.cond = threading.Condition()
        self.what: Optional[str] = None
        self.until = 0.0
        self.since = 0.0
        thread = threading.Thread(target=self._run, name="optkern-mpi-watchdog", daemon=True)
        thread.start()

    def arm(self, what: str) -> None:
        with self.cond:
            self.since = time.monotonic()
            self.until = self.since + self.owner.timeout
            self.what = what
            self.cond.notify()

    def disarm(self) -> None:
        with self.cond:
            self.what = None

    def _run(self) -> None:
        with self.cond:
            while True:
                if self.what is None:
                    self.cond.wait()
                    continue
                left = self.until - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self.owner.abort(
                    f"waited {time.monotonic() - self.since:.1f} s (timeout "
                    f"{self.owner.timeout:g} s, ${TIMEOUT_ENV}) in {self.what}: "
                    "another rank has died, hangs or left the collective sequence"
                )


def _mpi_type(buf: np.ndarray):
    if buf.dtype == np.float32:
        return MPI.FLOAT
    if buf.dtype == np.float64:
        return MPI.DOUBLE
    raise TypeError(f"unexpected dtype {buf.dtype}")


def combine_norms(partials: np.ndarray, norm_type: float) -> float:
    """The norm of the whole from the norms of the parts, summed in rank order (the same bits on
    every rank, whatever the MPI library's reduction order)."""
    if math.isinf(norm_type):
        return float(np.max(partials)) if not np.isnan(partials).any() else math.nan
    total = 0.0
    for v in partials.tolist():
        total += v**norm_type
    return total ** (1.0 / norm_type)


def clip_coefficient(max_norm: float, total: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor max_norm / (total + 1e-6), clamped to at most 1
    (NaN stays NaN)."""
    coef = max_norm / (total + 1e-6)
    return coef if not coef >= 1.0 else 1.0


# -- threads ---------------------------------------------------------------------------------------


def _own_cpus() -> frozenset:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return frozenset(range(os.cpu_count() or 1))


def default_threads(comm: Optional["MPI.Intracomm"] = None) -> int:
    """Threads for this rank's optimizer steps so that the ranks on one node do not
    oversubscribe its cores: the CPUs this process may use (its affinity mask) divided by the
    ranks on the same node (``Split_type(COMM_TYPE_SHARED)``) whose masks overlap it. Ranks that
    mpiexec bound to disjoint cores each keep their own cores; unbound ranks share them."""
    comm = MPI.COMM_WORLD if comm is None else comm
    mine = _own_cpus()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        masks = local.allgather(sorted(mine))
    finally:
        local.Free()
    sharing = sum(1 for m in masks if mine & frozenset(m))
    return max(1, len(mine) // max(1, sharing))


_configured = False


def configure_threads(comm: Optional["MPI.Intracomm"] = None, num_threads="auto") -> int:
    """Sets optkern's threads for this rank and returns the count.

    ``num_threads="auto"``: :func:`default_threads`, but only when the user chose nothing:
    neither ``OPTKERN_NUM_THREADS`` nor ``OMP_NUM_THREADS`` is set and optkern still runs its
    default count (the CPUs of the affinity mask; a ``set_num_threads`` call that picked exactly
    that count cannot be told apart from the default and is overridden: pass an int then). An
    int sets that count; None leaves the threads alone. Collective over ``comm`` for "auto"."""
    global _configured
    num_threads = check_num_threads(num_threads)
    if num_threads is None:
        return ok.get_num_threads()
    if num_threads != "auto":
        n = num_threads
        ok.set_num_threads(n)
        _configured = True
        return n
    n = default_threads(comm)  # collective: every rank calls it, whatever it then decides
    chosen = any(os.environ.get(v, "").strip() for v in ("OPTKERN_NUM_THREADS", "OMP_NUM_THREADS"))
    if not chosen and not _configured and ok.get_num_threads() == len(_own_cpus()):
        ok.set_num_threads(n)
        _configured = True
    return ok.get_num_threads()


# -- unhandled exceptions --------------------------------------------------------------------------


def install_excepthook(comm: Optional["MPI.Intracomm"] = None) -> None:
    """Makes an exception that nothing catches, on any rank, abort the whole job (MPI_Abort)
    after printing its traceback, instead of leaving the other ranks blocked in their next
    collective. (``mpiexec -n N python -m mpi4py script.py`` does the same.)"""
    comm = MPI.COMM_WORLD if comm is None else comm
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        if comm.Get_size() > 1:
            sys.stderr.write(
                f"optkern.distributed: rank {comm.Get_rank()} raised "
                f"{kind.__name__}; aborting every rank\n"
            )
            sys.stderr.flush()
            comm.Abort(1)

    sys.excepthook = hook
