"""Hostile input, exhaustively: every optimizer class and every function of optkern.functional,
fed wrong dtypes, layouts, shapes, counts, aliasing buffers, None, Python lists and bad
hyperparameters. Each call raises TypeError or ValueError naming what is wrong, and every buffer
and the optimizer's state stay bit-identical (checked by hashing everything before and after)."""

import inspect
import math

import numpy as np
import pytest
import optim_db as db
from helpers import digest

import optkern as ok
from optkern import functional as F


def snapshot(opt, params, grads=()):
    return digest([params, [g for g in grads if isinstance(g, np.ndarray)], opt.state_dict()])


# -- regressions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, hp",
    [
        ("Adam", dict(lr=-1.0)),
        ("AdamW", dict(eps=float("nan"))),
        ("Momentum", dict(lr=-1.0)),
        ("Adagrad", dict(eps=-1.0)),
        ("RMSprop", dict(alpha=2.0)),
        ("Adadelta", dict(rho=-0.5)),
        ("Adam", dict(amsgrad=True, lr=-1.0)),
    ],
)
def test_bad_hyperparameter_on_first_step_creates_no_state(kind, hp):
    """Regression: the state of a parameter was created before the group's hyperparameters were
    checked, so a first step() that raised left zero-filled state (and step 0) behind."""
    p = np.ones(4, np.float32)
    opt = getattr(ok, kind)([p])
    opt.param_groups[0].update(hp)
    before = snapshot(opt, [p])
    with pytest.raises(ValueError):
        opt.step([np.ones(4, np.float32)])
    assert len(opt.state) == 0 and snapshot(opt, [p]) == before


def test_momentum_without_velocities_is_refused():
    """Regression: momentum_(params, grads, None) ran a plain SGD step (the C++ call treats a
    missing buffer list as 'no momentum'), silently dropping the momentum."""
    p, g = np.ones(4, np.float32), np.ones(4, np.float32)
    before = digest([p, g])
    with pytest.raises(ValueError, match="velocities is required"):
        F.momentum_([p], [g], None, lr=0.1)
    with pytest.raises(TypeError, match=r"velocities\[0\] must be a float32"):
        F.momentum_([p], [g], [np.zeros(4)], lr=0.1)
    assert digest([p, g]) == before


@pytest.mark.parametrize("value", [1e39, -1e39, 10**400, np.float64(3.5e38)])
def test_hyperparameter_beyond_float32_is_refused(value):
    """Regression: lr=1e39 is finite in double but Inf in the float32 kernels, which filled the
    parameters with Inf/NaN; 10**400 raised OverflowError instead of ValueError."""
    p, g = np.ones(4, np.float32), np.ones(4, np.float32)
    m, v = np.zeros(4, np.float32), np.zeros(4, np.float32)
    before = digest([p, g, m, v])
    with pytest.raises(ValueError, match="lr must be finite"):
        F.adam_([p], [g], [m], [v], step=1, lr=value, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="grad_scale must be finite"):
        F.sgd_([p], [g], lr=0.1, grad_scale=value)
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        ok.AdamW([p], weight_decay=value)
    assert digest([p, g, m, v]) == before


@pytest.mark.parametrize("step", [2**63, 2**70, [1, 2**64]])
def test_step_count_beyond_64_bits_is_a_value_error(step):
    """Regression: a step count beyond 64 bits raised OverflowError from the binding."""
    ps = [np.ones(4, np.float32), np.ones(3, np.float32)]
    gs = [np.ones(4, np.float32), np.ones(3, np.float32)]
    sums = [np.zeros(4, np.float32), np.zeros(3, np.float32)]
    before = digest([ps, gs, sums])
    with pytest.raises(ValueError, match=r"steps\[\d\] is out of range"):
        F.adagrad_(ps, gs, sums, step=step, lr=0.1)
    assert digest([ps, gs, sums]) == before


