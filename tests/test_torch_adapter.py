"""optkern.torch against torch.optim (skipped when torch is not installed).

The core is torch's own optimizer test database: every OptimizerInput that
``torch.testing._internal.common_optimizers.optim_db`` gives for an optimizer torch and optkern
share, with torch's execution flags (``_get_optim_inputs_including_global_cliquey_kwargs``), runs
against torch's single-tensor path (``foreach=False``) for 30 steps, comparing parameters and every
state tensor. Inputs the kernels cannot serve (differentiable=True, and capturable=True, which
torch only offers for accelerators) run torch's own implementation: they must give exactly what
torch gives with the same arguments, its errors included, with a TorchFallbackWarning.
"""

import copy
import inspect
import io
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import optim_db as db
import pytest

from optkern import registry

torch = pytest.importorskip("torch")
okt = pytest.importorskip("optkern.torch")

RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(7, 13), (131,), (3, 5, 11), (1,)]
# The rules optkern.torch and torch.optim share: every rule of the optimizer database whose
# torch oracle has inputs in torch's optim_db.
SHARED = [e.name for e in db.with_oracle("torch") if e.oracle("torch").optim_db]
STEPS = 30


def _optim_db_cases(dtype=None):
    dtype = dtype or torch.float32
    try:
        from torch.testing._internal import common_optimizers as co
    except Exception as e:  # its imports (expecttest, ...) are test-only dependencies of torch
        return [
            pytest.param(
                None,
                None,
                None,
                marks=pytest.mark.skip(reason=f"could not import torch's optim_db: {e}"),
            )
        ]
    cases = []
    for info in co.optim_db:
        if info.name not in SHARED:
            continue
        cpu = co._get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, info)
        for inp in cpu:
            if dtype != torch.float32 and inp.kwargs.get("differentiable"):
                continue  # torch's own step runs it (tested in float32)
            cases.append(pytest.param(info.name, inp.kwargs, inp.desc, id=f"{info.name}-{inp.desc}"))
        if dtype != torch.float32:
            continue
        # inputs torch gives only for accelerators (capturable): counted as refused
        cpu_descs = {inp.desc for inp in info.optim_inputs_func(device="cpu")}
        for inp in info.optim_inputs_func(device="cuda"):
            if inp.desc not in cpu_descs:
                cases.append(
                    pytest.param(
                        info.name, inp.kwargs, inp.desc, id=f"{info.name}-accelerator-{inp.desc}"
                    )
                )
    return cases


def make_params(seed=0, shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) * 0.5 for s in shapes]


