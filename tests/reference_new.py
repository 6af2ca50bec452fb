"""Float64 NumPy references of the rules that issue 13 adds, in the style of ``reference.py``:
each written from its oracle's source, in the oracle's order of operations.

- NAdam, RAdam, ASGD, Rprop, Adafactor: ``torch.optim`` 2.13 (the single-tensor path).
- Lion: ``optax.lion`` (hard sign), with the defaults of the ``lion-pytorch`` package
  (lr=1e-4, betas=(0.9, 0.99), weight_decay=0) and its state name ``exp_avg``.
- LAMB: ``optax.lamb`` (Adam direction, plus decoupled decay, scaled per parameter array by
  norm(p) / norm(u), 1 where either norm is 0); state named as torch names Adam's.
- ScheduleFreeAdamW, ScheduleFreeSGD: ``schedulefree.AdamWScheduleFree`` and ``SGDScheduleFree``,
  with their ``train()`` / ``eval()`` switch between the points y and x.

As in ``reference.py``, one reference holds one parameter. Where the oracle keeps a counter per
param group (Schedule-Free's ``k``, ``weight_sum``, ``lr_max`` and ``train_mode``), the reference
keeps it in ``self.group``, and ``skip()`` advances it for a step in which this parameter had no
gradient (the group still stepped).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from reference import SCHEDULE_FREE, Reference

#: The rules of this file, with the hyperparameters (and defaults) of their oracles.
NEW_RULES = (
    "NAdam",
    "RAdam",
    "ASGD",
    "Rprop",
    "Adafactor",
    "Lion",
    "LAMB",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
)


class ReferenceNew(Reference):
    counters_in_state = False  # the package's layout

    def __init__(self, name: str, p0: np.ndarray, dtype: Any = np.float64, **hp: Any) -> None:
        super().__init__(name, p0, dtype, **hp)
        # The package starts in eval mode (optkern's classes in train mode: see Reference).
        self.group["train_mode"] = False

    def skip(self) -> None:
        """The group stepped but this parameter had no gradient."""
        if self.name in SCHEDULE_FREE:
            self._schedule_free_weights(**self._schedule_hp())

    # -- optax -----------------------------------------------------------------------------------


#: Option sets covering every branch of every new rule (the float64 self-checks and, later, the
#: kernels' reference rows), with hyperparameters that keep 100 steps of N(0, 0.1^2) gradients
#: well conditioned.
NEW_CASES = [
    ("NAdam", dict()),
    ("NAdam", dict(lr=1e-3, momentum_decay=6e-3, weight_decay=0.1)),
    ("NAdam", dict(weight_decay=0.1, momentum_decay=6e-3, decoupled_weight_decay=True)),
    ("NAdam", dict(betas=(0.5, 0.9), eps=1e-4, weight_decay=0.01, maximize=True)),
    ("RAdam", dict()),
    ("RAdam", dict(lr=2e-3, eps=1e-6, weight_decay=0.1)),
    ("RAdam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(betas=(0.8, 0.9), weight_decay=0.1, maximize=True)),  # rho_t > 5 from step 6
    ("ASGD", dict()),
    ("ASGD", dict(lambd=0.1, lr=0.02)),
    ("ASGD", dict(t0=10, alpha=0.5, weight_decay=0.1)),
    ("ASGD", dict(t0=0, weight_decay=0.1, maximize=True)),
    ("Rprop", dict()),
    ("Rprop", dict(lr=2e-4, etas=(0.5, 1.5), step_sizes=(2e-6, 100))),
    ("Rprop", dict(etas=(0.3, 1.1), step_sizes=(1e-4, 0.05), maximize=True)),
    ("Adafactor", dict()),
    ("Adafactor", dict(weight_decay=0.1, lr=0.01)),
    ("Adafactor", dict(weight_decay=0.1, maximize=True)),
    ("Adafactor", dict(beta2_decay=-1.0, d=1.5, eps=(1e-20, 1e-2))),
    ("Lion", dict()),
    ("Lion", dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1)),
    ("LAMB", dict()),
    ("LAMB", dict(lr=2e-3, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.01)),
    ("ScheduleFreeAdamW", dict()),
    (
        "ScheduleFreeAdamW",
        dict(lr=1e-3, warmup_steps=10, r=0.5, weight_lr_power=1.0, weight_decay=0.01),
    ),
    ("ScheduleFreeAdamW", dict(betas=(0.95, 0.99), eps=1e-6, weight_lr_power=0.0)),
    ("ScheduleFreeSGD", dict(lr=0.1)),
    ("ScheduleFreeSGD", dict(lr=0.05, momentum=0.8, warmup_steps=10, r=1.0, weight_decay=0.01)),
]
