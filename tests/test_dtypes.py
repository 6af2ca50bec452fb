"""Element types: float64 parameters, gradients of either type, groups mixing float32 and float64,
0-d arrays. Every rule and option set against its float64 reference on every ISA at a tight
tolerance, mixed groups and converted gradients bit for bit against their single-type runs,
threads bit for bit, and the Python layer's state dicts, checkpoints, clipping and FlatParams in
the parameter's type."""

import numpy as np
import pytest
from helpers import bits
from optim_db import CASES, case_id
from reference import Reference

import optkern as ok
import optkern.functional as F

ISAS = ok.available_isas()
F64_EPS = float(np.finfo(np.float64).eps)
STEPS = 60


def placed(values, dtype, misalign=1):
    """A copy of ``values`` in ``dtype`` whose data starts ``misalign`` elements past a 64-byte
    boundary (aligned to its element size, as NumPy requires)."""
    values = np.asarray(values)
    dtype = np.dtype(dtype)
    raw = np.empty(values.size * dtype.itemsize + 192, np.uint8)
    start = (-raw.ctypes.data) % 64 + misalign * dtype.itemsize
    out = raw[start : start + values.size * dtype.itemsize].view(dtype).reshape(values.shape)
    out[...] = values
    return out


def reference(name, p0, hp):
    ref = Reference(name, p0, dtype=np.float64, **hp)
    ref.machine_eps = F64_EPS  # Adafactor's eps1 = None: the parameter's dtype's epsilon
    return ref


