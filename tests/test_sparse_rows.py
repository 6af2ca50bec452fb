"""Row-sparse gradients (optkern.RowSparse) for SparseAdam, Adagrad and SGD: against float64
references of torch's sparse semantics (tests/reference_algos.py) with duplicate indices, the
row grouping, bit-identical results for any thread count and ISA split, only the listed rows
touched, and bad input refused before anything changes."""

import numpy as np
import pytest

import optkern as ok
from helpers import digest
from reference_algos import SparseAdagradRef, SparseAdamRef, SparseSGDRef, coalesce

ISAS = ok.available_isas()

CASES = [
    ("SparseAdam", SparseAdamRef, dict(lr=0.01)),
    ("SparseAdam", SparseAdamRef, dict(lr=0.003, betas=(0.8, 0.99), eps=1e-4, maximize=True)),
    ("Adagrad", SparseAdagradRef, dict(lr=0.1)),
    (
        "Adagrad",
        SparseAdagradRef,
        dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-6, maximize=True),
    ),
    ("SGD", SparseSGDRef, dict(lr=0.1)),
    ("SGD", SparseSGDRef, dict(lr=0.05, maximize=True)),
    ("SGD", SparseSGDRef, dict(lr=0.05, momentum=0.9)),
    ("SGD", SparseSGDRef, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", SparseSGDRef, dict(lr=0.05, momentum=0.5, dampening=0.3)),
]
IDS = [f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)]


