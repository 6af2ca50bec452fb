"""Fuzzing the bindings with hypothesis: random shapes, strides, offsets, dtypes, byte orders,
contiguity, aliasing, Python objects in place of arrays and hyperparameters (NaN, Inf, negative,
out of range, wrong types), through both optkern.functional and the optimizer classes.

An independent oracle (NumPy's own flags and np.shares_memory, and the documented hyperparameter
ranges) says whether each call is valid. A valid call must succeed and leave the caller's own
arrays -- views with offsets and odd strides on size-1 axes included -- equal to a float64 NumPy
reference of the update, gradients untouched: an update applied to a silent copy would show up
as parameters that did not move. An invalid call must raise TypeError or ValueError and change
no array. Nothing may crash.

Bounded in time: OPTKERN_FUZZ_EXAMPLES (default 150) examples per test, no deadline.
"""

import math
import os
import sys

import numpy as np
import pytest
import optim_db as db
from helpers import digest
from reference import Reference

import optkern as ok
from optkern import functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("OPTKERN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)

NATIVE = "<" if sys.byteorder == "little" else ">"
SWAPPED = ">" if NATIVE == "<" else "<"
F32_MAX = float(np.finfo(np.float32).max)


def coin(data, p):
    """True with probability about p. Hypothesis shrinks draws towards 0, which is False here,
    so a failing example shrinks to the fewest bad inputs."""
    return p > 0 and data.draw(st.integers(0, 9999)) >= 10000 * (1 - p)


# -- hyperparameters ---------------------------------------------------------------------------------

# kind -> (strategy of valid values, the check the value must pass)
VALID = {
    "lr": st.one_of(st.just(0.0), st.floats(1e-6, 1.0)),
    # Schedule-Free's warmup multiplies lr by t / warmup_steps while t <= warmup_steps, as the
    # package does: a warmup_steps of 1e-300 makes an lr float32 cannot hold (refused, tested in
    # test_schedule_free.py), so the valid draws are step counts, as the package takes them.
    "warmup_steps": st.one_of(st.just(0.0), st.integers(1, 20).map(float)),
    "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.5)),
    "sgd_momentum": st.one_of(st.just(0.0), st.floats(0.0, 0.99)),
    "dampening": st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    "beta": st.floats(0.0, 0.99),
    # Decay rates stop at 0.999: at 1 - 1e-16, say, (1 - alpha) makes steps of 1e8 that cancel
    # to O(1), which float32 cannot resolve (a conditioning limit, not a bug; it is the range of
    # the float64 comparison that is bounded here, not what optkern accepts).
    "alpha": st.floats(0.5, 0.999),
    "eps": st.one_of(st.just(0.0), st.floats(1e-8, 1e-2)),
    "rho": st.floats(0.5, 0.999),
    "lr_decay": st.floats(0.0, 1.0),
    "beta1": st.floats(0.0, 0.99),
    "beta2": st.floats(0.5, 0.999),
    "grad_scale": st.floats(-2.0, 2.0),
    "rms_momentum": st.one_of(st.just(0.0), st.floats(0.0, 0.99)),
    "flag": st.booleans(),
    "open_unit": st.floats(0.05, 0.95),
    "above_one": st.floats(1.05, 3.0),
    "one_or_more": st.floats(1.0, 3.0),
    "nonpositive": st.floats(-1.5, 0.0),
}
# The range each real hyperparameter must lie in, as documented.
RANGE = {
    "beta": "[0,1)",
    "beta1": "[0,1)",
    "beta2": "[0,1)",
    "alpha": "[0,1]",
    "rho": "[0,1]",
    "dampening": "[0,1]",
    "grad_scale": "real",
}

BAD_REALS = [
    math.nan,
    math.inf,
    -math.inf,
    1e39,
    -1e39,
    -0.5,
    1.5,
    1.0,
    "0.1",
    None,
    True,
    [0.1],
    np.float32("nan"),
    10**400,
]
BAD_FLAGS = [1, 0, "yes", None, 0.5]
#: Hyperparameters that take None, standing for a value (registry.Hyper.if_none).
NONE_MEANS = {h.name for r in ok.registry.rules() for h in r.hyper if h.if_none is not None}


def real_error(key, value, rule=None):
    """The error a real hyperparameter ``value`` must get, or None if it is valid (``rule``: the
    class name, where a rule declares a name in another range than the others do)."""
    if value is None and key in NONE_MEANS:
        return None  # None stands for a value (Adafactor's eps1: float32's epsilon)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        return TypeError
    try:
        v = float(value)
    except OverflowError:
        return ValueError
    if not math.isfinite(v) or abs(v) > F32_MAX:
        return ValueError
    rng = RULE_RANGE.get((rule, key)) or RANGE.get(key, "[0,inf)")
    if rng == "real":
        return None
    if rng == "(0,1)":
        return None if 0 < v < 1 else ValueError
    if rng == "(1,inf)":
        return None if v > 1 else ValueError
    if rng == "[1,inf)":
        return None if v >= 1 else ValueError
    if rng == "(-inf,0]":
        return None if v <= 0 else ValueError
    if v < 0 or (rng == "[0,1]" and v > 1) or (rng == "[0,1)" and v >= 1):
        return ValueError
    return None


def draw_hp(data, key, kind, bad_rate, rule=None):
    """A value for hyperparameter ``key``, and the error it must get (None when valid)."""
    if coin(data, bad_rate):
        if kind == "flag":
            return data.draw(st.sampled_from(BAD_FLAGS)), TypeError
        value = data.draw(st.sampled_from(BAD_REALS))
        return value, real_error(key, value, rule)
    return data.draw(VALID[kind]), None


def draw_step(data, n, bad_rate):
    if coin(data, bad_rate):
        bad = data.draw(
            st.sampled_from(
                ["zero", "negative", "float", "bool", "none", "huge", "short list", "list with zero"]
            )
        )
        return {
            "zero": (0, ValueError),
            "negative": (-3, ValueError),
            "float": (1.5, TypeError),
            "bool": (True, TypeError),
            "none": (None, TypeError),
            "huge": (2**64, ValueError),
            "short list": ([1] * max(0, n - 1) if n else [1], ValueError),
            "list with zero": ([0] * max(n, 1), ValueError),
        }[bad]
    if data.draw(st.booleans()):
        return data.draw(st.integers(1, 10**6)), None
    return data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n)), None


