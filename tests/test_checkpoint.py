"""optkern.save / optkern.load: round trips that continue bit for bit, atomic writes, and files
that are truncated, corrupted, of another version or for another optimizer refused with a
CheckpointError that leaves the optimizer as it was."""

import hashlib
import json
import os

import numpy as np
import pytest
from helpers import digest
from optim_db import CASES, case_id

import optkern as ok
from optkern import checkpoint

NAN = float("nan")


def make_opt(name="Adam", hp=None, seed=0, shapes=((6, 4), (9,), (1,))):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.002}]
    return getattr(ok, name)(groups, **(hp if hp is not None else {"amsgrad": True})), params


def grads(params, seed):
    rng = np.random.default_rng(100 + seed)
    return [rng.standard_normal(p.shape).astype(np.float32) for p in params]


def stepped(name="Adam", hp=None, steps=3, seed=0):
    opt, params = make_opt(name, hp, seed)
    for t in range(steps):
        opt.step(grads(params, t))
    return opt, params


def everything(opt, params):
    return digest([params, opt.state_dict()])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_round_trip_continues_bit_identically(case, tmp_path):
    name, hp = case
    a, pa = stepped(name, hp, steps=5)
    path = tmp_path / "ckpt.npz"
    ok.save(a, path)
    b, pb = make_opt(name, hp, seed=1)  # different numbers: load must restore all the state
    for p, q in zip(pb, pa):
        p[...] = q  # parameters are the model's, not the checkpoint's
    ok.load(b, path)
    assert digest(b.state_dict()) == digest(a.state_dict())
    for t in range(5, 10):
        a.step(grads(pa, t))
        b.step(grads(pb, t))
    assert digest(pa) == digest(pb)
    assert digest(a.state_dict()) == digest(b.state_dict())


def test_hyperparameters_keep_their_types(tmp_path):
    opt, params = stepped()
    extra = {
        "betas": (0.8, 0.99),
        "lr": np.float32(0.25),
        "note": "warm-up",
        "none": None,
        "nan": NAN,
        "inf": -float("inf"),
        "big": 2**70,
        "flag": np.bool_(True),
        "i64": np.int64(-3),
        "nested": {"a": (1, [2.5, None]), 7: "seven", (1, 2): [()]},
        "arr": np.array([[1, 2]], np.int16),
        "empty": [],
        "t": (),
    }
    opt.param_groups[1].update(extra)
    ok.save(opt, tmp_path / "c.npz")
    other, _ = make_opt()
    ok.load(other, tmp_path / "c.npz")
    got = other.param_groups[1]
    for key, want in extra.items():
        if key == "lr":  # a hyperparameter is stored as a Python float when it is checked
            assert type(got[key]) is float and got[key] == want
            continue
        assert type(got[key]) is type(want), key
        assert repr(got[key]) == repr(want), key
    assert got["params"][0] is other.param_groups[1]["params"][0]


def test_file_is_a_plain_npz_without_pickles(tmp_path):
    opt, _ = stepped()
    ok.save(opt, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        meta = json.loads(z["optkern_checkpoint"].tobytes())
        assert meta["format"] == "optkern-checkpoint" and meta["version"] == checkpoint.FORMAT_VERSION
        assert meta["optimizer"] == "Adam"
        assert meta["param_shapes"] == [[6, 4], [9], [1]]
        for key, spec in meta["arrays"].items():
            assert hashlib.sha256(z[key].tobytes()).hexdigest() == spec["sha256"]


def test_fresh_and_stateless_optimizers_round_trip(tmp_path):
    for name, hp in [("Adam", {}), ("SGD", {"lr": 0.1})]:
        a, pa = stepped(name, hp, steps=0 if name == "Adam" else 3)
        ok.save(a, tmp_path / "c.npz")
        b, _ = make_opt(name, hp)
        b.param_groups[0]["lr"] = 123.0
        ok.load(b, tmp_path / "c.npz")
        assert digest(b.state_dict()) == digest(a.state_dict())


def test_save_overwrites_and_keeps_the_directory_clean(tmp_path):
    opt, params = stepped()
    path = tmp_path / "c.npz"
    ok.save(opt, str(path))
    opt.step(grads(params, 9))
    ok.save(opt, path)
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]
    other, _ = make_opt()
    ok.load(other, path)
    assert other.state_dict()["state"][0]["step"] == 4


# -- atomic writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_at", ["savez", "fsync", "replace"])
def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    opt, params = stepped()
    path = tmp_path / "c.npz"
    ok.save(opt, path)
    previous = path.read_bytes()
    opt.step(grads(params, 9))

    def boom(*args, **kwargs):
        if fail_at == "savez":  # write part of the archive, then fail, like a full disk
            args[0].write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    target = {"savez": (np, "savez"), "fsync": (os, "fsync"), "replace": (os, "replace")}[fail_at]
    monkeypatch.setattr(*target, boom)
    with pytest.raises(OSError, match="No space left"):
        ok.save(opt, path)
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]  # the temporary file is gone


