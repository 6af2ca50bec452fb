"""ScheduleFreeAdamW and ScheduleFreeSGD against the schedulefree package (AdamWScheduleFree,
SGDScheduleFree; its single-tensor and foreach paths), in float32, over 40 steps with eval()/
train() switches mid-run: y, z, exp_avg_sq and x compared, and the package's group counters
(k, lr_max, weight_sum) against optkern's per-parameter step and carried numbers. Skipped
without torch or schedulefree; the oracle stage of CI (.ci/oracles.sh) installs both.

Every parameter has a gradient at every step here: optkern counts per parameter, the package per
group (see the class docstrings), and the two agree exactly then.
"""

from __future__ import annotations

import numpy as np
import optim_db as db
import pytest

import optkern as ok

STEPS = 40
SWITCH_AT = (7, 19, 30)  # eval() then train() after these steps
SHAPES = [(37,), (5, 7), (1,), (64, 33), (2, 3, 4)]
# The rules of the optimizer database with a schedulefree oracle: the package's class, and the
# option sets checked against it.
PACKAGE = {e.name: e.oracle("schedulefree").name for e in db.with_oracle("schedulefree")}
CASES = [(e.name, hp) for e in db.with_oracle("schedulefree") for hp in e.oracle_cases or e.cases]
case_id = db.case_id


def initial(seed=1):
    rng = np.random.default_rng(seed)
    return [(0.5 * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]


def gradients(seed=2):
    rng = np.random.default_rng(seed)
    bias = [0.05 * rng.standard_normal(s) for s in SHAPES]
    return [
        [(0.1 * rng.standard_normal(s) + b).astype(np.float32) for s, b in zip(SHAPES, bias)]
        for _ in range(STEPS)
    ]


def assert_close(actual, desired, what, scale=1.0):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(desired), rtol=1e-5, atol=1e-6 * scale, err_msg=what
    )


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_schedulefree(case, foreach):
    torch = pytest.importorskip("torch")
    schedulefree = pytest.importorskip("schedulefree")
    name, hp = case
    p0 = initial()
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
    theirs = getattr(schedulefree, PACKAGE[name])(tparams, foreach=foreach, **hp)
    params = [x.copy() for x in p0]
    ours = getattr(ok, name)(params, **hp)
    # Both scale with lr (SGD's z moves by lr * g, lr up to 1 here).
    scale = max(1.0, 10 * hp.get("lr", 1.0 if name == "ScheduleFreeSGD" else 0.0025))

    def compare(what):
        group = theirs.param_groups[0]
        assert group["train_mode"] == ours.param_groups[0]["train_mode"]
        for i, (t, p) in enumerate(zip(tparams, params)):
            assert_close(p, t.detach().numpy(), f"{what}: p {SHAPES[i]}", scale)
            st, so = theirs.state[t], ours.state[p]
            for key in ("z", "exp_avg_sq"):
                if key in st:
                    assert_close(so[key], st[key].numpy(), f"{what}: {key} {SHAPES[i]}", scale)
            assert so["step"] == group["k"]
            assert so["lr_max"] == pytest.approx(group["lr_max"], rel=1e-15)
            assert so["weight_sum"] == pytest.approx(group["weight_sum"], rel=1e-13)

    with pytest.raises(Exception, match="train mode"):  # the package starts in eval mode
        theirs.step()
    theirs.train()
    ours.train()  # a no-op before the first step in both
    for t, gs in enumerate(gradients()):
        for tp, g in zip(tparams, gs):
            tp.grad = torch.tensor(g)
        theirs.step()
        ours.step(gs)
        if t in SWITCH_AT:
            theirs.eval()
            ours.eval()
            compare(f"x after step {t + 1}")
            with pytest.raises(RuntimeError, match="eval mode"):
                ours.step(gs)
            theirs.train()
            ours.train()
            compare(f"y after step {t + 1}")
    compare("y at the end")
    theirs.eval()
    ours.eval()
    compare("x at the end")


@pytest.mark.parametrize("name", list(PACKAGE))
def test_state_dict_saved_in_eval_mode_resumes_like_the_package(name):
    """The package's recipe: eval(), save the parameters and the optimizer, load both into fresh
    objects, train() and go on; optkern does the same and stays with the package."""
    torch = pytest.importorskip("torch")
    schedulefree = pytest.importorskip("schedulefree")
    hp = dict(lr=0.01, warmup_steps=5) if name == "ScheduleFreeAdamW" else dict(lr=0.1)
    gs = gradients(seed=3)
    p0 = initial(seed=4)
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
    theirs = getattr(schedulefree, PACKAGE[name])(tparams, **hp)
    params = [x.copy() for x in p0]
    ours = getattr(ok, name)(params, **hp)
    theirs.train()
    ours.train()
    for g in gs[:15]:
        for tp, x in zip(tparams, g):
            tp.grad = torch.tensor(x)
        theirs.step()
        ours.step(g)
    theirs.eval()
    ours.eval()
    saved_t = ([t.detach().clone() for t in tparams], theirs.state_dict())
    saved_o = ([p.copy() for p in params], ours.state_dict())
    tparams = [torch.nn.Parameter(x) for x in saved_t[0]]
    theirs = getattr(schedulefree, PACKAGE[name])(tparams, **hp)
    theirs.load_state_dict(saved_t[1])
    params = saved_o[0]
    ours = getattr(ok, name)(params, **hp)
    ours.load_state_dict(saved_o[1])
    theirs.train()
    ours.train()
    for g in gs[15:]:
        for tp, x in zip(tparams, g):
            tp.grad = torch.tensor(x)
        theirs.step()
        ours.step(g)
    theirs.eval()
    ours.eval()
    for t, p in zip(tparams, params):
        assert_close(p, t.detach().numpy(), "x after resuming")
