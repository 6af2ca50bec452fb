"""16-bit and 8-bit storage: float16 and bfloat16 parameters and gradients, state_dtype
"bfloat16" and "int8", stochastic rounding and master weights.

The 16-bit and int8 combinations run each rule's float32 loop on float32 copies of one block at
a time, then round (or requantise) what it wrote. So each is checked bit for bit against a
float32 optimizer whose arrays are rounded the same way in NumPy after every step (a "shadow"),
on every ISA, for every rule and option set of optim_db.CASES; and against the float64
reference, step by step, to within one unit in the last place of the 16-bit type."""

import pickle

import numpy as np
import pytest
from helpers import bits
from optim_db import CASES, case_id
from reference import Reference

import optkern as ok
from optkern import _lowbits

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALVES = {"bfloat16": BF16, "float16": F16}
ISAS = ok.available_isas()
STEPS = 8


def array_states(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, np.ndarray)}


def f32(a):
    return np.asarray(a).astype(np.float32)


def next_up(a, dt):
    """The next value of 16-bit type dt above each (positive, finite) value of a."""
    a = np.asarray(a).astype(dt)
    return (a.view(np.uint16) + np.uint16(1)).view(dt)


# -- conversions of every ISA build ---------------------------------------------------------------


def special_floats():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array(
        [
            0.0,
            -0.0,
            1.0,
            65504.0,
            65519.99,
            65520.0,
            6.1035156e-05,
            5.9604645e-08,
            2.9802322e-08,
            2.9802326e-08,
            1e-40,
            -1e-45,
            3.4028235e38,
            np.inf,
            -np.inf,
            np.nan,
        ],
        np.float32,
    )
    # halfway cases of bfloat16 (low 16 bits 0x8000) and of float16 (low 13 bits 0x1000)
    halfway = (u & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    halfway16 = (u & np.uint32(0xFFFFE000)) | np.uint32(0x1000)
    return np.concatenate(
        [u.view(np.float32), edges, halfway.view(np.float32), halfway16.view(np.float32)]
    )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("half", HALVES)
def test_round_to_nearest_even_and_widen_match_numpy(half, isa):
    x = special_floats()
    out = np.empty(x.shape, HALVES[half])
    ok._core._testing.round_to(x, out, isa=isa)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(HALVES[half])
    nan = np.isnan(x)
    assert np.array_equal(out[~nan].view(np.uint16), want[~nan].view(np.uint16))
    assert np.isnan(f32(out[nan])).all()
    back = np.empty(x.shape, np.float32)
    ok._core._testing.widen_from(out, back, isa=isa)
    assert np.array_equal(back[~nan].view(np.uint32), f32(out[~nan]).view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("half", HALVES)
def test_stochastic_rounding_picks_a_neighbour_without_bias(half, isa):
    dt = HALVES[half]
    x = np.full(20_000, 1.0 + 2.0**-10, np.float32)  # 1/8 of a bfloat16 step above 1.0
    if dt == F16:
        x[:] = 1.0 + 2.0**-13  # 1/8 of a float16 step above 1.0
    out = np.empty(x.shape, dt)
    ok._core._testing.round_to(x, out, key=12345, first=7, isa=isa)
    values = f32(out)
    lo = f32(x.astype(dt))
    assert set(np.unique(values)) == {lo[0], f32(next_up(lo[:1], dt))[0]}
    assert abs(values.mean() - x[0]) < 4 * (values.std() / np.sqrt(x.size))
    # reproducible; another key, another draw; every ISA draws the same
    again = np.empty(x.shape, dt)
    ok._core._testing.round_to(x, again, key=12345, first=7, isa=isa)
    assert bits(again) == bits(out)
    ok._core._testing.round_to(x, again, key=12346, first=7, isa=isa)
    assert bits(again) != bits(out)
    scalar = np.empty(x.shape, dt)
    ok._core._testing.round_to(x, scalar, key=12345, first=7, isa="scalar")
    assert bits(scalar) == bits(out)


# -- 16-bit parameters and gradients --------------------------------------------------------------


def shadow_step(shadow, ps32, grads, halves, state_dtype):
    """One float32 step, then every array rounded as the 16-bit / int8 optimizer stores it."""
    shadow.step(grads)
    for p32, dt in zip(ps32, halves):
        if dt is not None:
            p32[...] = f32(p32.astype(dt))
    for p32 in ps32:
        if p32 not in shadow.state:
            continue
        for name, v in array_states(shadow, p32).items():
            if state_dtype == "bfloat16":
                v[...] = f32(v.astype(BF16))
            elif state_dtype == "int8":
                nonneg = shadow._rule.state(name).nonnegative
                v[...] = _lowbits.dequantize(*_lowbits.quantize(v, nonneg), nonneg)


def stored_values(opt, p, state_dtype):
    out = {}
    if p not in opt.state:
        return out
    for name, v in array_states(opt, p).items():
        if name.endswith("_absmax"):
            continue
        if state_dtype == "int8":
            nonneg = opt._rule.state(name).nonnegative
            out[name] = _lowbits.dequantize(v, opt.state[p][name + "_absmax"], nonneg)
        else:
            out[name] = f32(v)
    return out


def rounded(x, name, shadow, state_dtype):
    if state_dtype == "bfloat16":
        return f32(x.astype(BF16))
    if state_dtype == "int8":
        nonneg = shadow._rule.state(name).nonnegative
        return _lowbits.dequantize(*_lowbits.quantize(x, nonneg), nonneg)
    return x


def start_states(opt, shadow, ps, ps32, state_dtype):
    """Both optimizers' state at its start values (Rprop's step sizes start at lr), the
    shadow's rounded as the low-bit optimizer stores them."""
    spec = opt._state_spec(opt.param_groups[0])
    if not spec:
        return
    groups = opt.state_dict()["param_groups"]
    arrays = shadow._array_state_names
    low, high = {}, {}
    for i, (p, p32) in enumerate(zip(ps, ps32)):
        low[i] = {"step": 0}
        high[i] = {"step": 0}
        for name, start in spec.items():
            if name in arrays:
                full = np.full(p.shape, start, np.float32)
                low[i][name] = full
                high[i][name] = rounded(full, name, shadow, state_dtype)
            else:
                low[i][name] = high[i][name] = start
    opt.load_state_dict({"state": low, "param_groups": groups})
    shadow.load_state_dict({"state": high, "param_groups": groups})


def int8_ok(name):
    return (
        all(s.int8 for s in getattr(ok, name)._rule.states) and not getattr(ok, name)._rule.factored
    )


def run_against_shadow(name, hp, param_dt, grad_dt, state_dtype, isa, steps=STEPS, threads=None):
    rng = np.random.default_rng(11)
    shapes = [(1023,), (37, 23), (5,)]
    p0 = [rng.standard_normal(s).astype(np.float32) * 0.5 for s in shapes]
    ps = [a.astype(param_dt) for a in p0]
    ps32 = [f32(a) for a in ps]
    opt = getattr(ok, name)(ps, state_dtype=state_dtype, **hp)
    shadow = getattr(ok, name)(ps32, **hp)
    opt._isa = shadow._isa = isa
    start_states(opt, shadow, ps, ps32, state_dtype)
    half = None if np.dtype(param_dt) == np.float32 else np.dtype(param_dt)
    # A rule with a reduction pass (LAMB) computes its norms from the moments before they are
    # rounded and its update from the rounded ones: close to the shadow, not bit for bit.
    exact = state_dtype == "float32" or not opt._rule.reduction
    for _ in range(steps):
        gs = [(rng.standard_normal(s) * 0.1).astype(grad_dt) for s in shapes]
        opt.step(gs)
        shadow_step(
            shadow,
            ps32,
            [f32(g) if grad_dt != np.float64 else g for g in gs],
            [half] * len(ps),
            state_dtype,
        )
        for p, p32 in zip(ps, ps32):
            assert p.dtype == np.dtype(param_dt)
            got = stored_values(opt, p, state_dtype)
            want = (
                {k: f32(v) for k, v in array_states(shadow, p32).items()}
                if p32 in shadow.state
                else {}
            )
            assert got.keys() == want.keys()
            if exact:
                assert bits(f32(p)) == bits(p32)
                for k in want:
                    assert bits(got[k]) == bits(want[k]), k
            else:
                np.testing.assert_allclose(f32(p), p32, rtol=0, atol=3e-3)  # about lr
                for k in want:
                    np.testing.assert_allclose(got[k], want[k], rtol=0.02, atol=1e-5, err_msg=k)
                p[...] = p32  # both go on from the same values
                for k, v in array_states(shadow, p32).items():
                    v[...] = got[k]
    return opt, ps


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "Adafactor"], ids=case_id)
def test_half_params_match_float32_rounded_each_step(case, half, isa):
    name, hp = case
    run_against_shadow(name, hp, HALVES[half], np.float32, "float32", isa)


