"""Every kind of checkpoint damage, for both loaders: ``optkern.distributed.load`` of a sharded
directory (written here as 1 to 4 ranks would write it) and of a consolidated file, and
``ok.load`` of the same file. Each damaged checkpoint is refused with an error naming the file,
without hanging (a FIFO, even without a timeout), without inflating more than the layout
allows, and with nothing changed. In-process (an MPI singleton, no mpiexec); skipped without
mpi4py."""

import contextlib
import json
import os
import signal
import tracemalloc
import zipfile

import numpy as np
import pytest

import optkern as ok

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'optkern[mpi]')")
from optkern import distributed as okd  # noqa: E402
from optkern.distributed import checkpoint as dck  # noqa: E402
from optkern.distributed._layout import Layout, flat_state  # noqa: E402

SHAPES = [(7, 5), (5,), (33,)]
GROUPS = [[0, 1], [2]]  # two groups, so the layout has padding and two group ranges


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _groups(params, **hyper):
    return [{"params": [params[i] for i in g], **hyper} for g in GROUPS]


def _stepped(cls=ok.Adam, steps=3, **hyper):
    params = _params()
    opt = cls(_groups(params), lr=1e-2, **hyper)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        opt.step([rng.standard_normal(s).astype(np.float32) for s in SHAPES])
    return opt


