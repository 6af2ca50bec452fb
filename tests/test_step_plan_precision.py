"""The kept step plan under the precision options (state_dtype "bfloat16" and "int8", master
weights, stochastic rounding): later steps take the plan, bit for bit as the whole path (the
parameters, each state's codes and absmax, the master copies, the step counts), on every ISA
and thread count; whatever makes the float32 plan hand a step to the whole path does so here
too, and so does a change to what only these options keep (an absmax array, a master copy)."""

import copy
import warnings

import numpy as np
import pytest
from helpers import bits, step_from_threads
from test_step_plan import count_whole_steps, snapshot, whole_path_only

import optkern as ok

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
ISAS = ok.available_isas()

# Two groups (the second's positions start after the first's: stochastic rounding's noise is
# keyed by a parameter's position), arrays over several int8 blocks of 256, and small ones.
SHAPES = [[(1000,), (37, 23)], [(5,), (3, 129)]]

# (parameter dtype, precision options)
PRECISIONS = {
    "bf16-state": (F32, dict(state_dtype="bfloat16")),
    "int8-state": (F32, dict(state_dtype="int8")),
    "master": (BF16, dict(master_weights=True)),
    "stochastic": (BF16, dict(stochastic_rounding=True)),
    "f16-stochastic-bf16-state": (F16, dict(stochastic_rounding=True, state_dtype="bfloat16")),
    "bf16-master-int8-state": (BF16, dict(master_weights=True, state_dtype="int8")),
}
RULES = {
    "Adam": dict(lr=1e-2, amsgrad=True),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Lion": dict(lr=1e-3),
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True),
    "RMSprop": dict(lr=1e-2, momentum=0.9, centered=True),
    "Adagrad": dict(lr=0.1),
    "LAMB": dict(lr=1e-2),  # bfloat16 state only (a norm pass): int8 refused
    "ASGD": dict(lr=1e-2),  # bfloat16 state only (an average of the parameter)
}


def takes(name, precision):
    """Whether the rule takes the precision options (int8 needs every state 8-bit able)."""
    _, options = PRECISIONS[precision]
    if options.get("state_dtype") == "int8":
        return all(s.int8 for s in getattr(ok, name)._rule.states)
    return True


CASES = [(n, p) for n in RULES for p in PRECISIONS if takes(n, p)]


def arrays(seed, scale=1.0, dtype=F32):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(dtype) for shapes in SHAPES for s in shapes]


def build(name, precision, seed=0, hp=None):
    dtype, options = PRECISIONS[precision]
    params = arrays(seed, 0.5, dtype)
    hp = dict(RULES[name] if hp is None else hp)
    groups = [
        {"params": params[: len(SHAPES[0])]},
        {"params": params[len(SHAPES[0]) :], "lr": hp["lr"] * 0.5},
    ]
    return getattr(ok, name)(groups, **hp, **options), params


def grads(t, scale=0.1):
    return arrays(100 + t, scale)


def pair(name, precision, monkeypatch, hp=None):
    """An optimizer whose steps after the first should take the plan (and the list of its steps
    that went the whole way), and a twin whose every step goes the whole way."""
    a, pa = build(name, precision, hp=hp)
    b, pb = build(name, precision, hp=hp)
    whole_path_only(b)
    return a, pa, b, pb, count_whole_steps(monkeypatch, a)


def split_threads(threads):
    ok.set_num_threads(threads)
    ok._core._testing.set_min_elements_per_thread(64)  # every array above splits on 2 threads


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name, precision", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_kept_plan_matches_the_whole_path(name, precision, threads, isa, monkeypatch):
    split_threads(threads)
    a, pa, b, pb, whole = pair(name, precision, monkeypatch)
    a._isa = b._isa = isa
    lr = a.param_groups[0]["lr"]
    for t in range(8):
        g = grads(t)
        if t in (3, 5):  # a new float written into the group, as a schedule does
            for opt in (a, b):
                opt.param_groups[0]["lr"] = lr * (0.5 + 0.1 * t)
        a.step(g)
        b.step([x.copy() for x in g])
        assert snapshot(a, pa) == snapshot(b, pb), t
    assert len(whole) == 1, "steps after the first should take the kept plan"
    assert a._step_plan is not None
    state = a.state[pa[0]]
    dtype, options = PRECISIONS[precision]
    assert pa[0].dtype == dtype
    assert ("master_param" in state) == options.get("master_weights", False)
    assert any(k.endswith("_absmax") for k in state) == (options.get("state_dtype") == "int8")


