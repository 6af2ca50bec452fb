"""The optimizer database of the tests: one entry per optimizer class of optkern, built from the
registry (``optkern.registry.rules()``, the rules the C++ core declares) and from the classes
``optkern`` exports, so that a rule declared in C++ is here, with defaults derived from its
declaration, without a line added. Test files take their optimizers and options from here, never
from a list of their own: a new rule is checked against its reference, attacked, fuzzed, threaded,
checkpointed and pickled everywhere.

Each entry (:class:`Entry`) holds

- ``cases``: option sets checked against the float64 reference (reference.py), covering every
  branch of the rule, with hyperparameters that keep 100 steps of N(0, 0.1^2) gradients well
  conditioned (float32 meets ``tol`` there);
- ``attack``: option sets under which every state buffer the rule can keep exists (hostile input,
  concurrency, threads, checkpoints, pickling run each; the last one is the richest);
- ``oracles``: other packages' implementations of the same rule (:class:`Oracle`: torch.optim,
  optax, schedulefree, lion-pytorch), with the argument mapping; ``oracle_cases``: option sets
  that reach branches the oracle's own test inputs (torch's optim_db) do not, checked against the
  oracle beside them (none by default);
- ``mpi``: the hyperparameters of the data-parallel tests (tests/mpi);
- ``tol``: (rtol, atol) of float32 results against the float64 reference;
- what it supports: ``zero`` (ZeRO's element-wise sharding: no reduction over an array, no
  factored state), ``factored`` (states shaped by rows / columns), ``reduction``, ``carried``
  numbers, ``schedule_free`` (train()/eval()), ``dtypes`` (parameter types the class takes,
  probed from the class itself).

``OVERRIDES`` below holds what a rule needs beyond the derived defaults (hand-picked option
sets, its oracles); an override naming no class of optkern is an error, so none goes stale.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import optkern as ok
from optkern.registry import Rule

TOL = (1e-5, 1e-6)  # float32 against the float64 reference after 100 steps (the contract)
#: Keyword arguments of the classes that are not hyperparameters of the rule: torch's execution
#: flags and optkern's precision options.
NOT_HYPERPARAMETERS = (
    "foreach",
    "fused",
    "differentiable",
    "capturable",
    "state_dtype",
    "stochastic_rounding",
    "master_weights",
)

# -- oracles -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Oracle:
    """Another package's implementation of a rule: ``package`` (the module to import) and
    ``name`` (the class or function in it, dotted), how its arguments follow optkern's
    (``kwargs``), and what torch's own tests know of it."""

    package: str  # "torch", "optax", "schedulefree", "lion_pytorch"
    name: str  # "optim.Adam", "lion", "AdamWScheduleFree", "Lion"
    fixed: Tuple[Tuple[str, Any], ...] = ()  # arguments that make it this rule (nesterov=True)
    rename: Tuple[Tuple[str, str], ...] = ()  # optkern's argument -> the oracle's
    split: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()  # a tuple argument -> the oracle's names
    maximize: bool = True  # takes maximize=; else the tests step it on -g
    optim_db: bool = False  # torch's optimizer test database (optim_db) has inputs for it
    fused: bool = False  # torch has a fused CPU kernel for it
    states: Tuple[Tuple[str, str], ...] = ()  # optkern's state name -> the oracle's (optax's fields)
    convert: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None  # arguments it takes
    # in another form, after renaming (AdEMAMix's warmups as optax schedules)

    def load(self) -> Any:
        """The oracle's class or function (skips the test when the package is absent)."""
        import pytest

        obj = pytest.importorskip(self.package)
        for part in self.name.split("."):
            obj = getattr(obj, part)
        return obj

    def takes(self, entry: "Entry", hp: Dict[str, Any]) -> bool:
        """Whether the oracle has the form ``hp`` asks for: no option of optkern's own (a
        textbook form, which torch.optim lacks) switched on."""
        return all(hp.get(key, default) == default for key, default in entry.rule.own_args())

    def kwargs(self, entry: "Entry", hp: Dict[str, Any]) -> Dict[str, Any]:
        """The oracle's arguments for optkern's ``hp`` on ``entry``'s class: optkern's defaults
        filled in (oracles default differently, or not at all), renamed and split as the oracle
        names them; maximize dropped where the oracle has none, and optkern's own options (the
        textbook forms, which torch.optim lacks) dropped at their defaults."""
        full = dict(entry.defaults, **hp)
        out: Dict[str, Any] = dict(self.fixed)
        rename, split = dict(self.rename), dict(self.split)
        own = dict(entry.rule.own_args())  # options torch.optim lacks (the textbook forms)
        for key, value in full.items():
            if key == "maximize" and not self.maximize:
                continue
            if key in own:
                if value != own[key]:
                    raise ValueError(f"{self.name} has no {key}={value!r}: optkern's own option")
                continue
            if key in split:
                out.update(zip(split[key], value))
            else:
                out[rename.get(key, key)] = value
        return self.convert(out) if self.convert else out