def write_sharded(path, opt, parts):
    """The directory ``okd.save`` writes for ``opt``'s state from ``parts`` ranks."""
    os.makedirs(path, exist_ok=True)
    layout = Layout.of(opt.param_groups)
    sd = opt.state_dict()
    shards = []
    meta = None
    for rank, (lo, hi) in enumerate(layout.ranges(parts)):
        meta, flats = flat_state(layout, sd, lo, hi)
        name = f"shard-00000001-{rank:05d}.npz"
        dck._write_shard(os.path.join(path, name), flats)
        shards.append(
            {
                "file": name,
                "start": lo,
                "stop": hi,
                "sha256": {n: ok.checkpoint._sha256(a) for n, a in flats.items()},
            }
        )
    manifest = {
        "format": dck.FORMAT,
        "version": dck.VERSION,
        "generation": 1,
        "optimizer": type(opt).__name__,
        "optkern_version": ok.__version__,
        "world_size": parts,
        "layout": layout.describe(),
        "param_groups": [
            {k: ok.checkpoint._encode(v, k) for k, v in g.items() if k != "params"}
            for g in opt.param_groups
        ],
        "groups_state": meta,
        "step_count": opt.step_count,
        "skipped_steps": opt.skipped_steps,
        "shards": shards,
    }
    with open(os.path.join(path, dck.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return manifest


def fresh(kind, cls=ok.Adam):
    params = _params(5)
    if kind == "dp":
        return okd.DataParallel(cls(_groups(params), lr=1e-2), num_threads=None), params
    return okd.ZeroRedundancyOptimizer(cls, _groups(params), lr=1e-2, num_threads=None), params


def snapshot(wrapper, params):
    sd = wrapper.state_dict()
    flat = []
    for i in sorted(sd["state"]):
        for k in sorted(sd["state"][i]):
            v = sd["state"][i][k]
            flat.append((i, k, v.tobytes() if isinstance(v, np.ndarray) else repr(v)))
    groups = [repr(sorted((k, repr(v)) for k, v in g.items())) for g in sd["param_groups"]]
    return flat, groups, sd["step_count"], [p.tobytes() for p in params]


@contextlib.contextmanager
def no_hang(seconds=20):
    def fail(*_):
        raise TimeoutError(f"the load blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(wrapper, params, path, errors=(ok.CheckpointError, OSError), match=None, peak=None):
    """Loads ``path`` into ``wrapper`` expecting a refusal; checks nothing changed (and, with
    ``peak``, that the attempt allocated at most that many bytes)."""
    before = snapshot(wrapper, params)
    tracemalloc.start()
    try:
        with no_hang(), pytest.raises(errors) as info:
            okd.load(wrapper, path)
        top = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert snapshot(wrapper, params) == before
    if match is not None:
        assert match in str(info.value), str(info.value)
    if peak is not None:
        assert top < peak, top
    return info.value


# -- a good checkpoint loads, from any number of writers ------------------------------------------


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_sharded_from_any_number_of_ranks_loads_exactly(tmp_path, parts, kind):
    opt = _stepped()
    write_sharded(tmp_path / "ck", opt, parts)
    wrapper, _ = fresh(kind)
    okd.load(wrapper, tmp_path / "ck")
    got, want = wrapper.state_dict(), opt.state_dict()
    assert got["step_count"] == want["step_count"] == 3
    for i, entry in want["state"].items():
        for k, v in entry.items():
            np.testing.assert_array_equal(got["state"][i][k], v)


# -- the manifest ---------------------------------------------------------------------------------


def _edit(field, value):
    def edit(m):
        if value is _DELETE:
            del m[field]
        else:
            m[field] = value

    return edit


_DELETE = object()


def _shard_edit(index, field, value):
    def edit(m):
        if value is _DELETE:
            del m["shards"][index][field]
        else:
            m["shards"][index][field] = value

    return edit


def _groups_state_edit(gi, field, value):
    def edit(m):
        m["groups_state"][gi][field] = value

    return edit


def _group_edit(gi, field, value):
    def edit(m):
        m["param_groups"][gi][field] = value

    return edit


def _drop_shard(index):
    def edit(m):
        del m["shards"][index]

    return edit


def _stretch(index, by):
    def edit(m):
        m["shards"][index]["stop"] += by

    return edit


MANIFEST_DAMAGE = {
    "not a mapping": lambda m: m.clear() or m.update({"x": [1]}),
    "format missing": _edit("format", _DELETE),
    "format wrong": _edit("format", "optkern-checkpoint"),
    "version 2": _edit("version", 2),
    "version text": _edit("version", "1"),
    "optimizer other": _edit("optimizer", "SGD"),
    "optimizer not text": _edit("optimizer", ["Adam"]),
    "layout shapes": lambda m: m["layout"].__setitem__("shapes", [[5, 7], [5], [33]]),
    "layout groups": lambda m: m["layout"].__setitem__("group_of", [0, 0, 0]),
    "layout total": lambda m: m["layout"].__setitem__("total", 10**12),
    "layout missing": _edit("layout", _DELETE),
    "param_groups missing": _edit("param_groups", _DELETE),
    "param_groups one": lambda m: m["param_groups"].pop(),
    "param_groups not dicts": _edit("param_groups", [1, 2]),
    "param_groups with params": _group_edit(0, "params", [0, 1]),
    "lr negative": _group_edit(0, "lr", -1.0),
    "lr text": _group_edit(0, "lr", "0.01"),
    "lr unknown tag": _group_edit(0, "lr", {"__float__": "1e-3"}),
    "lr dict tag": _group_edit(1, "lr", {"__evil__": 1}),
    "betas out of range": _group_edit(0, "betas", {"__tuple__": [1.5, 0.999]}),
    "groups_state missing": _edit("groups_state", _DELETE),
    "groups_state short": lambda m: m["groups_state"].pop(),
    "has_state text": _groups_state_edit(0, "has_state", "yes"),
    "names unknown": _groups_state_edit(0, "names", ["exp_avg", "secret"]),
    "names duplicated": _groups_state_edit(0, "names", ["exp_avg", "exp_avg"]),
    "names not a list": _groups_state_edit(0, "names", "exp_avg"),
    "names without state": lambda m: m["groups_state"][0].update(has_state=False),
    "step negative": _groups_state_edit(0, "step", -3),
    "step fraction": _groups_state_edit(0, "step", 2.5),
    "step huge": _groups_state_edit(0, "step", 2**60),
    "step bool": _groups_state_edit(1, "step", True),
    "numbers unknown": _groups_state_edit(0, "numbers", {"mu_product": 0.5}),
    "step_count negative": _edit("step_count", -1),
    "step_count text": _edit("step_count", "3"),
    "step_count missing": _edit("step_count", _DELETE),
    "step_count huge": _edit("step_count", 2**60),
    "skipped_steps fraction": _edit("skipped_steps", 0.5),
    "shards empty": _edit("shards", []),
    "shards not a list": _edit("shards", {"file": "x"}),
    "shard not a mapping": lambda m: m["shards"].__setitem__(0, "shard-00000001-00000.npz"),
    "file parent": _shard_edit(0, "file", "../shard-00000001-00000.npz"),
    "file absolute": _shard_edit(0, "file", "/etc/passwd"),
    "file subdirectory": _shard_edit(0, "file", "sub/shard-00000001-00000.npz"),
    "file other name": _shard_edit(0, "file", "manifest.json"),
    "file not text": _shard_edit(0, "file", 7),
    "file repeated": lambda m: m["shards"][1].__setitem__("file", m["shards"][0]["file"]),
    "start text": _shard_edit(0, "start", "0"),
    "start negative": _shard_edit(0, "start", -16),
    "stop past the layout": _shard_edit(-1, "stop", 10**9),
    "start after stop": lambda m: m["shards"][0].update(start=16, stop=0),
    "a gap": _drop_shard(1),
    "the first missing": _drop_shard(0),
    "the last missing": _drop_shard(-1),
    "an overlap": _stretch(0, 16),
    "short of the end": _stretch(-1, -1),
    "a shard twice": lambda m: m["shards"].append(
        dict(m["shards"][1], file="shard-00000001-00009.npz")
    ),
    "sha256 missing": _shard_edit(0, "sha256", _DELETE),
    "sha256 short": lambda m: m["shards"][0]["sha256"].__setitem__("exp_avg", "ab" * 16),
    "sha256 extra": lambda m: m["shards"][0]["sha256"].__setitem__("secret", "0" * 64),
    "sha256 of another": lambda m: m["shards"][0]["sha256"].__setitem__(
        "exp_avg", m["shards"][0]["sha256"]["exp_avg_sq"]
    ),
}


@pytest.mark.parametrize("kind", ["dp", "zero"])
@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE), ids=str)
def test_damaged_manifest_refused_naming_the_file(tmp_path, damage, kind):
    opt = _stepped()
    ck = tmp_path / "ck"
    manifest = write_sharded(ck, opt, 3)
    MANIFEST_DAMAGE[damage](manifest)
    (ck / dck.MANIFEST).write_text(json.dumps(manifest))
    wrapper, params = fresh(kind)
    err = refused(wrapper, params, ck)
    assert str(ck) in str(err)


MANIFEST_FILES = {
    "empty": b"",
    "not utf-8": b"\xff\xfe{",
    "not json": b"{format: 1}",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "a list": b"[]",
    "NaN": b'{"format": NaN}',
}


@pytest.mark.parametrize("kind", ["dp", "zero"])
@pytest.mark.parametrize("content", list(MANIFEST_FILES), ids=str)
def test_unreadable_manifest_refused(tmp_path, content, kind):
    ck = tmp_path / "ck"
    write_sharded(ck, _stepped(), 2)
    (ck / dck.MANIFEST).write_bytes(MANIFEST_FILES[content])
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, match=str(ck))


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_huge_manifest_refused_unread(tmp_path, kind):
    ck = tmp_path / "ck"
    write_sharded(ck, _stepped(), 2)
    with open(ck / dck.MANIFEST, "ab") as f:
        f.truncate(2**34)  # sparse: 16 GiB that cost no disk
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, match="more than", peak=2**20)


