"""state_dict / load_state_dict: torch's layout and names, round trips that continue exactly, and
loads that are checked whole before anything changes."""

import copy

import numpy as np
import pytest
from helpers import digest
from optim_db import CASES, case_id

import optkern as ok


def make_opt(name, hp, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(6, 4), (9,), (1,)]]
    opt = getattr(ok, name)([{"params": params[:2]}, {"params": params[2:], "lr": 0.002}], **hp)
    return opt, params


def grads(params, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.shape).astype(np.float32) for p in params]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_round_trip_continues_exactly(case):
    name, hp = case
    a, pa = make_opt(name, hp)
    for t in range(5):
        a.step(grads(pa, t))
    sd = a.state_dict()
    b, pb = make_opt(name, hp, seed=1)  # other initial values: load copies state, not params
    for p, q in zip(pb, pa):
        p[...] = q
    b.load_state_dict(sd)
    for t in range(5, 10):
        a.step(grads(pa, t))
        b.step(grads(pb, t))
    assert digest(pa) == digest(pb)
    assert digest(a.state_dict()["state"]) == digest(b.state_dict()["state"])


def test_layout_follows_torch():
    opt, params = make_opt("Adam", dict(amsgrad=True))
    opt.step(grads(params, 0))
    sd = opt.state_dict()
    assert set(sd) == {
        "state",
        "param_groups",
        "step_count",
        "skipped_steps",
    }  # torch ignores the last two
    assert sd["step_count"] == 1 and sd["skipped_steps"] == 0
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    assert sd["param_groups"][1]["lr"] == 0.002
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)
    assert sorted(sd["state"]) == [0, 1, 2]
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["step"] == 1
    assert sd["state"][0]["exp_avg"].shape == (6, 4)


def test_state_dict_is_a_snapshot():
    opt, params = make_opt("Adam", {})
    opt.step(grads(params, 0))
    sd = opt.state_dict()
    saved = digest([sd["state"]])
    opt.step(grads(params, 1))
    sd["param_groups"][0]["lr"] = 123.0
    assert digest([sd["state"]]) == saved
    assert opt.param_groups[0]["lr"] == 1e-3


def test_loaded_state_is_copied_not_shared():
    opt, params = make_opt("Adam", {})
    opt.step(grads(params, 0))
    sd = opt.state_dict()
    other, _ = make_opt("Adam", {})
    other.load_state_dict(sd)
    sd["state"][0]["exp_avg"][...] = 99.0
    assert not np.any(other.state[other.param_groups[0]["params"][0]]["exp_avg"] == 99.0)


def test_plain_sgd_has_no_state_and_momentum_sgd_has_buffers():
    opt, params = make_opt("SGD", dict(lr=0.1))
    opt.step(grads(params, 0))
    assert opt.state_dict()["state"] == {}
    opt, params = make_opt("SGD", dict(lr=0.1, momentum=0.9))
    opt.step(grads(params, 0))
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}


def test_torch_style_values_are_accepted():
    """Steps as floats or 0-d arrays (torch keeps them as tensors), momentum_buffer None (torch
    writes it for a buffer never created), extra hyperparameter keys kept."""
    opt, params = make_opt("Adam", {})
    opt.step(grads(params, 0))
    sd = opt.state_dict()
    sd["state"][0]["step"] = np.array(1.0, np.float32)
    sd["state"][1]["step"] = 1.0
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].astype(np.float64)
    sd["param_groups"][0].update(foreach=None, fused=None, capturable=False)
    other, _ = make_opt("Adam", {})
    other.load_state_dict(sd)
    p0 = other.param_groups[0]["params"][0]
    assert other.state[p0]["step"] == 1 and other.state[p0]["exp_avg"].dtype == np.float32
    assert other.param_groups[0]["foreach"] is None
    sgd, ps = make_opt("SGD", dict(momentum=0.9))
    sgd.load_state_dict(
        {"state": {0: {"momentum_buffer": None}}, "param_groups": sgd.state_dict()["param_groups"]}
    )
    assert ps[0] not in sgd.state or "momentum_buffer" not in sgd.state[ps[0]]


