"""Crafted and unusual checkpoint input: step counts of every type on load, zip bombs,
malformed metadata and archives, what load reads and what save replaces (devices, FIFOs,
sockets, links, permission bits). Pickling is in test_pickling.py."""

import copy
import io
import os
import socket
import stat
import tracemalloc
import zipfile

import numpy as np
import pytest
from helpers import digest
from test_checkpoint import assert_refused, everything, grads, make_opt, rewrite, saved, stepped

import optkern as ok
from optkern import checkpoint

# -- 5. step counts on load ----------------------------------------------------------------------

torch = None
try:  # optional: torch stores step as a float tensor
    import torch  # noqa: F811
except ImportError:
    pass

GOOD_STEPS = [
    5,
    np.int64(5),
    np.uint8(5),
    np.array(5),
    np.array(5, np.int32),
    5.0,
    np.float32(5),
    np.array(5.0),
    np.array(5.0, np.float32),
    0,
    2**53,
    float(2**53),
]
BAD_STEPS = [
    True,
    False,
    np.bool_(True),
    "5",
    b"5",
    None,
    2**63,
    2**64,
    1e300,
    2**53 + 1,
    float(2**53) * 2,
    -1,
    -1.0,
    1.5,
    float("nan"),
    float("inf"),
    -float("inf"),
    np.array([5]),
    np.array([[5]]),
    np.array(5 + 0j),
    5 + 0j,
    [5],
    (5,),
    {"v": 5},
    np.array("5"),
    np.datetime64(5, "s"),
    np.timedelta64(5, "s"),
    object(),
    np.array(5, dtype=object),
    np.float64(2**60),
]


def _stepped_adam():
    opt, params = stepped("Adam", {"amsgrad": True}, steps=2)
    return opt, params


@pytest.mark.parametrize("value", GOOD_STEPS, ids=repr)
@pytest.mark.parametrize("where", ["state", "step_count", "skipped_steps"])
def test_good_step_counts_load_and_later_steps_work(value, where):
    opt, params = _stepped_adam()
    sd = opt.state_dict()
    if where == "state":
        for s in sd["state"].values():
            s["step"] = value
    else:
        sd[where] = value
    opt.load_state_dict(sd)
    got = opt.state.get_by_id(params[0])["step"] if where == "state" else getattr(opt, where)
    assert type(got) is int and got == int(np.asarray(value))
    opt.step(grads(params, 7))  # and the next step succeeds (C++ takes the count as int64)
    assert all(np.isfinite(p).all() for p in params)


@pytest.mark.parametrize("value", BAD_STEPS, ids=repr)
@pytest.mark.parametrize("where", ["state", "step_count", "skipped_steps"])
def test_bad_step_counts_refused_with_nothing_changed(value, where):
    opt, params = _stepped_adam()
    sd = opt.state_dict()
    if where == "state":
        sd["state"][1]["step"] = value
    else:
        sd[where] = value
    before = everything(opt, params)
    with pytest.raises((TypeError, ValueError), match="must be|has no 'step'"):
        opt.load_state_dict(sd)
    assert everything(opt, params) == before


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_torch_float_tensor_step_loads():
    opt, params = _stepped_adam()
    sd = opt.state_dict()
    for s in sd["state"].values():
        s["step"] = torch.tensor(12.0)
    opt.load_state_dict(sd)
    assert opt.state.get_by_id(params[0])["step"] == 12
    sd["state"][0]["step"] = torch.tensor(True)
    with pytest.raises(TypeError):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("value", [2**63, 1e300, True, "5", 2**53 + 1, -3, 0.5])
def test_checkpoint_with_bad_step_refused(tmp_path, value):
    path, target, params = saved(tmp_path)

    def change(members, meta):
        meta["state"][0][1]["step"] = value

    rewrite(path, change)
    assert_refused(path, target, params, "step")


# -- 6. zip bombs --------------------------------------------------------------------------------


