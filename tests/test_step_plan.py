"""The kept step plan (``_core.StepPlan``, see optimizer.step): a step that reuses what the last
whole step validated gives bit for bit what the whole path gives, re-validates what changed
(a hyperparameter written into a group, a state entry replaced, an array reshaped or made
read-only, new gradients), and hands every other case to the whole path, which raises the same
errors and changes nothing."""

import copy
import pickle

import numpy as np
import optim_db as db
import pytest
from helpers import bits, step_from_threads

import optkern as ok

SHAPES = [(6, 5), (5,), (5, 3), (3,)]
# Element types: parameters' and gradients' (see the tests at the end).
F32, F64 = np.float32, np.float64
MIXED = (F64, F32, F32, F64)
LAYOUTS = {
    "float32": ((F32,) * 4, (F32,) * 4),
    "float64": ((F64,) * 4, (F64,) * 4),
    "mixed": (MIXED, MIXED),
    "crossed": (MIXED, tuple(F32 if t is F64 else F64 for t in MIXED)),
}

# Every class with every state buffer it can keep (optim_db's attack sets), and every reference
# case (the options that change which branch a kernel takes).
CONFIGS = db.attack_cases() + db.CASES
IDS = [db.case_id(c) + f"-{i}" for i, c in enumerate(CONFIGS)]


def arrays(seed, scale=1.0, dtypes=(np.float32,) * len(SHAPES)):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(t) for s, t in zip(SHAPES, dtypes)]


def build(name, hp, seed=0, dtypes=(np.float32,) * len(SHAPES)):
    params = arrays(seed, dtypes=dtypes)
    return getattr(ok, name)(params, **hp), params


def whole_path_only(opt):
    """Every step of opt goes the whole way (no plan is ever kept)."""
    opt._make_plan = lambda *a, **k: None
    return opt


def snapshot(opt, params):
    out = [bits(p) for p in params]
    for p in params:
        s = opt.state.get_by_id(p) or {}
        out += [(k, bits(v) if isinstance(v, np.ndarray) else repr(v)) for k, v in sorted(s.items())]
    return out + [opt.step_count]


def count_whole_steps(monkeypatch, opt):
    calls = []
    real = opt._plan
    monkeypatch.setattr(opt, "_plan", lambda grads: (calls.append(1), real(grads))[1])
    return calls


@pytest.mark.parametrize("name, hp", CONFIGS, ids=IDS)
def test_kept_plan_matches_the_whole_path(name, hp, monkeypatch):
    a, pa = build(name, hp)
    b, pb = build(name, hp)
    whole_path_only(b)
    whole = count_whole_steps(monkeypatch, a)
    lr = a.param_groups[0]["lr"]
    for t in range(8):
        g = arrays(100 + t, 0.1)
        if t in (3, 5):  # a new float written into the group, as a schedule does
            for opt in (a, b):
                opt.param_groups[0]["lr"] = lr * (0.5 + 0.1 * t)
        a.step(g)
        b.step([x.copy() for x in g])
        assert snapshot(a, pa) == snapshot(b, pb), t
    assert len(whole) == 1, "steps after the first should take the kept plan"


def test_every_hyperparameter_write_is_validated_and_used(monkeypatch):
    a, pa = build("Adam", dict(lr=1e-2))
    b, pb = build("Adam", dict(lr=1e-2))
    whole_path_only(b)
    whole = count_whole_steps(monkeypatch, a)
    changes = [
        ("betas", (0.8, 0.99)),
        ("eps", 1e-6),
        ("weight_decay", 0.1),
        ("maximize", True),
        ("maximize", False),
        ("lr", 3e-3),
    ]
    for key, value in changes:
        for opt in (a, b):
            opt.param_groups[0][key] = value
        g = arrays(7, 0.1)
        a.step(g)
        b.step(g)
        assert snapshot(a, pa) == snapshot(b, pb), key
    assert len(whole) == 1


@pytest.mark.parametrize(
    "key, value, error",
    [
        ("lr", -1.0, "lr must be >= 0"),
        ("lr", float("nan"), "lr must be finite"),
        ("betas", (0.9, 1.5), "beta2 must be in"),
        ("eps", "x", "eps must be a real number"),
        ("maximize", 1.0, "maximize must be a bool"),
    ],
)
def test_a_bad_value_written_between_steps_raises_and_changes_nothing(key, value, error):
    opt, params = build("Adam", dict(lr=1e-2))
    opt.step(arrays(1))
    opt.step(arrays(2))
    assert opt._step_plan is not None
    before = snapshot(opt, params)
    opt.param_groups[0][key] = value
    with pytest.raises((TypeError, ValueError), match=error):
        opt.step(arrays(3))
    assert snapshot(opt, params) == before
    opt.param_groups[0][key] = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}.get(key, False)
    opt.step(arrays(3))
    assert opt.step_count == 3


