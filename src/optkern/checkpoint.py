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
import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
import stat
import zipfile
from typing import Any, Callable, Dict, List, Tuple, Union

import numpy as np

from . import _core
from .optimizer import Optimizer

__all__ = ["save", "load", "read_state_dict", "CheckpointError", "FORMAT_VERSION"]

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

    The file is written next to ``path`` under a temporary name (created with O_EXCL, removed
    on any error, Ctrl-C included), flushed to disk (fsync), renamed over ``path`` in one step,
    and the directory is fsynced, so ``path`` holds either the previous checkpoint or the whole
    new one, never a part. A hyperparameter that cannot be stored (a function, say) raises
    TypeError before anything is written.

    ``path`` must be absent or a regular file: a directory raises IsADirectoryError; a device,
    FIFO or socket raises FileExistsError, before anything is created (``save(opt,
    os.devnull)`` never replaces /dev/null). A symbolic link is written through: the regular
    file it points to is replaced and the link is kept; a dangling link raises
    FileNotFoundError. A replaced file keeps its permission bits (a 0600 checkpoint stays
    0600; owner and group are the writer's); a new file gets the umask's default. The checks
    run again just before the rename, which narrows but cannot close the window in which
    another process could put something else at ``path``.
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
                specs[key] = {
                    "dtype": arr.dtype.str,
                    "shape": list(arr.shape),
                    "sha256": _sha256(arr),
                    "of": where,
                }
                encoded[name] = {"__array__": key}
            else:
                encoded[name] = _encode(value, where)
        state.append([_encode(pid, f"state id {pid!r}"), encoded])
    groups = []
    for i, group in enumerate(sd["param_groups"]):
        _check_names(group, f"param_groups[{i}]")
        options = {
            k: _encode(v, f"param_groups[{i}][{k!r}]") for k, v in group.items() if k != "params"
        }
        groups.append(
            {
                "params": [_encode(p, f"param_groups[{i}]['params']") for p in group["params"]],
                "options": options,
            }
        )
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
    # What load() refuses, save() refuses first, before anything is written.
    limit = MAX_METADATA_BASE + MAX_METADATA_PER_PARAM * len(shapes)
    if len(text) > limit:
        raise ValueError(
            f"the checkpoint's metadata would be {len(text)} bytes, more than the "
            f"{limit} load() accepts (large hyperparameters?)"
        )
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(
            f"the checkpoint's metadata would nest {depth} levels deep, more than "
            f"the {MAX_JSON_DEPTH} load() accepts (deeply nested hyperparameters?)"
        )
    members = {
        META_KEY: np.frombuffer(text, np.uint8),
        META_SHA_KEY: np.frombuffer(hashlib.sha256(text).hexdigest().encode(), np.uint8),
        **arrays,
    }
    _write_atomically(os.fsdecode(os.fspath(path)), members)


def _target(path: str) -> Tuple[str, Any]:
    """The file save() replaces and the permission bits it keeps (None for a new file).

    ``path`` must be absent or name a regular file. A symbolic link is followed: the regular
    file it points to is replaced (the link stays a link); a link to nothing, or to anything but
    a regular file, is refused. Directories raise IsADirectoryError, devices, FIFOs and sockets
    FileExistsError, before anything is created: the check comes first."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path, None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)  # follows the link (ELOOP for a loop propagates)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT,
                "is a symbolic link to nothing; save() writes "
                "through a link only to an existing regular file",
                path,
            ) from None
        path = os.path.realpath(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory; save() needs a file name", path)
    if not stat.S_ISREG(st.st_mode):
        raise FileExistsError(
            errno.EEXIST,
            f"is a {_kind(st.st_mode)}, not a regular file; save() replaces regular files only",
            path,
        )
    return path, stat.S_IMODE(st.st_mode)


def _write_atomically(path: str, members: Dict[str, np.ndarray]) -> None:
    write_file_atomically(path, lambda f: np.savez(f, **members))


def write_file_atomically(path: str, write: Callable[[Any], None]) -> None:
    """Writes a file as :func:`save` does (shared with the sharded checkpoints): ``write(f)``
    fills a temporary file in the same directory (O_EXCL, removed on any error), which is
    fsynced, renamed over ``path`` and the directory fsynced. ``path`` must be absent or a
    regular file (see :func:`_target`)."""
    target, mode = _target(path)
    directory = os.path.dirname(os.path.abspath(target))
    # A short temporary name: a target name near NAME_MAX must not make the temporary one too long.
    tmp = os.path.join(directory, f".{os.path.basename(target)[:64]}.{secrets.token_hex(8)}.tmp")
    fd = None
    try:
        # O_EXCL: never write through someone else's file; mode 0o666 lets the umask decide, as
        # for any new file (mkstemp would make it 0o600). An existing file keeps its bits.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = None  # the file object owns it now
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the new name can point at it
        _target(target)  # still absent or a regular file (narrows, cannot close, a race)
        os.replace(tmp, target)
    except BaseException:  # KeyboardInterrupt included: no temporary file left behind
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
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
    # As 1-D bytes: memoryview.cast refuses a shape with a zero in it, such as (0, 10).
    return hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)).hexdigest()


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
        return {
            "__ndarray__": value.dtype.str,
            "shape": list(value.shape),
            "data": [_encode(v, where) for v in value.ravel().tolist()],
        }
    raise TypeError(
        f"{where} is a {type(value).__name__}, which a checkpoint cannot store "
        "(it stores None, bools, numbers, strings, lists, tuples, dicts and NumPy "
        "numbers)"
    )


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
    ``optimizer.load_state_dict``. Either way the optimizer is left as it was when this raises:

    - :class:`CheckpointError` for anything wrong with what the path holds: a truncated,
      corrupted, crafted or mismatched file, or a path naming something other than a regular
      file (a FIFO, a device, a socket: refused before anything is read, so a FIFO never
      blocks). The underlying error, if any, is chained as ``__cause__``.
    - OSError (FileNotFoundError, PermissionError, IsADirectoryError, ...) when the path cannot
      be opened at all; ValueError for a path with a NUL byte, as ``open`` raises.

    Memory stays bounded whatever the file holds: the file's size and every archive member's
    declared size are checked against what this optimizer's parameter shapes allow before
    anything is inflated, and each member is then inflated with a read of bounded length.
    """
    sd = read_state_dict(optimizer, path)
    try:
        optimizer.load_state_dict(sd)
    except Exception as e:  # a crafted value the optimizer refuses (or chokes on)
        raise CheckpointError(
            f"{os.fsdecode(os.fspath(path))}: the checkpoint does not fit this optimizer: {_short(e)}"
        ) from e


def read_state_dict(optimizer: Optimizer, path: PathLike) -> Dict[str, Any]:
    """The state dict a checkpoint file holds, read and checked as :func:`load` reads it (the
    file against ``optimizer``'s class and parameter shapes, with bounded memory), without
    loading it: ``optimizer`` is not changed."""
    return _read_checked(optimizer, path)[0]


def _read_checked(optimizer: Optimizer, path: PathLike) -> Tuple[Dict[str, Any], str]:
    """:func:`read_state_dict`, and a SHA-256 that identifies the checkpoint's content (of its
    metadata, which holds every array's SHA-256)."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"load() needs an optkern optimizer, got {type(optimizer).__name__}")
    path = os.fspath(path)
    with open_regular(path) as f:
        try:
            with optimizer._lock:  # shapes read once: another thread may add a group
                shapes = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]]
            limits = _Limits(
                shapes,
                getattr(type(optimizer), "_array_state_names", None),
                getattr(type(optimizer), "_rule", None),
            )
            meta, arrays = _read(f, limits, type(optimizer).__name__)
            ident = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
            return _state_dict(meta, arrays, optimizer), ident
        except CheckpointError as e:
            raise CheckpointError(f"{os.fsdecode(path)}: {e}") from (e.__cause__ or e)
        except Exception as e:  # whatever a damaged zip, .npy header or crafted JSON raises
            raise CheckpointError(
                f"{os.fsdecode(path)}: cannot read the checkpoint, the file is "
                f"truncated, corrupted or crafted ({type(e).__name__}: "
                f"{_short(e)})"
            ) from e


def _short(e: Any) -> str:
    text = str(e)
    return text if len(text) <= 300 else text[:300] + "..."


#: Fixed part of the cap on the metadata JSON's size (the rest grows with the parameter count).
MAX_METADATA_BASE = 16 * 2**20
#: Metadata bytes allowed per parameter, beyond the fixed part.
MAX_METADATA_PER_PARAM = 4096
#: How deeply the metadata's JSON may nest (a hyperparameter holding dicts of tuples of lists...).
MAX_JSON_DEPTH = 64
_NPY_HEADER_MAX = 4096  # an .npy member's magic + header; NumPy writes about 128 bytes for ours
_ZIP_OVERHEAD = 1024  # local header + central directory entry of one member, generously


class _Limits:
    """What a checkpoint for an optimizer with these parameter shapes can hold."""

    def __init__(self, shapes: List[tuple], array_names: Any, rule: Any = None) -> None:
        self.shape_list = [list(s) for s in shapes]
        # The parameters' shapes and those their states take (Adafactor's row and column
        # factors: registry.State.shape_for, the core's rule); load_state_dict then checks
        # each state against its own parameter.
        self.shapes = {tuple(s) for s in shapes}
        for st in getattr(rule, "states", ()):
            if st.shape != "like_param":
                self.shapes |= {st.shape_for(tuple(s)) for s in shapes} - {None}
        sizes = [int(np.prod(s, dtype=object)) for s in shapes]
        n = len(shapes)
        # Arrays a parameter may have: each state array name, plus slack for state from torch or
        # an older optkern; unknown (a subclass without the attribute) -> generous.
        per_param = len(array_names) + 1 if isinstance(array_names, (list, tuple)) else 8
        self.max_arrays = per_param * n
        self.metadata = MAX_METADATA_BASE + MAX_METADATA_PER_PARAM * n
        self.member = _NPY_HEADER_MAX + 8 * max(sizes, default=0)  # the largest array, 8 B each
        self.file = (
            self.metadata
            + 2 * _NPY_HEADER_MAX
            + 64
            + per_param * sum(_NPY_HEADER_MAX + 8 * s for s in sizes)
            + (2 + self.max_arrays) * _ZIP_OVERHEAD
            + 65536
        )


def open_regular(path: Union[str, bytes]):
    """The file at ``path`` opened for reading, refused unless it is a regular file. Opened with
    O_NONBLOCK (a FIFO must not block the open) and checked with fstat on the open descriptor,
    so what is checked is what is read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)  # OSError (no such file, permission, ...) propagates as it is
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(
                errno.EISDIR, "is a directory, not a checkpoint file", os.fsdecode(path)
            )
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                f"{os.fsdecode(path)}: is a {_kind(st.st_mode)}, not a regular "
                "file; load() reads checkpoints from regular files only"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, name in [
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symbolic link"),
    ]:
        if test(mode):
            return name
    return "special file"


