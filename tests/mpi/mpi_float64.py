"""float64 and mixed float32/float64 parameters over N ranks, run on every rank under ``mpiexec
-n N python -m pytest tests/mpi/mpi_float64.py`` (test_mpi.py launches it with mpi_inner.py for
N = 1, 2, 3, 4). The file name does not match ``test_*.py``: a plain ``python -m pytest`` never
collects it.

What is compared, and how exactly:

- ``deterministic=True`` sums the ranks' gradients in rank order, in each parameter's own type:
  the parameters equal, bit for bit, a single-process optimizer of the same dtypes fed the
  rank-order mean (``((g0 + g1) + g2) / N``, computed here in that type).
- MPI's own reduction sums in an order its algorithm picks. The parameters still equal, bit for
  bit, a single-process optimizer fed the averaged gradients the wrapper computed, and those
  are the rank-order mean exactly for N <= 2 (one addition commutes) and within the bound of a
  float64 sum in any order otherwise: |got - mean| <= 2 (N - 1) u sum_r |g_r| / N + 2 u |mean|,
  u = 2^-53, per element.
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

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SHAPES = [(13, 7), (7,), (7, 3), (3,)]
ALL64 = [F64] * 4
MIXED = [F64, F32, F32, F64]  # one group holds both: [W1 f64, b1 f32], [W2 f32, b2 f64]
MIXED2 = [F32, F64, F64, F32]  # DataParallel's last bucket (and its tail) in float32
B = 8
STEPS = 20
U = 2.0**-53

CLASSES = [e.cls for e in db.ENTRIES]
ZERO_CLASSES = [e.cls for e in db.ENTRIES if e.zero]


def hyper_of(cls):
    return db.entry(cls.__name__).mpi


def init_params(dtypes, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 0.3).astype(d) for s, d in zip(SHAPES, dtypes)]


def groups(params, **second):
    return [{"params": params[:2]}, {"params": params[2:], **second}]


def rank_grads(params, step, r):
    """Rank r's float64 gradient at ``step`` (a float64 program's gradients, whatever the
    parameters' types) of a two-layer linear net's mean squared error over its B rows."""
    rng = np.random.default_rng(10_000 + step)
    X = rng.standard_normal((N * B, 13))
    Y = rng.standard_normal((N * B, 3))
    X, Y = X[r * B : (r + 1) * B], Y[r * B : (r + 1) * B]
    W1, b1, W2, b2 = (np.asarray(p, np.float64) for p in params)
    H = X @ W1 + b1
    d = (2.0 / B) * (H @ W2 + b2 - Y)
    dH = d @ W2.T
    return [X.T @ dH, dH.sum(0), H.T @ d, d.sum(0)]


def rank_order_mean(params, step, dtypes):
    """What deterministic mode computes: each rank's gradient in its parameter's type, summed in
    rank order in that type, divided by N in that type."""
    everyone = [rank_grads(params, step, r) for r in range(N)]
    out = []
    for i, d in enumerate(dtypes):
        acc = everyone[0][i].astype(d)
        for r in range(1, N):
            acc = acc + everyone[r][i].astype(d)
        out.append(acc / d.type(N))
    return out


def wrap(kind, cls, params, hyper, **kw):
    if kind == "dp":
        return okd.DataParallel(cls(groups(params), **hyper), bucket_mb=1e-4, **kw)
    return okd.ZeroRedundancyOptimizer(cls, groups(params), **hyper, **kw)


def same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


# -- deterministic: bit for bit against one process fed the rank-order mean -------------------


def _cases():
    for kind, classes in (("dp", CLASSES), ("zero", ZERO_CLASSES)):
        for cls in classes:
            for name, dtypes in (("float64", ALL64), ("mixed", MIXED), ("mixed2", MIXED2)):
                yield pytest.param(kind, cls, dtypes, id=f"{kind}-{cls.__name__}-{name}")


@pytest.mark.parametrize("kind, cls, dtypes", list(_cases()))
def test_deterministic_equals_one_process_bit_for_bit(kind, cls, dtypes):
    hyper = hyper_of(cls)
    ref_params = init_params(dtypes)
    ref = cls(groups(ref_params), **hyper)
    params = init_params(dtypes)
    opt = wrap(kind, cls, params, hyper, deterministic=True)
    for t in range(STEPS):
        ref.step(rank_order_mean(ref_params, t, dtypes))
        opt.step(rank_grads(params, t, RANK))
    same(params, ref_params)
    okd.check_identical(params, COMM)
    for i, s in ref.state_dict()["state"].items():  # the state is in each parameter's type
        for v in s.values():
            if isinstance(v, np.ndarray) and v.shape == SHAPES[i]:
                assert v.dtype == dtypes[i]


# -- MPI's reduction: bit for bit against one process fed the wrapper's averages ----------------


def _gathered_average(opt, params):
    """The averaged gradients the wrapper's last step used, whole, on every rank (None: a
    DataParallel on one rank, which passes the gradients on without a copy)."""
    if isinstance(opt, okd.DataParallel):
        return [g.copy() for g in opt.grad_buffers] if N > 1 else None
    out = [np.zeros(p.shape, p.dtype) for p in params]
    for sh in opt._shards:
        pieces = COMM.allgather(sh.gslice.copy())
        whole = np.zeros(sh.part.total, sh.dtype)
        for (lo, hi), piece in zip(sh.ranges, pieces):
            whole[lo:hi] = piece
        for i, view in zip(sh.part.members, sh.part.views(whole)):
            out[i][...] = view
    return out


@pytest.mark.parametrize("dtypes", [ALL64, MIXED], ids=["float64", "mixed"])
@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_mpi_reduction_within_the_bound_of_a_float64_sum(kind, dtypes):
    ref_params = init_params(dtypes)
    ref = ok.Adam(groups(ref_params, lr=3e-3), lr=1e-2)
    params = init_params(dtypes)
    opt = wrap(kind, ok.Adam, params, dict(lr=1e-2))
    opt.param_groups[1]["lr"] = 3e-3  # set on the wrapper's groups, as a user would
    for t in range(STEPS):
        everyone = [rank_grads(params, t, r) for r in range(N)]
        mean = rank_order_mean(params, t, dtypes)
        opt.step(everyone[RANK])
        got = _gathered_average(opt, params)
        if got is None:
            got = [g.astype(d) for g, d in zip(everyone[RANK], dtypes)]
        for i, d in enumerate(dtypes):
            if N <= 2:
                np.testing.assert_array_equal(got[i], mean[i])
                continue
            if d == F64:
                mag = sum(np.abs(e[i]) for e in everyone) / N
                bound = 2 * (N - 1) * U * mag + 2 * U * np.abs(mean[i])
                err = np.abs(got[i] - mean[i])
                assert (err <= bound).all(), float(np.max(err - bound))
            else:  # float32 parameters average in float32: the same bound with float32's u
                mag = sum(np.abs(e[i].astype(F32)) for e in everyone) / N
                bound = 2 * (N - 1) * 2.0**-24 * mag + 2 * 2.0**-24 * np.abs(mean[i])
                assert (np.abs(got[i] - mean[i]) <= bound).all()
        ref.step(got)
    same(params, ref_params)
    okd.check_identical(params, COMM)


# -- clipping, skipping, and gradients of the other type -------------------------------------------


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_clipping_and_skip_in_float64(kind):
    dtypes = MIXED
    ref_params = init_params(dtypes)
    ref = ok.Adam(groups(ref_params), lr=1e-2)
    params = init_params(dtypes)
    opt = wrap(kind, ok.Adam, params, dict(lr=1e-2), deterministic=True)
    for t in range(6):
        mean = rank_order_mean(ref_params, t, dtypes)
        if N == 1 and kind == "dp":  # passed on as given: the norm of the float64 gradients
            mean = rank_grads(ref_params, t, 0)
        want = ref.step(mean, max_grad_norm=0.05)
        got = opt.step(rank_grads(params, t, RANK), max_grad_norm=0.05)
        assert COMM.allgather(got) == [got] * N  # the same decision everywhere
        # DataParallel clips the averaged gradient as one process does; ZeRO combines the
        # slices' norms (a different summation order, in float64)
        assert got == want if kind == "dp" else math.isclose(got, want, rel_tol=1e-12)
    if kind == "dp":
        same(params, ref_params)
    else:
        for a, b in zip(params, ref_params):
            np.testing.assert_allclose(a, b, rtol=1e-6 if a.dtype == F32 else 1e-12, atol=0)
    grads = rank_grads(params, 99, RANK)
    before = [p.copy() for p in params]
    if RANK == N - 1:
        grads[0][1, 2] = np.inf
    assert math.isinf(opt.step(grads, skip_if_nonfinite=True))
    same(params, before)
    okd.check_identical(params, COMM)


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_float32_gradients_of_float64_parameters_are_exact(kind):
    """A float32 gradient of a float64 parameter converts exactly: the same bits as feeding
    its float64 value."""
    a_params, b_params = init_params(ALL64), init_params(ALL64)
    a = wrap(kind, ok.Adam, a_params, dict(lr=1e-2), deterministic=True)
    b = wrap(kind, ok.Adam, b_params, dict(lr=1e-2), deterministic=True)
    for t in range(3):
        g32 = [g.astype(F32) for g in rank_grads(a_params, t, RANK)]
        a.step(g32)
        b.step([g.astype(F64) for g in g32])
    same(a_params, b_params)


@pytest.mark.parametrize("dtypes", [MIXED, MIXED2], ids=["mixed", "mixed2"])
def test_start_overlaps_mixed_buffers_and_gives_the_same_bits(dtypes):
    p1, p2 = init_params(dtypes), init_params(dtypes)
    dp1 = okd.DataParallel(ok.Adam(groups(p1), lr=1e-2), bucket_mb=1e-4)
    dp2 = okd.DataParallel(ok.Adam(groups(p2), lr=1e-2), bucket_mb=1e-4)
    assert {d for d, _, _ in dp1.buckets} == {"float32", "float64"}
    for t in range(5):
        g = rank_grads(p1, t, RANK)
        dp1.start([None, None, g[2], g[3]])  # the last layer's gradients first
        dp1.progress()
        dp1.step(g)
        dp2.step([x.copy() for x in g])
    same(p1, p2)
    okd.check_identical(p1 + p2, COMM)


# -- find-unused semantics (DataParallel) ---------------------------------------------------------


@pytest.mark.parametrize("dtypes", [ALL64, MIXED], ids=["float64", "mixed"])
def test_none_counts_as_zeros_and_none_everywhere_skips(dtypes):
    ref_params = init_params(dtypes)
    ref = ok.SGD(groups(ref_params), lr=0.1, momentum=0.9)
    params = init_params(dtypes)
    dp = okd.DataParallel(ok.SGD(groups(params), lr=0.1, momentum=0.9), deterministic=True)
    for t in range(4):
        everyone = [rank_grads(params, t, r) for r in range(N)]
        for r in range(N):
            if r == N - 1:
                everyone[r][0] = None  # the last rank did not use W1
            everyone[r][3] = None  # no rank used b2
        mean = []
        for i, d in enumerate(dtypes):
            have = [e[i] for e in everyone]
            if all(g is None for g in have):
                mean.append(None)
                continue
            acc = (have[0] if have[0] is not None else np.zeros(SHAPES[i])).astype(d)
            for g in have[1:]:
                acc = acc + (g if g is not None else np.zeros(SHAPES[i])).astype(d)
            mean.append(acc / d.type(N))
        ref.step(mean)
        dp.step(everyone[RANK])
    same(params, ref_params)
    assert params[3] is dp.optimizer.param_groups[1]["params"][1]
    assert params[3] not in dp.optimizer.state


# -- ZeRO's parameter storage -----------------------------------------------------------------------


def test_zero_float64_flat_params_are_the_storage():
    fp = ok.FlatParams(SHAPES, np.float64)
    for v, p in zip(fp, init_params(ALL64)):
        v[...] = p
    ref_params = init_params(ALL64)
    ref = ok.Adam(ref_params, lr=1e-2)
    zero = okd.ZeroRedundancyOptimizer(ok.Adam, list(fp), lr=1e-2, deterministic=True)
    assert zero._zero_copy
    grads = fp.zeros_like()
    for t in range(5):
        for v, g in zip(grads, rank_grads(list(fp), t, RANK)):
            v[...] = g
        zero.step(list(grads))
        ref.step(rank_order_mean(ref_params, t, ALL64))
    same(list(fp), ref_params)


def test_zero_state_is_sharded_in_float64():
    params = [np.zeros(10_007), np.zeros(3, np.float32)]
    zero = okd.ZeroRedundancyOptimizer(ok.Adam, params, lr=1e-3)
    zero.step([np.ones(10_007), np.ones(3)])
    whole = 2 * (params[0].nbytes + params[1].nbytes)  # exp_avg + exp_avg_sq
    total = COMM.allreduce(zero.state_bytes())
    assert whole <= total <= whole + 2 * 64 * 2 * N
    assert zero.state_bytes() <= whole / N + 2 * 64 * 2


# -- Schedule-Free -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_schedule_free_train_eval_in_float64(kind):
    cls, hyper = ok.ScheduleFreeAdamW, dict(lr=1e-2)
    ref_params = init_params(MIXED)
    ref = cls(groups(ref_params), **hyper)
    params = init_params(MIXED)
    opt = wrap(kind, cls, params, hyper, deterministic=True)
    for t in range(5):
        ref.step(rank_order_mean(ref_params, t, MIXED))
        opt.step(rank_grads(params, t, RANK))
    opt.eval()
    ref.eval()
    same(params, ref_params)
    opt.train()
    ref.train()
    same(params, ref_params)
    okd.check_identical(params, COMM)


# -- checkpoints: resume bit for bit, onto other numbers of ranks ----------------------------------


def _shared_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("f64")) if RANK == 0 else None
    return COMM.bcast(path)


@pytest.mark.parametrize("dtypes", [ALL64, MIXED], ids=["float64", "mixed"])
@pytest.mark.parametrize("kind", ["dp", "zero"])
def test_checkpoints_resume_bit_for_bit_and_reshard(kind, dtypes, tmp_path_factory):
    cls, hyper = ok.NAdam, dict(lr=1e-2)  # a carried number (mu_product) too
    root = _shared_dir(tmp_path_factory)
    ckpt, whole = os.path.join(root, "sharded"), os.path.join(root, "whole.npz")
    params = init_params(dtypes)
    opt = wrap(kind, cls, params, hyper)
    for t in range(4):
        opt.step(rank_grads(params, t, RANK))
    okd.save(opt, ckpt)
    okd.save(opt, whole, consolidated=True)
    expected = opt.state_dict()
    saved = [p.copy() for p in params]
    for t in range(4, 7):
        opt.step(rank_grads(params, t, RANK))
    for path in (ckpt, whole):
        for other in ("dp", "zero"):
            ps = [p.copy() for p in saved]
            again = wrap(other, cls, ps, hyper)
            okd.load(again, path)
            sd = again.state_dict()
            assert sd["step_count"] == expected["step_count"] == 4
            for i, entry in expected["state"].items():
                for name, value in entry.items():
                    if isinstance(value, np.ndarray):
                        assert sd["state"][i][name].dtype == value.dtype == dtypes[i]
                    np.testing.assert_array_equal(sd["state"][i][name], value)
            if other == kind:  # the same wrapper continues bit for bit
                for t in range(4, 7):
                    again.step(rank_grads(ps, t, RANK))
                same(ps, params)
    # onto one rank alone
    alone = okd.ZeroRedundancyOptimizer(
        cls, groups([p.copy() for p in saved]), MPI.COMM_SELF, **hyper
    )
    okd.load(alone, ckpt)
    single = cls(groups([p.copy() for p in saved]), **hyper)
    ok.load(single, whole)
    for sd in (alone.state_dict(), single.state_dict()):
        for i, entry in expected["state"].items():
            for name, value in entry.items():
                np.testing.assert_array_equal(sd["state"][i][name], value)
    COMM.Barrier()


def test_zero_ranks_that_hold_nothing_step_save_and_load(tmp_path_factory):
    """Three tiny parameters (one per 16-element unit of the layout): with 4 ranks one holds
    nothing, others hold one dtype only; every shard still lists every array (zeros where it
    holds none), so the checkpoint loads anywhere."""

    def make(comm=None):
        ps = [np.full(3, 1.0), np.full(2, 2.0, np.float32), np.full(1, 3.0)]
        groups = [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.05}]
        return ps, groups

    root = _shared_dir(tmp_path_factory)
    for cls, hyper in ((ok.SGD, dict(lr=0.1, momentum=0.9)), (ok.NAdam, dict(lr=0.1))):
        ps, gs = make()
        zero = okd.ZeroRedundancyOptimizer(cls, gs, deterministic=True, **hyper)
        ref_ps, ref_gs = make()
        ref = cls(ref_gs, **hyper)
        for t in range(3):
            g = [np.full(3, 0.5 + t), np.full(2, 1.5, np.float32), np.full(1, -1.0)]
            zero.step(g)
            ref.step(g)
        same(ps, ref_ps)
        path = os.path.join(root, cls.__name__)
        okd.save(zero, path)
        expected = zero.state_dict()
        for other in ("zero", "dp"):
            _, gs2 = make()
            w = (
                okd.ZeroRedundancyOptimizer(cls, gs2, **hyper)
                if other == "zero"
                else okd.DataParallel(cls(gs2, **hyper))
            )
            okd.load(w, path)
            sd = w.state_dict()
            for i, entry in expected["state"].items():
                for k, v in entry.items():
                    np.testing.assert_array_equal(sd["state"][i][k], v)
    COMM.Barrier()
