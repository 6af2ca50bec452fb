"""ndarray subclasses and odd array layouts as parameters, gradients
and loaded state. A subclass whose data is the whole story (np.matrix, memmap, recarray, a
subclass with hooks) is updated like a plain array, in place, without its Python hooks running;
a masked array is refused (its mask would be ignored), and so are read-only, non-contiguous,
byte-swapped, misaligned and non-float32 buffers that are written. Refusals change nothing."""

import numpy as np
import pytest
import optim_db as db
from helpers import digest, unaligned

import optkern as ok

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

#: Every class of the optimizer database, with the options under which it keeps every state.
OPTIONS = dict(db.richest())
CLASSES = list(OPTIONS)


def build(kind, params):
    return getattr(ok, kind)(params, **OPTIONS[kind])


def snap(opt, arrays):
    return digest([arrays, opt.state_dict()])


def refused(opt, params, grads, exc):
    """step(grads) raises exc and leaves params, grads and the optimizer as they were."""
    before = snap(opt, [params, [g for g in grads if g is not None]])
    with pytest.raises(exc):
        opt.step(grads)
    assert snap(opt, [params, [g for g in grads if g is not None]]) == before


def masked(values, mask=None):
    values = np.asarray(values, np.float32)
    return np.ma.MaskedArray(values, mask=np.zeros(values.shape, bool) if mask is None else mask)


class Hooked(np.ndarray):
    """A subclass whose Python hooks count their calls: the kernels must not need them."""

    calls = {"finalize": 0, "wrap": 0, "setitem": 0}

    def __array_finalize__(self, obj):
        Hooked.calls["finalize"] += 1

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        Hooked.calls["wrap"] += 1
        return super().__array_wrap__(arr, context, return_scalar)

    def __setitem__(self, key, value):
        Hooked.calls["setitem"] += 1
        super().__setitem__(key, value)


def plain_result(kind, values, grads, steps=3):
    p = np.array(values, np.float32)
    opt = build(kind, [p])
    for _ in range(steps):
        opt.step([np.array(grads, np.float32)])
    return p


# -- masked arrays: refused everywhere (finding: the C++ check accepted them) -------------------


@pytest.mark.parametrize("kind", CLASSES)
def test_masked_param_refused_at_construction(kind):
    with pytest.raises(TypeError, match="masked"):
        build(kind, [masked(np.ones(4), [0, 1, 0, 0])])


@pytest.mark.parametrize("kind", CLASSES)
def test_masked_grad_refused_nothing_changed(kind):
    p = np.ones(4, np.float32)
    opt = build(kind, [p])
    opt.step([np.full(4, 0.5, np.float32)])
    refused(opt, p, [masked(np.ones(4), [0, 1, 0, 0])], TypeError)


@pytest.mark.parametrize("mask", [[0, 0, 0, 0], [1, 1, 1, 1], np.ma.nomask])
def test_masked_grad_refused_whatever_the_mask(mask):
    p = np.ones(4, np.float32)
    opt = ok.Adam([p])
    g = np.ma.MaskedArray(np.ones(4, np.float32), mask=mask)
    refused(opt, p, [g], TypeError)


def test_masked_param_refused_by_add_param_group():
    opt = ok.Adam([np.ones(4, np.float32)])
    with pytest.raises(TypeError, match="masked"):
        opt.add_param_group({"params": [masked(np.ones(3))]})
    assert len(opt.param_groups) == 1


def test_masked_subclass_refused():
    class MyMasked(np.ma.MaskedArray):
        pass

    with pytest.raises(TypeError, match="masked"):
        ok.Adam([MyMasked(np.ones(4, np.float32))])


def test_masked_grad_in_functional_api_refused():
    p, m, v = (np.zeros(4, np.float32) for _ in range(3))
    with pytest.raises(TypeError, match="masked"):
        ok.functional.adam_(
            [p], [masked(np.ones(4))], [m], [v], step=[1], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8
        )
    assert not p.any() and not m.any() and not v.any()


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
def test_masked_state_refused_by_load_state_dict(name):
    p = np.ones(4, np.float32)
    opt = ok.Adam([p])
    opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    before = snap(opt, [p])
    sd["state"][0][name] = np.ma.MaskedArray(np.full(4, 9.0), mask=[1, 0, 0, 0])
    with pytest.raises(TypeError, match="masked"):
        opt.load_state_dict(sd)
    assert snap(opt, [p]) == before


# -- subclasses whose data is the whole story: updated like plain arrays -------------------------


@pytest.mark.parametrize("kind", CLASSES)
def test_matrix_param_updated_like_plain(kind):
    p = np.asmatrix(np.arange(4, dtype=np.float32).reshape(2, 2))
    opt = build(kind, [p])
    for _ in range(3):
        opt.step([np.asmatrix(np.full((2, 2), 0.5, np.float32))])
    expect = plain_result(kind, np.arange(4).reshape(2, 2), np.full((2, 2), 0.5))
    assert type(p) is np.matrix and np.array_equal(np.asarray(p), expect)