def _torch(name: str, **kw: Any) -> Oracle:
    return Oracle("torch", "optim." + name, optim_db=kw.pop("optim_db", True), **kw)


def _optax(name: str, states: Tuple[Tuple[str, str], ...], **kw: Any) -> Oracle:
    betas = kw.pop("betas", ("b1", "b2"))
    return Oracle(
        "optax",
        name,
        rename=(("lr", "learning_rate"),),
        split=(("betas", betas),),
        maximize=False,
        states=states,
        **kw,
    )


def _ademamix_schedules(kw: Dict[str, Any]) -> Dict[str, Any]:
    """AdEMAMix's warmups (the authors' class) as the schedules optax.contrib.ademamix takes:
    functions of its count (the step - 1), computed in double on the host as optkern does (a
    float32 log of beta3 + 1e-8 would move the half-life by 1e-3)."""
    beta1, beta3, alpha = kw["b1"], kw["b3"], kw["alpha"]
    beta3_warmup, alpha_warmup = kw.pop("beta3_warmup"), kw.pop("alpha_warmup")

    def half_life(b: float) -> float:
        return math.log(0.5) / math.log(b + 1e-8) - 1

    def b3(count: Any) -> float:
        step = int(count) + 1
        if not beta3_warmup or step >= beta3_warmup:
            return beta3
        a = step / beta3_warmup
        return 0.5 ** (1 / ((1 - a) * half_life(beta1) + a * half_life(beta3) + 1))

    def warm_alpha(count: Any) -> float:
        step = int(count) + 1
        return alpha * step / alpha_warmup if alpha_warmup and step < alpha_warmup else alpha

    return dict(kw, b3=b3, alpha=warm_alpha)


# -- what a rule needs beyond its derived defaults -------------------------------------------------