def _json_depth(text: bytes) -> int:
    """The deepest nesting of [ and { in JSON text, counted without decoding it (json.loads
    recurses, and raises RecursionError on deep input)."""
    stripped = re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', text)
    codes = np.frombuffer(stripped, np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(
        codes, (ord("]"), ord("}"))
    ).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, inflated with a read of at most ``limit + 1`` bytes (the declared size
    was checked already, but is not trusted). Reading to the end checks the member's CRC."""
    if info.file_size > limit:
        raise CheckpointError(
            f"archive member {info.filename!r} declares {info.file_size} bytes, "
            f"more than the {limit} it may hold"
        )
    with z.open(info) as m:
        data = m.read(limit + 1)
        if len(data) > limit:
            raise CheckpointError(
                f"archive member {info.filename!r} inflates to more than "
                f"the {limit} bytes it may hold"
            )
    if len(data) != info.file_size:
        raise CheckpointError(
            f"archive member {info.filename!r} holds {len(data)} bytes but declares {info.file_size}"
        )
    return data


def _parse_npy(data: bytes, where: str) -> Tuple[np.dtype, tuple, memoryview]:
    """The dtype, shape and data bytes of an .npy member, without letting NumPy allocate for
    whatever shape the header claims."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise CheckpointError(
            f"{where} has .npy format version {version}, which save() does not write"
        )
    if fortran:
        raise CheckpointError(f"{where} is stored in Fortran order, which save() does not write")
    return dtype, tuple(shape), memoryview(data)[buf.tell() :]


class Archive:
    """An ``.npz`` file opened for checked reading, shared by :func:`load` and the sharded
    checkpoints of :mod:`optkern.distributed`: nothing is inflated before its declared size is
    checked against a bound the caller derives from the parameters' layout, and every member is
    then inflated with a read of bounded length.

    ``f`` is a file opened by :func:`open_regular` (a regular file: a FIFO or device never
    blocks or streams). Checked here, before any member is read: the file's size (at most
    ``max_file`` bytes), that it is a zip archive of at most ``max_members`` members, each an
    ``.npy`` entry named once, not encrypted, stored or deflated, and declaring at most
    ``limit(key)`` bytes (``key``: the member's name without ``.npy``)."""

    def __init__(self, f, max_file: int, max_members: int, limit: Callable[[str], int]) -> None:
        size = os.fstat(f.fileno()).st_size
        if size > max_file:
            raise CheckpointError(
                f"the file is {size} bytes, more than a checkpoint for this "
                f"optimizer's parameters can be ({max_file} bytes)"
            )
        if not zipfile.is_zipfile(f):
            raise CheckpointError(
                "not an .npz (zip) archive: the file is truncated, corrupted or of another kind"
            )
        f.seek(0)
        self.zip = zipfile.ZipFile(f)
        try:
            infos = self.zip.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise CheckpointError(f"the archive has duplicate members {dup}")
            if len(infos) > max_members:
                raise CheckpointError(
                    f"the archive has {len(infos)} members, more than a "
                    "checkpoint for this optimizer holds"
                )
            self.members: Dict[str, zipfile.ZipInfo] = {}
            self.limits: Dict[str, int] = {}
            for info in infos:
                if info.is_dir() or not info.filename.endswith(".npy"):
                    raise CheckpointError(f"archive member {info.filename!r} is not an .npy array")
                if info.flag_bits & 0x1:
                    raise CheckpointError(f"archive member {info.filename!r} is encrypted")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise CheckpointError(
                        f"archive member {info.filename!r} uses compression method "
                        f"{info.compress_type}, which save() does not write"
                    )
                key = info.filename[:-4]
                bound = limit(key)
                if info.file_size > bound:  # every declared size, before anything is inflated
                    raise CheckpointError(
                        f"archive member {info.filename!r} declares "
                        f"{info.file_size} bytes, more than the {bound} it may "
                        "hold for this optimizer"
                    )
                self.members[key] = info
                self.limits[key] = bound
        except BaseException:
            self.zip.close()
            raise

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.zip.close()

    def bytes_member(self, key: str) -> bytes:
        """A 1-D uint8 member's bytes (the metadata)."""
        data = _read_member(self.zip, self.members[key], self.limits[key])
        dtype, shape, body = _parse_npy(data, f"the {key!r} entry")
        if dtype != np.uint8 or len(shape) != 1 or shape[0] != len(body):
            raise CheckpointError(f"the {key!r} entry is not a 1-D uint8 array")
        return bytes(body)

    def array(self, key: str, dtype: np.dtype, shape: List[int], sha256: Any, what: str):
        """Member ``key`` as an array of exactly ``dtype`` and ``shape`` whose bytes have the
        SHA-256 ``sha256``, inflated with a read bounded by that dtype and shape."""
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        data = _read_member(self.zip, self.members[key], _NPY_HEADER_MAX + nbytes)
        got_dtype, got_shape, body = _parse_npy(data, what)
        if got_dtype != dtype or got_dtype.str != dtype.str or list(got_shape) != list(shape):
            raise CheckpointError(
                f"{what} is {got_dtype.str} {list(got_shape)} but the metadata says "
                f"{dtype.str} {list(shape)} ({len(body)} bytes of data)"
            )
        if len(body) != nbytes:
            raise CheckpointError(
                f"{what} holds {len(body)} bytes of data, not the {nbytes} its shape needs"
            )
        if hashlib.sha256(body).hexdigest() != sha256:
            raise CheckpointError(f"{what} fails its SHA-256 check: the file is corrupted")
        return np.frombuffer(body, dtype).reshape(shape)


def read_json(path: Union[str, bytes], limit: int) -> Any:
    """A JSON file (a sharded checkpoint's manifest) read with :func:`load`'s protections: a
    regular file only (a FIFO never blocks), at most ``limit`` bytes, nesting at most
    :data:`MAX_JSON_DEPTH` deep. Any problem raises CheckpointError naming the file."""
    name = os.fsdecode(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise CheckpointError(f"{name}: {size} bytes, more than the {limit} it may hold")
        text = f.read(size + 1)  # read(n) allocates n bytes first: ask for what is there
    if len(text) > size:
        raise CheckpointError(f"{name}: grew while it was read")
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(
            f"{name}: nests {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed"
        )
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: not valid JSON ({e})") from e


def _read(f, limits: _Limits, cls: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    bounds = {
        META_KEY: _NPY_HEADER_MAX + limits.metadata,
        META_SHA_KEY: _NPY_HEADER_MAX + 64,
    }
    with Archive(f, limits.file, 2 + limits.max_arrays, lambda k: bounds.get(k, limits.member)) as z:
        members = z.members
        if META_KEY not in members:
            raise CheckpointError(f"not an optkern checkpoint (it has no {META_KEY!r} entry)")
        if META_SHA_KEY not in members:
            raise CheckpointError(f"the {META_SHA_KEY!r} entry is missing")
        text = z.bytes_member(META_KEY)
        digest = z.bytes_member(META_SHA_KEY)
        if digest.decode("ascii", "replace") != hashlib.sha256(text).hexdigest():
            raise CheckpointError("the metadata fails its SHA-256 check: the file is corrupted")
        depth = _json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise CheckpointError(
                f"the metadata nests {depth} levels deep, more than the "
                f"{MAX_JSON_DEPTH} a checkpoint may"
            )
        try:
            meta = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"the metadata is not valid JSON ({e})") from e
        _check_header(meta)
        _check_fits(meta, cls, limits.shape_list)  # before reading any array
        specs = meta["arrays"]
        expected = {META_KEY, META_SHA_KEY, *specs}
        missing = sorted(expected - set(members))
        if missing:
            raise CheckpointError(f"array entries {missing} are missing from the archive")
        extra = sorted(set(members) - expected)
        if extra:
            raise CheckpointError(f"the archive has entries the metadata does not list: {extra}")
        arrays = {}
        for key, spec in specs.items():
            if not (isinstance(spec, dict) and {"dtype", "shape", "sha256"} <= set(spec)):
                raise CheckpointError(f"the metadata of array {key!r} is incomplete")
            what = f"array {key!r}" + (f" ({spec['of']})" if isinstance(spec.get("of"), str) else "")
            dtype = _state_dtype(spec["dtype"], what)
            if dtype.str != spec["dtype"]:
                raise CheckpointError(
                    f"{what}: dtype {spec['dtype']!r} is not written as save() writes it"
                )
            shape = spec["shape"]
            if not (
                isinstance(shape, list)
                and all(type(d) is int for d in shape)
                and tuple(shape) in limits.shapes
            ):
                raise CheckpointError(f"{what} has shape {shape!r}, which is no parameter's shape")
            arrays[key] = z.array(key, dtype, shape, spec["sha256"], what)
    return meta, arrays


def _state_dtype(text: Any, where: str) -> np.dtype:
    """A state array's dtype as the metadata names it: real numbers of at most 8 bytes."""
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: dtype {text!r} is not a dtype string")
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {text!r} is not a NumPy dtype") from e
    if (
        dtype.kind not in "fiu"
        or dtype.itemsize > 8
        or dtype.fields is not None
        or dtype.subdtype is not None
    ):
        raise CheckpointError(f"{where}: dtype {text!r} is not one this format writes for arrays")
    return dtype


def _check_header(meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"not an optkern checkpoint (format is not {FORMAT_NAME!r})")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"invalid format version {version!r}")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"format version {version} (written by optkern "
            f"{meta.get('optkern_version', '?')}); this optkern "
            f"({_core.__version__}) reads version {FORMAT_VERSION}"
        )
    for key, kind in [
        ("optimizer", str),
        ("param_shapes", list),
        ("param_groups", list),
        ("state", list),
        ("arrays", dict),
    ]:
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"the metadata's {key!r} is missing or not a {kind.__name__}")


