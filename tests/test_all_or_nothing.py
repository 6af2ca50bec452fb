"""Multi-parameter operations either change everything or nothing: a step over several groups
(optkern.torch: every group checked before any is written; NumPy classes: the same), a
Schedule-Free ``train()``/``eval()`` (every parameter checked before any moves; a Ctrl-C during
the move lands after it), and loads (a bad group or mode anywhere refuses the whole). The
optkern.torch cases skip without torch."""

import copy
import signal
import warnings

import numpy as np
import pytest

import optkern as ok
from optkern import schedule_free

try:
    import torch

    import optkern.torch as okt
except ImportError:  # the NumPy cases still run
    torch = okt = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
# dense gradients: SparseAdam (sparse only) has its own case in tests/test_torch_algos.py
TORCH_CLASSES = sorted(n for n, r in okt.RULES.items() if not r.sparse_only) if okt else []
SF = ["ScheduleFreeAdamW", "ScheduleFreeSGD"]


# -- optkern.torch: a step over several groups ----------------------------------------------------


def _torch_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(3, 4), (4,), (2, 5)]]


def _torch_grads(ps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(*p.shape, generator=g)


def _torch_opt(name, ps):
    return getattr(okt, name)([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2)


def _torch_snapshot(opt, ps):
    state = []
    for p in ps:
        st = opt.state.get(p, {})
        state.append(
            sorted((k, v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items())
        )
    return [p.detach().clone() for p in ps], state, repr(opt.param_groups)


def _same(a, b):
    pa, sa, ga = a
    pb, sb, gb = b
    assert ga == gb
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert [k for k, _ in x] == [k for k, _ in y]
        for (_, u), (_, v) in zip(x, y):
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v


def _break_shape(ps, opt):
    ps[2].grad.data = torch.zeros(5, 2)  # torch refuses such a .grad =, not a .grad.data =


def _break_lr(ps, opt):
    opt.param_groups[1]["lr"] = -1.0


def _break_param(ps, opt):
    with torch.no_grad():
        ps[2].data = ps[2].data.to(torch.complex64)  # (float16 runs on the kernels)
    ps[2].grad = torch.zeros(2, 5, dtype=torch.complex64)


#: What the kernels refuse in group 1, the error, and whether a class with a torch counterpart
#: runs torch's own step for that group instead (a class torch lacks refuses it too).
BREAKS = {
    "a gradient of another shape": (_break_shape, ValueError, False),
    "a negative lr": (_break_lr, ValueError, True),
    "a parameter cast to complex64": (_break_param, TypeError, True),
}


#: (class, break) where the step is refused: every class, where its torch class would refuse
#: it too or it has none
REFUSED = [
    (name, broken)
    for broken, (_, _, torch_runs) in BREAKS.items()
    for name in TORCH_CLASSES
    if not torch_runs or okt.RULES[name].torch_name is None
]


@needs_torch
@pytest.mark.parametrize("first", [True, False], ids=["first step", "later step"])
@pytest.mark.parametrize("name, broken", REFUSED)
def test_torch_step_refused_in_group_1_changes_nothing_in_group_0(name, broken, first):
    ps = _torch_model()
    opt = _torch_opt(name, ps)
    if not first:
        _torch_grads(ps, seed=5)
        opt.step()
    _torch_grads(ps)
    breaker, error, _ = BREAKS[broken]
    breaker(ps, opt)
    before = _torch_snapshot(opt, ps)
    with pytest.raises(error):
        opt.step()
    _same(_torch_snapshot(opt, ps), before)


@needs_torch
@pytest.mark.parametrize("name", [n for n in TORCH_CLASSES if okt and okt.RULES[n].torch_name])
@pytest.mark.parametrize("broken", [b for b in BREAKS if BREAKS[b][2]])
def test_torch_group_the_kernels_cannot_serve_runs_torchs_step_beside_the_kernels(name, broken):
    """Group 1 broken: torch's own step runs it on the same state (bit for bit what
    torch.optim gives from that state), the kernels run group 0 (bit for bit what they give
    without the break)."""
    ps, ref_ps = _torch_model(), _torch_model()
    opt, ref = _torch_opt(name, ps), _torch_opt(name, ref_ps)
    for o, p in ((opt, ps), (ref, ref_ps)):
        _torch_grads(p, seed=5)
        o.step()
        _torch_grads(p)
    theirs_ps = _torch_model()
    theirs = getattr(torch.optim, okt.RULES[name].torch_name)(
        [{"params": theirs_ps[:2]}, {"params": theirs_ps[2:]}], lr=1e-2
    )
    theirs.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch keeps the tensors it loads
    with torch.no_grad():
        for a, b in zip(theirs_ps, ps):
            a.copy_(b)
    _torch_grads(theirs_ps)
    BREAKS[broken][0](ps, opt)
    BREAKS[broken][0](theirs_ps, theirs)
    # the state as it was, uncast (torch's load casts it to the parameter's new dtype)
    theirs.state[theirs_ps[2]] = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[ps[2]].items()
    }
    outcome, said = [], []
    for o in (opt, theirs):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                o.step()
                outcome.append(None)
            except RuntimeError as e:  # torch's own step may refuse it (float32 state, complex p)
                outcome.append(type(e))
        said.append([str(w.message) for w in seen if w.category is okt.TorchFallbackWarning])
    assert outcome[0] is outcome[1]
    assert len(said[0]) == 1 and "param group 1" in said[0][0] and not said[1]
    ref.step()
    if outcome[0] is not None:
        return
    for a, b in zip(ps[:2], ref_ps[:2]):
        assert torch.equal(a.detach(), b.detach())
    assert torch.equal(ps[2].detach(), theirs_ps[2].detach())
    for k, v in theirs.state[theirs_ps[2]].items():
        u = opt.state[ps[2]][k]
        assert torch.equal(u, v) if isinstance(v, torch.Tensor) else u == v


# -- Schedule-Free's switch ------------------------------------------------------------------------


def _np_sf(name, steps=3):
    rng = np.random.default_rng(0)
    ps = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (4,), (5,)]]
    opt = getattr(ok, name)([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2)
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in ps])
    return opt, ps