@pytest.mark.parametrize("grad", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("param", ["float32", "bfloat16", "float16"])
def test_any_gradient_type_for_any_parameter_type(param, grad):
    dt = {"float32": np.float32, "bfloat16": BF16, "float16": F16, "float64": np.float64}
    run_against_shadow(
        "Adam", {"lr": 1e-2, "weight_decay": 0.1}, dt[param], dt[grad], "float32", ISAS[-1]
    )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("name", ["Adam", "SGD", "Lion", "RMSprop", "Adagrad", "LAMB"])
def test_half_params_match_the_float64_reference(name, half, isa):
    """Each step of a 16-bit parameter lands within one unit in the last place (of its type)
    of the float64 reference's step from the same parameter and state."""
    hp = {"SGD": {"lr": 0.05, "momentum": 0.9}, "Lion": {"lr": 1e-3}}.get(name, {"lr": 1e-2})
    dt = HALVES[half]
    rng = np.random.default_rng(5)
    p = (rng.standard_normal(1000) * 0.5).astype(dt)
    opt = getattr(ok, name)([p], **hp)
    opt._isa = isa
    ref = Reference(name, f32(p).astype(np.float64), dtype=np.float64, **hp)
    for _ in range(20):
        g = (rng.standard_normal(1000) * 0.1).astype(np.float32)
        opt.step([g])
        ref.step(g.astype(np.float64))
        want = ref.p.astype(dt)
        ulp = np.abs(f32(next_up(np.abs(want), dt)) - np.abs(f32(want)))
        assert np.all(np.abs(f32(p) - f32(want)) <= ulp), np.max(np.abs(f32(p) - f32(want)) / ulp)
        for k, v in array_states(opt, p).items():
            np.testing.assert_allclose(v, ref.state[k], rtol=1e-5, atol=1e-7, err_msg=k)
            ref.state[k][...] = v  # both go on from the float32 state
        ref.p[...] = f32(p)


# -- state_dtype ----------------------------------------------------------------------------------


STATEFUL = [c for c in CASES if getattr(ok, c[0])._rule.states and c[0] != "Adafactor"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", STATEFUL, ids=case_id)
def test_bfloat16_state_matches_float32_rounded_each_step(case, isa):
    run_against_shadow(*case, np.float32, np.float32, "bfloat16", isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", [c for c in STATEFUL if int8_ok(c[0])], ids=case_id)
def test_int8_state_matches_float32_requantised_each_step(case, isa):
    run_against_shadow(*case, np.float32, np.float32, "int8", isa)


@pytest.mark.parametrize("param", ["bfloat16", "float16"])
def test_int8_state_with_half_params(param):
    run_against_shadow(
        "AdamW", {"lr": 1e-2, "weight_decay": 0.1}, HALVES[param], HALVES[param], "int8", ISAS[-1]
    )


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_state_bytes_per_parameter(state_dtype):
    p = np.zeros(1 << 16, np.float32)
    opt = ok.Adam([p], state_dtype=state_dtype)
    opt.step([np.ones_like(p)])
    per = sum(v.nbytes for v in array_states(opt, p).values()) / p.size
    assert per == {"bfloat16": 4.0, "int8": 2.0 + 2 * 4 / 256}[state_dtype]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_low_bit_state_is_the_same_for_any_thread_count(state_dtype, threads):
    def run(n):
        ok.set_num_threads(n)
        ok._core._testing.set_min_elements_per_thread(300)
        try:
            rng = np.random.default_rng(2)
            ps = [rng.standard_normal(s).astype(BF16) for s in (5000, 777, 300)]
            opt = ok.Adam(ps, lr=1e-2, state_dtype=state_dtype, stochastic_rounding=True)
            for _ in range(4):
                opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in ps])
            return [bits(p) for p in ps] + [
                bits(v) for p in ps for v in array_states(opt, p).values()
            ]
        finally:
            ok._core._testing.set_min_elements_per_thread(default)

    default = ok._core._testing.min_elements_per_thread()
    before = ok.get_num_threads()
    try:
        assert run(1) == run(threads)
    finally:
        ok.set_num_threads(before)


def test_state_dict_keeps_codes_and_loads_convert():
    rng = np.random.default_rng(4)
    p = rng.standard_normal(1000).astype(np.float32)
    q8 = ok.Adam([p], lr=1e-2, state_dtype="int8")
    for _ in range(3):
        q8.step([rng.standard_normal(1000).astype(np.float32)])
    sd = q8.state_dict()
    s = sd["state"][0]
    assert s["exp_avg"].dtype == np.uint8 and s["exp_avg_absmax"].shape == (4,)
    values = {
        k: _lowbits.dequantize(s[k], s[k + "_absmax"], k == "exp_avg_sq")
        for k in ("exp_avg", "exp_avg_sq")
    }
    # int8 -> float32: the dequantised values
    p2 = p.copy()
    f = ok.Adam([p2], lr=1e-2)
    f.load_state_dict(sd)
    for k in values:
        assert f.state[p2][k].dtype == np.float32 and bits(f.state[p2][k]) == bits(values[k])
    assert "exp_avg_absmax" not in f.state[p2]
    # float32 -> int8: quantised again (the codes of the values; a block whose largest value
    # is negative had it at the signed map's -0.9929..., so its absmax shrinks by that)
    p3 = p.copy()
    back = ok.Adam([p3], lr=1e-2, state_dtype="int8")
    back.load_state_dict(f.state_dict())
    for k in values:
        codes, absmax = _lowbits.quantize(values[k], k == "exp_avg_sq")
        assert bits(back.state[p3][k]) == bits(codes)
        assert bits(back.state[p3][k + "_absmax"]) == bits(absmax)
        np.testing.assert_allclose(absmax, s[k + "_absmax"], rtol=0.0071)
    # int8 -> int8 and then the same steps: the same bytes
    p4 = p.copy()
    same = ok.Adam([p4], lr=1e-2, state_dtype="int8")
    same.load_state_dict(sd)
    g = rng.standard_normal(1000).astype(np.float32)
    q8.step([g])
    same.step([g])
    assert bits(p4) == bits(p)
    for k, v in array_states(q8, p).items():
        assert bits(same.state[p4][k]) == bits(v)
    # bfloat16 state from a float32 dict
    p5 = p.copy()
    b = ok.Adam([p5], lr=1e-2, state_dtype="bfloat16")
    b.load_state_dict(f.state_dict())
    assert b.state[p5]["exp_avg"].dtype == BF16
    assert bits(b.state[p5]["exp_avg"]) == bits(values["exp_avg"].astype(BF16))


def test_pickling_keeps_low_bit_state():
    p = np.linspace(-1, 1, 700).astype(BF16)
    opt = ok.Adam([p], lr=1e-2, state_dtype="int8", master_weights=True)
    opt.step([np.ones(700, np.float32)])
    twin = pickle.loads(pickle.dumps(opt))
    (q,) = twin.param_groups[0]["params"]
    g = np.linspace(0, 1, 700).astype(np.float32)
    opt.step([g])
    twin.step([g])
    assert bits(q) == bits(p)
    for k, v in array_states(opt, p).items():
        assert bits(twin.state[q][k]) == bits(v)


def test_bad_loaded_absmax_is_refused():
    p = np.zeros(1000, np.float32)
    opt = ok.Adam([p], state_dtype="int8")
    opt.step([np.ones_like(p)])
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_absmax"] = np.ones(3, np.float32)
    before = bits(opt.state[p]["exp_avg"])
    with pytest.raises(ValueError, match="absmax per block of 256"):
        opt.load_state_dict(sd)
    assert bits(opt.state[p]["exp_avg"]) == before


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"state_dtype": "int4"}, ValueError, "state_dtype must be one of"),
        ({"state_dtype": 8}, ValueError, "state_dtype must be one of"),
        ({"stochastic_rounding": True, "master_weights": True}, ValueError, "exclude each other"),
        ({"master_weights": "yes"}, TypeError, "must be bools"),
    ],
)
def test_bad_precision_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ok.Adam([np.zeros(3, np.float32)], **kwargs)


