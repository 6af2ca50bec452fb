"""The Optimizer base class: parameter groups, per-parameter state and torch-style state dicts.

Each optimizer class is built from one update rule's declaration (:mod:`optkern.registry`): its
hyperparameters, the state a parameter needs and the rule's name in the C++ core. A step goes down
the layers once: split the gradients by group, evaluate each group's hyperparameters (checked again
only when they changed) and learning rate, optionally one norm pass, then one validated C++ call
per group, all groups validated before the first is updated.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Dict, Iterable, Iterator, List, MutableMapping, Optional, Sequence

import numpy as np

from . import _core, _lowbits
from .clip import check_norm_type, clip_coefficient, total_norm
from .flat import FlatParams
from .functional import check_nonnegative
from .registry import Rule, as_flag, as_real
from .sparse import RowSparse, check_row_sources, for_norms

__all__ = ["Optimizer", "ParamState", "StaleParameterWarning"]


class StaleParameterWarning(RuntimeWarning):
    """A parameter is held by nothing but its optimizer any more: the code that read it has
    replaced it with another array, so the optimizer updates an array nobody reads."""


class ParamState(MutableMapping):
    """Per-parameter state, keyed by the parameter array itself (by identity, like torch's
    ``optimizer.state[param]``: NumPy arrays are not hashable)."""

    def __init__(self) -> None:
        self._by_id: Dict[int, tuple] = {}  # id(param) -> (param, state dict)
        self.version = 0  # changes whenever a parameter's state dict is set or removed

    def __getitem__(self, param: np.ndarray) -> Dict[str, Any]:
        try:
            return self._by_id[id(param)][1]
        except KeyError:
            raise KeyError("no state for this parameter (it has not been stepped yet)") from None

    def __setitem__(self, param: np.ndarray, state: Dict[str, Any]) -> None:
        # What a step reads without checking again: a dict, its step count a whole number (as a
        # load takes it; True, "3" or 2**63 would otherwise reach the kernels' step arithmetic).
        if not isinstance(state, dict):
            raise TypeError(f"a parameter's state must be a dict, got {type(state).__name__}")
        if "step" in state and type(state["step"]) is not int:
            state["step"] = _load_step(state["step"], "state['step']")
        elif "step" in state and not 0 <= state["step"] <= MAX_LOADED_STEP:
            _load_step(state["step"], "state['step']")
        self._by_id[id(param)] = (param, state)  # keeping param alive keeps its id unique
        self.version += 1

    def __delitem__(self, param: np.ndarray) -> None:
        del self._by_id[id(param)]
        self.version += 1

    def __contains__(self, param: object) -> bool:
        return id(param) in self._by_id

    def __iter__(self) -> Iterator[np.ndarray]:
        # A snapshot: another thread may add or remove entries while this one iterates.
        return iter([p for p, _ in list(self._by_id.values())])

    def clear(self) -> None:
        # One assignment (MutableMapping's clear pops entries one by one, racing a step).
        self._by_id = {}
        self.version += 1

    def __len__(self) -> int:
        return len(self._by_id)

    def get_by_id(self, param: np.ndarray) -> Optional[Dict[str, Any]]:
        entry = self._by_id.get(id(param))
        return None if entry is None else entry[1]

    def __getstate__(self) -> Dict[str, Any]:
        # ids do not survive pickling: store the (param, state) pairs, re-keyed on unpickling.
        return {"pairs": list(self._by_id.values()), "version": self.version}

    def __setstate__(self, saved: Dict[str, Any]) -> None:
        self._by_id = {id(p): (p, s) for p, s in saved["pairs"]}
        self.version = saved["version"]


def _as_param_list(params: Any, where: str) -> List[np.ndarray]:
    if isinstance(params, np.ndarray):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            f"{where} must be an ordered sequence of arrays, not a set "
            "(its order, which state_dict ids follow, would change between runs)"
        )
    if isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise TypeError(
            f"{where} must be a list of float32 or float64 arrays, got {type(params).__name__}"
        )
    return list(params)


class Optimizer:
    """Base class of the optimizers. ``params`` is a list of float32, float64, float16 or
    bfloat16 (``ml_dtypes.bfloat16``) arrays (a group may mix them), or a list of dicts
    (parameter groups) each with a ``"params"`` list and any hyperparameters that override the
    optimizer's defaults for that group. A gradient may have any of these types, whatever its
    parameter's. 16-bit parameters are computed in float32 and stored rounded to nearest even.

    Precision options (keyword-only, for the whole optimizer):

    - ``state_dtype``: ``"float32"`` (default), ``"bfloat16"`` or ``"int8"`` (blockwise 8-bit,
      bitsandbytes' dynamic maps: uint8 codes and a float32 ``<name>_absmax`` per block of 256
      elements) for the state of float32 and 16-bit parameters; a float64 parameter's state is
      float64 and takes only ``"float32"``.
    - ``stochastic_rounding``: a 16-bit parameter is rounded up or down at random in proportion
      (noise keyed by the step, the parameter's position and the element: reproducible, the same
      for any thread count).
    - ``master_weights``: each 16-bit parameter has a float32 copy in its state
      (``master_param``), which the rule updates; the parameter is that copy rounded to nearest.

    Each is an attribute of that name; setting one checks the three together again and applies
    from the next step on.

    ``step(grads)`` takes the gradients aligned with the parameters (group order, then list
    order) and updates parameters and state in place. A gradient may be None: that parameter is
    skipped, as torch skips a parameter whose ``.grad`` is None.

    A group's ``lr`` may be a number or a callable ``step -> lr``, called once per step with the
    number of the step being taken (1 on the first; ``step_count`` counts the steps taken so far),
    before anything is written.

    Hyperparameters are checked when they are set: at construction, by ``add_param_group`` and
    ``load_state_dict``, and, when a group's values were changed in place, by the next ``step``.
    Real scalars (NumPy scalars, 0-d arrays and tensors) are stored as Python floats.
    """

    #: The update rule (set on each class built by optkern.registry).
    _rule: Rule
    #: Attributes that pickling leaves out (rebuilt empty): keyed by id(), stale in a new process.
    _transient_attrs = ("_checked", "_step_plan")
    #: The plan kept from the last step that went the whole way (see step), or None.
    _step_plan: Any = None
    _isa_name: Optional[str] = None
    _warn_stale_on = True
    #: True while a callable lr runs: step, add_param_group and load_state_dict then refuse.
    _in_lr = False

    def __init__(
        self,
        params: Any,
        defaults: Dict[str, Any],
        *,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None:
        if getattr(type(self), "_rule", None) is None:
            raise TypeError(
                "Optimizer is the base of optkern's rule classes (optkern.Adam, ...); "
                "it cannot be used by itself"
            )
        self._precision = _lowbits.check_precision(
            self._rule, state_dtype, stochastic_rounding, master_weights
        )
        self.defaults = dict(defaults)
        self.param_groups: List[Dict[str, Any]] = []
        self.state = ParamState()
        # [steps taken]: advanced by the C++ core in the same breath as the kernels, so that an
        # interrupted step is either wholly recorded or not at all.
        self._counter = [0]
        self.skipped_steps = 0  # steps skip_if_nonfinite refused
        self._checked: Dict[int, _Checked] = {}  # id(group) -> its hyperparameters, validated
        self._lock = threading.RLock()  # one step (or group change) at a time per optimizer
        self._check_group(self.defaults)
        groups = _as_param_list(params, "params")
        if len(groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    @property
    def _isa(self) -> Optional[str]:
        """Testing hook: the name of a compiled kernel build to run instead of the active one."""
        return self._isa_name

    @_isa.setter
    def _isa(self, name: Optional[str]) -> None:
        self._isa_name = name
        self._step_plan = None

    @property
    def warn_stale(self) -> bool:
        """Whether ``step`` warns (``StaleParameterWarning``, once per parameter) when a parameter
        is held by nothing but the optimizer any more (default True)."""
        return self._warn_stale_on

    @warn_stale.setter
    def warn_stale(self, on: bool) -> None:
        self._warn_stale_on = bool(on)
        self._step_plan = None

    # The precision options: checked together when one is set, and a kept plan (which follows
    # the options it was made under) dropped.

    @property
    def state_dtype(self) -> str:
        return self._precision[0]

    @state_dtype.setter
    def state_dtype(self, value: Any) -> None:
        self._set_precision(value, *self._precision[1:])

    @property
    def stochastic_rounding(self) -> bool:
        return self._precision[1]

    @stochastic_rounding.setter
    def stochastic_rounding(self, on: Any) -> None:
        self._set_precision(self._precision[0], on, self._precision[2])

    @property
    def master_weights(self) -> bool:
        return self._precision[2]

    @master_weights.setter
    def master_weights(self, on: Any) -> None:
        self._set_precision(*self._precision[:2], on)

    def _set_precision(self, *options: Any) -> None:
        with self._lock:
            self._precision = _lowbits.check_precision(self._rule, *options)
            self._step_plan = None

    @property
    def step_count(self) -> int:
        """Steps taken (skipped ones not counted)."""
        return self._counter[0]

    @step_count.setter
    def step_count(self, value: int) -> None:
        # As a loaded count: an int in [0, 2**53] ("3", 3.7, True, -5 and 2**70 are refused).
        self._counter[0] = _load_step(value, "step_count")

    # -- what the rule says ---------------------------------------------------------------------

    @property
    def _counts_steps(self) -> bool:
        return self._rule.counts_steps

    @property
    def _array_state_names(self) -> Sequence[str]:
        return self._rule.array_state_names

    def _state_spec(self, group: Dict[str, Any]) -> Dict[str, float]:
        """State arrays a loaded parameter of this group must have, each with the value it starts
        at. A rule without step counts (SGD, Momentum) makes a missing buffer at its next update,
        as torch's SGD does after loading momentum_buffer=None."""
        core = self._check_group(group)
        if not self._counts_steps:
            return {}
        return {**self._rule.state_spec(core), **self._rule.carried_spec(core)}

    # -- hyperparameters ---------------------------------------------------------------------------

    def _check_group(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """Checks a group's hyperparameters (by the C++ core's declared ranges), stores its real
        scalars as Python floats, and returns them in the core's names (betas split)."""
        rule = self._rule
        # Every value is read once: another thread may set group["lr"] meanwhile (a scheduler
        # does, without the lock). What was read is what is checked and recorded as checked, and
        # a converted value is written back only where the group still holds what was read, so
        # a concurrent update is never lost nor taken as checked.
        seen = dict(group)
        seen.pop("params", None)
        lr = seen.get("lr")
        core = rule.to_core(seen, lr=0.0 if callable(lr) else None)
        core["maximize"] = as_flag(seen.get("maximize", False))
        core = self._validate(core)
        missing = object()
        for name in [n for n, _ in rule.torch_args() + rule.own_args()] + ["maximize"]:
            if name in seen and not (name == "lr" and callable(lr)):
                slots = [h.name for h in rule.hyper if h.torch == name] or [name]
                value = (
                    _kept_none(rule, (seen[name],), 0, name, core)
                    if len(slots) == 1 and slots[0] == name
                    else tuple(_kept_none(rule, seen[name], i, n, core) for i, n in enumerate(slots))
                )
                if value is not seen[name]:
                    if group.get(name, missing) is seen[name]:
                        group[name] = value
                    seen[name] = value
        self._checked[id(group)] = _Checked(group, tuple(seen.items()), core)
        if len(self._checked) > 2 * len(self.param_groups) + 8:  # groups replaced by loads
            live = {id(g) for g in self.param_groups} | {id(self.defaults), id(group)}
            self._checked = {k: v for k, v in self._checked.items() if k in live}
        return core

    def _hyper(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """The group's hyperparameters for the step being taken: checked again only if a value
        changed since they were last checked; a callable lr evaluated (once) and checked."""
        checked = self._checked.get(id(group))
        if checked is None or checked.group is not group or not _same(checked.values, group):
            core = self._check_group(group)
        else:
            core = checked.core
        lr = group.get("lr")
        if callable(lr):
            step = self.step_count + 1
            self._in_lr = True
            try:
                value = lr(step)
            finally:
                self._in_lr = False
            core = self._validate(
                {**core, "lr": as_real(value)},
                labels={"lr": f"lr({step}) (the group's lr schedule)"},
            )
        return core

    def _validate(
        self, core: Dict[str, Any], labels: Optional[Dict[str, str]] = None
    ) -> Dict[str, Any]:
        """Checks hyperparameters in the core's names (betas split) and returns them as the
        kernels take them: by the C++ declaration of the rule. An optimizer that is not one
        element-wise rule (Muon, LBFGS) checks its own here."""
        return _core.validate(self._rule.name, core, labels=labels)

    def _not_reentered(self, what: str) -> None:
        if self._in_lr:
            raise RuntimeError(
                f"{what} called from inside a group's callable lr, while a step "
                "is evaluating it; an lr schedule must only return a number"
            )

    # -- parameter groups ------------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group of parameters, with hyperparameters defaulting to the optimizer's."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError('a param group must have a "params" entry')
        with self._lock:
            self._not_reentered("add_param_group()")
            group = dict(param_group)
            params = _as_param_list(group["params"], 'param group "params"')
            if len(params) == 0:
                raise ValueError("a param group got an empty parameter list")
            params = self._split_names(group, params)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for key, value in group.items():
                if key != "params":
                    check_depth(value, f"param group {key!r}")
            self._check_group(group)
            existing = [p for g in self.param_groups for p in g["params"]]
            # Distinct, writeable, C-contiguous arrays of a supported float type, not sharing
            # memory with each other or with any parameter already in another group.
            try:
                _core.check_params(existing + params)
            except ValueError as e:
                if any(p is q for p in params for q in existing):
                    raise ValueError("some parameters appear in more than one parameter group") from e
                raise
            if self._rule.factored:
                for i, p in enumerate(params):
                    if _lowbits.is_half(p.dtype):
                        raise TypeError(
                            f"params[{len(existing) + i}] is {p.dtype}: {self._rule.cls} keeps "
                            "its factored state in the parameter's type and takes float32 and "
                            "float64 parameters"
                        )
            if self.state_dtype != "float32":
                for i, p in enumerate(params):
                    if p.dtype == np.float64:
                        raise TypeError(
                            f"params[{len(existing) + i}] is float64, whose state is float64; "
                            f"state_dtype={self.state_dtype!r} applies to float32, float16 and "
                            "bfloat16 parameters"
                        )
            group["params"] = params
            self.param_groups.append(group)
            self._step_plan = None

    def _split_names(self, group: Dict[str, Any], params: List[Any]) -> List[Any]:
        """Named parameters, as torch 2.13 takes them: ``[("w", W), ("b", b)]`` keeps the names
        in the group's ``param_names`` (and so in the state dict). A group is all named or all
        unnamed, and so is the optimizer."""
        named = [isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params]
        if not any(named):
            if any("param_names" in g for g in self.param_groups):
                raise ValueError(
                    "all parameter groups must be named or all unnamed: earlier "
                    "groups have (name, array) pairs, this one plain arrays"
                )
            return params
        if not all(named):
            raise TypeError("params must be all arrays or all (name, array) pairs with str names")
        if self.param_groups and not all("param_names" in g for g in self.param_groups):
            raise ValueError(
                "all parameter groups must be named or all unnamed: earlier groups "
                "have plain arrays, this one (name, array) pairs"
            )
        names = [n for n, _ in params]
        taken = {n for g in self.param_groups for n in g.get("param_names", ())}
        if len(set(names)) != len(names) or taken.intersection(names):
            raise ValueError("parameter names must be unique across the optimizer")
        group["param_names"] = names
        return [p for _, p in params]

    # -- stepping ----------------------------------------------------------------------------------

    def step(
        self,
        grads: Sequence[Optional[np.ndarray]],
        *,
        max_grad_norm: Optional[float] = None,
        norm_type: float = 2.0,
        skip_if_nonfinite: bool = False,
    ) -> Optional[float]:
        """Applies one update to every parameter whose gradient is not None.

        ``max_grad_norm``: clip the gradients to this total norm (of order ``norm_type``) within
        the step, as ``clip_grad_norm_(grads, max_grad_norm, norm_type)`` followed by ``step``
        would, with the same result, but without rewriting the gradients: their norm is computed
        in one read pass and the clipping factor is folded into the update.

        ``skip_if_nonfinite``: if any gradient holds NaN or Inf (found in that same norm pass),
        change nothing (parameters, state, step counts), add one to ``skipped_steps`` and return
        the non-finite norm.

        Returns None, or with either option the total gradient norm before clipping: a finite
        number when the step was taken.
        """
        with self._lock:
            if self._in_lr:
                self._not_reentered("step()")
            # The kept plan takes the step when nothing it relies on changed (the common case);
            # otherwise it says why, having changed nothing, and the whole path below runs.
            plan = self._step_plan
            why = None
            if plan is not None:
                limit, p, run = None, 2.0, True
                if max_grad_norm is not None or skip_if_nonfinite:
                    try:
                        if max_grad_norm is not None:
                            limit = check_nonnegative("max_grad_norm", max_grad_norm)
                        p = check_norm_type(norm_type)
                    except (TypeError, ValueError):
                        run = False  # the whole path raises, after the errors it checks first
                while True:
                    why = plan.step(grads, run, limit, p, bool(skip_if_nonfinite))
                    if why is None or type(why) is float:
                        return why
                    if type(why) is tuple:  # skip_if_nonfinite found NaN or Inf
                        self.skipped_steps += 1
                        return why[0]
                    if type(why) is not list:
                        break
                    self._warn_stale(why)  # then the plan checks again
            work = self._plan(grads)
            hyper = [self._hyper(group) for group, *_ in work]  # each lr evaluated once
            norm, scale, skip = self._clipping(work, max_grad_norm, norm_type, skip_if_nonfinite)
            created: list = []
            calls = [
                self._prepare(group, core, params, group_grads, positions, scale, created)
                for (group, params, group_grads, positions), core in zip(work, hyper)
            ]
            if skip:  # everything was validated: an error comes first
                self.skipped_steps += 1
                return norm
            self._run(calls, created)
            if why != "lr":  # (a callable lr, called above: the plan still holds)
                # A step that left parameters out (None gradients) makes no plan; the old one
                # stays, checking everything again at the next step.
                self._step_plan = self._make_plan(work, calls, plan) or plan
            return norm

    def _clipping(
        self,
        work: list,
        max_grad_norm: Optional[float],
        norm_type: float,
        skip_if_nonfinite: bool,
    ) -> tuple:
        """(total norm or None, the clipping coefficient, whether to skip the step) for a planned
        step's gradients: one read pass when either option is on."""
        norm: Optional[float] = None
        scale, skip = 1.0, False
        if max_grad_norm is not None or skip_if_nonfinite:
            limit = (
                None if max_grad_norm is None else check_nonnegative("max_grad_norm", max_grad_norm)
            )
            p = check_norm_type(norm_type)
            flat_grads, flat_positions = _flatten(work)
            if any(isinstance(g, RowSparse) for g in flat_grads):  # norms of the dense gradients
                flat_grads, flat_positions = for_norms(flat_grads), None
            norm = total_norm(flat_grads, p, flat_positions) if flat_grads else 0.0
            skip = (
                skip_if_nonfinite
                and not math.isfinite(norm)
                and _has_nonfinite(flat_grads, flat_positions, p)
            )
            if limit is not None and not skip:
                scale = clip_coefficient(limit, norm)
        return norm, scale, skip

    def _make_plan(self, work: list, calls: list, previous: Any) -> Any:
        """The plan later steps take (``_core.StepPlan``), from the updates this step ran; None
        when a step with a None gradient left parameters out, or when a value is of a type the
        plan does not read."""
        if any(len(params) != len(group["params"]) for group, params, _, _ in work):
            return None
        # A row-sparse step's calls hold its rows; a plan made of them would replay those rows
        # for the next gradients. Such steps keep the plan they had (it refuses RowSparse items).
        if any(isinstance(g, RowSparse) for _, _, grads, _ in work for g in grads):
            return None
        try:
            return _core.StepPlan(
                calls,
                self.param_groups,
                vars(self),
                vars(self.state),
                [[self.state.get_by_id(p) for p in g["params"]] for g in self.param_groups],
                self._counter,
                self._warn_stale_on,
                previous,
            )
        except (TypeError, ValueError):
            return None

    def _warn_stale(self, found: list) -> None:
        """Warns (StaleParameterWarning, once per parameter) that parameters are held by
        nothing but the optimizer any more."""
        for g, i in found:
            group = self.param_groups[g]
            p = group["params"][i]
            names = group.get("param_names")
            name = (
                repr(names[i])
                if isinstance(names, list) and i < len(names)
                else f"param_groups[{g}]['params'][{i}]"
            )
            warnings.warn(
                f"{type(self).__name__}.step(): parameter {name} (shape {p.shape}) is held by "
                "nothing but the optimizer any more: the code that read it has probably "
                "replaced it with another array (model.params = copies, W = W - ...), so this "
                "step updates an array nobody reads. Write new values into the array instead "
                "(np.copyto(W, new) or W[...] = new), or make a new optimizer over the new "
                "arrays. Silence: warnings.filterwarnings('ignore', "
                "category=optkern.StaleParameterWarning), or opt.warn_stale = False.",
                StaleParameterWarning,
                stacklevel=_outside_optkern(),
            )

    def _plan(self, grads: Sequence[Optional[np.ndarray]]) -> list:
        """Splits ``grads`` by group and drops parameters without a gradient; with more than one
        group, also checks that no buffer of one group overlaps one of another."""
        if isinstance(grads, np.ndarray) or not isinstance(grads, (list, tuple)):
            raise TypeError(
                "grads must be a list or tuple of arrays aligned with the parameters, "
                f"got {type(grads).__name__}"
            )
        groups = self.param_groups  # read once: another thread may replace the list
        total = sum(len(g["params"]) for g in groups)
        if len(grads) != total:
            raise ValueError(
                f"step() got {len(grads)} gradients for {total} parameters; pass one "
                "per parameter (None to skip one), in group order"
            )
        work = []
        start = 0
        for group in groups:
            params = group["params"]
            group_grads = grads[start : start + len(params)]
            if id(None) in map(id, group_grads):  # `None in list` would compare arrays with ==
                keep = [i for i, g in enumerate(group_grads) if g is not None]
                params = [params[i] for i in keep]
                group_grads = [group_grads[i] for i in keep]
                positions = [start + i for i in keep]
            else:
                positions = None if start == 0 else list(range(start, start + len(params)))
            work.append((group, params, list(group_grads), positions))
            start += len(group["params"])
        if len(work) > 1:
            all_params = [p for _, ps, _, _ in work for p in ps]
            all_grads, positions = _flatten(work)
            if any(isinstance(g, RowSparse) for g in all_grads):  # each group's core checks them
                check_row_sources(all_params, all_grads)
                keep = [i for i, g in enumerate(all_grads) if not isinstance(g, RowSparse)]
                all_params = [all_params[i] for i in keep]
                all_grads = [all_grads[i] for i in keep]
                positions = [positions[i] for i in keep]
            _core.check_grads(all_params, all_grads, positions=positions)
        return work

    def _prepare(
        self,
        group: Dict[str, Any],
        core: Dict[str, Any],
        params: List[np.ndarray],
        grads: List[np.ndarray],
        positions: Optional[List[int]],
        grad_scale: float,
        created: list,
    ) -> Any:
        """One group's update, validated by the core but not run. State a parameter lacks is
        made here, in new dicts listed in ``created``, which the step installs with the update."""
        rule = self._rule
        spec = rule.state_spec(core)
        carried = rule.carried_spec(core) if rule.carried else {}
        states, fresh = self._group_states(group, params, spec, created, carried)
        if rule.factored:  # a state a parameter's shape does not call for is None in the list
            lists = {name: [s.get(name) for s in states] for name in (*spec, *carried)}
        else:
            lists = {name: [s[name] for s in states] for name in (*spec, *carried)}
        if self.state_dtype == "int8":
            for name in spec:
                if name in self._array_state_names:
                    key = name + _lowbits.ABSMAX_SUFFIX
                    lists[key] = [s.get(key) for s in states]
        if self.master_weights and any(_lowbits.MASTER in s for s in states):
            lists[_lowbits.MASTER] = [s.get(_lowbits.MASTER) for s in states]
        if rule.counts_steps:
            steps: Any = [s["step"] + 1 for s in states]
            record: Any = states
        else:  # step 1 tells the kernel a buffer is new (torch's SGD starts it at the gradient)
            steps, record = [1 if f else 2 for f in fresh], None
        return _core.prepare(
            rule.name,
            params,
            grads,
            lists,
            core,
            steps=steps,
            grad_scale=grad_scale,
            positions=positions,
            record=record,
            isa=self._isa,
            # the noise of stochastic rounding is keyed by the step being taken (and, in the
            # core, by each parameter's position and each element's index)
            noise_seed=self.step_count + 1 if self.stochastic_rounding else None,
        )

    def _group_states(
        self,
        group: Dict[str, Any],
        params: List[np.ndarray],
        spec: Dict[str, float],
        created: list,
        carried: Optional[Dict[str, float]] = None,
    ) -> tuple:
        """Each parameter's state dict with every array ``spec`` names (and every carried number
        of ``carried``, at its start), and whether any of its arrays is new. A parameter without
        (complete) state gets a new dict, recorded in ``created`` as (param, new dict, old dict
        or None)."""
        if carried:
            spec = {**spec, **carried}
        _core.check_params(params)  # a group whose "params" someone replaced: TypeError here
        states = [self.state.get_by_id(p) for p in params]
        if not spec and not self._counts_steps:  # no state at all (plain SGD, like torch's)
            states = [{} if s is None else s for s in states]
        # The names each parameter needs: all of spec, but for a state whose shape kind does not
        # apply to the parameter's shape (Adafactor's row_var for a vector).
        shaped = [n for n in spec if n in self._array_state_names and self._shaped(n)]
        if shaped:
            needs = [
                spec.keys() - {n for n in shaped if self._rule.state(n).shape_for(p.shape) is None}
                for p in params
            ]
        else:
            needs = [spec.keys()] * len(params)
        needs = [self._stored_names(p, need) for p, need in zip(params, needs)]
        fresh = [s is None or not s.keys() >= need for s, need in zip(states, needs)]
        if not any(fresh):
            return states, fresh
        for i, p in enumerate(params):
            if fresh[i]:
                old = states[i]
                new = dict(old) if old is not None else {}
                if self._counts_steps:  # a dict emptied in place starts over, as a new one
                    new.setdefault("step", 0)
                states[i] = new
                created.append((p, new, old))
        for name, start in spec.items():
            missing = [
                (p, s) for p, s, need in zip(params, states, needs) if name not in s and name in need
            ]
            if carried and name in carried:
                for _, s in missing:
                    s[name] = start
            elif missing:
                shape_for = self._rule.state(name).shape_for
                shapes = [shape_for(p.shape) for p, _ in missing]
                dtypes = [self._state_storage(p) for p, _ in missing]
                if self.state_dtype == "int8":
                    nonneg = self._rule.state(name).nonnegative
                    for (p, s), shape in zip(missing, shapes):
                        s[name], s[name + _lowbits.ABSMAX_SUFFIX] = _lowbits.quantize(
                            np.full(shape, start, np.float32), nonneg
                        )
                    _pack_int8([s for _, s in missing], name)
                else:
                    _pack([s for _, s in missing], name, shapes, start, dtypes)
        masters = [
            s
            for p, s, need in zip(params, states, needs)
            if _lowbits.MASTER in need and _lowbits.MASTER not in s
        ]
        if masters:
            for p, s in zip(params, states):
                if any(s is m for m in masters):
                    s[_lowbits.MASTER] = p.astype(np.float32)
            _pack(
                masters,
                _lowbits.MASTER,
                [m[_lowbits.MASTER].shape for m in masters],
                None,
                [np.float32] * len(masters),
            )
        return states, fresh

    def _state_storage(self, p: np.ndarray) -> np.dtype:
        """The dtype of parameter p's state arrays."""
        return _lowbits.storage_dtype(self.state_dtype, p.dtype)

    def _stored_names(self, p: np.ndarray, need: Any) -> Any:
        """The state dict keys parameter p needs beside ``need`` (its rule's): each int8
        state's absmax, and the master copy of a 16-bit parameter."""
        extra = []
        if self.state_dtype == "int8" and p.dtype != np.float64:
            extra = [n + _lowbits.ABSMAX_SUFFIX for n in need if n in self._array_state_names]
        if self.master_weights and _lowbits.is_half(p.dtype):
            extra.append(_lowbits.MASTER)
        return set(need).union(extra) if extra else need

    def _shaped(self, name: str) -> bool:
        """Whether state ``name`` is shaped unlike its parameter (a factor per row or column, or
        one kept only for some shapes): see registry.State.shape."""
        return self._rule.state(name).shape != "like_param"

    def _run(self, calls: list, created: list) -> None:
        """Installs the new state dicts and runs every group's update. The core advances
        step_count and the state step counts together with the kernels; if the step did not
        happen (an error, or Ctrl-C before the kernels), the new state is taken back."""
        before = self._counter[0]
        try:
            for p, new, _ in created:
                self.state[p] = new
            _core.run(calls, counter=self._counter)
        except BaseException:
            if self._counter[0] == before:
                for p, _, old in created:
                    if old is None:
                        self.state.pop(p, None)
                    else:
                        self.state[p] = old
            raise

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer's state in torch's layout: ``{"state": {id: {name: value}},
        "param_groups": [{hyperparameters..., "params": [ids]}]}``, ids numbering the
        parameters in group order. Arrays are copies, so the dict is a snapshot. Two more keys,
        which torch ignores, hold ``step_count`` and ``skipped_steps``."""
        with self._lock:
            state: Dict[int, Dict[str, Any]] = {}
            groups = []
            index = 0
            for group in self.param_groups:
                packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
                ids = list(range(index, index + len(group["params"])))
                packed["params"] = ids
                groups.append(packed)
                for i, p in zip(ids, group["params"]):
                    s = self.state.get_by_id(p)
                    if s is not None:
                        state[i] = {
                            k: (v.copy() if isinstance(v, np.ndarray) else copy.deepcopy(v))
                            for k, v in s.items()
                        }
                index += len(group["params"])
            return {
                "state": state,
                "param_groups": groups,
                "step_count": self.step_count,
                "skipped_steps": self.skipped_steps,
            }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Loads a dict from :meth:`state_dict` (or from torch: tensors are read as arrays). It is
        checked whole before anything changes: group and parameter counts, state names and
        shapes, step counts and hyperparameters."""
        with self._lock:
            self._not_reentered("load_state_dict()")
            groups, state = self._parse_state_dict(state_dict)
            # A dict from torch has no step_count: the parameters' own step counts tell it.
            steps = [s["step"] for _, s in state if "step" in s]
            step_count = _load_step(state_dict.get("step_count", max(steps, default=0)), "step_count")
            skipped = _load_step(state_dict.get("skipped_steps", 0), "skipped_steps")
            new_state = ParamState()
            for p, s in state:
                new_state[p] = s
            self.param_groups = groups
            self.state = new_state
            self._step_plan = None
            self.step_count = step_count
            self.skipped_steps = skipped

    def _parse_state_dict(self, sd: Mapping) -> tuple:
        if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
            raise ValueError('a state dict must be a mapping with "state" and "param_groups"')
        saved_groups = sd["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            n = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else "no list of"
            raise ValueError(
                f"loaded state dict has {n} parameter groups; this optimizer has "
                f"{len(self.param_groups)}"
            )
        by_id: Dict[Any, np.ndarray] = {}
        groups = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise ValueError(f'param_groups[{gi}] must be a mapping with a "params" list')
            ids = _load_ids(saved["params"], f"param_groups[{gi}]['params']")
            if len(ids) != len(group["params"]):
                raise ValueError(
                    f"param_groups[{gi}] has {len(ids)} parameters in the loaded state "
                    f"dict but {len(group['params'])} in this optimizer"
                )
            for i, p in zip(ids, group["params"]):
                if i in by_id:
                    raise ValueError(f"parameter id {i} appears twice in the loaded param_groups")
                by_id[i] = p
            for k, v in saved.items():
                if k != "params":
                    check_depth(v, f"param_groups[{gi}][{k!r}]")
            new_group = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
            for key, value in self.defaults.items():
                new_group.setdefault(key, value)
            new_group["params"] = group["params"]
            if "param_names" in saved:  # loaded names replace the current ones, as in torch
                names = saved["param_names"]
                if (
                    not isinstance(names, (list, tuple))
                    or len(names) != len(ids)
                    or not all(isinstance(n, str) for n in names)
                ):
                    raise ValueError(
                        f'param_groups[{gi}]["param_names"] must be a list of {len(ids)} str names'
                    )
                new_group["param_names"] = list(names)
            elif "param_names" in group:
                new_group["param_names"] = list(group["param_names"])
            try:
                self._check_group(new_group)
            except (TypeError, ValueError) as e:
                raise type(e)(f"param_groups[{gi}]: {e}") from None
            groups.append(new_group)
        group_of = {id(p): g for g in groups for p in g["params"]}

        saved_state = sd["state"]
        if not isinstance(saved_state, Mapping):
            raise ValueError('"state" must be a mapping from parameter ids to state dicts')
        state = []
        for key, entry in saved_state.items():
            key = _load_id(key, "a state key")
            if key not in by_id:
                raise ValueError(
                    f"state has an entry for parameter id {key!r}, which no parameter group lists"
                )
            if not isinstance(entry, Mapping):
                raise ValueError(f"state[{key!r}] must be a mapping, got {type(entry).__name__}")
            p = by_id[key]
            spec = self._state_spec(group_of[id(p)])
            s: Dict[str, Any] = {}
            for name, value in entry.items():
                if value is None:
                    continue  # torch writes momentum_buffer=None for a buffer never created
                if name == "step":
                    s["step"] = _load_step(value, f"state[{key!r}]['step']")
                elif name in self._array_state_names:
                    where = f"state[{key!r}][{name!r}]"
                    shape = self._rule.state(name).shape_for(p.shape)
                    if shape is None:
                        raise ValueError(
                            f"{where}: a parameter of shape {p.shape} keeps no {name!r} "
                            f"(a {self._rule.state(name).shape} state)"
                        )
                    s[name] = _load_array(value, p, where, shape)
                elif name == _lowbits.MASTER or (
                    name.endswith(_lowbits.ABSMAX_SUFFIX)
                    and name[: -len(_lowbits.ABSMAX_SUFFIX)] in self._array_state_names
                ):
                    s[name] = _load_float32(value, f"state[{key!r}][{name!r}]")
                elif name in self._rule.carried_names:
                    s[name] = _load_carried(value, f"state[{key!r}][{name!r}]")
                else:
                    check_depth(value, f"state[{key!r}][{name!r}]")
                    s[name] = copy.deepcopy(value)
            if self._counts_steps and "step" not in s:
                raise ValueError(f"state[{key!r}] has no 'step'")
            self._convert_loaded(p, s, f"state[{key!r}]")
            missing = [
                n
                for n in spec
                if n not in s
                and (
                    n not in self._array_state_names
                    or self._rule.state(n).shape_for(p.shape) is not None
                )
            ]
            if missing:
                raise ValueError(
                    f"state[{key!r}] lacks {', '.join(map(repr, missing))}, "
                    "which its group's options need"
                )
            state.append((p, s))
        for group in groups:  # each group's state in one block per name, as a first step makes
            in_group = {id(p) for p in group["params"]}
            entries = [(p, s) for p, s in state if id(p) in in_group]
            for name in self._array_state_names:
                have = [(p, s) for p, s in entries if isinstance(s.get(name), np.ndarray)]
                if have and self.state_dtype == "int8":
                    _pack_int8([s for _, s in have], name)
                elif have:
                    _pack(
                        [s for _, s in have],
                        name,
                        [s[name].shape for _, s in have],
                        None,
                        [self._state_storage(p) for p, _ in have],
                    )
            masters = [s for _, s in entries if isinstance(s.get(_lowbits.MASTER), np.ndarray)]
            if masters:
                _pack(
                    masters,
                    _lowbits.MASTER,
                    [m[_lowbits.MASTER].shape for m in masters],
                    None,
                    [np.float32] * len(masters),
                )
        return groups, state

    def _convert_loaded(self, p: np.ndarray, s: Dict[str, Any], where: str) -> None:
        """Brings a loaded state dict to this optimizer's state form: int8 codes (with their
        absmax) into float32 values for a float32 or bfloat16 optimizer, float values into
        codes for an int8 one (bfloat16 and float32 convert when packed); a master copy is
        checked against its parameter (one is made from the parameter at the next step if the
        dict lacks it, and one a parameter does not use is dropped)."""
        int8 = self.state_dtype == "int8" and p.dtype != np.float64
        for name in self._array_state_names:
            arr = s.get(name)
            if not isinstance(arr, np.ndarray):
                continue
            key = name + _lowbits.ABSMAX_SUFFIX
            nonneg = self._rule.state(name).nonnegative
            if key in s:  # loaded as int8
                absmax = s[key]
                if arr.dtype != np.uint8 or absmax.shape != (_lowbits.blocks(arr.size),):
                    raise ValueError(
                        f"{where}[{name!r}] and [{key!r}] must be uint8 codes and a float32 "
                        f"absmax per block of {_lowbits.BLOCK} ({_lowbits.blocks(arr.size)} "
                        f"for {arr.size} elements), got dtype {arr.dtype} and "
                        f"shape {absmax.shape}"
                    )
                if not int8:
                    s[name] = _lowbits.dequantize(arr, absmax, nonneg)
                    del s[key]
            elif int8:
                values = np.asarray(arr, dtype=np.float32)
                s[name], s[key] = _lowbits.quantize(values, nonneg)
        if _lowbits.MASTER in s:
            m = s[_lowbits.MASTER]
            if not (self.master_weights and _lowbits.is_half(p.dtype)):
                del s[_lowbits.MASTER]
            elif m.shape != p.shape:
                raise ValueError(
                    f"{where}[{_lowbits.MASTER!r}] has shape {m.shape} but its parameter has "
                    f"shape {p.shape}"
                )

    def __getstate__(self) -> Dict[str, Any]:
        with self._lock:
            return _pickled_dict(self)

    def __setstate__(self, saved: Dict[str, Any]) -> None:
        _restore_dict(self, saved)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


def _kept_none(rule: Rule, given: Any, slot: int, name: str, core: Dict[str, Any]) -> Any:
    """Slot ``slot`` of a tuple hyperparameter (of a 1-tuple for the others) as the group keeps
    it: None where the user gave None and the declaration takes it (Adafactor's ``eps=(None,
    1e-3)``, as torch keeps it; a warmup of None), else the checked value."""
    try:
        if given[slot] is None and any(h.name == name and h.if_none is not None for h in rule.hyper):
            return None
    except (TypeError, IndexError, KeyError):
        pass
    return core[name]


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _outside_optkern() -> int:
    """The ``stacklevel`` of the first caller outside optkern, for a warning issued by the
    function calling this (a subclass's step, ScheduleFree's say, adds frames in between)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


class _Checked:
    """A group's hyperparameters as last checked: the values seen, and the core's dict."""

    __slots__ = ("group", "values", "core")

    def __init__(self, group: Dict[str, Any], values: tuple, core: Dict[str, Any]) -> None:
        self.group, self.values, self.core = group, values, core


def _same(values: tuple, group: Dict[str, Any]) -> bool:
    """Whether a group still holds the very objects it held when checked (a cheap compare)."""
    if len(values) != len(group) - ("params" in group):
        return False
    get = group.get
    missing = object()
    return all(get(k, missing) is v for k, v in values)


def _flatten(work: list) -> tuple:
    """All gradients of a planned step in one list, with their indices in the user's list
    (None: already 0, 1, 2, ...)."""
    if len(work) == 1:
        return work[0][2], work[0][3]
    grads = [g for _, _, gs, _ in work for g in gs]
    positions = [i for _, ps, _, pos in work for i in (pos if pos is not None else range(len(ps)))]
    return grads, positions


def _has_nonfinite(grads: List[np.ndarray], positions: Optional[List[int]], p: float) -> bool:
    """Whether a gradient holds NaN or Inf, given that their p-norm was not finite: for p = 1, 2
    or inf that settles it; a larger p can overflow |x|^p from finite values, so ask the 2-norm."""
    if p in (1.0, 2.0, math.inf):
        return True
    return not math.isfinite(total_norm(grads, 2.0, positions))


def _pack(
    states: List[Dict[str, Any]],
    name: str,
    shapes: List[tuple],
    start: Optional[float],
    dtypes: List[np.dtype],
) -> None:
    """Gives each state dict its ``name`` array as a view of one aligned block per dtype (each
    state in its parameter's dtype, ``dtypes``): the arrays of a group then follow each other in
    memory, as the kernels walk them, and the memory system streams them as one (separate arrays
    cost about 1.6 us per parameter on the 2-core Xeon of
    bench/results/2026-12-01-xeon-avx512-2core.md, one block about none). ``start``: the value to
    fill with; None keeps the arrays the dicts already hold, converted into the block."""
    for dtype in dict.fromkeys(np.dtype(d) for d in dtypes):
        mine = [i for i, d in enumerate(dtypes) if np.dtype(d) == dtype]
        block = FlatParams.filled([shapes[i] for i in mine], 0.0 if start is None else start, dtype)
        for i, view in zip(mine, block):
            if start is None:
                view[...] = states[i][name]
            states[i][name] = view


def _pack_int8(states: List[Dict[str, Any]], name: str) -> None:
    """_pack for int8 states: the codes of ``name`` in one uint8 block, their absmax arrays in
    one float32 block (parameters of another type keep their own state form)."""
    have = [s for s in states if s.get(name) is not None and s[name].dtype == np.uint8]
    if have:
        key = name + _lowbits.ABSMAX_SUFFIX
        _pack(have, name, [s[name].shape for s in have], None, [np.uint8] * len(have))
        _pack(have, key, [s[key].shape for s in have], None, [np.float32] * len(have))
    rest = [s for s in states if s.get(name) is not None and s[name].dtype != np.uint8]
    if rest:  # float64 parameters
        _pack(rest, name, [s[name].shape for s in rest], None, [s[name].dtype for s in rest])


def _load_float32(value: Any, where: str) -> np.ndarray:
    """A loaded int8 absmax or master copy: real numbers, kept as float32."""
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise TypeError(f"{where} cannot be read as an array: {e}") from None
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{where} must hold real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float32)


#: The largest step count a state dict or checkpoint may hold. Steps are whole numbers that
#: torch stores as float tensors, and a float counts exactly only up to 2**53; C++ takes the
#: count as an int64, so every later step up to 2**63 - 1 still succeeds from here.
MAX_LOADED_STEP = 2**53


def _load_step(value: Any, where: str) -> int:
    """A loaded step count as an int in [0, MAX_LOADED_STEP]: a Python or NumPy int, a 0-d
    integer array or tensor, or a float (0-d float array, tensor) holding an exact whole number.
    Refused: bools, strings, other objects, NaN, fractions, negatives and larger counts."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{where} must be an int, got {type(value).__name__}: {value!r}")
    if isinstance(value, int):
        v = value
    else:
        try:
            arr = np.asarray(value)
        except Exception as e:  # a tensor that needs .cpu(), an object whose __array__ raises
            raise TypeError(f"{where} must be an int, got {type(value).__name__}") from e
        if arr.shape != () or arr.dtype.kind not in "iuf":
            raise TypeError(
                f"{where} must be an int (or a 0-d integer or float array), got "
                f"{type(value).__name__} of dtype {arr.dtype} and shape {arr.shape}"
            )
        if arr.dtype.kind == "f":
            f = float(arr)
            if not math.isfinite(f) or not f.is_integer() or not 0 <= f <= MAX_LOADED_STEP:
                raise ValueError(f"{where} must be a whole number >= 0 and <= 2**53, got {f!r}")
            v = int(f)
        else:
            v = int(arr)
    if not 0 <= v <= MAX_LOADED_STEP:
        raise ValueError(f"{where} must be a whole number >= 0 and <= 2**53, got {v}")
    return v


def _load_id(value: Any, where: str) -> int:
    """A parameter id of a loaded state dict: an int (NumPy's included), as state_dict() and
    torch write them. Strings, bools, floats and unhashable objects are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{where} must be an int parameter id, got {type(value).__name__}: {_short_repr(value)}"
        )
    return int(value)


def _load_ids(values: Any, where: str) -> List[int]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{where} must be a list of int parameter ids, got {type(values).__name__}")
    return [_load_id(v, f"{where}[{i}]") for i, v in enumerate(values)]


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a repr that raises (or recurses)
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:80] + "..."


#: How deeply a hyperparameter or loaded state value may nest containers (copy.deepcopy and
#: pickle recurse: a deeper value would raise RecursionError in state_dict() or a save).
MAX_DEPTH = 64


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> None:
    """Refuses (ValueError) a value nesting lists, tuples, sets or dicts more than ``limit``
    levels deep, a container holding itself included; walked without recursion."""
    if not isinstance(value, (list, tuple, dict, set, frozenset)):
        return
    stack = [(value, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > limit:
            raise ValueError(
                f"{where} nests containers more than {limit} levels deep (or holds itself)"
            )
        items = obj.values() if isinstance(obj, dict) else obj
        if isinstance(obj, dict):
            stack.extend((k, depth + 1) for k in obj if isinstance(k, tuple))
        stack.extend(
            (v, depth + 1) for v in items if isinstance(v, (list, tuple, dict, set, frozenset))
        )


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _load_carried(value: Any, where: str) -> float:
    """A loaded carried number (NAdam's mu_product, ASGD's eta and mu) as a Python float: a real
    number, or a 0-d array or tensor of one (torch keeps them as 0-d float32 tensors)."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{where} must be a real number, got {type(value).__name__}: {value!r}")
    try:
        arr = np.asarray(value)
    except Exception as e:  # a tensor that needs .cpu(), an object whose __array__ raises
        raise TypeError(f"{where} must be a real number, got {type(value).__name__}") from e
    if arr.shape != () or arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{where} must be a real number (or a 0-d array of one), got "
            f"{type(value).__name__} of dtype {arr.dtype} and shape {arr.shape}"
        )
    v = float(arr)
    if not math.isfinite(v):
        raise ValueError(f"{where} must be finite, got {v!r}")
    return v


def _load_array(
    value: Any, param: np.ndarray, where: str, shape: Optional[tuple] = None
) -> np.ndarray:
    """A loaded state array: real numbers of the parameter's shape that the parameter's dtype
    holds (a finite value beyond float32's range would become inf when packed for a float32
    parameter; any array is converted to the parameter's dtype by _pack). Masked arrays are
    refused: the mask would be dropped and the masked-out values used."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{where} is a masked array; its mask would be dropped (pass "
            "value.filled(...) or an ndarray)"
        )
    try:
        arr = np.asarray(value)
    except Exception as e:  # a torch tensor that needs .cpu(), say
        raise TypeError(f"{where} cannot be read as an array: {e}") from None
    if not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or _lowbits.is_half(arr.dtype)
    ):
        raise TypeError(f"{where} must hold real numbers, got dtype {arr.dtype}")
    if shape is None or tuple(shape) == param.shape:
        if arr.shape != param.shape:
            raise ValueError(
                f"{where} has shape {arr.shape} but its parameter has shape {param.shape}"
            )
    elif arr.shape != tuple(shape):
        raise ValueError(
            f"{where} has shape {arr.shape} but its parameter of shape {param.shape} "
            f"needs {tuple(shape)}"
        )
    if param.dtype == np.float32 and arr.dtype != np.float32 and arr.size:
        big = np.abs(arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr)
        if big.size and float(big.max()) > _FLOAT32_MAX:
            raise ValueError(
                f"{where} holds {float(big.max())!r}, beyond float32's range (at "
                f"most {_FLOAT32_MAX:.4g} in magnitude)"
            )
    return arr  # copied into the group's block by _pack


# -- pickling (copy.deepcopy and pickle.dumps) --------------------------------------------------
#
# Convention: an optimizer pickles its whole __dict__ except what is transient: locks (recreated
# on unpickling), and caches, that is any attribute whose name starts or ends with ``_cache`` or
# is listed in the class attribute ``_transient_attrs`` (a tuple of names). A transient dict,
# list or set comes back empty; any other transient attribute comes back as None, so a class
# that keeps one must rebuild it when it finds None. Parameters and state arrays are pickled
# as the objects they are, so pickling the user's arrays and the optimizer together keeps their
# identity; state arrays come back packed into one block per group and name, as a load makes.

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


def _is_transient(obj: Any, name: str) -> bool:
    return (
        name.startswith("_cache")
        or name.endswith("_cache")
        or name in getattr(type(obj), "_transient_attrs", ())
    )


def _pickled_dict(obj: Any) -> Dict[str, Any]:
    saved: Dict[str, Any] = {}
    for name, value in vars(obj).items():
        if isinstance(value, _LOCK_TYPES):
            saved[name] = ("__lock__", isinstance(value, _LOCK_TYPES[1]))
        elif _is_transient(obj, name):
            saved[name] = ("__transient__", type(value) if type(value) in (dict, list, set) else None)
        else:
            saved[name] = value
    return saved


def _restore_dict(obj: Any, saved: Dict[str, Any]) -> None:
    restored: Dict[str, Any] = {}
    for name, value in saved.items():
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "__lock__":
            restored[name] = threading.RLock() if value[1] else threading.Lock()
        elif isinstance(value, tuple) and len(value) == 2 and value[0] == "__transient__":
            restored[name] = value[1]() if value[1] is not None else None
        else:
            restored[name] = value
    obj.__dict__.update(restored)
    # State arrays come back as separate arrays: pack each group's into one block again.
    groups = getattr(obj, "param_groups", None)
    state = getattr(obj, "state", None)
    names = getattr(obj, "_array_state_names", ()) if hasattr(obj, "_rule") else ()
    if isinstance(groups, list) and isinstance(state, ParamState):
        for group in groups:
            entries = [(p, state.get_by_id(p)) for p in group.get("params", ())]
            for name in names:
                have = [
                    (p, s)
                    for p, s in entries
                    if s is not None
                    and isinstance(s.get(name), np.ndarray)
                    and isinstance(p, np.ndarray)
                    and s[name].dtype == obj._state_storage(p)
                ]
                if have and obj.state_dtype == "int8":
                    _pack_int8([s for _, s in have], name)
                elif have:
                    _pack(
                        [s for _, s in have],
                        name,
                        [s[name].shape for _, s in have],
                        None,
                        [obj._state_storage(p) for p, _ in have],
                    )


def require_float32(
    arrays: Sequence[np.ndarray], name: str, who: str, positions: Optional[List[int]] = None
) -> None:
    """Refuses (TypeError naming ``name[i]``) any array not float32, for the optimizers whose
    fused passes are float32 only (Muon, LBFGS)."""
    for i, a in enumerate(arrays):
        if a.dtype != np.float32:
            at = i if positions is None else positions[i]
            raise TypeError(
                f"{name}[{at}] must be a float32 array, got dtype {a.dtype}: {who}'s fused passes "
                "step float32 only (optkern's other optimizers take float64)"
            )
