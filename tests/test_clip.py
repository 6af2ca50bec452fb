"""Gradient norms and clipping (torch.nn.utils semantics), clipping fused into step, the
non-finite guard, and learning rates given as callables."""

import math

import numpy as np
import pytest
from helpers import bits, digest, make
from optim_db import CASES, case_id

import optkern as ok

NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf]
SIZES = [0, 1, 4095, 4096, 4097, 100003]


def grads_of(sizes, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n) * scale).astype(np.float32) for n in sizes]


def ref_norm(arrays, p):
    x = np.concatenate([a.astype(np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)
    if math.isinf(p):
        return float(np.max(np.abs(x), initial=0.0))
    return float(np.sum(np.abs(x) ** p) ** (1.0 / p))


# -- norms -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", NORM_TYPES)
def test_norms_match_float64_reference(p):
    grads = grads_of(SIZES)
    per_array = ok.grad_norms(grads, p)
    assert per_array.dtype == np.float64 and per_array.shape == (len(SIZES),)
    for value, g in zip(per_array, grads):
        assert value == pytest.approx(ref_norm([g], p), rel=1e-12)
    assert ok.clip_grad_norm_(grads, max_norm=1e30, norm_type=p) == pytest.approx(
        ref_norm(grads, p), rel=1e-12
    )


@pytest.mark.parametrize("p", NORM_TYPES)
def test_norms_do_not_depend_on_threads(p):
    grads = grads_of([100003, 4097, 70000, 3], seed=1)
    results = []
    for threads, threshold in [(1, 1), (2, 1), (2, 5000), (2, 1 << 20)]:
        ok.set_num_threads(threads)
        ok._core._testing.set_min_elements_per_thread(threshold)
        norms = ok.grad_norms(grads, p)
        total = ok.clip_grad_norm_(grads, 1e30, p)
        results.append((bits(norms), total))
    assert all(r == results[0] for r in results)


@pytest.mark.slow
def test_norm_of_100m_elements_is_accurate():
    """Against math.fsum of the exact squares (a float32 squared is exact in double)."""
    n = 100_000_000
    rng = np.random.default_rng(3)
    x = np.empty(n, np.float32)
    chunk = 10_000_000
    for i in range(0, n, chunk):  # magnitudes over 8 decades
        m = min(chunk, n - i)
        decades = rng.integers(-4, 4, m).astype(np.float32)
        x[i : i + m] = rng.standard_normal(m, dtype=np.float32) * np.float32(10.0) ** decades
    partials = []
    for i in range(0, n, 1_000_000):
        block = x[i : i + 1_000_000].astype(np.float64)
        partials.append(math.fsum((block * block).tolist()))
    exact = math.sqrt(math.fsum(partials))
    got = ok.clip_grad_norm_([x], max_norm=1e30)
    assert abs(got - exact) <= 1e-13 * exact
    assert ok.grad_norms([x])[0] == got


# -- clip_grad_norm_ / clip_grad_value_ -------------------------------------------------------------


def test_clip_grad_norm_scales_by_torchs_coefficient():
    grads = grads_of([10, 300], seed=4)
    expected = [g.copy() for g in grads]
    total = ref_norm(grads, 2.0)
    coef = 1.0 / (total + 1e-6)
    assert ok.clip_grad_norm_(grads, max_norm=1.0) == pytest.approx(total, rel=1e-12)
    for g, e in zip(grads, expected):
        assert bits(g) == bits(e * np.float32(coef))  # one float32 multiply, as torch's mul_
    assert ref_norm(grads, 2.0) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_leaves_small_gradients_alone():
    grads = grads_of([50], seed=5, scale=1e-3)
    before = digest(grads)
    total = ok.clip_grad_norm_(grads, max_norm=1.0)
    assert total < 1.0 and digest(grads) == before


def test_single_array_is_accepted_like_a_tensor():
    g = np.full(4, 3.0, np.float32)
    assert ok.clip_grad_norm_(g, max_norm=1.0) == pytest.approx(6.0)
    np.testing.assert_allclose(g, 0.5, rtol=1e-6)


def test_nonfinite_norm_as_torch():
    g = [np.array([1.0, np.nan, 2.0], np.float32), np.ones(3, np.float32)]
    assert math.isnan(ok.clip_grad_norm_(g, 1.0))
    assert np.all(np.isnan(g[0])) and np.all(np.isnan(g[1]))  # coef = NaN
    g = [np.array([1.0, np.inf, 2.0], np.float32), np.ones(3, np.float32)]
    assert ok.clip_grad_norm_(g, 1.0) == math.inf
    np.testing.assert_array_equal(g[1], 0.0)  # coef = 0
    assert np.isnan(g[0][1]) and g[0][0] == 0.0


def test_error_if_nonfinite_raises_and_changes_nothing():
    g = [np.array([1.0, np.inf], np.float32), np.ones(5, np.float32)]
    before = digest(g)
    with pytest.raises(RuntimeError, match="non-finite"):
        ok.clip_grad_norm_(g, 1.0, error_if_nonfinite=True)
    assert digest(g) == before


def test_clip_grad_value_matches_numpy_clip():
    grads = grads_of([1000, 17], seed=6)
    grads[0][3] = np.nan
    expected = [np.clip(g, -0.5, 0.5) for g in grads]
    ok.clip_grad_value_(grads, 0.5)
    for g, e in zip(grads, expected):
        assert bits(g) == bits(e)


def test_grad_norms_spot_vanishing_and_exploding_layers():
    grads = [np.full(100, 1e-9, np.float32), np.ones(100, np.float32), np.full(100, 1e6, np.float32)]
    norms = ok.grad_norms(grads)
    np.testing.assert_allclose(norms, [1e-8, 10.0, 1e7], rtol=1e-6)


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda g: ok.clip_grad_norm_(g, -1.0), ValueError, "max_norm must be >= 0"),
        (lambda g: ok.clip_grad_norm_(g, math.nan), ValueError, "max_norm must be finite"),
        (lambda g: ok.clip_grad_norm_([], 1.0), ValueError, "grads is empty"),
        (lambda g: ok.clip_grad_norm_(g, 1.0, norm_type=0), ValueError, "norm_type must be > 0"),
        (lambda g: ok.clip_grad_norm_(g, 1.0, norm_type=-2), ValueError, "norm_type must be > 0"),
        (
            lambda g: ok.clip_grad_norm_(g, 1.0, norm_type=math.nan),
            ValueError,
            "norm_type must be > 0",
        ),
        (
            lambda g: ok.clip_grad_norm_(g, 1.0, norm_type="fro"),
            TypeError,
            "norm_type must be a number",
        ),
        (
            lambda g: ok.clip_grad_norm_(g + [np.ones(2, np.float16)], 1.0),
            TypeError,
            r"grads\[2\] must be a float32 or float64",
        ),
        (
            lambda g: ok.clip_grad_norm_(g + [g[0][::2]], 1.0),
            ValueError,
            r"grads\[2\] must be C-contiguous",
        ),
        (lambda g: ok.clip_grad_norm_(g + [g[0]], 1e-3), ValueError, "shares memory"),
        (lambda g: ok.clip_grad_norm_({1: 2}, 1.0), TypeError, "grads must be an array or a list"),
        (lambda g: ok.clip_grad_value_(g, -0.1), ValueError, "clip_value must be >= 0"),
        (lambda g: ok.clip_grad_value_(g, math.inf), ValueError, "clip_value must be finite"),
        (lambda g: ok.clip_grad_value_([], 0.1), ValueError, "grads is empty"),
        (lambda g: ok.clip_grad_value_(g + [np.ones(2, np.float16)], 0.1), TypeError, r"grads\[2\]"),
        (lambda g: ok.grad_norms(g, norm_type=0.0), ValueError, "norm_type must be > 0"),
    ],
)
def test_bad_inputs_rejected_and_nothing_changes(call, exc, pattern):
    grads = grads_of([64, 9], seed=7, scale=10.0)
    before = digest(grads)
    with pytest.raises(exc, match=pattern):
        call(grads)
    assert digest(grads) == before