def test_int8_refused_where_eight_bits_cannot_hold_the_state():
    with pytest.raises(ValueError, match="ASGD's ax cannot be kept in 8 bits"):
        ok.ASGD([np.zeros(3, np.float32)], state_dtype="int8")
    with pytest.raises(ValueError, match="LAMB's exp_avg, exp_avg_sq cannot be kept in 8 bits"):
        ok.LAMB([np.zeros(3, np.float32)], state_dtype="int8")
    # the core refuses it too (optkern.functional, hand-made state lists)
    p = np.zeros(3, np.float32)
    codes, absmax = [np.zeros(3, np.uint8)], [np.zeros(1, np.float32)]
    with pytest.raises(TypeError, match="LAMB computes norms"):
        ok._core.step(
            "lamb",
            [p],
            [p.copy()],
            {
                "exp_avg": codes,
                "exp_avg_sq": [c.copy() for c in codes],
                "exp_avg_absmax": absmax,
                "exp_avg_sq_absmax": [a.copy() for a in absmax],
            },
            {},
            steps=[1],
        )
    with pytest.raises(ValueError, match="factored"):
        ok.Adafactor([np.zeros((3, 3), np.float32)], state_dtype="bfloat16")
    with pytest.raises(TypeError, match=r"params\[0\] is bfloat16: Adafactor keeps its factored"):
        ok.Adafactor([np.zeros((3, 3), BF16)])
    with pytest.raises(TypeError, match=r"params\[1\] is float64"):
        ok.Adam([np.zeros(3, np.float32), np.zeros(3)], state_dtype="int8")