# -- arrays ------------------------------------------------------------------------------------------

SHAPES = st.one_of(
    st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple),
    st.integers(1, 200).map(lambda n: (n,)),  # vector loops and their scalar tails
)

# Layouts of one array. Valid ones first; the rest break a rule (or do not: for some shapes, a
# 'strided' array of one element is still contiguous, and float64 breaks one only for a state
# of a float32 parameter -- the oracle, entry_error, looks at NumPy's flags).
VALID_LAYOUTS = ["plain", "plain", "plain", "offset", "odd strides on size-1 axes", "read-only"]
INVALID_LAYOUTS = [
    "float64",
    "float16",
    "int32",
    "complex64",
    "bool",
    "swapped byte order",
    "strided",
    "transposed",
    "reversed",
    "fortran",
    "unaligned",
    "list",
    "None",
    "float",
    "0-d",
    "wrong shape",
]


def build(values, layout):
    """An object holding ``values`` (float32, C order) in the given layout."""
    shape, n = values.shape, values.size
    if layout == "plain":
        return values.copy()
    if layout == "offset":  # 4 bytes past an allocation: C-contiguous, not 64-byte aligned
        a = np.empty(n + 1, np.float32)[1:].reshape(shape)
    elif layout == "odd strides on size-1 axes":
        strides = [s if d != 1 else 4 * 1000003 for d, s in zip(shape, values.strides)]
        a = np.lib.stride_tricks.as_strided(np.empty(max(n, 1), np.float32), shape, strides)
    elif layout == "read-only":
        a = values.copy()
        a.flags.writeable = False
        return a
    elif layout in ("float64", "float16", "int32", "complex64", "bool"):
        return values.astype(layout)
    elif layout == "swapped byte order":
        return values.astype(SWAPPED + "f4")
    elif layout == "strided":
        big = np.empty(2 * max(n, 1), np.float32)
        a = np.lib.stride_tricks.as_strided(big, shape, [2 * s for s in values.strides])
    elif layout == "transposed":
        a = np.empty(shape[::-1], np.float32).T
    elif layout == "reversed":
        a = values.copy()[::-1]
        return a
    elif layout == "fortran":
        return np.array(values, order="F")  # a copy: np.asfortranarray may return values itself
    elif layout == "unaligned":
        a = np.frombuffer(bytearray(4 * n + 1), np.uint8)[1:].view(np.float32).reshape(shape)
    elif layout == "list":
        return values.tolist()
    elif layout == "None":
        return None
    elif layout == "float":
        return 1.0
    elif layout == "0-d":
        return np.array(0.5, np.float32)
    elif layout == "wrong shape":
        return np.zeros(shape + (2,), np.float32)
    else:
        raise AssertionError(layout)
    a[...] = values
    return a


