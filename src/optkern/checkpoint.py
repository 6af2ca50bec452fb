"""Checkpoints: an optimizer's state in one ``.npz`` file, written atomically and checked on load.

    ok.save(opt, "ckpt.npz")      # temporary file, fsync, rename: a crash leaves the old file
    ok.load(opt, "ckpt.npz")      # checks everything first; a bad file changes nothing

The file is an ordinary NumPy ``.npz`` archive (readable with ``np.load(path,
allow_pickle=False)``, no pickles anywhere) holding:

``optkern_checkpoint``
    UTF-8 JSON as a uint8 array: ``format`` ("optkern-checkpoint"), ``version`` (the format
    version, :data:`FORMAT_VERSION`), ``optimizer`` (the class name), ``optkern_version``,
    ``param_shapes`` (the shape of every parameter, in group order), ``param_groups`` (each
    group's hyperparameters and parameter ids), ``state`` (per parameter id: ``step`` and the
    names of its arrays) and ``arrays`` (per array: dtype, shape and SHA-256 of its bytes).
    Hyperparameters keep their Python types: floats (NaN and Inf included), ints, bools, None,
    strings, lists, tuples, dicts and NumPy scalars.
``optkern_checkpoint_sha256``
    The SHA-256 of the JSON above (hex, as a uint8 array).
``array_<n>``
    Each state array (``exp_avg`` and friends), as saved by ``optimizer.state_dict()``.

:func:`load` reads and checks the whole file -- the zip CRCs, format and version, the JSON's and
every array's SHA-256, that no array is missing or extra, the optimizer class and the parameter
shapes -- and only then calls ``optimizer.load_state_dict``, which checks the state against the
optimizer again before it changes anything. Any problem raises :class:`CheckpointError` (a
ValueError) and leaves the optimizer as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import zipfile
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from . import _core
from .optimizer import Optimizer

__all__ = ["save", "load", "CheckpointError", "FORMAT_VERSION"]

#: The version of the file layout this optkern writes and reads.
FORMAT_VERSION = 1
FORMAT_NAME = "optkern-checkpoint"
META_KEY = "optkern_checkpoint"
META_SHA_KEY = "optkern_checkpoint_sha256"
ARRAY_PREFIX = "array_"

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, of another format version, or written for
    a different optimizer."""


# -- saving --------------------------------------------------------------------------------------


