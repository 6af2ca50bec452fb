"""File-system oddities for ok.save and ok.load. Symbolic links
(chains, loops, links to directories and FIFOs), path objects of every kind (bytes, non-UTF-8
bytes, os.PathLike returning junk or raising, NUL bytes), files damaged byte by byte or replaced
while being loaded, zero-size arrays, crafted shapes and sizes, and the permission bits kept.
Whatever is refused leaves the optimizer, the target path and the directory as they were."""

import os
import pathlib
import stat

import numpy as np
import pytest
import optim_db as db
from test_checkpoint import everything, grads, rewrite, saved, stepped

import optkern as ok
from optkern import checkpoint


def listing(directory):
    return sorted(os.listdir(directory))


class FakePath:
    """An os.PathLike whose __fspath__ returns whatever it was given (or raises it)."""

    def __init__(self, value):
        self.value = value

    def __fspath__(self):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


# -- symbolic links ----------------------------------------------------------------------------------


def test_save_through_a_chain_of_links_replaces_the_final_file(tmp_path):
    opt, _ = stepped()
    real = tmp_path / "real.npz"
    real.write_bytes(b"old")
    (tmp_path / "l1").symlink_to(real)
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    ok.save(opt, tmp_path / "l2")
    assert (tmp_path / "l2").is_symlink() and (tmp_path / "l1").is_symlink()
    target, _ = stepped(steps=1)
    ok.load(target, real)
    assert target.step_count == opt.step_count == 3


def test_save_through_a_relative_link_into_another_directory(tmp_path):
    opt, _ = stepped()
    (tmp_path / "d").mkdir()
    real = tmp_path / "d" / "real.npz"
    real.write_bytes(b"old")
    os.symlink(os.path.join("d", "real.npz"), tmp_path / "link")
    ok.save(opt, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and real.read_bytes()[:2] == b"PK"
    assert listing(tmp_path / "d") == ["real.npz"]  # the temporary file was next to the target


def test_save_through_a_symlink_loop_refused(tmp_path):
    opt, _ = stepped()
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(OSError):
        ok.save(opt, tmp_path / "a")
    assert listing(tmp_path) == ["a", "b"]


def test_load_through_a_symlink_loop_is_an_oserror(tmp_path):
    target, params = stepped(steps=1)
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    before = everything(target, params)
    with pytest.raises(OSError):
        ok.load(target, tmp_path / "a")
    assert everything(target, params) == before


def test_save_through_a_link_to_a_directory_refused(tmp_path):
    opt, _ = stepped()
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    with pytest.raises(IsADirectoryError):
        ok.save(opt, tmp_path / "link")
    assert listing(tmp_path / "dir") == [] and (tmp_path / "link").is_symlink()


def test_save_through_a_link_to_a_fifo_refused(tmp_path):
    opt, _ = stepped()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    with pytest.raises(FileExistsError):
        ok.save(opt, tmp_path / "link")
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    assert listing(tmp_path) == ["fifo", "link"]


def test_load_through_a_link_to_a_fifo_refused_without_blocking(tmp_path):
    target, params = stepped(steps=1)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    before = everything(target, params)
    with pytest.raises(ok.CheckpointError, match="FIFO"):
        ok.load(target, tmp_path / "link")
    assert everything(target, params) == before


def test_load_through_a_dangling_link(tmp_path):
    target, params = stepped(steps=1)
    (tmp_path / "link").symlink_to(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        ok.load(target, tmp_path / "link")


def test_load_through_a_link_to_a_checkpoint(tmp_path):
    path, target, params = saved(tmp_path)
    (tmp_path / "link").symlink_to(path)
    ok.load(target, tmp_path / "link")
    target.step(grads(params, 9))


def test_load_through_a_link_to_a_directory(tmp_path):
    target, _ = stepped(steps=1)
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    with pytest.raises(IsADirectoryError):
        ok.load(target, tmp_path / "link")


def test_save_over_a_hard_link_replaces_only_that_name(tmp_path):
    """Documented behaviour: the file is replaced by rename, so another hard link to the old
    file keeps the old contents (as with any atomic save)."""
    opt, _ = stepped()
    (tmp_path / "a.npz").write_bytes(b"old")
    os.link(tmp_path / "a.npz", tmp_path / "b.npz")
    ok.save(opt, tmp_path / "a.npz")
    assert (tmp_path / "b.npz").read_bytes() == b"old"
    assert (tmp_path / "a.npz").read_bytes()[:2] == b"PK"


# -- path objects --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        str,
        pathlib.Path,
        pathlib.PurePosixPath,
        lambda p: os.fsencode(str(p)),
        lambda p: FakePath(str(p)),
        lambda p: FakePath(os.fsencode(str(p))),
    ],
    ids=["str", "Path", "PurePosixPath", "bytes", "PathLike-str", "PathLike-bytes"],
)
def test_every_path_kind_round_trips(tmp_path, make):
    opt, params = stepped()
    ok.save(opt, make(tmp_path / "c.npz"))
    target, tparams = stepped(steps=1)
    ok.load(target, make(tmp_path / "c.npz"))
    assert everything(target, tparams) != everything(*stepped(steps=1))
    assert target.state_dict()["step_count"] == opt.state_dict()["step_count"]


