"""Ranks that disagree, in every way a user can make them, run on every rank under ``mpiexec
-n N python -m pytest tests/mpi/mpi_agreement.py`` (test_mpi.py launches it with N = 2, 3, 4,
in the same launch as mpi_inner.py). The last rank is the odd one out. Each disagreement must
raise RanksDisagree on every rank at the same point, naming what differs and the odd rank,
with nothing changed anywhere and the ranks still in step (a collective afterwards works).
The file name does not match ``test_*.py``: a plain ``python -m pytest`` never collects it."""

import os

import numpy as np
import pytest

if not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
    pytest.skip(
        "runs only under mpiexec (tests/mpi/test_mpi.py launches it)", allow_module_level=True
    )

MPI = pytest.importorskip("mpi4py.MPI")

import optkern as ok  # noqa: E402
from optkern import distributed as okd  # noqa: E402
from optkern.distributed import checkpoint as dck  # noqa: E402

COMM = MPI.COMM_WORLD
N = COMM.Get_size()
RANK = COMM.Get_rank()
ODD = N - 1
IS_ODD = RANK == ODD

if N < 2:
    pytest.skip("disagreement needs two ranks or more", allow_module_level=True)

SHAPES = [(4, 3), (3,), (2, 5), (6,)]


def params(shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def grads(shapes=SHAPES, seed=1):
    rng = np.random.default_rng(seed + RANK)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def in_step():
    """The ranks are still in step: one more collective completes with the right answer."""
    assert COMM.allreduce(1) == N


def build(wrapper, cls=ok.Adam, shapes=SHAPES, split=(2,), hyper=None, names=None, group1=None, **kw):
    """A wrapper over ``shapes`` split into groups at ``split``; ``hyper`` for every group,
    ``group1`` for the second group only; ``names`` makes the parameters named."""
    ps = params(shapes)
    cut = [0, *split, len(ps)]
    groups = []
    for gi, (a, b) in enumerate(zip(cut[:-1], cut[1:])):
        chunk = ps[a:b]
        if names is not None:
            chunk = [(names[i], p) for i, p in zip(range(a, b), chunk)]
        group = {"params": chunk}
        if gi == 1 and group1:
            group.update(group1)
        groups.append(group)
    hyper = {"lr": 1e-2, **(hyper or {})}
    if wrapper == "dp":
        return okd.DataParallel(cls(groups, **hyper), **kw), ps
    return okd.ZeroRedundancyOptimizer(cls, groups, **hyper, **kw), ps


# -- at construction ------------------------------------------------------------------------------

CONSTRUCTION = {
    # name: (what the odd rank passes to build, text the error names)
    "shapes transposed": (dict(shapes=[(3, 4), (3,), (2, 5), (6,)]), "the parameter shapes"),
    "one parameter more": (dict(shapes=SHAPES + [(2,)]), "the number of parameters"),
    "one parameter less": (dict(shapes=SHAPES[:3]), "the number of parameters"),
    "groups split elsewhere": (dict(split=(1,)), "the parameters per group"),
    "one group": (dict(split=()), "the parameters per group"),
    "optimizer class": (dict(cls=ok.AdamW), "the optimizer class"),
    "lr": (dict(hyper=dict(lr=0.5)), "['lr']"),
    "second group's lr": (dict(group1=dict(lr=0.5)), "param_groups[1]['lr']"),
    "betas": (dict(hyper=dict(betas=(0.8, 0.999))), "['betas']"),
    "eps": (dict(hyper=dict(eps=1e-6)), "['eps']"),
    "weight_decay": (dict(hyper=dict(weight_decay=0.1)), "['weight_decay']"),
    "amsgrad": (dict(hyper=dict(amsgrad=True)), "['amsgrad']"),
    "maximize": (dict(hyper=dict(maximize=True)), "['maximize']"),
    "an extra group entry": (dict(group1=dict(note="mine")), "param_groups[1]['note']"),
    "parameter names": (dict(names=["a", "b", "c", "z"]), "param_names"),
    "deterministic": (dict(deterministic=True), "deterministic"),
    "broadcast_params": (dict(broadcast_params=False), "broadcast_params"),
    "lr as a number and a callable": (dict(hyper=dict(lr=lambda step: 1e-2)), "['lr']"),
}
DP_ONLY = {"bucket_mb": (dict(bucket_mb=1.0), "bucket_mb")}


def _construction_cases():
    for wrapper in ("dp", "zero"):
        for name, case in {**CONSTRUCTION, **(DP_ONLY if wrapper == "dp" else {})}.items():
            yield pytest.param(wrapper, name, case, id=f"{wrapper}-{name}")


@pytest.mark.parametrize("wrapper, name, case", list(_construction_cases()))
def test_construction_refused_on_every_rank(wrapper, name, case):
    kwargs, what = case
    base = dict(names=["a", "b", "c", "d"]) if name == "parameter names" else {}
    with pytest.raises(okd.RanksDisagree) as info:
        build(wrapper, **(dict(base, **kwargs) if IS_ODD else base))
    text = str(info.value)
    assert what in text and f"rank {ODD} has" in text, text
    in_step()
    build(wrapper)  # the ranks can go on and build one that agrees


def test_a_different_wrapper_on_one_rank_refused():
    with pytest.raises(okd.RanksDisagree, match="the wrapper"):
        build("zero" if IS_ODD else "dp")
    in_step()


def test_a_different_class_that_zero_refuses_is_named_not_aborted():
    with pytest.raises(okd.RanksDisagree, match="the optimizer class"):
        build("zero", cls=ok.LAMB if IS_ODD else ok.Adam)
    in_step()


# -- at a step ------------------------------------------------------------------------------------


def _state(wrapper):
    if isinstance(wrapper, okd.DataParallel):
        sd = wrapper.state_dict()
    else:
        sd = wrapper.local_state_dict()
    out = []
    for i in sorted(sd["state"]):
        for k in sorted(sd["state"][i]):
            v = sd["state"][i][k]
            out.append((i, k, v.tobytes() if isinstance(v, np.ndarray) else repr(v)))
    return out, sd.get("step_count")


def _lr(w, ps):
    w.param_groups[0]["lr"] = 0.5


def _scheduler(w, ps):
    opt = w.optimizer
    ok.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5).step()


