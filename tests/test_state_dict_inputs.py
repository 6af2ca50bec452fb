"""Malformed state dicts in torch's layout. Every one raises
TypeError or ValueError (never RecursionError, KeyError, AttributeError...) and changes nothing;
a few odd but meaningful ones load as torch would."""

import copy
import math

import numpy as np
import pytest
import optim_db as db
from helpers import digest

import optkern as ok


def setup(kind="Adam", **hp):
    a, b, c = np.ones(4, np.float32), np.full(3, 2.0, np.float32), np.zeros((2, 2), np.float32)
    opt = getattr(ok, kind)([{"params": [a, b]}, {"params": [c], "lr": 0.5}], **hp)
    for _ in range(2):
        opt.step([np.full(4, 0.5, np.float32), np.ones(3, np.float32), np.ones((2, 2), np.float32)])
    return opt, [a, b, c]


def check_refused(sd, exc=(TypeError, ValueError), kind="Adam", match=None, **hp):
    opt, params = setup(kind, **hp)
    before = digest([params, opt.state_dict()])
    with pytest.raises(exc, match=match) as info:
        opt.load_state_dict(sd(opt))
    assert not isinstance(info.value, (RecursionError, KeyError, AttributeError, IndexError))
    assert digest([params, opt.state_dict()]) == before
    groups_before = [dict(g) for g in opt.param_groups]
    opt.step([np.ones(4, np.float32), np.ones(3, np.float32), np.ones((2, 2), np.float32)])
    assert [set(g) for g in opt.param_groups] == [set(g) for g in groups_before]


def edit(fn):
    def make(opt):
        sd = opt.state_dict()
        fn(sd)
        return sd

    return make


def deep(n):
    x = 1.0
    for _ in range(n):
        x = [x]
    return x


def deep_dict(n):
    x = {}
    for _ in range(n):
        x = {"k": x}
    return x


def cyclic():
    x = []
    x.append(x)
    return x


# -- param ids (finding: duplicate / unhashable / str ids were accepted or raised TypeError) -----

BAD_IDS = {
    "duplicate-in-group": (lambda sd: sd["param_groups"][0].update(params=[0, 0]), ValueError),
    "duplicate-across-groups": (lambda sd: sd["param_groups"][1].update(params=[0]), ValueError),
    "str": (lambda sd: sd["param_groups"][0].update(params=["0", "1"]), TypeError),
    "float": (lambda sd: sd["param_groups"][0].update(params=[0.0, 1.0]), TypeError),
    "bool": (lambda sd: sd["param_groups"][0].update(params=[False, True]), TypeError),
    "none": (lambda sd: sd["param_groups"][0].update(params=[None, 1]), TypeError),
    "list-id": (lambda sd: sd["param_groups"][0].update(params=[[0], 1]), TypeError),
    "dict-id": (lambda sd: sd["param_groups"][0].update(params=[{}, 1]), TypeError),
    "tuple-id": (lambda sd: sd["param_groups"][0].update(params=[(0,), 1]), TypeError),
    "params-str": (lambda sd: sd["param_groups"][0].update(params="01"), TypeError),
    "params-dict": (lambda sd: sd["param_groups"][0].update(params={0: 0, 1: 1}), TypeError),
    "params-int": (lambda sd: sd["param_groups"][0].update(params=2), TypeError),
    "params-none": (lambda sd: sd["param_groups"][0].update(params=None), TypeError),
    "params-set": (lambda sd: sd["param_groups"][0].update(params={0, 1}), TypeError),
    "params-gen": (lambda sd: sd["param_groups"][0].update(params=(i for i in range(2))), TypeError),
    "state-key-str": (lambda sd: sd.update(state={"0": sd["state"][0]}), TypeError),
    "state-key-float": (lambda sd: sd.update(state={0.0: sd["state"][0]}), TypeError),
    "state-key-none": (lambda sd: sd.update(state={None: sd["state"][0]}), TypeError),
    "state-key-tuple": (lambda sd: sd.update(state={(0,): sd["state"][0]}), TypeError),
    "state-key-unknown": (lambda sd: sd.update(state={7: sd["state"][0]}), ValueError),
    "state-key-negative": (lambda sd: sd.update(state={-1: sd["state"][0]}), ValueError),
}


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_param_ids_refused(case):
    fn, exc = BAD_IDS[case]
    check_refused(edit(fn), exc)


