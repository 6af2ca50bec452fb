"""optkern's thread pool.

- Results do not depend on the thread count: bit-identical for 1, 2 and 3 threads, wherever the
  chunks between threads fall (chunks cut through buffers at arbitrary points).
- Thread counts: defaults from the environment and the CPUs this process may use, bounds of
  set_num_threads, and a refused thread that means fewer threads, not a dead process.
- fork: a child forked after multi-threaded steps steps on (os.fork, a multiprocessing fork
  pool, spawn), each in a subprocess under a timeout, so that a hang fails instead of blocking.
- Python threads stepping while the pool is busy finish (one runs on its own thread).
- No side effects: NumPy's BLAS threads, torch's threads, os.environ and the floating-point
  environment are what they were before optkern was imported and used.
"""

import functools
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from helpers import bits, step_bits
from optim_db import CASES, case_id

import optkern as ok

MAX_THREADS = ok.build_info()["max_threads"]
THREADED = ok.build_info()["threads"] != "none"


@pytest.fixture(autouse=True)
def _restore_pool_hooks():
    yield
    ok._core._testing.set_chunk_elements(0)
    ok._core._testing.fail_thread_creation_after(-1)
    ok._core._testing.pause_helpers(False)
    ok._core._testing.set_adaptive_threads(True)


def run(name, hp, threads, min_per_thread, steps=5):
    return step_bits(name, hp, threads, min_per_thread, steps, seed=42)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_and_two_threads_bit_identical(case):
    name, hp = case
    single = run(name, hp, threads=1, min_per_thread=1)
    for min_per_thread in (1, 7, 1000, 32768):
        assert run(name, hp, threads=2, min_per_thread=min_per_thread) == single


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
@pytest.mark.parametrize("chunk", [64, 640, 4096, 100032])
def test_any_chunking_bit_identical(case, chunk):
    """Chunks of 64 elements up to one chunk per call, on 2 and 3 threads (3 > the cores here:
    a helper is often descheduled and the others take its chunks)."""
    name, hp = case
    single = run(name, hp, threads=1, min_per_thread=1)
    ok._core._testing.set_chunk_elements(chunk)
    for threads in (2, 3):
        assert run(name, hp, threads=threads, min_per_thread=1) == single


# The option sets of every rule whose kernel has a reduction pass.
REDUCED = [
    (name, hp)
    for name, hp in CASES
    if any(r.cls == name and r.reduction for r in ok.registry.rules())
]


@pytest.mark.parametrize("case", REDUCED, ids=case_id)
@pytest.mark.parametrize("chunk", [0, 1, 3, 64])
def test_reduction_pass_bit_identical_across_threads_and_chunks(case, chunk):
    """A rule with a reduction pass (LAMB: the per-array norms of p and u, then the trust ratio):
    blocks of 4096 elements, each summed on one thread, added per array in block order. On 1, 2
    and 3 threads, with chunks of 1 to 64 blocks (0: by size), params and state bit-identical."""
    name, hp = case
    single = run(name, hp, threads=1, min_per_thread=1)
    ok._core._testing.set_chunk_elements(chunk)
    for threads in (2, 3):
        assert run(name, hp, threads=threads, min_per_thread=1) == single


@pytest.mark.parametrize("chunk", [0, 1, 3, 64])
def test_norms_bit_identical_across_threads_and_chunks(chunk):
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(n).astype(np.float32) for n in (100003, 5, 4096 * 7 + 1, 0)]
    ok.set_num_threads(1)
    want = {p: ok._core.grad_norms(grads, p) for p in (1.0, 2.0, 3.5, float("inf"))}
    ok._core._testing.set_chunk_elements(chunk)  # for norms: blocks of 4096 per chunk, at least one
    ok._core._testing.set_min_elements_per_thread(1)
    for threads in (2, 3):
        ok.set_num_threads(threads)
        for p, (per, total) in want.items():
            got_per, got_total = ok._core.grad_norms(grads, p)
            assert bits(got_per) == bits(per) and got_total == total


def test_thread_count_api():
    ok.set_num_threads(1)
    assert ok.get_num_threads() == 1
    ok.set_num_threads(2)
    assert ok.get_num_threads() == (2 if THREADED else 1)
    ok.set_num_threads(np.int64(3))  # NumPy integers are integers
    assert ok.get_num_threads() == (3 if THREADED else 1)
    ok.set_num_threads(MAX_THREADS)
    assert ok.get_num_threads() == (MAX_THREADS if THREADED else 1)


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), 2.0, np.float32(2), "2", None, [2]])
def test_set_num_threads_refuses_non_integers(bad):
    ok.set_num_threads(2)
    with pytest.raises(TypeError, match="n must be an int"):
        ok.set_num_threads(bad)
    assert ok.get_num_threads() == (2 if THREADED else 1)


