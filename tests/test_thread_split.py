"""When a call uses helper threads, and what happens when they do not pay.

- The split decision as a function of size, weight and threads, at the default threshold (a
  time per thread over a time per element, as build_info states it).
- Results bit-identical on 1, 2 and 3 threads right below, at and above the boundaries of the
  default threshold, for a rule of each weight.
- A call whose helpers are held back (the paused-helpers hook) still finishes, with the same
  results; the backoff after calls that did not pay.
No timing is asserted: which calls pay depends on the machine.
"""

import numpy as np
import pytest
from helpers import bits

import optkern as ok
from optkern import functional as F

THREADED = ok.build_info()["threads"] != "none"
INFO = ok.build_info()
MIN = INFO["min_elements_per_thread"]


@pytest.fixture(autouse=True)
def _restore_pool_hooks():
    yield
    ok._core._set_chunk_elements(0)
    ok._core._pause_helpers(False)
    ok._core._set_adaptive_threads(True)


def test_threshold_is_a_time_over_a_time_per_element():
    assert INFO["min_us_per_thread"] > 0 and INFO["ns_per_work"] > 0
    assert MIN == int(INFO["min_us_per_thread"] * 1e3 / INFO["ns_per_work"])
    assert INFO["min_elements_per_thread_by_weight"] == {1: MIN, 4: -(-MIN // 4)}
    # Every rule's weight is one of those stated.
    assert {r.weight for r in ok.registry.rules()} <= set(INFO["min_elements_per_thread_by_weight"])


@pytest.mark.skipif(not THREADED, reason="single-threaded build")
@pytest.mark.parametrize("weight", [1, 4])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_split_decision(weight, threads):
    ok.set_num_threads(threads)
    split = ok._core._split_threads
    per = MIN // weight  # elements per thread at this weight (MIN is a multiple of 4)
    assert MIN % 4 == 0
    assert split(0, weight) == 1
    assert split(2 * per - 1, weight) == 1
    assert split(2 * per, weight) == min(2, threads)
    assert split(3 * per - 1, weight) == min(2, threads)
    assert split(3 * per, weight) == min(3, threads)
    assert split(1000 * per, weight) == threads
    # The testing hook moves the threshold; the decision follows it.
    ok._core._set_min_elements_per_thread(1)
    assert split(threads, 1) == threads and split(1, 1) == 1


def _run(fn, threads, n, steps=3):
    """`steps` calls of fn on fresh arrays of n elements on `threads` threads (default
    threshold): the bits of every array."""
    ok.set_num_threads(threads)
    rng = np.random.default_rng(n)
    arrays = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    arrays[3] *= 1e-2  # the gradient
    for k in range(steps):
        fn(*arrays, k + 1)
    return [bits(a) for a in arrays]


def _sgd(p, m, v, g, k):
    F.sgd_([p], [g], [m], lr=0.1, momentum=0.9)


def _adam(p, m, v, g, k):
    F.adam_([p], [g], [m], [v], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=k)


@pytest.mark.parametrize("fn, weight", [(_sgd, 1), (_adam, 4)], ids=["weight1", "weight4"])
def test_bit_identical_at_the_boundaries(fn, weight):
    """At the default threshold: right below two threads' worth, at it, and at three threads'."""
    per = MIN // weight
    for n in (2 * per - 1, 2 * per, 2 * per + 63, 3 * per):
        want = _run(fn, 1, n)
        for threads in (2, 3):
            assert _run(fn, threads, n) == want, (n, threads)


@pytest.mark.skipif(not THREADED, reason="single-threaded build")
def test_paused_helpers_finish_and_back_off():
    """Helpers held back take no chunk: every call still finishes, on the calling thread, with
    the single-thread results; the pool counts the calls as not paid and backs off."""
    n = 2 * (MIN // 4) + 1000
    want = _run(_adam, 1, n, steps=12)
    ok._core._pause_helpers(True)
    before = ok._core._pool_stats()
    got = _run(_adam, 2, n, steps=12)
    after = ok._core._pool_stats()
    assert got == want
    d = {k: after[k] - before[k] for k in ("calls", "helper_chunks", "late_calls", "serial_calls")}
    # calls 1, 2 not paid -> 3-6 alone -> 7 probes, not paid -> 8-12 alone (backoff 8)
    assert d == {"calls": 3, "helper_chunks": 0, "late_calls": 3, "serial_calls": 9}


@pytest.mark.parametrize(
    "chunks, mine, threads, own_us, wait_us, paid",
    [
        (16, 16, 2, 50, 0, False),  # the helper ran nothing
        (16, 13, 2, 50, 0, False),  # 3 of 16: under half its share (4)
        (16, 12, 2, 50, 0, True),  # 4 of 16: half its share
        (16, 8, 2, 50, 0, True),
        (16, 8, 2, 50, 49, True),  # waited less than the floor
        (16, 8, 2, 400, 240, True),  # within 4 of the caller's chunks (50 us each)
        (16, 8, 2, 400, 260, False),  # a helper held a chunk for longer: a straggler
        (16, 8, 2, 50, 5000, False),
        (16, 0, 2, 0, 5000, True),  # the caller ran none (it was descheduled): no estimate
        (24, 17, 3, 50, 0, False),  # 3 threads: the helpers need 8 of 24
        (24, 16, 3, 50, 0, True),
    ],
)
def test_paid_rule(chunks, mine, threads, own_us, wait_us, paid):
    assert ok._core._call_paid(chunks, mine, threads, own_us, wait_us) is paid
