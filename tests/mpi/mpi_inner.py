"""Tests that run on every rank under ``mpiexec -n N python -m pytest tests/mpi/mpi_inner.py``
(test_mpi.py launches them for N = 1, 2, 3, 4). The file name does not match ``test_*.py``, so a
plain ``python -m pytest`` never collects it; run directly without MPI it skips.

Every test calls the same collectives in the same order on every rank; a rank that fails an
assertion before a collective leaves the others to OPTKERN_MPI_TIMEOUT (set by the launcher),
which aborts the job, and the launcher reports the failure.
"""

import math
import os

import numpy as np
import pytest

if not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
    pytest.skip(
        "runs only under mpiexec (tests/mpi/test_mpi.py launches it)", allow_module_level=True
    )

MPI = pytest.importorskip("mpi4py.MPI")

import optim_db as db  # noqa: E402  (tests/, on the path by tests/conftest.py)

import optkern as ok  # noqa: E402
from optkern import distributed as okd  # noqa: E402

COMM = MPI.COMM_WORLD
N = COMM.Get_size()
RANK = COMM.Get_rank()

# Every class of the optimizer database (tests/optim_db.py), each with its MPI options (picked
# away from the defaults; a class without any runs with its defaults but a small lr: some
# defaults, such as Schedule-Free SGD's lr=1, diverge on this model; the tests compare runs, not
# values).
CLASSES = [e.cls for e in db.ENTRIES]


def hyper_of(cls):
    return db.entry(cls.__name__).mpi


# a linear least-squares model with sizes that no N divides, and a layout with padding
SHAPES = [(13, 7), (7,), (7, 3), (3,)]
B = 8  # batch per rank
STEPS = 100
# float32 tolerance after 100 steps between N ranks x batch B and one process x batch N*B, for
# every optimizer (the gradients differ by summation order only). Measured with N = 2, 3, 4:
# |got - expected| <= 8.2e-7 * (0.1 + |expected|), ten times inside this.
RTOL, ATOL = 1e-5, 1e-6


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 0.3).astype(np.float32) for s in SHAPES]


def data(step, n_ranks):
    """The global batch of a step (n_ranks * B rows); rank r takes rows r*B:(r+1)*B."""
    rng = np.random.default_rng(10_000 + step)
    X = rng.standard_normal((n_ranks * B, 13)).astype(np.float32)
    Y = rng.standard_normal((n_ranks * B, 3)).astype(np.float32)
    return X, Y


def gradients(params, X, Y):
    """Gradients of the mean squared error of a two-layer linear net over the rows of X."""
    W1, b1, W2, b2 = params
    H = X @ W1 + b1
    out = H @ W2 + b2
    d = (2.0 / X.shape[0]) * (out - Y)
    gW2 = H.T @ d
    gb2 = d.sum(0)
    dH = d @ W2.T
    return [np.ascontiguousarray(g, dtype=np.float32) for g in (X.T @ dH, dH.sum(0), gW2, gb2)]


def reference(cls, steps=STEPS, **step_kw):
    params = init_params()
    opt = cls(params, **hyper_of(cls))
    for t in range(steps):
        X, Y = data(t, N)
        opt.step(gradients(params, X, Y), **step_kw)
    return params, opt


def run_wrapped(make, steps=STEPS, **step_kw):
    params = init_params()
    opt = make(params)
    for t in range(steps):
        X, Y = data(t, N)
        rows = slice(RANK * B, (RANK + 1) * B)
        opt.step(gradients(params, X[rows], Y[rows]), **step_kw)
    return params, opt


def close(a, b):
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def identical_everywhere(arrays):
    okd.check_identical(arrays, COMM)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_data_parallel_matches_one_process(cls):
    ref, _ = reference(cls)
    got, dp = run_wrapped(lambda p: okd.DataParallel(cls(p, **hyper_of(cls)), bucket_mb=1e-4))
    assert len(dp.buckets) > 1
    identical_everywhere(got)
    close(got, ref)


# ZeRO shards arrays element-wise: rules with a per-array reduction (LAMB) or factored state
# (Adafactor's row and column factors) are refused.
ZERO_CLASSES = [e.cls for e in db.ENTRIES if e.zero]