def test_numpy_scalars_and_ints_are_stored_as_floats():
    opt, _ = build("SGD", dict(lr=0.1, momentum=0.9))
    for value in (np.float64(0.05), np.float32(0.25), 1):
        opt.param_groups[0]["lr"] = value
        opt.step(arrays(4))
        assert type(opt.param_groups[0]["lr"]) is float and opt.param_groups[0]["lr"] == value


def test_a_float_lr_write_keeps_the_plan(monkeypatch):
    opt, _ = build("SGD", dict(lr=0.1))
    opt.step(arrays(1))
    plan = opt._step_plan
    whole = count_whole_steps(monkeypatch, opt)
    for t in range(20):
        opt.param_groups[0]["lr"] = 0.1 / (1 + t)
        opt.step(arrays(t))
    assert whole == [] and opt._step_plan is plan


@pytest.mark.parametrize(
    "change",
    [
        "amsgrad",  # a state to make
        "state_array",  # a state entry replaced
        "state_step",  # a step count written
        "param_in_list",  # a parameter replaced in its group's list
        "params_list",  # the group's list replaced
        "state_dict_entry",  # opt.state[p] replaced
        "add_group",
        "load_state_dict",
        "state_cleared",  # opt.state[p] emptied in place
        "param_appended",  # the group's list grows
        "counter",  # step_count set
    ],
)
def test_changes_between_steps_match_the_whole_path(change):
    a, pa = build("Adam", dict(lr=1e-2))
    b, pb = build("Adam", dict(lr=1e-2))
    whole_path_only(b)
    for opt, params in ((a, pa), (b, pb)):
        opt.step(arrays(1))
        opt.step(arrays(2))
        group = opt.param_groups[0]
        if change == "amsgrad":
            group["amsgrad"] = True
        elif change == "state_array":
            opt.state[params[0]]["exp_avg"] = np.full(SHAPES[0], 0.5, np.float32)
        elif change == "state_step":
            opt.state[params[1]]["step"] = 40
        elif change == "param_in_list":
            group["params"][2] = params[2] = np.ones(SHAPES[2], np.float32)
        elif change == "params_list":
            group["params"] = list(group["params"])
        elif change == "state_dict_entry":
            opt.state[params[3]] = {k: copy.deepcopy(v) for k, v in opt.state[params[3]].items()}
        elif change == "add_group":
            params.append(np.ones(4, np.float32))
            opt.add_param_group({"params": [params[-1]], "lr": 0.1})
        elif change == "load_state_dict":
            opt.load_state_dict(opt.state_dict())
        elif change == "state_cleared":
            opt.state[params[2]].clear()
        elif change == "param_appended":
            params.append(np.ones(4, np.float32))
            group["params"].append(params[-1])
        elif change == "counter":
            opt.step_count = 7
    grow = change in ("add_group", "param_appended")
    extra = [np.full(4, 0.3, np.float32)] if grow else []
    for t in range(3):
        g = arrays(10 + t) + extra
        a.step(g)
        b.step(g)
        assert snapshot(a, pa) == snapshot(b, pb), (change, t)
    assert a._step_plan is not None


def test_arrays_changed_in_place_are_checked_again():
    opt, params = build("Adam", dict(lr=1e-2))
    opt.step(arrays(1))
    opt.step(arrays(2))
    before = snapshot(opt, params)
    params[0].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        opt.step(arrays(3))
    assert snapshot(opt, params) == before
    params[0].flags.writeable = True
    params[0].shape = (5, 6)  # same memory, another shape
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(6, 5\) but params\[0\]"):
        opt.step(arrays(3))
    params[0].shape = (6, 5)
    opt.state[params[1]]["exp_avg_sq"].shape = (5, 1)
    with pytest.raises(ValueError, match="exp_avg_sqs"):
        opt.step(arrays(3))
    assert snapshot(opt, params) == before
    opt.state[params[1]]["exp_avg_sq"].shape = (5,)
    opt.step(arrays(3))
    assert opt.step_count == 3


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda g, p: g[:3], ValueError),
        (lambda g, p: [g[0].astype(np.longdouble)] + g[1:], TypeError),
        (lambda g, p: [g[0].astype(np.dtype(np.float64).newbyteorder())] + g[1:], TypeError),
        (lambda g, p: [g[0].astype(np.float64).view(np.int64)] + g[1:], TypeError),
        (lambda g, p: [g[0].T] + g[1:], ValueError),
        (lambda g, p: [np.asfortranarray(g[0])] + g[1:], ValueError),
        (lambda g, p: [p[0]] + g[1:], ValueError),  # the parameter itself
        (lambda g, p: g[:1] + [p[0][0]] + g[2:], ValueError),  # a view into a parameter
        (lambda g, p: [np.ma.masked_array(g[0])] + g[1:], TypeError),
        (lambda g, p: tuple(g[:3]) + ("x",), TypeError),
        (lambda g, p: np.stack([g[1], g[1]]), TypeError),
    ],
)
def test_bad_gradients_raise_as_before_and_change_nothing(bad, error):
    opt, params = build("Adam", dict(lr=1e-2))
    opt.step(arrays(1))
    opt.step(arrays(2))
    before = snapshot(opt, params)
    g = arrays(3)
    with pytest.raises(error):
        opt.step(bad(g, params))
    assert snapshot(opt, params) == before


