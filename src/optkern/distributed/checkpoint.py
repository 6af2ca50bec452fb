"""Checkpoints of :class:`DataParallel` and :class:`ZeroRedundancyOptimizer`, sharded or whole.

``save(opt, path)`` (sharded) makes ``path`` a directory holding

``shard-<generation>-<rank>.npz``
    one per rank: for each state name (``exp_avg``, ...) the float32 slice ``[start, stop)`` of
    that state laid out flat (:mod:`._layout`: the parameters in group order, each on a
    16-element boundary; the layout depends only on the shapes, not on the number of ranks).
    Written under a temporary name, fsync'ed and renamed.
``manifest.json``
    written last, by rank 0, once every rank has renamed its shard into place (temporary name,
    fsync, rename, fsync of the directory): the format, the generation, the optimizer class,
    the shapes, each group's hyperparameters and state description (names, step count), the
    counters, and every shard's file, range and SHA-256 of each array.

A save that dies anywhere before the manifest's rename leaves the previous manifest, which names
the previous generation's shards, and those are deleted only after the new manifest is in place:
the previous checkpoint stays loadable. ``load`` reads the manifest, checks it against the
optimizer, and each rank reads only the shards that overlap what it needs, so a checkpoint
written by N ranks loads onto M (a DataParallel rank needs everything, a ZeRO rank its slice).
Both wrappers write and read the same sharded format (same class and shapes).

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
from typing import Any, Dict, List, Tuple, Union

import numpy as np

import optkern as ok

from ._layout import Layout, flat_state, merge_meta, state_from_flat
from ._mpi import DistributedError
from .data_parallel import DataParallel
from .zero import ZeroRedundancyOptimizer

__all__ = ["save", "load", "MANIFEST", "FORMAT"]

FORMAT = "optkern-sharded-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^shard-(\d{8})-(\d{5})\.npz$")

Wrapper = Union[DataParallel, ZeroRedundancyOptimizer]


def _check(opt: Any) -> None:
    if not isinstance(opt, (DataParallel, ZeroRedundancyOptimizer)):
        raise TypeError(
            "optkern.distributed.save/load take a DataParallel or a "
            f"ZeroRedundancyOptimizer, got {type(opt).__name__} (use ok.save/ok.load "
            "for a single-process optimizer)"
        )


def _class_name(opt: Wrapper) -> str:
    return type(opt.optimizer).__name__


# -- JSON of hyperparameters ---------------------------------------------------------------------


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    raise TypeError(
        f"{where} is a {type(value).__name__}, which a sharded checkpoint cannot store "
        "(numbers, bools, strings, None, lists and tuples)"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__float__" in value:
            return float(value["__float__"])
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        raise DistributedError(f"unexpected value {value!r} in the manifest")
    return value


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_shard(path: str, arrays: Dict[str, np.ndarray]) -> None:
    _write_atomic(path, lambda f: np.savez(f, **arrays))


# -- the state of a wrapper as flat slices ---------------------------------------------------------


def _layout(opt: Wrapper) -> Layout:
    return opt.layout if isinstance(opt, ZeroRedundancyOptimizer) else Layout.of(opt.param_groups)


def _flat_range(
    opt: Wrapper, layout: Layout, lo: int, hi: int
) -> Tuple[List[Dict[str, Any]], Dict[str, np.ndarray]]:
    if isinstance(opt, ZeroRedundancyOptimizer):
        meta, flats = opt._local_flat_state()
        return opt._gather_meta(meta), flats
    inner = opt.optimizer
    params = [p for g in inner.param_groups for p in g["params"]]
    state = {i: inner.state[p] for i, p in enumerate(params) if p in inner.state}
    meta, flats = flat_state(layout, {"state": state}, lo, hi)
    return meta, flats


# -- saving --------------------------------------------------------------------------------------


def save(opt: Wrapper, path: Union[str, os.PathLike], consolidated: bool = False) -> None:
    """Writes ``opt``'s optimizer state to ``path`` (collective: every rank calls it with the same
    path, on a file system every rank sees). Parameters are not included (as with ``ok.save``):
    save them yourself (they are the same on every rank)."""
    _check(opt)
    coll = opt._coll
    path = os.fspath(path)
    with coll.guard("optkern.distributed.save"):
        if consolidated:
            _save_consolidated(opt, path)
            return
        layout = _layout(opt)
        groups = [
            {k: _encode(v, f"param_groups[{gi}][{k!r}]") for k, v in g.items() if k != "params"}
            for gi, g in enumerate(opt.param_groups)
        ]
        if coll.rank == 0:
            os.makedirs(path, exist_ok=True)
            generation = (
                _read_manifest(path).get("generation", 0) + 1
                if os.path.exists(os.path.join(path, MANIFEST))
                else 1
            )
        else:
            generation = None
        generation = coll.bcast_object(generation, "the checkpoint generation")
        lo, hi = layout.ranges(coll.size)[coll.rank]
        meta, flats = _flat_range(opt, layout, lo, hi)
        name = f"shard-{generation:08d}-{coll.rank:05d}.npz"
        _write_shard(os.path.join(path, name), flats)
        info = {
            "file": name,
            "start": lo,
            "stop": hi,
            "sha256": {n: _sha(a) for n, a in flats.items()},
        }
        shards = coll.allgather_object(info, "the shard list")  # every shard is in place now
        if coll.rank == 0:
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "generation": generation,
                "optimizer": _class_name(opt),
                "optkern_version": ok.__version__,
                "world_size": coll.size,
                "layout": layout.describe(),
                "param_groups": groups,
                "groups_state": meta,
                "step_count": int(
                    opt.optimizer.step_count if isinstance(opt, DataParallel) else opt.step_count
                ),
                "skipped_steps": int(
                    opt.optimizer.skipped_steps
                    if isinstance(opt, DataParallel)
                    else opt.skipped_steps
                ),
                "shards": shards,
            }
            text = json.dumps(manifest, indent=1, allow_nan=False).encode()
            _write_atomic(os.path.join(path, MANIFEST), lambda f: f.write(text))
            keep = {s["file"] for s in shards}
            for old in glob.glob(os.path.join(path, "shard-*.npz*")):
                if os.path.basename(old) not in keep:
                    os.unlink(old)  # older generations, and temporaries of dead saves
        coll.barrier("the end of the save")


def _save_consolidated(opt: Wrapper, path: str) -> None:
    coll = opt._coll
    if isinstance(opt, DataParallel):
        if coll.rank == 0:
            ok.save(opt.optimizer, path)
    else:
        sd = opt.state_dict()  # collective
        if coll.rank == 0:
            whole = opt.optimizer_class([dict(g) for g in opt.param_groups])
            whole.load_state_dict(sd)
            ok.save(whole, path)
    coll.barrier("the end of the save")


# -- loading -------------------------------------------------------------------------------------


def _read_manifest(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, MANIFEST), "rb") as f:
        try:
            m = json.loads(f.read().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DistributedError(f"{path}: the manifest is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DistributedError(f"{path}: not an optkern sharded checkpoint")
    if m.get("version") != VERSION:
        raise DistributedError(
            f"{path}: format version {m.get('version')!r}, this optkern reads {VERSION}"
        )
    return m


def load(opt: Wrapper, path: Union[str, os.PathLike]) -> None:
    """Loads a checkpoint written by :func:`save` (sharded: a directory; consolidated: a file,
    also one written by ``ok.save``) into ``opt``, whatever number of ranks wrote it."""
    _check(opt)
    path = os.fspath(path)
    with opt._coll.guard("optkern.distributed.load"):
        if os.path.isdir(path):
            _load_sharded(opt, path)
        elif isinstance(opt, DataParallel):
            ok.load(opt.optimizer, path)
        else:
            whole = opt.optimizer_class([dict(g) for g in opt.param_groups])
            ok.load(whole, path)
            opt._load_from(whole)


def _load_sharded(opt: Wrapper, path: str) -> None:
    m = _read_manifest(path)
    layout = _layout(opt)
    if m["optimizer"] != _class_name(opt):
        raise DistributedError(
            f"{path}: the checkpoint holds {m['optimizer']} state; this "
            f"optimizer is a {_class_name(opt)}"
        )
    if m["layout"] != layout.describe():
        raise DistributedError(
            f"{path}: the checkpoint was written for parameters of shapes "
            f"{m['layout']['shapes']} (groups {m['layout']['group_of']}); "
            f"these are {layout.describe()['shapes']}"
        )
    meta = merge_meta([m["groups_state"]])
    if isinstance(opt, ZeroRedundancyOptimizer):
        lo, hi = opt.lo, opt.hi
    else:
        lo, hi = 0, layout.total
    names = sorted({n for g in meta for n in g["names"]})
    flats = {n: np.zeros(hi - lo, np.float32) for n in names}
    for shard in m["shards"]:
        a, b = max(lo, shard["start"]), min(hi, shard["stop"])
        if a >= b or not names:
            continue
        file = os.path.join(path, shard["file"])
        with np.load(file, allow_pickle=False) as npz:
            for n in names:
                arr = npz[n]
                if arr.dtype != np.float32 or arr.shape != (shard["stop"] - shard["start"],):
                    raise DistributedError(f"{file}: {n!r} has the wrong dtype or length")
                if _sha(arr) != shard["sha256"][n]:
                    raise DistributedError(f"{file}: {n!r} fails its SHA-256 check")
                flats[n][a - lo : b - lo] = arr[a - shard["start"] : b - shard["start"]]
    groups = [{k: _decode(v) for k, v in g.items()} for g in m["param_groups"]]
    if len(groups) != len(opt.param_groups):
        raise DistributedError(
            f"{path}: {len(groups)} parameter groups, the optimizer has {len(opt.param_groups)}"
        )
    if isinstance(opt, DataParallel):
        state = state_from_flat(layout, meta, flats)
        index = 0
        for g, mine in zip(groups, opt.param_groups):
            g["params"] = list(range(index, index + len(mine["params"])))
            index += len(mine["params"])
        opt.optimizer.load_state_dict(
            {
                "state": state,
                "param_groups": groups,
                "step_count": m["step_count"],
                "skipped_steps": m["skipped_steps"],
            }
        )
    else:
        index = 0
        for g, mine in zip(groups, opt.param_groups):  # hyperparameters, checked by the class
            g["params"] = list(range(index, index + len(mine["params"])))
            index += len(mine["params"])
        opt.optimizer.load_state_dict({"state": {}, "param_groups": groups})
        opt._load_local(meta, flats, m["step_count"], m["skipped_steps"])