def test_shuffled_ids_map_by_position_like_torch():
    """ids are names: a dict that numbers its parameters differently maps them by position."""
    opt, params = setup()
    sd = opt.state_dict()
    relabel = {0: 10, 1: 11, 2: 12}
    sd["param_groups"][0]["params"] = [10, 11]
    sd["param_groups"][1]["params"] = [12]
    sd["state"] = {relabel[k]: v for k, v in sd["state"].items()}
    opt2, _ = setup()
    opt2.load_state_dict(sd)
    assert digest([opt2.state_dict()["state"]]) == digest([opt.state_dict()["state"]])


def test_numpy_int_ids_accepted():
    opt, params = setup()
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = [np.int64(0), np.int32(1)]
    sd["state"] = {np.int64(k): v for k, v in sd["state"].items()}
    opt.load_state_dict(sd)
    assert opt.state[params[0]]["step"] == 2


# -- top-level and group structure ---------------------------------------------------------------

STRUCTURE = {
    "not-a-mapping": lambda opt: [("state", {}), ("param_groups", [])],
    "none": lambda opt: None,
    "missing-state": edit(lambda sd: sd.pop("state")),
    "missing-groups": edit(lambda sd: sd.pop("param_groups")),
    "state-list": edit(lambda sd: sd.update(state=[])),
    "state-none": edit(lambda sd: sd.update(state=None)),
    "groups-dict": edit(lambda sd: sd.update(param_groups={0: sd["param_groups"][0]})),
    "groups-str": edit(lambda sd: sd.update(param_groups="ab")),
    "one-group-short": edit(lambda sd: sd["param_groups"].pop()),
    "one-group-extra": edit(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][1]))),
    "group-not-mapping": edit(lambda sd: sd["param_groups"].__setitem__(0, [0, 1])),
    "group-without-params": edit(lambda sd: sd["param_groups"][0].pop("params")),
    "group-too-few-params": edit(lambda sd: sd["param_groups"][0].update(params=[0])),
    "group-too-many-params": edit(lambda sd: sd["param_groups"][0].update(params=[0, 1, 5])),
    "entry-not-mapping": edit(lambda sd: sd["state"].__setitem__(0, [1, 2])),
    "entry-none": edit(lambda sd: sd["state"].__setitem__(0, None)),
    "entry-without-step": edit(lambda sd: sd["state"][0].pop("step")),
    "entry-without-exp_avg": edit(lambda sd: sd["state"][0].pop("exp_avg")),
    "entry-exp_avg-none-needed": edit(lambda sd: sd["state"][0].update(exp_avg_sq=None)),
    "names-wrong-length": edit(lambda sd: sd["param_groups"][0].update(param_names=["a"])),
    "names-not-str": edit(lambda sd: sd["param_groups"][0].update(param_names=[1, 2])),
    "names-str": edit(lambda sd: sd["param_groups"][0].update(param_names="ab")),
}


@pytest.mark.parametrize("case", STRUCTURE)
def test_malformed_structure_refused(case):
    check_refused(STRUCTURE[case])


# -- hyperparameters in the groups -----------------------------------------------------------------