def test_a_state_a_gradient_overlaps_is_refused():
    opt, params = build("Adam", dict(lr=1e-2))
    opt.step(arrays(1))
    opt.step(arrays(2))
    before = snapshot(opt, params)
    g = arrays(3)
    g[1] = opt.state[params[1]]["exp_avg"]
    with pytest.raises(ValueError, match="shares memory"):
        opt.step(g)
    assert snapshot(opt, params) == before


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0, 10.0])
@pytest.mark.parametrize("layout", ["float32", "float64", "mixed", "crossed"])
def test_clipping_and_skipping_in_the_kept_plan(norm_type, layout, monkeypatch):
    ptypes, gtypes = LAYOUTS[layout]
    a, pa = build("Adam", dict(lr=1e-2), dtypes=ptypes)
    b, pb = build("Adam", dict(lr=1e-2), dtypes=ptypes)
    whole_path_only(b)
    whole = count_whole_steps(monkeypatch, a)
    cases = [
        (dict(max_grad_norm=1.0), 100.0),  # clipped
        (dict(max_grad_norm=1e6), 1.0),  # not clipped
        (dict(max_grad_norm=0.0), 1.0),  # every update zero
        (dict(skip_if_nonfinite=True), 1.0),
        (dict(skip_if_nonfinite=True, max_grad_norm=0.5), float("nan")),  # skipped
        (dict(skip_if_nonfinite=True), float("inf")),  # skipped
        # finite values whose 10-norm overflows: not skipped (the 2-norm is finite)
        (dict(skip_if_nonfinite=True, max_grad_norm=1.0), 1e36),
        (dict(max_grad_norm=1.0), float("nan")),  # not skipped: NaN everywhere, as in torch
    ]
    for kwargs, scale in cases:
        g = arrays(5, 0.1, gtypes)
        g[1][0] = scale if not np.isfinite(scale) else g[1][0]
        if np.isfinite(scale):
            g = [x * np.float32(scale) for x in g]
        ra = a.step(g, norm_type=norm_type, **kwargs)
        rb = b.step([x.copy() for x in g], norm_type=norm_type, **kwargs)
        assert type(ra) is float and (ra == rb or (np.isnan(ra) and np.isnan(rb))), kwargs
        assert a.skipped_steps == b.skipped_steps
        assert snapshot(a, pa) == snapshot(b, pb), kwargs
    assert len(whole) == 1 and a.skipped_steps == 2


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(max_grad_norm=-1.0), "max_grad_norm must be >= 0"),
        (dict(max_grad_norm=1.0, norm_type=0), "norm_type must be > 0"),
        (dict(skip_if_nonfinite=True, norm_type="x"), "norm_type must be a number"),
    ],
)
def test_bad_options_raise_as_before(kwargs, error):
    opt, params = build("Adam", dict(lr=1e-2))
    opt.step(arrays(1))
    before = snapshot(opt, params)
    with pytest.raises((TypeError, ValueError), match=error):
        opt.step(arrays(2), **kwargs)
    with pytest.raises(ValueError, match="step\\(\\) got 3 gradients"):
        opt.step(arrays(2)[:3], **kwargs)  # the gradients' count is checked first, as before
    assert snapshot(opt, params) == before


def test_none_gradients_and_options_take_the_whole_path_and_keep_the_plan():
    a, pa = build("Adam", dict(lr=1e-2))
    b, pb = build("Adam", dict(lr=1e-2))
    whole_path_only(b)
    for opt in (a, b):
        opt.step(arrays(1))
        opt.step(arrays(2))
        opt.step([None] + arrays(3)[1:])
        assert opt.step([x * 100 for x in arrays(4)], max_grad_norm=1.0) > 1.0
        opt.step(arrays(5), skip_if_nonfinite=True)
        opt.step(arrays(6))
    assert snapshot(a, pa) == snapshot(b, pb)
    assert a._step_plan is not None