# -- stochastic rounding and master weights -------------------------------------------------------


def test_stochastic_rounding_moves_where_round_to_nearest_stalls():
    """SGD steps of 1e-3 on bfloat16 weights near 1 (a bfloat16 step there is 2**-7): rounded
    to nearest, every update is lost; rounded stochastically, the mean follows float32."""
    n, steps, lr = 4096, 200, 1e-3
    want = 1.0 - steps * lr
    runs = {}
    for sr in (False, True):
        p = np.ones(n, BF16)
        opt = ok.SGD([p], lr=lr, stochastic_rounding=sr)
        for _ in range(steps):
            opt.step([np.ones(n, np.float32)])
        runs[sr] = f32(p)
    assert np.all(runs[False] == 1.0)
    assert abs(runs[True].mean() - want) < 0.002


def test_stochastic_rounding_is_reproducible_and_keyed_by_step_and_parameter():
    def run():
        ps = [np.full(3000, 0.5, BF16), np.full(3000, 0.5, BF16)]
        opt = ok.SGD(ps, lr=1e-4, stochastic_rounding=True)
        out = []
        for _ in range(3):
            opt.step([np.ones(3000, np.float32)] * 2)
            out.append([bits(p) for p in ps])
        return out

    a, b = run(), run()
    assert a == b
    assert a[0][0] != a[0][1]  # the two parameters draw differently
    # another step draws again (values only move where a draw rounds down)
    assert len({x for step in a for x in step}) == 6