def test_zero_refuses_rules_that_reduce_over_an_array():
    for cls in CLASSES:
        if not db.entry(cls.__name__).zero:
            p = [np.ones(5, np.float32)]
            with pytest.raises(ValueError, match="cannot shard"):
                okd.ZeroRedundancyOptimizer(cls, p, **hyper_of(cls))


@pytest.mark.parametrize("cls", ZERO_CLASSES, ids=lambda c: c.__name__)
def test_zero_matches_one_process(cls):
    ref, ref_opt = reference(cls, max_grad_norm=0.5)
    got, zero = run_wrapped(
        lambda p: okd.ZeroRedundancyOptimizer(cls, p, **hyper_of(cls)), max_grad_norm=0.5
    )
    identical_everywhere(got)
    close(got, ref)
    # the consolidated state has the single-process layout and values
    sd, ref_sd = zero.state_dict(), ref_opt.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    for i, entry in ref_sd["state"].items():
        assert sd["state"][i].keys() == entry.keys()
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_allclose(sd["state"][i][name], value, rtol=1e-3, atol=1e-5)
            else:
                assert sd["state"][i][name] == value
    assert sd["step_count"] == ref_sd["step_count"] == STEPS
    single = cls(init_params(), **hyper_of(cls))
    single.load_state_dict(sd)  # loads into a single-process optimizer


def test_zero_state_is_sharded():
    params = [np.zeros(10_007, np.float32), np.zeros(3, np.float32)]
    zero = okd.ZeroRedundancyOptimizer(ok.Adam, params, lr=1e-3)
    zero.step([np.ones(10_007, np.float32), np.ones(3, np.float32)])
    whole = sum(v.nbytes for p in params for v in (p, p))  # exp_avg + exp_avg_sq
    total = COMM.allreduce(zero.state_bytes())
    assert whole <= total <= whole + 2 * 4 * 16 * 2  # the whole, plus the layout's padding
    assert zero.state_bytes() <= whole / N + 2 * 4 * 16
    sd = zero.local_state_dict()
    assert sd["zero"]["range"] == [zero.lo, zero.hi]


@pytest.mark.parametrize("wrapper", ["dp", "zero"])
def test_clipping_and_skip_decide_the_same_everywhere(wrapper):
    params = init_params()
    if wrapper == "dp":
        opt = okd.DataParallel(ok.Adam(params, lr=1e-2))
        inner = opt.optimizer
    else:
        opt = inner = okd.ZeroRedundancyOptimizer(ok.Adam, params, lr=1e-2)
    before = [p.copy() for p in params]
    grads = [np.ones(s, np.float32) for s in SHAPES]
    if RANK == N - 1:
        grads[1][2] = np.nan  # non-finite on one rank only
    norm = opt.step(grads, skip_if_nonfinite=True)
    assert math.isnan(norm)
    assert inner.skipped_steps == 1 and inner.step_count == 0
    for p, q in zip(params, before):
        np.testing.assert_array_equal(p, q)
    # a finite step with clipping: the same norm everywhere
    grads = [np.full(s, RANK + 1.0, np.float32) for s in SHAPES]
    norm = opt.step(grads, max_grad_norm=1.0, skip_if_nonfinite=True)
    norms = COMM.allgather(norm)
    assert all(n == norms[0] for n in norms)
    n_elems = sum(int(np.prod(s)) for s in SHAPES)
    assert norm == pytest.approx((N + 1) / 2 * math.sqrt(n_elems), rel=1e-6)
    identical_everywhere(params)


def test_deterministic_runs_are_bitwise_identical():
    def make_dp(p):
        return okd.DataParallel(ok.Adam(p, lr=1e-2), bucket_mb=1e-4, deterministic=True)

    def make_zero(p):
        return okd.ZeroRedundancyOptimizer(ok.Adam, p, lr=1e-2, deterministic=True)

    a, _ = run_wrapped(make_dp, steps=30)
    b, _ = run_wrapped(make_dp, steps=30)
    c, _ = run_wrapped(make_zero, steps=30)
    d, _ = run_wrapped(make_zero, steps=30)
    for x, y, z, w in zip(a, b, c, d):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(z, w)
        # both sum the ranks' gradients in rank order: the same averaged gradient, same update
        np.testing.assert_array_equal(x, z)
    identical_everywhere(a + c)


