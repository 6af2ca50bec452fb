"""Numbers a rule carries per parameter from step to step (the registry's CarriedDecl: NAdam's
``mu_product``, ASGD's ``eta`` and ``mu``): kept in double as floats in the parameter's state,
updated in place in the functional lists, written to and read from state dicts (also torch's 0-d
tensors' NumPy form), and refused when malformed with nothing changed. The sharded layout of
optkern.distributed keeps them too: tests/mpi/test_layout_carried.py (needs mpi4py)."""

import math

import numpy as np
import pytest
from helpers import digest
import optim_db as db
from reference import Reference

import optkern as ok
from optkern import functional as F

CARRIED = [r for r in ok.registry.rules() if r.carried]


def test_the_rules_that_carry_numbers():
    assert {r.cls: [(c.name, c.arg, c.init, c.init_from) for c in r.carried] for r in CARRIED} == {
        "NAdam": [("mu_product", "mu_products", 1.0, None)],
        "ASGD": [("eta", "etas", 0.0, "lr"), ("mu", "mus", 1.0, None)],
        # schedulefree keeps these per param group (equal on every parameter here).
        "ScheduleFreeAdamW": [
            ("lr_max", "lr_maxs", -1.0, None),
            ("weight_sum", "weight_sums", 0.0, None),
        ],
        "ScheduleFreeSGD": [
            ("lr_max", "lr_maxs", -1.0, None),
            ("weight_sum", "weight_sums", 0.0, None),
        ],
    }


@pytest.mark.parametrize("rule", CARRIED, ids=[r.cls for r in CARRIED])
def test_class_keeps_python_floats_matching_the_reference(rule):
    rng = np.random.default_rng(0)
    hp = {"t0": 3} if rule.cls == "ASGD" else {}
    p = rng.standard_normal(10).astype(np.float32)
    ref = Reference(rule.cls, p, **hp)
    opt = getattr(ok, rule.cls)([p], **hp)
    for _ in range(8):
        g = rng.standard_normal(10).astype(np.float32)
        opt.step([g])
        ref.step(g.astype(np.float64))
        for c in rule.carried:
            assert type(opt.state[p][c.name]) is float
            expected = ref.group if db.entry(rule.cls).schedule_free else ref.state
            assert opt.state[p][c.name] == pytest.approx(expected[c.name], rel=1e-14)
    sd = opt.state_dict()
    assert all(type(sd["state"][0][c.name]) is float for c in rule.carried)


def test_functional_lists_updated_in_place_per_parameter():
    # two parameters at different points: each gets its own mu_product and its own scalars
    params = [np.ones(5, np.float32), np.ones(5, np.float32)]
    grads = [np.full(5, 0.5, np.float32), np.full(5, 0.5, np.float32)]
    m = [np.zeros(5, np.float32), np.zeros(5, np.float32)]
    v = [np.zeros(5, np.float32), np.zeros(5, np.float32)]
    mu_products = [1.0, 0.25]
    same = mu_products
    F.nadam_(
        params,
        grads,
        m,
        v,
        mu_products,
        step=[1, 1],
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        momentum_decay=4e-3,
        decoupled_weight_decay=False,
    )
    assert mu_products is same
    mu1 = 0.9 * (1 - 0.5 * 0.96**4e-3)
    assert mu_products == [pytest.approx(mu1, rel=1e-15), pytest.approx(0.25 * mu1, rel=1e-15)]
    assert params[0][0] != params[1][0]  # the carried values changed the second one's scalars


def test_asgd_functional_eta_and_mu():
    p, g, ax = np.ones(3, np.float32), np.full(3, 2.0, np.float32), np.zeros(3, np.float32)
    etas, mus = [0.1], [1.0]
    F.asgd_(
        [p], [g], [ax], etas, mus, step=3, lr=0.1, lambd=0.5, alpha=0.75, t0=1.0, weight_decay=0.0
    )
    np.testing.assert_allclose(p, (1 - 0.5 * 0.1) - 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(ax, p)  # mu was 1: ax is a copy of p
    assert etas == [pytest.approx(0.1 / (1 + 0.5 * 0.1 * 3) ** 0.75, rel=1e-15)]
    assert mus == [0.5]  # 1 / max(1, 3 - 1)


R = r"state\[0\]\['mu_product'\] "


@pytest.mark.parametrize(
    "bad, exc, pattern",
    [
        ("0.5", TypeError, R + "must be a real number"),
        (None, ValueError, r"state\[0\] lacks 'mu_product'"),  # None: as never created (torch)
        (True, TypeError, R + "must be a real number"),
        (np.zeros(2), TypeError, R + "must be a real number"),
        (math.nan, ValueError, R + "must be finite"),
        (math.inf, ValueError, R + "must be finite"),
    ],
)
def test_malformed_carried_number_in_a_state_dict_is_refused(bad, exc, pattern):
    p = np.ones(4, np.float32)
    opt = ok.NAdam([p])
    opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    before = digest([p, opt.state_dict()])
    sd["state"][0]["mu_product"] = bad
    with pytest.raises(exc, match=pattern):
        opt.load_state_dict(sd)
    assert digest([p, opt.state_dict()]) == before


def test_missing_carried_number_in_a_state_dict_is_refused():
    p = np.ones(4, np.float32)
    opt = ok.ASGD([p])
    opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    del sd["state"][0]["eta"]
    with pytest.raises(ValueError, match="lacks 'eta'"):
        opt.load_state_dict(sd)


def test_zero_d_arrays_load_as_floats():
    # torch keeps them as 0-d float32 tensors; their NumPy form loads as a Python float
    p = np.ones(4, np.float32)
    opt = ok.ASGD([p], t0=0)
    opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    sd["state"][0]["eta"] = np.array(sd["state"][0]["eta"], np.float32)
    sd["state"][0]["mu"] = np.array(0.5, np.float32)
    opt.load_state_dict(sd)
    assert type(opt.state[p]["eta"]) is float and opt.state[p]["mu"] == 0.5


def test_failed_step_keeps_the_carried_numbers():
    p = np.ones(4, np.float32)
    opt = ok.NAdam([p])
    opt.step([np.ones(4, np.float32)])
    mu = opt.state[p]["mu_product"]
    with pytest.raises(TypeError):
        opt.step([np.ones(4, np.float16)])
    assert opt.state[p]["mu_product"] == mu and opt.state[p]["step"] == 1