@pytest.mark.parametrize("name", SF)
@pytest.mark.parametrize("which", [(0, 0), (0, 1), (1, 0)], ids=["first", "second", "other group"])
@pytest.mark.parametrize("to", ["eval", "train"])
def test_numpy_switch_with_a_read_only_parameter_moves_nothing(name, which, to):
    opt, ps = _np_sf(name)
    if to == "train":
        opt.eval()
    ref, ref_ps = _np_sf(name)
    if to == "train":
        ref.eval()
    gi, i = which
    bad = opt.param_groups[gi]["params"][i]
    bad.flags.writeable = False
    before = [p.copy() for p in ps], [g["train_mode"] for g in opt.param_groups]
    with pytest.raises(ValueError, match=f"parameter {i} of param group {gi}"):
        getattr(opt, to)()
    assert all(np.array_equal(p, q) for p, q in zip(ps, before[0]))
    assert [g["train_mode"] for g in opt.param_groups] == before[1]
    bad.flags.writeable = True
    getattr(opt, to)()  # moves once, as a switch that was never refused
    getattr(ref, to)()
    assert all(np.array_equal(p, q) for p, q in zip(ps, ref_ps))


@pytest.mark.parametrize("name", SF)
def test_numpy_switch_with_a_z_of_the_wrong_shape_moves_nothing(name):
    opt, ps = _np_sf(name)
    opt.state[ps[2]]["z"] = np.zeros(7, np.float32)
    before = [p.copy() for p in ps]
    with pytest.raises(ValueError, match="'z' of parameter 0 of param group 1"):
        opt.eval()
    assert all(np.array_equal(p, q) for p, q in zip(ps, before))
    assert all(g["train_mode"] for g in opt.param_groups)


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test. A shell starts a background
    job with SIGINT ignored, and Python then installs no handler: CI's lanes run that way."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("name", SF)
def test_ctrl_c_during_the_switch_lands_after_every_group_moved(name, monkeypatch, ctrl_c_raises):
    opt, ps = _np_sf(name)
    ref, ref_ps = _np_sf(name)
    ref.eval()
    real = schedule_free.lerp_
    sent = []

    def interrupted_lerp(*args):
        if not sent:
            sent.append(1)
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the first parameter moves
        real(*args)

    monkeypatch.setattr(schedule_free, "lerp_", interrupted_lerp)
    with pytest.raises(KeyboardInterrupt):
        opt.eval()
    assert all(g["train_mode"] is False for g in opt.param_groups)
    assert all(np.array_equal(p, q) for p, q in zip(ps, ref_ps))