@pytest.mark.parametrize("kind", ["dp", "zero"])
@pytest.mark.parametrize("what", ["manifest", "shard"])
def test_fifo_refused_without_blocking_and_without_timeout(tmp_path, what, kind, monkeypatch):
    monkeypatch.delenv(okd.TIMEOUT_ENV, raising=False)
    ck = tmp_path / "ck"
    manifest = write_sharded(ck, _stepped(), 2)
    target = ck / (dck.MANIFEST if what == "manifest" else manifest["shards"][0]["file"])
    target.unlink()
    os.mkfifo(target)
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, match="FIFO")


@pytest.mark.parametrize("kind", ["dp", "zero"])
@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_shard_linked_to_a_device_refused(tmp_path, special, kind):
    ck = tmp_path / "ck"
    manifest = write_sharded(ck, _stepped(), 2)
    shard = ck / manifest["shards"][1]["file"]
    shard.unlink()
    shard.symlink_to(special)
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, match="character device")


@pytest.mark.parametrize("kind", ["dp", "zero"])
@pytest.mark.parametrize("what", ["manifest", "shard"])
def test_missing_or_directory_file_is_an_oserror(tmp_path, what, kind):
    ck = tmp_path / "ck"
    manifest = write_sharded(ck, _stepped(), 2)
    target = ck / (dck.MANIFEST if what == "manifest" else manifest["shards"][0]["file"])
    target.unlink()
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, errors=FileNotFoundError)
    target.mkdir()
    refused(wrapper, params, ck, errors=IsADirectoryError)


# -- the shards -----------------------------------------------------------------------------------