def test_a_callable_lr_is_evaluated_once_per_step_and_keeps_the_plan(monkeypatch):
    seen = []
    a, pa = build("SGD", dict(lr=lambda step: seen.append(step) or 0.1 / step, momentum=0.9))
    b, pb = build("SGD", dict(lr=lambda step: 0.1 / step, momentum=0.9))
    whole_path_only(b)
    a.step(arrays(0))
    b.step(arrays(0))
    plan = a._step_plan
    for t in range(1, 4):
        a.step(arrays(t))
        b.step(arrays(t))
    assert seen == [1, 2, 3, 4] and a._step_plan is plan  # the whole path, the plan kept
    a.param_groups[0]["lr"] = b.param_groups[0]["lr"] = 0.01  # a float again: the plan
    whole = count_whole_steps(monkeypatch, a)
    for t in range(4, 7):
        a.step(arrays(t))
        b.step(arrays(t))
    assert whole == []  # the plan reads the new float itself
    assert snapshot(a, pa) == snapshot(b, pb)


def test_a_callable_lr_still_gets_stale_warnings():
    model = {"W": np.ones((3, 2), np.float32)}
    opt = ok.Adam(list(model.values()), lr=lambda step: 1e-2)
    g = [np.full((3, 2), 0.1, np.float32)]
    opt.step(g)
    opt.step(g)
    model.clear()
    with pytest.warns(ok.StaleParameterWarning):
        opt.step(g)


def test_a_step_with_none_gradients_keeps_the_plan():
    opt, params = build("Adam", dict(lr=1e-2))
    opt.step(arrays(1))
    plan = opt._step_plan
    opt.step([None] + arrays(2)[1:])
    assert opt._step_plan is plan
    opt.step(arrays(3))
    assert opt.state[params[0]]["step"] == 2 and opt.state[params[1]]["step"] == 3


def test_threads_stepping_one_optimizer_take_whole_steps():
    opt, params = build("Adam", dict(lr=1e-3))
    ref, ref_params = build("Adam", dict(lr=1e-3))
    g = arrays(9)
    n = 300
    for _ in range(4 * n):
        ref.step(g)
    step_from_threads(opt, g, threads=4, steps=n)
    assert opt.step_count == 4 * n and opt.state[params[0]]["step"] == 4 * n
    assert snapshot(opt, params) == snapshot(ref, ref_params)


def test_copies_start_without_a_plan_and_step_alike():
    opt, params = build("Adam", dict(lr=1e-2))
    opt.step(arrays(1))
    opt.step(arrays(2))
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other._step_plan is None
        mine = other.param_groups[0]["params"]
        other.step(arrays(3))
        other.step(arrays(4))
        assert other._step_plan is not None
    opt.step(arrays(3))
    opt.step(arrays(4))
    assert [bits(p) for p in mine] == [bits(p) for p in params]


def test_setting_isa_drops_the_plan():
    opt, params = build("Adam", dict(lr=1e-2))
    opt.step(arrays(1))
    assert opt._step_plan is not None
    opt._isa = ok.available_isas()[0]
    assert opt._step_plan is None
    opt.step(arrays(2))
    assert opt._step_plan is not None


def test_python_code_run_by_a_lookup_may_step_again():
    """A group key whose __eq__ runs Python code (it collides with "lr" in the dict's hash
    table) and steps the optimizer from inside the plan's step: the inner step takes the whole
    path, and both steps happen, whole."""
    opt, params = build("Adam", dict(lr=1e-2))
    ref, ref_params = build("Adam", dict(lr=1e-2))
    g = arrays(3)

    class Evil:
        armed = False

        def __hash__(self):
            return hash("lr")

        def __eq__(self, other):
            if Evil.armed:
                Evil.armed = False
                opt.step(g)
            return False

    group = opt.param_groups[0]
    lr = group.pop("lr")
    group[Evil()] = 0  # probed before "lr" from now on
    group["lr"] = lr
    opt.step(g)
    assert opt._step_plan is not None
    Evil.armed = True
    opt.step(g)  # the plan's lookup of "lr" runs Evil.__eq__, which steps once more
    assert not Evil.armed
    for _ in range(3):
        ref.step(g)
    assert opt.step_count == 3
    assert snapshot(opt, params) == snapshot(ref, ref_params)