def check_float64(opt, p, ref, rtol=1e-12, atol=1e-14):
    """float64 results against the float64 reference: the same formulas, their operations in
    torch's order or within a rounding of it, so only a few ulps apart after many steps."""
    scale = max(1.0, float(np.max(np.abs(ref.p), initial=0.0)))
    np.testing.assert_allclose(p, ref.p, rtol=rtol, atol=atol * scale, err_msg="param")
    for key, value in ref.state.items():
        if key == "step":
            assert opt.state[p]["step"] == value
            continue
        got = opt.state[p][key]
        assert np.asarray(got).dtype == np.float64 or np.isscalar(got), key
        scale = max(1.0, float(np.max(np.abs(value), initial=0.0)))
        np.testing.assert_allclose(got, value, rtol=rtol, atol=atol * scale, err_msg=key)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1023,), (37, 23)], ids=["1023", "37x23"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float64_matches_reference(case, shape, isa):
    name, hp = case
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(shape) * 0.5
    p = placed(p0, np.float64)
    opt = getattr(ok, name)([p], **hp)
    opt._isa = isa
    ref = reference(name, p0, hp)
    for _ in range(STEPS):
        g = rng.standard_normal(shape) * 0.1
        opt.step([placed(g, np.float64, misalign=3)])
        ref.step(g)
    check_float64(opt, p, ref)
    for v in opt.state[p].values() if p in opt.state else ():
        assert not isinstance(v, np.ndarray) or v.dtype == np.float64


def run(name, hp, params, grad_sets, isa=None, groups=None):
    """Steps ``optkern.<name>`` over ``params`` (one group, or the given groups of indices) with
    the gradients of ``grad_sets``; returns the bytes of every parameter and state array."""
    groups = groups or [list(range(len(params)))]
    opt = getattr(ok, name)([{"params": [params[i] for i in g]} for g in groups], **hp)
    opt._isa = isa
    order = [i for g in groups for i in g]
    for grads in grad_sets:
        opt.step([grads[i] for i in order])
    out = []
    for p in params:
        out.append(bits(p))
        for k, v in sorted(opt.state.get(p, {}).items()):
            out.append((k, bits(v) if isinstance(v, np.ndarray) else v))
    return out


SHAPES = [(33,), (70,), (5, 9), (17,)]


def mixed_inputs(seed, param_types, grad_types):
    rng = np.random.default_rng(seed)
    params = [
        placed(rng.standard_normal(s) * 0.5, t, i % 3)
        for i, (s, t) in enumerate(zip(SHAPES, param_types))
    ]
    grad_sets = [
        [
            placed(rng.standard_normal(s) * 0.1, t, (i + k) % 3)
            for i, (s, t) in enumerate(zip(SHAPES, grad_types))
        ]
        for k in range(8)
    ]
    return params, grad_sets


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_mixed_group_equals_one_group_per_array(case, isa):
    """float32 and float64 parameters in one group, with gradients of the other type for some:
    each array's result is bit-identical to running it in a group of its own (the driver picks
    the kernel and the scalars per tensor)."""
    name, hp = case
    types = [np.float32, np.float64, np.float64, np.float32]
    grads = [np.float64, np.float32, np.float64, np.float32]
    params, grad_sets = mixed_inputs(1, types, grads)
    together = run(name, hp, params, grad_sets, isa)
    params, grad_sets = mixed_inputs(1, types, grads)
    apart = run(name, hp, params, grad_sets, isa, groups=[[0], [1], [2], [3]])
    assert together == apart


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradient_of_the_other_type_is_converted_while_read(case):
    """A float64 gradient of a float32 parameter gives the bits of its float32 rounding (the
    kernel rounds to nearest even as NumPy's astype does); a float32 gradient of a float64
    parameter those of its exact float64 value. No copy is made: the gradients are only read."""
    name, hp = case
    for ptype, gtype in ((np.float32, np.float64), (np.float64, np.float32)):
        params, grad_sets = mixed_inputs(2, [ptype] * 4, [gtype] * 4)
        before = [bits(g) for gs in grad_sets for g in gs]
        given = run(name, hp, params, grad_sets)
        assert [bits(g) for gs in grad_sets for g in gs] == before
        params, grad_sets = mixed_inputs(2, [ptype] * 4, [gtype] * 4)
        converted = [[g.astype(ptype) for g in gs] for gs in grad_sets]
        assert given == run(name, hp, params, converted), (ptype, gtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_threads_do_not_change_float64_or_mixed_results(case, isa):
    name, hp = case
    out = []
    for threads in (1, 2):
        ok.set_num_threads(threads)
        ok._core._testing.set_min_elements_per_thread(16)
        params, grad_sets = mixed_inputs(
            3, [np.float64, np.float32, np.float64, np.float64], [np.float64] * 4
        )
        out.append(run(name, hp, params, grad_sets, isa))
    assert out[0] == out[1]


def test_float64_scalars_are_checked_in_float64():
    """A per-step scalar is refused where the compute type cannot hold it: lr / (1 - beta1) with
    lr = 3e38 overflows float32, not float64."""
    g32, g64 = np.ones(4, np.float32), np.ones(4)
    p32 = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="which float32 cannot hold"):
        ok.Adam([p32], lr=3e38).step([g32])
    assert not p32.any()
    p64 = np.zeros(4)
    ok.Adam([p64], lr=3e38).step([g64])
    np.testing.assert_allclose(p64, -3e38 / (1 + 1e-8), rtol=1e-12)  # lr * m / (sqrt(v) + eps)


def test_float64_adafactor_eps1_none_is_float64_epsilon():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 5))
    b = a.copy()
    oa = ok.Adafactor([a], eps=(None, 1e-3))
    ob = ok.Adafactor([b], eps=(F64_EPS, 1e-3))
    for _ in range(4):
        g = rng.standard_normal((6, 5)) * 1e-9  # small: eps1 floors the estimate
        oa.step([g])
        ob.step([g])
    assert bits(a) == bits(b)
    assert oa.param_groups[0]["eps"] == (None, 1e-3)


# -- 0-d arrays: one element ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_dimensional_arrays_step_as_one_element(case, dtype):
    name, hp = case
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal()
    scalar = np.array(x0, dtype)
    vector = np.array([x0], dtype)
    os_, ov = getattr(ok, name)([scalar], **hp), getattr(ok, name)([vector], **hp)
    for _ in range(5):
        g = rng.standard_normal()
        os_.step([np.array(g, dtype)])
        ov.step([np.array([g], dtype)])
    assert scalar.shape == () and bits(scalar) == bits(vector)
    for k, v in ov.state.get(vector, {}).items():
        if isinstance(v, np.ndarray):
            assert os_.state[scalar][k].shape == () and bits(os_.state[scalar][k]) == bits(v), k