def test_start_overlaps_and_gives_the_same_result():
    p1, p2 = init_params(), init_params()
    dp1 = okd.DataParallel(ok.Adam(p1, lr=1e-2), bucket_mb=1e-4)
    dp2 = okd.DataParallel(ok.Adam(p2, lr=1e-2), bucket_mb=1e-4)
    for t in range(5):
        X, Y = data(t, N)
        rows = slice(RANK * B, (RANK + 1) * B)
        g = gradients(p1, X[rows], Y[rows])
        dp1.start([None, None, g[2], g[3]])  # the last layer's gradients first
        dp1.progress()
        dp1.step(g)
        dp2.step([x.copy() for x in g])
    for x, y in zip(p1, p2):
        np.testing.assert_array_equal(x, y)


def test_grad_buffers_are_used_without_copy():
    params = init_params()
    dp = okd.DataParallel(ok.SGD(params, lr=0.1))
    for view, s in zip(dp.grad_buffers, SHAPES):
        view[...] = RANK + 1
    before = [p.copy() for p in params]
    dp.step(dp.grad_buffers)
    for p, q in zip(params, before):
        np.testing.assert_allclose(p, q - np.float32(0.1 * (N + 1) / 2), rtol=1e-6, atol=1e-6)


def test_none_gradient_skips_that_parameter_everywhere():
    params = init_params()
    dp = okd.DataParallel(ok.Adam(params, lr=1e-2))
    before = params[1].copy()
    dp.step(
        [
            np.ones(SHAPES[0], np.float32),
            None,
            np.ones(SHAPES[2], np.float32),
            np.ones(SHAPES[3], np.float32),
        ]
    )
    np.testing.assert_array_equal(params[1], before)
    assert params[1] not in dp.optimizer.state


def test_zero_groups_flat_params_and_lr_changes():
    fp = ok.FlatParams(SHAPES)
    for v, p in zip(fp, init_params()):
        v[...] = p
    ref = init_params()
    ref_opt = ok.Adam([{"params": ref[:2], "lr": 1e-2}, {"params": ref[2:]}], lr=3e-3)
    zero = okd.ZeroRedundancyOptimizer(
        ok.Adam, [{"params": list(fp)[:2], "lr": 1e-2}, {"params": list(fp)[2:]}], lr=3e-3
    )
    assert zero._zero_copy  # the FlatParams block is the storage
    sched = ok.lr_scheduler.StepLR(zero.optimizer, step_size=3, gamma=0.5)
    ref_sched = ok.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.5)
    grads = fp.zeros_like()
    for t in range(12):
        X, Y = data(t, N)
        rows = slice(RANK * B, (RANK + 1) * B)
        for v, g in zip(grads, gradients(list(fp), X[rows], Y[rows])):
            v[...] = g
        zero.step(list(grads))
        ref_opt.step(gradients(ref, X, Y))
        sched.step()
        ref_sched.step()
    close(list(fp), ref)
    identical_everywhere(list(fp))
    assert zero.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < 1e-2


def test_zero_refuses_none_and_bad_shapes_on_one_rank():
    if N != 1:
        pytest.skip("an error on one rank of several aborts the job (test_mpi.py tests that)")
    zero = okd.ZeroRedundancyOptimizer(ok.Adam, init_params(), lr=1e-2)
    with pytest.raises(ValueError, match="None"):
        zero.step([None] * len(SHAPES))
    with pytest.raises(ValueError, match="shape"):
        zero.step([np.zeros(3, np.float32)] * len(SHAPES))


def _shared_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt")) if RANK == 0 else None
    return COMM.bcast(path)