#: Per class: ``cases``, ``attack``, ``oracles``, ``oracle_cases``, ``mpi``, ``tol``.
OVERRIDES: Dict[str, Dict[str, Any]] = {
    "SGD": dict(
        cases=[
            dict(lr=0.01),
            dict(lr=0.01, maximize=True),
            dict(lr=0.005, momentum=0.9),
            dict(lr=0.005, momentum=0.9, dampening=0.3),
            dict(lr=0.005, momentum=0.9, nesterov=True),
            dict(lr=0.005, momentum=0.8, weight_decay=0.05),
            dict(lr=0.005, momentum=0.5, weight_decay=0.1, nesterov=True, maximize=True),
            dict(lr=0.01, weight_decay=0.1),
            # classic momentum (lr inside the velocity; Keras, its oracle: test_oracle_parity_keras.py)
            dict(lr=0.005, momentum=0.9, lr_in_velocity=True),
            dict(lr=0.005, momentum=0.8, dampening=0.3, weight_decay=0.05, lr_in_velocity=True),
            dict(lr=0.005, momentum=0.5, nesterov=True, lr_in_velocity=True, maximize=True),
            dict(lr=0.01, lr_in_velocity=True),  # no momentum: plain SGD
        ],
        attack=[
            dict(lr=0.1),
            dict(lr=0.1, momentum=0.9, weight_decay=0.01),
            dict(lr=0.1, momentum=0.9, nesterov=True, lr_in_velocity=True),
            dict(lr=0.01, momentum=0.9, nesterov=True),
        ],
        oracles=[_torch("SGD", fused=True)],
        mpi=dict(lr=0.01, momentum=0.9, weight_decay=1e-3),
    ),
    "Nesterov": dict(
        cases=[
            dict(lr=0.005),
            dict(lr=0.005, momentum=0.8, weight_decay=0.01, maximize=True),
            dict(lr=0.005, momentum=0.8, weight_decay=0.05, lr_in_velocity=True),
        ],
        attack=[dict(lr=0.1, maximize=True)],
        # SGD's optim_db inputs are SGD's (test_torch_parity checks Nesterov on its own cases)
        oracles=[_torch("SGD", fixed=(("nesterov", True),), fused=True, optim_db=False)],
        mpi=dict(lr=0.01),
    ),
    "Momentum": dict(
        cases=[
            dict(lr=0.01),
            dict(lr=0.01, beta=0.5, weight_decay=0.05),
            dict(lr=0.01, beta=0.99, maximize=True),
        ],
        attack=[dict(lr=0.1, weight_decay=0.01)],
        mpi=dict(lr=0.05),
    ),
    "RMSprop": dict(
        cases=[
            dict(lr=1e-3),
            dict(lr=1e-3, centered=True),
            dict(lr=1e-3, momentum=0.9),
            # centered: sqrt(square_avg - grad_avg^2) cancels badly in float32 when the variance
            # is small next to the mean (a weight decay larger than the noise): a small decay.
            dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=0.01),
            dict(lr=1e-3, alpha=0.4, eps=1e-3, weight_decay=0.01, maximize=True),
            # the textbook forms, Keras' (test_oracle_parity_keras.py): eps under the square root, lr
            # inside the momentum buffer
            dict(lr=1e-3, eps=1e-3, eps_inside_sqrt=True),
            dict(lr=1e-3, momentum=0.9, eps_inside_sqrt=True, lr_in_velocity=True),
            dict(
                lr=1e-3,
                momentum=0.9,
                centered=True,
                eps=1e-4,
                eps_inside_sqrt=True,
                weight_decay=0.01,
            ),
            dict(lr=1e-3, momentum=0.5, centered=True, lr_in_velocity=True, maximize=True),
        ],
        attack=[
            dict(),
            dict(lr=1e-3, momentum=0.9, eps_inside_sqrt=True, lr_in_velocity=True),
            dict(lr=1e-3, centered=True, momentum=0.9, weight_decay=0.1),
        ],
        oracles=[_torch("RMSprop")],
        mpi=dict(lr=1e-3, centered=True, momentum=0.5),
    ),
    "Adagrad": dict(
        cases=[
            dict(lr=1e-2),
            dict(lr=1e-2, lr_decay=0.01, weight_decay=0.1),
            dict(lr=1e-2, initial_accumulator_value=0.5, eps=1e-3, maximize=True),
            # the textbook form, Keras' (test_oracle_parity_keras.py): eps under the square root
            dict(lr=1e-2, eps=1e-7, initial_accumulator_value=0.1, eps_inside_sqrt=True),
            dict(lr=1e-2, lr_decay=0.01, weight_decay=0.1, eps=1e-3, eps_inside_sqrt=True),
        ],
        attack=[dict(eps_inside_sqrt=True), dict(lr_decay=0.1, initial_accumulator_value=0.1)],
        oracles=[_torch("Adagrad", fused=True)],
        mpi=dict(lr=0.05, lr_decay=1e-3),
    ),
    "Adadelta": dict(
        cases=[
            dict(),
            dict(lr=0.5, rho=0.5, eps=1e-4, weight_decay=0.1),
            dict(lr=1.0, maximize=True),
        ],
        attack=[dict(weight_decay=0.01)],
        oracles=[_torch("Adadelta")],
        mpi=dict(lr=1.0),
    ),
    "Adam": dict(
        cases=[
            dict(),
            dict(amsgrad=True),
            dict(lr=2e-3, betas=(0.8, 0.99), weight_decay=0.1),
            dict(lr=1e-3, betas=(0.3, 0.9), eps=1e-4, amsgrad=True, weight_decay=0.01, maximize=True),
            dict(lr=1e-3, betas=(0.0, 0.0)),
        ],
        attack=[dict(), dict(amsgrad=True)],
        oracles=[_torch("Adam", fused=True)],
        mpi=dict(lr=1e-2, amsgrad=True),
    ),
    "AdamW": dict(
        cases=[
            dict(),
            dict(amsgrad=True, weight_decay=0.1),
            dict(lr=1e-3, betas=(0.6, 0.95), weight_decay=0.0, maximize=True),
        ],
        attack=[dict(), dict(amsgrad=True, weight_decay=0.1)],
        oracles=[_torch("AdamW", fused=True)],
        mpi=dict(lr=1e-2),
    ),
    "Adamax": dict(
        cases=[
            dict(),
            dict(lr=1e-3, betas=(0.8, 0.99), weight_decay=0.1),
            dict(lr=2e-3, betas=(0.3, 0.9), eps=1e-4, maximize=True),
        ],
        oracles=[_torch("Adamax")],
        mpi=dict(lr=1e-2),
    ),
    "NAdam": dict(
        cases=[
            dict(),
            dict(lr=1e-3, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=0.01),
            dict(lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True, eps=1e-4, maximize=True),
        ],
        oracles=[_torch("NAdam")],
        oracle_cases=[
            dict(),
            dict(lr=1e-3, momentum_decay=6e-3, weight_decay=0.1),
            dict(weight_decay=0.1, momentum_decay=6e-3, decoupled_weight_decay=True),
            dict(betas=(0.5, 0.9), eps=1e-4, weight_decay=0.01, maximize=True),
        ],
        mpi=dict(lr=1e-2),
    ),
    "RAdam": dict(
        cases=[
            dict(),  # momentum only for 5 steps, then rectified
            dict(lr=1e-3, betas=(0.9, 0.6)),  # rho_inf = 4: never rectified
            dict(lr=1e-3, betas=(0.8, 0.99), weight_decay=0.1, eps=1e-4),
            dict(lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        ],
        oracles=[_torch("RAdam")],
        oracle_cases=[
            dict(),
            dict(lr=2e-3, eps=1e-6, weight_decay=0.1),
            dict(weight_decay=0.1, decoupled_weight_decay=True),
            dict(betas=(0.8, 0.9), weight_decay=0.1, maximize=True),  # rho_t > 5 from step 6
        ],
        mpi=dict(lr=1e-2),
    ),
    "ASGD": dict(
        cases=[
            dict(),
            dict(lr=5e-3, lambd=0.1, alpha=0.5, t0=20, weight_decay=0.1),  # averaging from 21
            dict(lr=1e-2, lambd=1e-3, t0=0, maximize=True),  # averaging from step 2
        ],
        attack=[dict(t0=1)],
        oracles=[_torch("ASGD")],
        oracle_cases=[
            dict(),
            dict(lambd=0.1, lr=0.02),
            dict(t0=10, alpha=0.5, weight_decay=0.1),
            dict(t0=0, weight_decay=0.1, maximize=True),
        ],
        mpi=dict(lr=0.05, t0=20),
    ),
    "Lion": dict(
        cases=[
            dict(),
            dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1),
            dict(lr=1e-3, betas=(0.0, 0.5), weight_decay=1e-3, maximize=True),
        ],
        oracles=[
            _optax("lion", (("exp_avg", "mu"),)),
            Oracle("lion_pytorch", "Lion", maximize=False),
        ],
        oracle_cases=[
            dict(),
            dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1),
            dict(lr=1e-3, betas=(0.0, 0.5), weight_decay=1e-3),
            dict(lr=1e-2, betas=(0.99, 0.9), weight_decay=1.0),
        ],
        mpi=dict(lr=1e-3),
    ),
    "Rprop": dict(
        cases=[
            dict(),
            dict(lr=2e-4, etas=(0.5, 1.5), step_sizes=(2e-6, 100)),
            dict(etas=(0.3, 1.1), step_sizes=(1e-4, 0.05), maximize=True),
        ],
        oracles=[_torch("Rprop")],
        oracle_cases=[
            dict(),
            dict(lr=2e-4, etas=(0.5, 1.5), step_sizes=(2e-6, 100)),
            dict(etas=(0.3, 1.1), step_sizes=(1e-4, 0.05), maximize=True),
        ],
        mpi=dict(lr=1e-3),
    ),
    "LAMB": dict(
        cases=[
            dict(),
            dict(lr=2e-3, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.01),
            dict(lr=1e-3, betas=(0.5, 0.9), eps=1e-8, weight_decay=0.1, maximize=True),
        ],
        oracles=[_optax("lamb", (("exp_avg", "mu"), ("exp_avg_sq", "nu")))],
        oracle_cases=[
            dict(),
            dict(weight_decay=0.01),
            dict(lr=2e-3, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.01),
            dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-8, weight_decay=0.5),
            dict(betas=(0.0, 0.0)),
        ],
        mpi=dict(lr=1e-2),
    ),
    "ScheduleFreeAdamW": dict(
        cases=[
            dict(),
            dict(lr=1e-3, warmup_steps=10, r=0.5, weight_lr_power=1.0, weight_decay=0.1),
            dict(betas=(0.5, 0.9), eps=1e-4, weight_lr_power=0.0, maximize=True),
        ],
        attack=[dict(warmup_steps=2, weight_decay=0.01)],
        oracles=[Oracle("schedulefree", "AdamWScheduleFree", maximize=False)],
        oracle_cases=[
            dict(),
            dict(lr=1e-3, warmup_steps=10, r=0.5, weight_lr_power=1.0, weight_decay=0.01),
            dict(betas=(0.95, 0.99), eps=1e-6, weight_lr_power=0.0),
            dict(lr=0.01, warmup_steps=40, weight_decay=0.1),  # warming up all along
            dict(lr=5e-3, r=2.0, weight_lr_power=3.0, betas=(0.5, 0.9)),
            dict(lr=1e-2, warmup_steps=10),
            dict(lr=5e-3, weight_decay=0.1, r=0.5, weight_lr_power=1.0),
            dict(lr=2e-3, betas=(0.5, 0.99), eps=1e-6, weight_lr_power=0.0, warmup_steps=50),
            dict(lr=1e-3, r=2.0, weight_lr_power=3.0, warmup_steps=5),
        ],
    ),
    "ScheduleFreeSGD": dict(
        cases=[
            dict(lr=0.01),
            dict(lr=0.005, momentum=0.8, warmup_steps=10, r=1.0, weight_decay=0.1),
            dict(lr=0.01, momentum=0.5, weight_lr_power=0.0, maximize=True),
        ],
        attack=[dict(lr=0.01, warmup_steps=2)],
        oracles=[Oracle("schedulefree", "SGDScheduleFree", maximize=False)],
        oracle_cases=[
            dict(lr=0.1),
            dict(),
            dict(lr=0.05, momentum=0.8, warmup_steps=10, r=1.0, weight_decay=0.01),
            dict(lr=0.2, momentum=0.5, warmup_steps=40, weight_lr_power=0.0),
            dict(lr=0.2, momentum=0.5, weight_lr_power=0.0, weight_decay=0.1),
        ],
    ),
    # torch's SparseAdam refuses dense gradients: its parity (sparse gradients) is in
    # test_torch_algos.py, the row-sparse cases against a reference in test_sparse_rows.py.
    "SparseAdam": dict(
        cases=[
            dict(),
            dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4),
            dict(lr=1e-3, betas=(0.0, 0.5), maximize=True),
        ],
    ),
    "Adafactor": dict(
        cases=[
            dict(),
            dict(lr=0.01, weight_decay=0.1, maximize=True),
            dict(beta2_decay=-1.0, d=1.5, eps=(1e-20, 1e-2)),
        ],
        oracles=[_torch("Adafactor")],
        oracle_cases=[
            dict(),
            dict(weight_decay=0.1, lr=0.01),
            dict(weight_decay=0.1, maximize=True),
            dict(beta2_decay=-1.0, d=1.5, eps=(1e-20, 1e-2)),
        ],
    ),
    # The derived cases leave the warmups (None-able numbers, not flags) off: the cases below
    # warm up within the tests' steps, all along them, and not at all; and optax's oracle.
    "AdEMAMix": dict(
        cases=[
            dict(),
            dict(betas=(0.9, 0.999, 0.999), alpha=5.0, weight_decay=0.1, maximize=True),
            dict(beta3_warmup=20, alpha_warmup=12),
            dict(lr=2e-3, betas=(0.8, 0.99, 0.9999), alpha=8.0, beta3_warmup=500, alpha_warmup=500),
            dict(betas=(0.0, 0.999, 0.99), eps=1e-6, weight_decay=0.01),  # no fast average
            dict(alpha=0.0, alpha_warmup=0),  # Adam (a warmup of 0 is none)
        ],
        oracles=[
            _optax(
                "contrib.ademamix",
                (("exp_avg_fast", "m1"), ("exp_avg_slow", "m2"), ("exp_avg_sq", "nu")),
                betas=("b1", "b2", "b3"),
                convert=_ademamix_schedules,
            )
        ],
    ),
}