def test_deferred_interrupts_delivers_to_the_callers_handler():
    got = []
    old = signal.signal(signal.SIGINT, lambda *a: got.append("handled"))
    try:
        with schedule_free.deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            assert got == []  # held back inside
        assert got == ["handled"]
    finally:
        signal.signal(signal.SIGINT, old)


def test_deferred_interrupts_keeps_an_ignored_ctrl_c_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with schedule_free.deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_lerp_in_chunks_matches_one_pass():
    rng = np.random.default_rng(3)
    for weight in (np.float32(0.1), np.float32(-9.0), np.float32(0.5), np.float32(0.9)):
        p = rng.standard_normal(1000).astype(np.float32)
        z = rng.standard_normal(1000).astype(np.float32)
        one, chunked = p.copy(), p.copy()
        schedule_free.lerp_(one, z, weight, np.empty(1000, np.float32))
        schedule_free.lerp_(chunked, z, weight, np.empty(7, np.float32))
        assert np.array_equal(one, chunked)
        if torch is not None:  # torch's lerp (its vector code may fuse the multiply-add)
            expected = torch.lerp(torch.from_numpy(p), torch.from_numpy(z), float(weight))
            np.testing.assert_allclose(one, expected.numpy(), rtol=1e-6, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("name", SF)
@pytest.mark.parametrize("to", ["eval", "train"])
def test_torch_switch_with_a_bfloat16_parameter_moves_nothing(name, to):
    ps = _torch_model()
    opt = _torch_opt(name, ps)
    for t in range(3):
        _torch_grads(ps, seed=t)
        opt.step()
    if to == "train":
        opt.eval()
    keep = ps[2].data
    with torch.no_grad():
        ps[2].data = ps[2].data.to(torch.bfloat16)
    before = [p.detach().clone() for p in ps], [g["train_mode"] for g in opt.param_groups]
    with pytest.raises(TypeError, match="parameter 0 of param group 1"):
        getattr(opt, to)()
    assert all(torch.equal(p.detach(), q) for p, q in zip(ps, before[0]))
    assert [g["train_mode"] for g in opt.param_groups] == before[1]
    with torch.no_grad():
        ps[2].data = keep
    getattr(opt, to)()
    assert all(g["train_mode"] is (to == "train") for g in opt.param_groups)


# -- train_mode must be a bool ---------------------------------------------------------------------

BAD_MODES = ["False", "True", 0, 1, None, 1.0, [False]]


@pytest.mark.parametrize("name", SF)
@pytest.mark.parametrize("mode", BAD_MODES, ids=repr)
def test_numpy_state_dict_with_a_mode_that_is_not_a_bool_is_refused(name, mode):
    opt, ps = _np_sf(name)
    sd = opt.state_dict()
    sd["param_groups"][1]["train_mode"] = mode
    before = repr(opt.state_dict())
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['train_mode'\]"):
        opt.load_state_dict(sd)
    assert repr(opt.state_dict()) == before


@pytest.mark.parametrize("name", SF)
@pytest.mark.parametrize("mode", [True, False, np.bool_(False)], ids=repr)
def test_numpy_state_dict_with_a_bool_mode_loads(name, mode):
    opt, ps = _np_sf(name)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["train_mode"] = mode
    opt.load_state_dict(sd)
    assert all(g["train_mode"] == bool(mode) for g in opt.param_groups)


@needs_torch
@pytest.mark.parametrize("name", SF)
@pytest.mark.parametrize("mode", BAD_MODES, ids=repr)
def test_torch_state_dict_with_a_mode_that_is_not_a_bool_is_refused(name, mode):
    ps = _torch_model()
    opt = _torch_opt(name, ps)
    _torch_grads(ps)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["train_mode"] = mode
    with pytest.raises(TypeError, match="train_mode"):
        opt.load_state_dict(sd)
    assert all(g["train_mode"] is True for g in opt.param_groups)


@pytest.mark.parametrize("name", SF)
@pytest.mark.parametrize("mode", BAD_MODES, ids=repr)
def test_add_param_group_with_a_mode_that_is_not_a_bool_is_refused(name, mode):
    opt, ps = _np_sf(name)
    with pytest.raises(TypeError, match="train_mode"):
        opt.add_param_group({"params": [np.zeros(3, np.float32)], "train_mode": mode})
    assert len(opt.param_groups) == 2