def test_stochastic_rounding_in_the_plan_draws_anew_each_step(monkeypatch):
    """bfloat16 weights near 1 with SGD steps far below their spacing: the plan's steps move
    them (each step's noise keyed by its number), as the whole path's do, and differently at
    each step (the same key every step would round the same elements down each time)."""
    ps = [np.ones(4096, BF16)]
    opt = ok.SGD(ps, lr=1e-3, stochastic_rounding=True)
    whole = count_whole_steps(monkeypatch, opt)
    seen = []
    for _ in range(6):
        opt.step([np.ones(4096, np.float32)])
        seen.append(ps[0].astype(np.float32))
    assert len(whole) == 1
    moved = [np.flatnonzero(seen[t] != seen[t - 1]) for t in range(2, 6)]
    assert all(len(m) > 0 for m in moved)
    assert len({m.tobytes() for m in moved}) == len(moved)


# -- what makes the plan hand a step to the whole path ------------------------------------------


def first_param_state(opt, params, key):
    return opt.state[params[0]][key]


CHANGES = {
    # (the change, the precisions it applies to: None for all)
    "lr": None,  # a new value written into a group
    "betas": None,
    "state_array": None,  # a state entry replaced (the same values, a new array)
    "state_as_float32": None,  # a state replaced by float32 values (the whole path refuses it)
    "absmax_array": ("int8-state", "bf16-master-int8-state"),
    "absmax_deleted": ("int8-state", "bf16-master-int8-state"),
    "absmax_changed_in_place": ("int8-state", "bf16-master-int8-state"),
    "master_array": ("master", "bf16-master-int8-state"),
    "master_deleted": ("master", "bf16-master-int8-state"),
    "param_dtype_in_place": ("master", "stochastic", "bf16-master-int8-state"),
    "state_dtype_in_place": ("bf16-state", "int8-state", "f16-stochastic-bf16-state"),
    "state_step": None,
    "param_in_list": None,
    "params_list": None,
    "state_dict_entry": None,
    "add_group": None,
    "load_state_dict": None,
    "state_cleared": None,
    "param_appended": None,
    "counter": None,  # step_count set: stochastic rounding's next key
}
CHANGE_CASES = [
    (c, p) for c, only in CHANGES.items() for p in PRECISIONS if only is None or p in only
]


def apply_change(change, opt, params, precision):
    dtype, _ = PRECISIONS[precision]
    group = opt.param_groups[0]
    state = opt.state[params[0]]
    first = "exp_avg"  # Adam's first state
    if change == "lr":
        group["lr"] = 3e-3
    elif change == "betas":
        group["betas"] = (0.8, 0.99)
    elif change == "state_array":
        state[first] = state[first].copy()
    elif change == "state_as_float32":
        state[first] = np.zeros(params[0].shape, np.float32)
    elif change == "absmax_array":
        state[first + "_absmax"] = state[first + "_absmax"].copy()
    elif change == "absmax_deleted":
        del state[first + "_absmax"]
    elif change == "absmax_changed_in_place":
        state[first + "_absmax"][...] *= np.float32(2.0)
    elif change == "master_array":
        state["master_param"] = state["master_param"] + np.float32(0.25)
    elif change == "master_deleted":
        del state["master_param"]
    elif change == "param_dtype_in_place":  # the same memory, the other 16-bit type
        params[1].dtype = F16 if dtype == BF16 else BF16
    elif change == "state_dtype_in_place":  # the same memory as a type no state takes
        state[first].dtype = np.int8 if state[first].dtype == np.uint8 else F16
    elif change == "state_step":
        opt.state[params[1]]["step"] = 40
    elif change == "param_in_list":
        group["params"][1] = params[1] = np.ones(params[1].shape, dtype)
    elif change == "params_list":
        group["params"] = list(group["params"])
    elif change == "state_dict_entry":
        opt.state[params[0]] = {k: copy.deepcopy(v) for k, v in state.items()}
    elif change == "add_group":
        params.append(np.ones(300, dtype))
        opt.add_param_group({"params": [params[-1]], "lr": 0.1})
    elif change == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
    elif change == "state_cleared":
        opt.state[params[2]].clear()
    elif change == "param_appended":
        params.append(np.ones(300, dtype))
        opt.param_groups[-1]["params"].append(params[-1])  # the last: gradients stay in order
    elif change == "counter":
        opt.step_count = 7


def outcome(opt, g):
    try:
        opt.step(g)
        return None
    except (TypeError, ValueError) as e:
        return type(e), str(e)