# -- entries -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str  # the class's name in optkern
    cls: type
    rule: Rule
    cases: Tuple[Dict[str, Any], ...]
    attack: Tuple[Dict[str, Any], ...]
    oracles: Tuple[Oracle, ...] = ()
    oracle_cases: Tuple[Dict[str, Any], ...] = ()
    mpi: Dict[str, Any] = field(default_factory=dict)
    tol: Tuple[float, float] = TOL
    dtypes: Tuple[str, ...] = ("float32",)

    @property
    def defaults(self) -> Dict[str, Any]:
        """The class's arguments and their defaults, in torch's names (maximize included; not
        torch's execution flags nor optkern's precision options)."""
        params = inspect.signature(self.cls).parameters.values()
        return {
            p.name: p.default
            for p in params
            if p.default is not p.empty and p.name not in NOT_HYPERPARAMETERS
        }

    @property
    def function(self) -> Any:
        """The rule's function in optkern.functional."""
        return getattr(ok.functional, self.rule.name + "_")

    @property
    def zero(self) -> bool:
        """ZeRO shards each array element-wise: not a rule that reduces over a whole array or
        keeps states shaped by rows and columns."""
        return not (self.rule.reduction or self.rule.factored)

    @property
    def factored(self) -> bool:
        return bool(self.rule.factored)

    @property
    def reduction(self) -> bool:
        return bool(self.rule.reduction)

    @property
    def carried(self) -> Tuple[str, ...]:
        return self.rule.carried_names

    @property
    def schedule_free(self) -> bool:
        return hasattr(self.cls, "train") and hasattr(self.cls, "eval")

    def oracle(self, package: str) -> Optional[Oracle]:
        """This rule's oracle in ``package``, or None."""
        return next((o for o in self.oracles if o.package == package), None)