def _new_entry(w, ps):
    w.param_groups[1]["note"] = "mine"


def _callable_lr(w, ps):
    w.param_groups[0]["lr"] = lambda step: 1e-2


def _weight_decay(w, ps):
    w.param_groups[1]["weight_decay"] = 0.01


def _loaded_state(w, ps):
    """The odd rank loads a state dict stepped once more (its step counts move ahead)."""
    other = ok.Adam([{"params": [p.copy() for p in ps[:2]]}, {"params": [p.copy() for p in ps[2:]]}])
    other.load_state_dict(_WHOLE[0])  # the consolidated state, taken on every rank
    other.step([np.zeros(s, np.float32) for s in SHAPES])
    w.load_state_dict(other.state_dict())


_WHOLE = [None]

STEP_CHANGES = {
    "lr set on one rank": (_lr, "param_groups[0]['lr']"),
    "a scheduler on one rank": (_scheduler, "['lr']"),
    "a new group entry": (_new_entry, "param_groups[1]['note']"),
    "a callable lr on one rank": (_callable_lr, "param_groups[0]['lr']"),
    "weight_decay set on one rank": (_weight_decay, "param_groups[1]['weight_decay']"),
    "a state loaded on one rank": (_loaded_state, "step_count"),
}
STEP_OPTIONS = {
    "max_grad_norm on one rank": (dict(max_grad_norm=1.0), "max_grad_norm"),
    "another max_grad_norm": (dict(max_grad_norm=2.0), "max_grad_norm"),
    "skip_if_nonfinite on one rank": (dict(skip_if_nonfinite=True), "skip_if_nonfinite"),
    "another norm_type": (dict(max_grad_norm=1.0, norm_type=1.0), "norm_type"),
}


def _started(wrapper):
    w, ps = build(wrapper)
    w.step(grads(seed=7))
    _WHOLE[0] = w.state_dict()  # collective for ZeRO: every rank
    return w, ps