@pytest.mark.parametrize(
    "step, exc", [(0, ValueError), (-1, ValueError), (2**64, ValueError), (1.0, TypeError)]
)
def test_bad_step_refused_even_with_nothing_to_update(step, exc):
    """Regression (found by tests/test_fuzz.py): an int step was only checked when there was at
    least one tensor, so adam_([], [], [], [], step=0) passed while lr=-1 there raised."""
    with pytest.raises(exc, match="steps?"):
        F.adam_([], [], [], [], step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(exc, match="steps?"):
        F.adagrad_([], [], [], step=step, lr=0.1)


# == the functional layer, every function =========================================================

SHAPES = [(33,), (33,), (4, 5)]  # two equal shapes, so 'listed twice' is not a shape error
NAN, INF = float("nan"), float("inf")


def rand(shape, seed, positive=False):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.abs(a) if positive else a


def _functions():
    """name -> (function, [(list argument, written by the call?)], keywords of a valid call), and
    name -> the rule: one call per attack option set of every class of the optimizer database
    (optim_db.py), with the class's hyperparameters under those options as optkern.functional
    names them, the state lists those options need, a gradient scale and, for a rule that counts
    steps, per-parameter step counts (the first call of each function) or one count."""
    functions, rules = {}, {}
    seen = set()
    for e in db.ENTRIES:
        fn = e.function
        sig = inspect.signature(fn).parameters
        for hp in e.attack:
            group = e.cls([np.zeros(1, np.float32)], **hp).param_groups[0]
            core = e.rule.to_core(group)
            lists = [("params", True), ("grads", False)] + [
                (s.arg, True) for s in e.rule.states if s.when is None or core[s.when]
            ]
            kw = {k: v for k, v in core.items() if k in sig}
            kw.update(maximize=group["maximize"], grad_scale=0.5)
            if e.rule.uses_step:
                first = not any(f is fn for f, _, _ in functions.values())
                kw = dict(step=[3, 1, 7] if first else 3, **kw)
            key = (fn.__name__, repr(lists), repr(sorted(kw.items(), key=str)))
            if key in seen:
                continue
            seen.add(key)
            name = fn.__name__ + db.case_id((e.name, hp))
            functions[name], rules[name] = (fn, lists, kw), e.rule
    return functions, rules


FUNCTIONS, FUNCTION_RULE = _functions()
# The carried numbers of a function (NAdam's mu_products, ASGD's etas and mus): lists of floats,
# one per parameter, which a call updates in place. {function name: {arg: start value}}
CARRIED = {
    name: {
        c.arg: (c.init if c.init_from is None else FUNCTIONS[name][2][c.init_from])
        for c in rule.carried
    }
    for name, rule in FUNCTION_RULE.items()
    if rule.carried
}
# Lists a function needs only for some options: None there is 'required when ...' (ValueError).
OPTIONAL_LISTS = {"momentum_buffers", "grad_avgs", "max_exp_avg_sqs", "velocities"}


def _state_of(name, arg):
    """The registry's State behind list ``arg`` of FUNCTIONS[name], or None (params, grads)."""
    return next((st for st in FUNCTION_RULE[name].states if st.arg == arg), None)


def shaped(name, arg):
    """Whether list ``arg`` holds states shaped by their own kind (registry.State.shape:
    Adafactor's row_vars, col_vars, variances), checked as such by the core."""
    st = _state_of(name, arg)
    return st is not None and st.shape != "like_param"


def entry_shape(name, arg, j):
    """The shape of entry j of list ``arg`` in a valid call: SHAPES[j], or the state's own
    (registry.State.shape_for), None where parameter j keeps no such state."""
    st = _state_of(name, arg)
    return SHAPES[j] if st is None else st.shape_for(SHAPES[j])


def present(name, arg):
    """The indices of list ``arg`` that hold an array in a valid call."""
    return [j for j in range(len(SHAPES)) if entry_shape(name, arg, j) is not None]


def valid_call(name):
    """The list arguments and keywords of a valid call of FUNCTIONS[name]."""
    _, lists, kw = FUNCTIONS[name]
    args = {
        arg: [
            None
            if entry_shape(name, arg, i) is None
            else rand(entry_shape(name, arg, i), 10 * k + i, positive=k > 1)
            for i in range(len(SHAPES))
        ]
        for k, (arg, _) in enumerate(lists)
    }
    for arg, start in CARRIED.get(name, {}).items():
        args[arg] = [float(start)] * len(SHAPES)
    return args, dict(kw)


def _long_axis(a):
    """The last axis of more than one element (a transpose or a reversal of the others leaves
    an array of shape (4, 1) or (1, 5) C-contiguous)."""
    return max((k for k, d in enumerate(a.shape) if d > 1), default=a.ndim - 1)


def strided(a):
    """A non-contiguous view holding a's values (every other element; a transpose in 2-D; every
    other element along its long axis where the others have one element)."""
    if a.ndim == 1:
        v = np.zeros(2 * a.size, np.float32)[::2].reshape(a.shape)
    elif sum(d > 1 for d in a.shape) >= 2:
        v = np.zeros(a.shape[::-1], np.float32).T
    else:
        k = _long_axis(a)
        big = list(a.shape)
        big[k] *= 2
        v = np.zeros(big, np.float32)[
            tuple(slice(None, None, 2 if i == k else 1) for i in range(a.ndim))
        ]
    v[...] = a
    return v


def reversed_(a):
    """a's values, reversed along its first axis (its long axis where the first has one)."""
    k = 0 if a.shape[0] > 1 else _long_axis(a)
    return np.flip(a.copy(), axis=k)


def unaligned(a):
    out = np.frombuffer(bytearray(a.nbytes + 1), np.uint8)[1:].view(np.float32).reshape(a.shape)
    out[...] = a
    return out


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def fortran(a):
    """A Fortran-ordered (not C-contiguous) array of a's shape; 1-D (or one long axis) gets a
    column of a 2-D one."""
    if sum(d > 1 for d in a.shape) >= 2:
        return np.asfortranarray(a)
    return np.zeros((a.size, 2), np.float32)[:, 0].reshape(a.shape)


# One entry of one list replaced: (name, make(entry), error, pattern); {L} and {j} are filled in.
# A parameter or gradient may be float32 or float64 (states: the parameter's type), so the
# messages name "float32 or float64" for those and "float32" for a state of a float32 parameter.
F32 = r"must be a float32 (or float64 )?"
ENTRY_MUTATIONS = [
    ("None", lambda a: None, TypeError, r"{L}\[{j}\] " + F32 + "NumPy array, got NoneType"),
    ("list", lambda a: a.tolist(), TypeError, r"{L}\[{j}\] " + F32 + "NumPy array, got list"),
    ("tuple", lambda a: tuple(a.ravel()), TypeError, r"{L}\[{j}\] " + F32 + "NumPy array"),
    ("float", lambda a: 1.0, TypeError, r"{L}\[{j}\] " + F32 + "NumPy array, got float"),
    ("np.float32", lambda a: np.float32(1), TypeError, r"{L}\[{j}\] " + F32 + "NumPy array"),
    ("memoryview", lambda a: memoryview(a.copy()), TypeError, r"{L}\[{j}\] " + F32 + "NumPy"),
    # a state of another type than its parameter's (a float64 parameter or gradient is valid)
    (
        "float64",
        lambda a: a.astype(np.float64),
        TypeError,
        r"{L}\[{j}\] must be a float32 array like",
    ),
    ("float16", lambda a: a.astype(np.float16), TypeError, r"{L}\[{j}\] " + F32 + "array"),
    ("int32", lambda a: a.astype(np.int32), TypeError, r"{L}\[{j}\] " + F32 + "array"),
    ("bool", lambda a: a > 0, TypeError, r"{L}\[{j}\] " + F32 + "array"),
    ("complex64", lambda a: a.astype(np.complex64), TypeError, r"{L}\[{j}\] " + F32 + "array"),
    ("object", lambda a: a.astype(object), TypeError, r"{L}\[{j}\] " + F32 + "array"),
    ("big-endian", lambda a: a.astype(">f4"), TypeError, r"{L}\[{j}\] .*native byte order"),
    # a 0-d array is one element: its shape differs from the others' (see "longer")
    ("0-d", lambda a: np.array(1.0, np.float32), ValueError, r"{S}\[{j}\] has shape"),
    ("strided", strided, ValueError, r"{L}\[{j}\] must be C-contiguous"),
    ("reversed", reversed_, ValueError, r"{L}\[{j}\] must be C-contiguous"),
    ("fortran", fortran, ValueError, r"{L}\[{j}\] must be C-contiguous"),
    ("unaligned", unaligned, ValueError, r"{L}\[{j}\] is not aligned"),
    # Shape errors are reported on the later list, which is grads when params is the mutated one.
    ("longer", lambda a: np.zeros(a.size + 1, np.float32), ValueError, r"{S}\[{j}\] has shape"),
    (
        "reshaped",
        lambda a: a.reshape(1, -1).copy() if a.ndim == 1 else a.ravel().copy(),
        ValueError,
        r"{S}\[{j}\] has shape",
    ),
    ("size 0", lambda a: np.zeros((0,), np.float32), ValueError, r"{S}\[{j}\] has shape"),
]


def set_entry(args, arg, j, value_of):
    args[arg] = list(args[arg])
    args[arg][j] = value_of(args)


#: Hyperparameters that take None, standing for a value (registry.Hyper.if_none: Adafactor's eps1).
NONE_MEANS = {h.name for r in ok.registry.rules() for h in r.hyper if h.if_none is not None}


def bad_values(key, good, rng=None):
    """Values of the keyword ``key`` that must be refused, with the error each gets (``rng``:
    its declared range, where it is one of the ranges beyond [0, inf))."""
    if isinstance(good, bool):
        return [
            ("'yes'", "yes", TypeError),
            ("1", 1, TypeError),
            ("None", None, TypeError),
            ("0.5", 0.5, TypeError),
        ]
    if key == "step":
        return [
            ("0", 0, ValueError),
            ("-1", -1, ValueError),
            ("1.5", 1.5, TypeError),
            ("True", True, TypeError),
            ("None", None, TypeError),
            ("'1'", "1", TypeError),
            ("2**64", 2**64, ValueError),
            ("2 for 3", [1, 1], ValueError),
            ("a 0 among them", [1, 0, 1], ValueError),
            ("a float among them", [1, 1.0, 1], TypeError),
            ("ndarray", np.array([1, 1, 1]), TypeError),
        ]
    out = [
        ("nan", NAN, ValueError),
        ("inf", INF, ValueError),
        ("-inf", -INF, ValueError),
        ("1e39", 1e39, ValueError),
        ("float32 nan", np.float32("nan"), ValueError),
        ("'0.1'", "0.1", TypeError),
        ("None", None, TypeError),
        ("True", True, TypeError),
        ("[0.1]", [0.1], TypeError),
        ("1j", 1j, TypeError),
        ("1-d array", np.array([0.1]), TypeError),
    ]
    if key == "grad_scale":  # not a hyperparameter: a plain number only
        out.append(("0-d array", np.array(0.1), TypeError))
    if key in NONE_MEANS:  # None stands for a value
        out = [c for c in out if c[0] != "None"]
    if rng == "nonpositive":  # (-inf, 0]: Adafactor's beta2_decay
        out.append(("0.5", 0.5, ValueError))
    elif key != "grad_scale":  # a negative gradient scale is allowed
        out.append(("-0.5", -0.5, ValueError))
    if rng == "one_or_more":  # [1, inf): Adafactor's d
        out.append(("0.5", 0.5, ValueError))
    if key in ("beta1", "beta2", "beta", "alpha", "rho", "dampening"):
        out.append(("1.5", 1.5, ValueError))
    if key in ("beta1", "beta2", "beta"):
        out.append(("1.0", 1.0, ValueError))
    return out


def _declared_range(rule, key):
    """The declared range of hyperparameter ``key`` of a rule, or None."""
    return next((h.range for h in rule.hyper if h.name == key), None)


def functional_cases():
    """(function, case, mutate(args), error, pattern) for every function and hostile input."""
    for name, (_, lists, kw) in FUNCTIONS.items():
        for arg, writes in lists:
            for j in (0, 2):
                if entry_shape(name, arg, j) is None:  # parameter j keeps no such state
                    yield (
                        name,
                        f"{arg}[{j}]=array",
                        lambda a, L=arg, j=j: set_entry(a, L, j, lambda a: a["params"][j].copy()),
                        ValueError,
                        rf"{arg}\[{j}\] must be None",
                    )
                    continue
                for mname, make, exc, pattern in ENTRY_MUTATIONS:
                    if mname == "None" and arg == "momentum_buffers" and name.startswith("sgd"):
                        continue  # a None buffer is one to create, as documented
                    if mname == "float64" and arg in ("params", "grads"):
                        continue  # valid: float64 parameters, gradients of either type
                    if mname == "None" and shaped(name, arg):
                        exc, pattern = (
                            ValueError,
                            r"{L}\[{j}\] is None, but a .*-d parameter needs it",
                        )
                    pat = pattern.format(L=arg, j=j, S="grads" if arg == "params" else arg)
                    yield (
                        name,
                        f"{arg}[{j}]={mname}",
                        lambda a, L=arg, j=j, m=make: set_entry(a, L, j, lambda a: m(a[L][j])),
                        exc,
                        pat,
                    )
            if writes:
                r = present(name, arg)[-1]  # 2, or the last entry holding an array
                yield (
                    name,
                    f"{arg}[{r}]=read-only",
                    lambda a, L=arg, r=r: set_entry(a, L, r, lambda a: read_only(a[L][r])),
                    ValueError,
                    rf"{arg}\[{r}\] is read-only, but it is updated in place",
                )
                if present(name, arg)[:2] == [0, 1]:  # two entries of one shape to repeat
                    yield (
                        name,
                        f"{arg} lists one array twice",
                        lambda a, L=arg: set_entry(a, L, 1, lambda a: a[L][0]),
                        ValueError,
                        rf"{arg}\[[01]\] shares memory with {arg}\[[01]\]",
                    )
            # The whole list replaced.
            none_exc = ValueError if arg in OPTIONAL_LISTS else TypeError
            sgd_bufs = name.startswith("sgd") and arg == "momentum_buffers"
            for what, value_of in [
                ("None", lambda a, L: None),
                ("an ndarray", lambda a, L: a[L][0]),
                ("a generator", lambda a, L: (x for x in a[L])),
                ("a dict", lambda a, L: dict(enumerate(a[L]))),
                ("a str", lambda a, L: "abc"),
                ("an int", lambda a, L: 3),
            ]:
                exc = none_exc if what == "None" else TypeError
                yield (
                    name,
                    f"{arg} is {what}",
                    lambda a, L=arg, f=value_of: a.__setitem__(L, f(a, L)),
                    exc,
                    (
                        r"momentum_buffers (is required|must be a list)"
                        if sgd_bufs
                        else rf"{arg} (is required|must be a list or tuple)"
                    ),
                )
            yield (
                name,
                f"{arg} too short",
                lambda a, L=arg: a.__setitem__(L, a[L][:2]),
                ValueError,
                r"has 2 (arrays|entries) but params has 3|has 3 arrays but params has 2",
            )
            yield (
                name,
                f"{arg} too long",
                lambda a, L=arg: a.__setitem__(
                    L, list(a[L]) + [next(x for x in a[L][::-1] if x is not None).copy()]
                ),
                ValueError,
                r"has 4 (arrays|entries) but params has 3|has 3 arrays but params has 4",
            )
            if arg == "params":
                continue
            if shaped(name, arg) or any(shaped(name, o) for o, w in lists if o != arg and w):
                yield from shaped_aliasing(name, arg, lists)
                continue
            # Aliasing: the entry is a parameter, overlaps one, or is another written buffer.
            yield (
                name,
                f"{arg}[1] is params[1]",
                lambda a, L=arg: set_entry(a, L, 1, lambda a: a["params"][1]),
                ValueError,
                rf"{arg}\[1\] shares memory with params\[1\]|"
                rf"params\[1\] shares memory with {arg}\[1\]",
            )
            yield (
                name,
                f"{arg}[0] is params[1]",
                lambda a, L=arg: set_entry(a, L, 0, lambda a: a["params"][1]),
                ValueError,
                r"shares memory",
            )
            yield (
                name,
                f"{arg}[2] overlaps params[2]",
                lambda a, L=arg: overlap(a, "params", L),
                ValueError,
                r"shares memory",
            )
            for other, other_writes in lists:
                if other not in ("params", arg) and other_writes:
                    yield (
                        name,
                        f"{arg}[2] is {other}[2]",
                        lambda a, L=arg, O=other: set_entry(a, L, 2, lambda a: a[O][2]),
                        ValueError,
                        r"shares memory",
                    )
                    yield (
                        name,
                        f"{arg}[2] overlaps {other}[2]",
                        lambda a, L=arg, O=other: overlap(a, O, L),
                        ValueError,
                        r"shares memory",
                    )

        def params_overlap(a):
            base = np.zeros(40, np.float32)
            a["params"] = [base[:33], base[7:40], a["params"][2]]

        yield (
            name,
            "params overlap",
            params_overlap,
            ValueError,
            r"params\[[01]\] shares memory with params\[[01]\]",
        )
        for key, good in kw.items():
            for label, value, exc in bad_values(key, good, _declared_range(FUNCTION_RULE[name], key)):
                if label == "1.5" and _declared_range(FUNCTION_RULE[name], key) == "nonnegative":
                    continue  # ASGD's alpha is an exponent, not a weight in [0, 1]
                yield (
                    name,
                    f"{key}={label}",
                    lambda a, k=key, v=value: a.__setitem__("kw:" + k, v),
                    exc,
                    "steps?" if key == "step" else key,
                )
        for arg in CARRIED.get(name, {}):  # the carried numbers' lists
            for what, value_of, exc, pattern in [
                ("None", lambda a, L: None, TypeError, "must be a list of floats"),
                ("a tuple", lambda a, L: tuple(a[L]), TypeError, "must be a list of floats"),
                ("an ndarray", lambda a, L: np.array(a[L]), TypeError, "must be a list of floats"),
                ("too short", lambda a, L: a[L][:2], ValueError, "has 2 entries but params has 3"),
                ("too long", lambda a, L: a[L] + [1.0], ValueError, "has 4 entries but params has 3"),
                (
                    "[1]=None",
                    lambda a, L: [a[L][0], None, a[L][2]],
                    TypeError,
                    r"\[1\] must be a real number",
                ),
                (
                    "[1]='0.5'",
                    lambda a, L: [a[L][0], "0.5", a[L][2]],
                    TypeError,
                    r"\[1\] must be a real number",
                ),
                (
                    "[1]=True",
                    lambda a, L: [a[L][0], True, a[L][2]],
                    TypeError,
                    r"\[1\] must be a real number",
                ),
                (
                    "[2]=nan",
                    lambda a, L: [a[L][0], a[L][1], math.nan],
                    ValueError,
                    r"\[2\] must be finite",
                ),
                (
                    "[2]=inf",
                    lambda a, L: [a[L][0], a[L][1], math.inf],
                    ValueError,
                    r"\[2\] must be finite",
                ),
            ]:
                yield (
                    name,
                    f"{arg} is {what}",
                    lambda a, L=arg, f=value_of: a.__setitem__(L, f(a, L)),
                    exc,
                    rf"{arg}{pattern}" if pattern.startswith("\\") else pattern,
                )
            yield (
                name,
                f"{arg} missing",
                lambda a, L=arg: a.pop(L),
                TypeError,
                f"missing 1 required positional argument: '{arg}'",
            )
        if name.startswith("sgd") and "momentum" in kw:
            yield (
                name,
                "nesterov with dampening",
                lambda a: a.update({"kw:nesterov": True, "kw:dampening": 0.5}),
                ValueError,
                "nesterov momentum requires",
            )
        if name.startswith("sgd") and not kw.get("momentum"):
            yield (
                name,
                "nesterov without momentum",
                lambda a: a.update({"kw:nesterov": True}),
                ValueError,
                "nesterov momentum requires",
            )


def shaped_aliasing(name, arg, lists):
    """The aliasing cases of list ``arg`` where it or another written list holds states of their
    own shapes (Adafactor's): the entry becomes a view of the other array's memory, in its own
    shape, or the two become views of one buffer shifted by one element."""
    others = ["params"] + [o for o, w in lists if o not in ("params", arg) and w]
    for other in others:
        for how in ("is", "overlaps"):
            yield (
                name,
                f"{arg} {how} {other}",
                lambda a, L=arg, O=other, h=how: alias(name, a, L, O, h),
                ValueError,
                r"shares memory",
            )


def alias(name, args, first, second, how):
    """Makes an entry of list ``first`` share memory with one of list ``second`` (the last of
    each that holds an array), as a view in its own shape ("is") or shifted by one element."""
    i, k = present(name, first)[-1], present(name, second)[-1]
    a, b = args[first][i], args[second][k]
    args[first], args[second] = list(args[first]), list(args[second])
    if how == "is" and b.size >= a.size:
        args[first][i] = b.reshape(-1)[: a.size].reshape(a.shape)
    elif how == "is":
        args[second][k] = a.reshape(-1)[: b.size].reshape(b.shape)
    else:
        base = np.zeros(max(a.size, b.size) + 1, np.float32)
        va, vb = base[: a.size].reshape(a.shape), base[1 : 1 + b.size].reshape(b.shape)
        va[...], vb[...] = a, b
        args[first][i], args[second][k] = va, vb


def overlap(args, first, second):
    """Makes first[2] and second[2] views of one buffer, shifted by one element."""
    base = np.zeros(21, np.float32)
    a, b = base[:20].reshape(4, 5), base[1:].reshape(4, 5)
    a[...] = args[first][2]
    args[first], args[second] = list(args[first]), list(args[second])
    args[first][2], args[second][2] = a, b


FUNCTIONAL_CASES = list(functional_cases())


def test_every_update_function_is_covered():
    """Every update of optkern.functional (a function taking params and grads) is in FUNCTIONS."""
    import inspect

    updates = {
        n
        for n in F.__all__
        if list(inspect.signature(getattr(F, n)).parameters)[:2] == ["params", "grads"]
    }
    assert updates == {fn.__name__ for fn, _, _ in FUNCTIONS.values()}


def call(name, args):
    fn, _, kw = FUNCTIONS[name]
    arrays = {k: v for k, v in args.items() if not k.startswith("kw:")}
    kw = {**kw, **{k[3:]: v for k, v in args.items() if k.startswith("kw:")}}
    return fn(**arrays, **kw)


def everything(args, items):
    """A hash of every array of the call (generators' items included, as materialised in
    ``items``) and the identity of every list entry (sgd_ stores new buffers into its list)."""
    arrays, ids = [], []
    for k in sorted(args):
        v = items.get(k, args[k])
        if k.startswith("kw:"):
            continue
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (list, tuple)):
            ids.append([id(x) for x in v])
            arrays.append([x for x in v if isinstance(x, np.ndarray)])
        elif isinstance(v, np.ndarray):
            arrays.append(v)
    return digest(arrays), ids