@pytest.mark.parametrize("cls", ZERO_CLASSES, ids=lambda c: c.__name__)
def test_sharded_checkpoint_resumes_bitwise_and_reshards(cls, tmp_path_factory):
    hyper = hyper_of(cls)
    root = _shared_dir(tmp_path_factory)
    ckpt = os.path.join(root, "sharded")
    whole = os.path.join(root, "whole.npz")
    params, zero = run_wrapped(lambda p: okd.ZeroRedundancyOptimizer(cls, p, **hyper), steps=5)
    okd.save(zero, ckpt)
    okd.save(zero, ckpt)  # a second generation replaces the first
    okd.save(zero, whole, consolidated=True)
    assert len([f for f in os.listdir(ckpt) if f.startswith("shard-")]) == N
    expected = zero.state_dict()
    saved_params = [p.copy() for p in params]
    # continue 3 steps: the reference
    for t in range(5, 8):
        X, Y = data(t, N)
        rows = slice(RANK * B, (RANK + 1) * B)
        zero.step(gradients(params, X[rows], Y[rows]))
    # a fresh optimizer loaded from the checkpoint continues bitwise identically
    params2 = [p.copy() for p in saved_params]
    zero2 = okd.ZeroRedundancyOptimizer(cls, params2, **hyper)
    okd.load(zero2, ckpt)
    for t in range(5, 8):
        X, Y = data(t, N)
        rows = slice(RANK * B, (RANK + 1) * B)
        zero2.step(gradients(params2, X[rows], Y[rows]))
    for x, y in zip(params, params2):
        np.testing.assert_array_equal(x, y)
    # onto other numbers of ranks: one rank alone (COMM_SELF), and a DataParallel
    alone = okd.ZeroRedundancyOptimizer(cls, [p.copy() for p in saved_params], MPI.COMM_SELF, **hyper)
    okd.load(alone, ckpt)
    dp = okd.DataParallel(cls([p.copy() for p in saved_params], **hyper))
    okd.load(dp, ckpt)
    single = cls([p.copy() for p in saved_params], **hyper)
    ok.load(single, whole)  # the consolidated file is ok.save's format
    for sd in (alone.state_dict(), dp.state_dict(), single.state_dict()):
        assert sd["step_count"] == expected["step_count"] == 5
        for i, entry in expected["state"].items():
            for name, value in entry.items():
                np.testing.assert_array_equal(sd["state"][i][name], value)
    # and back: a DataParallel's sharded checkpoint loads into a ZeRO over a sub-communicator
    okd.save(dp, ckpt)
    sub = COMM.Split(0 if RANK < max(1, N - 1) else 1, RANK)
    z3 = okd.ZeroRedundancyOptimizer(cls, [p.copy() for p in saved_params], sub, **hyper)
    okd.load(z3, ckpt)
    sd = z3.state_dict()
    sub.Free()
    for i, entry in expected["state"].items():
        for name, value in entry.items():
            np.testing.assert_array_equal(sd["state"][i][name], value)
    COMM.Barrier()


def test_default_threads_divide_the_cpus():
    mine = os.sched_getaffinity(0)
    local = COMM.Split_type(MPI.COMM_TYPE_SHARED)
    masks = local.allgather(sorted(mine))
    local.Free()
    sharing = sum(1 for m in masks if mine & set(m))
    assert okd.default_threads(COMM) == max(1, len(mine) // sharing)
    assert okd.configure_threads(COMM, 1) == 1 == ok.get_num_threads()


def test_auto_threads_apply_only_when_the_user_chose_nothing(monkeypatch):
    from optkern.distributed import _mpi

    cpus = len(os.sched_getaffinity(0))
    expected = okd.default_threads(COMM)
    monkeypatch.setattr(_mpi, "_configured", False)
    monkeypatch.delenv("OPTKERN_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(cpus))  # the user's choice: left alone
    ok.set_num_threads(cpus)
    assert okd.configure_threads(COMM) == cpus
    monkeypatch.delenv("OMP_NUM_THREADS")
    ok.set_num_threads(cpus)  # optkern's default count and no variable: divided among ranks
    assert okd.configure_threads(COMM) == expected == ok.get_num_threads()
    ok.set_num_threads(cpus)  # once configured, a later explicit count is the user's
    assert okd.configure_threads(COMM) == cpus
