"""What the ranks must agree on, and how they check it.

Two wrappers over the same parameters on different ranks must be built alike (the wrapper, the
optimizer class, the parameter count, shapes and dtypes, each group's hyperparameters, the bucket
size, ...): otherwise the collectives that follow have different sizes (``MPI_ERR_TRUNCATE``, or
a hang that a timeout blames on a dead rank), or the ranks silently step differently.

- **At construction** every rank describes its side as a list of ``(what, value)`` pairs and
  sends a 16-byte digest of it with one ``Allgather`` of fixed size, before any other
  collective (so a disagreement in size can never truncate anything).
- **At every step** a digest of the hyperparameters (recomputed only when a group's values
  changed), the step's options (``max_grad_norm``, ...) and the step counters travels with a
  collective the step makes anyway (DataParallel: the tail of its last gradient bucket;
  ZeRO: the gather of the gradient norm).

All ranks see every digest, so they all find a disagreement at the same point. Only then do
they exchange the full descriptions (``allgather`` of small objects, whose sizes may differ),
and every rank raises :class:`RanksDisagree` naming what differs and on which ranks: no rank is
left waiting and nothing has changed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._mpi import Collectives, DistributedError

__all__ = ["RanksDisagree", "canonical", "describe_groups", "agree", "StepDigest"]

Fields = List[Tuple[str, str]]


class RanksDisagree(DistributedError):
    """The ranks were not set up alike. Raised on every rank at the same point (so it is not
    turned into MPI_Abort), before anything changed."""

    raised_on_every_rank = True


def canonical(value: Any) -> str:
    """A text for a hyperparameter that is the same on every rank exactly when the values are
    (floats by repr, NumPy scalars as Python numbers, containers item by item). A callable (an
    lr schedule) is compared by its qualified name only; other objects by their type."""
    if isinstance(value, (bool, np.bool_)):
        return repr(bool(value))
    if value is None or isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, np.integer)):
        return repr(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, tuple):
        return "(" + ", ".join(canonical(v) for v in value) + ",)"
    if isinstance(value, list):
        return "[" + ", ".join(canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted((canonical(k), canonical(v)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if callable(value):
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"<callable {name}>"
    if isinstance(value, np.ndarray):
        return f"array({value.dtype.str}, {value.shape}, {value.tolist()!r})"
    return f"<{type(value).__qualname__}>"


def describe_groups(param_groups: Sequence[Dict[str, Any]]) -> Fields:
    """Each group's hyperparameters, one field per entry (``param_groups[1]['lr']``)."""
    out: Fields = []
    for gi, g in enumerate(param_groups):
        for k in sorted(k for k in g if k != "params"):
            out.append((f"param_groups[{gi}][{k!r}]", canonical(g[k])))
    return out


def describe_params(param_groups: Sequence[Dict[str, Any]]) -> Fields:
    params = [p for g in param_groups for p in g["params"]]
    return [
        ("the number of parameters", str(len(params))),
        ("the parameters per group", str([len(g["params"]) for g in param_groups])),
        ("the parameter shapes", str([tuple(p.shape) for p in params])),
        ("the parameter dtypes", str([str(p.dtype) for p in params])),
    ]


def require_float32(params: Sequence[Any], wrapper: str) -> None:
    """The distributed wrappers lay gradients, parameters and states out in float32 buffers:
    a parameter of another dtype (optkern's optimizers also take float64) is refused, on every
    rank alike (the ranks have agreed on the dtypes first), before anything is allocated."""
    for i, p in enumerate(params):
        if p.dtype != np.float32:
            err = TypeError(
                f"{wrapper} takes float32 parameters; parameter {i} is {p.dtype} (optkern's "
                "optimizers step float64 arrays, optkern.distributed does not yet)"
            )
            err.raised_on_every_rank = True  # type: ignore[attr-defined]
            raise err


def digest(fields: Fields) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for what, value in fields:
        h.update(what.encode())
        h.update(b"\0")
        h.update(value.encode())
        h.update(b"\1")
    return h.digest()