HYPER = {
    "lr-nan": ("lr", math.nan),
    "lr-inf": ("lr", math.inf),
    "lr-neg": ("lr", -0.1),
    "lr-str": ("lr", "0.1"),
    "lr-bool": ("lr", True),
    "lr-none": ("lr", None),
    "lr-list": ("lr", [0.1]),
    "lr-beyond-f32": ("lr", 1e39),
    "lr-complex": ("lr", 0.1j),
    "lr-array": ("lr", np.array([0.1])),
    "lr-huge-int": ("lr", 10**400),
    "betas-short": ("betas", (0.9,)),
    "betas-long": ("betas", (0.9, 0.99, 0.5)),
    "betas-str": ("betas", "ab"),
    "betas-nan": ("betas", (math.nan, 0.999)),
    "betas-above-1": ("betas", (1.5, 0.999)),
    "betas-none": ("betas", None),
    "eps-neg": ("eps", -1e-8),
    "eps-str": ("eps", "1e-8"),
    "weight_decay-neg": ("weight_decay", -1.0),
    "amsgrad-str": ("amsgrad", "yes"),
    "amsgrad-int": ("amsgrad", 2),
    "maximize-str": ("maximize", "False"),
    "maximize-none": ("maximize", None),
    "lr-str-array": ("lr", np.array("0.1")),
    "lr-bytes-array": ("lr", np.array(b"0.1")),
    "lr-object-array": ("lr", np.array(0.1, dtype=object)),
}


@pytest.mark.parametrize(
    "value",
    [np.array("0.1"), np.array(b"0.1"), np.array(0.1, object), np.array("nan")],
    ids=["str", "bytes", "object", "str-nan"],
)
@pytest.mark.parametrize("kind", db.NAMES)
def test_zero_d_non_numeric_arrays_are_not_real_scalars(kind, value):
    """Finding: as_real took any 0-d array with __float__, and float() parses a 0-d string
    array, so lr=np.array("0.1") was accepted (and stored as 0.1)."""
    with pytest.raises(TypeError):
        getattr(ok, kind)([np.ones(2, np.float32)], lr=value)


@pytest.mark.parametrize("case", HYPER)
def test_bad_loaded_hyperparameter_refused(case):
    key, value = HYPER[case]
    check_refused(edit(lambda sd: sd["param_groups"][1].__setitem__(key, value)))


def test_real_scalars_as_loaded_hyperparameters_become_floats():
    opt, params = setup()
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = np.float32(0.25)
    sd["param_groups"][0]["betas"] = (np.array(0.8), np.float64(0.9))
    opt.load_state_dict(sd)
    g = opt.param_groups[0]
    assert type(g["lr"]) is float and all(type(b) is float for b in g["betas"])


# -- nesting (finding: RecursionError instead of ValueError) ----------------------------------------

NESTED = {
    "list-65": deep(65),
    "list-10000": deep(10_000),
    "list-200000": deep(200_000),
    "dict-100": deep_dict(100),
    "dict-50000": deep_dict(50_000),
    "cycle": cyclic(),
}


@pytest.mark.parametrize("case", NESTED)
def test_deeply_nested_group_value_refused(case):
    value = NESTED[case]
    check_refused(
        edit(lambda sd: sd["param_groups"][0].__setitem__("extra", value)),
        ValueError,
        match="levels deep",
    )


@pytest.mark.parametrize("case", NESTED)
def test_deeply_nested_state_value_refused(case):
    value = NESTED[case]
    check_refused(
        edit(lambda sd: sd["state"][0].__setitem__("note", value)), ValueError, match="levels deep"
    )


@pytest.mark.parametrize("case", ["list-65", "list-10000", "dict-100", "cycle"])
def test_deeply_nested_value_refused_by_add_param_group(case):
    opt, params = setup()
    with pytest.raises(ValueError, match="levels deep"):
        opt.add_param_group({"params": [np.ones(2, np.float32)], "extra": NESTED[case]})
    assert len(opt.param_groups) == 2
    opt.state_dict()


def test_nesting_at_the_limit_loads():
    opt, params = setup()
    sd = opt.state_dict()
    sd["param_groups"][0]["extra"] = deep(63)
    opt.load_state_dict(sd)
    assert opt.state_dict()["param_groups"][0]["extra"] == deep(63)


# -- state values ----------------------------------------------------------------------------------

