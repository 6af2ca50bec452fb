"""Checkpoints of :class:`DataParallel` and :class:`ZeroRedundancyOptimizer`, sharded or whole.

``save(opt, path)`` (sharded) makes ``path`` a directory holding

``shard-<generation>-<rank>.npz``
    one per rank: for each state name (``exp_avg``, ...) the float32 slice ``[start, stop)`` of
    that state laid out flat (:mod:`._layout`: the parameters in group order, each on a
    16-element boundary; the layout depends only on the shapes, not on the number of ranks).
    Written as ``ok.save`` writes its file (temporary name, fsync, rename).
``manifest.json``
    written last, by rank 0, once every rank has renamed its shard into place: the format, the
    generation, the optimizer class, the shapes, each group's hyperparameters (tagged as
    ``ok.save`` tags them) and state description (names, step count), the counters, and every
    shard's file, range and SHA-256 of each array.

A save that dies anywhere before the manifest's rename leaves the previous manifest, which names
the previous generation's shards, and those are deleted only after the new manifest is in place:
the previous checkpoint stays loadable. A save that fails on one rank (a full disk) raises on
every rank and leaves the previous checkpoint.

``load`` reads with ``ok.load``'s reader (:class:`optkern.checkpoint.Archive`): regular files
only (a FIFO never blocks), the manifest's size and nesting bounded, every shard's size and its
members' declared sizes bounded by the layout before anything is inflated. The manifest must
describe this optimizer, name its shards by plain file names inside the directory, and cover the
layout exactly once (no gap, no overlap). Each rank reads only the shards that overlap what it
needs, so a checkpoint written by N ranks loads onto M (a DataParallel rank needs everything, a
ZeRO rank its slice). Every rank checks everything first; then the ranks compare outcomes, and
either every rank installs the state or every rank raises (naming the rank and file that
failed) with nothing changed anywhere.

``save(opt, path, consolidated=True)``: rank 0 writes one file in ``ok.save``'s format, which a
single process loads with ``ok.load`` into an optimizer over the same parameters.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from typing import Any, Callable, Dict, List, Tuple, Union

import numpy as np

import optkern as ok
from optkern import checkpoint as _ck
from optkern.optimizer import MAX_LOADED_STEP

from ._agree import RanksDisagree, agree
from ._layout import Layout, flat_state, merge_meta, state_from_flat
from ._mpi import DistributedError
from .data_parallel import DataParallel
from .zero import ZeroRedundancyOptimizer

__all__ = ["save", "load", "MANIFEST", "FORMAT", "ShardedCheckpointError"]

FORMAT = "optkern-sharded-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^shard-(\d{8})-(\d{5,})\.npz$")

Wrapper = Union[DataParallel, ZeroRedundancyOptimizer]


class ShardedCheckpointError(_ck.CheckpointError, DistributedError):
    """A sharded checkpoint that cannot be loaded (damaged, crafted or for another optimizer),
    or a save or load that failed on some rank; raised on every rank, nothing changed."""

    raised_on_every_rank = True


def _check(opt: Any) -> None:
    if not isinstance(opt, (DataParallel, ZeroRedundancyOptimizer)):
        raise TypeError(
            "optkern.distributed.save/load take a DataParallel or a "
            f"ZeroRedundancyOptimizer, got {type(opt).__name__} (use ok.save/ok.load "
            "for a single-process optimizer)"
        )


def _inner_class(opt: Wrapper) -> type:
    return type(opt.optimizer) if isinstance(opt, DataParallel) else opt.optimizer_class


def _layout(opt: Wrapper) -> Layout:
    return opt.layout if isinstance(opt, ZeroRedundancyOptimizer) else Layout.of(opt.param_groups)


def _counters(opt: Wrapper) -> Tuple[int, int]:
    src = opt.optimizer if isinstance(opt, DataParallel) else opt
    return int(src.step_count), int(src.skipped_steps)


def _failure(e: BaseException) -> Tuple[str, str]:
    """An exception as the other ranks see it (an outcome that is not a success)."""
    return ("failed", f"{type(e).__name__}: {_ck._short(e)}")


def _failed(outcome: Any) -> bool:
    return isinstance(outcome, tuple) and len(outcome) == 2 and outcome[0] == "failed"


def _manifest_limit(n_params: int) -> int:
    return _ck.MAX_METADATA_BASE + _ck.MAX_METADATA_PER_PARAM * n_params


# -- saving --------------------------------------------------------------------------------------


def _write_shard(path: str, arrays: Dict[str, np.ndarray]) -> None:
    _ck._write_atomically(path, arrays)


def _generation(path: str) -> int:
    """The next generation: one past the manifest's, and past any shard file's (a damaged or
    missing manifest never makes a save reuse a generation whose files may still be there)."""
    seen = [0]
    try:
        m = _ck.read_json(os.path.join(path, MANIFEST), _manifest_limit(0) * 4)
        g = m.get("generation") if isinstance(m, dict) else None
        if type(g) is int and g > 0:
            seen.append(g)
    except (OSError, ValueError):
        pass
    for name in os.listdir(path):
        match = _SHARD.match(name)
        if match:
            seen.append(int(match.group(1)))
    return max(seen) + 1


def save(opt: Wrapper, path: Union[str, os.PathLike], consolidated: bool = False) -> None:
    """Writes ``opt``'s optimizer state to ``path`` (collective: every rank calls it with the same
    path, on a file system every rank sees). Parameters are not included (as with ``ok.save``):
    save them yourself (they are the same on every rank). A failure on any rank raises on every
    rank and leaves the previous checkpoint in place."""
    _check(opt)
    coll = opt._coll
    path = os.fspath(path)
    with coll.guard("optkern.distributed.save"):
        agree(
            coll,
            [
                ("the call", "optkern.distributed.save"),
                ("the wrapper", type(opt).__name__),
                ("path", os.path.abspath(path)),
                ("consolidated", repr(bool(consolidated))),
            ],
            "optkern.distributed.save",
        )
        if consolidated:
            _save_consolidated(opt, path)
            return
        layout = _layout(opt)
        groups = [
            {k: _ck._encode(v, f"param_groups[{gi}][{k!r}]") for k, v in g.items() if k != "params"}
            for gi, g in enumerate(opt.param_groups)
        ]
        generation: Any = None
        if coll.rank == 0:
            try:
                if os.path.lexists(path) and not os.path.isdir(path):
                    raise NotADirectoryError(
                        f"{path} exists and is not a directory; a sharded checkpoint is one"
                    )
                os.makedirs(path, exist_ok=True)
                generation = _generation(path)
            except Exception as e:
                if coll.size == 1:
                    raise
                generation = _failure(e)
        generation = coll.bcast_object(generation, "the checkpoint generation")
        if _failed(generation):
            raise ShardedCheckpointError(f"{path}: rank 0 cannot start the save: {generation[1]}")
        lo, hi = layout.ranges(coll.size)[coll.rank]
        name = f"shard-{generation:08d}-{coll.rank:05d}.npz"
        if isinstance(opt, ZeroRedundancyOptimizer):
            local_meta, flats = opt._local_flat_state()
            meta = opt._gather_meta(local_meta)  # collective
            problem = None
        else:
            try:
                meta, flats = _flat_dp(opt, layout, lo, hi)
                problem = None
            except Exception as e:
                if coll.size == 1:
                    raise
                meta, flats, problem = None, {}, _failure(e)
        if problem is None:
            try:
                _write_shard(os.path.join(path, name), flats)
            except Exception as e:
                if coll.size == 1:
                    raise
                problem = _failure(e)
        info: Any = (
            problem
            if problem is not None
            else {
                "file": name,
                "start": lo,
                "stop": hi,
                "sha256": {n: _ck._sha256(a) for n, a in flats.items()},
            }
        )
        shards = coll.allgather_object(info, "the shard list")  # every shard is in place now
        _raise_if_failed(coll, path, shards, "save", os.path.join(path, name))
        written: Any = None
        if coll.rank == 0:
            try:
                step_count, skipped = _counters(opt)
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "generation": generation,
                    "optimizer": _inner_class(opt).__name__,
                    "optkern_version": ok.__version__,
                    "world_size": coll.size,
                    "layout": layout.describe(),
                    "param_groups": groups,
                    "groups_state": meta,
                    "step_count": step_count,
                    "skipped_steps": skipped,
                    "shards": shards,
                }
                text = json.dumps(manifest, indent=1, allow_nan=False).encode()
                _ck.write_file_atomically(os.path.join(path, MANIFEST), lambda f: f.write(text))
                keep = {s["file"] for s in shards}
                for old in glob.glob(os.path.join(path, "shard-*.npz*")) + glob.glob(
                    os.path.join(path, ".shard-*.tmp")
                ):
                    if os.path.basename(old) not in keep:
                        os.unlink(old)  # older generations, and temporaries of dead saves
            except Exception as e:
                if coll.size == 1:
                    raise
                written = _failure(e)
        written = coll.bcast_object(written, "the end of the save")
        if written is not None:
            raise ShardedCheckpointError(
                f"{path}: rank 0 could not write the manifest ({written[1]}); the previous "
                "checkpoint, if any, is left in place"
            )


def _raise_if_failed(coll, path: str, outcomes: List[Any], what: str, mine: str) -> None:
    failed = [(r, o[1]) for r, o in enumerate(outcomes) if _failed(o)]
    if not failed:
        return
    if what == "save" and not _failed(outcomes[coll.rank]):
        try:
            os.unlink(mine)  # this generation's shard, never named by a manifest
        except OSError:
            pass
    detail = "; ".join(f"rank {r}: {o}" for r, o in failed[:4])
    more = f" (and {len(failed) - 4} more ranks)" if len(failed) > 4 else ""
    raise ShardedCheckpointError(
        f"{path}: the {what} failed on {len(failed)} of {coll.size} ranks: {detail}{more}; "
        + (
            "the previous checkpoint, if any, is left in place"
            if what == "save"
            else "nothing was loaded on any rank"
        )
    )


def _flat_dp(opt: DataParallel, layout: Layout, lo: int, hi: int):
    inner = opt.optimizer
    params = [p for g in inner.param_groups for p in g["params"]]
    state = {i: inner.state[p] for i, p in enumerate(params) if p in inner.state}
    return flat_state(layout, {"state": state}, lo, hi)


def _save_consolidated(opt: Wrapper, path: str) -> None:
    coll = opt._coll
    problem: Any = None
    if isinstance(opt, DataParallel):
        if coll.rank == 0:
            try:
                ok.save(opt.optimizer, path)
            except Exception as e:
                if coll.size == 1:
                    raise
                problem = _failure(e)
    else:
        sd = opt.state_dict()  # collective
        if coll.rank == 0:
            try:
                whole = opt.whole_optimizer()
                whole.load_state_dict(sd)
                ok.save(whole, path)
            except Exception as e:
                if coll.size == 1:
                    raise
                problem = _failure(e)
    problem = coll.bcast_object(problem, "the end of the save")
    if problem is not None:
        raise ShardedCheckpointError(
            f"{path}: rank 0 could not write the checkpoint ({problem[1]}); the previous file, if "
            "any, is left in place"
        )


# -- loading -------------------------------------------------------------------------------------


def load(opt: Wrapper, path: Union[str, os.PathLike]) -> None:
    """Loads a checkpoint written by :func:`save` (sharded: a directory; consolidated: a file,
    also one written by ``ok.save``) into ``opt``, whatever number of ranks wrote it
    (collective). Every rank reads and checks what it needs first; unless every rank succeeded
    and read the same checkpoint, every rank raises (:class:`ShardedCheckpointError`, or
    :class:`RanksDisagree`) and nothing changes on any rank."""
    _check(opt)
    coll = opt._coll
    path = os.fspath(path)
    with coll.guard("optkern.distributed.load"):
        agree(
            coll,
            [("the call", "optkern.distributed.load"), ("the wrapper", type(opt).__name__)],
            "optkern.distributed.load",
        )
        try:
            install, ident = _prepare_load(opt, path)
            outcome: Any = ("ok", ident)
        except Exception as e:
            if coll.size == 1:
                raise
            install, outcome = None, _failure(e)
        outcomes = coll.allgather_object(outcome, "the outcome of the load on every rank")
        _raise_if_failed(coll, path, outcomes, "load", path)
        if any(o != outcomes[0] for o in outcomes):
            odd = [r for r, o in enumerate(outcomes) if o != outcomes[0]]
            raise RanksDisagree(
                f"{path}: ranks {odd} read a checkpoint with other content than rank 0's "
                "(different files at that path on different nodes?); nothing was loaded"
            )
        assert install is not None
        install()


def _prepare_load(opt: Wrapper, path: str) -> Tuple[Callable[[], None], str]:
    """Reads and checks everything this rank needs; returns the function that installs it and
    an identity of the checkpoint's content (the same on every rank that read the same one)."""
    if os.path.isdir(path):
        return _prepare_sharded(opt, path)
    if isinstance(opt, DataParallel):
        sd, ident = _ck._read_checked(opt.optimizer, path)
        _parse(opt.optimizer, sd, path)
        return (lambda: opt.optimizer.load_state_dict(sd)), ident
    whole = opt.whole_optimizer()
    sd, ident = _ck._read_checked(whole, path)
    _parse(whole, sd, path)
    whole.load_state_dict(sd)
    try:
        return opt._prepare_load_from(whole), ident
    except (TypeError, ValueError) as e:
        raise _ck.CheckpointError(f"{path}: does not fit this optimizer: {_ck._short(e)}") from e