def test_read_only_gradients_can_be_measured_but_not_clipped():
    g = np.ones(8, np.float32)
    g.flags.writeable = False
    assert ok.grad_norms([g])[0] == pytest.approx(math.sqrt(8))
    with pytest.raises(ValueError, match=r"grads\[0\] is read-only"):
        ok.clip_grad_norm_([g], 0.1)


# -- clipping fused into step ----------------------------------------------------------------------


def two_group_setup(name, hp, seed=8):
    rng = np.random.default_rng(seed)
    shapes = [(40, 3), (7,), (5000,)]
    p0 = [(rng.standard_normal(s) * 0.5).astype(np.float32) for s in shapes]
    return shapes, p0


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping active, and not needed
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_clipping_equals_clip_then_step(case, max_norm):
    name, hp = case
    shapes, p0 = two_group_setup(name, hp)
    a = [make(x, "unaligned") for x in p0]
    b = [x.copy() for x in p0]
    opt_a = getattr(ok, name)([{"params": a[:2]}, {"params": a[2:], "lr": 1e-4}], **hp)
    opt_b = getattr(ok, name)([{"params": b[:2]}, {"params": b[2:], "lr": 1e-4}], **hp)
    rng = np.random.default_rng(9)
    for t in range(6):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if t == 2:
            grads[1] = None
        norm_a = opt_a.step(grads, max_grad_norm=max_norm)
        present = [g.copy() for g in grads if g is not None]
        norm_b = ok.clip_grad_norm_(present, max_norm)
        it = iter(present)
        opt_b.step([None if g is None else next(it) for g in grads])
        assert norm_a == norm_b
    assert [bits(x) for x in a] == [bits(x) for x in b]
    assert digest(opt_a.state_dict()) == digest(opt_b.state_dict())