def _members(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def _write_members(path, members, method=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _npy(array):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


def _replace_member(name, make):
    def edit(path):
        members = _members(path)
        members[name] = make(members[name])
        _write_members(path, members)

    return edit


def _flip_last_byte(data):
    return data[:-1] + bytes([data[-1] ^ 0x40])


SHARD_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "a bit flipped": lambda p: p.write_bytes(_flip_data(p.read_bytes())),
    "a member missing": lambda p: _write_members(p, {"exp_avg.npy": _members(p)["exp_avg.npy"]}),
    "a member extra": lambda p: _write_members(p, {**_members(p), "extra.npy": _npy(np.zeros(3))}),
    "a member not .npy": lambda p: _write_members(p, {**_members(p), "notes.txt": b"hi"}),
    "a directory member": lambda p: _write_members(p, {**_members(p), "d/": b""}),
    "float64 member": _replace_member("exp_avg.npy", lambda d: _npy(np.zeros(_length(d)))),
    "member too short": _replace_member(
        "exp_avg.npy", lambda d: _npy(np.zeros(_length(d) - 1, np.float32))
    ),
    "member 2-D": _replace_member(
        "exp_avg.npy", lambda d: _npy(np.zeros((1, _length(d)), np.float32))
    ),
    "object member": _replace_member("exp_avg.npy", lambda d: _npy(np.array([{"a": 1}], object))),
    "fortran member": _replace_member(
        "exp_avg.npy", lambda d: _npy(np.asfortranarray(np.zeros((2, 2), np.float32)))
    ),
    "data swapped between arrays": lambda p: _write_members(
        p,
        {
            "exp_avg.npy": _members(p)["exp_avg_sq.npy"],
            "exp_avg_sq.npy": _members(p)["exp_avg.npy"],
        },
    ),
    "deflated": lambda p: _write_members(p, _members(p), zipfile.ZIP_DEFLATED),
    "bzip2": lambda p: _write_members(p, _members(p), zipfile.ZIP_BZIP2),
    "encrypted flag": lambda p: p.write_bytes(_set_encrypted(p.read_bytes())),
}
#: damage a load survives: the same arrays, stored differently
HARMLESS = {"deflated"}


def _length(npy):
    import io

    buf = io.BytesIO(npy)
    np.lib.format.read_magic(buf)
    return np.lib.format.read_array_header_1_0(buf)[0][0]


def _flip_data(data):
    # a byte inside the first member's array data (past its .npy header), not the zip structure
    at = data.find(b"\x93NUMPY") + 200
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _set_encrypted(data):
    buf = bytearray(data)
    at = buf.find(b"PK\x01\x02")
    buf[at + 8] |= 1
    at = buf.find(b"PK\x03\x04")
    buf[at + 6] |= 1
    return bytes(buf)


@pytest.mark.parametrize("kind", ["dp", "zero"])
@pytest.mark.parametrize("damage", list(SHARD_DAMAGE), ids=str)
def test_damaged_shard_refused_naming_it(tmp_path, damage, kind):
    ck = tmp_path / "ck"
    manifest = write_sharded(ck, _stepped(), 3)
    shard = ck / manifest["shards"][1]["file"]  # the middle one: every rank layout reads it
    SHARD_DAMAGE[damage](shard)
    wrapper, params = fresh(kind)
    if damage in HARMLESS:
        okd.load(wrapper, ck)
        return
    err = refused(wrapper, params, ck)
    assert shard.name in str(err), str(err)


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_shard_member_declaring_a_gigabyte_is_refused_before_inflating(tmp_path, kind):
    ck = tmp_path / "ck"
    manifest = write_sharded(ck, _stepped(), 2)
    shard = ck / manifest["shards"][0]["file"]
    members = _members(shard)
    header = members["exp_avg.npy"][:128]
    members["exp_avg.npy"] = header + bytes(2**28)  # 256 MiB of zeros: a 2^26-float claim
    _write_members(shard, members, zipfile.ZIP_DEFLATED)
    assert shard.stat().st_size < 2**20  # a small file...
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, match="more than", peak=8 * 2**20)  # ...never inflated


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_shard_member_lying_about_its_size_is_read_bounded(tmp_path, kind):
    ck = tmp_path / "ck"
    manifest = write_sharded(ck, _stepped(), 2)
    shard = ck / manifest["shards"][0]["file"]
    members = _members(shard)
    members["exp_avg.npy"] = members["exp_avg.npy"][:128] + bytes(2**28)
    _write_members(shard, members, zipfile.ZIP_DEFLATED)
    shard.write_bytes(_patch_declared(shard.read_bytes(), b"exp_avg.npy", 1024))
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, peak=8 * 2**20)