@pytest.mark.parametrize("bad", [0, -1, -(10**30), MAX_THREADS + 1, 10**9, 10**30])
def test_set_num_threads_bounds(bad):
    ok.set_num_threads(2)
    with pytest.raises(ValueError, match="n must be (>= 1|<= %d)" % MAX_THREADS):
        ok.set_num_threads(bad)
    assert ok.get_num_threads() == (2 if THREADED else 1)


def python(code, env=None, timeout=120):
    """Runs code in a fresh interpreter under a timeout (a hang fails the test); its stdout."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("OPTKERN_NUM_THREADS", "OMP_NUM_THREADS")
    }
    full_env.update(env or {})
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


NUM_THREADS = "import optkern; print(optkern.get_num_threads())"


@functools.lru_cache(maxsize=None)
def default_thread_count():
    """A fresh interpreter's thread count without either variable (once per run)."""
    return python(NUM_THREADS)


@pytest.mark.skipif(not THREADED, reason="single-threaded build")
@pytest.mark.parametrize(
    "env, want",
    [
        ({"OMP_NUM_THREADS": "3"}, "3"),
        ({"OMP_NUM_THREADS": "5,2"}, "5"),  # one count per nesting level: the first
        ({"OPTKERN_NUM_THREADS": "4", "OMP_NUM_THREADS": "3"}, "4"),
        ({"OPTKERN_NUM_THREADS": " 6 "}, "6"),
        ({"OPTKERN_NUM_THREADS": str(MAX_THREADS)}, str(MAX_THREADS)),
    ],
)
def test_environment_is_honoured(env, want):
    assert python(NUM_THREADS, env) == want


@pytest.mark.skipif(not THREADED, reason="single-threaded build")
@pytest.mark.parametrize("value", ["0", "-2", "abc", "", "2.5", "3x", str(MAX_THREADS + 1), "9" * 30])
def test_invalid_environment_is_ignored(value):
    default = default_thread_count()
    assert python(NUM_THREADS, {"OPTKERN_NUM_THREADS": value}) == default
    assert python(NUM_THREADS, {"OMP_NUM_THREADS": value}) == default
    # An invalid OPTKERN_NUM_THREADS falls through to a valid OMP_NUM_THREADS.
    assert python(NUM_THREADS, {"OPTKERN_NUM_THREADS": value, "OMP_NUM_THREADS": "3"}) == "3"


@pytest.mark.parametrize("value", ["abc", "0", "2.5"])
def test_unreadable_optkern_num_threads_warns_at_import(value):
    code = """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import optkern
        print([str(w.message) for w in caught if w.category is RuntimeWarning])
    """
    out = python(code, {"OPTKERN_NUM_THREADS": value})
    assert f"OPTKERN_NUM_THREADS='{value}' is not a thread count" in out, out
    assert "it is ignored" in out
    # A readable count, or none, says nothing.
    assert python(code, {"OPTKERN_NUM_THREADS": "2"}) == "[]"
    assert python(code) == "[]"


def test_parsers():
    parse = ok._core._testing.parse_thread_count
    assert [parse(s) for s in ("1", "12", "4,2", " 7\t", "1024")] == [1, 12, 4, 7, 1024]
    assert [parse(s) for s in ("", "0", "-1", "1025", "x", "2 3", "+2", "0x10")] == [0] * 8
    cpu_max = ok._core._testing.cpus_from_cpu_max
    assert cpu_max("max 100000\n") == 0
    assert cpu_max("150000 100000\n") == 2  # 1.5 CPUs: two threads, each busy part of the time
    assert cpu_max("50000 100000") == 1  # half a CPU: still one
    assert cpu_max("400000 100000") == 4
    assert cpu_max("") == 0 and cpu_max("garbage 100000") == 0
    cfs = ok._core._testing.cpus_from_cfs
    assert cfs(-1, 100000) == 0 and cfs(200000, 100000) == 2 and cfs(1, 100000) == 1
    assert cfs(10**15, 1) == MAX_THREADS


@pytest.mark.skipif(not THREADED, reason="single-threaded build")
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity masks here")
def test_default_follows_affinity_and_quota():
    cpus = len(os.sched_getaffinity(0))
    assert ok._core._testing.affinity_cpus() == cpus
    quota = ok._core._testing.quota_cpus()
    want = min(cpus, quota) if quota > 0 else cpus
    assert python(NUM_THREADS) == str(min(want, MAX_THREADS))
    # A process pinned to one CPU defaults to one thread.
    one = sorted(os.sched_getaffinity(0))[0]
    code = f"import os; os.sched_setaffinity(0, {{{one}}}); {NUM_THREADS}"
    assert python(code) == "1"


