"""Python threads. The kernels release the GIL, so threads really run updates at the same time.

- Different optimizers stepped from several threads at once give exactly (bit for bit) the
  results of stepping them one after another, also when each call is itself split across OpenMP
  threads and when the threads share (read-only) gradient arrays.
- One optimizer stepped from two threads at once serialises on its lock: its parameters and
  state end exactly where the same number of serial steps puts them, and state_dict() or
  load_state_dict() called meanwhile see or replace whole steps, never half of one.
"""

import threading
import time

import numpy as np
import pytest
import optim_db as db
from helpers import bits

import optkern as ok
from optkern import functional as F

#: One (class, options) per class of the optimizer database: the options that keep every state.
CONFIGS = db.richest()
SIZES = [70001, 1031, 3]
STEPS = 12


def gradients(seed):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(n).astype(np.float32) for n in SIZES] for _ in range(STEPS)]


def build(name, hp, seed):
    rng = np.random.default_rng(1000 + seed)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    return getattr(ok, name)(params, **hp), params


def result(opt, params):
    return [bits(p) for p in params] + [
        bits(v) if isinstance(v, np.ndarray) else repr(v)
        for p in params
        for v in opt.state[p].values()
    ]


def run_in_threads(targets):
    """Runs each callable in its own thread, all released at once; re-raises the first error."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def wrap(f):
        try:
            barrier.wait()
            f()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(f,)) for f in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


@pytest.fixture(params=["1 thread per call", "2 threads per call"])
def openmp_split(request):
    if request.param.startswith("2"):
        ok.set_num_threads(2)
        ok._core._testing.set_min_elements_per_thread(512)  # split even these small calls
    else:
        ok.set_num_threads(1)


def test_different_optimizers_in_threads_match_serial(openmp_split):
    grads = {i: gradients(i) for i in range(len(CONFIGS))}
    serial = []
    for i, (name, hp) in enumerate(CONFIGS):
        opt, params = build(name, hp, i)
        for g in grads[i]:
            opt.step(g)
        serial.append(result(opt, params))
    for _ in range(3):
        built = [build(name, hp, i) for i, (name, hp) in enumerate(CONFIGS)]

        def stepper(i):
            opt = built[i][0]
            return lambda: [opt.step(g) for g in grads[i]]

        run_in_threads([stepper(i) for i in range(len(CONFIGS))])
        assert [result(opt, params) for opt, params in built] == serial


def test_threads_sharing_gradients_match_serial(openmp_split):
    """Several optimizers read the same gradient arrays at the same time."""
    shared = gradients(7)
    for g in shared:
        for a in g:
            a.flags.writeable = False
    serial = []
    for i, (name, hp) in enumerate(CONFIGS):
        opt, params = build(name, hp, i)
        for g in shared:
            opt.step(g)
        serial.append(result(opt, params))
    built = [build(name, hp, i) for i, (name, hp) in enumerate(CONFIGS)]
    run_in_threads([lambda opt=opt: [opt.step(g) for g in shared] for opt, _ in built])
    assert [result(opt, params) for opt, params in built] == serial


def test_functional_calls_in_threads_match_serial(openmp_split):
    def job(seed):
        rng = np.random.default_rng(seed)
        ps = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        ms = [np.zeros(n, np.float32) for n in SIZES]
        vs = [np.zeros(n, np.float32) for n in SIZES]
        gs = gradients(seed)

        def run():
            for t, g in enumerate(gs, start=1):
                F.adamw_(ps, g, ms, vs, step=t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)

        return run, lambda: [bits(a) for a in ps + ms + vs]

    serial = []
    for seed in range(4):
        run, out = job(seed)
        run()
        serial.append(out())
    jobs = [job(seed) for seed in range(4)]
    run_in_threads([run for run, _ in jobs])
    assert [out() for _, out in jobs] == serial


@pytest.mark.parametrize("name, hp", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_one_optimizer_from_two_threads_serialises(name, hp, openmp_split):
    """Both threads pass the same gradient values on every step, so every order of whole steps
    gives the same numbers: 2N serial steps. Two steps overlapping in the kernels would lose or
    double-apply updates (and miscount steps), which this would see."""
    g = gradients(3)[0]
    n = 25
    ref, ref_params = build(name, hp, 0)
    for _ in range(2 * n):
        ref.step(g)
    opt, params = build(name, hp, 0)
    copies = [[a.copy() for a in g] for _ in range(2)]  # same values, separate arrays
    run_in_threads([lambda c=c: [opt.step(c) for _ in range(n)] for c in copies])
    assert result(opt, params) == result(ref, ref_params)
    if "step" in opt.state[params[0]]:
        assert opt.state[params[0]]["step"] == 2 * n


def test_step_waits_while_another_thread_holds_the_optimizer():
    opt, params = build("Adam", {}, 0)
    before = [bits(p) for p in params]
    done = threading.Event()
    with opt._lock:
        t = threading.Thread(target=lambda: (opt.step(gradients(0)[0]), done.set()))
        t.start()
        assert not done.wait(0.3), "step() ran while another thread held the optimizer"
        assert [bits(p) for p in params] == before
    t.join(timeout=60)
    assert done.is_set() and [bits(p) for p in params] != before


def test_state_dict_and_load_while_stepping_see_whole_steps(openmp_split):
    """A thread steps with one constant gradient while others snapshot the state and load it
    back: every snapshot equals the serial state after some whole number of steps, and loading
    a snapshot of the current state in between changes nothing."""
    g = gradients(5)[0]
    n = 30
    ref, _ = build("Adam", dict(amsgrad=True), 0)
    serial = {}
    for t in range(1, n + 1):
        ref.step(g)
        serial[t] = ref.state_dict()["state"]
    final_ref = result(ref, ref.param_groups[0]["params"])

    opt, params = build("Adam", dict(amsgrad=True), 0)
    stop = threading.Event()
    seen = []

    first_snapshot = threading.Event()

    # Every thread pauses briefly between calls: the optimizer's lock is not fair, and a thread
    # that re-takes it at once can starve the others for seconds (minutes under sanitizers).
    def stepper():
        try:
            first_snapshot.wait(timeout=60)  # so that snapshots interleave with the steps
            for _ in range(n):
                opt.step(g)
                time.sleep(1e-4)
        finally:
            stop.set()

    def snapshots():
        while not stop.is_set():
            seen.append(opt.state_dict()["state"])
            first_snapshot.set()
            time.sleep(1e-4)

    def reloader():
        while not stop.is_set():
            with opt._lock:  # state_dict + load as one unit, so no step falls between them
                opt.load_state_dict(opt.state_dict())
            time.sleep(1e-4)

    run_in_threads([stepper, snapshots, reloader])
    assert result(opt, params) == final_ref
    assert seen, "no snapshot was taken"
    for state in seen:
        if not state:
            continue  # taken before the first step
        steps = {s["step"] for s in state.values()}
        assert len(steps) == 1, f"a snapshot mixes steps {steps}"
        t = steps.pop()
        for i, s in state.items():
            for key, value in s.items():
                if isinstance(value, np.ndarray):
                    assert bits(value) == bits(serial[t][i][key]), (t, i, key)