def optimizer_classes() -> List[type]:
    """Every optimizer class optkern exports on a rule the core declares, in the order of
    ``optkern.__all__`` (Muon and LBFGS, which are not one element-wise rule, have their own
    tests: test_muon.py, test_lbfgs.py)."""
    declared = {r.name for r in ok.registry.rules()}
    return [
        getattr(ok, n)
        for n in ok.__all__
        if isinstance(getattr(ok, n), type)
        and issubclass(getattr(ok, n), ok.Optimizer)
        and getattr(ok, n) is not ok.Optimizer
        and getattr(ok, n)._rule.name in declared
    ]


def _on_value(rng: str) -> Any:
    """A value that switches a state on, inside the declared range."""
    return {"flag": True, "one_or_more": 1.5, "above_one": 1.5}.get(rng, 0.5)


def all_states_on(rule: Rule) -> Dict[str, Any]:
    """Options (torch's names) under which every state the rule declares exists."""
    hyper = {h.name: h for h in rule.hyper}
    return {
        hyper[s.when].torch: _on_value(hyper[s.when].range) for s in rule.states if s.when is not None
    }


def derived_cases(rule: Rule) -> List[Dict[str, Any]]:
    """A new rule's reference cases from its declaration: the defaults; every optional state on,
    a weight decay and maximize; each other flag flipped, with the optional states on (a flag
    may need one: SGD's nesterov, a momentum)."""
    on = all_states_on(rule)
    rich = dict(on, maximize=True)
    if any(h.torch == "weight_decay" for h in rule.hyper):
        rich["weight_decay"] = 0.1
    out = [{}, rich]
    for h in rule.hyper:
        if h.range == "flag" and h.torch not in rich:
            out.append(dict(on, **{h.torch: not h.default}))
    return out