@pytest.mark.parametrize(
    "name, what, mutate, exc, pattern",
    FUNCTIONAL_CASES,
    ids=[f"{c[0]}:{c[1]}" for c in FUNCTIONAL_CASES],
)
def test_functional_hostile_input_changes_nothing(name, what, mutate, exc, pattern):
    args, _ = valid_call(name)
    mutate(args)
    items = {}
    for k, v in args.items():  # see a generator's items without handing the call a used one
        if hasattr(v, "__next__"):
            items[k] = list(v)
            args[k] = iter(items[k])
    before = everything(args, items)
    with pytest.raises(exc, match=pattern):
        call(name, args)
    assert everything(args, items) == before


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_functional_valid_call_and_accepted_variants(name):
    """The unmutated call succeeds and updates the parameters in place (so each case above fails
    for its mutation alone); read-only gradients, gradients sharing memory and tuples in place of
    lists are accepted; empty lists are a no-op."""
    args, _ = valid_call(name)
    before = digest(args["params"])
    assert call(name, args) is None
    assert digest(args["params"]) != before
    args, _ = valid_call(name)
    args["grads"] = [read_only(args["grads"][0])] * 3
    args["grads"][2] = read_only(np.ones((4, 5), np.float32))
    for k in args:
        if k not in ("grads", "momentum_buffers") and k not in CARRIED.get(name, {}):
            args[k] = tuple(args[k])
    before = digest(args["params"])
    call(name, args)
    assert digest(args["params"]) != before
    empty = {k: [] for k in args}
    if isinstance(FUNCTIONS[name][2].get("step"), list):
        empty["kw:step"] = []
    assert call(name, empty) is None