def _check_fits(meta: Dict[str, Any], cls: str, shapes: List[list]) -> None:
    if meta["optimizer"] != cls:
        raise CheckpointError(
            f"the checkpoint holds the state of a {_short(meta['optimizer'])} "
            f"optimizer; this one is a {cls}"
        )
    if meta["param_shapes"] != shapes:
        raise CheckpointError(
            f"the checkpoint was written for parameters of shapes "
            f"{_short(meta['param_shapes'])}; this optimizer's have shapes "
            f"{_short(shapes)}"
        )


def _state_dict(
    meta: Dict[str, Any], arrays: Dict[str, np.ndarray], optimizer: Optimizer
) -> Dict[str, Any]:
    """The state dict the metadata describes, after checking it was written for an optimizer
    like this one."""
    _check_fits(
        meta,
        type(optimizer).__name__,
        [list(p.shape) for g in optimizer.param_groups for p in g["params"]],
    )
    groups: List[Dict[str, Any]] = []
    for i, group in enumerate(meta["param_groups"]):
        if not (
            isinstance(group, dict)
            and isinstance(group.get("options"), dict)
            and isinstance(group.get("params"), list)
        ):
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
                    raise CheckpointError(
                        f"state[{pid!r}][{name!r}] refers to array {key!r}, "
                        "which is missing or used twice"
                    )
                used.add(key)
                entry[name] = arrays[key]
            else:
                entry[name] = _decode(value, f"state[{pid!r}][{name!r}]")
        state[pid] = entry
    unused = sorted(set(arrays) - used)
    if unused:
        raise CheckpointError(f"arrays {unused} belong to no state entry")
    counters = meta.get("counters", {})
    if not (
        isinstance(counters, dict)
        and set(counters) <= {"step_count", "skipped_steps"}
        and all(type(v) is int and v >= 0 for v in counters.values())
    ):
        raise CheckpointError("the optimizer counters in the metadata are malformed")
    return {"state": state, "param_groups": groups, **counters}