def _patch_declared(data, name, size):
    buf = bytearray(data)
    for sig, name_at, len_at, size_at in [
        (b"PK\x03\x04", 30, 26, 22),
        (b"PK\x01\x02", 46, 28, 24),
    ]:
        at = 0
        while (at := buf.find(sig, at)) >= 0:
            n = int.from_bytes(buf[at + len_at : at + len_at + 2], "little")
            if bytes(buf[at + name_at : at + name_at + n]) == name:
                buf[at + size_at : at + size_at + 4] = size.to_bytes(4, "little")
            at += 4
    return bytes(buf)


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_huge_sparse_shard_refused_unread(tmp_path, kind):
    ck = tmp_path / "ck"
    manifest = write_sharded(ck, _stepped(), 2)
    with open(ck / manifest["shards"][0]["file"], "ab") as f:
        f.truncate(2**33)
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, match="more than", peak=2**20)


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_shard_swapped_for_another_ranks_is_refused(tmp_path, kind):
    ck = tmp_path / "ck"
    manifest = write_sharded(ck, _stepped(), 3)
    a, b = (ck / manifest["shards"][i]["file"] for i in (0, 2))
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck)


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_shard_from_another_generation_is_refused(tmp_path, kind):
    ck = tmp_path / "ck"
    write_sharded(ck / "old", _stepped(steps=2), 2)
    manifest = write_sharded(ck, _stepped(steps=3), 2)
    name = manifest["shards"][0]["file"]
    (ck / name).write_bytes((ck / "old" / name).read_bytes())
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, match="SHA-256")


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_state_of_another_class_refused(tmp_path, kind):
    ck = tmp_path / "ck"
    write_sharded(ck, _stepped(ok.AdamW), 2)
    wrapper, params = fresh(kind)
    refused(wrapper, params, ck, match="AdamW")


# -- the consolidated file, through both loaders --------------------------------------------------


def _consolidated(tmp_path):
    path = tmp_path / "whole.npz"
    ok.save(_stepped(), path)
    return path


FILE_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "empty": lambda p: p.write_bytes(b""),
    "a bit flipped": lambda p: p.write_bytes(_flip_data(p.read_bytes())),
    "not a zip": lambda p: p.write_bytes(b"PK not really" * 100),
    "huge and sparse": lambda p: os.truncate(p, 2**33),
    "a fifo": lambda p: (p.unlink(), os.mkfifo(p)),
    "/dev/zero": lambda p: (p.unlink(), p.symlink_to("/dev/zero")),
    "a member extra": lambda p: _write_members(p, {**_members(p), "x.npy": _npy(np.zeros(2))}),
    "metadata swapped": lambda p: _write_members(
        p, {**_members(p), "optkern_checkpoint_sha256.npy": _npy(np.zeros(64, np.uint8))}
    ),
}


def _load_with(loader, path):
    if loader == "ok.load":
        params = _params(5)
        opt = ok.Adam(_groups(params), lr=1e-2)
        before = (repr(opt.state_dict()), [p.tobytes() for p in params])
        with no_hang(), pytest.raises((ok.CheckpointError, OSError)) as info:
            ok.load(opt, path)
        assert (repr(opt.state_dict()), [p.tobytes() for p in params]) == before
        return info.value
    wrapper, params = fresh(loader)
    return refused(wrapper, params, path)


@pytest.mark.parametrize("loader", ["ok.load", "dp", "zero"])
@pytest.mark.parametrize("damage", list(FILE_DAMAGE), ids=str)
def test_damaged_consolidated_file_refused_by_both_loaders(tmp_path, damage, loader):
    path = _consolidated(tmp_path)
    FILE_DAMAGE[damage](path)
    err = _load_with(loader, path)
    assert str(path) in str(err) or isinstance(err, OSError)


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_good_consolidated_file_loads_into_both_wrappers(tmp_path, kind):
    path = _consolidated(tmp_path)
    wrapper, _ = fresh(kind)
    okd.load(wrapper, path)
    got, want = wrapper.state_dict(), _stepped().state_dict()
    for i, entry in want["state"].items():
        for k, v in entry.items():
            np.testing.assert_array_equal(got["state"][i][k], v)


