"""Schedule-Free's ``train()`` / ``eval()`` switch, one implementation for optkern's NumPy classes
and for :mod:`optkern.torch` (each front-end supplies three small hooks).

The parameter holds y (where the gradient is taken) in train mode and x (the average, to evaluate
and save) in eval mode; z is in the state. Each switch is one in-place lerp per parameter that
has taken a step, p <- lerp(p, z, w) with w = 1 - beta (x -> y) or 1 - 1/beta (y -> x), in
torch's form of lerp, so references to the arrays see it. The mode is each group's
``train_mode`` (a bool, as the schedulefree package keeps it), saved with the group.

All or nothing: every group's beta and every parameter and z are checked before the first is
moved (a read-only array, a parameter cast to another dtype, a z of the wrong shape: TypeError
or ValueError naming the parameter, nothing moved). The move itself allocates nothing (one
scratch buffer, made first) and a Ctrl-C that arrives during it is raised once every group has
moved, so a switch either happened whole or not at all.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ScheduleFreeSwitch", "check_train_mode", "deferred_interrupts"]

#: Elements moved per pass through the scratch buffer.
_CHUNK = 1 << 16


def check_train_mode(value: Any, where: str) -> bool:
    """A group's ``train_mode`` as loaded or given: a bool (NumPy's too), nothing else (the text
    "False" would otherwise read as train mode)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{where} must be True or False, got {type(value).__name__}: {value!r}")


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Holds back SIGINT (Ctrl-C) until the block ends, then delivers it to the handler that was
    in place (KeyboardInterrupt by default). Only the main thread receives signals; elsewhere
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # pragma: no cover - an interpreter without signal support here
        yield
        return
    pending: List[Tuple[int, Any]] = []
    if previous is None or previous in (signal.SIG_IGN, signal.SIG_DFL):
        yield  # nothing Python-level would run: nothing to defer
        return
    signal.signal(signal.SIGINT, lambda sig, frame: pending.append((sig, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            previous(*pending[0])


def lerp_(p: np.ndarray, z: np.ndarray, weight: np.floating, scratch: np.ndarray) -> None:
    """p <- torch.lerp(p, z, weight) in p's dtype (``weight`` a NumPy scalar of it), in torch's
    form (see ``Lerp`` in the core), chunk by chunk through ``scratch`` (of p's dtype): no
    allocation."""
    flat_p = p.reshape(-1)
    flat_z = z.reshape(-1)
    small = abs(float(weight)) < 0.5
    factor = weight if small else type(weight)(1.0) - weight
    for a in range(0, flat_p.size, scratch.size):
        b = min(a + scratch.size, flat_p.size)
        pc, zc, s = flat_p[a:b], flat_z[a:b], scratch[: b - a]
        np.subtract(zc, pc, out=s)
        np.multiply(s, factor, out=s)
        if small:
            np.add(pc, s, out=pc)
        else:
            np.subtract(zc, s, out=pc)


class ScheduleFreeSwitch:
    """The mixin of both front-ends' Schedule-Free classes. A front-end defines

    - ``_sf_lock()``: a context manager held during a switch;
    - ``_sf_beta(group)``: the group's interpolation hyperparameter, checked (beta1 for AdamW,
      momentum for SGD);
    - ``_sf_pair(group, gi, i, p)``: the NumPy views (p, z) to move for parameter ``i`` of group
      ``gi``, or None if it has not taken a step (y = x = z); raises TypeError/ValueError naming
      the parameter if it cannot be moved, and changes nothing;
    - ``_sf_moved(params)`` (optional): told which parameters moved.
    """

    def _sf_lock(self) -> Any:
        return contextlib.nullcontext()

    def _sf_beta(self, group: Dict[str, Any]) -> float:  # pragma: no cover - every front-end
        raise NotImplementedError

    def _sf_pair(
        self, group: Dict[str, Any], gi: int, i: int, p: Any
    ) -> Optional[Tuple[np.ndarray, np.ndarray]]:  # pragma: no cover - every front-end
        raise NotImplementedError

    def _sf_moved(self, params: List[Any]) -> None:
        pass

    # -- the public switch --------------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """A new group starts in the mode of the first group (train mode for the first)."""
        with self._sf_lock():
            groups = self.param_groups  # type: ignore[attr-defined]
            if isinstance(param_group, dict) and "train_mode" in param_group:
                check_train_mode(param_group["train_mode"], "param group 'train_mode'")
            mode = bool(groups[0].get("train_mode", True)) if groups else True
            super().add_param_group(param_group)  # type: ignore[misc]
            groups[-1].setdefault("train_mode", mode)

    def train(self) -> None:
        """x -> y: p <- lerp(p, z, 1 - beta), for each group in eval mode."""
        self._switch(True)

    def eval(self) -> None:
        """y -> x: p <- lerp(p, z, 1 - 1/beta), for each group in train mode."""
        self._switch(False)

    def _switch(self, to_train: bool) -> None:
        with self._sf_lock():
            groups = list(self.param_groups)  # type: ignore[attr-defined]
            plan = []
            for gi, group in enumerate(groups):
                mode = check_train_mode(
                    group.get("train_mode", True), f"param_groups[{gi}]['train_mode']"
                )
                if mode == to_train:
                    continue
                beta = float(self._sf_beta(group))
                weight = 1.0 - beta if to_train else 1.0 - 1.0 / beta  # rounded per dtype below
                pairs = []
                for i, p in enumerate(group["params"]):
                    pair = self._sf_pair(group, gi, i, p)
                    if pair is not None:
                        pairs.append((p, pair))
                plan.append((group, weight, pairs))
            # everything is checked: move every parameter, then record every group's mode
            largest = max((pair[0].size for _, _, ps in plan for _, pair in ps), default=0)
            scratch = {
                dtype: np.empty(min(max(largest, 1), _CHUNK), dtype)
                for dtype in {pair[0].dtype for _, _, ps in plan for _, pair in ps}
            }
            moved = []
            with deferred_interrupts():
                for group, weight, pairs in plan:
                    for p, (pv, zv) in pairs:
                        lerp_(pv, zv, pv.dtype.type(weight), scratch[pv.dtype])
                        moved.append(p)
                for group, _, _ in plan:
                    group["train_mode"] = to_train
            if moved:
                self._sf_moved(moved)

    def _sf_refuse_eval_step(self) -> None:
        """Raises (before anything changes) if a group is in eval mode."""
        if not all(bool(g.get("train_mode", True)) for g in self.param_groups):  # type: ignore[attr-defined]
            raise RuntimeError(
                f"{type(self).__name__}.step() in eval mode: call train() first (and eval() "
                "again before evaluating or saving)"
            )

    @staticmethod
    def _sf_check_loaded_modes(groups: Sequence[Any]) -> None:
        """A loaded state dict's ``train_mode`` entries are bools (checked before loading)."""
        if not isinstance(groups, (list, tuple)):
            return  # the front-end's own check names that
        for gi, g in enumerate(groups):
            if isinstance(g, dict) and "train_mode" in g:
                check_train_mode(g["train_mode"], f"param_groups[{gi}]['train_mode']")
