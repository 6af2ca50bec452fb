"""The distributed wrappers' arguments: one checker for ``bucket_mb``, ``num_threads`` and
``timeout`` (DataParallel, ZeroRedundancyOptimizer, configure_threads), each refusal a
TypeError/ValueError naming the argument; gradients of the wrong kind refused the same way with
one rank as with several. In-process (an MPI singleton); skipped without mpi4py."""

import math

import numpy as np
import pytest

import optkern as ok

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'optkern[mpi]')")
from optkern import distributed as okd  # noqa: E402


def _params():
    return [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]


def _dp(**kw):
    return okd.DataParallel(ok.Adam(_params(), lr=1e-3), **kw)


def _zero(**kw):
    return okd.ZeroRedundancyOptimizer(ok.Adam, _params(), lr=1e-3, **kw)


BAD_BUCKET_MB = [
    (math.inf, ValueError),
    (-math.inf, ValueError),
    (math.nan, ValueError),
    (0, ValueError),
    (-1, ValueError),
    (0.0, ValueError),
    ("4", TypeError),
    (None, TypeError),
    (True, TypeError),
    (np.bool_(True), TypeError),
    ([4], TypeError),
    (1 + 2j, TypeError),
]


@pytest.mark.parametrize("value, error", BAD_BUCKET_MB, ids=repr)
def test_bad_bucket_mb_refused_naming_it(value, error):
    with pytest.raises(error, match="bucket_mb"):
        _dp(bucket_mb=value)


@pytest.mark.parametrize("value", [1e-9, 1, 25, np.float32(0.5), np.int64(3), 1e308])
def test_any_finite_positive_bucket_mb_works(value):
    dp = _dp(bucket_mb=value, num_threads=None)
    dp.step([np.ones((3, 2), np.float32), np.ones(4, np.float32)])


BAD_THREADS = [
    ("bogus", TypeError),
    (2.5, TypeError),
    (2.0, TypeError),
    (True, TypeError),
    (False, TypeError),
    ("2", TypeError),
    (0, ValueError),
    (-1, ValueError),
    (100_000, ValueError),
    (2**70, ValueError),
]


@pytest.mark.parametrize("make", [_dp, _zero], ids=["dp", "zero"])
@pytest.mark.parametrize("value, error", BAD_THREADS, ids=repr)
def test_bad_num_threads_refused_naming_it(make, value, error):
    before = ok.get_num_threads()
    with pytest.raises(error, match="num_threads"):
        make(num_threads=value)
    assert ok.get_num_threads() == before


@pytest.mark.parametrize("value, error", BAD_THREADS, ids=repr)
def test_configure_threads_uses_the_same_checker(value, error):
    with pytest.raises(error, match="num_threads"):
        okd.configure_threads(None, value)


@pytest.mark.parametrize("make", [_dp, _zero], ids=["dp", "zero"])
@pytest.mark.parametrize("value", ["auto", None, 1, np.int32(2)])
def test_good_num_threads(make, value):
    before = ok.get_num_threads()
    try:
        make(num_threads=value)
    finally:
        ok.set_num_threads(before)


@pytest.mark.parametrize("make", [_dp, _zero], ids=["dp", "zero"])
@pytest.mark.parametrize(
    "value, error",
    [
        (0, ValueError),
        (-3, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        ("10", TypeError),
        (True, TypeError),
    ],
    ids=repr,
)
def test_bad_timeout_refused_naming_it(make, value, error):
    with pytest.raises(error, match="timeout"):
        make(timeout=value)


@pytest.mark.parametrize("text", ["abc", "-1", "0", "inf", "nan"])
def test_bad_timeout_variable_refused_naming_it(monkeypatch, text):
    monkeypatch.setenv(okd.TIMEOUT_ENV, text)
    with pytest.raises(ValueError, match=okd.TIMEOUT_ENV):
        _dp()


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
@pytest.mark.parametrize("make", [_dp, _zero], ids=["dp", "zero"])
def test_gradients_of_another_dtype_refused_as_the_optimizer_refuses_them(make, dtype):
    wrapper = make(num_threads=None)
    before = [p.copy() for p in wrapper.param_groups[0]["params"]]
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        wrapper.step([np.ones((3, 2), np.float32), np.ones(4, dtype)])
    assert all(np.array_equal(p, q) for p, q in zip(wrapper.param_groups[0]["params"], before))


@pytest.mark.parametrize("make", [_dp, _zero], ids=["dp", "zero"])
@pytest.mark.parametrize(
    "bad, error",
    [(np.ones(5, np.float32), ValueError), ([1.0] * 4, TypeError), ("grad", TypeError)],
    ids=["shape", "list", "text"],
)
def test_bad_gradient_names_its_index(make, bad, error):
    wrapper = make(num_threads=None)
    with pytest.raises(error, match=r"grads\[1\]"):
        wrapper.step([np.ones((3, 2), np.float32), bad])


def test_data_parallel_checks_every_gradient_before_copying_any():
    dp = _dp(num_threads=None, bucket_mb=1e-6)
    dp.grad_buffers[0][...] = 7.0
    with pytest.raises(TypeError):
        dp.allreduce_([np.ones((3, 2), np.float32), np.ones(4, np.float64)])
    assert (dp.grad_buffers[0] == 7.0).all()  # the good first gradient was not copied in


def test_data_parallel_train_eval_need_a_schedule_free_optimizer():
    with pytest.raises(TypeError, match="train"):
        _dp(num_threads=None).eval()
    ps = _params()
    dp = okd.DataParallel(ok.ScheduleFreeAdamW(ps, lr=1e-2), num_threads=None)
    rng = np.random.default_rng(0)
    for _ in range(3):  # after one step y = x = z: take three
        dp.step([rng.standard_normal(p.shape).astype(np.float32) for p in ps])
    y = [p.copy() for p in ps]
    dp.eval()
    assert not all(np.array_equal(p, q) for p, q in zip(ps, y))
    dp.train()
    for p, q in zip(ps, y):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [_dp, _zero], ids=["dp", "zero"])
def test_float64_parameters_refused_naming_the_parameter(make):
    """optkern's optimizers step float64 arrays; the wrappers (float32 buffers) refuse them at
    construction rather than averaging or sharding them in float32."""
    params = [np.zeros((3, 2), np.float32), np.zeros(4)]
    with pytest.raises(TypeError, match="takes float32 parameters; parameter 1 is float64"):
        if make is _dp:
            okd.DataParallel(ok.Adam(params, lr=1e-3), num_threads=None)
        else:
            okd.ZeroRedundancyOptimizer(ok.Adam, params, lr=1e-3, num_threads=None)