def entry_error(a, shape, written, param_dtype=None):
    """The error an entry of an array list must get, or None: the documented rules, read off
    NumPy's own flags. Parameters and gradients are float32 or float64 (a gradient of either type
    for either); a state (``param_dtype``: its parameter's type, when that one is valid) has its
    parameter's type. A 0-d array counts as one element, so only its shape can be wrong here
    (the shapes drawn are never ())."""
    if not isinstance(a, np.ndarray):
        return TypeError
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8) or not a.dtype.isnative:
        return TypeError
    if param_dtype is not None and a.dtype != param_dtype:
        return TypeError
    if a.ndim == 0 and a.shape != shape:
        return ValueError
    if not a.flags.c_contiguous or not a.flags.aligned:
        return ValueError
    if written and not a.flags.writeable:
        return ValueError
    if a.shape != shape:
        return ValueError
    return None


# state list -> (Reference state name, low, high) of its values
STATE = {
    "momentum_buffers": ("momentum_buffer", -1, 1),
    "velocities": ("momentum_buffer", -1, 1),
    "square_avgs": ("square_avg", 1, 2),
    "grad_avgs": ("grad_avg", -0.1, 0.1),
    "state_sums": ("sum", 0, 1),
    "acc_deltas": ("acc_delta", 0, 1),
    "exp_avgs": ("exp_avg", -1, 1),
    "exp_avg_sqs": ("exp_avg_sq", 0.01, 1),
    "max_exp_avg_sqs": ("max_exp_avg_sq", 0.01, 1),
}
for _rule in ok.registry.rules():  # state of rules known from their declarations: positive
    STATE.update({st_.arg: (st_.name, 0.01, 1) for st_ in _rule.states if st_.arg not in STATE})
# state lists whose entries are not shaped like their parameters (Adafactor's factors), by list
SHAPED = {
    st_.arg: st_ for _rule in ok.registry.rules() for st_ in _rule.states if st_.shape != "like_param"
}


def entry_shape(arg, shape):
    """The shape of list ``arg``'s entry for a parameter of ``shape``; None where the parameter
    keeps no such state (the entry is then None)."""
    return SHAPED[arg].shape_for(shape) if arg in SHAPED else shape


# -- the functional layer ----------------------------------------------------------------------------

#: The functions whose calls draw_functional draws by hand (their optional state lists and
#: constraints: sgd_'s fresh buffers and nesterov, rmsprop_'s centered and momentum lists,
#: adam's amsgrad list), with the reference each follows: a per-function override.
HAND_DRAWN = {
    "sgd_": "SGD",
    "momentum_": "Momentum",
    "rmsprop_": "RMSprop",
    "adagrad_": "Adagrad",
    "adadelta_": "Adadelta",
    "adam_": "Adam",
    "adamw_": "AdamW",
}
# Every other function of the optimizer database, drawn from its rule's declaration.
DERIVED = list(
    dict.fromkeys(e.function.__name__ for e in db.ENTRIES if e.function.__name__ not in HAND_DRAWN)
)