def test_non_utf8_bytes_path_round_trips(tmp_path):
    opt, _ = stepped()
    path = os.fsencode(str(tmp_path)) + b"/ck\xff\xfe.npz"
    ok.save(opt, path)
    assert os.path.exists(path)
    target, _ = stepped(steps=1)
    ok.load(target, path)
    ok.load(target, os.fsdecode(path))  # the surrogate-escaped str names the same file
    assert target.step_count == opt.step_count


@pytest.mark.parametrize(
    "junk",
    [None, 5, 1.5, ["a"], object(), b"x\x00y", "x\x00y"],
    ids=["None", "int", "float", "list", "object", "bytes-NUL", "str-NUL"],
)
def test_pathlike_returning_junk_refused(tmp_path, junk):
    opt, params = stepped()
    before = everything(opt, params)
    with pytest.raises((TypeError, ValueError)):
        ok.save(opt, FakePath(junk))
    with pytest.raises((TypeError, ValueError)):
        ok.load(opt, FakePath(junk))
    assert everything(opt, params) == before
    assert listing(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_pathlike_raising_propagates_before_anything(tmp_path, exc):
    opt, params = stepped()
    before = everything(opt, params)
    with pytest.raises(type(exc)):
        ok.save(opt, FakePath(exc))
    with pytest.raises(type(exc)):
        ok.load(opt, FakePath(exc))
    assert everything(opt, params) == before


@pytest.mark.parametrize("path", ["a\x00b.npz", b"a\x00b.npz"], ids=["str", "bytes"])
def test_nul_in_path_is_valueerror(tmp_path, path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt, params = stepped()
    with pytest.raises(ValueError):
        ok.save(opt, path)
    with pytest.raises(ValueError):
        ok.load(opt, path)
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    "path", [123, 1.0, None, ["c.npz"], object()], ids=["int", "float", "None", "list", "object"]
)
def test_non_path_objects_are_typeerror(tmp_path, path):
    opt, _ = stepped()
    with pytest.raises(TypeError):
        ok.save(opt, path)
    with pytest.raises(TypeError):
        ok.load(opt, path)


def test_save_into_a_missing_directory_leaves_nothing(tmp_path):
    opt, _ = stepped()
    with pytest.raises(FileNotFoundError):
        ok.save(opt, tmp_path / "no" / "such" / "c.npz")
    assert listing(tmp_path) == []


def test_save_to_a_path_with_a_trailing_slash_refused(tmp_path):
    opt, _ = stepped()
    with pytest.raises(OSError):
        ok.save(opt, str(tmp_path / "c.npz") + "/")
    assert listing(tmp_path) == []


def test_save_to_a_path_whose_parent_is_a_file_refused(tmp_path):
    opt, _ = stepped()
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        ok.save(opt, tmp_path / "f" / "c.npz")
    assert listing(tmp_path) == ["f"]


def test_save_with_a_name_at_name_max(tmp_path):
    opt, _ = stepped()
    name = "c" * 251 + ".npz"
    ok.save(opt, tmp_path / name)
    assert listing(tmp_path) == [name]


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/full", "/dev/urandom"])
def test_save_and_load_refuse_more_devices(special):
    if not os.path.exists(special):
        pytest.skip(f"no {special}")
    opt, params = stepped()
    before = everything(opt, params)
    with pytest.raises(FileExistsError):
        ok.save(opt, special)
    with pytest.raises(ok.CheckpointError):
        ok.load(opt, special)
    assert stat.S_ISCHR(os.stat(special).st_mode)
    assert everything(opt, params) == before


# -- damaged or replaced files ---------------------------------------------------------------------


@pytest.mark.parametrize("where", [0, 2, 10, 40, 0.25, 0.5, 0.75, -30, -10, -2])
def test_one_flipped_byte_refused_or_harmless(tmp_path, where):
    path, target, params = saved(tmp_path)
    data = bytearray(path.read_bytes())
    i = int(len(data) * where) if isinstance(where, float) else where
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    before = everything(target, params)
    try:
        ok.load(target, path)
    except ok.CheckpointError:
        assert everything(target, params) == before
    else:  # a byte no check covers (zip padding, a comment): the state is the saved one
        target.step(grads(params, 7))


@pytest.mark.parametrize("extra", [b"\x00", b"garbage" * 100])
def test_bytes_appended_to_a_checkpoint(tmp_path, extra):
    path, target, params = saved(tmp_path)
    path.write_bytes(path.read_bytes() + extra)
    try:
        ok.load(target, path)
    except ok.CheckpointError:
        pass
    target.step(grads(params, 7))


def test_file_overwritten_in_place_while_loading_refused(tmp_path, monkeypatch):
    """Rewritten in place (same inode): what is read is no checkpoint any more; refused, nothing
    changed."""
    path, target, params = saved(tmp_path)
    real_read = checkpoint._read

    def overwritten_midway(f, limits, cls):
        path.write_bytes(b"not a checkpoint at all")  # another process rewrites the file
        return real_read(f, limits, cls)

    monkeypatch.setattr(checkpoint, "_read", overwritten_midway)
    before = everything(target, params)
    with pytest.raises(ok.CheckpointError):
        ok.load(target, path)
    assert everything(target, params) == before


def test_file_renamed_over_while_loading_reads_the_opened_file(tmp_path, monkeypatch):
    path, target, params = saved(tmp_path)
    real_read = checkpoint._read

    def renamed_midway(f, limits, cls):
        (tmp_path / "junk").write_bytes(b"junk")
        os.replace(tmp_path / "junk", path)
        return real_read(f, limits, cls)

    monkeypatch.setattr(checkpoint, "_read", renamed_midway)
    ok.load(target, path)
    assert target.step_count == 3


def test_file_truncated_while_loading_refused(tmp_path, monkeypatch):
    path, target, params = saved(tmp_path)
    real_read = checkpoint._read

    def truncated_midway(f, limits, cls):
        os.truncate(path, 100)
        return real_read(f, limits, cls)

    monkeypatch.setattr(checkpoint, "_read", truncated_midway)
    before = everything(target, params)
    with pytest.raises(ok.CheckpointError):
        ok.load(target, path)
    assert everything(target, params) == before


# -- zero-size arrays (finding: save raised TypeError from memoryview.cast) -----------------------


@pytest.mark.parametrize("shape", [(0, 10), (10, 0), (0,), (2, 0, 3)])
@pytest.mark.parametrize("kind", db.NAMES)
def test_zero_size_arrays_saved_and_loaded(tmp_path, kind, shape):
    def build():
        ps = [np.zeros(shape, np.float32), np.ones(3, np.float32)]
        return getattr(ok, kind)(ps, lr=0.01), ps

    opt, ps = build()
    for _ in range(2):
        opt.step([np.zeros(shape, np.float32), np.ones(3, np.float32)])
    ok.save(opt, tmp_path / "z.npz")
    target, tps = build()
    ok.load(target, tmp_path / "z.npz")
    assert everything(target, ps) == everything(opt, ps)
    target.step([np.zeros(shape, np.float32), np.ones(3, np.float32)])


# -- crafted sizes in the metadata ----------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [[2**40], [2**62, 2**62], [-1], [0], [6, 4, 1], [24], [6.0, 4.0], [True, 4], "6,4", None]
)
def test_array_spec_with_a_crafted_shape_refused(tmp_path, shape):
    path, target, params = saved(tmp_path)

    def change(members, meta):
        meta["arrays"]["array_0"]["shape"] = shape

    rewrite(path, change)
    before = everything(target, params)
    with pytest.raises(ok.CheckpointError):
        ok.load(target, path)
    assert everything(target, params) == before