@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Lion", "RMSprop", "Adagrad", "LAMB"])
def test_master_weights_follow_the_float32_trajectory_bit_for_bit(name, half):
    dt = HALVES[half]
    rng = np.random.default_rng(8)
    p32 = (rng.standard_normal(2000) * 0.5).astype(np.float32)
    p16 = p32.astype(dt)
    p32[...] = f32(p16)  # both start from the same values
    hp = {"SGD": {"lr": 0.05, "momentum": 0.9}, "Lion": {"lr": 1e-3}}.get(name, {"lr": 1e-2})
    ref = getattr(ok, name)([p32], **hp)
    opt = getattr(ok, name)([p16], master_weights=True, **hp)
    for _ in range(10):
        g = (rng.standard_normal(2000) * 0.1).astype(np.float32)
        ref.step([g])
        opt.step([g])
        master = opt.state[p16]["master_param"]
        assert master.dtype == np.float32
        assert bits(master) == bits(p32)
        assert bits(p16) == bits(p32.astype(dt))


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_checkpoints_keep_the_low_bit_form(state_dtype, tmp_path):
    rng = np.random.default_rng(6)
    ps = [rng.standard_normal(s).astype(BF16) for s in ((300,), (17, 5))]
    opt = ok.AdamW(ps, lr=1e-2, state_dtype=state_dtype, master_weights=True)
    opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in ps])
    ok.save(opt, tmp_path / "c.npz")
    twins = [p.copy() for p in ps]
    twin = ok.AdamW(twins, lr=1e-2, state_dtype=state_dtype, master_weights=True)
    ok.load(twin, tmp_path / "c.npz")
    for p, q in zip(ps, twins):
        a, b = array_states(opt, p), array_states(twin, q)
        assert a.keys() == b.keys() and "master_param" in a
        for k in a:
            assert a[k].dtype == b[k].dtype and bits(a[k]) == bits(b[k]), k
    gs = [rng.standard_normal(p.shape).astype(np.float32) for p in ps]
    opt.step(gs)
    twin.step(gs)
    assert [bits(p) for p in ps] == [bits(q) for q in twins]
    # into a float32-state optimizer: converted
    plain = ok.AdamW([p.copy() for p in ps], lr=1e-2)
    ok.load(plain, tmp_path / "c.npz")
    for p in plain.param_groups[0]["params"]:
        assert {v.dtype for v in array_states(plain, p).values()} == {np.dtype(np.float32)}
        assert "master_param" not in plain.state[p]
