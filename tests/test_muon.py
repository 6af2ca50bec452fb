"""optkern.Muon against a float64 reference of torch.optim.Muon (tests/reference_algos.py), its
fused passes on every ISA against NumPy, bit-identical results for any thread count, state
dicts and bad input."""

import numpy as np
import pytest

import optkern as ok
from helpers import digest
from optkern.muon import newton_schulz
from reference_algos import MuonRef
from reference_algos import newton_schulz as newton_schulz_ref

ISAS = ok.available_isas()
SHAPES = [(7, 13), (13, 7), (64, 64), (40, 300), (1, 5)]
OPTIONS = [
    {},
    {"nesterov": False, "momentum": 0.8},
    {"adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0, "lr": 0.02},
    {"adjust_lr_fn": "original", "ns_steps": 6, "ns_coefficients": (3.4, -4.7, 2.0)},
    {"ns_steps": 0, "eps": 1e-3},
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize("ns_dtype", ["float32", "float64"])
def test_matches_float64_reference(shape, kw, ns_dtype):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(shape).astype(np.float32)
    ref = MuonRef(p0, **kw)
    p = p0.copy()
    opt = ok.Muon([p], ns_dtype=ns_dtype, **kw)
    for _ in range(30):
        g = rng.standard_normal(shape).astype(np.float32)
        opt.step([g])
        ref.step(g)
    np.testing.assert_allclose(p, ref.p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"], ref.buf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (32, 32)])
def test_newton_schulz(shape):
    G = np.random.default_rng(1).standard_normal(shape)
    want = newton_schulz_ref(G)
    np.testing.assert_allclose(newton_schulz(G, dtype=np.float64), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(newton_schulz(G.astype(np.float32)), want, rtol=1e-4, atol=1e-5)
    # the singular values land near 1 (the iteration's purpose)
    sv = np.linalg.svd(newton_schulz(G, dtype=np.float64), compute_uv=False)
    assert 0.5 < sv.min() and sv.max() < 1.3


def test_groups_and_clipping():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal((3, 8)).astype(np.float32)
    ra, rb = MuonRef(a, lr=0.01), MuonRef(b, lr=0.02, momentum=0.5)
    opt = ok.Muon([{"params": [a]}, {"params": [b], "lr": 0.02, "momentum": 0.5}], lr=0.01)
    for _ in range(5):
        ga, gb = (rng.standard_normal(x.shape).astype(np.float32) for x in (a, b))
        norm = float(np.sqrt(np.sum(ga.astype(np.float64) ** 2) + np.sum(gb.astype(np.float64) ** 2)))
        c = min(1.0, 0.5 / (norm + 1e-6))
        got = opt.step([ga, gb], max_grad_norm=0.5)
        assert got == pytest.approx(norm, rel=1e-6)
        ra.step(ga * c)
        rb.step(gb * c)
    np.testing.assert_allclose(a, ra.p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, rb.p, rtol=1e-5, atol=1e-5)
    assert opt.step_count == 5


def test_none_gradient_skips():
    a, b = np.ones((3, 3), np.float32), np.ones((2, 2), np.float32)
    opt = ok.Muon([a, b])
    opt.step([None, np.ones((2, 2), np.float32)])
    np.testing.assert_array_equal(a, 1.0)
    assert a not in opt.state and b in opt.state


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nesterov", [True, False])
def test_passes_match_numpy(isa, nesterov):
    rng = np.random.default_rng(3)
    n = 4096 * 2 + 37
    g = rng.standard_normal(n).astype(np.float32)
    buf = rng.standard_normal(n).astype(np.float32)
    out = np.empty(n, np.float32)
    b64, g64 = buf.astype(np.float64), g.astype(np.float64) * 0.5
    sumsq = ok._core.muon_momentum(
        g, buf, out, momentum=0.9, nesterov=nesterov, grad_scale=0.5, isa=isa
    )
    b64 = b64 + 0.1 * (g64 - b64)
    want = g64 + 0.9 * (b64 - g64) if nesterov else b64
    np.testing.assert_allclose(buf, b64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    assert sumsq == pytest.approx(float(np.sum(out.astype(np.float64) ** 2)), rel=1e-6)
    p = rng.standard_normal(n).astype(np.float32)
    p0 = p.astype(np.float64)
    ok._core.muon_update(p, out, decay=0.99, coeff=-0.01, isa=isa)
    np.testing.assert_allclose(p, 0.99 * p0 - 0.01 * out, rtol=1e-6, atol=1e-6)


def run_bits(threads):
    ok.set_num_threads(threads)
    ok._core._testing.set_min_elements_per_thread(64)
    rng = np.random.default_rng(4)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(100, 130), (300, 20)]]
    opt = ok.Muon(params)
    for _ in range(3):
        opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    return digest([params, opt.state_dict()["state"]])


def test_bit_identical_for_any_thread_count():
    one = run_bits(1)
    assert run_bits(2) == one
    assert run_bits(3) == one


def test_state_dict_round_trip():
    rng = np.random.default_rng(5)
    p = rng.standard_normal((8, 6)).astype(np.float32)
    opt = ok.Muon([p], lr=0.05)
    for _ in range(3):
        opt.step([rng.standard_normal(p.shape).astype(np.float32)])
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"momentum_buffer"}
    assert sd["param_groups"][0]["ns_coefficients"] == (3.4445, -4.775, 2.0315)
    assert sd["param_groups"][0]["adjust_lr_fn"] is None
    q = p.copy()
    other = ok.Muon([q], lr=0.05)
    other.load_state_dict(sd)
    for _ in range(3):
        g = rng.standard_normal(p.shape).astype(np.float32)
        opt.step([g])
        other.step([g])
    np.testing.assert_array_equal(p, q)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), (1, 1, 1, 1)])