def batches(rows, row_shape, steps, seed, most=40):
    """Row-sparse gradients with many duplicates (indices from a small range), some empty."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        n = 0 if k % 17 == 5 else int(rng.integers(1, most))
        idx = rng.integers(0, rows, n).astype(np.int64)
        vals = rng.standard_normal((n, *row_shape)).astype(np.float32)
        out.append((idx, vals))
    return out


@pytest.mark.parametrize("name, ref_cls, kw", CASES, ids=IDS)
@pytest.mark.parametrize("shape", [(50, 7), (200,), (30, 4, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_float64_reference_after_100_steps(name, ref_cls, kw, shape, dtype):
    # float64 parameters (and states) take float32 row values: only the rows' sums of
    # duplicates are float32 there, hence the tighter tolerance.
    tol = 1e-5 if dtype == np.float32 else 1e-6
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(shape).astype(dtype)
    ref = ref_cls(p0, **kw)
    p = p0.copy()
    opt = getattr(ok, name)([p], **kw)
    for idx, vals in batches(shape[0], shape[1:], 100, seed=2):
        opt.step([ok.RowSparse(idx, vals)])
        ref.step(idx, vals)
    np.testing.assert_allclose(p, ref.p, rtol=tol, atol=tol)
    st = opt.state.get_by_id(p) or {}  # SGD without momentum keeps none
    for k, v in (ref.state() if hasattr(ref, "state") else {}).items():
        if k == "step":
            assert st["step"] == v
        else:
            assert st[k].dtype == dtype
            np.testing.assert_allclose(st[k], v, rtol=tol, atol=tol / 10)


@pytest.mark.parametrize("name, kw", [("SparseAdam", {}), ("Adagrad", {}), ("SGD", {"lr": 0.1})])
def test_only_listed_rows_are_touched(name, kw):
    rng = np.random.default_rng(3)
    p = rng.standard_normal((1000, 5)).astype(np.float32)
    before = p.copy()
    opt = getattr(ok, name)([p], **kw)
    for _ in range(3):
        opt.step([ok.RowSparse(np.array([7, 900, 7, 3]), np.ones((4, 5), np.float32))])
    moved = np.flatnonzero(np.any(p != before, axis=1))
    assert moved.tolist() == [3, 7, 900]
    for key, v in (opt.state.get_by_id(p) or {}).items():
        if isinstance(v, np.ndarray) and key != "sum":
            assert np.flatnonzero(np.any(v != 0, axis=1)).tolist() == [3, 7, 900]


def test_sparse_adam_dense_gradient_is_every_row():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((20, 3)).astype(np.float32)
    b = a.copy()
    oa, ob = ok.SparseAdam([a], lr=0.01), ok.SparseAdam([b], lr=0.01)
    for _ in range(5):
        g = rng.standard_normal((20, 3)).astype(np.float32)
        oa.step([g])
        ob.step([ok.RowSparse(np.arange(20), g)])
    np.testing.assert_array_equal(a, b)


def test_mixed_dense_and_sparse_in_one_group_and_across_groups():
    rng = np.random.default_rng(5)
    table = rng.standard_normal((100, 8)).astype(np.float32)
    dense = rng.standard_normal((8, 3)).astype(np.float32)
    bias = rng.standard_normal(100).astype(np.float32)
    ref_t, ref_b = SparseAdagradRef(table, lr=0.1), SparseAdagradRef(bias, lr=0.1)
    d64 = dense.astype(np.float64)
    s64 = np.zeros_like(d64)
    opt = ok.Adagrad([{"params": [table, dense]}, {"params": [bias]}], lr=0.1)
    for t, (idx, vals) in enumerate(batches(100, (8,), 20, seed=6)):
        gd = rng.standard_normal((8, 3)).astype(np.float32)
        gb = rng.standard_normal(len(idx)).astype(np.float32)
        opt.step([ok.RowSparse(idx, vals), gd, ok.RowSparse(idx, gb)])
        ref_t.step(idx, vals)
        ref_b.step(idx, gb)
        s64 += gd.astype(np.float64) ** 2
        d64 -= 0.1 * gd / (np.sqrt(s64) + 1e-10)
    np.testing.assert_allclose(table, ref_t.p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias, ref_b.p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense, d64, rtol=1e-5, atol=1e-5)


def test_clipping_uses_the_coalesced_gradient():
    # the norm of a RowSparse is its dense gradient's (duplicates summed first)
    p = np.zeros((10, 2), np.float32)
    q = p.copy()
    a, b = ok.SGD([p], lr=1.0), ok.SGD([q], lr=1.0)
    g = ok.RowSparse(np.array([4, 4, 1]), np.array([[3.0, 0], [0, 4.0], [0, 0]], np.float32))
    norm = a.step([g], max_grad_norm=1.0)
    assert norm == pytest.approx(5.0)
    b.step([g.to_dense(10)], max_grad_norm=1.0)
    np.testing.assert_allclose(p, q, rtol=1e-6)


def test_functional_takes_row_sparse():
    p = np.zeros((6, 2), np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    ok.functional.sparse_adam_(
        [p], [ok.RowSparse([2, 2], np.ones((2, 2), np.float32))], [m], [v], step=1, lr=0.1,
        beta1=0.9, beta2=0.999, eps=1e-8,
    )  # fmt: skip
    assert np.all(p[2] < 0) and np.all(p[[0, 1, 3, 4, 5]] == 0)
    np.testing.assert_allclose(m[2], 0.2)  # the two duplicates summed: g = 2


def run_bits(threads, name, kw, isa=None):
    ok.set_num_threads(threads)
    ok._core._testing.set_min_elements_per_thread(16)
    rng = np.random.default_rng(7)
    shapes = [(5000, 8), (300, 3, 2), (4000,)]
    dtypes = [np.float32, np.float64, np.float32]  # a group mixing float32 and float64 tables
    params = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    opt = getattr(ok, name)(params, **kw)
    opt._isa = isa
    for step in range(5):
        grads = []
        for p in params:
            n = 3000
            idx = rng.integers(0, p.shape[0], n)
            grads.append(ok.RowSparse(idx, rng.standard_normal((n, *p.shape[1:])).astype(np.float32)))
        opt.step(grads)
    return digest([params, opt.state_dict()["state"]])


@pytest.mark.parametrize(
    "name, kw",
    [("SparseAdam", {}), ("Adagrad", {"lr_decay": 0.1}), ("SGD", {"lr": 0.1}),
     ("SGD", {"lr": 0.1, "momentum": 0.9})],
)  # fmt: skip
def test_bit_identical_for_any_thread_count(name, kw):
    one = run_bits(1, name, kw)
    assert run_bits(2, name, kw) == one
    assert run_bits(3, name, kw) == one


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_matches_the_reference(isa, dtype):
    rng = np.random.default_rng(8)
    p0 = rng.standard_normal((64, 37)).astype(dtype)  # rows not a multiple of any width
    ref = SparseAdamRef(p0, lr=0.01)
    p = p0.copy()
    opt = ok.SparseAdam([p], lr=0.01)
    opt._isa = isa
    for idx, vals in batches(64, (37,), 30, seed=9):
        opt.step([ok.RowSparse(idx, vals)])
        ref.step(idx, vals)
    tol = 1e-5 if dtype == np.float32 else 1e-6
    np.testing.assert_allclose(p, ref.p, rtol=tol, atol=tol)


# -- the grouping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k, rows", [(0, 5), (1, 1), (10, 3), (600, 7), (5000, 10**6), (3000, 2**40)])
def test_group_rows(k, rows):
    rng = np.random.default_rng(k)
    idx = rng.integers(0, rows, k).astype(np.int64)
    got_rows, first, order = ok._core._testing.group_rows(idx, rows)
    want_rows, _ = coalesce(idx, np.zeros((k, 1)))
    np.testing.assert_array_equal(got_rows, want_rows)
    assert first[0] == 0 and first[-1] == k and len(first) == len(got_rows) + 1
    for u, r in enumerate(got_rows):
        positions = order[first[u] : first[u + 1]]
        np.testing.assert_array_equal(positions, np.flatnonzero(idx == r))  # in order


def test_duplicates_summed_in_order():
    # (1e8 + 1) - 1e8 in float32 is 0; 1e8 - 1e8 + 1 is 1: the order shows
    p = np.zeros((3, 1), np.float32)
    opt = ok.SGD([p], lr=1.0)
    opt.step([ok.RowSparse([2, 2, 2], np.array([[1e8], [-1e8], [1.0]], np.float32))])
    assert p[2, 0] == -1.0
    opt.step([ok.RowSparse([0, 0, 0], np.array([[1e8], [1.0], [-1e8]], np.float32))])
    assert p[0, 0] == 0.0


# -- bad input -------------------------------------------------------------------------------------


def test_row_sparse_constructor_checks():
    with pytest.raises(TypeError, match="integers"):
        ok.RowSparse(np.array([1.0]), np.ones((1, 2), np.float32))
    with pytest.raises(TypeError, match="integers"):
        ok.RowSparse(np.array([True]), np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="1-D"):
        ok.RowSparse(np.array([[1]]), np.ones((1, 2), np.float32))
    with pytest.raises(TypeError, match="float32"):
        ok.RowSparse([1], np.ones((1, 2), np.float64))
    with pytest.raises(ValueError, match="shape"):
        ok.RowSparse([1, 2], np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        ok.RowSparse([1, 2], np.ones((2, 4), np.float32)[:, ::2])
    g = ok.RowSparse(np.array([3, 1], np.int32), np.ones((2, 2), np.float32))
    assert g.indices.dtype == np.int64 and g.nnz == 2 and g.row_shape == (2,)


@pytest.mark.parametrize(
    "idx, vals, err, match",
    [
        ([10], np.ones((1, 3), np.float32), ValueError, "out of range"),
        ([-1], np.ones((1, 3), np.float32), ValueError, "negative"),
        ([1, 2], np.ones((2, 4), np.float32), ValueError, "shape"),
        ([1], np.ones((1, 3, 1), np.float32), ValueError, "shape"),
    ],
)
def test_bad_row_gradients_change_nothing(idx, vals, err, match):
    p = np.ones((10, 3), np.float32)
    q = np.ones(4, np.float32)
    opt = ok.SparseAdam([p, q])
    opt.step([ok.RowSparse([1], np.ones((1, 3), np.float32)), np.ones(4, np.float32)])
    before = digest([p, q, opt.state_dict()])
    with pytest.raises(err, match=match):
        opt.step([ok.RowSparse(idx, vals), np.ones(4, np.float32)])
    assert digest([p, q, opt.state_dict()]) == before


def test_values_sharing_memory_with_a_parameter_are_refused():
    p = np.ones((10, 3), np.float32)
    opt = ok.Adagrad([p])
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([ok.RowSparse([0, 1], p[2:4])])
    q = np.ones((5, 3), np.float32)
    opt = ok.Adagrad([{"params": [p]}, {"params": [q]}])
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([np.ones((10, 3), np.float32), ok.RowSparse([0], p[:1])])
    np.testing.assert_array_equal(p, 1.0)


@pytest.mark.parametrize(
    "cls, kw, err, match",
    [
        (ok.Adam, {}, TypeError, "takes dense gradients only"),
        (ok.Momentum, {}, TypeError, "takes dense gradients only"),
        (ok.LAMB, {}, TypeError, "takes dense gradients only"),
        (ok.Adafactor, {}, TypeError, "takes dense gradients only"),
        (ok.Adagrad, {"weight_decay": 0.1}, ValueError, "weight_decay"),
        (ok.SGD, {"weight_decay": 0.1}, ValueError, "weight_decay"),
    ],
)
def test_refused_where_torch_refuses(cls, kw, err, match):
    p = np.ones((4, 3), np.float32)
    opt = cls([p], **kw)
    with pytest.raises(err, match=match):
        opt.step([ok.RowSparse([0], np.ones((1, 3), np.float32))])
    np.testing.assert_array_equal(p, 1.0)
    assert p not in opt.state or opt.state[p].get("step", 0) == 0


def test_zero_d_parameter_refuses_row_sparse():
    p = np.ones(1, np.float32).reshape(())
    with pytest.raises((TypeError, ValueError)):
        ok.SGD([p], lr=0.1).step([ok.RowSparse([0], np.ones(1, np.float32))])


def test_empty_gradient_advances_the_step_only():
    p = np.ones((4, 3), np.float32)
    opt = ok.SparseAdam([p])
    opt.step([ok.RowSparse(np.zeros(0, np.int64), np.zeros((0, 3), np.float32))])
    np.testing.assert_array_equal(p, 1.0)
    assert opt.state[p]["step"] == 1


@pytest.mark.parametrize(
    "name, kw",
    [
        ("Adagrad", {"lr": 0.1, "eps_inside_sqrt": True}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "lr_in_velocity": True}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "lr_in_velocity": True, "nesterov": True}),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_textbook_options_take_row_sparse_as_their_dense_gradient(name, kw, dtype):
    # the rows run the rule's own kernel, options included: bit for bit the dense gradient's
    # step (Adagrad: an unlisted row's zero gradient changes nothing; SGD with momentum: every row)
    rng = np.random.default_rng(11)
    p0 = rng.standard_normal((30, 4)).astype(dtype)
    a, b = p0.copy(), p0.copy()
    oa, ob = getattr(ok, name)([a], **kw), getattr(ok, name)([b], **kw)
    for idx, vals in batches(30, (4,), 20, seed=12, most=25):
        g = ok.RowSparse(idx, vals)
        oa.step([g])
        ob.step([g.to_dense(30)])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "name, kw",
    [("SGD", {"lr": 0.1}), ("SGD", {"lr": 0.1, "momentum": 0.9}), ("Adagrad", {"lr": 0.1}),
     ("SparseAdam", {"lr": 0.1})],
)  # fmt: skip
def test_dense_and_row_sparse_steps_alternate_with_the_kept_plan(name, kw):
    # the kept step plan (made by a whole step) must never replay a row-sparse step's rows:
    # every step equals the whole path's
    a = np.ones((10, 3), np.float32)
    b = a.copy()
    oa, ob = getattr(ok, name)([a], **kw), getattr(ok, name)([b], **kw)
    dense = np.full((10, 3), 0.5, np.float32)
    for g in [dense, ok.RowSparse([2, 2, 7], np.ones((3, 3), np.float32)), dense, dense,
              ok.RowSparse([1], np.ones((1, 3), np.float32)),
              ok.RowSparse([4, 4], np.ones((2, 3), np.float32)), dense]:  # fmt: skip
        oa.step([g])
        ob._step_plan = None  # the whole path every time
        ob.step([g])
        np.testing.assert_array_equal(a, b)
    assert oa._step_plan is not None  # the plan was kept and replayed between the sparse steps


PRECISION = [
    ("bfloat16 state", np.float32, {"state_dtype": "bfloat16"}),
    ("int8 state", np.float32, {"state_dtype": "int8"}),
    ("bfloat16 table", "bfloat16", {}),
    ("float16 table", np.float16, {}),
    ("bfloat16 table, master weights", "bfloat16", {"master_weights": True}),
    ("float16 table, stochastic rounding", np.float16, {"stochastic_rounding": True}),
]


@pytest.mark.parametrize("name, kw", [("SparseAdam", {"lr": 0.1}), ("Adagrad", {"lr": 0.1}),
                                      ("SGD", {"lr": 0.1, "momentum": 0.9})])  # fmt: skip
@pytest.mark.parametrize("what, dtype, options", PRECISION, ids=[c[0] for c in PRECISION])
def test_precision_options_refuse_row_sparse_before_anything_changes(name, kw, what, dtype, options):
    # a row-sparse step runs plain float32/float64 rows only: the staged forms (16-bit tables,
    # bfloat16 or int8 state, master weights, stochastic rounding) are refused, naming the
    # gradient, with the table, the state and the step count as they were; dense steps go on
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    table = np.linspace(-1, 1, 40 * 256).reshape(40, 256).astype(dtype)
    opt = getattr(ok, name)([table], **kw, **options)
    dense = np.full(table.shape, 0.25, table.dtype)
    opt.step([dense])  # the state exists: a later step must not change it either
    before = (table.copy(), {k: np.copy(v) for k, v in opt.state[table].items()})
    sparse = ok.RowSparse([3, 3, 17], np.ones((3, 256), np.float32))
    with pytest.raises(TypeError, match=r"grads\[0\] is a row-sparse gradient .* float32 or float64"):
        opt.step([sparse])
    np.testing.assert_array_equal(table, before[0])
    assert opt.state[table].keys() == before[1].keys()
    for k, v in before[1].items():
        np.testing.assert_array_equal(opt.state[table][k], v)
    opt.step([dense])  # and it still steps


def test_precision_options_refuse_row_sparse_on_the_first_step():
    table = np.zeros((8, 4), np.float32)
    opt = ok.SparseAdam([table], state_dtype="bfloat16")
    with pytest.raises(TypeError, match="row-sparse"):
        opt.step([ok.RowSparse([1], np.ones((1, 4), np.float32))])
    assert table not in opt.state and not table.any()
