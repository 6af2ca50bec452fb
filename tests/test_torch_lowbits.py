"""optkern.torch on bfloat16 and float16 tensors, with optkern's precision options (skipped
without torch and ml_dtypes).

The exact oracle is optkern's own NumPy classes on the same data: the torch classes run the same
kernels on views of the tensors' memory, so parameters and every state entry agree bit for bit,
for each state_dtype, master weights and stochastic rounding.

Against torch.optim the agreement is within 16-bit rounding, not bit for bit: torch's 16-bit step
computes each operation in the parameter's dtype (every intermediate tensor, the state among them,
rounded to 16 bits), optkern's computes the update in float32 from the loaded values and rounds
once, to nearest even, on the store. From the same parameter and state, the two new parameters
are each within half a unit in the last place (ulp) of the exact update, and torch's update differs
from the exact one by at most C roundings of intermediates, each a relative u (the unit
roundoff: 2**-8 for bfloat16, 2**-11 for float16) of the update: so

    |p_optkern - p_torch| <= ulp(p) + C * u * |p_new - p_old|

and the same for each state tensor. C = 16 covers the longest chain of rounded operations of
the rules compared (torch's NAdam and RAdam round about ten intermediates). The check runs one
step at a time from the same state (torch's state dict loaded into optkern before each step), so
differences do not compound, on torch's own optimizer test inputs (optim_db) in bfloat16 and
float16, against torch's single-tensor step and its fused one where torch has it on the CPU.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import optim_db as db
import pytest
from helpers import bits

import optkern as ok
from optkern import _lowbits

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
okt = pytest.importorskip("optkern.torch")

BF16 = np.dtype(ml_dtypes.bfloat16)
HALVES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NP_OF = {torch.bfloat16: BF16, torch.float16: np.dtype(np.float16), torch.float32: np.float32}
SHAPES = [(7, 13), (300,), (1,)]
STEPS = 6
#: The rules compared with optkern's classes, with hyperparameters that keep state.
RULES = {
    "Adam": {"lr": 1e-2, "weight_decay": 0.1},
    "AdamW": {"lr": 1e-2},
    "SGD": {"lr": 1e-2, "momentum": 0.9, "nesterov": True},
    "Lion": {"lr": 1e-3},
    "RMSprop": {"lr": 1e-3, "centered": True, "momentum": 0.5},
    "Adagrad": {"lr": 1e-2},
    "NAdam": {"lr": 1e-2},
    "Adadelta": {"lr": 1.0},
}
PRECISION = [
    {},
    {"state_dtype": "bfloat16"},
    {"state_dtype": "int8"},
    {"master_weights": True},
    {"stochastic_rounding": True},
    {"state_dtype": "int8", "stochastic_rounding": True},
    {"state_dtype": "bfloat16", "master_weights": True},
]


def np_view(t):
    """A NumPy view of tensor t's memory (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def tbits(t):
    return bits(np.ascontiguousarray(np_view(t)))


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def make_grads(dtype, step, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(1000 * seed + step + 1)
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in SHAPES]


def takes(name, options):
    try:
        _lowbits.check_precision(
            getattr(ok, name)._rule,
            options.get("state_dtype", "float32"),
            options.get("stochastic_rounding", False),
            options.get("master_weights", False),
        )
    except ValueError:
        return False
    return True


def twins(name, hp, options, dtype, grad_dtype=None):
    """An optkern.torch optimizer and an optkern one over copies of the same parameters, in two
    groups (stochastic rounding keys its noise by each parameter's index in the optimizer)."""
    ts = [torch.nn.Parameter(p) for p in make_params(dtype)]
    ns = [np_view(p).copy() for p in ts]
    o = getattr(okt, name)([{"params": ts[:2]}, {"params": ts[2:]}], **hp, **options)
    n = getattr(ok, name)([{"params": ns[:2]}, {"params": ns[2:]}], **hp, **options)
    return ts, ns, o, n


def step_both(ts, ns, o, n, t, grad_dtype, skip=None):
    grads = make_grads(grad_dtype, t)
    if skip is not None:
        grads[skip] = None
    for p, g in zip(ts, grads):
        p.grad = g
    o.step()
    n.step([None if g is None else np_view(g).copy() for g in grads])