@pytest.mark.parametrize("kind", CLASSES)
def test_recarray_param_updated_like_plain(kind):
    p = np.arange(6, dtype=np.float32).view(np.recarray)
    opt = build(kind, [p])
    for _ in range(3):
        opt.step([np.full(6, 0.25, np.float32)])
    assert np.array_equal(np.asarray(p), plain_result(kind, np.arange(6), np.full(6, 0.25)))


@pytest.mark.parametrize("kind", CLASSES)
def test_memmap_param_updated_in_place_and_in_the_file(kind, tmp_path):
    f = tmp_path / "p.bin"
    p = np.memmap(f, np.float32, "w+", shape=(8,))
    p[:] = np.arange(8)
    opt = build(kind, [p])
    for _ in range(3):
        opt.step([np.ones(8, np.float32)])
    p.flush()
    expect = plain_result(kind, np.arange(8), np.ones(8))
    assert np.array_equal(np.fromfile(f, np.float32), expect)


def test_readonly_memmap_param_refused(tmp_path):
    f = tmp_path / "p.bin"
    np.arange(4, dtype=np.float32).tofile(f)
    with pytest.raises(ValueError, match="read-only"):
        ok.Adam([np.memmap(f, np.float32, "r", shape=(4,))])


def test_readonly_memmap_grad_accepted(tmp_path):
    f = tmp_path / "g.bin"
    np.ones(4, np.float32).tofile(f)
    p = np.zeros(4, np.float32)
    ok.SGD([p], lr=0.5).step([np.memmap(f, np.float32, "r", shape=(4,))])
    assert np.array_equal(p, np.full(4, -0.5, np.float32))


@pytest.mark.parametrize("kind", CLASSES)
def test_hooked_subclass_updated_without_running_hooks(kind):
    p = np.arange(5, dtype=np.float32).view(Hooked)
    g = np.full(5, 0.5, np.float32).view(Hooked)
    opt = build(kind, [p])
    Hooked.calls.update(finalize=0, wrap=0, setitem=0)
    for _ in range(3):
        opt.step([g])
    assert Hooked.calls == {"finalize": 0, "wrap": 0, "setitem": 0}
    assert np.array_equal(np.asarray(p), plain_result(kind, np.arange(5), np.full(5, 0.5)))


@pytest.mark.parametrize("kind", CLASSES)
def test_state_of_a_subclass_param_is_a_plain_array(kind):
    p = np.asmatrix(np.ones((2, 3), np.float32))
    opt = build(kind, [p])
    opt.step([np.ones((2, 3), np.float32)])
    rule = db.entry(kind).rule
    for name, value in opt.state[p].items():
        if isinstance(value, np.ndarray):
            shape = rule.state(name).shape_for(p.shape)
            assert type(value) is np.ndarray and value.shape == shape, name


@pytest.mark.parametrize(
    "make", [np.asmatrix, lambda a: a.view(Hooked), lambda a: a.view(np.recarray)]
)
def test_subclass_state_loaded_as_plain_float32(make):
    p = np.ones((2, 2), np.float32)
    opt = ok.Adam([p])
    opt.step([np.ones((2, 2), np.float32)])
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = make(np.full((2, 2), 0.25, np.float32))
    opt.load_state_dict(sd)
    got = opt.state[p]["exp_avg"]
    assert type(got) is np.ndarray and got.dtype == np.float32
    assert np.array_equal(got, np.full((2, 2), 0.25, np.float32))


# -- layouts that cannot be written in place ------------------------------------------------------


def _readonly():
    a = np.ones(4, np.float32)
    a.flags.writeable = False
    return a


def _bigstride():
    base = np.zeros(4 * 1024, np.float32)
    return np.lib.stride_tricks.as_strided(base, shape=(4,), strides=(4096,))