def big_adam(threads, n=300_000, steps=3):
    ok.set_num_threads(threads)
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(n).astype(np.float32), rng.standard_normal(1001).astype(np.float32)]
    opt = ok.Adam(params, weight_decay=0.1)
    for _ in range(steps):
        opt.step([np.full_like(p, 0.5) for p in params])
    return [bits(p) for p in params]


@pytest.mark.skipif(not THREADED, reason="single-threaded build")
def test_refused_thread_means_fewer_threads():
    """Helpers are started when a call first needs them; when the system refuses one, the call
    runs on the threads it has (down to the calling thread alone), with the same results."""
    want = big_adam(1)
    code = """
    import numpy as np, optkern as ok
    ok._core._testing.fail_thread_creation_after({k})
    ok.set_num_threads(4)
    ok._core._testing.set_min_elements_per_thread(1)
    p = np.arange(300_000, dtype=np.float32); opt = ok.Adam([p])
    for _ in range(3):
        opt.step([np.ones_like(p)])
    print(ok._core._testing.pool_helpers(), float(p.sum()))
    """
    results = [python(code.format(k=k)).split() for k in (0, 1, 2, -1)]
    assert [r[0] for r in results] == ["0", "1", "2", "3"]
    assert len({r[1] for r in results}) == 1
    # In this process too: refused, then allowed again by set_num_threads.
    ok._core._testing.fail_thread_creation_after(0)
    assert big_adam(3) == want
    ok._core._testing.fail_thread_creation_after(-1)
    assert big_adam(3) == want


@pytest.mark.skipif(not THREADED or not hasattr(os, "fork"), reason="needs fork and threads")
@pytest.mark.skipif(
    not hasattr(__import__("resource"), "RLIMIT_NPROC") if os.name == "posix" else True,
    reason="no RLIMIT_NPROC",
)
def test_rlimit_nproc_does_not_kill_the_process():
    """A real refusal: the child lowers RLIMIT_NPROC to what it has, so pthread_create fails
    with EAGAIN (root is exempt from the limit: then the helpers simply start)."""
    code = """
    import os, resource, numpy as np, optkern as ok
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    except (ValueError, OSError):
        pass
    ok.set_num_threads(3)
    ok._core._testing.set_min_elements_per_thread(1)
    p = np.arange(300_000, dtype=np.float32); opt = ok.SGD([p], lr=0.5)
    opt.step([np.ones_like(p)])
    print(float(p[-1]))
    """
    assert python(code) == str(299_999 - 0.5)


FORK_STEP = """
import os, sys, numpy as np, optkern as ok
ok.set_num_threads(2)
ok._core._testing.set_min_elements_per_thread(1)
def step():
    p = np.arange(400_000, dtype=np.float32); opt = ok.Adam([p], lr=0.5)
    for _ in range(3):
        opt.step([np.ones_like(p)])
    return float(p.sum())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_os_fork_after_threaded_step():
    code = (
        FORK_STEP
        + """
    want = step()
    norm = lambda: ok._core.grad_norms([np.ones(300_001, np.float32)], 2.0)[1]
    want_norm = norm()
    assert ok._core._testing.pool_helpers() >= (1 if ok.build_info()["threads"] != "none" else 0)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if step() == want and norm() == want_norm else 3)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), step() == want)
    """
    )
    assert (
        python(textwrap.dedent(FORK_STEP) + textwrap.dedent(code[len(FORK_STEP) :]), timeout=60)
        == "0 True"
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_fork_while_another_thread_steps():
    """fork waits for a call in flight; the child still steps (many forks against a thread
    stepping in a loop)."""
    code = (
        FORK_STEP
        + """
import threading
want = step()
stop = threading.Event()
def loop():
    while not stop.is_set():
        step()
t = threading.Thread(target=loop); t.start()
codes = []
for _ in range(20):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if step() == want else 3)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
stop.set(); t.join()
print(codes == [0] * 20)
"""
    )
    assert python(code, timeout=120) == "True"


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_pool(method, tmp_path):
    import multiprocessing

    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} here")
    code = (
        FORK_STEP
        + f"""
import multiprocessing
def work(_):
    return step()
if __name__ == "__main__":
    want = step()
    with multiprocessing.get_context("{method}").Pool(2) as pool:
        got = pool.map(work, range(4))
    print(got == [want] * 4)
