"""When a call uses helper threads, and what happens when they do not pay.

- The split decision as a function of size, weight and threads, at the default threshold (a
  time per thread over a time per element, as build_info states it).
- Results bit-identical on 1, 2 and 3 threads right below, at and above the boundaries of the
  default threshold, for a rule of each weight.
- Which calls pay for their helpers (the backoff counts those that do not; test_threads.py
  tests the backoff with the paused-helpers hook).
- Helpers kept off the calling thread's CPU; a caller pinned to one CPU still finishes.
No timing is asserted: which calls pay depends on the machine.
"""

import json
import os
import subprocess
import sys
import textwrap

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
    ok._core._testing.set_chunk_elements(0)
    ok._core._testing.pause_helpers(False)
    ok._core._testing.set_adaptive_threads(True)


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
    split = ok._core._testing.split_threads
    per = MIN // weight  # elements per thread at this weight (MIN is a multiple of 4)
    assert MIN % 4 == 0
    assert split(0, weight) == 1
    assert split(2 * per - 1, weight) == 1
    assert split(2 * per, weight) == min(2, threads)
    assert split(3 * per - 1, weight) == min(2, threads)
    assert split(3 * per, weight) == min(3, threads)
    assert split(1000 * per, weight) == threads
    # The testing hook moves the threshold; the decision follows it.
    ok._core._testing.set_min_elements_per_thread(1)
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
    assert ok._core._testing.call_paid(chunks, mine, threads, own_us, wait_us) is paid


def python(code):
    """Runs code in a fresh interpreter under a timeout; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPTKERN_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


KEEP_OFF = """
import json, os, numpy as np, optkern as ok
ok.set_num_threads(2)
ok._core._testing.set_min_elements_per_thread(1)
ok._core._testing.set_adaptive_threads(False)
before = set(os.listdir("/proc/self/task"))
p = np.zeros(200_000, np.float32); g = np.ones_like(p)
import time
deadline = time.monotonic() + 30  # a loaded machine may start the helper late
while ok._core._testing.pool_stats()["helper_chunks"] == 0 and time.monotonic() < deadline:
    ok.functional.sgd_([p], [g], lr=0.5)
ok._core._testing.pool_trace(True)
for _ in range(5):
    ok.functional.sgd_([p], [g], lr=0.5)
trace = ok._core._testing.pool_take_trace()
helpers = sorted(int(t) for t in set(os.listdir("/proc/self/task")) - before)
print(json.dumps({"helpers": [sorted(os.sched_getaffinity(t)) for t in helpers],
                  "mine": sorted(os.sched_getaffinity(0)), "last": trace[-1], "p": float(p[0]),
                  "helped": ok._core._testing.pool_stats()["helper_chunks"]}))
"""


@pytest.mark.skipif(not THREADED, reason="single-threaded build")
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux affinity")
@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: [])(0)) < 2, reason="1 CPU")
def test_helpers_kept_off_the_callers_cpu():
    """After a multi-threaded call, the helper's affinity is the caller's CPUs without the one the
    call started on (as the pool's trace recorded it), unless the caller slept waiting for a
    helper's chunk (it waited over 50 us), which lets the helpers back onto its CPU."""
    out = json.loads(python(KEEP_OFF))
    assert out["p"] < 0 and out["helped"] > 0
    (helper,) = out["helpers"]
    mine, last = out["mine"], out["last"]
    wait_us, cpu = last[2], last[5]
    assert cpu in mine
    if wait_us < 50:
        assert helper == sorted(set(mine) - {cpu})
    else:
        assert helper == mine


def test_info_states_the_threshold(capsys):
    """`python -m optkern info` states the threshold as a time and in elements per weight, with
    the rules of each weight."""
    from optkern.__main__ import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"at least {INFO['min_us_per_thread']:g} us on one thread" in text
    assert f"{INFO['ns_per_work']:g} ns per element of weight 1" in text
    for w, n in INFO["min_elements_per_thread_by_weight"].items():
        assert f"{n} elements at weight {w}" in text
    assert "(SGD," in text and "Adam," in text