@pytest.mark.parametrize(
    "dtype", ["|O", "<c8", "<U4", "|V4", "|b1", "<M8[s]", "<f16", "f4,f4", "(2,)f4", 5, None]
)
def test_array_spec_with_a_crafted_dtype_refused(tmp_path, dtype):
    path, target, params = saved(tmp_path)

    def change(members, meta):
        meta["arrays"]["array_0"]["dtype"] = dtype

    rewrite(path, change)
    before = everything(target, params)
    with pytest.raises(ok.CheckpointError):
        ok.load(target, path)
    assert everything(target, params) == before


# -- permission bits ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o400, 0o444, 0o604, 0o660, 0o700, 0o755])
def test_replaced_file_keeps_odd_permission_bits(tmp_path, mode):
    opt, _ = stepped()
    path = tmp_path / "c.npz"
    path.write_bytes(b"old")
    os.chmod(path, mode)
    ok.save(opt, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_permission_bits_kept_through_a_link(tmp_path):
    opt, _ = stepped()
    real = tmp_path / "real.npz"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    (tmp_path / "link").symlink_to(real)
    ok.save(opt, tmp_path / "link")
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o640


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o000])
def test_new_file_mode_follows_the_umask(tmp_path, umask):
    opt, _ = stepped()
    old = os.umask(umask)
    try:
        ok.save(opt, tmp_path / "c.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "c.npz").st_mode) == 0o666 & ~umask


def test_failed_save_leaves_no_temporary_file(tmp_path):
    opt, params = stepped()
    opt.param_groups[0]["note"] = lambda: None  # cannot be stored
    with pytest.raises(TypeError):
        ok.save(opt, tmp_path / "c.npz")
    assert listing(tmp_path) == []