def test_zero_dimensional_functional_and_norms():
    p, g = np.array(1.0), np.array(0.5)
    F.sgd_([p], [g], lr=0.1)
    assert p == 0.95
    m, v = np.array(0.0), np.array(0.0)
    F.adam_([p], [g], [m], [v], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    assert m == pytest.approx(0.05) and v == pytest.approx(0.00025)
    assert ok.grad_norms([np.array(-3.0), np.array([4.0], np.float32)]).tolist() == [3.0, 4.0]


# -- norms and clipping ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, 0.5, float("inf")])
def test_norms_of_mixed_lists(norm_type):
    rng = np.random.default_rng(6)
    grads = [
        placed(rng.standard_normal(1000), np.float64),
        placed(rng.standard_normal((7, 9)), np.float32, 2),
        placed(rng.standard_normal(5000), np.float64, 0),
        np.array(2.5),
    ]
    as64 = [g.astype(np.float64).ravel() for g in grads]
    per = ok.grad_norms(grads, norm_type)
    want = [np.linalg.norm(g, norm_type) for g in as64]
    np.testing.assert_allclose(per, want, rtol=1e-12)
    total = ok.clip_grad_norm_(grads, 1.0, norm_type)
    assert total == pytest.approx(np.linalg.norm(np.concatenate(as64), norm_type), rel=1e-12)
    coef = 1.0 / (total + 1e-6)
    for g, g0 in zip(grads, as64):
        expect = (g0.astype(g.dtype) * g.dtype.type(coef)).astype(g.dtype)
        np.testing.assert_array_equal(g.ravel(), expect)


def test_clip_grad_value_of_mixed_lists():
    grads = [np.array([-2.0, 0.1, np.nan, 3.0]), np.array([5.0, -0.25], np.float32)]
    ok.clip_grad_value_(grads, 0.5)
    np.testing.assert_array_equal(grads[0], [-0.5, 0.1, np.nan, 0.5])
    np.testing.assert_array_equal(grads[1], np.array([0.5, -0.25], np.float32))
    assert grads[0].dtype == np.float64 and grads[1].dtype == np.float32


# -- state: in the parameter's type, through state dicts and checkpoints ---------------------------


def test_state_dicts_keep_float64_and_loading_float32_state_converts(tmp_path):
    rng = np.random.default_rng(7)
    p64, p32 = rng.standard_normal(10), rng.standard_normal(6).astype(np.float32)
    opt = ok.Adam([p64, p32], amsgrad=True)
    for _ in range(3):
        opt.step([rng.standard_normal(10), rng.standard_normal(6)])
    sd = opt.state_dict()
    dtypes = [{v.dtype for v in sd["state"][i].values() if isinstance(v, np.ndarray)} for i in (0, 1)]
    assert dtypes == [{np.dtype(np.float64)}, {np.dtype(np.float32)}]
    # float32 state (from an optimizer of float32 parameters, or torch) into float64 parameters
    sd32 = {
        "state": {
            i: {k: v.astype(np.float32) if isinstance(v, np.ndarray) else v for k, v in s.items()}
            for i, s in sd["state"].items()
        },
        "param_groups": sd["param_groups"],
    }
    q64, q32 = p64.copy(), p32.copy()
    other = ok.Adam([q64, q32], amsgrad=True)
    other.load_state_dict(sd32)
    for k, v in other.state[q64].items():
        if isinstance(v, np.ndarray):
            assert v.dtype == np.float64
            np.testing.assert_array_equal(v, sd32["state"][0][k].astype(np.float64))
    # a checkpoint keeps the float64 state bit for bit
    ok.save(opt, tmp_path / "c.npz")
    r64, r32 = p64.copy(), p32.copy()
    back = ok.Adam([r64, r32], amsgrad=True)
    ok.load(back, tmp_path / "c.npz")
    for p, q in ((p64, r64), (p32, r32)):
        for k, v in opt.state[p].items():
            if isinstance(v, np.ndarray):
                assert back.state[q][k].dtype == p.dtype and bits(back.state[q][k]) == bits(v)
    g = [rng.standard_normal(10), rng.standard_normal(6).astype(np.float32)]
    opt.step(g)
    back.step(g)
    assert bits(p64) == bits(r64) and bits(p32) == bits(r32)


def test_flat_params_of_float64():
    flat = ok.FlatParams([(3, 4), (5,)], dtype=np.float64)
    assert flat.flat.dtype == np.float64 and flat.flat.ctypes.data % 64 == 0
    assert all(v.dtype == np.float64 and v.ctypes.data % 64 == 0 for v in flat)
    grads = flat.zeros_like()
    assert grads.flat.dtype == np.float64
    grads.flat[...] = 1.0
    ok.SGD([flat.flat], lr=0.5).step([grads.flat])
    assert np.all(flat[0] == -0.5)
    copy = ok.FlatParams.from_arrays([np.ones(2, np.float32)], dtype=np.float64)
    assert copy.flat.dtype == np.float64
    with pytest.raises(TypeError, match="float32 or float64"):
        ok.FlatParams([(2,)], dtype=np.float16)


# -- what is refused -------------------------------------------------------------------------------


def test_a_state_of_the_other_type_is_refused_naming_it():
    p, g = np.zeros(3), np.ones(3)
    m, v = np.zeros(3, np.float32), np.zeros(3)
    with pytest.raises(TypeError, match=r"exp_avgs\[0\] must be a float64 array like params\[0\]"):
        F.adam_([p], [g], [m], [v], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    assert not p.any() and not v.any()


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.complex128, ">f8"])
def test_other_dtypes_are_refused(dtype):
    p = np.zeros(3, dtype)
    with pytest.raises(TypeError, match=r"params\[0\] must be a float32 or float64 array"):
        ok.SGD([p], lr=0.1)
    q = np.zeros(3)
    with pytest.raises(TypeError, match=r"grads\[0\] must be a float32 or float64 array"):
        ok.SGD([q], lr=0.1).step([np.ones(3, dtype)])
    assert not q.any()