def assert_same(ts, ns, o, n, where):
    for i, (p, q) in enumerate(zip(ts, ns)):
        assert tbits(p) == bits(q), (where, i)
        st, sn = o.state.get(p, {}), n.state[q] if q in n.state else {}
        arrays = {k for k, v in sn.items() if isinstance(v, np.ndarray)}
        assert arrays == {k for k, v in st.items() if k != "step" and v.dim() > 0}, (where, i)
        for k in arrays:
            assert tbits(st[k]) == bits(sn[k]), (where, i, k)
        if "step" in sn:
            assert int(st["step"]) == sn["step"], (where, i)


# -- bit for bit with optkern's own classes ---------------------------------------------------------


@pytest.mark.parametrize(
    "options", PRECISION, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
@pytest.mark.parametrize("half", list(HALVES))
@pytest.mark.parametrize("name", list(RULES))
def test_matches_optkerns_classes_bit_for_bit(name, half, options):
    if not takes(name, options):
        pytest.skip(f"{name} takes no {options}")
    dtype = HALVES[half]
    ts, ns, o, n = twins(name, RULES[name], options, dtype)
    for t in range(STEPS):
        step_both(ts, ns, o, n, t, dtype, skip=1 if t == 2 else None)
        assert_same(ts, ns, o, n, f"step {t + 1}")


@pytest.mark.parametrize("grad", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("half", list(HALVES))
def test_any_gradient_dtype_for_a_16_bit_parameter(half, grad):
    """torch refuses to assign a gradient of another dtype, but a parameter cast after its
    gradient was made (p.data = p.data.to(...)) has one: the kernels read it as it is."""
    dtype = HALVES[half]
    ts, ns, o, n = twins("Adam", RULES["Adam"], {}, dtype)
    for t in range(3):
        grads = make_grads(getattr(torch, grad), t)
        for p, g in zip(ts, grads):
            kept = p.data
            p.data = torch.empty_like(kept, dtype=g.dtype)
            p.grad = g
            p.data = kept
        o.step()
        n.step([np_view(g).copy() for g in grads])
    assert_same(ts, ns, o, n, f"{grad} gradients")


def test_default_state_is_float32_and_bfloat16_state_halves_it():
    p = torch.nn.Parameter(torch.randn(1000).to(torch.bfloat16))
    sizes = {}
    for state_dtype in ("float32", "bfloat16", "int8"):
        o = okt.Adam([p], state_dtype=state_dtype)
        p.grad = torch.ones_like(p)
        o.step()
        sizes[state_dtype] = sum(v.nbytes for k, v in o.state[p].items() if k != "step") / p.numel()
    assert sizes["float32"] == 8.0 and sizes["bfloat16"] == 4.0
    assert sizes["int8"] == 2.0 + 2 * 4 * 4 / 1000  # the codes and one float32 per 256


# -- state dicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options", PRECISION, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
@pytest.mark.parametrize("half", list(HALVES))
def test_state_dict_and_pickle_load_back_bit_for_bit(half, options):
    dtype = HALVES[half]
    ts, ns, o, n = twins("Adam", RULES["Adam"], options, dtype)
    for t in range(3):
        step_both(ts, ns, o, n, t, dtype)
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    if "state_dtype" in options:
        kind = {"bfloat16": torch.bfloat16, "int8": torch.uint8}[options["state_dtype"]]
        assert saved["state"][0]["exp_avg"].dtype == kind
    if options.get("state_dtype") == "int8":
        assert saved["state"][0]["exp_avg_absmax"].dtype == torch.float32
    copies = [torch.nn.Parameter(p.detach().clone()) for p in ts]
    loaded = okt.Adam([{"params": copies[:2]}, {"params": copies[2:]}], **RULES["Adam"], **options)
    loaded.load_state_dict(saved)
    pickled = pickle.loads(pickle.dumps(o))
    for t in range(3, 6):
        step_both(ts, ns, o, n, t, dtype)
        for other in (loaded, pickled):
            ps = [p for g in other.param_groups for p in g["params"]]
            for p, g in zip(ps, make_grads(dtype, t)):
                p.grad = g
            other.step()
    assert_same(ts, ns, o, n, "stepped on")
    for other in (loaded, pickled):
        ps = [p for g in other.param_groups for p in g["params"]]
        assert_same(ps, ns, other, n, "loaded back")


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("half", list(HALVES))
def test_loads_torchs_16_bit_state_converting_it(half, state_dtype):
    """torch's Adam on 16-bit parameters keeps 16-bit state; loaded into optkern.torch it is
    converted to the optimizer's form at the next step, as optkern's classes convert a loaded
    dict: widened exactly into float32, rounded to nearest into bfloat16, quantised into int8
    (the same codes and absmax optkern's classes make of the same values)."""
    dtype = HALVES[half]
    theirs = [torch.nn.Parameter(p) for p in make_params(dtype)]
    ref = torch.optim.Adam(theirs, lr=1e-2, foreach=False)
    for t in range(3):
        for p, g in zip(theirs, make_grads(dtype, t)):
            p.grad = g
        ref.step()
    sd = copy.deepcopy(ref.state_dict())
    mine = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    o = okt.Adam(mine, lr=1e-2, state_dtype=state_dtype)
    o.load_state_dict(sd)
    # the NumPy class given the same values, as its load converts them
    ns = [np_view(p).copy() for p in mine]
    n = ok.Adam(ns, lr=1e-2, state_dtype=state_dtype)
    n.load_state_dict(
        {
            "state": {
                i: {k: (np_view(v).copy() if k != "step" else int(v)) for k, v in s.items()}
                for i, s in sd["state"].items()
            },
            "param_groups": [
                {k: v for k, v in g.items() if k in ("lr", "params")} for g in sd["param_groups"]
            ],
        }
    )
    for t in range(3, 5):
        step_both(mine, ns, o, n, t, dtype)
    assert_same(mine, ns, o, n, "torch's state loaded")
    st = o.state[mine[0]]
    assert (
        st["exp_avg"].dtype
        == {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.uint8}[state_dtype]
    )


def test_bfloat16_state_moves_to_torch_as_its_own():
    """optkern.torch with state_dtype='bfloat16' on bfloat16 parameters keeps torch's layout:
    torch.optim.Adam loads its state dict and steps on."""
    mine = [torch.nn.Parameter(p) for p in make_params(torch.bfloat16)]
    o = okt.Adam(mine, lr=1e-2, state_dtype="bfloat16")
    for t in range(3):
        for p, g in zip(mine, make_grads(torch.bfloat16, t)):
            p.grad = g
        o.step()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    ref = torch.optim.Adam(theirs, lr=1e-2)
    ref.load_state_dict(copy.deepcopy(o.state_dict()))
    for p, q in zip(mine, theirs):
        for k, v in o.state[p].items():
            assert ref.state[q][k].dtype == v.dtype and torch.equal(ref.state[q][k], v)
    for p, g in zip(theirs, make_grads(torch.bfloat16, 3)):
        p.grad = g
    ref.step()


def test_int8_state_dict_loads_into_float_state_dequantised():
    mine = [torch.nn.Parameter(p) for p in make_params(torch.float32)]
    o = okt.Adam(mine, lr=1e-2, state_dtype="int8")
    for t in range(2):
        for p, g in zip(mine, make_grads(torch.float32, t)):
            p.grad = g
        o.step()
    sd = o.state_dict()
    other = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    f = okt.Adam(other, lr=1e-2)
    f.load_state_dict(sd)
    for p, g in zip(other, make_grads(torch.float32, 2)):
        p.grad = g
    f.step()  # the conversion happens here, before the update
    s = sd["state"][0]
    values = _lowbits.dequantize(s["exp_avg"].numpy(), s["exp_avg_absmax"].numpy(), False)
    assert "exp_avg_absmax" not in f.state[other[0]]
    expected = 0.9 * values + 0.1 * make_grads(torch.float32, 2)[0].numpy()
    np.testing.assert_allclose(f.state[other[0]]["exp_avg"].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_a_bad_loaded_absmax_is_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.zeros(1000))
    o = okt.Adam([p], state_dtype="int8")
    p.grad = torch.ones(1000)
    o.step()
    sd = copy.deepcopy(o.state_dict())
    sd["state"][0]["exp_avg_absmax"] = torch.ones(3)
    o.load_state_dict(sd)
    before = (p.detach().clone(), {k: v.clone() for k, v in o.state[p].items()})
    with pytest.raises(
        ValueError,
        match=r"'exp_avg_absmax' must be a float32 CPU tensor of one absmax per block of 256 \(4 for 1000",
    ):
        o.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(o.state[p][k], v) for k, v in before[1].items())


# -- errors and what torch's step still runs ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"state_dtype": "int4"}, ValueError, "state_dtype must be one of"),
        ({"stochastic_rounding": True, "master_weights": True}, ValueError, "exclude each other"),
        ({"master_weights": "yes"}, TypeError, "must be bools"),
    ],
)
def test_bad_precision_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        okt.Adam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_int8_refused_where_eight_bits_cannot_hold_the_state():
    with pytest.raises(ValueError, match="ASGD's ax cannot be kept in 8 bits"):
        okt.ASGD([torch.nn.Parameter(torch.zeros(2))], state_dtype="int8")