@pytest.mark.parametrize("change, precision", CHANGE_CASES, ids=[f"{c}-{p}" for c, p in CHANGE_CASES])
def test_changes_between_steps_match_the_whole_path(change, precision, monkeypatch):
    a, pa, b, pb, whole = pair("Adam", precision, monkeypatch, hp=dict(lr=1e-2))
    for opt in (a, b):
        opt.step(grads(1))
        opt.step(grads(2))
    assert len(whole) == 1 and a._step_plan is not None
    for opt, params in ((a, pa), (b, pb)):
        apply_change(change, opt, params, precision)
    grow = change in ("add_group", "param_appended")
    extra = [np.full(300, 0.3, np.float32)] if grow else []
    results = []
    for t in range(3):
        g = grads(10 + t) + extra
        results.append(outcome(a, g))
        assert outcome(b, [x.copy() for x in g]) == results[-1], (change, t)
        assert snapshot(a, pa) == snapshot(b, pb), (change, t)
    low_state = PRECISIONS[precision][1].get("state_dtype") is not None
    refused = ("absmax_deleted", "state_dtype_in_place")
    if change in refused or (change == "state_as_float32" and low_state):
        assert all(r is not None for r in results)  # refused alike, nothing changed
    else:
        assert results == [None] * 3
        assert a._step_plan is not None
        # the first step after the change went the whole way (and made a new plan) unless the
        # plan follows the change itself: a new value, data written in place, the counter
        follows = change in ("lr", "betas", "absmax_changed_in_place", "counter", "state_step")
        assert len(whole) == (1 if follows else 2), whole


@pytest.mark.parametrize("precision", ["int8-state", "master", "bf16-master-int8-state"])
def test_a_gradient_overlapping_an_absmax_or_a_master_copy_is_refused(precision):
    """The absmax arrays and master copies are buffers the step writes: a gradient sharing
    memory with one is refused by the plan as by the whole path, and nothing changes."""
    dtype, options = PRECISIONS[precision]
    params = [np.full(3, 0.5, dtype), np.full(1, 0.5, dtype)]
    opt = ok.Adam(params, lr=1e-2, **options)
    g = [np.full(3, 0.1, np.float32), np.full(1, 0.1, np.float32)]
    opt.step(g)
    opt.step(g)
    assert opt._step_plan is not None
    before = snapshot(opt, params)
    state = opt.state[params[0]]
    key = "exp_avg_absmax" if options.get("state_dtype") == "int8" else "master_param"
    written = state[key][:1]  # a float32 view of one element of it, shaped like params[1]
    with pytest.raises(ValueError, match="share"):
        opt.step([g[0], written])
    assert snapshot(opt, params) == before
    if key == "master_param":  # the whole first gradient, too
        with pytest.raises(ValueError, match="share"):
            opt.step([state[key], g[1]])
        assert snapshot(opt, params) == before


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_clipping_and_skipping_in_the_kept_plan(precision, monkeypatch):
    """A skipped step takes nothing, its number included: the next step's noise is the same
    as the whole path's."""
    a, pa, b, pb, whole = pair("Adam", precision, monkeypatch, hp=dict(lr=1e-2))
    cases = [
        (dict(max_grad_norm=1.0), 100.0),
        (dict(skip_if_nonfinite=True), float("nan")),  # skipped
        (dict(skip_if_nonfinite=True, max_grad_norm=0.5), 1.0),
        ({}, 1.0),
        (dict(skip_if_nonfinite=True), float("inf")),  # skipped
        ({}, 1.0),
    ]
    for kwargs, scale in cases:
        g = grads(5)
        if np.isfinite(scale):
            g = [x * np.float32(scale) for x in g]
        else:
            g[1][0, 0] = scale
        ra = a.step(g, **kwargs)
        rb = b.step([x.copy() for x in g], **kwargs)
        assert ra == rb or (np.isnan(ra) and np.isnan(rb)), kwargs
        assert snapshot(a, pa) == snapshot(b, pb), kwargs
    assert len(whole) == 1 and a.skipped_steps == b.skipped_steps == 2


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_a_loaded_state_of_another_form_converts_then_keeps_a_plan(precision, monkeypatch):
    """A float32 optimizer's state loaded into one with the precision options is converted by
    the load (quantised, or rounded to bfloat16); the steps after it take a new plan."""
    dtype, options = PRECISIONS[precision]
    a, pa, b, pb, whole = pair("Adam", precision, monkeypatch, hp=dict(lr=1e-2))
    plain = [p.astype(np.float32) for p in arrays(0, 0.5)]
    n = len(SHAPES[0])
    plain_opt = ok.Adam([{"params": plain[:n]}, {"params": plain[n:], "lr": 5e-3}], lr=1e-2)
    plain_opt.step(grads(0))
    saved = plain_opt.state_dict()
    assert all(
        v.dtype == np.float32
        for s in saved["state"].values()
        for v in s.values()
        if isinstance(v, np.ndarray)
    )
    for opt in (a, b):
        opt.step(grads(1))
        opt.load_state_dict(saved)
    for t in range(3):
        a.step(grads(2 + t))
        b.step(grads(2 + t))
        assert snapshot(a, pa) == snapshot(b, pb), t
    assert len(whole) == 2 and a._step_plan is not None