def save(optimizer: Optimizer, path: PathLike) -> None:
    """Writes ``optimizer``'s state (``state_dict()``) to ``path`` as an ``.npz`` checkpoint.

    The file is written next to ``path`` under a temporary name, flushed to disk (fsync) and
    renamed over ``path`` in one step, so ``path`` holds either the previous checkpoint or the
    whole new one, never a part. A hyperparameter that cannot be stored (a function, say)
    raises TypeError before anything is written.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"save() needs an optkern optimizer, got {type(optimizer).__name__}")
    with optimizer._lock:  # one consistent snapshot, even while other threads step
        sd = optimizer.state_dict()
        shapes = [list(p.shape) for g in optimizer.param_groups for p in g["params"]]
    arrays: Dict[str, np.ndarray] = {}
    specs: Dict[str, Dict[str, Any]] = {}
    state = []
    for pid, entry in sd["state"].items():
        _check_names(entry, f"state[{pid!r}]")
        encoded = {}
        for name, value in entry.items():
            where = f"state[{pid!r}][{name!r}]"
            if isinstance(value, np.ndarray):
                key = f"{ARRAY_PREFIX}{len(arrays)}"
                arr = np.ascontiguousarray(value)
                arrays[key] = arr
                specs[key] = {"dtype": arr.dtype.str, "shape": list(arr.shape),
                              "sha256": _sha256(arr), "of": where}
                encoded[name] = {"__array__": key}
            else:
                encoded[name] = _encode(value, where)
        state.append([_encode(pid, f"state id {pid!r}"), encoded])
    groups = []
    for i, group in enumerate(sd["param_groups"]):
        _check_names(group, f"param_groups[{i}]")
        options = {k: _encode(v, f"param_groups[{i}][{k!r}]") for k, v in group.items()
                   if k != "params"}
        groups.append({"params": [_encode(p, f"param_groups[{i}]['params']")
                                  for p in group["params"]], "options": options})
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "optimizer": type(optimizer).__name__,
        "optkern_version": _core.__version__,
        "param_shapes": shapes,
        "param_groups": groups,
        "state": state,
        "arrays": specs,
        # the optimizer's own counters (a callable lr reads step_count)
        "counters": {k: int(sd[k]) for k in ("step_count", "skipped_steps") if k in sd},
    }
    text = json.dumps(meta, allow_nan=False, sort_keys=True).encode("utf-8")
    members = {META_KEY: np.frombuffer(text, np.uint8),
               META_SHA_KEY: np.frombuffer(hashlib.sha256(text).hexdigest().encode(), np.uint8),
               **arrays}
    _write_atomically(os.fspath(path), members)


def _write_atomically(path: str, members: Dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never write through someone else's file; mode 0o666 lets the umask decide, as for
    # any new file (mkstemp would make it 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **members)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the new name can point at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        with contextlib.suppress(OSError):
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _check_names(mapping: Dict[Any, Any], where: str) -> None:
    for key in mapping:
        if not isinstance(key, str):
            raise TypeError(f"{where} has the key {key!r}; a checkpoint stores string keys there")


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest()


# JSON cannot say 'tuple', 'NaN' or 'numpy.float32', so values are tagged: a JSON object is
# always exactly one of these tags, which keeps decoding unambiguous.
def _encode(value: Any, where: str) -> Any:
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        if value.dtype.kind in "bif" and value.dtype.itemsize <= 8:
            return {"__numpy__": value.dtype.str, "value": _encode(value.item(), where)}
    elif value is None or isinstance(value, (bool, str, int)):
        return value
    elif isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    elif isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    elif isinstance(value, list):
        return [_encode(v, where) for v in value]
    elif isinstance(value, dict):
        return {"__dict__": [[_encode(k, where), _encode(v, where)] for k, v in value.items()]}
    elif isinstance(value, np.ndarray) and value.dtype.kind in "bif" and value.dtype.itemsize <= 8:
        return {"__ndarray__": value.dtype.str, "shape": list(value.shape),
                "data": [_encode(v, where) for v in value.ravel().tolist()]}
    raise TypeError(f"{where} is a {type(value).__name__}, which a checkpoint cannot store "
                    "(it stores None, bools, numbers, strings, lists, tuples, dicts and NumPy "
                    "numbers)")


def _decode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, list):
        return [_decode(v, where) for v in value]
    if isinstance(value, dict) and len(value) >= 1:
        if set(value) == {"__float__"} and value["__float__"] in ("nan", "inf", "-inf"):
            return float(value["__float__"])
        if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(_decode(v, where) for v in value["__tuple__"])
        if set(value) == {"__dict__"} and isinstance(value["__dict__"], list):
            out = {}
            for pair in value["__dict__"]:
                if not (isinstance(pair, list) and len(pair) == 2):
                    break
                key = _decode(pair[0], where)
                if isinstance(key, (list, dict)):
                    break
                out[key] = _decode(pair[1], where)
            else:
                return out
        if set(value) == {"__numpy__", "value"}:
            dtype = _dtype(value["__numpy__"], where)
            return dtype.type(_decode(value["value"], where))
        if set(value) == {"__ndarray__", "shape", "data"}:
            dtype = _dtype(value["__ndarray__"], where)
            return np.array(_decode(value["data"], where), dtype=dtype).reshape(value["shape"])
    raise CheckpointError(f"{where} holds {value!r}, which is not a value this format writes")


def _dtype(text: Any, where: str) -> np.dtype:
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise CheckpointError(f"{where}: {text!r} is not a NumPy dtype") from None
    if dtype.kind not in "bif" or dtype.itemsize > 8:
        raise CheckpointError(f"{where}: dtype {text!r} is not one this format writes")
    return dtype


# -- loading -------------------------------------------------------------------------------------


def load(optimizer: Optimizer, path: PathLike) -> None:
    """Loads a checkpoint written by :func:`save` into ``optimizer``.

    The whole file is read and checked first (zip CRCs, format version, SHA-256 of the metadata
    and of every array, the optimizer class, the parameter shapes), then handed to
    ``optimizer.load_state_dict``. Raises :class:`CheckpointError` for a truncated, corrupted or
    mismatched file and OSError (FileNotFoundError, ...) when the file cannot be opened; either
    way the optimizer is left as it was.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"load() needs an optkern optimizer, got {type(optimizer).__name__}")
    path = os.fspath(path)
    with open(path, "rb") as f:  # OSError (no such file, a directory, ...) propagates as it is
        try:
            meta, arrays = _read(f)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e.__cause__
        except Exception as e:  # whatever a damaged zip or .npy header makes numpy/zipfile raise
            raise CheckpointError(f"{path}: cannot read the checkpoint, the file is truncated or "
                                  f"corrupted ({type(e).__name__}: {e})") from e
    try:
        sd = _state_dict(meta, arrays, optimizer)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        optimizer.load_state_dict(sd)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the checkpoint does not fit this optimizer: {e}") from e