def test_unstorable_hyperparameter_writes_nothing(tmp_path):
    opt, _ = stepped()
    path = tmp_path / "c.npz"
    ok.save(opt, path)
    previous = path.read_bytes()
    opt.param_groups[0]["callback"] = print
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['callback'\] is a builtin_function"):
        ok.save(opt, path)
    opt.param_groups[0]["callback"] = None
    opt.param_groups[0][3] = "int key"
    with pytest.raises(TypeError, match=r"param_groups\[0\] has the key 3"):
        ok.save(opt, path)
    assert path.read_bytes() == previous and os.listdir(tmp_path) == ["c.npz"]


def test_save_and_load_refuse_non_optimizers(tmp_path):
    with pytest.raises(TypeError, match="needs an optkern optimizer"):
        ok.save({"state": {}}, tmp_path / "c.npz")
    with pytest.raises(TypeError, match="needs an optkern optimizer"):
        ok.load(None, tmp_path / "c.npz")
    assert not os.listdir(tmp_path)


# -- bad files ---------------------------------------------------------------------------------------


def saved(tmp_path):
    """A checkpoint file and an optimizer (with its own, different state) to load it into."""
    opt, _ = stepped(steps=3)
    path = tmp_path / "c.npz"
    ok.save(opt, path)
    target, params = stepped(steps=1, seed=0)
    return path, target, params


def rewrite(path, change):
    """Rewrites the archive's members through change(members: dict), keeping the metadata's own
    checksum valid, so that only the change itself is wrong."""
    with np.load(path, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
    meta = json.loads(members["optkern_checkpoint"].tobytes())
    change(members, meta)
    text = json.dumps(meta).encode()
    members["optkern_checkpoint"] = np.frombuffer(text, np.uint8)
    members["optkern_checkpoint_sha256"] = np.frombuffer(
        hashlib.sha256(text).hexdigest().encode(), np.uint8
    )
    with open(path, "wb") as f:
        np.savez(f, **members)


def assert_refused(path, target, params, pattern):
    before = everything(target, params)
    with pytest.raises(ok.CheckpointError, match=pattern):
        ok.load(target, path)
    assert everything(target, params) == before


@pytest.mark.parametrize("keep", [0, 1, 30, 200, "half", -100, -22, -1])
def test_truncated_file_refused(tmp_path, keep):
    path, target, params = saved(tmp_path)
    data = path.read_bytes()
    n = len(data) // 2 if keep == "half" else keep % len(data)
    path.write_bytes(data[:n])
    assert_refused(path, target, params, "truncated or corrupted|not an .npz")


def test_every_flipped_byte_is_refused_or_harmless(tmp_path):
    """Flip each byte of a checkpoint in turn: loading either raises CheckpointError (optimizer
    unchanged) or, where the byte is one zip ignores (a timestamp, say), loads exactly the saved
    state. It never loads something else."""
    shapes = ((3, 2), (4,), (1,))
    src, params = make_opt(shapes=shapes)
    src.step(grads(params, 0))
    path = tmp_path / "c.npz"
    ok.save(src, path)
    expected = digest(src.state_dict())
    opt, ps = make_opt(shapes=shapes, seed=1)
    data = path.read_bytes()
    refused = 0
    current = everything(opt, ps)
    with open(path, "r+b") as f:
        for i in range(len(data)):
            damaged = bytearray(data)
            damaged[i] ^= 0x5A
            f.seek(0)
            f.write(damaged)
            f.flush()
            try:
                ok.load(opt, path)
            except ok.CheckpointError:
                refused += 1
                assert everything(opt, ps) == current, f"byte {i}"
            else:
                assert digest(opt.state_dict()) == expected, f"byte {i} loaded a different state"
                current = everything(opt, ps)
    assert refused > 0.8 * len(data)


def test_array_that_fails_its_checksum_is_refused(tmp_path):
    path, target, params = saved(tmp_path)

    def change(members, meta):  # new bytes with a valid zip CRC: only the SHA-256 can tell
        members["array_1"] = members["array_1"].copy()
        members["array_1"].flat[3] += 1

    rewrite(path, change)
    assert_refused(
        path, target, params, r"array 'array_1' \(state\[0\]\['exp_avg_sq'\]\) fails its SHA-256"
    )


def test_metadata_that_fails_its_checksum_is_refused(tmp_path):
    path, target, params = saved(tmp_path)
    with np.load(path) as z:
        members = {k: z[k] for k in z.files}
    text = members["optkern_checkpoint"].tobytes().replace(b'"step": 3', b'"step": 4')
    members["optkern_checkpoint"] = np.frombuffer(text, np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **members)
    assert_refused(path, target, params, "metadata fails its SHA-256")


@pytest.mark.parametrize(
    "version, pattern",
    [
        (2, r"format version 2 \(written by optkern .*\); this optkern .* reads version 1"),
        (0, "invalid format version 0"),
        ("1", "invalid format version '1'"),
        (None, "invalid format version None"),
        (True, "invalid format version True"),
    ],
)
def test_other_format_version_refused(tmp_path, version, pattern):
    path, target, params = saved(tmp_path)
    rewrite(path, lambda members, meta: meta.__setitem__("version", version))
    assert_refused(path, target, params, pattern)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda m, meta: m.pop("array_0"), r"array entries \['array_0'\] are missing"),
        (
            lambda m, meta: m.__setitem__("array_99", np.zeros(3, np.float32)),
            r"entries the metadata does not list: \['array_99'\]",
        ),
        (
            lambda m, meta: m.__setitem__("array_0", m["array_0"].astype(np.float64)),
            r"array 'array_0' .* is <f8 \[6, 4\] but the metadata says <f4 \[6, 4\]",
        ),
        (lambda m, meta: meta.__setitem__("format", "something-else"), "not an optkern checkpoint"),
        (
            lambda m, meta: meta["state"][0][1].__setitem__("exp_avg", {"__array__": "array_1"}),
            "refers to array 'array_1', which is missing or used twice",
        ),
        (
            lambda m, meta: meta["param_groups"][0]["options"].__setitem__("lr", {"__pickle__": "x"}),
            r"param_groups\[0\]\['lr'\] holds",
        ),
        (lambda m, meta: meta.__setitem__("state", {}), "'state' is missing or not a list"),
        (
            lambda m, meta: meta["param_groups"][1]["options"].__setitem__("lr", -1.0),
            r"does not fit this optimizer: param_groups\[1\]: lr must be >= 0",
        ),
        (
            lambda m, meta: meta["state"][0][1].__setitem__("step", -2),
            r"does not fit this optimizer: state\[0\]\['step'\] must be a whole number",
        ),
    ],
)
def test_inconsistent_archive_refused(tmp_path, change, pattern):
    path, target, params = saved(tmp_path)
    rewrite(path, change)
    assert_refused(path, target, params, pattern)