def test_stale_parameters_are_found_under_the_precision_options():
    for dtype, options in PRECISIONS.values():
        model = {"W": np.ones((3, 300), dtype)}
        opt = ok.Adam(list(model.values()), lr=1e-2, **options)
        g = [np.full((3, 300), 0.1, np.float32)]
        opt.step(g)
        opt.step(g)
        assert opt._step_plan is not None
        model.clear()
        with pytest.warns(ok.StaleParameterWarning):
            opt.step(g)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per parameter
            opt.step(g)


@pytest.mark.parametrize("precision", ["stochastic", "bf16-master-int8-state", "int8-state"])
def test_threads_stepping_one_optimizer_take_whole_steps(precision):
    """Four threads stepping one optimizer: each step whole, numbered once (with stochastic
    rounding, step k draws by k whichever thread takes it)."""
    dtype, options = PRECISIONS[precision]
    g = [x.copy() for x in grads(9)]
    n = 100
    ref, ref_params = build("Adam", precision, hp=dict(lr=1e-3))
    whole_path_only(ref)
    for _ in range(4 * n):
        ref.step(g)
    opt, params = build("Adam", precision, hp=dict(lr=1e-3))
    step_from_threads(opt, g, threads=4, steps=n)
    assert opt.step_count == 4 * n and opt.state[params[0]]["step"] == 4 * n
    assert snapshot(opt, params) == snapshot(ref, ref_params)


def test_isas_agree_through_the_plan():
    """The plan's steps on each ISA build that fuses multiply-adds give the same bits."""
    fused = ok.build_info()["fused_multiply_add"]
    out = {}
    for isa in fused:
        opt, params = build("AdamW", "bf16-master-int8-state")
        opt._isa = isa
        for t in range(5):
            opt.step(grads(t))
        assert opt._step_plan is not None
        out[isa] = [bits(p) for p in params] + [
            bits(v) for p in params for v in opt.state[p].values() if isinstance(v, np.ndarray)
        ]
    assert all(v == out[fused[0]] for v in out.values())


@pytest.mark.parametrize(
    "options",
    [
        dict(master_weights=True, state_dtype="int8"),
        dict(stochastic_rounding=True, state_dtype="bfloat16"),
    ],
    ids=["master-int8", "stochastic-bf16"],
)
def test_a_group_mixing_parameter_types_keeps_a_plan(options, monkeypatch):
    """float32, bfloat16 and float16 parameters in one group: only the 16-bit ones have a
    master copy or are rounded stochastically; the plan keeps each one's kernel entry."""
    dtypes = [F32, BF16, F16, BF16]

    def make():
        params = [p.astype(t) for p, t in zip(arrays(0, 0.5), dtypes)]
        return ok.AdamW(params, lr=1e-2, **options), params

    (a, pa), (b, pb) = make(), make()
    whole_path_only(b)
    whole = count_whole_steps(monkeypatch, a)
    for t in range(6):
        a.step(grads(t))
        b.step(grads(t))
        assert snapshot(a, pa) == snapshot(b, pb), t
    assert len(whole) == 1
    if options.get("master_weights"):
        assert ["master_param" in a.state[p] for p in pa] == [False, True, True, True]


@pytest.mark.parametrize(
    "option, value",
    [("stochastic_rounding", True), ("stochastic_rounding", False), ("master_weights", False)],
)
def test_setting_a_precision_option_drops_the_plan(option, value, monkeypatch):
    """The plan follows the options it was made under: setting one (checked with the others)
    drops it, and the steps after it are the whole path's under the new value."""
    start = {"stochastic_rounding": not value} if option == "stochastic_rounding" else {}
    start.setdefault("master_weights", option == "master_weights")

    def make():
        params = [np.full(3000, 0.5, BF16)]
        return ok.SGD(params, lr=1e-4, **start), params

    (a, pa), (b, pb) = make(), make()
    whole_path_only(b)
    whole = count_whole_steps(monkeypatch, a)
    g = [np.ones(3000, np.float32)]
    for t in range(5):
        if t == 2:
            for opt in (a, b):
                setattr(opt, option, value)
            assert a._step_plan is None and getattr(a, option) is value
        a.step(g)
        b.step(g)
        assert snapshot(a, pa) == snapshot(b, pb), t
    assert len(whole) == 2 and a._step_plan is not None


def test_a_refused_precision_option_changes_nothing():
    params = [np.full(300, 0.5, BF16)]
    opt = ok.Adam(params, lr=1e-2, master_weights=True)
    for _ in range(2):
        opt.step([np.ones(300, np.float32)])
    plan = opt._step_plan
    with pytest.raises(ValueError, match="exclude each other"):
        opt.stochastic_rounding = True
    with pytest.raises(ValueError, match="state_dtype"):
        opt.state_dtype = "int4"
    assert opt._step_plan is plan is not None
    assert (opt.state_dtype, opt.stochastic_rounding, opt.master_weights) == ("float32", False, True)