"""
    )
    script = tmp_path / "pool_script.py"  # spawn's children import the main module from its file
    script.write_text(code)
    assert (
        python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", timeout=120)
        == "True"
    )


def _late_helper_calls(adaptive, calls):
    """`calls` multi-threaded functional Adam calls with every helper late (paused): the pool's
    counters over them, and the results."""
    from optkern import functional as F

    ok.set_num_threads(2)
    ok._core._testing.set_min_elements_per_thread(1)
    ok._core._testing.set_chunk_elements(64)
    ok._core._testing.set_adaptive_threads(adaptive)
    ok._core._testing.pause_helpers(True)
    rng = np.random.default_rng(3)
    p, g = rng.standard_normal(5000).astype(np.float32), rng.standard_normal(5000).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    before = ok._core._testing.pool_stats()
    for k in range(calls):
        F.adam_([p], [g], [m], [v], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=k + 1)
    after = ok._core._testing.pool_stats()
    ok._core._testing.pause_helpers(False)
    pool_keys = ("calls", "helper_chunks", "late_calls", "serial_calls")  # not the gomp backend's
    return {k: after[k] - before[k] for k in pool_keys}, [bits(p), bits(m), bits(v)]


@pytest.mark.skipif(not THREADED, reason="single-threaded build")
def test_late_helpers_back_off():
    """When the helpers ran no chunk of two calls in a row, the next 4 calls run on the calling
    thread alone, then one probes with helpers; a late probe doubles the backoff. Results are
    the same as with adaptation off and as on one thread."""
    assert ok._core._testing.adaptive_threads()
    on, on_bits = _late_helper_calls(True, 10)
    # calls 1, 2 late -> 3-6 alone -> 7 late (probe) -> 8-10 alone (backoff 8)
    assert on == {"calls": 3, "helper_chunks": 0, "late_calls": 3, "serial_calls": 7}
    off, off_bits = _late_helper_calls(False, 10)
    assert off == {"calls": 10, "helper_chunks": 0, "late_calls": 10, "serial_calls": 0}
    ok._core._testing.set_adaptive_threads(True)
    assert on_bits == off_bits
    from optkern import functional as F

    ok.set_num_threads(1)
    rng = np.random.default_rng(3)
    p, g = rng.standard_normal(5000).astype(np.float32), rng.standard_normal(5000).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for k in range(10):
        F.adam_([p], [g], [m], [v], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=k + 1)
    assert [bits(p), bits(m), bits(v)] == on_bits


def test_python_threads_while_pool_busy():
    """Several Python threads run multi-threaded calls at once: one owns the pool, the others
    run on their own threads; none waits for long, and all give the serial results."""
    want = big_adam(1)
    ok._core._testing.set_min_elements_per_thread(1)
    ok._core._testing.set_chunk_elements(64)  # many chunks: the pool stays busy longer
    results = [None] * 4

    def target(i):
        results[i] = big_adam(2, steps=3)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hung"
    assert results == [want] * 4


SIDE_EFFECTS = """
import ctypes, ctypes.util, json, os, sys
import numpy as np
libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
try:
    import threadpoolctl  # sets KMP_DUPLICATE_LIB_OK when imported: before the first look
except ImportError:
    threadpoolctl = None
try:
    import torch
except ImportError:
    torch = None
FE_ALL = 0x3D if sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "i686") else -1
def state():
    s = {"env": dict(os.environ), "round": libm.fegetround(), "seterr": np.geterr(),
         "except": libm.fetestexcept(FE_ALL) if FE_ALL != -1 else None}
    s["blas"] = (sorted((i["internal_api"], i["num_threads"]) for i in threadpoolctl.threadpool_info())
                 if threadpoolctl else "no threadpoolctl")
    s["torch"] = (torch.get_num_threads(), torch.get_num_interop_threads()) if torch else "no torch"
    return s
a = np.ones((64, 64)); a @ a   # start NumPy's BLAS threads
before = state()
import optkern as ok
ok._core._testing.set_min_elements_per_thread(1)
p = np.arange(500_000, dtype=np.float32); opt = ok.AdamW([p])
for _ in range(3):
    opt.step([np.ones_like(p)], max_grad_norm=1.0)
if WITH_TORCH:  # optkern.torch builds torch.optim optimizers at import (torch's dynamo import)
    import optkern.torch as okt
    t = torch.zeros(500_000, requires_grad=True); topt = okt.Adam([t])
    for _ in range(3):
        t.grad = torch.ones_like(t); topt.step(); topt.zero_grad()
    torch.optim.SGD([t], lr=0.1).step()
    okt.Adam([t]).state_dict()
after = state()
print(json.dumps([before == after, before["blas"], before["torch"],
                  {k: (before[k], after[k]) for k in before if before[k] != after[k]}],
                 default=str))
"""


@pytest.mark.parametrize("with_torch", [False, True], ids=["numpy", "optkern.torch"])
def test_no_side_effects(with_torch):
    import json

    if with_torch:
        pytest.importorskip("torch")
    script = f"WITH_TORCH = {with_torch}\n" + SIDE_EFFECTS
    same, blas, torch_threads, diff = json.loads(python(script, {"OMP_NUM_THREADS": "2"}))
    assert same, diff
    # What was compared (for the record; either may be absent).
    print("BLAS pools:", blas, "torch threads:", torch_threads)
