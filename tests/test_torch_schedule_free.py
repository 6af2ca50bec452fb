"""optkern.torch's ScheduleFreeAdamW and ScheduleFreeSGD: train()/eval() and state dicts as the
schedulefree package's AdamWScheduleFree / SGDScheduleFree (its single-tensor and foreach paths),
over 40 steps with eval()/train() switches mid-run, warmup, weight decay, r and weight_lr_power.
Skipped without torch; the comparisons with the package are skipped without schedulefree (the
oracle stage of CI, .ci/oracles.sh, installs both).
"""

from __future__ import annotations

import copy
import inspect
import io

import numpy as np
import pytest
from test_oracle_parity_schedulefree import (
    CASES,
    PACKAGE,
    SHAPES,
    SWITCH_AT,
    assert_close,
    case_id,
    gradients,
    initial,
)

torch = pytest.importorskip("torch")
okt = pytest.importorskip("optkern.torch")


def _ptrs(opt, params):
    """data_ptr of every parameter and state tensor: no step or switch may replace one."""
    out = {("p", i): p.data_ptr() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[(i, k)] = v.data_ptr()
    return out


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        for k, v in st.items():
            w = sb["state"][i][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (i, k)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_schedulefree(case, foreach):
    schedulefree = pytest.importorskip("schedulefree")
    name, hp = case
    p0 = initial()
    theirs_p = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
    ours_p = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
    theirs = getattr(schedulefree, PACKAGE[name])(theirs_p, foreach=foreach, **hp)
    ours = getattr(okt, name)(ours_p, foreach=foreach, **hp)
    scale = max(1.0, 10 * hp.get("lr", 1.0 if name == "ScheduleFreeSGD" else 0.0025))

    def compare(what):
        group = theirs.param_groups[0]
        assert ours.param_groups[0]["train_mode"] is group["train_mode"]
        for i, (t, p) in enumerate(zip(theirs_p, ours_p)):
            assert_close(p.detach().numpy(), t.detach().numpy(), f"{what}: p {SHAPES[i]}", scale)
            st, so = theirs.state[t], ours.state[p]
            assert set(so) == set(st) | {"step", "lr_max", "weight_sum"}
            for key in st:
                assert so[key].dtype == torch.float32 and so[key].is_contiguous()
                assert_close(so[key].numpy(), st[key].numpy(), f"{what}: {key}", scale)
            assert so["step"].dtype == torch.float32 and so["step"].dim() == 0
            assert float(so["step"]) == group["k"]
            assert type(so["lr_max"]) is float and type(so["weight_sum"]) is float
            assert so["lr_max"] == pytest.approx(group["lr_max"], rel=1e-15)
            assert so["weight_sum"] == pytest.approx(group["weight_sum"], rel=1e-13)

    assert ours.param_groups[0]["train_mode"] is True  # the package starts in eval mode
    theirs.train()
    ours.train()  # a no-op before the first step in both
    ptrs = None
    for t, gs in enumerate(gradients()):
        for tp, op, g in zip(theirs_p, ours_p, gs):
            tp.grad, op.grad = torch.tensor(g), torch.tensor(g)
        theirs.step()
        ours.step()
        if ptrs is None:
            ptrs = _ptrs(ours, ours_p)
        if t in SWITCH_AT:
            theirs.eval()
            ours.eval()
            compare(f"x after step {t + 1}")
            before = _snapshot(ours, ours_p)
            ran = []
            with pytest.raises(RuntimeError, match="eval mode"):
                ours.step(lambda: ran.append(1))
            assert not ran  # nothing ran, nothing changed
            _same(before, _snapshot(ours, ours_p))
            theirs.train()
            ours.train()
            compare(f"y after step {t + 1}")
        assert _ptrs(ours, ours_p) == ptrs  # no copies: every tensor updated in place
    compare("y at the end")
    theirs.eval()
    ours.eval()
    compare("x at the end")
    assert _ptrs(ours, ours_p) == ptrs


@pytest.mark.parametrize("name", list(PACKAGE))
def test_arguments_and_defaults_are_the_packages(name):
    schedulefree = pytest.importorskip("schedulefree")
    theirs = inspect.signature(getattr(schedulefree, PACKAGE[name])).parameters.values()
    ours = inspect.signature(getattr(okt, name)).parameters.values()
    shared = [(p.name, p.kind, p.default) for p in ours if p.kind is not p.KEYWORD_ONLY]
    assert shared == [(p.name, p.kind, p.default) for p in theirs]
    # optkern's flags come after, keyword-only
    assert [p.name for p in ours if p.kind is p.KEYWORD_ONLY] == [
        "maximize",
        "fused",
        "differentiable",
        "capturable",
        "state_dtype",
        "stochastic_rounding",
        "master_weights",
    ]
    from optkern.benchmark import torch_bench

    assert torch_bench.peers()[name].cls == f"schedulefree.{PACKAGE[name]}"


def _train(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()


HP = {"ScheduleFreeAdamW": dict(lr=0.01, warmup_steps=5), "ScheduleFreeSGD": dict(lr=0.1)}


@pytest.mark.parametrize("name", list(PACKAGE))
def test_state_dict_round_trips_through_torch_save_and_okt(name):
    gs = gradients(seed=3)
    params = [torch.nn.Parameter(torch.tensor(x)) for x in initial(seed=4)]
    o = getattr(okt, name)(params, **HP[name])
    _train(o, params, gs[:15])
    o.eval()  # the package's recipe: save in eval mode (x in the parameters)
    sd = o.state_dict()
    group = sd["param_groups"][0]
    assert group["train_mode"] is False
    assert (group["k"], group["lr_max"]) == (15, o.state[params[0]]["lr_max"])
    st = sd["state"][0]
    assert st["z"].dtype == torch.float32 and st["step"].dim() == 0 and float(st["step"]) == 15
    assert type(st["weight_sum"]) is float  # double, as optkern's classes and the package keep it
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": sd}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = [torch.nn.Parameter(x.clone()) for x in saved["params"]]
    o2 = getattr(okt, name)(twin, **HP[name])
    o2.load_state_dict(saved["opt"])
    assert o2.param_groups[0]["train_mode"] is False
    assert "k" not in o2.param_groups[0]  # the package's counters become the per-parameter ones
    assert o2.state[twin[0]]["weight_sum"] == o.state[params[0]]["weight_sum"]
    with pytest.raises(RuntimeError, match="eval mode"):
        o2.step()
    for opt in (o, o2):
        opt.train()
    _train(o, params, gs[15:])
    _train(o2, twin, gs[15:])
    o.eval()
    o2.eval()
    for a, b in zip(params, twin):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("direction", ["package_to_okt", "okt_to_package"])
@pytest.mark.parametrize("name", list(PACKAGE))
def test_state_dicts_move_between_okt_and_the_package(name, direction):
    """The package keeps its counters per group, optkern per parameter: a state dict saved by
    either resumes in the other (optkern.ScheduleFreeAdamW on NumPy arrays does not load the
    package's state dict; optkern.torch's classes do)."""
    schedulefree = pytest.importorskip("schedulefree")
    gs = gradients(seed=5)
    p0 = initial(seed=6)
    made = {
        "okt": lambda ps: getattr(okt, name)(ps, **HP[name]),
        "package": lambda ps: getattr(schedulefree, PACKAGE[name])(ps, **HP[name]),
    }
    src, dst = direction.split("_to_")
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
    first = made[src](ps)
    first.train()
    _train(first, ps, gs[:15])
    first.eval()
    saved = ([p.detach().clone() for p in ps], first.state_dict())
    # the one that loads, and a reference that goes on from the same point without a load
    loaded_p = [torch.nn.Parameter(x.clone()) for x in saved[0]]
    loaded = made[dst](loaded_p)
    loaded.load_state_dict(copy.deepcopy(saved[1]))
    for opt in (first, loaded):
        opt.train()
    _train(first, ps, gs[15:])
    _train(loaded, loaded_p, gs[15:])
    first.eval()
    loaded.eval()
    for a, b in zip(ps, loaded_p):
        assert_close(b.detach().numpy(), a.detach().numpy(), "x after resuming", 10.0)


def test_counters_that_disagree_are_not_written_as_the_packages():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    o = okt.ScheduleFreeSGD([p, q], lr=0.1)
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    o.step()
    assert o.state_dict()["param_groups"][0]["k"] == 1
    q.grad = None  # q does not step: the two count differently from here
    o.step()
    assert float(o.state[p]["step"]) == 2 and float(o.state[q]["step"]) == 1
    assert "k" not in o.state_dict()["param_groups"][0]


def test_eval_train_move_only_stepped_parameters_and_bump_versions():
    p, late = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.full((2,), 3.0))
    o = okt.ScheduleFreeAdamW([p], lr=0.1)
    o.add_param_group({"params": [late]})
    assert [g["train_mode"] for g in o.param_groups] == [True, True]
    for g in (0.5, -0.25):  # after one step x = y = z: two
        p.grad = torch.full((4,), g)
        o.step()
    y = p.detach().clone()
    v = p._version
    o.eval()
    assert p._version > v  # autograd sees the in-place switch
    assert not torch.equal(p.detach(), y)
    assert torch.equal(late.detach(), torch.full((2,), 3.0))  # never stepped: y = x
    assert [g["train_mode"] for g in o.param_groups] == [False, False]
    o.eval()  # already in eval mode: nothing moves
    x = p.detach().clone()
    o.eval()
    assert torch.equal(p.detach(), x)
    o.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    assert o.param_groups[-1]["train_mode"] is False  # the first group's mode
    o.train()
    np.testing.assert_allclose(p.detach().numpy(), y.numpy(), rtol=1e-6, atol=1e-7)


def test_deepcopy_continues_identically_and_modes_survive():
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in initial(seed=7)]
    o = okt.ScheduleFreeAdamW(ps, lr=0.01)
    gs = gradients(seed=8)
    _train(o, ps, gs[:5])
    o.eval()
    o2 = copy.deepcopy(o)
    twin = [p for p in o2.param_groups[0]["params"]]
    assert o2.param_groups[0]["train_mode"] is False
    for opt, params in ((o, ps), (o2, twin)):
        opt.train()
        _train(opt, params, gs[5:10])
        opt.eval()
    for a, b in zip(ps, twin):
        assert torch.equal(a.detach(), b.detach())