@pytest.mark.parametrize("wrapper", ["dp", "zero"])
@pytest.mark.parametrize("change", list(STEP_CHANGES))
def test_a_change_on_one_rank_refuses_the_next_step_everywhere(wrapper, change):
    w, ps = _started(wrapper)
    edit, what = STEP_CHANGES[change]
    if IS_ODD:
        edit(w, ps)
    before = [p.tobytes() for p in ps], _state(w)
    with pytest.raises(okd.RanksDisagree) as info:
        w.step(grads())
    text = str(info.value)
    assert what in text and f"rank {ODD} has" in text, text
    assert ([p.tobytes() for p in ps], _state(w)) == before
    in_step()


@pytest.mark.parametrize("wrapper", ["dp", "zero"])
@pytest.mark.parametrize("option", list(STEP_OPTIONS))
def test_a_step_option_on_one_rank_refused_everywhere(wrapper, option):
    w, ps = _started(wrapper)
    kwargs, what = STEP_OPTIONS[option]
    base = {"max_grad_norm": 1.0} if "norm_type" in kwargs else {}
    before = [p.tobytes() for p in ps], _state(w)
    with pytest.raises(okd.RanksDisagree) as info:
        w.step(grads(), **(kwargs if IS_ODD else base))
    assert what in str(info.value) and f"rank {ODD} has" in str(info.value)
    assert ([p.tobytes() for p in ps], _state(w)) == before
    in_step()
    w.step(grads())  # the same call everywhere steps again
    okd.check_identical(ps, COMM)


def test_allreduce_on_one_rank_and_step_on_the_others_refused():
    w, ps = _started("dp")
    with pytest.raises(okd.RanksDisagree):
        if IS_ODD:
            w.allreduce_(grads())
        else:
            w.step(grads())
    in_step()


def test_eval_on_one_rank_refuses_the_next_data_parallel_step():
    ps = params()
    dp = okd.DataParallel(ok.ScheduleFreeAdamW(ps, lr=1e-2))
    dp.step(grads())
    if IS_ODD:
        dp.eval()
    with pytest.raises(okd.RanksDisagree, match="train_mode"):
        dp.step(grads())
    in_step()


# -- a gradient None on some ranks only (torch DDP's find_unused_parameters) ----------------------


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("bucket_mb", [25.0, 1e-5])
def test_none_on_one_rank_counts_as_zeros_and_steps_everywhere(deterministic, bucket_mb):
    ps = params()
    dp = okd.DataParallel(ok.SGD(ps, lr=0.5), bucket_mb=bucket_mb, deterministic=deterministic)
    before = [p.copy() for p in ps]
    everyone = COMM.allgather(grads())  # every rank's gradients, to compute the expected average
    mine = [g.copy() for g in everyone[RANK]]
    if IS_ODD:
        mine[1] = None
    dp.step(mine)
    for i, p in enumerate(ps):
        total = sum(everyone[r][i] for r in range(N) if not (r == ODD and i == 1))
        expected = before[i] - np.float32(0.5) * (total / np.float32(N))
        np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-6)
    okd.check_identical(ps, COMM)


def test_none_on_every_rank_skips_the_parameter_everywhere():
    ps = params()
    dp = okd.DataParallel(ok.Adam(ps, lr=1e-2))
    g = grads()
    g[2] = None
    before = ps[2].copy()
    dp.step(g)
    np.testing.assert_array_equal(ps[2], before)
    assert ps[2] not in dp.optimizer.state
    okd.check_identical(ps, COMM)


def test_none_with_overlap_start_and_a_different_none_at_step():
    ps = params()
    dp = okd.DataParallel(ok.SGD(ps, lr=0.5), bucket_mb=1e-5)
    everyone = COMM.allgather(grads())
    mine = [g.copy() for g in everyone[RANK]]
    dp.start([None, None, mine[2], mine[3]])
    if IS_ODD:
        mine[0] = None
    before = [p.copy() for p in ps]
    dp.step(mine)
    total = sum(everyone[r][0] for r in range(N) if r != ODD)
    np.testing.assert_allclose(ps[0], before[0] - np.float32(0.5) * total / np.float32(N), rtol=1e-6)
    okd.check_identical(ps, COMM)