# -- saving ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_save_that_fails_leaves_the_previous_checkpoint(tmp_path, kind, monkeypatch):
    wrapper, params = fresh(kind)
    wrapper.step([np.ones(s, np.float32) for s in SHAPES])
    ck = tmp_path / "ck"
    okd.save(wrapper, ck)
    before = sorted(os.listdir(ck))
    wrapper.step([np.ones(s, np.float32) for s in SHAPES])

    def full_disk(path, arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dck, "_write_shard", full_disk)
    with pytest.raises(OSError, match="No space"):
        okd.save(wrapper, ck)
    monkeypatch.undo()
    assert sorted(os.listdir(ck)) == before
    other, _ = fresh(kind)
    okd.load(other, ck)
    assert other.state_dict()["step_count"] == 1


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_save_onto_a_file_path_refused(tmp_path, kind):
    wrapper, _ = fresh(kind)
    wrapper.step([np.ones(s, np.float32) for s in SHAPES])
    path = tmp_path / "file"
    path.write_bytes(b"keep me")
    with pytest.raises((OSError, ok.CheckpointError)):
        okd.save(wrapper, path)
    assert path.read_bytes() == b"keep me"


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_save_after_a_damaged_manifest_takes_a_new_generation(tmp_path, kind):
    wrapper, _ = fresh(kind)
    wrapper.step([np.ones(s, np.float32) for s in SHAPES])
    ck = tmp_path / "ck"
    okd.save(wrapper, ck)
    (ck / dck.MANIFEST).write_text("{broken")
    okd.save(wrapper, ck)
    m = json.loads((ck / dck.MANIFEST).read_text())
    assert m["generation"] == 2
    assert sorted(os.listdir(ck)) == [dck.MANIFEST, "shard-00000002-00000.npz"]
    other, _ = fresh(kind)
    okd.load(other, ck)


# -- state dicts that do not fit: nothing changes ---------------------------------------------------


def _partial_state_dict():
    """A state dict in which some parameters of a group have state and others not (a step that
    left one out), which ZeRO's element-wise slices cannot hold."""
    params = _params()
    opt = ok.Adam(_groups(params), lr=1e-2)
    opt.step([np.ones(s, np.float32) if i != 1 else None for i, s in enumerate(SHAPES)])
    return opt.state_dict()


def test_zero_load_state_dict_that_cannot_shard_changes_nothing():
    zero, params = fresh("zero")
    zero.step([np.ones(s, np.float32) for s in SHAPES])
    sd = _partial_state_dict()
    sd["param_groups"][0]["lr"] = 0.5  # a change that must not be half-applied
    before = snapshot(zero, params)
    with pytest.raises(ValueError, match="some parameters have optimizer state"):
        zero.load_state_dict(sd)
    assert snapshot(zero, params) == before
    assert zero.param_groups[0]["lr"] == 1e-2
    assert len(zero.optimizer.state) == 0  # the state-less optimizer holds no state


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_load_state_dict_with_a_bad_last_group_changes_nothing(kind):
    wrapper, params = fresh(kind)
    wrapper.step([np.ones(s, np.float32) for s in SHAPES])
    sd = _stepped().state_dict()
    sd["param_groups"][1]["betas"] = (0.9, 1.5)
    before = snapshot(wrapper, params)
    with pytest.raises(ValueError):
        wrapper.load_state_dict(sd)
    assert snapshot(wrapper, params) == before


def test_zero_with_named_parameters_steps_saves_and_loads(tmp_path):
    params = _params()
    named = [
        {"params": [("w", params[0]), ("b", params[1])]},
        {"params": [("v", params[2])], "lr": 1e-3},
    ]
    zero = okd.ZeroRedundancyOptimizer(ok.Adam, named, lr=1e-2, num_threads=None)
    zero.step([np.ones(s, np.float32) for s in SHAPES])
    sd = zero.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["w", "b"]
    okd.save(zero, tmp_path / "ck")
    other = okd.ZeroRedundancyOptimizer(
        ok.Adam,
        [{"params": [("w", _params()[0]), ("b", _params()[1])]}, {"params": [("v", _params()[2])]}],
        lr=1e-2,
        num_threads=None,
    )
    okd.load(other, tmp_path / "ck")
    assert other.param_groups[1]["lr"] == 1e-3
    assert other.state_dict()["param_groups"][1]["param_names"] == ["v"]
    other.load_state_dict(sd)