VALUES = {
    "beyond-f32-f64": (lambda: np.full(4, 1e39), ValueError),
    "beyond-f32-neg": (lambda: np.full(4, -1e300), ValueError),
    "beyond-f32-one": (lambda: np.array([0.0, 0.0, 0.0, 3.5e38]), ValueError),
    "beyond-f32-int": (lambda: np.full(4, 2**63 - 1, np.int64) * 0 + np.iinfo(np.int64).max, None),
    "beyond-f32-list": (lambda: [0.0, 0.0, 1e300, 0.0], ValueError),
    "wrong-shape": (lambda: np.ones(5, np.float32), ValueError),
    "wrong-ndim": (lambda: np.ones((4, 1), np.float32), ValueError),
    "scalar": (lambda: 1.0, ValueError),
    "str": (lambda: "zeros", TypeError),
    "complex": (lambda: np.ones(4, np.complex128), TypeError),
    "dict": (lambda: {"a": 1}, TypeError),
    "ragged": (lambda: [[1.0], [1.0, 2.0]], (TypeError, ValueError)),
}


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("case", VALUES)
def test_bad_loaded_state_array_refused(case, name):
    make, exc = VALUES[case]
    if exc is None:  # int64 max fits float32's range (9.2e18): loads
        opt, params = setup()
        sd = opt.state_dict()
        sd["state"][0][name] = make()
        opt.load_state_dict(sd)
        assert np.all(opt.state[params[0]][name] == np.float32(2**63))
        return
    check_refused(edit(lambda sd: sd["state"][0].__setitem__(name, make())), exc)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_state_loads_as_torch_does(value):
    """A NaN or Inf buffer is what a diverged run saved; torch loads it, so does optkern (only
    finite values beyond float32, which would silently become Inf, are refused)."""
    opt, params = setup()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = np.full(4, value)
    opt.load_state_dict(sd)
    assert np.array_equal(
        opt.state[params[0]]["exp_avg"], np.full(4, value, np.float32), equal_nan=True
    )


def test_negative_exp_avg_sq_loads_as_torch_does():
    """Left alone: torch loads a negative exp_avg_sq (and then produces NaN); refusing would
    need a per-rule sign declaration for each buffer."""
    opt, params = setup()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_sq"] = np.full(4, -1.0)
    opt.load_state_dict(sd)
    assert np.all(opt.state[params[0]]["exp_avg_sq"] == -1.0)


STEPS = {
    "bool": True,
    "str": "2",
    "float-frac": 2.5,
    "nan": math.nan,
    "neg": -1,
    "huge": 2**64,
    "list": [2],
    "none-needed": None,
    "complex": 2j,
    "bytes": b"2",
}


@pytest.mark.parametrize("case", STEPS)
def test_bad_loaded_step_refused(case):
    value = STEPS[case]
    check_refused(edit(lambda sd: sd["state"][1].__setitem__("step", value)))


@pytest.mark.parametrize("case", ["bool", "str", "neg", "float-frac", "huge"])
def test_bad_step_count_refused(case):
    value = STEPS[case]
    check_refused(edit(lambda sd: sd.__setitem__("step_count", value)))


@pytest.mark.parametrize("case", ["bool", "str", "neg"])
def test_bad_skipped_steps_refused(case):
    value = STEPS[case]
    check_refused(edit(lambda sd: sd.__setitem__("skipped_steps", value)))


@pytest.mark.parametrize("kind", [n for n in db.NAMES if n != "Adam"])
def test_state_dict_of_another_optimizer_refused(kind):
    other, _ = setup(kind)
    sd = other.state_dict()
    opt, params = setup("Adam", amsgrad=True)
    before = digest([params, opt.state_dict()])
    try:
        opt.load_state_dict(sd)
    except (TypeError, ValueError):
        assert digest([params, opt.state_dict()]) == before
    else:  # the other's hyperparameters and state happen to fit Adam's (extra keys kept)
        opt.step([np.ones(4, np.float32), np.ones(3, np.float32), np.ones((2, 2), np.float32)])


