"""ok.data.batches and num_batches fed generators, dicts, sets,
mismatched lengths, seed=True, negative or float counts and subclass arrays. Refusals happen at
the call (not at the first next()) with TypeError or ValueError."""

import itertools

import numpy as np
import pytest

import optkern as ok
from optkern.data import batches, num_batches

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")


# -- what is not an array (finding: generators and dicts gave a misleading 0-d error) -------------

NOT_ARRAYS = {
    "generator": lambda: (float(i) for i in range(6)),
    "iterator": lambda: iter([1.0, 2.0, 3.0]),
    "map": lambda: map(float, range(6)),
    "zip": lambda: zip(range(3), range(3)),
    "itertools-count": lambda: itertools.count(),
    "dict": lambda: {"x": [1, 2], "y": [3, 4]},
    "dict-keys-int": lambda: {0: 1.0, 1: 2.0},
    "set": lambda: {1.0, 2.0, 3.0},
    "frozenset": lambda: frozenset({1.0, 2.0}),
    "str": lambda: "abcdef",
    "bytes": lambda: b"abcdef",
}


@pytest.mark.parametrize("what", NOT_ARRAYS)
def test_non_array_inputs_refused_at_the_call(what):
    with pytest.raises(TypeError, match="batches"):
        batches(NOT_ARRAYS[what](), batch_size=2)


@pytest.mark.parametrize("what", ["generator", "dict", "set"])
def test_non_array_as_second_input_refused(what):
    with pytest.raises(TypeError, match="array 1"):
        batches(np.arange(6), NOT_ARRAYS[what](), batch_size=2)


def test_a_generator_is_not_consumed_by_the_refusal():
    gen = (i for i in range(3))
    with pytest.raises(TypeError):
        batches(gen)
    assert list(gen) == [0, 1, 2]


@pytest.mark.parametrize(
    "seq",
    [range(6), [1, 2, 3, 4, 5, 6], (1, 2, 3, 4, 5, 6), [[1, 2]] * 6, np.arange(6).tolist()],
    ids=["range", "list", "tuple", "nested-list", "tolist"],
)
def test_sequences_are_converted_once(seq):
    out = list(batches(seq, batch_size=4, shuffle=False))
    assert [len(b) for b in out] == [4, 2]


@pytest.mark.parametrize(
    "value",
    [5, 5.0, None, np.float32(1.0), np.array(3.0)],
    ids=["int", "float", "None", "np-scalar", "0-d"],
)
def test_scalars_refused(value):
    with pytest.raises(ValueError, match="0-d"):
        batches(value, batch_size=1)


# -- mismatched lengths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes",
    [
        [(5,), (4,)],
        [(5, 3), (6,)],
        [(5,), (5,), (4, 2)],
        [(0,), (1,)],
        [(3, 0), (2, 0)],
        [(1,), (2,)],
    ],
)
def test_mismatched_first_dimensions_refused(shapes):
    arrays = [np.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match="same length"):
        batches(*arrays, batch_size=1)


def test_no_arrays_refused():
    with pytest.raises(ValueError):
        batches(batch_size=2)


# -- seeds (finding: seed=True was taken as the int 1) ----------------------------------------------


@pytest.mark.parametrize(
    "seed",
    [True, False, np.bool_(True), np.bool_(False)],
    ids=["True", "False", "np-True", "np-False"],
)
def test_bool_seed_refused(seed):
    with pytest.raises(TypeError, match="seed"):
        batches(np.arange(6), batch_size=2, seed=seed)


@pytest.mark.parametrize(
    "seed, exc",
    [("abc", TypeError), (1.5, TypeError), (-1, ValueError), (object(), TypeError)],
    ids=["str", "float", "negative", "object"],
)
def test_bad_seeds_refused_at_the_call(seed, exc):
    with pytest.raises(exc):
        batches(np.arange(6), batch_size=2, seed=seed)


@pytest.mark.parametrize(
    "seed",
    [0, np.int64(7), [1, 2], (3, 4), 2**100, np.random.SeedSequence(5)],
    ids=["0", "np-int", "list", "tuple", "huge", "SeedSequence"],
)
def test_good_seeds_reproducible(seed):
    a = [b.tolist() for b in batches(np.arange(10), batch_size=3, seed=seed)]
    b = [b.tolist() for b in batches(np.arange(10), batch_size=3, seed=seed)]
    assert a == b and sorted(sum(a, [])) == list(range(10))


# -- batch sizes and counts (finding: num_batches accepted negative and float n) ------------------