def test_only_2d_parameters(shape):
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        ok.Muon([np.zeros(shape, np.float32)])
    opt = ok.Muon([np.zeros((2, 2), np.float32)])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        opt.add_param_group({"params": [np.zeros(shape, np.float32)]})
    assert len(opt.param_groups) == 1


def test_float64_refused_naming_the_argument():
    # Muon's fused passes are float32 only: float64 parameters or gradients are refused before
    # anything changes, the offending one named by its index over all groups.
    with pytest.raises(TypeError, match=r"params\[1\] must be a float32 array, got dtype float64"):
        ok.Muon([np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float64)])
    p = np.ones((2, 2), np.float32)
    opt = ok.Muon([p])
    with pytest.raises(TypeError, match=r"params\[1\] must be a float32"):
        opt.add_param_group({"params": [np.zeros((2, 2), np.float64)]})
    assert len(opt.param_groups) == 1
    q = np.ones((3, 2), np.float32)
    opt.add_param_group({"params": [q]})
    with pytest.raises(TypeError, match=r"grads\[1\] must be a float32 array, got dtype float64"):
        opt.step([np.ones((2, 2), np.float32), np.ones((3, 2), np.float64)])
    assert np.all(p == 1) and np.all(q == 1) and not opt.state


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"adjust_lr_fn": "arbitrary"}, ValueError, "arbitrary is not supported"),
        ({"ns_steps": 100}, ValueError, "less than 100"),
        ({"ns_steps": 2.0}, TypeError, "ns_steps"),
        ({"ns_coefficients": (1.0, 2.0)}, TypeError, "ns_coefficients"),
        ({"ns_coefficients": (1.0, float("inf"), 2.0)}, ValueError, "ns_coefficients"),
        ({"nesterov": "yes"}, TypeError, "nesterov"),
        ({"ns_dtype": "bfloat16"}, ValueError, "ns_dtype"),
        ({"differentiable": True}, ValueError, "differentiable"),
    ],
)
def test_bad_hyperparameters(kw, err, match):
    with pytest.raises(err, match=match):
        ok.Muon([np.zeros((2, 2), np.float32)], **kw)


def test_bad_gradients_change_nothing():
    p = np.ones((4, 3), np.float32)
    opt = ok.Muon([p])
    opt.step([np.ones((4, 3), np.float32)])
    before = digest([p, opt.state_dict()])
    for g, err in [
        (np.ones((4, 3), np.float64), TypeError),
        (np.ones((3, 4), np.float32), ValueError),
        (np.ones((4, 6), np.float32)[:, ::2], ValueError),
        ([1.0] * 12, TypeError),
    ]:
        with pytest.raises(err):
            opt.step([g])
        assert digest([p, opt.state_dict()]) == before


def test_passes_refuse_bad_arrays():
    g = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        ok._core.muon_momentum(g, g, np.empty(8, np.float32), momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="elements"):
        ok._core.muon_momentum(
            g, np.zeros(7, np.float32), np.empty(8, np.float32), momentum=0.9, nesterov=True
        )
    with pytest.raises(TypeError):
        ok._core.muon_update(np.ones(8, np.float64), g, decay=1.0, coeff=0.1)
