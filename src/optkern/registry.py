"""The update rules, as the C++ core declares them (``src/cpp/rules/<name>.inc``), and what is
built from each declaration: the optimizer class (torch-style constructor, formulas in the
docstring), the function of :mod:`optkern.functional`, and the source text of both signatures,
which the type stubs repeat (:mod:`optkern._stubs`).

``rules()`` lists them; each :class:`Rule` says its hyperparameters (name, range, default and
torch's argument), its state buffers and whether it counts steps. Tests and benchmarks iterate
this list, so a rule declared in C++ is tested and measured without being listed anywhere else.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import _core

__all__ = ["Rule", "Hyper", "State", "Carried", "Rows", "rules", "rule", "as_real", "as_flag"]


@dataclass(frozen=True)
class Hyper:
    name: str  # as optkern.functional and _core take it
    range: str  # "nonnegative", "unit" [0, 1], "unit_open" [0, 1), "open_unit" (0, 1),
    #             "above_one" (1, inf), "one_or_more" [1, inf), "nonpositive" (-inf, 0] or "flag"
    default: Any  # None where the declared default is None (see if_none)
    torch: str  # torch.optim's argument: "betas" for beta1 and beta2
    slot: int  # -1, or the position within torch's tuple argument
    #: The value None stands for in float32, where the hyperparameter takes None (Adafactor's
    #: eps1: the machine epsilon of the parameter's dtype, float32's here); None where None is
    #: refused. The core keeps a given None as None (``_core.validate`` returns it).
    if_none: Optional[float] = None
    #: An option torch.optim's class of the same name lacks (a textbook form: Adagrad's
    #: eps_inside_sqrt): optkern's class and function take it, optkern.torch does not.
    optkern_only: bool = False


@dataclass(frozen=True)
class State:
    name: str  # torch's state name, e.g. "exp_avg"
    arg: str  # optkern.functional's list argument, e.g. "exp_avgs"
    when: Optional[str]  # None: always; else the option that must be nonzero / True
    init: Optional[str]  # None: starts at zero; else the hyperparameter it starts at
    #: How its shape follows the parameter's (the core's StateShape): "like_param"; "rows" and
    #: "cols" (one number per row / column of the last two dimensions, parameters of >= 2
    #: dimensions only); "unfactored" (like_param, parameters of <= 1 dimension only).
    shape: str = "like_param"
    #: Never negative (a moving average of squares): as int8 state it takes bitsandbytes'
    #: unsigned dynamic map, twice as fine as the signed one.
    nonnegative: bool = False
    #: Whether it may be kept as int8 (blockwise 8-bit) state: not an average of the parameter
    #: itself (ASGD's ax, Schedule-Free's z) nor a factored rule's state.
    int8: bool = True

    def shape_for(self, param_shape: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
        """This state's shape for a parameter of ``param_shape``, or None where the parameter
        keeps no such state (absent from its state dict, None in a functional list)."""
        if self.shape == "like_param":
            return tuple(param_shape)
        return _core.state_shape(self.shape, tuple(param_shape))


@dataclass(frozen=True)
class Carried:
    """A number per parameter that the rule carries from step to step, in double (NAdam's
    ``mu_product``, ASGD's ``eta`` and ``mu``): a float in the parameter's state under torch's
    name; optkern.functional takes a list of them (``arg``) and updates it in place."""

    name: str
    arg: str
    init: float  # its value before the first step, unless init_from is set
    init_from: Optional[str]  # None, or the hyperparameter it starts at (ASGD's eta: lr)


@dataclass(frozen=True)
class Rows:
    """How a rule takes a row-sparse gradient (optkern.RowSparse): ``accepted`` or refused (as
    torch refuses sparse gradients); ``dense_when``: the hyperparameter that, when nonzero, makes
    it update every row (SGD's momentum), else only the listed rows; ``refused_when``: the one
    that, when nonzero, makes it refuse the gradient (weight_decay)."""

    accepted: bool = False
    dense_when: Optional[str] = None
    refused_when: Optional[str] = None


@dataclass(frozen=True)
class Rule:
    name: str
    cls: str
    doc: str
    counts_steps: bool  # each parameter's state holds a step count
    uses_step: bool  # the per-step scalars depend on it (the functional function takes step=)
    kernel: str
    weight: int
    hyper: Tuple[Hyper, ...]
    states: Tuple[State, ...]
    carried: Tuple[Carried, ...] = ()
    # Sums per block of the kernel's reduction pass (LAMB: 2, the norms of p and u), which runs
    # over every array before the element-wise pass; 0 for a single element-wise pass.
    reduction: int = 0
    # Passes of a factored kernel (Adafactor: 3), whose states may be shaped unlike the parameter
    # (State.shape); 0 for an element-wise kernel.
    factored: int = 0
    # The learning rate the examples train it at (optkern.examples), or None: not in their
    # default comparison (they take it by name, at its default lr).
    example_lr: Optional[float] = None
    # What benchmarks compare it with where torch.optim has no class of its name ("optax.lamb",
    # "torch.optim.SGD(momentum=beta, dampening=beta)": arguments given as the class's own,
    # torch's names), or None.
    peer: Optional[str] = None
    # How it takes a row-sparse gradient (optkern.RowSparse): the core's RowsDecl.
    rows: Optional["Rows"] = None

    # -- torch's view: arguments as the class takes them ---------------------------------------------

    def torch_args(self) -> List[Tuple[str, Any]]:
        """(argument, default) in torch's order, tuple arguments (betas) joined; without the
        options torch lacks (``own_args``) and maximize."""
        out: List[Tuple[str, Any]] = []
        for h in self.hyper:
            if h.optkern_only:
                continue
            if h.slot <= 0:
                out.append((h.torch, h.default if h.slot < 0 else (h.default,)))
            else:
                name, prev = out[-1]
                out[-1] = (name, prev + (h.default,))
        return out

    def own_args(self) -> List[Tuple[str, Any]]:
        """(argument, default) of the options torch.optim's class lacks (the textbook forms),
        keyword-only after torch's arguments."""
        return [(h.torch, h.default) for h in self.hyper if h.optkern_only]

    def to_core(self, group: Dict[str, Any], lr: Any = None) -> Dict[str, Any]:
        """The core's hyperparameters from a group in torch's names (betas split), each turned
        into a Python float or bool where it is a real scalar; the core checks the ranges."""
        out: Dict[str, Any] = {}
        for h in self.hyper:
            value = group[h.torch] if h.torch in group else h.default
            if h.name == "lr" and lr is not None:
                value = lr
            if h.slot >= 0:
                if h.slot == 0:
                    pair = value
                    names = [x.name for x in self.hyper if x.torch == h.torch]
                    if (
                        isinstance(pair, (str, bytes))
                        or not hasattr(pair, "__len__")
                        or len(pair) != len(names)
                    ):
                        size = "a pair" if len(names) == 2 else f"a tuple of {len(names)}"
                        raise TypeError(
                            f"{h.torch} must be {size} ({', '.join(names)}), got {pair!r}"
                        )
                value = pair[h.slot]
            out[h.name] = as_flag(value) if h.range == "flag" else as_real(value)
        return out

    def state_spec(self, core: Dict[str, Any]) -> Dict[str, float]:
        """State arrays a parameter needs under these (validated) hyperparameters, each with the
        value it starts at."""
        return {
            s.name: (0.0 if s.init is None else float(core[s.init]))
            for s in self.states
            if s.when is None or core[s.when]
        }

    def carried_spec(self, core: Dict[str, Any]) -> Dict[str, float]:
        """The carried numbers a parameter's state holds, each with the value it starts at."""
        return {
            c.name: (float(c.init) if c.init_from is None else float(core[c.init_from]))
            for c in self.carried
        }

    def state_shapes(self, core: Dict[str, Any], param_shape: Tuple[int, ...]) -> Dict[str, Any]:
        """The state arrays a parameter of ``param_shape`` needs under these hyperparameters:
        {name: (shape, start value)}."""
        out = {}
        for s in self.states:
            if s.when is not None and not core[s.when]:
                continue
            shape = s.shape_for(param_shape)
            if shape is not None:
                out[s.name] = (shape, 0.0 if s.init is None else float(core[s.init]))
        return out

    def state(self, name: str) -> "State":
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def switch(self) -> Optional[str]:
        """For a Schedule-Free rule (one that keeps ``z``, the point its ``train()`` and
        ``eval()`` move the parameter towards), the hyperparameter that interpolates between
        its points: the first one in (0, 1), where both ``1 - beta`` and ``1 / beta`` are
        defined (beta1, momentum). None for any other rule."""
        if "z" not in self.array_state_names:
            return None
        return next(h.name for h in self.hyper if h.range == "open_unit")

    @property
    def array_state_names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def carried_names(self) -> Tuple[str, ...]:
        return tuple(c.name for c in self.carried)


def as_real(value: Any) -> Any:
    """A real scalar as a Python float: int and float as they are, NumPy scalars, 0-d integer and
    float arrays and anything else 0-d with ``__float__`` (a 0-d torch tensor, without importing
    torch) converted; 0-d arrays of strings, bytes or objects are not numbers, even when
    ``float()`` would parse them.
    Anything else is returned unchanged for the core to refuse with a message naming it."""
    kind = type(value)
    if kind is float or kind is int:
        return value
    if isinstance(value, (bool, np.bool_, str, bytes, complex)):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "__float__"):
        dtype = getattr(value, "dtype", None)
        if isinstance(dtype, np.dtype) and dtype.kind not in "iuf":
            return value  # a 0-d string, bytes or object array converts by parsing: not a number
        if "bool" in str(dtype) or "complex" in str(dtype):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    return value


def as_flag(value: Any) -> Any:
    """True/False, NumPy's bool and a 0-d boolean array as a Python bool; anything else unchanged
    (the core refuses it)."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_) or (
        getattr(value, "ndim", None) == 0 and "bool" in str(getattr(value, "dtype", ""))
    ):
        return bool(value)
    return value


def _load() -> Dict[str, Rule]:
    out = {}
    for r in _core.rules():
        out[r["name"]] = Rule(
            name=r["name"],
            cls=r["cls"],
            doc=r["doc"],
            counts_steps=r["counts_steps"],
            uses_step=r["uses_step"],
            kernel=r["kernel"],
            weight=r["weight"],
            reduction=r["reduction"],
            factored=r["factored"],
            example_lr=r["example_lr"],
            peer=r["peer"],
            rows=Rows(**r["rows"]),
            hyper=tuple(Hyper(**h) for h in r["hyper"] if h["name"] != "maximize"),
            states=tuple(State(**s) for s in r["states"]),
            carried=tuple(Carried(**c) for c in r["carried"]),
        )
    return out


_RULES = _load()


def rules() -> List[Rule]:
    """Every update rule, in declaration order."""
    return list(_RULES.values())


def rule(name: str) -> Rule:
    return _RULES[name]


# -- what is built from a declaration --------------------------------------------------------------
#
# The classes (optkern._classes), the functions of optkern.functional and their type stubs
# (optkern._stubs) take their signatures from the source text made here, so the three cannot
# disagree.

_MAXIMIZE_NOTE = (
    "\n\nWith ``maximize=True`` the update uses -g. torch's execution flags are "
    "accepted where they change nothing: ``foreach`` and ``fused`` (optkern's "
    "update is always one fused multi-tensor call), ``differentiable=False``, "
    "``capturable=False``."
)

#: The keyword-only arguments every class takes after the rule's own: torch's execution flags.
EXECUTION_FLAGS = (
    ("maximize", "bool", False),
    ("foreach", "Optional[bool]", None),
    ("fused", "Optional[bool]", None),
    ("differentiable", "bool", False),
    ("capturable", "bool", False),
)


def annotation(default: Any) -> str:
    """The annotation of a hyperparameter from its declared default (a tuple argument's items
    each; None where the declaration takes None, Adafactor's eps1)."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, tuple):
        return "Tuple[" + ", ".join(annotation(d) for d in default) + "]"
    if default is None:
        return "Optional[float]"
    return "float"


#: The precision options of optkern's NumPy classes (optimizer.Optimizer), after the execution
#: flags: (name, annotation, default).
PRECISION_ARGS = (
    ("state_dtype", "Any", "float32"),
    ("stochastic_rounding", "bool", False),
    ("master_weights", "bool", False),
)


def class_signature(r: Rule) -> str:
    """The constructor's parameters, as source text: ``params``, torch's arguments of the rule
    in torch's order (tuple arguments joined); then, keyword only, the options torch's class
    lacks (``Rule.own_args``: the textbook forms), the execution flags and the precision
    options."""
    args = [f"{name}: {annotation(d)} = {d!r}" for name, d in r.torch_args()]
    own = [f"{name}: {annotation(d)} = {d!r}" for name, d in r.own_args()]
    flags = [f"{name}: {ann} = {d!r}" for name, ann, d in EXECUTION_FLAGS + PRECISION_ARGS]
    return ", ".join(["self", "params: Any", *args, "*", *own, *flags])


def first_update_states(r: Rule) -> Tuple[str, ...]:
    """States that a rule without step counts keeps only under an option and creates at the
    update that first needs them (torch's SGD: the momentum buffer starts as the gradient; the
    kernel is told by a step count of 1). optkern.functional takes None entries for them."""
    if r.counts_steps:
        return ()
    return tuple(s.name for s in r.states if s.when is not None)


#: What a state's name gets for the list of its int8 form's absmax arrays (``exp_avg_absmax``:
#: the key of the optimizer classes' state dicts and of the core's states dict).
ABSMAX_SUFFIX = "_absmax"


def absmax_args(r: Rule) -> List[str]:
    """The functional keyword arguments of rule ``r``'s int8 absmax lists: one per state that
    may be kept as int8 (``State.int8``)."""
    return [s.name + ABSMAX_SUFFIX for s in r.states if s.int8]


def functional_signature(r: Rule) -> str:
    """The functional function's parameters, as source text: params, grads, the state lists a
    step always needs, the carried lists and the lists the first update creates (SGD's momentum
    buffers, third as in torch's functional sgd) (positional); then, keyword only, the other
    lists needed only under an option, the int8 states' absmax lists (:func:`absmax_args`), the
    step counts (where the per-step scalars use them), the hyperparameters with their declared
    defaults, ``maximize`` and ``grad_scale``."""
    first = first_update_states(r)
    positional = ["params: ArrayList", "grads: ArrayList"]
    positional += [f"{s.arg}: ArrayList" for s in r.states if s.when is None]
    positional += [f"{c.arg}: List[float]" for c in r.carried]
    positional += [
        f"{s.arg}: Optional[List[Optional[np.ndarray]]] = None" for s in r.states if s.name in first
    ]
    keyword = [
        f"{s.arg}: Optional[ArrayList] = None"
        for s in r.states
        if s.when is not None and s.name not in first
    ]
    keyword += [f"{a}: Optional[List[Optional[np.ndarray]]] = None" for a in absmax_args(r)]
    keyword += ["step: Steps"] if r.uses_step else []
    keyword += [f"{h.name}: {annotation(h.default)} = {h.default!r}" for h in r.hyper]
    keyword += ["maximize: bool = False", "grad_scale: float = 1.0"]
    return ", ".join([*positional, "*", *keyword])


def functional_doc(r: Rule) -> str:
    doc = (
        f"{r.cls} over lists of arrays, state passed in explicitly (see "
        f":class:`optkern.{r.cls}` for the formulas)."
    )
    for s in r.states:
        if s.when is not None:
            doc += f" ``{s.arg}`` is needed when {s.when} is on"
            if s.name in first_update_states(r):
                doc += (
                    "; a None entry is a buffer that does not exist yet: it is created, "
                    "filled by torch's first-step rule (it becomes the gradient) and stored "
                    "back into the list"
                )
            doc += "."
    shaped = [st for st in r.states if st.shape != "like_param"]
    if shaped:
        doc += (
            " "
            + ", ".join(f"``{st.arg}``" for st in shaped)
            + ": one entry per parameter, shaped by its kind ("
            + ", ".join(f"{st.arg}: {st.shape}" for st in shaped)
            + "; rows: [..., R, 1], cols: [..., 1, C] for >= 2 dimensions, unfactored: the "
            "parameter's shape for <= 1 dimension), None for a parameter that keeps no such state."
        )
    int8 = [s for s in r.states if s.int8]
    if int8:
        doc += (
            " int8 state (bitsandbytes' blockwise 8-bit form, as ``state_dtype='int8'`` keeps "
            "it): a state list of uint8 codes shaped like the parameters, with "
            + ", ".join(f"``{s.name}{ABSMAX_SUFFIX}``" for s in int8)
            + " beside it: float32 arrays of one absmax per block of 256 elements (None for a "
            "parameter whose state is not int8)."
        )
    if r.carried:
        doc += (
            " " + ", ".join(f"``{c.arg}``" for c in r.carried) + ": lists of floats, "
            "one per parameter (starting at "
            + ", ".join(f"{c.init_from or c.init}" for c in r.carried)
            + "), which the call updates in place."
        )
    return doc


_SCOPE = {
    "Any": Any,
    "Tuple": Tuple,
    "List": List,
    "Optional": Optional,
    "Sequence": Any,
    "ArrayList": Any,
    "Steps": Any,
    "np": np,
}


def make_class(r: Rule, base: type, module: str) -> type:
    """The optimizer class of rule ``r``, its constructor :func:`class_signature`."""
    keys = ", ".join(f"{name}={name}" for name, _ in r.torch_args() + r.own_args())
    precision = ", ".join(f"{name}={name}" for name, _, _ in PRECISION_ARGS)
    src = (
        f"def __init__({class_signature(r)}) -> None:\n"
        f"    check_execution_flags(foreach=foreach, fused=fused,\n"
        f"                          differentiable=differentiable, capturable=capturable)\n"
        f"    base.__init__(self, params, dict({keys}, maximize=maximize), {precision})\n"
    )
    scope: Dict[str, Any] = {**_SCOPE, "base": base, "check_execution_flags": check_execution_flags}
    exec(src, scope)  # noqa: S102 (a signature built from the declaration, as namedtuple does)
    init = scope["__init__"]
    init.__qualname__ = f"{r.cls}.__init__"
    init.__module__ = module
    return type(
        r.cls,
        (base,),
        {"__init__": init, "__doc__": r.doc + _MAXIMIZE_NOTE, "_rule": r, "__module__": module},
    )


def check_execution_flags(
    *, foreach: Any = None, fused: Any = None, differentiable: Any = False, capturable: Any = False
) -> None:
    """torch's execution flags: accepted where they change nothing (None or False; fused=True is
    what optkern always does), refused where they would."""
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be None or a bool, got {value!r}")
    for name, value in (("differentiable", differentiable), ("capturable", capturable)):
        if value is None or value is False or (isinstance(value, np.bool_) and not value):
            continue
        if value is True or isinstance(value, np.bool_):
            why = (
                "optkern updates NumPy arrays in place and records no autograd graph"
                if name == "differentiable"
                else "optkern runs on the CPU; there is no CUDA graph to capture"
            )
            raise ValueError(f"{name}=True is not supported: {why}")
        raise TypeError(f"{name} must be a bool, got {value!r}")


def make_functional(r: Rule, run: Callable, module: str) -> Callable:
    """``<name>_`` of optkern.functional for rule ``r``, its parameters
    :func:`functional_signature`: one call of ``run`` with the state lists by name."""
    states = ", ".join(
        [f"{s.name!r}: {s.arg}" for s in r.states] + [f"{c.name!r}: {c.arg}" for c in r.carried]
    )
    names = "".join(f"{h.name!r}: {h.name}, " for h in r.hyper)
    absmax = "".join(f"{a!r}: {a}, " for a in absmax_args(r))
    src = (
        f"def {r.name}_({functional_signature(r)},\n"
        f"        _positions: Optional[Sequence[int]] = None) -> None:\n"
        f"    states = {{{states}}}\n"
        f"    for key, value in {{{absmax}}}.items():\n"
        f"        if value is not None:\n"
        f"            states[key] = value\n"
        f"    run({r.name!r}, params, grads, states, {{{names}'maximize': maximize}},\n"
        f"        {'step' if r.uses_step else 'None'}, grad_scale, _positions)\n"
    )
    scope: Dict[str, Any] = {**_SCOPE, "run": run}
    exec(src, scope)  # noqa: S102
    fn = scope[f"{r.name}_"]
    fn.__doc__ = functional_doc(r)
    fn.__module__ = module
    return fn
