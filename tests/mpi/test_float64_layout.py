"""float64 and mixed float32/float64 parameters in optkern.distributed's layout and sharded
checkpoints, in-process (an MPI singleton, no mpiexec): each dtype's part tiles under any split
into ranges, state round-trips bit for bit in its own type, and checkpoints crafted with the
wrong dtype (arrays, manifest, a float32 checkpoint for float64 parameters and the reverse) are
refused with nothing changed. The collectives over N ranks are in mpi_float64.py. Skipped
without mpi4py."""

import json
import os

import numpy as np
import pytest

import optkern as ok

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'optkern[mpi]')")
from optkern import distributed as okd  # noqa: E402
from optkern.distributed import checkpoint as dck  # noqa: E402
from optkern.distributed._layout import Layout, flat_state, state_from_flat  # noqa: E402

from test_checkpoint_damage import refused, snapshot  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SHAPES = [(7, 5), (5,), (33,), (3,)]
GROUPS = [[0, 1], [2, 3]]
MIXED = [F64, F32, F32, F64]


def _params(dtypes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, dtypes)]


def _groups(params):
    return [{"params": [params[i] for i in g]} for g in GROUPS]


def _stepped(dtypes, cls=ok.Adam, steps=3):
    params = _params(dtypes)
    opt = cls(_groups(params), lr=1e-2)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        opt.step([rng.standard_normal(s) for s in SHAPES])  # float64 gradients for every one
    return opt


SHAPE_SETS = [
    [(1,), (17,), (16,), (3, 5)],
    [(0,), (40,), (0,), (1,)],
    [(100,), (7,), (64,), (15,), (2, 2)],
]


@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_each_part_tiles_for_any_number_of_ranges(shapes, seed):
    rng = np.random.default_rng(seed)
    dtypes = [F32 if x else F64 for x in rng.integers(0, 2, len(shapes))]
    layout = Layout([shapes[:2], shapes[2:]], dtypes)
    for n in range(1, 9):
        ranges = layout.ranges(n)
        for part in layout.parts:
            sub = part.ranges(ranges)
            assert sub[0][0] == 0 and sub[-1][1] == part.total
            assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(sub, sub[1:]))
            per = 64 // part.dtype.itemsize  # every boundary on 64 bytes (but the end)
            assert all(lo % per == 0 or lo == part.total for lo, _ in sub)
            # each element of a member lands in the range whose element range holds it
            for i, off in zip(part.members, part.offsets):
                for e in range(layout.sizes[i]):
                    r = next(
                        r for r, (lo, hi) in enumerate(ranges) if lo <= layout.offsets[i] + e < hi
                    )
                    assert sub[r][0] <= off + e < sub[r][1]


def test_one_dtype_is_the_element_layout_itself():
    for d in (F32, F64):
        layout = Layout([SHAPES[:2], SHAPES[2:]], [d] * 4)
        (part,) = layout.parts
        if d == F32:
            assert part.offsets == layout.offsets and part.total == layout.total
        assert part.ranges(layout.ranges(3))[-1][1] == part.total
    assert "dtypes" not in Layout([SHAPES]).describe()  # float32 manifests read as before
    assert Layout([SHAPES], [F64] * 4).describe()["dtypes"] == ["float64"] * 4


@pytest.mark.parametrize("dtypes", [[F64] * 4, MIXED], ids=["float64", "mixed"])
def test_flat_state_round_trips_each_dtype_in_its_own_type(dtypes):
    opt = _stepped(dtypes)
    layout = Layout.of(opt.param_groups)
    sd = opt.state_dict()
    meta, flats = flat_state(layout, sd, 0, layout.total)
    assert {k: v.dtype for k, v in flats.items()} == {
        **({"exp_avg": F32, "exp_avg_sq": F32} if F32 in dtypes else {}),
        "exp_avg.float64": F64,
        "exp_avg_sq.float64": F64,
    }
    back = state_from_flat(layout, meta, flats)
    for i, entry in sd["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert back[i][name].dtype == entry[name].dtype == dtypes[i]
            np.testing.assert_array_equal(back[i][name], entry[name])


def _write(path, opt, parts):
    from test_checkpoint_damage import write_sharded

    return write_sharded(path, opt, parts)


def _fresh(kind, dtypes):
    params = _params(dtypes, 5)
    if kind == "dp":
        return okd.DataParallel(ok.Adam(_groups(params), lr=1e-2), num_threads=None), params
    return okd.ZeroRedundancyOptimizer(ok.Adam, _groups(params), lr=1e-2, num_threads=None), params


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["dp", "zero"])
@pytest.mark.parametrize("dtypes", [[F64] * 4, MIXED], ids=["float64", "mixed"])
def test_sharded_float64_from_any_number_of_ranks_loads_exactly(tmp_path, parts, kind, dtypes):
    opt = _stepped(dtypes)
    _write(tmp_path / "ck", opt, parts)
    wrapper, _ = _fresh(kind, dtypes)
    okd.load(wrapper, tmp_path / "ck")
    got, want = wrapper.state_dict(), opt.state_dict()
    assert got["step_count"] == want["step_count"] == 3
    for i, entry in want["state"].items():
        for k, v in entry.items():
            if isinstance(v, np.ndarray):
                assert got["state"][i][k].dtype == v.dtype == dtypes[i]
            np.testing.assert_array_equal(got["state"][i][k], v)


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_save_and_load_with_one_rank_resume_bit_for_bit(tmp_path, kind):
    dtypes = MIXED
    a, pa = _fresh(kind, dtypes)
    rng = np.random.default_rng(7)
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(6)]
    for g in grads[:3]:
        a.step(g)
    okd.save(a, tmp_path / "ck")
    okd.save(a, tmp_path / "whole.npz", consolidated=True)
    saved = [p.copy() for p in pa]
    for g in grads[3:]:
        a.step(g)
    for path in ("ck", "whole.npz"):
        b, pb = _fresh(kind, dtypes)
        for p, q in zip(pb, saved):
            p[...] = q
        if kind == "zero":
            b.refresh_from_params()
        okd.load(b, tmp_path / path)
        for g in grads[3:]:
            b.step(g)
        for p, q in zip(pa, pb):
            assert p.dtype == q.dtype
            np.testing.assert_array_equal(p, q)