def test_fused_clipping_does_not_touch_the_gradients():
    p = np.zeros(10, np.float32)
    g = np.full(10, 5.0, np.float32)
    norm = ok.SGD([p], lr=1.0).step([g], max_grad_norm=1.0)
    assert norm == pytest.approx(math.sqrt(250))
    np.testing.assert_array_equal(g, 5.0)
    np.testing.assert_allclose(np.linalg.norm(p), 1.0, rtol=1e-5)


@pytest.mark.parametrize("p", [1.0, 3.0, math.inf])
def test_fused_clipping_other_norm_types(p):
    a, b = np.ones(100, np.float32), np.ones(100, np.float32)
    g = np.linspace(-3, 3, 100).astype(np.float32)
    ok.Adam([a], lr=0.1).step([g], max_grad_norm=0.7, norm_type=p)
    gc = g.copy()
    ok.clip_grad_norm_([gc], 0.7, norm_type=p)
    ok.Adam([b], lr=0.1).step([gc])
    assert bits(a) == bits(b)


def test_plain_step_returns_none():
    assert ok.SGD([np.zeros(2, np.float32)]).step([np.ones(2, np.float32)]) is None


def test_bad_max_grad_norm_changes_nothing():
    p = np.ones(4, np.float32)
    opt = ok.Adam([p])
    for bad, exc in [(-1.0, ValueError), (math.nan, ValueError), ("1", TypeError)]:
        with pytest.raises(exc, match="max_grad_norm"):
            opt.step([np.ones(4, np.float32)], max_grad_norm=bad)
    with pytest.raises(ValueError, match="norm_type"):
        opt.step([np.ones(4, np.float32)], max_grad_norm=1.0, norm_type=0)
    assert len(opt.state) == 0 and opt.step_count == 0
    np.testing.assert_array_equal(p, 1.0)


# -- the non-finite guard ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_skip_if_nonfinite_changes_nothing(case, bad):
    name, hp = case
    shapes, p0 = two_group_setup(name, hp)
    params = [x.copy() for x in p0]
    opt = getattr(ok, name)([{"params": params[:2]}, {"params": params[2:]}], **hp)
    rng = np.random.default_rng(10)
    opt.step([rng.standard_normal(s).astype(np.float32) for s in shapes], skip_if_nonfinite=True)
    before = digest([params, opt.state_dict()["state"]])
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads[2][4321] = bad
    norm = opt.step(grads, skip_if_nonfinite=True, max_grad_norm=1.0)
    assert not math.isfinite(norm)
    assert digest([params, opt.state_dict()["state"]]) == before
    assert opt.skipped_steps == 1 and opt.step_count == 1
    grads[2][4321] = 0.0
    assert math.isfinite(opt.step(grads, skip_if_nonfinite=True))
    assert opt.step_count == 2 and opt.skipped_steps == 1
    assert digest([params]) != digest([p0])