LAYOUTS = {
    "readonly": (_readonly, ValueError),
    "strided": (lambda: np.ones(8, np.float32)[::2], ValueError),
    "reversed": (lambda: np.ones(4, np.float32)[::-1], ValueError),
    "fortran": (lambda: np.asfortranarray(np.ones((3, 4), np.float32)), ValueError),
    "transposed": (lambda: np.ones((3, 4), np.float32).T, ValueError),
    "huge-stride": (_bigstride, ValueError),
    "broadcast": (lambda: np.broadcast_to(np.ones(1, np.float32), (4,)), ValueError),
    "byteswapped": (
        lambda: np.ones(4, np.dtype(">f4") if np.little_endian else np.dtype("<f4")),
        TypeError,
    ),
    "misaligned": (lambda: np.frombuffer(bytearray(20), np.float32, count=4, offset=1), ValueError),
    # (float64 arrays and 0-d arrays are valid parameters and gradients: tests/test_dtypes.py)
    "byteswapped float64": (
        lambda: np.ones(4, np.dtype(">f8") if np.little_endian else np.dtype("<f8")),
        TypeError,
    ),
    "float16": (lambda: np.ones(4, np.float16), TypeError),
    "int32": (lambda: np.ones(4, np.int32), TypeError),
    "bool": (lambda: np.ones(4, bool), TypeError),
    "complex64": (lambda: np.ones(4, np.complex64), TypeError),
    "object": (lambda: np.array([1.0, 2.0], object), TypeError),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unwritable_layout_refused_as_param(layout):
    make, exc = LAYOUTS[layout]
    try:
        p = make()
    except ValueError:  # a misaligned view NumPy itself refuses on this platform
        pytest.skip("NumPy refuses to build this layout here")
    with pytest.raises(exc):
        ok.Adam([p])


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "readonly"])
def test_unreadable_layout_refused_as_grad(layout):
    make, exc = LAYOUTS[layout]
    g = make()
    p = np.ones(g.shape if g.ndim else (1,), np.float32)
    opt = ok.Adam([p])
    refused(opt, p, [g], exc)


def test_readonly_grad_accepted():
    p = np.zeros(4, np.float32)
    ok.SGD([p], lr=1.0).step([_readonly()])
    assert np.array_equal(p, -np.ones(4, np.float32))


def test_misaligned_but_4_byte_aligned_param_accepted():
    p = unaligned(np.arange(7, dtype=np.float32), misalign=4)
    ok.SGD([p], lr=1.0).step([np.ones(7, np.float32)])
    assert np.array_equal(p, np.arange(7, dtype=np.float32) - 1)


@pytest.mark.parametrize("shape", [(0,), (0, 10), (10, 0), (3, 0, 2)])
@pytest.mark.parametrize("kind", CLASSES)
def test_zero_size_params_step_and_round_trip(kind, shape):
    z, p = np.zeros(shape, np.float32), np.ones(3, np.float32)
    opt = build(kind, [z, p])
    for _ in range(2):
        opt.step([np.zeros(shape, np.float32), np.ones(3, np.float32)])
    sd = opt.state_dict()
    opt2 = build(kind, [np.zeros(shape, np.float32), np.ones(3, np.float32)])
    opt2.load_state_dict(sd)
    assert digest([opt2.state_dict()]) == digest([sd])


# -- odd layouts of loaded state: copied into the group's own block -------------------------------

LOADABLE = {
    "readonly": _readonly,
    "strided": lambda: np.full(8, 0.5, np.float32)[::2],
    "fortran-1d": lambda: np.asfortranarray(np.full(4, 0.5, np.float32)),
    "byteswapped": lambda: np.full(4, 0.5, np.dtype(">f4") if np.little_endian else "<f4"),
    "misaligned": lambda: unaligned(np.full(4, 0.5), misalign=4),
    "float64": lambda: np.full(4, 0.5),
    "float16": lambda: np.full(4, 0.5, np.float16),
    "int64": lambda: np.full(4, 2, np.int64),
    "list": lambda: [0.5, 0.5, 0.5, 0.5],
    "memmap-like": lambda: np.full(4, 0.5, np.float32).view(Hooked),
}


@pytest.mark.parametrize("layout", LOADABLE)
def test_odd_state_layout_loaded_as_private_float32_copy(layout):
    p = np.ones(4, np.float32)
    opt = ok.Adam([p])
    opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    src = LOADABLE[layout]()
    sd["state"][0]["exp_avg"] = src
    opt.load_state_dict(sd)
    got = opt.state[p]["exp_avg"]
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
    assert np.array_equal(got, np.asarray(src, np.float32))
    if isinstance(src, np.ndarray):
        assert not np.shares_memory(got, src)
    opt.step([np.ones(4, np.float32)])  # and it steps


NOT_LOADABLE = {
    "complex": (lambda: np.ones(4, np.complex64), TypeError),
    "bool": (lambda: np.ones(4, bool), TypeError),
    "object": (lambda: np.array([object()] * 4), TypeError),
    "str": (lambda: np.array(["a"] * 4), TypeError),
    "wrong-shape": (lambda: np.ones(5, np.float32), ValueError),
    "matrix-2d": (lambda: np.asmatrix(np.ones(4, np.float32)), ValueError),  # (1, 4)
    "0-d": (lambda: np.float32(1.0), ValueError),
    "structured": (lambda: np.zeros(4, [("a", np.float32)]), TypeError),
}


@pytest.mark.parametrize("layout", NOT_LOADABLE)
def test_unusable_state_refused_nothing_changed(layout):
    make, exc = NOT_LOADABLE[layout]
    p = np.ones(4, np.float32)
    opt = ok.Adam([p])
    opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    before = snap(opt, [p])
    sd["state"][0]["exp_avg_sq"] = make()
    with pytest.raises(exc):
        opt.load_state_dict(sd)
    assert snap(opt, [p]) == before