# -- Schedule-Free across ZeRO's shards -----------------------------------------------------------


@pytest.mark.parametrize("cls", [ok.ScheduleFreeAdamW, ok.ScheduleFreeSGD], ids=lambda c: c.__name__)
def test_zero_eval_and_train_match_one_process(cls):
    hyper = dict(lr=1e-2) if cls is ok.ScheduleFreeAdamW else dict(lr=1e-2, momentum=0.9)
    ref_params = params()
    ref = cls([{"params": ref_params[:2]}, {"params": ref_params[2:]}], **hyper)
    ps = params()
    zero = okd.ZeroRedundancyOptimizer(cls, [{"params": ps[:2]}, {"params": ps[2:]}], **hyper)
    for t in range(4):
        everyone = COMM.allgather(grads(seed=10 * t))
        mean = [sum(e[i] for e in everyone) / np.float32(N) for i in range(len(SHAPES))]
        ref.step(mean)
        zero.step(grads(seed=10 * t))
    zero.eval()
    ref.eval()
    for a, b in zip(ps, ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    okd.check_identical(ps, COMM)
    assert all(g["train_mode"] is False for g in zero.param_groups)
    sd = zero.state_dict()  # saved in eval mode: the groups say so
    assert all(g["train_mode"] is False for g in sd["param_groups"])
    with pytest.raises(RuntimeError, match="eval mode"):
        zero.step(grads())  # refused on every rank, no abort
    in_step()
    zero.train()
    ref.train()
    for a, b in zip(ps, ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    zero.step(grads())
    okd.check_identical(ps, COMM)


def test_zero_inner_optimizer_switch_is_refused():
    zero = okd.ZeroRedundancyOptimizer(ok.ScheduleFreeAdamW, params(), lr=1e-2)
    zero.step(grads())
    with pytest.raises(RuntimeError, match="ZeroRedundancyOptimizer"):
        zero.optimizer.eval()
    assert all(g["train_mode"] for g in zero.param_groups)


def test_zero_eval_on_one_rank_and_train_on_another_refused():
    zero = okd.ZeroRedundancyOptimizer(ok.ScheduleFreeAdamW, params(), lr=1e-2)
    zero.step(grads())
    before = [p.tobytes() for p in zero._params]
    with pytest.raises(okd.RanksDisagree, match="the call"):
        if IS_ODD:
            zero.train()
        else:
            zero.eval()
    assert [p.tobytes() for p in zero._params] == before
    in_step()


def test_zero_switch_of_a_rule_without_modes_is_a_type_error():
    zero = okd.ZeroRedundancyOptimizer(ok.Adam, params(), lr=1e-2)
    with pytest.raises(TypeError, match="no train"):
        zero.eval()
    in_step()


# -- saving and loading ---------------------------------------------------------------------------


def _shared_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("agree")) if RANK == 0 else None
    return COMM.bcast(path)


@pytest.mark.parametrize("wrapper", ["dp", "zero"])
def test_save_to_different_paths_refused(wrapper, tmp_path_factory):
    root = _shared_dir(tmp_path_factory)
    w, _ = _started(wrapper)
    with pytest.raises(okd.RanksDisagree, match="path"):
        okd.save(w, os.path.join(root, "odd" if IS_ODD else "ck"))
    in_step()
    assert not os.path.exists(os.path.join(root, "ck", dck.MANIFEST))


@pytest.mark.parametrize("wrapper", ["dp", "zero"])
def test_consolidated_on_one_rank_only_refused(wrapper, tmp_path_factory):
    root = _shared_dir(tmp_path_factory)
    w, _ = _started(wrapper)
    with pytest.raises(okd.RanksDisagree, match="consolidated"):
        okd.save(w, os.path.join(root, "ck"), consolidated=IS_ODD)
    in_step()


@pytest.mark.parametrize("wrapper", ["dp", "zero"])
def test_loading_different_checkpoints_refused_with_nothing_loaded(wrapper, tmp_path_factory):
    root = _shared_dir(tmp_path_factory)
    w, ps = _started(wrapper)
    okd.save(w, os.path.join(root, "a"))
    w.step(grads())
    okd.save(w, os.path.join(root, "b"))
    fresh, _ = build(wrapper)
    before = _state(fresh)
    with pytest.raises(okd.RanksDisagree, match="other content"):
        okd.load(fresh, os.path.join(root, "b" if IS_ODD else "a"))
    assert _state(fresh) == before
    in_step()


@pytest.mark.parametrize("wrapper", ["dp", "zero"])
def test_a_shard_damaged_for_one_rank_refuses_the_load_on_every_rank(wrapper, tmp_path_factory):
    root = _shared_dir(tmp_path_factory)
    w, _ = _started(wrapper)
    ck = os.path.join(root, "ck")
    okd.save(w, ck)
    COMM.Barrier()
    if RANK == 0:  # the odd rank's own shard: a ZeRO rank reads only its slice
        name = f"shard-00000001-{ODD:05d}.npz"
        with open(os.path.join(ck, name), "r+b") as f:
            f.truncate(100)
    COMM.Barrier()
    fresh, _ = build(wrapper)
    before = _state(fresh)
    with pytest.raises(dck.ShardedCheckpointError) as info:
        okd.load(fresh, ck)
    text = str(info.value)
    assert f"rank {ODD}" in text and f"shard-00000001-{ODD:05d}.npz" in text, text
    assert _state(fresh) == before
    in_step()


@pytest.mark.parametrize("wrapper", ["dp", "zero"])
def test_a_save_failing_on_one_rank_raises_everywhere_and_keeps_the_previous(
    wrapper, tmp_path_factory, monkeypatch
):
    root = _shared_dir(tmp_path_factory)
    w, _ = _started(wrapper)
    ck = os.path.join(root, "ck")
    okd.save(w, ck)
    expected = w.state_dict()["step_count"]
    w.step(grads())
    if IS_ODD:

        def full(path, arrays):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(dck, "_write_shard", full)
    with pytest.raises(dck.ShardedCheckpointError, match=f"rank {ODD}: OSError"):
        okd.save(w, ck)
    monkeypatch.undo()
    COMM.Barrier()
    fresh, _ = build(wrapper)
    okd.load(fresh, ck)
    assert fresh.state_dict()["step_count"] == expected
    shards = sorted(f for f in os.listdir(ck) if f.startswith("shard-"))
    assert shards == [f"shard-00000001-{r:05d}.npz" for r in range(N)]
    in_step()


# -- ranks in different calls ------------------------------------------------------------------------


def _zero_sf():
    zero = okd.ZeroRedundancyOptimizer(ok.ScheduleFreeAdamW, params(), lr=1e-2)
    zero.step(grads())
    return zero


MIXED_CALLS = {
    "eval against step": (lambda w, root: w.eval(), lambda w, root: w.step(grads())),
    "state_dict against step": (lambda w, root: w.state_dict(), lambda w, root: w.step(grads())),
    "train against state_dict": (lambda w, root: w.train(), lambda w, root: w.state_dict()),
    "save against load": (
        lambda w, root: okd.save(w, os.path.join(root, "ck")),
        lambda w, root: okd.load(w, os.path.join(root, "ck")),
    ),
    "save against step": (
        lambda w, root: okd.save(w, os.path.join(root, "ck")),
        lambda w, root: w.step(grads()),
    ),
    "load against eval": (
        lambda w, root: okd.load(w, os.path.join(root, "ck")),
        lambda w, root: w.eval(),
    ),
}


@pytest.mark.parametrize("mix", list(MIXED_CALLS))
def test_zero_ranks_in_different_calls_are_told_which(mix, tmp_path_factory):
    root = _shared_dir(tmp_path_factory)
    zero = _zero_sf()
    if "load" in mix:
        okd.save(zero, os.path.join(root, "ck"))
    before = [p.tobytes() for p in zero._params], _state(zero)
    odd, others = MIXED_CALLS[mix]
    with pytest.raises(okd.RanksDisagree, match="the call"):
        (odd if IS_ODD else others)(zero, root)
    assert ([p.tobytes() for p in zero._params], _state(zero)) == before
    in_step()
