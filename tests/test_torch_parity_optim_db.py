"""Parity with torch.optim 2.13 of the rules whose update depends on the step count (skipped
without torch).

Every input that torch's own optimizer test database
(``torch.testing._internal.common_optimizers.optim_db``) gives for the optimizer on the CPU in
float32 runs in optkern and in torch, both torch's single-tensor path (``foreach=False``) and its
foreach path, for 30 steps over parameters of several shapes; parameters and every state entry
(arrays, the step, and the carried numbers: NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``)
are compared. The state dict moves both ways mid-training: optkern's (arrays as NumPy arrays,
``step`` an int, the carried numbers floats, which torch's ``__setstate__`` turns into its 0-d
tensors) loads into torch, torch's loads into optkern, and both go on identically.
"""

import numpy as np
import optim_db as db
import pytest

import optkern as ok

torch = pytest.importorskip("torch")

# Every rule of the optimizer database whose torch oracle has inputs in torch's optim_db and whose
# update depends on each parameter's step count: what this file checks (a parameter without a
# gradient falls behind the others; the counts and carried numbers move both ways with the state
# dict). test_torch_parity.py checks every torch rule on the reference cases, test_torch_adapter.py
# optkern.torch on every optim_db input.
NAMES = tuple(
    e.name for e in db.with_oracle("torch") if e.oracle("torch").optim_db and e.rule.uses_step
)
RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(7, 13), (131,), (3, 5, 11), (1,)]
STEPS = 30
HALF = 15


def _optim_db_cases():
    """(the cases, why there are none): without optim_db, one case skipped with the reason."""
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as e:  # its imports (expecttest, ...) are test-only dependencies of torch
        reason = f"could not import torch's optim_db: {e}"
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=reason))], reason
    cases = []
    for info in optim_db:
        if info.name not in NAMES:
            continue
        for inp in info.optim_inputs_func(device="cpu", dtype=torch.float32):
            cases.append(pytest.param(info.name, dict(inp.kwargs), id=f"{info.name}-{inp.desc}"))
    return cases, None


CASES, OPTIM_DB_MISSING = _optim_db_cases()
IMPLS = ["single_tensor", "foreach"]


def initial_params(seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 0.5).astype(np.float32) for s in SHAPES]


def gradients(step, seed=0):
    rng = np.random.default_rng(1000 * seed + step + 1)
    return [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in SHAPES]


class Pair:
    """One optkern optimizer and one torch optimizer over copies of the same parameters."""

    def __init__(self, name, kwargs, impl):
        self.name, self.kwargs = name, kwargs
        p0 = initial_params()
        self.mine = [p.copy() for p in p0]
        self.theirs = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
        self.opt = getattr(ok, name)(self.mine, **kwargs)
        self.topt = getattr(torch.optim, name)(self.theirs, **kwargs, foreach=impl == "foreach")

    def step_mine(self, grads):
        self.opt.step(grads)

    def step_theirs(self, grads):
        for p, g in zip(self.theirs, grads):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        self.topt.step()

    def step(self, grads):
        self.step_mine(grads)
        self.step_theirs(grads)

    def assert_same(self, where):
        for i, (a, b) in enumerate(zip(self.mine, self.theirs)):
            close(a, b.detach().numpy(), f"{where}: param {i}")
            sb = {k: v for k, v in self.topt.state[b].items() if v is not None}
            sa = self.opt.state[a]
            assert set(sa) == set(sb), (where, i, sorted(sa), sorted(sb))
            for key, expected in sb.items():
                if key == "step":
                    assert sa["step"] == int(expected), (where, i)
                elif expected.dim() == 0:  # a carried number: a float here, a 0-d tensor there
                    assert isinstance(sa[key], float), (where, i, key)
                    close(np.float64(sa[key]), expected.double().numpy(), f"{where}: param {i} {key}")
                else:
                    assert sa[key].dtype == np.float32 and sa[key].shape == tuple(expected.shape)
                    close(sa[key], expected.numpy(), f"{where}: param {i} state {key}")