def test_not_a_checkpoint_refused(tmp_path):
    _, target, params = saved(tmp_path)
    other = tmp_path / "other.npz"
    for content in [b"", b"hello", b"\x93NUMPY" + b"\0" * 100]:
        other.write_bytes(content)
        assert_refused(other, target, params, "not an .npz")
    np.savez(other, weights=np.ones(3))
    assert_refused(other, target, params, "not an optkern checkpoint")
    with pytest.raises(FileNotFoundError):
        ok.load(target, tmp_path / "missing.npz")
    with pytest.raises(IsADirectoryError if os.name == "posix" else OSError):
        ok.load(target, tmp_path)


def test_checkpoint_of_another_optimizer_refused(tmp_path):
    path, _, _ = saved(tmp_path)
    for name, shapes, pattern in [
        ("AdamW", ((6, 4), (9,), (1,)), "holds the state of a Adam optimizer; this one is a AdamW"),
        ("Adam", ((6, 4), (9,), (2,)), r"parameters of shapes \[\[6, 4\], \[9\], \[1\]\]"),
        ("Adam", ((6, 4), (9,), (1,), (1,)), "parameters of shapes"),
    ]:
        opt, params = make_opt(name, {"amsgrad": True}, shapes=shapes)
        opt.step(grads(params, 0))
        assert_refused(path, opt, params, pattern)
    opt, params = make_opt("Adam", {"amsgrad": True})
    opt.param_groups.append(opt.param_groups.pop(0))  # same shapes overall, groups swapped
    assert_refused(path, opt, params, "shapes|does not fit")


def test_save_while_another_thread_steps_writes_whole_steps(tmp_path):
    import threading

    opt, params = make_opt()
    g = grads(params, 0)
    done = threading.Event()

    def stepper():
        for _ in range(40):
            opt.step(g)
        done.set()

    t = threading.Thread(target=stepper)
    t.start()
    saves = 0
    while not done.is_set() or saves == 0:
        ok.save(opt, tmp_path / "c.npz")
        other, _ = make_opt()
        ok.load(other, tmp_path / "c.npz")
        steps = {s["step"] for s in other.state_dict()["state"].values()}
        assert len(steps) <= 1, steps
        saves += 1
    t.join()


def test_counters_survive_a_checkpoint(tmp_path):
    p = np.zeros(3, np.float32)
    opt = ok.Adam([p])
    opt.step([np.ones(3, np.float32)])
    opt.step([np.full(3, np.nan, np.float32)], skip_if_nonfinite=True)
    ok.save(opt, tmp_path / "c.npz")
    other = ok.Adam([p.copy()])
    ok.load(other, tmp_path / "c.npz")
    assert (other.step_count, other.skipped_steps) == (1, 1)