def test_float64_parameters_take_no_state_dtype():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64, whose state is float64"):
        okt.Adam([p], state_dtype="bfloat16")
    o = okt.Adam([torch.nn.Parameter(torch.zeros(3))], state_dtype="bfloat16")
    with pytest.raises(TypeError, match="float64, whose state is float64"):
        o.add_param_group({"params": [p]})
    assert len(o.param_groups) == 1


def test_a_group_torchs_step_would_run_is_refused_under_a_precision_option():
    """torch's own implementation keeps no int8 state, master copies or stochastic rounding:
    a group the kernels cannot serve (differentiable=True here) is refused with the reason,
    nothing changed, instead of silently running without the option."""
    p = torch.nn.Parameter(torch.ones(4).to(torch.bfloat16))
    o = okt.Adam([p], differentiable=True, state_dtype="int8")
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="differentiable=True.*has no state_dtype='int8'"):
        o.step()
    assert not o.state and torch.equal(p.detach(), torch.ones(4).to(torch.bfloat16))
    # a complex parameter: refused under int8 state, torch's step without a precision option
    q = torch.nn.Parameter(torch.ones(4, dtype=torch.complex64))
    q.grad = torch.ones_like(q)
    with pytest.raises(TypeError, match="complex64.*has no state_dtype='int8'"):
        okt.Adam([q], state_dtype="int8").step()
    r = okt.Adam([q])
    with pytest.warns(okt.TorchFallbackWarning, match="complex64"):
        r.step()
    assert r.state[q]["exp_avg"].dtype == torch.complex64  # torch's own state