def _parse(optimizer: ok.Optimizer, sd: Dict[str, Any], path: str) -> None:
    try:
        optimizer._parse_state_dict(sd)
    except Exception as e:
        raise _ck.CheckpointError(
            f"{path}: the checkpoint does not fit this optimizer: {_ck._short(e)}"
        ) from e


def _prepare_sharded(opt: Wrapper, path: str) -> Tuple[Callable[[], None], str]:
    layout = _layout(opt)
    cls = _inner_class(opt)
    manifest_path = os.path.join(path, MANIFEST)
    m = _ck.read_json(manifest_path, _manifest_limit(len(layout.shapes)))
    ident = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
    try:
        meta, groups, shards, names, step_count, skipped = _check_manifest(m, opt, layout, cls)
    except _ck.CheckpointError as e:
        raise _ck.CheckpointError(f"{manifest_path}: {e}") from None
    if isinstance(opt, ZeroRedundancyOptimizer):
        lo, hi = opt.lo, opt.hi
    else:
        lo, hi = 0, layout.total
    flats = {n: np.zeros(hi - lo, np.float32) for n in names}
    for shard in shards:
        a, b = max(lo, shard["start"]), min(hi, shard["stop"])
        if a >= b or not names:
            continue
        arrays = _read_shard(os.path.join(path, shard["file"]), shard, names)
        for n in names:
            flats[n][a - lo : b - lo] = arrays[n][a - shard["start"] : b - shard["start"]]
    index = 0
    for g, mine in zip(groups, opt.param_groups):
        g["params"] = list(range(index, index + len(mine["params"])))
        index += len(mine["params"])
    try:
        if isinstance(opt, DataParallel):
            sd = {
                "state": state_from_flat(layout, meta, flats),
                "param_groups": groups,
                "step_count": step_count,
                "skipped_steps": skipped,
            }
            opt.optimizer._parse_state_dict(sd)
            return (lambda: opt.optimizer.load_state_dict(sd)), ident
        return opt._prepare_install(groups, meta, flats, step_count, skipped), ident
    except (TypeError, ValueError) as e:
        raise _ck.CheckpointError(
            f"{manifest_path}: the checkpoint does not fit this optimizer: {_ck._short(e)}"
        ) from e