# == the optimizer classes, every one ===============================================================

CLASSES = db.attack_cases()  # (class name, options) of every class in the optimizer database
CLASS_IDS = [db.case_id(c) for c in CLASSES]


def make_optimizer(kind, hp, steps):
    """An optimizer over three parameters (the last a view of a longer buffer, so that an array
    can overlap it), stepped ``steps`` times."""
    base = np.zeros(21, np.float32)
    params = [rand(s, i) for i, s in enumerate(SHAPES[:2])] + [base[:20].reshape(4, 5)]
    params[2][...] = rand((4, 5), 2)
    opt = getattr(ok, kind)(params, **hp)
    for t in range(steps):
        opt.step([rand(p.shape, 100 + 10 * t + i) for i, p in enumerate(params)])
    return opt, params, base


def step_cases(stepped):
    """(case, make grads(opt, params, base) -> list, error, pattern) for step()."""
    good = lambda params: [np.full(p.shape, 0.5, np.float32) for p in params]  # noqa: E731
    for what, value in [
        ("None", None),
        ("an ndarray", "stack"),
        ("a dict", "dict"),
        ("a generator", "gen"),
        ("a str", "abc"),
        ("an int", 3),
        ("a set", "set"),
    ]:

        def grads(opt, params, base, value=value):
            g = good(params)
            return {
                "stack": g[0],
                "dict": dict(enumerate(g)),
                "gen": (x for x in g),
                "set": {1, 2, 3},
            }.get(value, value)

        yield f"grads is {what}", grads, TypeError, "grads must be a list or tuple"
    for n in (0, 2, 4):
        yield (
            f"{n} gradients",
            lambda opt, params, base, n=n: (good(params) * 2)[:n],
            ValueError,
            rf"got {n} gradients for 3 parameters",
        )
    for j in (0, 2):
        for mname, make, exc, pattern in ENTRY_MUTATIONS:
            if mname in ("None", "float64"):
                continue  # None skips a parameter (tested below); a float64 gradient is valid

            def grads(opt, params, base, j=j, make=make):
                g = good(params)
                g[j] = make(g[j])
                return g

            yield f"grads[{j}]={mname}", grads, exc, pattern.format(L="grads", j=j, S="grads")

    def is_param(opt, params, base):
        g = good(params)
        g[1] = params[1]
        return g

    yield "grads[1] is params[1]", is_param, ValueError, r"shares memory"

    def is_other_param(opt, params, base):
        g = good(params)
        g[0] = params[1]
        return g

    yield "grads[0] is params[1]", is_other_param, ValueError, r"shares memory"

    def overlaps_param(opt, params, base):
        g = good(params)
        g[2] = base[1:].reshape(4, 5)
        return g

    yield "grads[2] overlaps params[2]", overlaps_param, ValueError, r"shares memory"
    if stepped:

        def is_state(opt, params, base, own=True):
            g = good(params)
            state = opt.state.get_by_id(params[0 if own else 1]) or {}
            arrays = [v for v in state.values() if isinstance(v, np.ndarray)]
            if not arrays:
                return None  # this optimizer keeps no state arrays
            g[0] = arrays[-1]
            return g

        yield "grads[0] is its own state", is_state, ValueError, r"shares memory"
        yield (
            "grads[0] is another parameter's state",
            lambda o, p, b: is_state(o, p, b, own=False),
            ValueError,
            r"shares memory",
        )