def test_factored_and_schedule_free_rules_keep_16_bit_parameters_off_the_kernels():
    p = torch.nn.Parameter(torch.ones(4, 4).to(torch.bfloat16))
    o = okt.Adafactor([p])
    p.grad = torch.ones_like(p)
    with pytest.warns(okt.TorchFallbackWarning, match="dtype torch.bfloat16"):
        o.step()
    sf = okt.ScheduleFreeAdamW([torch.nn.Parameter(torch.ones(4).to(torch.float16))])
    sf.param_groups[0]["params"][0].grad = torch.ones(4).to(torch.float16)
    with pytest.raises(TypeError, match="dtype torch.float16"):
        sf.step()


# -- against torch.optim: within 16-bit rounding --------------------------------------------------

C = 16  # rounded intermediates of torch's longest 16-bit chain (see the module's docstring)
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _optim_db_cases():
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as e:  # expecttest, a test-only dependency of torch's suite
        reason = f"could not import torch's optim_db: {e}"
        return [pytest.param(None, None, None, None, marks=pytest.mark.skip(reason=reason))]
    names = {e.name for e in db.with_oracle("torch") if e.oracle("torch").optim_db}
    cases = []
    for info in optim_db:
        if info.name not in names:
            continue
        impls = ["single_tensor"]
        if "fused" in info.supported_impls and "cpu" in info.supports_fused_on:
            impls.append("fused")
        for half, dtype in HALVES.items():
            if dtype not in okt.RULES[info.name].dtypes:
                continue  # factored and Schedule-Free rules run torch's step on them
            for inp in info.optim_inputs_func(device="cpu", dtype=dtype):
                kw = dict(inp.kwargs)
                if kw.get("differentiable") or kw.get("capturable"):
                    continue  # torch's own step runs these (tests/test_torch_adapter.py)
                kw.pop("foreach", None)
                kw.pop("fused", None)
                for impl in impls:
                    cases.append(
                        pytest.param(
                            info.name, kw, dtype, impl, id=f"{info.name}-{half}-{impl}-{inp.desc}"
                        )
                    )
    return cases