def _broken(sd, how):
    sd = copy.deepcopy(sd)
    if how == "groups":
        sd["param_groups"].pop()
    elif how == "group size":
        sd["param_groups"][0]["params"].append(7)
    elif how == "unknown id":
        sd["state"][42] = sd["state"][0]
    elif how == "shape":
        sd["state"][1]["exp_avg"] = np.zeros(8, np.float32)
    elif how == "missing array":
        del sd["state"][2]["exp_avg_sq"]
    elif how == "missing step":
        del sd["state"][0]["step"]
    elif how == "bad step":
        sd["state"][0]["step"] = -2
    elif how == "fractional step":
        sd["state"][0]["step"] = 1.5
    elif how == "bad lr":
        sd["param_groups"][1]["lr"] = float("nan")
    elif how == "not a dict":
        sd = [1, 2]
    elif how == "amsgrad without state":
        sd["param_groups"][0]["amsgrad"] = True
    elif how == "string array":
        sd["state"][0]["exp_avg"] = np.array(["a"] * 24).reshape(6, 4)
    return sd


@pytest.mark.parametrize(
    "how, pattern",
    [
        ("groups", "has 1 parameter groups; this optimizer has 2"),
        ("group size", r"param_groups\[0\] has 3 parameters"),
        ("unknown id", "parameter id 42"),
        ("shape", r"state\[1\]\['exp_avg'\] has shape \(8,\) but its parameter has shape \(9,\)"),
        ("missing array", r"state\[2\] lacks 'exp_avg_sq'"),
        ("missing step", r"state\[0\] has no 'step'"),
        ("bad step", "must be a whole number >= 0"),
        ("fractional step", "must be a whole number >= 0"),
        ("bad lr", r"param_groups\[1\]: lr must be finite"),
        ("not a dict", "must be a mapping"),
        ("amsgrad without state", "lacks 'max_exp_avg_sq'"),
        ("string array", "must hold real numbers"),
    ],
)
def test_bad_state_dict_rejected_and_nothing_changes(how, pattern):
    opt, params = make_opt("Adam", {})
    for t in range(3):
        opt.step(grads(params, t))
    sd = opt.state_dict()
    other, ps = make_opt("Adam", {})
    other.step(grads(ps, 9))
    before = digest([ps, other.state_dict()])
    with pytest.raises((ValueError, TypeError), match=pattern):
        other.load_state_dict(_broken(sd, how))
    assert digest([ps, other.state_dict()]) == before


def test_named_parameters_as_torch_takes_them():
    """[("name", array), ...] keeps the names in param_names (and so in the state dict); loaded
    names replace the current ones; bad names are refused with nothing changed."""
    W = np.ones((3, 2), np.float32)
    b = np.zeros(2, np.float32)
    opt = ok.Adam([("w", W), ("b", b)], lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["w", "b"]
    assert opt.param_groups[0]["params"][0] is W
    opt.step([np.ones_like(W), np.ones_like(b)])
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["w", "b"]
    other = ok.Adam([("x", W.copy()), ("y", b.copy())], lr=0.1)
    other.load_state_dict(sd)
    assert other.param_groups[0]["param_names"] == ["w", "b"]
    bad = {**sd, "param_groups": [{**sd["param_groups"][0], "param_names": ["w"]}]}
    fresh = ok.Adam([("x", W.copy()), ("y", b.copy())], lr=0.1)
    with pytest.raises(ValueError, match="param_names"):
        fresh.load_state_dict(bad)
    assert fresh.param_groups[0]["param_names"] == ["x", "y"] and not fresh.state
    with pytest.raises(TypeError, match="all arrays or all"):
        ok.Adam([("w", W), b])
    with pytest.raises(ValueError, match="unique"):
        ok.Adam([("w", W), ("w", b)])
    with pytest.raises(ValueError, match="named or all unnamed"):
        ok.SGD([{"params": [("w", W)]}, {"params": [b]}], lr=0.1)
    groups = ok.SGD([{"params": [("w", W)]}, {"params": [("b", b)], "lr": 1.0}], lr=0.1)
    assert [g["param_names"] for g in groups.state_dict()["param_groups"]] == [["w"], ["b"]]