def explain(all_fields: Sequence[Fields], what: str) -> str:
    """The first fields on which some rank differs from rank 0, with each rank's value."""
    reference = dict(all_fields[0])
    names = [k for k, _ in all_fields[0]]
    for fields in all_fields[1:]:
        names += [k for k, _ in fields if k not in reference and k not in names]
    lines = []
    for name in names:
        values = [dict(f).get(name, "(none)") for f in all_fields]
        if all(v == values[0] for v in values):
            continue
        odd = [r for r, v in enumerate(values) if v != values[0]]
        shown = ", ".join(f"rank {r} has {_short(values[r])}" for r in [0] + odd[:3])
        more = f" (and {len(odd) - 3} more ranks)" if len(odd) > 3 else ""
        lines.append(f"{name}: {shown}{more}")
        if len(lines) == 3:
            break
    if not lines:  # the descriptions agree but the digests did not: say so rather than guess
        lines.append("their descriptions agree but their digests differ")
    return f"ranks disagree on {what}: " + "; ".join(lines)


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:120] + "..."


def agree(
    coll: Collectives,
    fields: Union[Fields, Callable[[], Fields]],
    what: str,
    d: Optional[bytes] = None,
) -> None:
    """Collective: raises RanksDisagree on every rank unless every rank's ``fields`` are the
    same. One Allgather of a 16-byte digest per rank (``d``, or the digest of ``fields``), the
    same format for every call that uses it, so ranks in different calls (one in a step,
    another in a save) find that out too; the descriptions (``fields`` may be a function
    making them) are exchanged only on a disagreement."""
    if coll.size == 1:
        return
    mine = np.frombuffer(d if d is not None else digest(_fields(fields)), np.uint8)
    out = np.empty((coll.size, 16), np.uint8)
    with coll.deadline(f"the agreement check of {what}"):
        coll.comm.Allgather(mine, out)
    if (out == out[0]).all():
        return
    everyone = coll.allgather_object(_fields(fields), f"the descriptions of {what}")
    raise RanksDisagree(explain(everyone, what))


def _fields(fields: Union[Fields, Callable[[], Fields]]) -> Fields:
    return fields() if callable(fields) else fields


class StepDigest:
    """The per-step digest: the groups' hyperparameters (hashed again only when a value
    changed, by identity as Optimizer._same compares them), the step's options and counters."""

    def __init__(self) -> None:
        self._seen: Optional[Tuple[Any, ...]] = None
        self._groups_digest = b""
        self._groups_fields: Fields = []

    def _groups(self, param_groups: Sequence[Dict[str, Any]]) -> Tuple[bytes, Fields]:
        seen = tuple(
            (id(g), tuple((k, id(v)) for k, v in g.items() if k != "params")) for g in param_groups
        )
        if seen != self._seen:
            self._groups_fields = describe_groups(param_groups)
            self._groups_digest = digest(self._groups_fields)
            self._seen = seen
        return self._groups_digest, self._groups_fields

    def fields(
        self, call: str, param_groups, options: Dict[str, Any], counters: Dict[str, int]
    ) -> Fields:
        _, groups = self._groups(param_groups)
        return (
            [("the call", call)]
            + groups
            + [(f"the step's {k}", canonical(v)) for k, v in sorted(options.items())]
            + [(k, str(v)) for k, v in counters.items()]
        )

    def digest(
        self, call: str, param_groups, options: Dict[str, Any], counters: Dict[str, int]
    ) -> bytes:
        """A digest of :meth:`fields`, cheaply: the groups' part is hashed once per change."""
        groups, _ = self._groups(param_groups)
        rest = (
            [("the call", call)]
            + [(k, canonical(v)) for k, v in sorted(options.items())]
            + [(k, str(v)) for k, v in counters.items()]
        )
        return digest([("groups", groups.hex())] + rest)


# -- a digest carried by a sum (DataParallel's allreduce) ------------------------------------------

#: float32 slots a digest takes in a summed buffer: its 32 nibbles, then their squares.
SUM_SLOTS = 64


def to_sum_slots(d: bytes, out: np.ndarray) -> None:
    """Writes the 16-byte digest into ``out`` (64 float32) so that, summed over N ranks, the
    sums tell whether every rank sent the same digest (see :func:`sums_agree`)."""
    b = np.frombuffer(d, np.uint8)
    nibbles = np.empty(32, np.float32)
    nibbles[0::2] = b >> 4
    nibbles[1::2] = b & 15
    out[:32] = nibbles
    out[32:] = nibbles * nibbles


def sums_agree(summed: np.ndarray, n: int) -> bool:
    """Whether the N summed digests were all the same: for each nibble, N * sum(x^2) ==
    sum(x)^2 holds exactly when every rank's x is the same (Cauchy-Schwarz). Every term is a
    whole number below 2^24 for N up to 74,000 ranks, so float32 sums are exact in any order,
    and every rank takes the same decision from the same sums."""
    s = summed[:32].astype(np.int64)
    q = summed[32:].astype(np.int64)
    return bool(np.all(n * q == s * s))