def _assert_within(ours, theirs, before, dtype, skip, where, normwise=False):
    """|ours - theirs| <= ulp + C u |ours - before| where both are finite (a state tensor:
    + C u max|ours|, as a state's intermediates are rounded relative to their own size, which
    cancellation can make larger than the result's: the gradient plus weight decay, say), and
    the same non-finite values elsewhere; elements in ``skip`` (see _float16_underflow) aside."""
    a, b, b0 = (x.detach().double() for x in (ours, theirs, before))
    keep = (
        ~skip if skip is not None and skip.shape == a.shape else torch.ones_like(a, dtype=torch.bool)
    )
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert ((fa == fb) | ~keep).all(), (where, "finite in one only")
    odd = ~fa & ~fb & keep
    assert torch.equal(a[odd].nan_to_num(), b[odd].nan_to_num()), (where, "non-finite values")
    both = fa & fb & keep
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).smallest_normal * eps
    bound = eps * torch.maximum(a.abs(), b.abs()) + tiny + C * UNIT[dtype] * (a - b0).abs()
    if normwise and both.any():
        bound = bound + C * UNIT[dtype] * a[both].abs().max()
    excess = ((a - b).abs() - bound)[both]
    assert (excess <= 0).all(), (where, float(excess.max()))


def _float16_underflow(state, shape):
    """The elements where torch's float16 state fell below float16's normal range (2**-14,
    about 6.1e-5: a second moment of gradients of 0.1 is 1e-5 to 1e-4): float16 keeps fewer
    bits there, down to none (and its eps of 1e-8 or 1e-10 is 0), so torch's update from it is
    off by more than rounding, up to Inf or NaN. optkern computes these from float32."""
    skip = torch.zeros(shape, dtype=torch.bool)
    for k, v in state.items():
        if k in SECOND_MOMENTS and v.dtype is torch.float16 and tuple(v.shape) == shape:
            skip |= v.abs() < 2.0**-14
    return skip


#: The states the rules divide by (or take the square root of).
SECOND_MOMENTS = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf"}


#: torch 2.13's fused SGD on the CPU leaves the vectorised part of a float16 or bfloat16
#: parameter unchanged (only the tail past the last multiple of 32 elements moves; float32 is
#: right): test_torchs_fused_sgd_moves_16_bit_parameters says so, and fails once torch is fixed.
BROKEN_FUSED = {"SGD"}


def test_torchs_fused_sgd_moves_16_bit_parameters():
    moved = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        p = torch.nn.Parameter(torch.ones(300, dtype=dtype))
        opt = torch.optim.SGD([p], lr=0.1, fused=True)
        p.grad = torch.ones_like(p)
        opt.step()
        moved[dtype] = int((p.detach() != 1).sum())
    assert moved == {torch.float32: 300, torch.bfloat16: 12, torch.float16: 12}