def draw_functional(data, bad_rate):
    """A random call of an optkern.functional update: (function, lists, keywords, the Reference
    name and options, the errors the call must get)."""
    name = data.draw(st.sampled_from(list(HAND_DRAWN) + DERIVED), label="function")
    errors = set()
    kw, ref_hp = {}, {}

    def hp(key, kind, ref_key=None, rule=None):
        value, err = draw_hp(data, key, kind, bad_rate, rule)
        kw[key] = value
        if err:
            errors.add(err)
        if ref_key is not False:
            ref_hp[ref_key or key] = value
        return value, err

    lists = ["params", "grads"]
    hp("lr", "lr")
    hp("weight_decay", "weight_decay")
    hp("maximize", "flag")
    scale, scale_err = hp("grad_scale", "grad_scale", ref_key=False)
    if name in DERIVED:  # a rule known only from its declaration
        rule = ok.registry.rule(name[:-1])
        kw.pop("maximize")
        ref_hp.pop("maximize")
        errors.clear()
        if scale_err:  # grad_scale stays in the call: its error does too
            errors.add(scale_err)
        kw.pop("lr"), kw.pop("weight_decay"), ref_hp.pop("lr"), ref_hp.pop("weight_decay")
        hp("maximize", "flag")
        pair = {}
        for h in rule.hyper:
            value, _ = hp(h.name, _kind(h), ref_key=h.torch if h.slot < 0 else False, rule=rule.cls)
            if h.slot >= 0:
                pair.setdefault(h.torch, []).append(value)
        for torch_name, values in pair.items():
            ref_hp[torch_name] = tuple(values)
        for lo, hi in ORDERED:
            if not errors and lo in kw and hi in kw and not kw[lo] <= kw[hi]:
                errors.add(ValueError)
        lists += [st_.arg for st_ in rule.states if st_.when is None]
        return name, lists, kw, rule.cls, ref_hp, scale, errors
    ref_name = HAND_DRAWN[name]
    if name == "sgd_":
        momentum, merr = hp("momentum", "sgd_momentum")
        dampening, derr = hp("dampening", "dampening")
        nesterov, nerr = hp("nesterov", "flag")
        if not (merr or derr or nerr) and nesterov and (momentum <= 0 or dampening != 0):
            errors.add(ValueError)
        if not merr and momentum != 0:
            lists.append("momentum_buffers")
    elif name == "momentum_":
        hp("beta", "beta")
        lists.append("velocities")
    elif name == "rmsprop_":
        hp("alpha", "alpha")
        hp("eps", "eps")
        momentum, merr = hp("momentum", "rms_momentum")
        centered, cerr = hp("centered", "flag")
        lists.append("square_avgs")
        if not cerr and centered is True:
            lists.append("grad_avgs")
        if not merr and momentum > 0:
            lists.append("momentum_buffers")
    elif name == "adagrad_":
        hp("lr_decay", "lr_decay")
        hp("eps", "eps")
        lists.append("state_sums")
    elif name == "adadelta_":
        hp("rho", "rho")
        hp("eps", "eps")
        lists += ["square_avgs", "acc_deltas"]
    else:
        b1, e1 = hp("beta1", "beta1", ref_key=False)
        b2, e2 = hp("beta2", "beta2", ref_key=False)
        ref_hp["betas"] = (b1, b2)
        hp("eps", "eps")
        amsgrad, aerr = hp("amsgrad", "flag")
        lists += ["exp_avgs", "exp_avg_sqs"]
        if not aerr and amsgrad is True:
            lists.append("max_exp_avg_sqs")
    return name, lists, kw, ref_name, ref_hp, scale, errors