def grads_for(step, shapes=SHAPES, skip_last=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    out = [torch.randn(s, generator=g, dtype=dtype) * 0.1 for s in shapes]
    if skip_last:
        out[-1] = None  # one parameter without a gradient: not stepped, as in torch
    return out


def torch_kwargs(kwargs):
    """torch's single-tensor path for the same hyperparameters."""
    kw = {k: v for k, v in kwargs.items() if k not in ("fused", "foreach", "differentiable")}
    return dict(kw, foreach=False)


def assert_state_close(okt_opt, okt_params, ref_opt, ref_params, exact=False, tol=None):
    for i, (a, b) in enumerate(zip(okt_params, ref_params)):
        close(a.detach(), b.detach(), f"param {i}", exact, tol)
        sa, sb = okt_opt.state.get(a, {}), ref_opt.state.get(b, {})
        sb = {k: v for k, v in sb.items() if v is not None}
        assert set(sa) == set(sb), (i, sorted(sa), sorted(sb))
        for key in sb:
            if key == "step":
                assert sa[key].dtype == torch.float32 and sa[key].dim() == 0
                assert float(sa[key]) == float(sb[key])
                continue
            assert sa[key].is_contiguous() and sa[key].dtype == sb[key].dtype
            close(sa[key], sb[key], f"param {i} state {key}", exact, tol)


def close(a, b, what, exact=False, tol=None):
    a, b = a.detach().numpy(), b.detach().numpy()
    if exact:
        np.testing.assert_array_equal(a, b, err_msg=what)
        return
    rtol, atol = tol or (RTOL, ATOL)
    finite = np.abs(b[np.isfinite(b)])
    scale = max(1.0, float(np.max(finite, initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)


def run_pair(name, kwargs, steps=STEPS, shapes=SHAPES, okt_kwargs=None, dtype=torch.float32):
    p0 = make_params(shapes=shapes, dtype=dtype)
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    ref = [torch.nn.Parameter(p.clone()) for p in p0]
    o = getattr(okt, name)(mine, **(okt_kwargs if okt_kwargs is not None else kwargs))
    r = getattr(torch.optim, name)(ref, **torch_kwargs(kwargs))
    for t in range(steps):
        for a, b, g in zip(mine, ref, grads_for(t, shapes, dtype=dtype)):
            a.grad = None if g is None else g.clone()
            b.grad = None if g is None else g.clone()
        o.step()
        r.step()
    return o, mine, r, ref


def run_same(name, kwargs, steps=5, shapes=SHAPES, leaf=True):
    """optkern.torch and torch.optim with the same arguments: (outcome, ours, theirs), the
    outcome the exception type both raised at construction or at a step, else None."""
    sides = []
    for cls in (getattr(okt, name), getattr(torch.optim, name)):
        p0 = make_params(shapes=shapes)
        ps = [torch.nn.Parameter(p.clone()) for p in p0]
        if not leaf:  # differentiable=True steps a non-leaf tensor (as torch's own tests do)
            ps = [p.clone() for p in ps]
            for p in ps:
                p.retain_grad()
        try:
            opt = cls(ps, **kwargs)
            for t in range(steps):
                for a, g in zip(ps, grads_for(t, shapes)):
                    a.grad = g
                opt.step()
        except Exception as e:  # noqa: BLE001 (compared below)
            sides.append((type(e), None, None))
            continue
        sides.append((None, opt, ps))
    (err, o, mine), (terr, r, ref) = sides
    assert err is terr, (err, terr)
    return err, (o, mine), (r, ref)


@pytest.mark.parametrize("name, kwargs, desc", _optim_db_cases())
def test_optim_db_input_matches_torch_single_tensor(name, kwargs, desc):
    fallback = [f for f in ("differentiable", "capturable") if kwargs.get(f)]
    if fallback:
        # torch's own implementation runs such a group: exactly torch's results, or its error
        with pytest.warns(okt.TorchFallbackWarning, match=f"{fallback[0]}=True"):
            err, (o, mine), (r, ref) = run_same(name, kwargs, leaf=not kwargs.get("differentiable"))
        if err is None:
            assert_state_close(o, mine, r, ref, exact=True)
        return
    p0 = make_params()
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    o = getattr(okt, name)(mine, **kwargs)
    ptrs = [p.data_ptr() for p in mine]
    o2, mine2, r, ref = run_pair(name, kwargs)
    assert_state_close(o2, mine2, r, ref)
    # in place: no parameter or state tensor moved after its creation
    for t in range(3):
        for a, g in zip(mine, grads_for(t)):
            a.grad = g
        o.step()
        if t == 0:
            sptrs = {(i, k): v.data_ptr() for i, a in enumerate(mine) for k, v in o.state[a].items()}
    assert [p.data_ptr() for p in mine] == ptrs
    assert {(i, k): v.data_ptr() for i, a in enumerate(mine) for k, v in o.state[a].items()} == sptrs


# float64 against torch's float64 single-tensor path: the kernels' float64 instantiation (no
# fallback), at a tolerance float32 could not meet. torch keeps the numbers a rule carries from
# step to step (NAdam's mu_product, ASGD's eta and mu) in 0-d float32 tensors whatever the
# parameter's dtype, and so does optkern.torch (its state layout): those rules' per-step scalars
# are float32-rounded on both sides, in a different order, so their results agree to float32's
# rounding of a scalar, not float64's.
F64_TOL = (1e-12, 1e-13)
F64_TOL_CARRIED = (1e-7, 1e-10)


@pytest.mark.parametrize("name, kwargs, desc", _optim_db_cases(torch.float64))
def test_optim_db_float64_input_matches_torch_single_tensor(name, kwargs, desc):
    tol = F64_TOL_CARRIED if okt.RULES[name].rule_for(kwargs).carried else F64_TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error", okt.TorchFallbackWarning)  # the kernels serve float64
        o, mine, r, ref = run_pair(name, kwargs, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in mine)
    assert_state_close(o, mine, r, ref, tol=tol)


def test_float32_and_float64_parameters_in_one_group_match_torch():
    shapes = [(7, 13), (131,)]
    p0 = make_params(shapes=shapes, dtype=torch.float64)
    p0[1] = p0[1].float()
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    ref = [torch.nn.Parameter(p.clone()) for p in p0]
    o = okt.Adam(mine, lr=0.01, weight_decay=0.1, amsgrad=True)
    r = torch.optim.Adam(ref, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=False)
    for t in range(20):
        for a, b, g in zip(mine, ref, grads_for(t, shapes, skip_last=False, dtype=torch.float64)):
            a.grad, b.grad = g.to(a.dtype), g.to(b.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", okt.TorchFallbackWarning)
            o.step()
        r.step()
    close(mine[0], ref[0], "float64 parameter", tol=F64_TOL)
    close(mine[1], ref[1], "float32 parameter")
    assert o.state[mine[0]]["exp_avg"].dtype == torch.float64
    assert o.state[mine[1]]["exp_avg"].dtype == torch.float32


def test_optim_db_covers_every_shared_optimizer():
    names = {c.values[0] for c in _optim_db_cases()}
    assert names == set(SHARED) or names == {None}


# -- plain SGD is bit-identical; the extras match their torch spelling --------------------------


def test_plain_sgd_is_bit_identical():
    # Bit for bit on optkern's FMA builds (avx2, avx512, neon, sve), which fuse the multiply-add
    # as torch's CPU kernel does here; x86-64's baseline build (no FMA) is within float32
    # rounding, as test_isa says.
    import optkern as ok

    o, mine, r, ref = run_pair("SGD", {"lr": 0.01, "weight_decay": 0.1})
    exact = ok.active_isa() in ok.build_info()["fused_multiply_add"]
    assert_state_close(o, mine, r, ref, exact=exact)


def test_nesterov_is_sgd_with_nesterov():
    p0 = make_params()
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    ref = [torch.nn.Parameter(p.clone()) for p in p0]
    o = okt.Nesterov(mine, lr=0.01, weight_decay=0.1)
    r = torch.optim.SGD(ref, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1, foreach=False)
    for t in range(STEPS):
        for a, b, g in zip(mine, ref, grads_for(t)):
            a.grad, b.grad = g, None if g is None else g.clone()
        o.step()
        r.step()
    assert_state_close(o, mine, r, ref)
    assert o.state_dict()["param_groups"][0]["nesterov"] is True
    r.load_state_dict(copy.deepcopy(o.state_dict()))  # saves as torch's SGD


def test_momentum_matches_numpy_optkern():
    import optkern as ok

    p0 = make_params()
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    arrays = [p.numpy().copy() for p in p0]
    o = okt.Momentum(mine, lr=0.05, beta=0.8)
    ref = ok.Momentum(arrays[:-1], lr=0.05, beta=0.8)
    for t in range(STEPS):
        gs = grads_for(t)
        for a, g in zip(mine, gs):
            a.grad = g
        o.step()
        ref.step([g.numpy() for g in gs[:-1]])
    for a, b in zip(mine[:-1], arrays[:-1]):
        np.testing.assert_array_equal(a.detach().numpy(), b)


# The rules torch.optim lacks (optkern.torch runs them on optkern's kernels): each at its last
# two reference option sets. Dense gradients: SparseAdam, which takes sparse ones only (torch's
# refuses dense ones), is checked in test_torch_algos.py.
NOT_IN_TORCH = [
    (e.name, hp)
    for e in db.ENTRIES
    if not e.oracle("torch") and not okt.RULES[e.name].sparse_only
    for hp in e.cases[-2:]
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name, kwargs", NOT_IN_TORCH, ids=[db.case_id(c) for c in NOT_IN_TORCH])
def test_rules_torch_lacks_match_numpy_optkern_bit_for_bit(name, kwargs, dtype):
    import optkern as ok

    p0 = make_params(dtype=dtype)
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    arrays = [p.numpy().copy() for p in p0]
    o = getattr(okt, name)(mine, **kwargs)
    ref = getattr(ok, name)(arrays[:-1], **kwargs)
    ptrs = [p.data_ptr() for p in mine]
    for t in range(STEPS):
        gs = grads_for(t, dtype=dtype)
        for a, g in zip(mine, gs):
            a.grad = g
        o.step()
        ref.step([g.numpy() for g in gs[:-1]])
        if t == 0:
            sptrs = {
                (i, k): v.data_ptr()
                for i, a in enumerate(mine[:-1])
                for k, v in o.state[a].items()
                if isinstance(v, torch.Tensor)
            }
    for a, b in zip(mine[:-1], arrays[:-1]):
        np.testing.assert_array_equal(a.detach().numpy(), b)
    assert mine[-1].detach().equal(p0[-1])  # no gradient: not stepped
    assert [p.data_ptr() for p in mine] == ptrs
    assert {
        (i, k): v.data_ptr()
        for i, a in enumerate(mine[:-1])
        for k, v in o.state[a].items()
        if isinstance(v, torch.Tensor)
    } == sptrs
    # state in torch's layout; it reloads into a fresh okt optimizer and continues identically
    st = o.state_dict()["state"][0]
    rule = db.entry(name).rule
    arrays = [k for k in st if k in rule.array_state_names]
    assert arrays
    for k in arrays:
        assert st[k].dtype == dtype and st[k].shape == rule.state(k).shape_for(SHAPES[0])
    if rule.counts_steps:
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0
        assert float(st["step"]) == STEPS
    else:
        assert "step" not in st
    twin = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    o2 = getattr(okt, name)(twin, **kwargs)
    o2.load_state_dict(copy.deepcopy(o.state_dict()))
    for t in range(STEPS, STEPS + 3):
        gs = grads_for(t, dtype=dtype)
        for a, b, g in zip(mine, twin, gs):
            a.grad, b.grad = g, None if g is None else g.clone()
        o.step()
        o2.step()
    for a, b in zip(mine, twin):
        assert torch.equal(a.detach(), b.detach())


def test_every_registry_rule_has_a_class():
    from optkern import registry

    assert okt.UNMAPPED == {}
    assert set(okt.RULES) == {r.cls for r in registry.rules()} | {"Nesterov"}
    for r in registry.rules():
        cls = getattr(okt, r.cls)
        assert issubclass(cls, torch.optim.Optimizer) and r.cls in okt.__all__
        sig = inspect.signature(cls)
        for arg, default in r.torch_args() + [("maximize", False)]:
            assert sig.parameters[arg].default == default, (r.cls, arg)


def test_carried_numbers_are_0d_float32_as_torchs():
    for name, keys in (("NAdam", {"mu_product"}), ("ASGD", {"eta", "mu"})):
        p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
        o, r = (
            getattr(okt, name)([p], lr=0.05),
            getattr(torch.optim, name)([q], lr=0.05, foreach=False),
        )
        for _ in range(3):
            p.grad, q.grad = torch.full((4,), 0.5), torch.full((4,), 0.5)
            o.step()
            r.step()
        for k in keys:
            a, b = o.state[p][k], r.state[q][k]
            assert a.dtype == b.dtype == torch.float32 and a.dim() == b.dim() == 0
            assert float(a) == pytest.approx(float(b), rel=1e-6), (name, k)


# -- state dicts: torch's layout, both ways, mid-training ------------------------------------------

CONFIGS = [
    ("SGD", {"lr": 0.01, "weight_decay": 0.1}),  # no state at all, as in torch
    ("SGD", {"lr": 0.01, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("Adadelta", {"lr": 0.5, "rho": 0.95, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01, "maximize": True}),
    ("Adamax", {"lr": 0.01, "weight_decay": 0.1}),
    ("NAdam", {"lr": 0.01, "momentum_decay": 0.01, "weight_decay": 0.1}),
    ("NAdam", {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("RAdam", {"lr": 0.01, "weight_decay": 0.1}),
    ("RAdam", {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("ASGD", {"lr": 0.05, "t0": 5, "lambd": 0.01, "weight_decay": 0.1}),
    ("Rprop", {"lr": 0.02, "etas": (0.4, 1.3), "step_sizes": (1e-5, 1.0), "maximize": True}),
    ("Adafactor", {"lr": 0.02, "weight_decay": 0.1, "d": 1.5}),
    ("Adafactor", {"eps": (1e-20, 1e-2), "beta2_decay": -1.0, "maximize": True}),
]
# every other shared rule (one the registry adds): the options that keep all its state
CONFIGS += [(n, dict(db.entry(n).attack[-1])) for n in SHARED if n not in {c for c, _ in CONFIGS}]
CONFIG_IDS = [f"{n}-{'-'.join(k for k in kw if k != 'lr')}" for n, kw in CONFIGS]


def _feed(params_a, params_b, t):
    for a, b, g in zip(params_a, params_b, grads_for(t)):
        a.grad = None if g is None else g.clone()
        b.grad = None if g is None else g.clone()


def _roundtrip(sd, via_file):
    if not via_file:
        return copy.deepcopy(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("via_file", [False, True], ids=["deepcopy", "torch.save"])
@pytest.mark.parametrize("direction", ["okt->torch", "torch->okt"])
@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_moves_mid_training(name, kwargs, direction, via_file):
    p0 = make_params()
    # the reference: torch all the way
    ref = [torch.nn.Parameter(p.clone()) for p in p0]
    r = getattr(torch.optim, name)(ref, **torch_kwargs(kwargs))
    # the subject: 12 steps with one, then its state dict into the other, then 18 more steps
    first = [torch.nn.Parameter(p.clone()) for p in p0]
    A = okt if direction == "okt->torch" else torch.optim
    B = torch.optim if direction == "okt->torch" else okt
    kw_a = kwargs if A is okt else torch_kwargs(kwargs)
    kw_b = kwargs if B is okt else torch_kwargs(kwargs)
    a = getattr(A, name)(first, **kw_a)
    for t in range(12):
        _feed(first, ref, t)
        a.step()
        r.step()
    sd = _roundtrip(a.state_dict(), via_file)
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    b = getattr(B, name)(second, **kw_b)
    b.load_state_dict(sd)
    assert b.state_dict()["param_groups"] == a.state_dict()["param_groups"]
    for t in range(12, 30):
        _feed(second, ref, t)
        b.step()
        r.step()
    if B is okt:
        assert_state_close(b, second, r, ref)
    else:
        assert_state_close_rev(b, second, r, ref)


def assert_state_close_rev(torch_opt, torch_params, ref_opt, ref_params):
    for i, (a, b) in enumerate(zip(torch_params, ref_params)):
        close(a.detach(), b.detach(), f"param {i}")
        sa, sb = torch_opt.state.get(a, {}), ref_opt.state.get(b, {})
        assert set(sa) == set(sb)
        for k in sb:
            close(sa[k].detach(), sb[k], f"param {i} state {k}")


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_layout_is_torchs(name, kwargs):
    p0 = make_params()
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    ref = [torch.nn.Parameter(p.clone()) for p in p0]
    o = getattr(okt, name)(mine, **kwargs)
    r = getattr(torch.optim, name)(ref, **torch_kwargs(kwargs))
    for t in range(3):
        _feed(mine, ref, t)
        o.step()
        r.step()
    so, sr = o.state_dict(), r.state_dict()
    go, gr = so["param_groups"][0], sr["param_groups"][0]
    assert set(go) == set(gr)
    assert {k: v for k, v in go.items() if k != "foreach"} == {
        k: v for k, v in gr.items() if k != "foreach"
    }
    assert set(so["state"]) == set(sr["state"])
    for pid, st in sr["state"].items():
        assert set(so["state"][pid]) == set(st)
        for k, v in st.items():
            mine_v = so["state"][pid][k]
            assert type(mine_v) is type(v) and mine_v.dtype == v.dtype
            assert mine_v.shape == v.shape and mine_v.device == v.device, k


def test_adagrad_state_exists_after_construction_as_in_torch():
    p = torch.nn.Parameter(torch.zeros(5))
    q = torch.nn.Parameter(torch.zeros(5))
    so = okt.Adagrad([p], initial_accumulator_value=0.3).state_dict()
    sr = torch.optim.Adagrad([q], initial_accumulator_value=0.3).state_dict()
    assert set(so["state"][0]) == set(sr["state"][0]) == {"step", "sum"}
    assert torch.equal(so["state"][0]["sum"], sr["state"][0]["sum"])


def test_loaded_state_is_converted_once_to_contiguous_float32():
    """torch's load (its class normalizes an old plain-number step); the kernels' first step
    converts the state to contiguous float32 tensors once, and keeps them."""
    p0 = torch.randn(6, 6)
    src = torch.nn.Parameter(p0.clone())
    r = torch.optim.Adam([src], foreach=False)
    src.grad = torch.randn(6, 6)
    r.step()
    sd = copy.deepcopy(r.state_dict())
    st = sd["state"][0]
    st["exp_avg"] = st["exp_avg"].t().contiguous().t()  # same values, not contiguous
    st["step"] = 1  # an old checkpoint's plain number
    assert not st["exp_avg"].is_contiguous()
    p = torch.nn.Parameter(p0.clone())
    o = okt.Adam([p])
    o.load_state_dict(sd)
    s = o.state[p]
    assert torch.equal(s["exp_avg"], r.state[src]["exp_avg"])
    assert s["step"].dtype == torch.float32 and s["step"].dim() == 0 and float(s["step"]) == 1
    p.grad = torch.randn(6, 6)
    o.step()
    s = o.state[p]
    assert s["exp_avg"].is_contiguous() and s["exp_avg"].dtype == torch.float32
    ptr = s["exp_avg"].data_ptr()
    o.step()
    assert o.state[p]["exp_avg"].data_ptr() == ptr and float(o.state[p]["step"]) == 3


def test_replaced_state_and_param_data_are_picked_up():
    """The cached NumPy views follow a state tensor or p.data that the user replaced."""
    p0 = make_params(shapes=[(9,)])[0]
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    o, r = okt.Adam([a], lr=0.1), torch.optim.Adam([b], lr=0.1, foreach=False)
    for t in range(6):
        g = torch.randn(9)
        a.grad, b.grad = g.clone(), g.clone()
        o.step()
        r.step()
        if t == 2:
            fresh = torch.full((9,), 0.5)
            o.state[a]["exp_avg"] = fresh.clone()
            r.state[b]["exp_avg"] = fresh.clone()
            o.state[a]["step"] = torch.tensor(10.0)
            r.state[b]["step"] = torch.tensor(10.0)
        if t == 4:
            a.data = torch.ones(9)
            b.data = torch.ones(9)
    close(a.detach(), b.detach(), "param")
    close(o.state[a]["exp_avg"], r.state[b]["exp_avg"], "exp_avg")
    assert float(o.state[a]["step"]) == float(r.state[b]["step"]) == 13


def test_deepcopy_and_pickle_continue_identically():
    import pickle

    p = torch.nn.Parameter(torch.randn(17))
    o = okt.RMSprop([p], lr=0.01, momentum=0.9)
    for _ in range(3):
        p.grad = torch.randn(17)
        o.step()
    o2 = pickle.loads(pickle.dumps(o))
    p2 = o2.param_groups[0]["params"][0]
    g = torch.randn(17)
    p.grad, p2.grad = g.clone(), g.clone()
    o.step()
    o2.step()
    assert torch.equal(p.detach(), p2.detach())


# -- torch's machinery: schedulers, closure, hooks, named parameters, flags ------------------------


@pytest.mark.parametrize("sched", ["StepLR", "CosineAnnealingLR", "OneCycleLR", "Plateau"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_torch_scheduler_drives_okt_as_torch(name, sched):
    from torch.optim import lr_scheduler as L

    make = {
        "StepLR": lambda o: L.StepLR(o, step_size=4, gamma=0.5),
        "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
        "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),
        "Plateau": lambda o: L.ReduceLROnPlateau(o, patience=1, factor=0.5),
    }[sched]
    kwargs = {"lr": 0.02, "momentum": 0.9} if name in ("SGD", "RMSprop") else {"lr": 0.02}
    p0 = make_params()
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    ref = [torch.nn.Parameter(p.clone()) for p in p0]
    o = getattr(okt, name)(mine, **kwargs)
    r = getattr(torch.optim, name)(ref, **torch_kwargs(kwargs))
    so, sr = make(o), make(r)
    lrs = []
    for t in range(STEPS):
        _feed(mine, ref, t)
        o.step()
        r.step()
        if sched == "Plateau":
            so.step(1.0)
            sr.step(1.0)
        else:
            so.step()
            sr.step()
        lrs.append((o.param_groups[0]["lr"], r.param_groups[0]["lr"]))
    assert all(x == y for x, y in lrs)
    assert len({x for x, _ in lrs}) > 1  # the schedule did change the learning rate
    assert_state_close(o, mine, r, ref)


def test_closure_runs_with_grad_and_returns_loss():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    o = okt.SGD([w], lr=0.1)

    def closure():
        assert torch.is_grad_enabled()
        o.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = o.step(closure)
    assert float(loss.detach()) == 5.0
    assert torch.allclose(w.detach(), torch.tensor([0.8, -1.6]))


def test_step_hooks_fire_like_torchs():
    w = torch.nn.Parameter(torch.ones(3))
    o = okt.Adam([w])
    calls = []
    h1 = o.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt)))
    h2 = o.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt)))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    h3 = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(("global", opt)))
    try:
        w.grad = torch.ones(3)
        o.step()
    finally:
        h1.remove()
        h2.remove()
        h3.remove()
    assert calls == [("pre", o), ("post", o), ("global", o)]
    o.step()
    assert len(calls) == 3


def test_step_hooks_change_args_and_run_once_in_a_subclass():
    """optkern's step runs torch's hooks itself (no record_function outside a profiler): a pre
    hook may replace the arguments, as with torch's wrapper, and a subclass that overrides step
    (which torch then wraps) runs every hook once, not twice."""
    w = torch.nn.Parameter(torch.ones(3))
    o = okt.SGD([w], lr=0.5)
    w.grad = torch.ones(3)
    ran = []

    def closure():
        ran.append("closure")
        return torch.tensor(7.0)

    h = o.register_step_pre_hook(lambda opt, args, kwargs: (args, {"closure": closure}))
    try:
        assert float(o.step()) == 7.0
    finally:
        h.remove()
    assert ran == ["closure"]
    h = o.register_step_pre_hook(lambda opt, args, kwargs: "nonsense")
    try:
        with pytest.raises(RuntimeError, match="must return None or a tuple"):
            o.step()
    finally:
        h.remove()

    class Counting(okt.Adam):
        def step(self, closure=None):
            self.own += 1
            return super().step(closure)

    v = torch.nn.Parameter(torch.ones(3))
    c = Counting([v])
    c.own = 0
    calls = []
    c.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    c.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    v.grad = torch.ones(3)
    c.step()
    assert (c.own, calls) == (1, ["pre", "post"])
    assert c.state[v]["step"].item() == 1.0


def test_step_is_labelled_in_a_profile():
    w = torch.nn.Parameter(torch.ones(3))
    o = okt.Adam([w])
    w.grad = torch.ones(3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        o.step()
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#Adam.step" in names


def test_hyperparameters_checked_again_when_they_change():
    """After the first step the checked hyperparameters are reused while the group's values and
    types stay the same; any change is checked again before anything is written."""
    w = torch.nn.Parameter(torch.ones(5))
    o = okt.Adam([w], lr=0.1)
    ref = torch.nn.Parameter(torch.ones(5))
    r = torch.optim.Adam([ref], lr=0.1, foreach=False)
    g = torch.linspace(-1, 1, 5)
    for lr in (0.1, 0.1, 0.05, np.float64(0.02), torch.tensor(0.01), 0.01):
        o.param_groups[0]["lr"] = lr
        r.param_groups[0]["lr"] = float(lr)
        w.grad, ref.grad = g.clone(), g.clone()
        o.step()
        r.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=RTOL, atol=ATOL)
    lr_tensor = torch.tensor(0.01)
    o.param_groups[0]["lr"] = lr_tensor
    w.grad = g.clone()
    o.step()
    lr_tensor.fill_(-1.0)  # changed in place: the same object, a new value
    # a value the kernels do not take: torch's own implementation steps the group with it
    ref = torch.nn.Parameter(w.detach().clone())
    r = torch.optim.Adam([ref])
    r.load_state_dict(copy.deepcopy(o.state_dict()))
    w.grad, ref.grad = g.clone(), g.clone()
    with pytest.warns(okt.TorchFallbackWarning, match="lr must be >= 0"):
        o.step()
    r.step()
    assert torch.equal(w.detach(), ref.detach())
    # a class torch lacks refuses such values, before anything changes
    v = torch.nn.Parameter(torch.ones(5))
    lion = okt.Lion([v], lr=0.1)
    for key, bad, err in [
        ("lr", -0.1, ValueError),
        ("betas", (0.9, 1.5), ValueError),
        ("maximize", 1, TypeError),  # 1 == True, but a flag must be a bool
        ("lr", float("nan"), ValueError),
    ]:
        lion.param_groups[0]["lr"] = 0.01
        good = lion.param_groups[0][key]
        v.grad = g.clone()
        lion.step()  # the good values are remembered
        lion.param_groups[0][key] = bad
        with pytest.raises(err):
            lion.step()
        snap = v.detach().clone()
        with pytest.raises(err):
            lion.step()
        assert torch.equal(v.detach(), snap)
        lion.param_groups[0][key] = good


def test_zero_grad_and_version_counter():
    w = torch.nn.Parameter(torch.ones(4))
    o = okt.AdamW([w], foreach=True)
    w.grad = torch.ones(4)
    v = w._version
    o.step()
    assert w._version > v  # autograd knows the parameter changed in place
    o.zero_grad(set_to_none=False)
    assert torch.equal(w.grad, torch.zeros(4))
    o.zero_grad()
    assert w.grad is None


def test_named_parameters_and_groups():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    ref = copy.deepcopy(model)
    o = okt.Adam(model.named_parameters(), lr=0.01)
    r = torch.optim.Adam(ref.named_parameters(), lr=0.01, foreach=False)
    assert o.state_dict()["param_groups"][0]["param_names"] == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    x = torch.randn(8, 5)
    for _ in range(5):
        for m, opt in ((model, o), (ref, r)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        close(a.detach(), b.detach(), "param")
    # groups: per-group options and add_param_group
    extra = torch.nn.Parameter(torch.ones(3))
    o2 = okt.SGD([{"params": [extra], "lr": 0.5}], lr=0.1, momentum=0.9)
    late = torch.nn.Parameter(torch.ones(2))
    o2.add_param_group({"params": [late]})
    extra.grad, late.grad = torch.ones(3), torch.ones(2)
    o2.step()
    assert torch.allclose(extra.detach(), torch.full((3,), 0.5))
    assert torch.allclose(late.detach(), torch.full((2,), 0.9))


def test_signature_and_defaults_are_torchs():
    import inspect

    for name in SHARED:
        ours = inspect.signature(getattr(okt, name))
        theirs = inspect.signature(getattr(torch.optim, name))
        # torch's arguments, then optkern's precision options (keyword-only)
        precision = [(n, inspect.Parameter.KEYWORD_ONLY, d) for n, _, d in registry.PRECISION_ARGS]
        assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
            (p.name, p.kind, p.default) for p in theirs.parameters.values()
        ] + precision, name
        assert issubclass(getattr(okt, name), torch.optim.Optimizer)
        p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        assert getattr(okt, name)([p]).defaults == getattr(torch.optim, name)([q]).defaults


def test_execution_flags():
    p = torch.nn.Parameter(torch.zeros(2))
    for flags in (
        {"foreach": None},
        {"foreach": False},
        {"foreach": True},
        {"fused": True},
        {"fused": False},
        {"differentiable": False},
        {"differentiable": True},  # taken as torch takes it (its group runs torch's step)
        {"capturable": True},
    ):
        okt.Adam([p], **flags)
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        okt.Adam([p], fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        okt.Adam([p], fused=True, differentiable=True)
    for flag in ("differentiable", "capturable"):  # a class torch lacks has nothing to run them
        with pytest.raises(ValueError, match=f"does not support {flag}=True"):
            okt.Lion([p], **{flag: True})
    okt.SGD([p]).add_param_group(
        {"params": [torch.nn.Parameter(torch.zeros(1))], "differentiable": True}
    )
    with pytest.raises(TypeError):
        okt.SGD([p], lr=0.1, betas=(0.9, 0.9))  # not an SGD argument: TypeError as in torch
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        okt.Adam([p], lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        okt.SGD([p], nesterov=True)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        okt.Lion([p], lr=-1.0)


def test_tensor_lr_and_betas():
    o, mine, r, ref = run_pair(
        "Adam", {"lr": torch.tensor(0.01), "betas": (torch.tensor(0.8), torch.tensor(0.99))}
    )
    assert_state_close(o, mine, r, ref)


# -- what the kernels cannot serve: torch's own implementation, or (a class torch lacks) an error --

BAD_PARAMS = {  # (float16 and bfloat16 run on the kernels: tests/test_torch_lowbits.py)
    "complex64": (lambda: torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64)), "complex64"),
    "meta": (lambda: torch.nn.Parameter(torch.zeros(4, device="meta")), "is on meta"),
}


@pytest.mark.parametrize("bad", list(BAD_PARAMS))
def test_parameters_the_kernels_cannot_serve_run_torchs_step(bad):
    make, what = BAD_PARAMS[bad]
    good, ref_good = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    p, q = make(), make()
    o = okt.Adam([("good", good), ("bad", p)], lr=0.1)  # accepted, as torch accepts them
    r = torch.optim.Adam([ref_good, q], lr=0.1)
    for t in range(3):
        good.grad, ref_good.grad = torch.ones(3), torch.ones(3)
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            o.step()
        r.step()
        said = [str(w.message) for w in seen if w.category is okt.TorchFallbackWarning]
        if t == 0:
            assert len(said) == 1 and "'bad'" in said[0] and what in said[0], said
        else:
            assert not said  # said once
    assert torch.equal(good.detach(), ref_good.detach())
    if bad != "meta":
        assert torch.equal(p.detach(), q.detach())
        assert all(torch.equal(o.state[p][k], v) for k, v in r.state[q].items())


@pytest.mark.parametrize("bad", list(BAD_PARAMS))
def test_a_class_torch_lacks_refuses_them_at_the_step_naming_them(bad):
    make, what = BAD_PARAMS[bad]
    good = torch.nn.Parameter(torch.zeros(3))
    o = okt.Lion([("good", good), ("bad", make())])  # taken at construction, as torch takes it
    for p in o.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match=f"'bad'.*{what}"):
        o.step()
    assert torch.equal(good.detach(), torch.zeros(3)) and not o.state


def test_parameters_that_are_not_contiguous_are_stepped_in_place():
    base, ref_base = torch.randn(6, 5, 2), None
    ref_base = base.clone()
    p = torch.nn.Parameter(base[..., 0])  # a strided view: the kernels step a contiguous copy
    q = torch.nn.Parameter(ref_base[..., 0])
    assert not p.is_contiguous()
    o, r = okt.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1, foreach=False)
    for t in range(4):
        g = torch.randn(6, 5)
        p.grad, q.grad = g.clone(), g.clone()
        o.step()
        r.step()
    close(p.detach(), q.detach(), "strided parameter")
    assert p.data_ptr() == base.data_ptr() + 0  # still the user's memory
    close(o.state[p]["exp_avg"], r.state[q]["exp_avg"], "exp_avg")


def test_gradients_the_kernels_cannot_read():
    w = torch.nn.Parameter(torch.ones(4, 4))
    v = torch.nn.Parameter(torch.ones(3))
    o = okt.Adam([w, v], lr=0.1)
    v.grad = torch.ones(3)
    w.grad = torch.ones(4, 4).t()  # not contiguous: read through a copy
    o.step()
    assert torch.allclose(w.detach(), torch.full((4, 4), 0.9))
    w.grad = torch.ones(4, 4).to_sparse()  # torch's own step refuses it, with torch's message
    with pytest.warns(okt.TorchFallbackWarning), pytest.raises(RuntimeError, match="sparse"):
        o.step()
    lion = okt.Lion([w, v])  # a class torch lacks names it
    with pytest.raises(
        TypeError, match="gradient of parameter 0.*is sparse, which Lion does not take"
    ):
        lion.step()
    assert not lion.state
    w.grad = torch.ones(4, 4)
    w.grad.data = torch.ones(5)  # a gradient of another shape: refused, nothing changes
    before = w.detach().clone()
    with pytest.raises(ValueError, match="gradient of parameter 0 of param group 0 has shape"):
        o.step()
    assert torch.equal(w.detach(), before)


def test_aliasing_parameters_run_torchs_step():
    outs = []
    for cls in (okt.SGD, torch.optim.SGD):
        base = torch.zeros(10)
        a = torch.nn.Parameter(base[:5])
        b = torch.nn.Parameter(base[:5])  # the same memory: the kernels do not take it
        o = cls([("a", a), ("b", b)], lr=0.1)
        a.grad, b.grad = torch.ones(5), torch.ones(5)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            o.step()
        outs.append((base, seen))
    assert torch.equal(outs[0][0], outs[1][0])
    assert any("shares memory" in str(w.message) for w in outs[0][1])
    base = torch.zeros(10)  # a class torch lacks refuses it, naming both
    a, b = torch.nn.Parameter(base[:5]), torch.nn.Parameter(base[:5])
    o = okt.Lion([("a", a), ("b", b)], lr=0.1)
    a.grad, b.grad = torch.ones(5), torch.ones(5)
    with pytest.raises(ValueError, match="shares memory.*'a'.*'b'"):
        o.step()
    assert torch.equal(base, torch.zeros(10))


# -- packaging -------------------------------------------------------------------------------------


@pytest.mark.spawns
def test_import_optkern_does_not_import_torch():
    code = "import sys, optkern; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_torch_mlp_example_trains_like_torch():
    from optkern.examples import torch_mlp

    rows = torch_mlp.run(["RMSprop", "Adam"], n=300, hidden=32, epochs=2)
    for r in rows:
        assert abs(r["okt_loss"] - r["torch_loss"]) < 1e-3 * max(1.0, r["torch_loss"]), r
        assert r["max_param_difference"] < 1e-3, r


def test_zero_grad_frees_the_gradient():
    import gc
    import weakref

    w = torch.nn.Parameter(torch.ones(1000))
    o = okt.Adam([w])
    w.grad = torch.ones(1000)
    o.step()
    ref = weakref.ref(w.grad)
    o.zero_grad()  # set_to_none: the old gradient must not be kept alive by the optimizer
    gc.collect()
    assert ref() is None


def test_bench_torch_runs_small(capsys):
    from optkern.benchmark import torch_bench as tb

    steps = tb.bench_steps(["RMSprop", "Adam"], [1000], repeats=1)
    assert [r["optimizer"] for r in steps] == ["RMSprop", "Adam"]
    assert all(r["torch_s"] > 0 and r["okt_s"] > 0 for r in steps)
    over = tb.bench_overhead(repeats=1, nparams=5, size=8)
    tb.report_torch(
        {
            "torch": torch.__version__,
            "threads": 1,
            "steps": steps,
            "loop": [dict(steps[0], params=1000)],
            "overhead": over,
        }
    )
    assert "RMSprop" in capsys.readouterr().out


def test_bench_torch_pairs_alternate_order():
    """The step benchmark swaps which of the two runs first every repeat, so that neither
    always runs right after the other (torch's OpenMP workers spin for a while after its ops)."""
    from optkern.benchmark import torch_bench as tb

    calls = []
    tb._median_pair(lambda: calls.append("a"), lambda: calls.append("b"), repeats=4, inner=2)
    assert "".join(calls) == "ab" + "aabb" + "bbaa" + "aabb" + "bbaa"


def test_bench_torch_cheap_steps_get_more_repeats():
    """With min_seconds, a case whose repeats are cheap is repeated until they add up to about
    that long (never fewer than `repeats`, never more than MAX_REPEATS); without it, exactly
    `repeats`. The 1M rows of `bench --torch` use it: 5 medians of a sub-millisecond step were
    too few on a noisy machine."""
    from optkern.benchmark import torch_bench as tb

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.001)

    tb._median_pair(slow, slow, repeats=2, inner=1)
    assert len(calls) == 2 + 2 * 2  # warm-up pair + 2 repeats
    calls.clear()
    tb._median_pair(slow, slow, repeats=2, inner=1, min_seconds=0.5)
    # 0.5 s / (2 calls of >= 1 ms): the cap of 101 repeats on a quiet machine; at least 10
    # repeats unless a 1 ms sleep takes 25 ms
    assert 2 + 2 * 10 <= len(calls) <= 2 + 2 * tb.MAX_REPEATS
    calls.clear()
    tb._median_pair(lambda: calls.append(1), lambda: calls.append(1), 3, 1, min_seconds=10.0)
    assert len(calls) == 2 + 2 * tb.MAX_REPEATS  # capped