@pytest.mark.parametrize("name, kwargs, dtype, impl", _optim_db_cases())
def test_within_16_bit_rounding_of_torch_one_step_at_a_time(name, kwargs, dtype, impl):
    if impl == "fused" and name in BROKEN_FUSED:
        pytest.skip(f"torch's fused {name} leaves 16-bit CPU parameters unchanged (see above)")
    if name == "Adadelta" and dtype is torch.float16:
        pytest.skip(
            "Adadelta's eps (1e-6) is a float16 subnormal, held as 1.013e-6: from acc_delta = 0 "
            "torch's float16 steps move by sqrt(eps), off by more than rounding"
        )
    theirs = [torch.nn.Parameter(p) for p in make_params(dtype)]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    flag = {"fused": True} if impl == "fused" else {"foreach": False}
    ref = getattr(torch.optim, name)(theirs, **kwargs, **flag)
    # bfloat16 state where torch keeps it (the same values to start from); torch's float16
    # state widens into float32 exactly
    o = getattr(okt, name)(
        mine, **kwargs, state_dtype="bfloat16" if dtype is torch.bfloat16 else "float32"
    )
    for t in range(4):
        with torch.no_grad():
            for p, q in zip(mine, theirs):
                p.copy_(q)
        o.load_state_dict(copy.deepcopy(ref.state_dict()))
        before = [p.detach().clone() for p in theirs]
        states = {
            i: {k: v.clone() for k, v in ref.state[q].items() if isinstance(v, torch.Tensor)}
            for i, q in enumerate(theirs)
        }
        # gradients of about 1 in float16: squared, they stay in its normal range (above)
        scale = 1.0 if dtype is torch.float16 else 0.1
        for p, q, g in zip(mine, theirs, make_grads(dtype, t, scale=scale)):
            p.grad, q.grad = g.clone(), g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error", okt.TorchFallbackWarning)  # on the kernels
            o.step()
        ref.step()
        for i, (p, q) in enumerate(zip(mine, theirs)):
            where = f"step {t + 1}, param {i}"
            skip = None
            if dtype is torch.float16:
                skip = _float16_underflow(ref.state[q], tuple(q.shape))
                assert skip.float().mean() < 0.5, where  # most elements are compared
            _assert_within(p, q, before[i], dtype, skip, where)
            for k, v in ref.state[q].items():
                if not isinstance(v, torch.Tensor):
                    continue
                ours = o.state[p][k]
                if k == "step":
                    assert float(ours) == float(v), where
                    continue
                old = states[i].get(k, torch.zeros_like(v))
                unit = v.dtype if v.dtype in UNIT else dtype
                _assert_within(
                    ours, v, old.to(ours.dtype), unit, skip, f"{where}, {k}", normwise=True
                )


@pytest.mark.spawns
def test_without_ml_dtypes_bfloat16_runs_torchs_step_and_says_why():
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['ml_dtypes'] = None\n"
        "import torch, optkern.torch as okt\n"
        "p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))\n"
        "h = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))\n"
        "o = okt.Adam([p, h])\n"
        "p.grad, h.grad = torch.ones_like(p), torch.ones_like(h)\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    o.step()\n"
        "print([str(w.message) for w in seen if w.category is okt.TorchFallbackWarning])\n"
        "print(o.state[p]['exp_avg'].dtype, o.state[h]['exp_avg'].dtype)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "with ml_dtypes installed" in out and "'torch.bfloat16'" not in out
    # the group runs torch's step (its state in the parameters' dtypes)
    assert out.splitlines()[-1] == "torch.bfloat16 torch.float16"


def test_stochastic_rounding_keeps_its_step_count_in_the_state_dict():
    p = torch.nn.Parameter(torch.ones(40, dtype=torch.bfloat16))
    o = okt.SGD([p], lr=0.01, momentum=0.9, stochastic_rounding=True)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        o.step()
    sd = o.state_dict()
    assert sd["step_count"] == 3
    # torch ignores the entry
    q = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.SGD([q], lr=0.01, momentum=0.9)
    ref.load_state_dict(copy.deepcopy(sd))
    bad = copy.deepcopy(sd)
    bad["step_count"] = -1
    bad["state"][0]["momentum_buffer"] = torch.zeros(40)
    before = o.state[p]["momentum_buffer"].clone()
    with pytest.raises(ValueError, match="step_count must be an int >= 0"):
        o.load_state_dict(bad)
    assert torch.equal(o.state[p]["momentum_buffer"], before) and o.state_dict()["step_count"] == 3