def draw_arrays(data, lists, bad_rate, rng, fresh_buffers):
    """Random tensors for every list, each entry in a random layout, sometimes aliased. Returns
    the shapes, the lists as passed, the float32 values each entry holds before the call (None
    for a momentum buffer to be created) and the errors the arrays must get."""
    n = data.draw(st.integers(0, 4), label="tensors")
    shapes = [data.draw(SHAPES, label="shape") for _ in range(n)]
    errors = set()
    values = {}
    args = {}
    for arg in lists:
        lo, hi = STATE[arg][1:] if arg in STATE else (-1, 1)
        values[arg] = [
            None if es is None else rng.uniform(lo, hi, es).astype(np.float32)
            for es in (entry_shape(arg, s) for s in shapes)
        ]
        entries = []
        for v in values[arg]:
            if v is None:  # a state this parameter does not keep
                entries.append(None)
                continue
            bad = coin(data, bad_rate / max(n, 1))
            entries.append(
                build(v, data.draw(st.sampled_from(INVALID_LAYOUTS if bad else VALID_LAYOUTS)))
            )
        args[arg] = entries
    # Aliasing: two entries of one shape made views of one buffer, overlapping or not.
    if n and coin(data, bad_rate):
        a_arg, b_arg = data.draw(st.sampled_from(lists)), data.draw(st.sampled_from(lists))
        i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
        va, vb = values[a_arg][i], values[b_arg][j]
        if va is not None and vb is not None and va.shape == vb.shape and (a_arg, i) != (b_arg, j):
            size = va.size
            shift = data.draw(st.integers(0, size + 1))
            buf = np.zeros(size + shift, np.float32)
            a, b = buf[:size].reshape(va.shape), buf[shift : shift + size].reshape(va.shape)
            a[...] = values[a_arg][i]
            b[...] = values[b_arg][j]  # where they overlap, b's values win in both
            args[a_arg][i], args[b_arg][j] = a, b
            values[a_arg][i], values[b_arg][j] = a.copy(), b.copy()
    # sgd_: momentum buffers not created yet (None), filled by torch's first-step rule.
    if fresh_buffers and "momentum_buffers" in lists:
        for i in range(n):
            if data.draw(st.booleans()):
                args["momentum_buffers"][i] = values["momentum_buffers"][i] = None
    # A list of the wrong length, in the wrong container, or missing.
    if coin(data, bad_rate / 2):
        arg = data.draw(st.sampled_from(lists))
        how = data.draw(st.sampled_from(["longer", "shorter", "None", "ndarray", "tuple"]))
        if how == "longer":
            args[arg] = args[arg] + [np.zeros(3, np.float32)]
            errors.add(ValueError)
        elif how == "shorter" and n:
            args[arg] = args[arg][:-1]
            errors.add(ValueError)
        elif how == "None":
            args[arg] = None
            errors.add(
                ValueError
                if arg in ("momentum_buffers", "velocities", "grad_avgs", "max_exp_avg_sqs")
                else TypeError
            )
        elif how == "ndarray":
            args[arg] = np.zeros((n, 3), np.float32)
            errors.add(TypeError)
        elif how == "tuple":
            args[arg] = tuple(args[arg])
            if arg == "momentum_buffers" and fresh_buffers:
                errors.add(TypeError)  # sgd_ stores new buffers into it: it must be a list
    # The oracle for the entries: NumPy's flags, and np.shares_memory for aliasing. (With a
    # list of the wrong length the call may stop at an entry error first: either is right.)
    checked = []
    param_dtypes = [None] * n  # each valid parameter's type: its states must have it
    if isinstance(args.get("params"), (list, tuple)):
        for i, a in enumerate(args["params"][:n]):
            if entry_error(a, shapes[i], True) is None:
                param_dtypes[i] = a.dtype
    for arg in lists:
        if isinstance(args[arg], (list, tuple)):
            for i, a in enumerate(args[arg][:n]):
                if a is None and arg == "momentum_buffers" and fresh_buffers:
                    continue
                if a is None and values[arg][i] is None:  # not kept for this parameter
                    continue
                written = arg != "grads"
                state = arg not in ("params", "grads")
                err = entry_error(
                    a, entry_shape(arg, shapes[i]), written, param_dtypes[i] if state else None
                )
                if err:
                    errors.add(err)
                elif a.size:
                    checked.append((a, written))
    for x in range(len(checked)):
        for y in range(x):
            (a, wa), (b, wb) = checked[x], checked[y]
            if (wa or wb) and np.shares_memory(a, b):
                errors.add(ValueError)
    return shapes, args, values, errors


def arrays_of(args):
    return [
        [a for a in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(a, np.ndarray)]
        for _, v in sorted(args.items())
    ]


