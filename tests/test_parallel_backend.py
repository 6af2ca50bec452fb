"""The "gomp" parallel backend: optkern's chunks on the calling thread's GNU OpenMP team.

_core.set_parallel_backend("gomp") hands the pool's chunk loop to GOMP_parallel of a libgomp
the process has already loaded (torch's). Checked here:

- it is refused ("pool" stays in effect) when no libgomp is loaded, for a library not loaded,
  and for a library without GOMP_parallel; unknown names raise;
- results are bit-identical to the pool's and to one thread, for every rule and chunking;
- the team size follows torch.get_num_threads() (one torch thread: no multi-threaded call);
- several Python threads stepping at once, and a step from a thread other than the main one
  (which gets its own OpenMP team), give the single-thread results;
- fork: a child goes back to the pool and steps (torch itself hangs in such a child if it runs
  a parallel op there, so the child here runs optkern only), under a timeout;
- signals and KeyboardInterrupt between steps leave the backend working;
- torch imported after optkern: the backend can be set then, not before.

Each process-level check runs in a fresh interpreter under a timeout (a hang fails the test).
"""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
from helpers import step_bits
from optim_db import CASES, case_id

import optkern as ok

THREADED = ok.build_info()["threads"] != "none"
pytestmark = pytest.mark.skipif(not THREADED, reason="single-threaded build")


def python(code, timeout=120):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPTKERN_NUM_THREADS", "OMP_NUM_THREADS", "OPTKERN_PARALLEL_BACKEND")
    }
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="pool"):
        ok._core.set_parallel_backend("openmp")


def test_refused_without_libgomp():
    """No torch: nothing loaded a libgomp (checked in /proc/self/maps), so "gomp" is refused;
    a path that is not loaded, or a library without GOMP_parallel, is refused too."""
    out = python(
        """
        import optkern as ok, numpy as np
        maps = open("/proc/self/maps").read() if __import__("os").path.exists("/proc/self/maps") else ""
        loaded = "libgomp" in maps
        print(loaded, ok._core.set_parallel_backend("gomp"), ok._core.parallel_backend())
        print(ok._core.set_parallel_backend("gomp", "/nonexistent/libgomp.so.1"))
        print(ok._core.set_parallel_backend("gomp", ok._core.__file__))
        """
    )
    lines = out.splitlines()
    if not lines[0].startswith("True"):
        assert lines[0] == "False pool ('pool', '')"
    assert lines[1:] == ["pool", "pool"]


torch = None


@pytest.fixture
def gomp():
    global torch
    torch = pytest.importorskip("torch")
    if ok._core.set_parallel_backend("gomp") != "gomp":
        pytest.skip("torch did not load a libgomp (not a GNU OpenMP build of torch)")
    threads, torch_threads = ok.get_num_threads(), torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    ok._core.set_parallel_backend("pool")
    ok._core._testing.set_chunk_elements(0)
    ok._core._testing.set_min_elements_per_thread(32768)
    ok.set_num_threads(threads)
    torch.set_num_threads(torch_threads)


def run(name, hp, threads, steps=4):
    return step_bits(name, hp, threads, min_per_thread=1, steps=steps, seed=7)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bit_identical_to_one_thread_and_pool(gomp, case):
    name, hp = case
    single = run(name, hp, threads=1)
    ok._core.set_parallel_backend("pool")
    pooled = run(name, hp, threads=2)
    assert ok._core.set_parallel_backend("gomp") == "gomp"
    for chunk in (0, 64, 4096):
        ok._core._testing.set_chunk_elements(chunk)
        assert run(name, hp, threads=2) == single == pooled


def test_calls_run_on_the_team(gomp):
    ok._core._testing.set_adaptive_threads(False)
    try:
        before = ok._core._testing.pool_stats()
        run("Adam", {}, threads=2)
        after = ok._core._testing.pool_stats()
        # Multi-threaded calls, all on the team (adaptive off: no slow-team fallback to the pool).
        assert after["calls"] > before["calls"]
        assert after["gomp_calls"] - before["gomp_calls"] == after["calls"] - before["calls"]
        assert after["gomp_pool_calls"] == before["gomp_pool_calls"]
        torch.set_num_threads(1)  # the team is torch's size: one thread, no team call
        before = ok._core._testing.pool_stats()["calls"]
        single = run("Adam", {}, threads=2)
        assert ok._core._testing.pool_stats()["calls"] == before
        torch.set_num_threads(2)
        assert run("Adam", {}, threads=2) == single
    finally:
        ok._core._testing.set_adaptive_threads(True)


def test_torch_ops_between_steps(gomp):
    """torch's parallel ops and optkern's steps on the same team, alternating."""
    t = torch.randn(2_000_000)
    want = run("AdamW", {"weight_decay": 0.1}, threads=1)
    for _ in range(3):
        torch.add(t, t).sum()
        assert run("AdamW", {"weight_decay": 0.1}, threads=2) == want