STEP_CASES = {stepped: list(step_cases(stepped)) for stepped in (0, 2)}


@pytest.mark.parametrize("kind, hp", CLASSES, ids=CLASS_IDS)
@pytest.mark.parametrize("stepped", [0, 2], ids=["fresh", "stepped"])
def test_step_hostile_input_changes_nothing(kind, hp, stepped):
    for case, make_grads, exc, pattern in STEP_CASES[stepped]:
        opt, params, base = make_optimizer(kind, hp, stepped)
        grads = make_grads(opt, params, base)
        if grads is None:
            continue
        items = list(grads) if hasattr(grads, "__next__") else None
        if items is not None:
            grads = iter(items)
        before = snapshot(opt, params, items or (grads if isinstance(grads, list) else []))
        with pytest.raises(exc, match=pattern):
            opt.step(grads)
        after = snapshot(opt, params, items or (grads if isinstance(grads, list) else []))
        assert after == before, case


@pytest.mark.parametrize("kind, hp", CLASSES, ids=CLASS_IDS)
def test_step_accepts_none_and_read_only_gradients(kind, hp):
    """A None gradient skips its parameter (torch's .grad is None): that parameter and its state
    stay bit-identical. Read-only gradients are fine: they are only read."""
    opt, params, _ = make_optimizer(kind, hp, 2)
    kept = digest([params[1], opt.state_dict()["state"].get(1, {})])
    opt.step(
        [
            read_only(np.full(p.shape, 0.5, np.float32)) if i != 1 else None
            for i, p in enumerate(params)
        ]
    )
    assert digest([params[1], opt.state_dict()["state"].get(1, {})]) == kept