def _read_shard(file: str, shard: Dict[str, Any], names: List[str]) -> Dict[str, np.ndarray]:
    """One shard's arrays, read with ok.load's reader and bounded by its range in the layout."""
    length = shard["stop"] - shard["start"]
    member = _ck._NPY_HEADER_MAX + 4 * length
    try:
        with _ck.open_regular(file) as f:
            with _ck.Archive(
                f,
                len(names) * (member + _ck._ZIP_OVERHEAD) + 65536,
                len(names),
                lambda _key: member,
            ) as z:
                if set(z.members) != set(names):
                    raise _ck.CheckpointError(
                        f"holds the arrays {sorted(z.members)}; the manifest lists {names}"
                    )
                return {
                    n: z.array(n, np.dtype(np.float32), [length], shard["sha256"][n], repr(n))
                    for n in names
                }
    except _ck.CheckpointError as e:
        raise _ck.CheckpointError(f"{file}: {e}") from (e.__cause__ or e)
    except OSError:
        raise
    except Exception as e:  # whatever a damaged zip or .npy header raises
        raise _ck.CheckpointError(
            f"{file}: cannot read the shard, it is truncated, corrupted or crafted ({_failure(e)})"
        ) from e


# -- the manifest ----------------------------------------------------------------------------------


def _bad(what: str) -> _ck.CheckpointError:
    return _ck.CheckpointError(what)