def _read(f) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    if not zipfile.is_zipfile(f):
        raise CheckpointError("not an .npz (zip) archive: the file is truncated, corrupted or "
                              "of another kind")
    f.seek(0)
    with zipfile.ZipFile(f) as z:
        bad = z.testzip()  # reads every member and checks its CRC before numpy parses anything
        if bad is not None:
            raise CheckpointError(f"archive member {bad!r} fails its CRC check: the file is "
                                  "corrupted")
    f.seek(0)
    with np.load(f, allow_pickle=False) as npz:
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise CheckpointError("not an .npz archive")
        names = set(npz.files)
        if META_KEY not in names:
            raise CheckpointError(f"not an optkern checkpoint (it has no {META_KEY!r} entry)")
        text = _bytes_member(npz, META_KEY)
        if META_SHA_KEY not in names:
            raise CheckpointError(f"the {META_SHA_KEY!r} entry is missing")
        if _bytes_member(npz, META_SHA_KEY).decode("ascii", "replace") != \
                hashlib.sha256(text).hexdigest():
            raise CheckpointError("the metadata fails its SHA-256 check: the file is corrupted")
        try:
            meta = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"the metadata is not valid JSON ({e})") from None
        _check_header(meta)
        specs = meta["arrays"]
        if not isinstance(specs, dict):
            raise CheckpointError("the metadata's 'arrays' is not a mapping")
        expected = {META_KEY, META_SHA_KEY, *specs}
        missing = sorted(expected - names)
        if missing:
            raise CheckpointError(f"array entries {missing} are missing from the archive")
        extra = sorted(names - expected)
        if extra:
            raise CheckpointError(f"the archive has entries the metadata does not list: {extra}")
        arrays = {}
        for key, spec in specs.items():
            if not (isinstance(spec, dict) and {"dtype", "shape", "sha256"} <= set(spec)):
                raise CheckpointError(f"the metadata of array {key!r} is incomplete")
            arr = npz[key]
            what = f"array {key!r}" + (f" ({spec['of']})" if "of" in spec else "")
            if arr.dtype.str != spec["dtype"] or list(arr.shape) != spec["shape"]:
                raise CheckpointError(f"{what} is {arr.dtype.str} {list(arr.shape)} but the "
                                      f"metadata says {spec['dtype']} {spec['shape']}")
            if _sha256(arr) != spec["sha256"]:
                raise CheckpointError(f"{what} fails its SHA-256 check: the file is corrupted")
            arrays[key] = arr
    return meta, arrays


def _bytes_member(npz, key: str) -> bytes:
    arr = npz[key]
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise CheckpointError(f"the {key!r} entry is not a 1-D uint8 array")
    return arr.tobytes()


def _check_header(meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"not an optkern checkpoint (format is not {FORMAT_NAME!r})")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"invalid format version {version!r}")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"format version {version} (written by optkern "
                              f"{meta.get('optkern_version', '?')}); this optkern "
                              f"({_core.__version__}) reads version {FORMAT_VERSION}")
    for key, kind in [("optimizer", str), ("param_shapes", list), ("param_groups", list),
                      ("state", list), ("arrays", dict)]:
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"the metadata's {key!r} is missing or not a {kind.__name__}")


def _state_dict(meta: Dict[str, Any], arrays: Dict[str, np.ndarray],
                optimizer: Optimizer) -> Dict[str, Any]:
    """The state dict the metadata describes, after checking it was written for an optimizer
    like this one."""
    cls = type(optimizer).__name__
    if meta["optimizer"] != cls:
        raise CheckpointError(f"the checkpoint holds the state of a {meta['optimizer']} "
                              f"optimizer; this one is a {cls}")
    shapes = [list(p.shape) for g in optimizer.param_groups for p in g["params"]]
    if meta["param_shapes"] != shapes:
        raise CheckpointError(f"the checkpoint was written for parameters of shapes "
                              f"{meta['param_shapes']}; this optimizer's have shapes {shapes}")
    groups: List[Dict[str, Any]] = []
    for i, group in enumerate(meta["param_groups"]):
        if not (isinstance(group, dict) and isinstance(group.get("options"), dict)
                and isinstance(group.get("params"), list)):
            raise CheckpointError(f"param_groups[{i}] in the metadata is malformed")
        where = f"param_groups[{i}]"
        out = {k: _decode(v, f"{where}[{k!r}]") for k, v in group["options"].items()}
        out["params"] = [_decode(p, f"{where}['params']") for p in group["params"]]
        groups.append(out)
    state: Dict[Any, Dict[str, Any]] = {}
    used = set()
    for item in meta["state"]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict)):
            raise CheckpointError("a state entry in the metadata is malformed")
        pid = _decode(item[0], "a state id")
        entry = {}
        for name, value in item[1].items():
            if isinstance(value, dict) and set(value) == {"__array__"}:
                key = value["__array__"]
                if key not in arrays or key in used:
                    raise CheckpointError(f"state[{pid!r}][{name!r}] refers to array {key!r}, "
                                          "which is missing or used twice")
                used.add(key)
                entry[name] = arrays[key]
            else:
                entry[name] = _decode(value, f"state[{pid!r}][{name!r}]")
        state[pid] = entry
    unused = sorted(set(arrays) - used)
    if unused:
        raise CheckpointError(f"arrays {unused} belong to no state entry")
    counters = meta.get("counters", {})
    if not (isinstance(counters, dict) and set(counters) <= {"step_count", "skipped_steps"}
            and all(type(v) is int and v >= 0 for v in counters.values())):
        raise CheckpointError("the optimizer counters in the metadata are malformed")
    return {"state": state, "param_groups": groups, **counters}