def _dtypes(cls: type) -> Tuple[str, ...]:
    """The parameter types the class takes (its constructor refuses the others)."""
    out = []
    for dtype in ("float32", "float64", "float16"):
        try:
            cls([np.zeros(2, dtype)])
        except TypeError:
            continue
        out.append(dtype)
    return tuple(out)


def _build() -> Dict[str, Entry]:
    entries = {}
    for cls in optimizer_classes():
        name = cls.__name__
        rule = cls._rule
        over = OVERRIDES.get(name, {})
        unknown = set(over) - {"cases", "attack", "oracles", "oracle_cases", "mpi", "tol"}
        if unknown:
            raise KeyError(f"optim_db.OVERRIDES[{name!r}]: unknown fields {sorted(unknown)}")
        cases = over.get("cases") or derived_cases(rule)
        entries[name] = Entry(
            name=name,
            cls=cls,
            rule=rule,
            cases=tuple(cases),
            attack=tuple(over.get("attack") or [all_states_on(rule)]),
            oracles=tuple(over.get("oracles", ())),
            oracle_cases=tuple(over.get("oracle_cases", ())),
            # some defaults (Schedule-Free SGD's lr=1) diverge on the MPI tests' model: a small lr
            mpi=dict(over.get("mpi") or {"lr": 1e-3}),
            tol=over.get("tol", TOL),
            dtypes=_dtypes(cls),
        )
    stale = set(OVERRIDES) - set(entries)
    if stale:
        raise KeyError(f"optim_db.OVERRIDES names classes optkern does not have: {sorted(stale)}")
    return entries