def reference_update(ref_name, ref_hp, scale, step, lists, values, shapes, carried=None):
    """The float64 result of the update of each tensor, from the values it started with
    (``carried``: {state name: a number per tensor}, a rule's carried numbers)."""
    out = []
    for i, shape in enumerate(shapes):
        ref = Reference(ref_name, values["params"][i], **ref_hp)
        for arg in lists[2:]:
            if values[arg][i] is not None:
                ref.state[STATE[arg][0]] = values[arg][i].astype(ref.dtype)
        for name, numbers in (carried or {}).items():
            ref.state[name] = numbers[i]
        if step is not None:
            ref.t = (step[i] if isinstance(step, list) else step) - 1
        with np.errstate(all="ignore"):
            ref.step(values["grads"][i].astype(np.float64), grad_scale=scale)
        out.append(ref)
    return out


def magnitude(*arrays):
    """The largest finite magnitude among arrays (None entries ignored), at least 1."""
    m = 1.0
    for a in arrays:
        if a is not None:
            a = np.asarray(a, dtype=np.float64)
            m = max(m, float(np.max(np.abs(a), initial=0.0, where=np.isfinite(a))))
    return m


def check_close(got, want, what, scale=1.0):
    """float32 ``got`` against the float64 ``want``: relative 1e-5, and absolute 1e-5 of the
    largest value the update went through (``scale``), since p - lr * update cancels."""
    want = np.asarray(want, dtype=np.float64)
    atol = 1e-5 * max(scale, magnitude(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, equal_nan=True, err_msg=what)


@FUZZ
@given(st.data())
def test_fuzz_functional(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    bad_rate = data.draw(st.sampled_from([0.0, 0.1, 0.3]), label="bad rate")
    ok.set_num_threads(data.draw(st.sampled_from([1, 2])))
    ok._core._testing.set_min_elements_per_thread(data.draw(st.sampled_from([1, 7, 64, 32768])))
    name, lists, kw, ref_name, ref_hp, scale, errors = draw_functional(data, bad_rate)
    shapes, args, values, array_errors = draw_arrays(
        data, lists, bad_rate, rng, fresh_buffers=name == "sgd_"
    )
    if name in ("adagrad_", "adam_", "adamw_") or (
        name in DERIVED and ok.registry.rule(name[:-1]).uses_step
    ):
        kw["step"], err = draw_step(data, len(shapes), bad_rate)
        if err:
            errors.add(err)
        elif isinstance(kw["step"], list) and len(kw["step"]) != len(shapes):
            errors.add(ValueError)
    errors |= array_errors
    # the rule's carried numbers (NAdam's mu_products, ASGD's etas and mus): lists of floats
    carried = {}
    if name in DERIVED:
        for c in ok.registry.rule(name[:-1]).carried:
            carried[c.name] = [float(x) for x in rng.uniform(0.05, 1.0, len(shapes))]
            kw[c.arg] = list(carried[c.name])
    fn = getattr(F, name)
    ids = {k: [id(x) for x in v] if isinstance(v, (list, tuple)) else id(v) for k, v in args.items()}
    before = digest(arrays_of(args))
    event(f"{name}: {'refused' if errors else 'valid'}")
    if errors:
        with pytest.raises(tuple(errors)):
            fn(**args, **kw)
        assert digest(arrays_of(args)) == before, "a call that raised changed an array"
        assert ids == {
            k: [id(x) for x in v] if isinstance(v, (list, tuple)) else id(v) for k, v in args.items()
        }, "a call that raised changed a list"
        for c in ok.registry.rule(name[:-1]).carried if carried else ():
            assert kw[c.arg] == carried[c.name], "a call that raised changed " + c.arg
        return
    grads_before = digest(args["grads"])
    assert fn(**args, **kw) is None
    assert digest(args["grads"]) == grads_before, "gradients were written"
    refs = reference_update(ref_name, ref_hp, scale, kw.get("step"), lists, values, shapes, carried)
    for i, ref in enumerate(refs):
        check_close(args["params"][i], ref.p, f"{name} params[{i}]", magnitude(values["params"][i]))
        for c in ok.registry.rule(name[:-1]).carried if carried else ():
            assert kw[c.arg][i] == pytest.approx(ref.state[c.name], rel=1e-12), (name, c.arg, i)
        for arg in lists[2:]:
            # None before the call: a state this parameter does not keep (stays None), or a
            # momentum buffer sgd_ creates (compared with the reference's new buffer)
            if values[arg][i] is None and STATE[arg][0] not in ref.state:
                assert args[arg][i] is None
                continue
            check_close(
                args[arg][i],
                ref.state[STATE[arg][0]],
                f"{name} {arg}[{i}]",
                magnitude(values[arg][i]),
            )


# -- the optimizer classes ---------------------------------------------------------------------------

#: The hyperparameters each class's constructor is fuzzed with, and the kind of value each draws:
#: by hand for the first classes (per-class overrides), from the declaration for every other class
#: of the optimizer database (below).
CLASS_HPS = {
    "SGD": [("lr", "lr"), ("momentum", "sgd_momentum"), ("weight_decay", "weight_decay")],
    "Nesterov": [("lr", "lr"), ("weight_decay", "weight_decay")],
    "Momentum": [("lr", "lr"), ("beta", "beta"), ("weight_decay", "weight_decay")],
    "RMSprop": [
        ("lr", "lr"),
        ("alpha", "alpha"),
        ("eps", "eps"),
        ("momentum", "rms_momentum"),
        ("centered", "flag"),
        ("weight_decay", "weight_decay"),
    ],
    "Adagrad": [
        ("lr", "lr"),
        ("lr_decay", "lr_decay"),
        ("eps", "eps"),
        ("weight_decay", "weight_decay"),
    ],
    "Adadelta": [("lr", "lr"), ("rho", "rho"), ("eps", "eps"), ("weight_decay", "weight_decay")],
    "Adam": [("lr", "lr"), ("eps", "eps"), ("amsgrad", "flag"), ("weight_decay", "weight_decay")],
    "AdamW": [("lr", "lr"), ("eps", "eps"), ("amsgrad", "flag"), ("weight_decay", "weight_decay")],
}

# The kind of value each declared range draws, for rules derived from the registry.
RANGE_KIND = {
    "nonnegative": "lr_decay",
    "unit": "rho",
    "unit_open": "beta",
    "flag": "flag",
    "open_unit": "open_unit",
    "above_one": "above_one",
    "one_or_more": "one_or_more",
    "nonpositive": "nonpositive",
}
# The documented range of every declared hyperparameter, by name (real_error reads it).
for _rule in ok.registry.rules():
    for _h in _rule.hyper:
        RANGE.setdefault(
            _h.name,
            {
                "unit": "[0,1]",
                "unit_open": "[0,1)",
                "open_unit": "(0,1)",
                "above_one": "(1,inf)",
                "one_or_more": "[1,inf)",
                "nonpositive": "(-inf,0]",
            }.get(_h.range, "[0,inf)"),
        )
_RANGE_TEXT = {
    "unit": "[0,1]",
    "unit_open": "[0,1)",
    "open_unit": "(0,1)",
    "above_one": "(1,inf)",
    "nonnegative": "[0,inf)",
    "one_or_more": "[1,inf)",
    "nonpositive": "(-inf,0]",
}
# Where a rule declares a name in another range than RANGE's (ScheduleFreeSGD's momentum and
# ScheduleFreeAdamW's beta1 are in (0, 1); ASGD's alpha is any nonnegative number where
# RMSprop's is in [0, 1]), by (class, name) and (class, torch name).
RULE_RANGE = {
    (_rule.cls, key): _RANGE_TEXT[_h.range]
    for _rule in ok.registry.rules()
    for _h in _rule.hyper
    if _h.range in _RANGE_TEXT and RANGE.get(_h.name) != _RANGE_TEXT[_h.range]
    for key in {_h.name, _h.torch}
}
# Pairs of hyperparameters a rule's declaration orders (require_order in rule_api.hpp): lo <= hi.
ORDERED = [("step_size_min", "step_size_max")]


def _kind(h):
    # a name with its own range above (beta2 from 0.5: a beta2 that float32 rounds to 0 with
    # eps = 0 divides 0 by 0 where the float64 reference does not), else the declared range's
    # (a name that one rule narrows to (0, 1), as Schedule-Free's beta1, draws from (0, 1))
    if h.name in VALID and (h.range != "open_unit" or RANGE.get(h.name) == "(0,1)"):
        return h.name
    return RANGE_KIND[h.range]


for _entry in db.ENTRIES:
    if _entry.name not in CLASS_HPS:
        CLASS_HPS[_entry.name] = [(h.torch, _kind(h)) for h in _entry.rule.hyper if h.slot < 0]


@FUZZ
@given(st.data())
def test_fuzz_optimizer_classes(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    bad_rate = data.draw(st.sampled_from([0.0, 0.1, 0.3]), label="bad rate")
    kind = data.draw(st.sampled_from(sorted(CLASS_HPS)), label="class")
    hp, errors = {}, set()
    for key, k in CLASS_HPS[kind]:
        hp[key], err = draw_hp(data, key, k, bad_rate / 3, kind)
        if err:
            errors.add(err)
    hp["maximize"], err = draw_hp(data, "maximize", "flag", bad_rate / 3)
    if err:
        errors.add(err)
    if kind in ("Adam", "AdamW"):
        hp["betas"] = (data.draw(VALID["beta1"]), data.draw(VALID["beta2"]))
    n = data.draw(st.integers(1, 4))
    shapes = [data.draw(SHAPES) for _ in range(n)]
    params = []
    for s in shapes:
        bad = coin(data, bad_rate / n)
        # Any shape is a valid parameter: 'wrong shape' and '0-d' (one element) have no meaning
        # here.
        layout = data.draw(
            st.sampled_from(
                [x for x in INVALID_LAYOUTS if x not in ("wrong shape", "0-d")]
                if bad
                else VALID_LAYOUTS[:-1]
            )
        )
        params.append(build(rng.uniform(-1, 1, s).astype(np.float32), layout))
        err = entry_error(params[-1], s, written=True)
        if err:
            errors.add(err)
    ok_params = [p for p in params if isinstance(p, np.ndarray)]
    before = digest(ok_params)
    if errors:
        event(f"{kind}: construction refused")
        with pytest.raises(tuple(errors)):
            getattr(ok, kind)(params, **hp)
        assert digest(ok_params) == before
        return
    opt = getattr(ok, kind)(params, **hp)
    refs = [Reference(kind, p, **hp) for p in params]
    scales = [magnitude(p) for p in params]  # the largest |value| each parameter went through
    for _ in range(data.draw(st.integers(1, 3))):
        grads, step_errors = [], set()
        for i, s in enumerate(shapes):
            g = rng.uniform(-1, 1, s).astype(np.float32)
            if coin(data, 0.1):
                grads.append(None)  # skipped parameter
                continue
            bad = coin(data, bad_rate / n)
            # (None is not among them: a None gradient skips its parameter, drawn above.)
            layout = data.draw(
                st.sampled_from([x for x in INVALID_LAYOUTS if x != "None"] if bad else VALID_LAYOUTS)
            )
            grads.append(build(g, layout))
            err = entry_error(grads[-1], s, written=False)
            if err:
                step_errors.add(err)
        snapshot = digest([params, opt.state_dict()])
        event(f"{kind} step: {'refused' if step_errors else 'valid'}")
        if step_errors:
            with pytest.raises(tuple(step_errors)):
                opt.step(grads)
            assert digest([params, opt.state_dict()]) == snapshot
            continue
        opt.step(grads)
        for i, (ref, g) in enumerate(zip(refs, grads)):
            if g is not None:
                with np.errstate(all="ignore"):
                    ref.step(np.asarray(g, np.float64))
                scales[i] = max(
                    scales[i],
                    magnitude(ref.p, *[v for v in ref.state.values() if isinstance(v, np.ndarray)]),
                )
        for i, (p, ref) in enumerate(zip(params, refs)):
            check_close(p, ref.p, f"{kind} params[{i}]", scales[i])
            for name, value in opt.state.get_by_id(p).items() if p in opt.state else []:
                if isinstance(value, np.ndarray):
                    check_close(value, ref.state[name], f"{kind} state[{i}][{name!r}]", scales[i])