def test_extra_keys_kept_like_torch():
    opt, params = setup()
    sd = opt.state_dict()
    sd["param_groups"][0]["my_note"] = {"epoch": 3}
    sd["state"][0]["my_counter"] = 7
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["my_note"] == {"epoch": 3} and opt.state[params[0]]["my_counter"] == 7


def test_loaded_dict_is_copied_not_kept():
    opt, params = setup()
    sd = opt.state_dict()
    keep = copy.deepcopy(sd)
    opt.load_state_dict(sd)
    sd["state"][0]["exp_avg"][...] = 99.0
    sd["param_groups"][0]["lr"] = 5.0
    assert digest([opt.state_dict()["state"]]) == digest([keep["state"]])
    assert opt.param_groups[0]["lr"] == keep["param_groups"][0]["lr"]


# -- the step_count setter (finding: int() of anything) ----------------------------------------------


@pytest.mark.parametrize(
    "value, exc",
    [
        ("3", TypeError),
        (3.7, ValueError),
        (True, TypeError),
        (-5, ValueError),
        (2**70, ValueError),
        (2**53 + 1, ValueError),
        (math.nan, ValueError),
        (None, TypeError),
        ([3], TypeError),
    ],
    ids=["str", "fraction", "bool", "negative", "2**70", "2**53+1", "nan", "None", "list"],
)
def test_step_count_setter_refuses_what_a_load_refuses(value, exc):
    """Regression: ``opt.step_count = "3"`` (or 3.7, True, -5, 2**70) was stored as int(value)
    and the next step ran with that count."""
    opt, params = setup()
    with pytest.raises(exc):
        opt.step_count = value
    assert opt.step_count == 2


@pytest.mark.parametrize("value", [0, 7, np.int64(7), 7.0, 2**53])
def test_step_count_setter_takes_whole_numbers(value):
    opt, params = setup()
    opt.step_count = value
    assert opt.step_count == int(value) and type(opt.step_count) is int


# -- state set by hand (findings: junk reached the step as AttributeError or a wrong count) ------


@pytest.mark.parametrize(
    "state, exc",
    [
        ("junk", TypeError),
        (None, TypeError),
        ([1], TypeError),
        ({"step": True}, TypeError),
        ({"step": "3"}, TypeError),
        ({"step": 2**63}, ValueError),
        ({"step": -1}, ValueError),
        ({"step": 1.5}, ValueError),
    ],
    ids=["str", "None", "list", "step-True", "step-str", "step-2**63", "step-neg", "step-fraction"],
)
def test_state_set_by_hand_is_checked_when_set(state, exc):
    """Regression: ``opt.state[p] = "junk"`` made the next step raise AttributeError, and a
    step count of True was taken as 1 (True + 1 == 2)."""
    opt, params = setup()
    before = digest([params, opt.state_dict()])
    with pytest.raises(exc):
        opt.state[params[0]] = state
    assert digest([params, opt.state_dict()]) == before


@pytest.mark.parametrize("step", [np.int64(4), np.array(4), 4.0])
def test_state_set_by_hand_with_a_numpy_step_is_normalised(step):
    opt, params = setup()
    s = dict(opt.state[params[0]], step=step)
    opt.state[params[0]] = s
    assert type(opt.state[params[0]]["step"]) is int
    opt.step([np.ones(4, np.float32), np.ones(3, np.float32), np.ones((2, 2), np.float32)])
    assert opt.state[params[0]]["step"] == 5


@pytest.mark.parametrize("junk", ["abc", [1, 2, 3], [None, None, None]], ids=["str", "ints", "None"])
def test_group_params_replaced_by_junk_is_a_typeerror(junk):
    opt, params = setup()
    opt.param_groups[0]["params"] = junk
    before = digest([params, opt.state_dict()["state"]])
    with pytest.raises(TypeError):
        opt.step([np.ones(1, np.float32)] * (len(junk) + 1))
    assert digest([params, opt.state_dict()["state"]]) == before