def close(a, b, what):
    finite = np.abs(b[np.isfinite(b)])
    scale = max(1.0, float(np.max(finite, initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * scale, err_msg=what)


def to_torch(sd):
    """optkern's state dict as torch loads it: arrays become tensors; the step (an int) and the
    carried numbers (floats) stay numbers, which torch's ``__setstate__`` makes its tensors."""
    state = {
        i: {k: torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return {**sd, "state": state}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name, kwargs", CASES)
def test_optim_db_input_matches_torch(name, kwargs, impl):
    pair = Pair(name, kwargs, impl)
    for t in range(STEPS):
        grads = gradients(t)
        if impl == "single_tensor" and t in (3, 4, 11):
            # a parameter without a gradient is not stepped: its step, mu_product, eta and mu
            # fall behind the others' (torch's foreach ASGD takes the first parameter's eta for
            # all, so this runs on the single-tensor path only)
            grads[1] = None
        pair.step(grads)
        if t in (0, 4, 5, 6):  # RAdam's first rectified step is the 6th
            pair.assert_same(f"step {t + 1}")
    pair.assert_same(f"step {STEPS}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name, kwargs", CASES)
def test_state_dict_moves_both_ways_mid_training(name, kwargs, impl):
    # optkern -> torch
    pair = Pair(name, kwargs, impl)
    for t in range(HALF):
        pair.step_mine(gradients(t))
    with torch.no_grad():
        for a, b in zip(pair.mine, pair.theirs):
            b.copy_(torch.from_numpy(a))
    pair.topt.load_state_dict(to_torch(pair.opt.state_dict()))
    for t in range(HALF, STEPS):
        pair.step(gradients(t))
    pair.assert_same("optkern -> torch")

    # torch -> optkern
    pair = Pair(name, kwargs, impl)
    for t in range(HALF):
        pair.step_theirs(gradients(t))
    for a, b in zip(pair.mine, pair.theirs):
        a[...] = b.detach().numpy()
    pair.opt.load_state_dict(pair.topt.state_dict())
    assert all(
        isinstance(pair.opt.state[p][c.name], float)
        for p in pair.mine
        for c in pair.opt._rule.carried
    )
    for t in range(HALF, STEPS):
        pair.step(gradients(t))
    pair.assert_same("torch -> optkern")


@pytest.mark.parametrize("name", NAMES)
def test_optim_db_covers_each_optimizer(name):
    if OPTIM_DB_MISSING:
        pytest.skip(OPTIM_DB_MISSING)
    # torch 2.13's optim_db has 5 or more CPU inputs for each of them
    assert sum(1 for c in CASES if c.values[0] == name) >= 5


def test_asgd_lr_change_takes_effect_one_step_late_as_in_torch():
    pair = Pair("ASGD", dict(lr=0.05, lambd=0.01), "single_tensor")
    for t in range(STEPS):
        if t == 10:
            pair.opt.param_groups[0]["lr"] = 0.2
            pair.topt.param_groups[0]["lr"] = 0.2
        pair.step(gradients(t))
        if t == 10:  # this step still ran with the eta of the old lr
            assert pair.opt.state[pair.mine[0]]["eta"] == pytest.approx(
                0.2 / (1 + 0.01 * 0.2 * 11) ** 0.75
            )
    pair.assert_same("after the lr change")


def test_radam_switch_from_momentum_to_rectified():
    # beta2 = 0.999: rho_t > 5 from step 6 on; beta2 = 0.6: rho_inf = 4, never
    for betas, rectified_from in (((0.9, 0.999), 6), ((0.9, 0.6), None)):
        pair = Pair("RAdam", dict(betas=betas), "single_tensor")
        for t in range(12):
            before = [p.copy() for p in pair.mine]
            pair.step(gradients(t))
            step = t + 1
            moved = before[1] - pair.mine[1]
            plain = (
                pair.opt.state[pair.mine[1]]["exp_avg"] / np.float32(1 - 0.9**step) * np.float32(1e-3)
            )
            is_plain = np.allclose(moved, plain, rtol=1e-2, atol=1e-6)
            assert is_plain == (rectified_from is None or step < rectified_from), (betas, step)
        pair.assert_same(f"betas={betas}")