@pytest.mark.parametrize("kind, hp", CLASSES, ids=CLASS_IDS)
@pytest.mark.parametrize("stepped", [0, 2], ids=["fresh", "stepped"])
def test_params_changed_after_construction_are_checked(kind, hp, stepped):
    """param_groups is a public list: a parameter appended twice, or an array of the wrong dtype
    put into it, is refused by the next step() with nothing changed."""
    for change, exc, pattern in [
        (lambda ps: ps.append(ps[0]), ValueError, r"\w+\[[03]\] shares memory with \w+\[[03]\]"),
        (
            lambda ps: ps.append(np.zeros(3, np.float16)),
            TypeError,
            r"params\[3\] must be a float32 or float64",
        ),
        (
            lambda ps: ps.__setitem__(1, ps[1].astype(np.int32)),
            TypeError,
            r"params\[1\] must be a float32 or float64",
        ),
        (lambda ps: ps.append(ps[2].T), ValueError, r"must be C-contiguous|shares memory"),
    ]:
        opt, params, _ = make_optimizer(kind, hp, stepped)
        change(opt.param_groups[0]["params"])
        grads = [np.full(p.shape, 0.5, np.float32) for p in opt.param_groups[0]["params"]]
        before = snapshot(opt, opt.param_groups[0]["params"], grads)
        with pytest.raises(exc, match=pattern):
            opt.step(grads)
        assert snapshot(opt, opt.param_groups[0]["params"], grads) == before