# -- crafted checkpoints with the wrong dtype ---------------------------------------------------


def _rewrite_shard(path, edit):
    """Rewrites every shard with ``edit(arrays) -> arrays`` and the manifest's SHA-256s to
    match (a crafted checkpoint, consistent with itself)."""
    mpath = os.path.join(path, dck.MANIFEST)
    with open(mpath) as f:
        m = json.load(f)
    for s in m["shards"]:
        file = os.path.join(path, s["file"])
        with np.load(file) as z:
            arrays = {k: z[k] for k in z.files}
        arrays = edit(arrays)
        os.unlink(file)
        dck._write_shard(file, arrays)
        s["sha256"] = {k: ok.checkpoint._sha256(a) for k, a in arrays.items()}
    with open(mpath, "w") as f:
        json.dump(m, f)


CRAFTED = {
    "float64 arrays stored as float32": (
        lambda a: {k: v.astype(np.float32) for k, v in a.items()},
        "metadata says <f8",
    ),
    "the float32 and float64 arrays swapped": (
        lambda a: {
            k: a[k + ".float64"] if k + ".float64" in a else a[k.replace(".float64", "")] for k in a
        },
        "but the metadata says",
    ),
    "float32 arrays stored as float64": (
        lambda a: {k: v.astype(np.float64) for k, v in a.items()},
        "metadata says <f4",
    ),
    "one array a float64 of half the length": (
        lambda a: {
            k: (v[: v.size // 2 * 2].view(np.float64) if v.dtype == F32 else v) for k, v in a.items()
        },
        "metadata says <f4",
    ),
}


@pytest.mark.parametrize("kind", ["dp", "zero"])
@pytest.mark.parametrize("craft", list(CRAFTED), ids=str)
def test_shard_crafted_with_the_wrong_dtype_refused(tmp_path, craft, kind):
    edit, match = CRAFTED[craft]
    _write(tmp_path / "ck", _stepped(MIXED), 2)
    _rewrite_shard(tmp_path / "ck", edit)
    wrapper, params = _fresh(kind, MIXED)
    refused(wrapper, params, tmp_path / "ck", match=match)


@pytest.mark.parametrize("kind", ["dp", "zero"])
@pytest.mark.parametrize(
    "written, loaded",
    [([F32] * 4, [F64] * 4), ([F64] * 4, [F32] * 4), (MIXED, [F64] * 4), ([F64] * 4, MIXED)],
    ids=["f32->f64", "f64->f32", "mixed->f64", "f64->mixed"],
)
def test_checkpoint_of_other_dtypes_refused_naming_them(tmp_path, kind, written, loaded):
    _write(tmp_path / "ck", _stepped(written), 2)
    wrapper, params = _fresh(kind, loaded)
    refused(wrapper, params, tmp_path / "ck", match="written for parameters of dtypes")


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["layout"].pop("dtypes"),
        lambda m: m["layout"].__setitem__("dtypes", ["float64"] * 4),
        lambda m: m["layout"].__setitem__("dtypes", ["float16", "float32", "float32", "float64"]),
        lambda m: m["layout"].__setitem__("dtypes", "float64"),
        lambda m: m["layout"].__setitem__("dtypes", ["float64", "float32", "float32"]),
    ],
    ids=["dropped", "all float64", "float16", "text", "short"],
)
@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_manifest_with_edited_dtypes_refused(tmp_path, kind, edit):
    m = _write(tmp_path / "ck", _stepped(MIXED), 3)
    edit(m)
    with open(tmp_path / "ck" / dck.MANIFEST, "w") as f:
        json.dump(m, f)
    wrapper, params = _fresh(kind, MIXED)
    refused(wrapper, params, tmp_path / "ck", match="dtypes")


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_consolidated_float64_file_into_float32_parameters_is_checked(tmp_path, kind):
    """A consolidated file is ok.save's: its loader converts a state to the parameter's type
    (as load_state_dict does), refusing values a float32 cannot hold."""
    opt = _stepped([F64] * 4)
    for s in opt.state.values():
        s["exp_avg"][...] = 1e300
    ok.save(opt, tmp_path / "big.npz")
    wrapper, params = _fresh(kind, [F32] * 4)
    before = snapshot(wrapper, params)
    with pytest.raises((ok.CheckpointError, ValueError), match="float32"):
        okd.load(wrapper, tmp_path / "big.npz")
    assert snapshot(wrapper, params) == before


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_consolidated_float32_file_loads_into_float64_parameters_converted(tmp_path, kind):
    opt = _stepped([F32] * 4)
    ok.save(opt, tmp_path / "f32.npz")
    wrapper, _ = _fresh(kind, [F64] * 4)
    okd.load(wrapper, tmp_path / "f32.npz")
    got = wrapper.state_dict()["state"]
    for i, entry in opt.state_dict()["state"].items():
        assert got[i]["exp_avg"].dtype == F64
        np.testing.assert_array_equal(got[i]["exp_avg"], entry["exp_avg"].astype(F64))