@pytest.mark.parametrize(
    "size, exc",
    [
        (0, ValueError),
        (-1, ValueError),
        (1.5, TypeError),
        (2.0, TypeError),
        ("2", TypeError),
        (True, TypeError),
        (np.float64(2), TypeError),
        ([2], TypeError),
        (np.bool_(True), TypeError),
        (-(2**70), ValueError),
    ],
    ids=["0", "-1", "1.5", "2.0", "str", "bool", "np-float", "list", "np-bool", "huge-negative"],
)
def test_bad_batch_sizes_refused(size, exc):
    with pytest.raises(exc):
        batches(np.arange(6), batch_size=size)
    with pytest.raises(exc):
        num_batches(6, size)


@pytest.mark.parametrize("size", [np.int64(2), np.uint8(2), 2**70])
def test_integer_batch_sizes_of_any_kind(size):
    assert len(list(batches(np.arange(5), batch_size=size))) == num_batches(5, size)


@pytest.mark.parametrize(
    "n, exc",
    [
        (-1, ValueError),
        (-(2**70), ValueError),
        (5.0, TypeError),
        (5.5, TypeError),
        ("5", TypeError),
        (None, TypeError),
        (True, TypeError),
        (np.float64(5), TypeError),
        ([5], TypeError),
    ],
    ids=["-1", "huge-negative", "5.0", "5.5", "str", "None", "bool", "np-float", "list"],
)
def test_num_batches_refuses_bad_row_counts(n, exc):
    with pytest.raises(exc):
        num_batches(n, 2)


@pytest.mark.parametrize("n", [0, 1, 7, np.int64(7), 2**70])
@pytest.mark.parametrize("size", [None, 1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_num_batches_integer_row_counts(n, size, drop_last):
    got = num_batches(n, size, drop_last)
    assert type(got) is int and got >= 0
    if n and n < 100:
        if drop_last and size is not None and size > n:
            return
        assert got == len(list(batches(np.arange(int(n)), batch_size=size, drop_last=drop_last)))


@pytest.mark.parametrize("flag", ["yes", 1, None, 0.0])
def test_num_batches_drop_last_must_be_a_bool(flag):
    with pytest.raises(TypeError, match="drop_last"):
        num_batches(6, 2, flag)


@pytest.mark.parametrize("flag", ["yes", 1, None, [True]])
def test_shuffle_and_drop_last_must_be_bools(flag):
    with pytest.raises(TypeError):
        batches(np.arange(6), batch_size=2, shuffle=flag)
    with pytest.raises(TypeError):
        batches(np.arange(6), batch_size=2, drop_last=flag)


# -- subclass arrays ---------------------------------------------------------------------------------


def test_masked_array_refused():
    x = np.ma.MaskedArray(np.arange(6.0), mask=[0, 1, 0, 0, 0, 0])
    with pytest.raises(TypeError, match="masked"):
        batches(x, batch_size=2)


def test_matrix_batches_are_plain_rows():
    x = np.asmatrix(np.arange(8.0).reshape(4, 2))
    out = list(batches(x, batch_size=2, shuffle=False))
    assert all(type(b) is np.ndarray and b.shape == (2, 2) for b in out)
    assert np.array_equal(np.concatenate(out), np.asarray(x))


def test_memmap_batches_are_views_without_shuffle(tmp_path):
    x = np.memmap(tmp_path / "x.bin", np.float32, "w+", shape=(6, 2))
    x[:] = np.arange(12).reshape(6, 2)
    out = list(batches(x, batch_size=4, shuffle=False))
    assert all(np.shares_memory(b, x) for b in out)


def test_recarray_rows_keep_their_fields():
    x = np.rec.fromarrays([np.arange(5), np.arange(5) * 2.0], names="a,b")
    out = list(batches(x, batch_size=2, seed=0))
    rows = np.concatenate(out)
    assert sorted(rows["a"].tolist()) == list(range(5))
    assert np.array_equal(rows["b"], rows["a"] * 2.0)


def test_readonly_and_strided_inputs_batch_fine():
    x = np.arange(20.0)[::2]
    x.flags.writeable = False
    y = np.arange(10)
    for xb, yb in batches(x, y, batch_size=3, seed=1):
        assert np.array_equal(xb, 2.0 * yb)


def test_zero_rows_yield_nothing():
    assert list(batches(np.zeros((0, 3)), np.zeros(0), batch_size=2)) == []
    assert num_batches(0, 2) == 0


def test_refusal_happens_before_the_first_next():
    with pytest.raises(TypeError):
        batches(np.arange(4), batch_size=2, seed=True)  # not a generator to iterate later
    gen = batches(np.arange(4), batch_size=2)
    assert ok.data.num_batches(4, 2) == len(list(gen))