def hyperparameter_cases(kind, hp):
    opt = getattr(ok, kind)([np.zeros(1, np.float32)], **hp)
    for key, good in opt.defaults.items():
        if isinstance(good, tuple):  # a tuple argument (betas, Rprop's etas and step_sizes)
            yield from tuple_cases(getattr(ok, kind)._rule, key, good)
            continue
        if key == "nesterov":
            continue  # its constraints are covered in test_errors.py (they depend on momentum)
        for label, value, exc in bad_values(key, good, _declared_range(opt._rule, key)):
            if label == "1.5" and _declared_range(opt._rule, key) == "nonnegative":
                continue  # ASGD's alpha is an exponent, not a weight in [0, 1]
            yield key, label, value, exc, key


#: A value out of each declared range, with the message's range.
OUT_OF_RANGE = {
    "nonnegative": (-0.5, ">= 0"),
    "unit": (1.5, r"in \[0, 1\]"),
    "unit_open": (1.0, r"in \[0, 1\)"),
    "open_unit": (0.0, r"in \(0, 1\)"),
    "above_one": (1.0, "> 1"),
    "one_or_more": (0.5, ">= 1"),
    "nonpositive": (0.5, "<= 0"),
}


def tuple_cases(rule, key, good):
    """Bad values of a tuple argument, from the rule's declaration: each slot NaN, out of its
    range, or not a number; the tuple of the wrong length or not a tuple."""
    slots = [h for h in rule.hyper if h.torch == key]
    for h in slots:

        def at(v, h=h):
            return tuple(v if x.slot == h.slot else good[x.slot] for x in slots)

        yield key, f"{h.name}=nan", at(NAN), ValueError, f"{h.name} must be finite"
        yield key, f"{h.name}=inf", at(INF), ValueError, f"{h.name} must be finite"
        yield key, f"{h.name}='a'", at("a"), TypeError, f"{h.name} must be a real number"
        value, what = OUT_OF_RANGE[h.range]
        yield key, f"{h.name}={value}", at(value), ValueError, f"{h.name} must be {what}"
    if key == "step_sizes":  # declared order between the two (require_order in rule_api.hpp)
        yield key, "min > max", (1.0, 0.5), ValueError, "step_size_min must be <= step_size_max"
    size = "a pair" if len(slots) == 2 else f"a tuple of {len(slots)}"
    for label, value in [("scalar", good[0]), ("None", None), ("short", good[:1]), ("'ab'", "ab")]:
        yield key, label, value, TypeError, f"{key} must be {size}"


HP_CASES = [(kind, hp, *case) for kind, hp in CLASSES for case in hyperparameter_cases(kind, hp)]


@pytest.mark.parametrize(
    "kind, hp, key, label, value, exc, pattern",
    HP_CASES,
    ids=[f"{c[0]}:{c[2]}={c[3]}" for c in HP_CASES],
)
def test_bad_hyperparameter_refused_everywhere(kind, hp, key, label, value, exc, pattern):
    """At construction, in add_param_group, and set between steps (fresh and stepped): refused,
    nothing changed."""
    p = np.ones(3, np.float32)
    with pytest.raises(exc, match=pattern):
        getattr(ok, kind)([p], **{**hp, key: value})
    for stepped in (0, 2):
        opt, params, _ = make_optimizer(kind, hp, stepped)
        grads = [np.full(q.shape, 0.5, np.float32) for q in params]
        before = snapshot(opt, params, grads)
        with pytest.raises(exc, match=pattern):
            opt.add_param_group({"params": [p], key: value})
        assert len(opt.param_groups) == 1
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises(exc, match=pattern):
            opt.step(grads)
        opt.param_groups[0][key] = good
        assert snapshot(opt, params, grads) == before