# Element types: the plan's kernels are chosen per (parameter, gradient) type by the step that
# made it; a float64 group, a group mixing both types and gradients of the other type keep a
# plan, and any change of type (a gradient's, a parameter's or a state's) is checked again.


@pytest.mark.parametrize("layout", ["float64", "mixed", "crossed"])
@pytest.mark.parametrize("name, hp", CONFIGS, ids=IDS)
def test_kept_plan_in_float64_and_mixed_groups_matches_the_whole_path(name, hp, layout, monkeypatch):
    ptypes, gtypes = LAYOUTS[layout]
    a, pa = build(name, hp, dtypes=ptypes)
    b, pb = build(name, hp, dtypes=ptypes)
    whole_path_only(b)
    whole = count_whole_steps(monkeypatch, a)
    lr = a.param_groups[0]["lr"]
    for t in range(6):
        g = arrays(100 + t, 0.1, gtypes)
        if t == 3:
            for opt in (a, b):
                opt.param_groups[0]["lr"] = lr * 0.7
        a.step(g)
        b.step([x.copy() for x in g])
        assert snapshot(a, pa) == snapshot(b, pb), t
    assert [p.dtype for p in pa] == list(map(np.dtype, ptypes))
    assert len(whole) == 1, "steps after the first should take the kept plan"


def test_a_gradient_of_another_type_is_checked_again(monkeypatch):
    """The plan made with one set of gradient types hands a step with other types to the whole
    path (whose kernels convert them), which makes a plan for those; bit for bit throughout."""
    crossed = LAYOUTS["crossed"][1]
    a, pa = build("Adam", dict(lr=1e-2), dtypes=MIXED)
    b, pb = build("Adam", dict(lr=1e-2), dtypes=MIXED)
    whole_path_only(b)
    whole = []
    real = a._plan
    monkeypatch.setattr(a, "_plan", lambda grads: (whole.append(t), real(grads))[1])
    kinds = [MIXED, MIXED, crossed, crossed, MIXED, (F64,) * 4, (F64,) * 4, MIXED]
    for t, gtypes in enumerate(kinds):
        g = arrays(t, 0.1, gtypes)
        a.step(g)
        b.step(g)
        assert snapshot(a, pa) == snapshot(b, pb), t
        assert all(x.dtype == y for x, y in zip(pa, MIXED))
    assert whole == [0, 2, 4, 5, 7]


def _same_outcome(a, pa, b, pb, g):
    """a.step(g) and b.step(g) raise the same error, or none, and leave the same state."""
    errors = []
    for opt in (a, b):
        try:
            opt.step(g)
            errors.append(None)
        except (TypeError, ValueError) as e:
            errors.append((type(e), str(e)))
    assert errors[0] == errors[1]
    assert snapshot(a, pa) == snapshot(b, pb)
    return errors[0]


@pytest.mark.parametrize("dtypes", [(F32,) * 4, (F64,) * 4, MIXED], ids=["f32", "f64", "mixed"])
def test_a_type_changed_in_place_is_checked_again(dtypes):
    """A parameter or state array whose dtype is changed in place (same memory, another type),
    or a state array replaced by one of the other type: the same error as the whole path, then
    steps go on once it is undone."""
    a, pa = build("Adam", dict(lr=1e-2), dtypes=dtypes)
    b, pb = build("Adam", dict(lr=1e-2), dtypes=dtypes)
    whole_path_only(b)
    for t in range(2):
        g = arrays(t, 0.1, dtypes)
        a.step(g)
        b.step(g)
    assert a._step_plan is not None
    g = arrays(5, 0.1, dtypes)
    same = np.int32 if dtypes[0] is F32 else np.int64
    for opt_params in (pa, pb):
        opt_params[0].dtype = same  # same itemsize, same shape
    assert _same_outcome(a, pa, b, pb, g)[0] is TypeError
    for opt_params in (pa, pb):
        opt_params[0].dtype = dtypes[0]
    other = F64 if dtypes[1] is F32 else F32
    for opt, params in ((a, pa), (b, pb)):
        s = opt.state[params[1]]
        s["exp_avg"] = s["exp_avg"].astype(other)
    assert _same_outcome(a, pa, b, pb, g)[0] is TypeError
    for opt, params in ((a, pa), (b, pb)):
        s = opt.state[params[1]]
        s["exp_avg"] = s["exp_avg"].astype(dtypes[1])
    assert _same_outcome(a, pa, b, pb, g) is None
    assert _same_outcome(a, pa, b, pb, arrays(6, 0.1, dtypes)) is None
    assert a._step_plan is not None and a.step_count == 4