def _whole(value: Any, what: str, top: int = MAX_LOADED_STEP) -> int:
    if type(value) is not int or not 0 <= value <= top:
        raise _bad(f"{what} must be a whole number from 0 to {top}, got {_ck._short(value)}")
    return value


def _check_manifest(m: Any, opt: Wrapper, layout: Layout, cls: type):
    """Everything the manifest says, checked against this optimizer; returns (per-group state
    descriptions, param_groups, shards sorted by start, state names, step_count,
    skipped_steps)."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _bad("not an optkern sharded checkpoint manifest")
    if m.get("version") != VERSION:
        raise _bad(f"format version {_ck._short(m.get('version'))}, this optkern reads {VERSION}")
    if m.get("optimizer") != cls.__name__:
        raise _bad(
            f"the checkpoint holds {_ck._short(m.get('optimizer'))} state; this optimizer is a "
            f"{cls.__name__}"
        )
    if m.get("layout") != layout.describe():
        shapes = m["layout"].get("shapes") if isinstance(m.get("layout"), dict) else None
        raise _bad(
            f"the checkpoint was written for parameters of shapes {_ck._short(shapes)}; these "
            f"are {_ck._short(layout.describe()['shapes'])} (groups {layout.group_of})"
        )
    n_groups = len(layout.group_ranges)
    raw_groups = m.get("param_groups")
    if not isinstance(raw_groups, list) or len(raw_groups) != n_groups:
        raise _bad(f"'param_groups' must be a list of {n_groups} groups (this optimizer's)")
    groups = []
    for gi, g in enumerate(raw_groups):
        if not isinstance(g, dict) or "params" in g:
            raise _bad(f"param_groups[{gi}] must be a mapping of hyperparameters")
        groups.append({k: _ck._decode(v, f"param_groups[{gi}][{k!r}]") for k, v in g.items()})
    array_names = set(cls._rule.array_state_names)
    carried = set(cls._rule.carried_names)
    raw_meta = m.get("groups_state")
    if not isinstance(raw_meta, list) or len(raw_meta) != n_groups:
        raise _bad(f"'groups_state' must be a list of {n_groups} group descriptions")
    for gi, d in enumerate(raw_meta):
        where = f"groups_state[{gi}]"
        if not isinstance(d, dict) or type(d.get("has_state")) is not bool:
            raise _bad(f"{where} must be a mapping with a bool 'has_state'")
        names = d.get("names")
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) and n in array_names for n in names)
            or len(set(names)) != len(names)
            or (names and not d["has_state"])
        ):
            raise _bad(
                f"{where}['names'] must list distinct state arrays of {cls.__name__} "
                f"({sorted(array_names)}), got {_ck._short(names)}"
            )
        if d.get("step") is not None:
            _whole(d["step"], f"{where}['step']")
        numbers = d.get("numbers", {})
        if not isinstance(numbers, dict) or not all(
            k in carried
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            for k, v in numbers.items()
        ):
            raise _bad(f"{where}['numbers'] must map {sorted(carried)} to finite numbers")
    meta = merge_meta([raw_meta])
    names = sorted({n for g in meta for n in g["names"]})
    step_count = _whole(m.get("step_count"), "'step_count'")
    skipped = _whole(m.get("skipped_steps"), "'skipped_steps'")
    raw_shards = m.get("shards")
    if not isinstance(raw_shards, list) or not raw_shards:
        raise _bad("'shards' must be a non-empty list")
    shards = []
    files = set()
    for i, s in enumerate(raw_shards):
        where = f"shards[{i}]"
        if not isinstance(s, dict):
            raise _bad(f"{where} must be a mapping")
        file = s.get("file")
        if not isinstance(file, str) or not _SHARD.match(file) or file in files:
            raise _bad(
                f"{where}['file'] must be a distinct shard file name inside the checkpoint "
                f"directory (shard-<generation>-<rank>.npz), got {_ck._short(file)}"
            )
        files.add(file)
        start = _whole(s.get("start"), f"{where}['start']", layout.total)
        stop = _whole(s.get("stop"), f"{where}['stop']", layout.total)
        if stop < start:
            raise _bad(f"{where} has start {start} > stop {stop}")
        sha = s.get("sha256")
        if (
            not isinstance(sha, dict)
            or set(sha) != set(names)
            or not all(isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) for v in sha.values())
        ):
            raise _bad(f"{where}['sha256'] must give the SHA-256 of exactly the arrays {names}")
        shards.append({"file": file, "start": start, "stop": stop, "sha256": sha})
    shards.sort(key=lambda s: (s["start"], s["stop"]))
    at = 0
    for s in shards:  # the shards tile [0, total): no gap, no overlap
        if s["start"] != at:
            raise _bad(
                f"the shards {'leave a gap' if s['start'] > at else 'overlap'} at element "
                f"{min(at, s['start'])} ({s['file']} starts at {s['start']}, the shards before "
                f"it end at {at}): they must cover the layout's {layout.total} elements "
                "exactly once"
            )
        at = s["stop"]
    if at != layout.total:
        raise _bad(
            f"the shards end at element {at}; they must cover the layout's {layout.total} "
            "elements exactly once"
        )
    return meta, groups, shards, names, step_count, skipped