def construction_cases():
    p, q = np.ones(5, np.float32), np.ones(3, np.float32)
    base = np.zeros(10, np.float32)
    yield "None", lambda: None, TypeError, "params must be a list"
    yield "[]", lambda: [], ValueError, "empty parameter list"
    yield "()", lambda: (), ValueError, "empty parameter list"
    yield "empty generator", lambda: iter(()), ValueError, "empty parameter list"
    yield "a str", lambda: "abc", TypeError, "params must be a list"
    yield "an int", lambda: 3, TypeError, "params must be a list"
    yield "a set", lambda: {1.0}, TypeError, "not a set"
    yield "a dict", lambda: {"params": [p]}, TypeError, "params must be a list"
    yield (
        "[None]",
        lambda: [None],
        TypeError,
        r"params\[0\] must be a float32 or float64 NumPy array, got NoneType",
    )
    yield (
        "[p, None]",
        lambda: [p, None],
        TypeError,
        r"params\[1\] must be a float32 or float64 NumPy array",
    )
    yield (
        "[[1.0, 2.0]]",
        lambda: [[1.0, 2.0]],
        TypeError,
        r"params\[0\] must be a float32 or float64 NumPy array, got list",
    )
    for mname, make, exc, pattern in ENTRY_MUTATIONS:
        if mname in ("None", "longer", "reshaped", "size 0", "float64", "0-d"):
            continue  # valid parameters by themselves
        yield (
            f"[{mname}]",
            lambda make=make: [q, make(np.ones((4, 5), np.float32))],
            exc,
            pattern.format(L="params", j=1),
        )
    yield "[read-only]", lambda: [read_only(p)], ValueError, r"params\[0\] is read-only"
    yield "[p, p]", lambda: [p, p], ValueError, r"params\[1\] shares memory with params\[0\]"
    yield "overlapping", lambda: [base[:6], base[4:]], ValueError, "shares memory"
    yield "group without params", lambda: [{"lr": 0.1}], ValueError, 'must have a "params" entry'
    yield "group of []", lambda: [{"params": []}], ValueError, "empty parameter list"
    yield "group of None", lambda: [{"params": None}], TypeError, "must be a list"
    yield "group of a set", lambda: [{"params": {1}}], TypeError, "not a set"
    yield (
        "p in two groups",
        lambda: [{"params": [p]}, {"params": [p]}],
        ValueError,
        "more than one parameter group",
    )
    yield (
        "overlap across groups",
        lambda: [{"params": [base[:6]]}, {"params": [base[4:]]}],
        ValueError,
        "shares memory",
    )
    yield (
        "array then group",
        lambda: [p, {"params": [q]}],
        TypeError,
        r"params\[1\] must be a float32",
    )
    yield "group then array", lambda: [{"params": [p]}, q], TypeError, "a param group must be a dict"


CONSTRUCTION_CASES = list(construction_cases())


@pytest.mark.parametrize("kind, hp", CLASSES, ids=CLASS_IDS)
def test_bad_params_refused_at_construction(kind, hp):
    for case, make, exc, pattern in CONSTRUCTION_CASES:
        params = make()
        with pytest.raises(exc, match=pattern):
            getattr(ok, kind)(params, **hp)


@pytest.mark.parametrize("kind, hp", CLASSES, ids=CLASS_IDS)
def test_bad_param_group_refused_and_nothing_changes(kind, hp):
    opt, params, base = make_optimizer(kind, hp, 2)
    before = snapshot(opt, params)
    for group, exc, pattern in [
        ({"params": [params[0]]}, ValueError, "more than one parameter group"),
        ({"params": [base[1:].reshape(4, 5)]}, ValueError, "shares memory"),
        ({"params": [np.zeros(3, np.float16)]}, TypeError, r"params\[3\] must be a float32"),
        ({"params": []}, ValueError, "empty parameter list"),
        ({"params": None}, TypeError, "must be a list"),
        ({"lr": 0.1}, ValueError, 'must have a "params" entry'),
        ([np.zeros(3, np.float32)], TypeError, "a param group must be a dict"),
        (None, TypeError, "a param group must be a dict"),
    ]:
        with pytest.raises(exc, match=pattern):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1 and snapshot(opt, params) == before


@pytest.mark.parametrize("kind, hp", CLASSES, ids=CLASS_IDS)
@pytest.mark.parametrize("stepped", [0, 2], ids=["fresh", "stepped"])
def test_error_in_a_later_group_changes_no_group(kind, hp, stepped):
    """Two groups: everything is validated before the first group is updated."""

    def build():
        a, b, c = rand((6,), 0), rand((5,), 1), rand((2, 3), 2)
        opt = getattr(ok, kind)([{"params": [a, b]}, {"params": [c], "weight_decay": 0.5}], **hp)
        for t in range(stepped):
            opt.step([rand(p.shape, 50 + t) for p in (a, b, c)])
        return opt, [a, b, c]

    def good(params):
        return [np.full(p.shape, 0.25, np.float32) for p in params]

    for case, change, exc, pattern in [
        (
            "float16 in group 2",
            lambda o, ps, g: g.__setitem__(2, g[2].astype(np.float16)),
            TypeError,
            r"grads\[2\] must be a float32",
        ),
        (
            "shape in group 2",
            lambda o, ps, g: g.__setitem__(2, np.ones(6, np.float32)),
            ValueError,
            r"grads\[2\] has shape \(6,\)",
        ),
        (
            "group 2's grad is a group 1 param",
            lambda o, ps, g: g.__setitem__(2, ps[0].reshape(2, 3)),
            ValueError,
            "shares memory",
        ),
        (
            "group 1's grad is the group 2 param",
            lambda o, ps, g: g.__setitem__(0, ps[2].ravel()),
            ValueError,
            "shares memory",
        ),
        (
            "bad lr in group 2",
            lambda o, ps, g: o.param_groups[1].__setitem__("lr", NAN),
            ValueError,
            "lr must be finite",
        ),
        (
            "None in group 2, float16 in group 1",
            lambda o, ps, g: (g.__setitem__(2, None), g.__setitem__(1, g[1].astype(np.float16))),
            TypeError,
            r"grads\[1\] must be a float32",
        ),
    ]:
        opt, params = build()
        grads = good(params)
        change(opt, params, grads)
        before = snapshot(opt, params, [g for g in grads if g is not None])
        with pytest.raises(exc, match=pattern):
            opt.step(grads)
        assert snapshot(opt, params, [g for g in grads if g is not None]) == before, case