def test_float64_array_aligned_to_4_bytes_only_is_refused():
    raw = np.zeros(5 * 8 + 8, np.uint8)
    start = (-raw.ctypes.data) % 8 + 4
    p = raw[start : start + 32].view(np.float64)
    assert not p.flags.aligned
    with pytest.raises(ValueError, match=r"params\[0\] is not aligned to 8 bytes"):
        ok.SGD([p], lr=0.1)


def test_overlap_is_found_across_element_sizes():
    """A float32 gradient over the upper half of a float64 parameter's bytes shares its memory."""
    block = np.zeros(8)
    p = block[:4]
    g = block.view(np.float32)[6:10]  # bytes 24..40: p's last element and the next one
    with pytest.raises(ValueError, match="shares memory"):
        F.sgd_([p], [g], lr=0.1)
    assert not block.any()


def test_pickled_float64_optimizer_steps_as_the_original():
    import pickle

    rng = np.random.default_rng(8)
    params = [rng.standard_normal(5), rng.standard_normal(3).astype(np.float32)]
    opt = ok.RMSprop(params, centered=True, momentum=0.9)
    opt.step([rng.standard_normal(5), rng.standard_normal(3)])
    clone_params, clone = pickle.loads(pickle.dumps((params, opt)))
    for p in clone_params:
        for v in clone.state[p].values():
            assert not isinstance(v, np.ndarray) or v.dtype == p.dtype
    g = [rng.standard_normal(5), rng.standard_normal(3).astype(np.float32)]
    opt.step(g)
    clone.step(g)
    assert [bits(p) for p in params] == [bits(p) for p in clone_params]


@pytest.mark.parametrize("name", ["ScheduleFreeAdamW", "ScheduleFreeSGD"])
def test_schedule_free_train_and_eval_in_float64(name):
    rng = np.random.default_rng(9)
    p0 = rng.standard_normal(33)
    p = p0.copy()
    opt = getattr(ok, name)([p])
    ref = reference(name, p0, {})
    for _ in range(6):
        g = rng.standard_normal(33) * 0.1
        opt.step([g])
        ref.step(g)
    opt.eval()
    ref.eval()
    np.testing.assert_allclose(p, ref.p, rtol=1e-12, atol=1e-14)
    opt.train()
    ref.train()
    np.testing.assert_allclose(p, ref.p, rtol=1e-12, atol=1e-14)


def test_functional_sgd_creates_buffers_in_each_parameters_dtype():
    params = [np.ones(3), np.ones(2, np.float32), np.ones(4)]
    bufs = [None, None, np.zeros(4)]
    F.sgd_(params, [np.ones(3, np.float32), np.ones(2), np.ones(4)], bufs, lr=0.1, momentum=0.9)
    assert [b.dtype for b in bufs] == [np.float64, np.float32, np.float64]
    assert bufs[0].tolist() == [1.0] * 3 and bufs[2].tolist() == [1.0] * 4