def test_python_threads_at_once(gomp):
    """Four Python threads step at once: one owns the backend, the others run on their own
    thread; a thread alone creates its own OpenMP team. Every result is the single-thread one."""
    want = run("Adam", {"amsgrad": True}, threads=1)
    ok.set_num_threads(2)
    results, errors = [], []
    barrier = threading.Barrier(4)

    def worker():
        try:
            barrier.wait()
            for _ in range(3):
                results.append(run("Adam", {"amsgrad": True}, threads=2))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 12
    assert all(r == want for r in results)
    out = []
    t = threading.Thread(target=lambda: out.append(run("Adam", {"amsgrad": True}, threads=2)))
    t.start()
    t.join(timeout=120)
    assert out == [want]


GOMP_STEP = """
import os, signal, sys, numpy as np, torch, optkern as ok
import optkern.torch
torch.set_num_threads(2)
ok.set_num_threads(2)
ok._core._testing.set_min_elements_per_thread(1)
ok._core._testing.set_adaptive_threads(False)
if ok._core.set_parallel_backend("gomp") != "gomp":
    print("no libgomp"); sys.exit(0)
def step():
    p = np.arange(400_000, dtype=np.float32); opt = ok.Adam([p], lr=0.5)
    for _ in range(3):
        opt.step([np.ones_like(p)])
    return float(p.sum())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_fork_child_steps_on_the_pool():
    pytest.importorskip("torch")
    out = python(
        GOMP_STEP
        + """
t = torch.randn(2_000_000); torch.add(t, t)  # torch's team is up in the parent
want = step()
codes = []
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        ok_child = ok._core.parallel_backend() == ("pool", "") and step() == want
        os._exit(0 if ok_child else 3)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(codes, ok._core.parallel_backend()[0], step() == want)
""",
        timeout=120,
    )
    assert out in ("[0, 0, 0, 0, 0] gomp True", "no libgomp")


def test_signals_and_keyboard_interrupt():
    """A 1 ms interval timer interrupts steps on the team; its handler raises
    KeyboardInterrupt after 20 ticks. Steps finish, and the backend works afterwards."""
    pytest.importorskip("torch")
    out = python(
        GOMP_STEP
        + """
want = step()
ticks = [0]
def on_tick(signum, frame):
    ticks[0] += 1
    if ticks[0] == 20:
        raise KeyboardInterrupt
signal.signal(signal.SIGALRM, on_tick)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
interrupted = False
try:
    for _ in range(10_000):
        assert step() == want
except KeyboardInterrupt:
    interrupted = True
signal.setitimer(signal.ITIMER_REAL, 0)
print(interrupted, ok._core.parallel_backend()[0], step() == want)
""",
        timeout=120,
    )
    assert out in ("True gomp True", "no libgomp")


def test_torch_imported_after_optkern():
    pytest.importorskip("torch")
    out = python(
        """
        import numpy as np, optkern as ok
        ok.set_num_threads(2)
        ok._core._testing.set_min_elements_per_thread(1)
        first = ok._core.set_parallel_backend("gomp")
        p = np.arange(300_000, dtype=np.float32); ok.Adam([p]).step([np.ones_like(p)])
        import torch
        torch.set_num_threads(2)
        second = ok._core.set_parallel_backend("gomp")
        q = np.arange(300_000, dtype=np.float32); ok.Adam([q]).step([np.ones_like(q)])
        print(first, second, bool((p == q).all()))
        """
    )
    assert out in ("pool gomp True", "pool pool True", "gomp gomp True")


def test_optkern_torch_turns_it_on_and_env_keeps_the_pool():
    """Importing optkern.torch puts the chunks on torch's libgomp when torch's wheel ships one;
    OPTKERN_PARALLEL_BACKEND=pool keeps optkern's pool."""
    torch = pytest.importorskip("torch")
    from optkern._torch_threads import torch_libgomp

    code = """
        import optkern.torch, optkern
        print(*optkern._core.parallel_backend())
        print(optkern.build_info()["threads"])
        """
    libs = torch_libgomp(torch)
    backend, threads = python(code).splitlines()
    out = backend.split()
    if libs:
        assert out[0] == "gomp" and out[1] in libs
        assert threads.startswith("gomp team")  # build_info says which backend runs the chunks
    else:
        assert out == ["pool"] and threads == "optkern pool"
    env = dict(os.environ, OPTKERN_PARALLEL_BACKEND="pool")
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    backend, threads = res.stdout.splitlines()
    assert backend.split() == ["pool"] and threads == "optkern pool"


@pytest.mark.parametrize("value", ["pool ", "POOL", "gomp", ""])
def test_backend_variable_accepts_its_values(value):
    code = "import optkern.torch"
    env = dict(os.environ, OPTKERN_PARALLEL_BACKEND=value)
    pytest.importorskip("torch")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("value", ["pol", "openmp", "gomp,pool", "1"])
def test_backend_variable_typo_fails_the_import_naming_it(value):
    pytest.importorskip("torch")
    env = dict(os.environ, OPTKERN_PARALLEL_BACKEND=value)
    proc = subprocess.run(
        [sys.executable, "-c", "import optkern.torch"], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "OPTKERN_PARALLEL_BACKEND" in proc.stderr and repr(value) in proc.stderr