def test_skip_still_reports_a_wrong_gradient():
    opt = ok.Adam([np.zeros(4, np.float32)])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(5,\)"):
        opt.step([np.full(5, np.nan, np.float32)], skip_if_nonfinite=True)
    assert opt.skipped_steps == 0


def test_skip_with_large_norm_type_overflow_is_not_a_false_alarm():
    """|x|^20 overflows double for x = 1e20, though x is finite: the step must still be taken."""
    p = np.zeros(3, np.float32)
    opt = ok.SGD([p], lr=1.0)
    norm = opt.step([np.full(3, 1e20, np.float32)], skip_if_nonfinite=True, norm_type=20.0)
    assert norm == math.inf and opt.skipped_steps == 0 and opt.step_count == 1
    np.testing.assert_array_equal(p, -np.float32(1e20))


def test_skipped_steps_survive_a_state_dict_round_trip():
    p = np.zeros(3, np.float32)
    opt = ok.Adam([p])
    opt.step([np.ones(3, np.float32)])
    opt.step([np.full(3, np.nan, np.float32)], skip_if_nonfinite=True)
    other = ok.Adam([p.copy()])
    other.load_state_dict(opt.state_dict())
    assert (other.step_count, other.skipped_steps) == (1, 1)


# -- learning rates as callables -------------------------------------------------------------------


def test_callable_lr_gets_the_step_number():
    p = np.zeros(1, np.float32)
    seen = []

    def schedule(step):
        seen.append(step)
        return 1.0 / step

    opt = ok.SGD([p], lr=schedule)
    for _ in range(4):
        opt.step([np.ones(1, np.float32)])
    assert seen[-4:] == [1, 2, 3, 4]
    np.testing.assert_allclose(p, -(1 + 1 / 2 + 1 / 3 + 1 / 4), rtol=1e-6)


def test_callable_lr_per_group_and_with_skips():
    a, b = np.zeros(2, np.float32), np.zeros(2, np.float32)
    opt = ok.Adam([{"params": [a], "lr": lambda t: 0.1 * t}, {"params": [b]}], lr=0.01)
    opt.step([np.ones(2, np.float32), np.ones(2, np.float32)])
    opt.step([np.full(2, np.nan, np.float32), np.ones(2, np.float32)], skip_if_nonfinite=True)
    opt.step([np.ones(2, np.float32), np.ones(2, np.float32)])
    # Adam's first steps move by about lr each: 0.1 (step 1) + 0.2 (step 2; the skip did not count)
    np.testing.assert_allclose(a, -0.3, rtol=1e-4)
    np.testing.assert_allclose(b, -0.02, rtol=1e-4)


def test_callable_lr_result_is_checked():
    p = np.zeros(2, np.float32)
    opt = ok.SGD([p], lr=lambda t: 0.1 if t < 2 else -0.1)
    opt.step([np.ones(2, np.float32)])
    with pytest.raises(ValueError, match=r"lr\(2\) \(the group's lr schedule\) must be >= 0"):
        opt.step([np.ones(2, np.float32)])
    np.testing.assert_allclose(p, -0.1, rtol=1e-6)
    opt = ok.SGD([p], lr=lambda t: "fast")  # a schedule is called by step(), once per step
    with pytest.raises(TypeError, match=r"lr\(1\)"):
        opt.step([np.ones(2, np.float32)])


# -- parity with torch.nn.utils ---------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_clipping_matches_torch(p):
    torch = pytest.importorskip("torch")
    grads = grads_of([1000, 33, 4097], seed=11, scale=3.0)
    tgrads = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for t, g in zip(tgrads, grads):
        t.grad = torch.from_numpy(g.copy())
    expected = float(torch.nn.utils.clip_grad_norm_(tgrads, 2.5, norm_type=p))
    total = ok.clip_grad_norm_(grads, 2.5, norm_type=p)
    assert total == pytest.approx(expected, rel=1e-6)
    for g, t in zip(grads, tgrads):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6, atol=1e-7)
    grads = grads_of([1000, 33, 4097], seed=12)
    for t, g in zip(tgrads, grads):
        t.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_value_(tgrads, 0.5)
    ok.clip_grad_value_(grads, 0.5)
    for g, t in zip(grads, tgrads):
        assert bits(g) == bits(t.grad.numpy())
