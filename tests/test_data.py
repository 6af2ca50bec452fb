"""optkern.data.batches: BGD / SGD / mini-batch epochs."""

import numpy as np
import pytest

import optkern as ok
from optkern.data import batches, num_batches


def _xy(n=10, d=3):
    X = np.arange(n * d, dtype=np.float32).reshape(n, d)
    y = np.arange(n, dtype=np.int64)
    return X, y


def test_full_batch_is_the_arrays_themselves():
    X, y = _xy()
    out = list(batches(X, y))  # batch_size=None: BGD
    assert len(out) == 1
    Xb, yb = out[0]
    assert Xb is X and yb is y  # no copy, no shuffle, even with shuffle=True (the default)


def test_single_array_yields_arrays_not_tuples():
    X, _ = _xy()
    out = list(batches(X, batch_size=4, shuffle=False))
    assert all(isinstance(b, np.ndarray) for b in out)
    assert [b.shape[0] for b in out] == [4, 4, 2]


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10, 11])
@pytest.mark.parametrize("shuffle", [False, True])
def test_an_epoch_visits_every_row_once(batch_size, shuffle):
    X, y = _xy(10)
    seen = []
    sizes = []
    for Xb, yb in batches(X, y, batch_size=batch_size, shuffle=shuffle, seed=1):
        assert Xb.shape[0] == yb.shape[0]
        np.testing.assert_array_equal(Xb, X[yb])  # rows stay paired across arrays
        seen.extend(yb.tolist())
        sizes.append(len(yb))
    assert sorted(seen) == list(range(10))
    assert len(sizes) == num_batches(10, batch_size)
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    if not shuffle:
        assert seen == list(range(10))


def test_sgd_batches_are_single_rows():
    X, y = _xy(5)
    out = list(batches(X, y, batch_size=1, shuffle=False))
    assert len(out) == 5
    for i, (Xb, yb) in enumerate(out):
        assert Xb.shape == (1, 3) and yb.tolist() == [i]


def test_no_copy_without_shuffle():
    X, y = _xy(10)
    for Xb, yb in batches(X, y, batch_size=3, shuffle=False):
        assert np.shares_memory(Xb, X) and np.shares_memory(yb, y)
        assert not Xb.flags.owndata and Xb.flags.c_contiguous


def test_shuffled_batches_are_copies_of_their_rows_only():
    X, y = _xy(10)
    for Xb, yb in batches(X, y, batch_size=3, seed=0):
        assert not np.shares_memory(Xb, X)
        assert Xb.flags.c_contiguous and Xb.dtype == X.dtype


def test_drop_last():
    X, y = _xy(10)
    out = list(batches(X, y, batch_size=4, shuffle=False, drop_last=True))
    assert [len(b[1]) for b in out] == [4, 4]
    assert num_batches(10, 4, drop_last=True) == 2
    out = list(batches(X, y, batch_size=5, drop_last=True, seed=0))
    assert [len(b[1]) for b in out] == [5, 5]
    with pytest.raises(ValueError, match="drop_last=True with batch_size=11"):
        batches(X, y, batch_size=11, drop_last=True)


def test_seed_reproducible_and_varies():
    X, y = _xy(50)

    def order(seed):
        return np.concatenate([yb for _, yb in batches(X, y, batch_size=7, seed=seed)])

    np.testing.assert_array_equal(order(3), order(3))
    assert not np.array_equal(order(3), order(4))
    assert not np.array_equal(order(3), np.arange(50))
    # (base, epoch) seeds: a different but reproducible order per epoch
    assert not np.array_equal(order((3, 0)), order((3, 1)))
    np.testing.assert_array_equal(order((3, 1)), order((3, 1)))
    # a Generator advances from epoch to epoch, reproducibly
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    a1, a2 = order(rng_a), order(rng_a)
    b1, b2 = order(rng_b), order(rng_b)
    assert not np.array_equal(a1, a2)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)


def test_seed_none_draws_fresh_orders():
    X = np.arange(1000)
    a = np.concatenate(list(batches(X, batch_size=100)))
    b = np.concatenate(list(batches(X, batch_size=100)))
    assert sorted(a) == sorted(b) == list(range(1000))
    assert not np.array_equal(a, b)  # the chance of equal orders is 1/1000!


def test_order_is_fixed_when_called():
    X = np.arange(20)
    rng = np.random.default_rng(0)
    gen = batches(X, batch_size=5, seed=rng)
    expected = np.random.default_rng(0).permutation(20)
    rng.random(5)  # using the generator afterwards does not change the epoch already drawn
    np.testing.assert_array_equal(np.concatenate(list(gen)), expected)


def test_multidimensional_and_list_inputs():
    images = np.zeros((6, 2, 2), np.float32)
    images[:, 0, 0] = np.arange(6)
    labels = [0, 1, 2, 3, 4, 5]
    for xb, yb in batches(images, labels, batch_size=4, seed=2):
        assert xb.shape[1:] == (2, 2)
        np.testing.assert_array_equal(xb[:, 0, 0], yb)


def test_empty_arrays_yield_nothing():
    X = np.zeros((0, 3), np.float32)
    assert list(batches(X, batch_size=4)) == []
    assert list(batches(X)) == []
    assert num_batches(0, 4) == 0


def test_works_with_an_optimizer_loop():
    # mini-batch least squares: the batches feed an in-place update without copies of params
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 3)).astype(np.float32)
    w_true = np.array([1.0, -2.0, 0.5], np.float32)
    y = X @ w_true
    w = np.zeros(3, np.float32)
    opt = ok.SGD([w], lr=0.1)
    for epoch in range(60):
        for Xb, yb in batches(X, y, batch_size=16, seed=(0, epoch)):
            opt.step([(Xb.T @ (Xb @ w - yb) / len(yb)).astype(np.float32)])
    np.testing.assert_allclose(w, w_true, atol=1e-4)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (0, ValueError, "batch_size must be >= 1"),
        (-3, ValueError, "batch_size must be >= 1"),
        (2.0, TypeError, "batch_size must be None .* or an int"),
        (True, TypeError, "batch_size must be None .* or an int"),
        ("8", TypeError, "batch_size must be None .* or an int"),
    ],
)
def test_bad_batch_size(bad, exc, match):
    X, y = _xy()
    with pytest.raises(exc, match=match):
        batches(X, y, batch_size=bad)  # raised at the call, before iterating
    with pytest.raises(exc, match=match):
        num_batches(10, bad)


def test_numpy_integer_batch_size():
    X, _ = _xy()
    assert len(list(batches(X, batch_size=np.int64(5)))) == 2


def test_mismatched_lengths():
    X, y = _xy(10)
    with pytest.raises(ValueError, match=r"same length .*array 0: 10, array 1: 9"):
        batches(X, y[:9], batch_size=2)
    with pytest.raises(ValueError, match="same length"):
        batches(X, y[:9])  # also for the full batch


def test_other_errors():
    with pytest.raises(ValueError, match="at least one array"):
        batches(batch_size=2)
    with pytest.raises(ValueError, match="array 1 is a scalar"):
        batches(np.zeros(3), np.float32(1.0))
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        batches(np.zeros(3), shuffle=1)
    with pytest.raises(TypeError, match="drop_last must be a bool"):
        batches(np.zeros(3), batch_size=2, drop_last="yes")