DB: Dict[str, Entry] = _build()
ENTRIES: List[Entry] = list(DB.values())
NAMES: List[str] = list(DB)


def entry(name: str) -> Entry:
    return DB[name]


# -- the lists the test files parametrize over -------------------------------------------------------


def case_id(case: Tuple[str, Dict[str, Any]]) -> str:
    name, hp = case
    return name + "(" + ",".join(f"{k}={v}" for k, v in hp.items()) + ")"


def cases(entries: Optional[Sequence[Entry]] = None) -> List[Tuple[str, Dict[str, Any]]]:
    """(class name, options) of every reference case."""
    return [(e.name, dict(hp)) for e in (entries or ENTRIES) for hp in e.cases]


def attack_cases() -> List[Tuple[str, Dict[str, Any]]]:
    """(class name, options) of every option set to attack."""
    return [(e.name, dict(hp)) for e in ENTRIES for hp in e.attack]


def richest() -> List[Tuple[str, Dict[str, Any]]]:
    """One (class name, options) per class: its last attack set (every state on)."""
    return [(e.name, dict(e.attack[-1])) for e in ENTRIES]


def with_oracle(package: str) -> List[Entry]:
    """The entries with an oracle in ``package``."""
    return [e for e in ENTRIES if e.oracle(package) is not None]


#: Every reference case, (class name, options): what most files parametrize over.
CASES: List[Tuple[str, Dict[str, Any]]] = cases()