def _write_members(path, members, compress=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _raw_members(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _peak_traced(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_member_declaring_a_huge_size_is_refused_before_inflating(tmp_path):
    path, target, params = saved(tmp_path)
    members = _raw_members(path)
    members["array_0.npy"] = members["array_0.npy"][:128] + bytes(64 * 2**20)  # 64 MiB of zeros
    _write_members(path, members)
    assert path.stat().st_size < 2**20  # a small file...
    before = everything(target, params)
    peak = _peak_traced(lambda: pytest.raises(ok.CheckpointError, ok.load, target, path))
    with pytest.raises(ok.CheckpointError, match="declares .* more than"):
        ok.load(target, path)
    assert everything(target, params) == before
    assert peak < 4 * 2**20, peak  # ...whose 64 MiB member is never inflated


def _patch_declared_size(data: bytes, name: bytes, size: int) -> bytes:
    """Rewrites the uncompressed size a member declares in its local header and in the central
    directory (a lying header: the data inflates to more)."""
    buf = bytearray(data)
    at = 0
    while True:
        local = buf.find(b"PK\x03\x04", at)
        if local < 0:
            break
        n = int.from_bytes(buf[local + 26 : local + 28], "little")
        if bytes(buf[local + 30 : local + 30 + n]) == name:
            buf[local + 22 : local + 26] = size.to_bytes(4, "little")
        at = local + 4
    at = 0
    while True:
        central = buf.find(b"PK\x01\x02", at)
        if central < 0:
            break
        n = int.from_bytes(buf[central + 28 : central + 30], "little")
        if bytes(buf[central + 46 : central + 46 + n]) == name:
            buf[central + 24 : central + 28] = size.to_bytes(4, "little")
        at = central + 4
    return bytes(buf)


@pytest.mark.parametrize(
    "member", ["array_0.npy", "optkern_checkpoint.npy", "optkern_checkpoint_sha256.npy"]
)
def test_lying_header_inflating_far_beyond_its_declared_size_is_bounded(tmp_path, member):
    path, target, params = saved(tmp_path)
    members = _raw_members(path)
    members[member] = members[member][:128] + bytes(64 * 2**20)
    _write_members(path, members)
    path.write_bytes(_patch_declared_size(path.read_bytes(), member.encode(), 8192))
    before = everything(target, params)
    peak = _peak_traced(lambda: pytest.raises(ok.CheckpointError, ok.load, target, path))
    with pytest.raises(ok.CheckpointError):
        ok.load(target, path)
    assert everything(target, params) == before
    # bounded by what the member may hold (the metadata's cap is 16 MiB), not by what it inflates to
    assert peak < 3 * checkpoint.MAX_METADATA_BASE, peak


def test_file_larger_than_any_checkpoint_for_these_shapes_refused_unread(tmp_path):
    path, target, params = saved(tmp_path)
    with open(path, "ab") as f:
        f.truncate(path.stat().st_size + 2**30)  # sparse: 1 GiB more, costs no disk
    assert_refused(path, target, params, "more than a checkpoint")


def test_too_many_members_refused(tmp_path):
    path, target, params = saved(tmp_path)
    members = _raw_members(path)
    for i in range(100):
        members[f"junk_{i}.npy"] = b""
    _write_members(path, members)
    assert_refused(path, target, params, "members")


def test_npy_header_claiming_a_huge_shape_is_not_allocated(tmp_path):
    path, target, params = saved(tmp_path)
    members = _raw_members(path)
    header = members["array_0.npy"]
    members["array_0.npy"] = header.replace(b"(6, 4)", b"(10**12,)"[:6].ljust(6))  # keeps length
    _write_members(path, members)
    assert_refused(path, target, params, ".")


def test_bounded_read_allows_a_real_large_checkpoint(tmp_path):
    p = np.zeros(300_000, np.float32)
    opt = ok.Adam([p], amsgrad=True)
    opt.step([np.ones_like(p)])
    ok.save(opt, tmp_path / "big.npz")
    other = ok.Adam([np.zeros_like(p)], amsgrad=True)
    ok.load(other, tmp_path / "big.npz")
    assert digest(other.state_dict()) == digest(opt.state_dict())


# -- 7. malformed checkpoints -------------------------------------------------------------------


def _deep(n, leaf=1):
    x = leaf
    for _ in range(n):
        x = [x]
    return x


NASTY = [
    None,
    True,
    -1,
    0,
    2**70,
    -(2**70),
    1e308,
    float("nan"),
    float("inf"),
    "x",
    "",
    [],
    {},
    [None],
    {"a": 1},
    _deep(50),
    {"__float__": "nan"},
    {"__float__": "1e999"},
    {"__tuple__": 1},
    {"__dict__": [[[1], 2]]},
    {"__dict__": [[{}, 2]]},
    {"__numpy__": "<i1", "value": 1000},
    {"__numpy__": "O", "value": 1},
    {"__numpy__": "<c16", "value": 1},
    {"__numpy__": [1], "value": 1},
    {"__numpy__": "(1000000000,)f4", "value": 1},
    {"__ndarray__": "<f4", "shape": [10**9], "data": []},
    {"__ndarray__": "<f4", "shape": [-1], "data": [1, 2]},
    {"__ndarray__": "<f4", "shape": "x", "data": [1]},
    {"__ndarray__": "<i1", "shape": [1], "data": [1e300]},
    {"__array__": "array_0"},
    {"__array__": "nope"},
    {"__array__": [1]},
]

FIELDS = [
    "format",
    "version",
    "optimizer",
    "param_shapes",
    "param_groups",
    "state",
    "arrays",
    "counters",
    "optkern_version",
    "param_groups.0",
    "param_groups.0.params",
    "param_groups.0.options",
    "param_groups.0.options.lr",
    "param_groups.0.options.betas",
    "param_groups.0.params.0",
    "state.0",
    "state.0.0",
    "state.0.1",
    "state.0.1.step",
    "state.0.1.exp_avg",
    "arrays.array_0",
    "arrays.array_0.dtype",
    "arrays.array_0.shape",
    "arrays.array_0.sha256",
    "counters.step_count",
    "counters.skipped_steps",
]


def _set(meta, dotted, value):
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _case_id(value):
    text = repr(value)
    return text if len(text) < 40 else text[:37] + "..."


@pytest.mark.parametrize("value", NASTY, ids=_case_id)
@pytest.mark.parametrize("field", FIELDS)
def test_crafted_metadata_raises_checkpoint_error_and_changes_nothing(tmp_path, field, value):
    path, target, params = saved(tmp_path)

    def change(members, meta):
        _set(meta, field, copy.deepcopy(value))

    try:
        rewrite(path, change)
    except ValueError:  # json.dumps refuses some (NaN is allowed: JSON's NaN token)
        pytest.skip("json cannot write this value")
    before = everything(target, params)
    try:
        ok.load(target, path)
    except ok.CheckpointError as e:
        assert everything(target, params) == before
        if not isinstance(e.__cause__, (type(None), ok.CheckpointError)):
            assert e.__cause__ is not None
    else:  # a harmless change (an unused field, or the same value): loaded consistently
        target.step(grads(params, 5))


@pytest.mark.parametrize("depth", [65, 2000, 100_000])
def test_deep_nesting_refused_without_recursion_error(tmp_path, depth):
    path, target, params = saved(tmp_path)

    def change(members, meta):
        meta["param_groups"][0]["options"]["x"] = "DEEP"

    rewrite(path, change)
    # Rewritten by hand: json.dumps itself cannot write such depth.
    with np.load(path, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
    text = (
        members["optkern_checkpoint"]
        .tobytes()
        .replace(b'"DEEP"', b"[" * depth + b'"}]"' + b"]" * depth)
    )  # a bracket in a string: not counted
    members["optkern_checkpoint"] = np.frombuffer(text, np.uint8)
    members["optkern_checkpoint_sha256"] = np.frombuffer(
        __import__("hashlib").sha256(text).hexdigest().encode(), np.uint8
    )
    with open(path, "wb") as f:
        np.savez(f, **members)
    assert_refused(path, target, params, "nests")


def test_json_depth_counts_brackets_outside_strings():
    assert checkpoint._json_depth(b'{"a": [1, "[[[[", {"b": "\\\\"}]}') == 3
    assert checkpoint._json_depth(b'"[\\"[["') == 0
    assert checkpoint._json_depth(b"") == 0


def test_save_refuses_metadata_load_would_refuse(tmp_path):
    opt, _ = stepped()
    opt.param_groups[0]["deep"] = _deep(checkpoint.MAX_JSON_DEPTH + 5)
    with pytest.raises(ValueError, match="nest"):
        ok.save(opt, tmp_path / "c.npz")
    assert not os.listdir(tmp_path)


def _wrap_members(path, edit):
    members = _raw_members(path)
    edit(members)
    _write_members(path, members, zipfile.ZIP_STORED)


ARCHIVE_EDITS = {
    "missing array": lambda m: m.pop("array_0.npy"),
    "missing metadata": lambda m: m.pop("optkern_checkpoint.npy"),
    "missing sha": lambda m: m.pop("optkern_checkpoint_sha256.npy"),
    "extra member": lambda m: m.__setitem__("extra.npy", _npy_bytes(np.zeros(3, np.float32))),
    "not npy name": lambda m: m.__setitem__("readme.txt", b"hi"),
    "directory member": lambda m: m.__setitem__("dir/", b""),
    "array as object npy": lambda m: m.__setitem__(
        "array_0.npy",
        b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (6, 4), }"
        + b" " * 50
        + b"\n",
    ),
    "array wrong dtype": lambda m: m.__setitem__(
        "array_0.npy", _npy_bytes(np.zeros((6, 4), np.float64))
    ),
    "array complex": lambda m: m.__setitem__(
        "array_0.npy", _npy_bytes(np.zeros((6, 4), np.complex64))
    ),
    "array fortran": lambda m: m.__setitem__(
        "array_0.npy", _npy_bytes(np.asfortranarray(np.zeros((6, 4), np.float32)))
    ),
    "array short": lambda m: m.__setitem__("array_0.npy", m["array_0.npy"][:-8]),
    "array long": lambda m: m.__setitem__("array_0.npy", m["array_0.npy"] + b"\0" * 8),
    "array garbage": lambda m: m.__setitem__("array_0.npy", b"garbage"),
    "array empty": lambda m: m.__setitem__("array_0.npy", b""),
    "npy version 3": lambda m: m.__setitem__(
        "array_0.npy", m["array_0.npy"][:6] + b"\x03" + m["array_0.npy"][7:]
    ),
    "metadata not uint8": lambda m: m.__setitem__(
        "optkern_checkpoint.npy", _npy_bytes(np.zeros(3, np.float32))
    ),
    "metadata 2-d": lambda m: m.__setitem__(
        "optkern_checkpoint.npy", _npy_bytes(np.zeros((2, 2), np.uint8))
    ),
    "metadata not utf8": lambda m: m.__setitem__(
        "optkern_checkpoint.npy", _npy_bytes(np.frombuffer(b"\xff\xfe", np.uint8))
    ),
}


@pytest.mark.parametrize("edit", sorted(ARCHIVE_EDITS))
def test_malformed_archive_raises_checkpoint_error(tmp_path, edit):
    path, target, params = saved(tmp_path)
    _wrap_members(path, ARCHIVE_EDITS[edit])
    assert_refused(path, target, params, ".")


def test_duplicate_members_refused(tmp_path):
    path, target, params = saved(tmp_path)
    members = _raw_members(path)
    with pytest.warns(UserWarning, match="Duplicate"):
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("array_0.npy", members["array_0.npy"])
    assert_refused(path, target, params, "duplicate")


@pytest.mark.parametrize("method", ["bzip2", "lzma"])
def test_other_compression_methods_refused(tmp_path, method):
    path, target, params = saved(tmp_path)
    members = _raw_members(path)
    _write_members(path, members, {"bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA}[method])
    assert_refused(path, target, params, "compression method")


def test_deflated_checkpoint_still_loads(tmp_path):
    path, target, params = saved(tmp_path)
    _write_members(path, _raw_members(path), zipfile.ZIP_DEFLATED)  # as np.savez_compressed
    ok.load(target, path)


# -- load: what the path names -----------------------------------------------------------------


def test_load_from_a_fifo_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    opt, params = stepped()
    before = everything(opt, params)
    with pytest.raises(ok.CheckpointError, match="FIFO"):
        ok.load(opt, fifo)  # before the fix: open() blocked forever, waiting for a writer
    assert everything(opt, params) == before


@pytest.mark.parametrize("special", [os.devnull, "/dev/zero", "/dev/urandom"])
def test_load_from_a_device_refused(special):
    if not os.path.exists(special):
        pytest.skip(f"{special} does not exist here")
    opt, params = stepped()
    with pytest.raises(ok.CheckpointError, match="character device"):
        ok.load(opt, special)


def test_load_from_a_socket_is_an_oserror(tmp_path):
    sock = socket.socket(socket.AF_UNIX)
    path = tmp_path / "s"
    try:
        sock.bind(str(path))
        opt, params = stepped()
        with pytest.raises((OSError, ok.CheckpointError)):
            ok.load(opt, path)
    finally:
        sock.close()


@pytest.mark.parametrize("special", ["/proc/self/status", "/proc/self/cmdline"])
def test_load_from_proc_files_refused(special):
    if not os.path.exists(special):
        pytest.skip("no /proc")
    opt, params = stepped()
    with pytest.raises(ok.CheckpointError):
        ok.load(opt, special)


def test_load_path_kinds(tmp_path):
    path, target, params = saved(tmp_path)
    ok.load(target, os.fsencode(path))  # bytes
    ok.load(target, str(path))

    class Bad(os.PathLike):
        def __fspath__(self):
            raise RuntimeError("no path for you")

    with pytest.raises(RuntimeError, match="no path"):
        ok.load(target, Bad())
    with pytest.raises(ValueError, match="null"):
        ok.load(target, str(path) + "\0x")
    with pytest.raises(FileNotFoundError):
        ok.load(target, tmp_path / "missing.npz")
    with pytest.raises(IsADirectoryError):
        ok.load(target, tmp_path)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(OSError):
        ok.load(target, loop)


def test_load_empty_file(tmp_path):
    path, target, params = saved(tmp_path)
    path.write_bytes(b"")
    assert_refused(path, target, params, "not an .npz")


# -- 8. what save replaces -----------------------------------------------------------------------


def test_save_refuses_devnull_before_creating_anything():
    opt, _ = stepped()
    before = os.stat(os.devnull)
    with pytest.raises(FileExistsError, match="character device"):
        ok.save(opt, os.devnull)  # (as root, the old code replaced /dev/null with a file)
    after = os.stat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert not [n for n in os.listdir("/dev") if n.startswith(".null.")]


def test_save_refuses_a_fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    opt, _ = stepped()
    with pytest.raises(FileExistsError, match="FIFO"):
        ok.save(opt, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["fifo"]


def test_save_refuses_a_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX)
    path = tmp_path / "s"
    try:
        sock.bind(str(path))
        opt, _ = stepped()
        with pytest.raises(FileExistsError, match="socket"):
            ok.save(opt, path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert os.listdir(tmp_path) == ["s"]
    finally:
        sock.close()


def test_save_refuses_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    opt, _ = stepped()
    with pytest.raises(IsADirectoryError):
        ok.save(opt, tmp_path / "d")
    assert os.listdir(tmp_path) == ["d"] and os.path.isdir(tmp_path / "d")


def test_save_writes_through_a_symlink_to_a_regular_file(tmp_path):
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "c.npz"
    real.write_bytes(b"old")
    os.chmod(real, 0o600)
    link = tmp_path / "link.npz"
    os.symlink(real, link)
    opt, params = stepped()
    ok.save(opt, link)
    assert os.path.islink(link) and os.readlink(link) == str(real)
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o600
    other, _ = make_opt()
    ok.load(other, link)
    assert digest(other.state_dict()) == digest(opt.state_dict())
    assert sorted(os.listdir(tmp_path / "real")) == ["c.npz"]


def test_save_refuses_dangling_symlinks_and_symlinks_to_specials(tmp_path):
    opt, _ = stepped()
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(FileNotFoundError, match="symbolic link to nothing"):
        ok.save(opt, tmp_path / "dangling")
    assert not os.path.exists(tmp_path / "nowhere")
    os.symlink(os.devnull, tmp_path / "null")
    with pytest.raises(FileExistsError, match="character device"):
        ok.save(opt, tmp_path / "null")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(OSError):
        ok.save(opt, tmp_path / "loop")
    assert sorted(os.listdir(tmp_path)) == ["dangling", "loop", "null"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444, 0o755])
def test_save_keeps_the_replaced_files_permission_bits(tmp_path, mode):
    path = tmp_path / "c.npz"
    opt, _ = stepped()
    ok.save(opt, path)
    os.chmod(path, mode)
    ok.save(opt, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_new_file_gets_the_umask_default(tmp_path):
    opt, _ = stepped()
    old = os.umask(0o027)
    try:
        ok.save(opt, tmp_path / "c.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "c.npz").st_mode) == 0o640


def test_keyboard_interrupt_during_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    opt, params = stepped()
    ok.save(opt, path)
    previous = path.read_bytes()

    def interrupted(f, **members):
        f.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ok.save(opt, path)
    monkeypatch.undo()
    assert path.read_bytes() == previous and os.listdir(tmp_path) == ["c.npz"]


def test_save_path_kinds(tmp_path):
    opt, _ = stepped()
    ok.save(opt, os.fsencode(tmp_path / "b.npz"))  # bytes (a str temporary name would clash)
    name = "n" * 250 + ".npz"  # near NAME_MAX: the temporary name must stay short
    ok.save(opt, tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == sorted(["b.npz", name])
    with pytest.raises(FileNotFoundError):
        ok.save(opt, tmp_path / "no" / "dir.npz")
    with pytest.raises(ValueError, match="null"):
        ok.save(opt, str(tmp_path / "x") + "\0")
    assert sorted(os.listdir(tmp_path)) == sorted(["b.npz", name])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_save_into_read_only_directory_is_permission_error(tmp_path):
    opt, _ = stepped()
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(PermissionError):
            ok.save(opt, tmp_path / "c.npz")
    finally:
        os.chmod(tmp_path, 0o700)
