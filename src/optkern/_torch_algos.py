"""optkern.torch's Muon and LBFGS: torch.optim's classes, stepped with optkern's fused passes on
CPU float32 tensors. As every class of :mod:`optkern.torch` with a torch counterpart, each is
built by torch's own constructor (its checks in its order with its messages, its param groups and
defaults), keeps the state in torch's layout, and a param group optkern's passes cannot serve
runs torch's own step, with a :class:`~optkern.torch.TorchFallbackWarning` once per reason.
Imported by :mod:`optkern.torch`, which exports them."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import _core
from . import lbfgs as _lbfgs
from . import muon as _muon
from .torch import TorchFallbackWarning, _environment_kept, _unhooked_step

try:
    from torch.autograd.graph import increment_version
except ImportError:  # torch < 2.1

    def increment_version(tensors: Any) -> None:
        pass


__all__ = ["Muon", "LBFGS"]


class _TorchBuilt(torch.optim.Optimizer):
    """A class built by torch's own constructor (``_torch_cls``), whose groups optkern's passes
    cannot serve run torch's own step on the same state and groups (the instance torch's
    constructor made, pointed at this optimizer's state and groups before each use)."""

    _torch_cls: type

    def _adopt(self, params: Any, **given: Any) -> None:
        made = self._torch_cls(params, **given)
        self.__dict__.update(made.__dict__)
        self._patch_step_function()  # step hooks, as torch.optim.Optimizer.__init__ adds them
        self._okt_shadow = made
        self._okt_warned: set = set()

    def __getstate__(self) -> Dict[str, Any]:
        out = super().__getstate__()
        return {k: v for k, v in out.items() if not k.startswith("_okt_")}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._okt_warned = set()

    def _torch_step(self, groups: List[Dict[str, Any]], why: str, closure: Any = None) -> Any:
        """``groups`` stepped by torch's own implementation, with a TorchFallbackWarning the first
        time for this reason."""
        if why not in self._okt_warned:
            self._okt_warned.add(why)
            warnings.warn(
                f"optkern.torch.{type(self).__name__}: a param group runs "
                f"torch.optim.{self._torch_cls.__name__}'s own implementation ({why}); its "
                "results and state are torch's",
                TorchFallbackWarning,
                stacklevel=4,
            )
        shadow = self.__dict__.get("_okt_shadow")
        if shadow is None:  # unpickled: made again when first needed
            with _environment_kept(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shadow = self._torch_cls([torch.zeros(1, 1, requires_grad=True)])
            self._okt_shadow = shadow
        shadow.defaults = self.defaults
        shadow.state = self.state
        shadow.param_groups = groups
        if hasattr(shadow, "_params"):  # torch's LBFGS reads its one group's list there
            shadow._params = groups[0]["params"]
        step = _unhooked_step(type(shadow))
        return step(shadow) if closure is None else step(shadow, closure)


def _fast(t: torch.Tensor) -> bool:
    """Whether optkern's passes can read or write ``t`` in place."""
    return (
        isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
    )


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


# -- Muon -----------------------------------------------------------------------------------------


def native_bfloat16_matmul() -> bool:
    """Whether torch multiplies bfloat16 matrices on this CPU's own bfloat16 units (oneDNN on
    AVX512-BF16 or AMX): then a bfloat16 Newton-Schulz is faster than a float32 one. Elsewhere
    torch's bfloat16 matmul is a slow generic loop (24 s for one 1024 x 1024 Muon step on a
    2-core AVX2 machine, against 0.22 s for its float32 products)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Muon(_TorchBuilt):
    """torch.optim.Muon on CPU float32 tensors, with optkern's fused momentum and update passes
    and the Newton-Schulz products through torch's matmul in ``ns_dtype`` (keyword only):
    ``torch.float32``, or ``torch.bfloat16`` as torch computes them (then the step equals
    torch's bit for bit). The default (None) is bfloat16 where this CPU multiplies bfloat16
    matrices natively (AVX512-BF16, AMX), float32 elsewhere, where torch's own bfloat16 products
    are about 100 times slower than float32 ones. A float32 update differs from torch's bfloat16
    one by about 1% (bfloat16 keeps 8 bits).

    A param group optkern cannot step in place (a tensor that is not CPU float32 contiguous, or
    hyperparameters its passes do not take) runs torch's own Muon, with a TorchFallbackWarning.

    The update, as optkern.Muon computes it:
    """

    _torch_cls = torch.optim.Muon

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Tuple[float, float, float] = _muon.NS_COEFFICIENTS,
        eps: float = _muon.EPS,
        ns_steps: int = _muon.NS_STEPS,
        adjust_lr_fn: Optional[str] = None,
        *,
        ns_dtype: Any = None,
    ) -> None:
        self._adopt(
            params,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )  # torch's checks first, in its order and words
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if native_bfloat16_matmul() else torch.float32
        if ns_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"ns_dtype must be torch.float32 or torch.bfloat16, got {ns_dtype!r}")
        self.ns_dtype = ns_dtype
        self._work: Dict[Tuple[int, int], Dict[str, Any]] = {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("ns_dtype", torch.float32)
        self._work = {}

    def __getstate__(self) -> Dict[str, Any]:
        out = super().__getstate__()
        out.pop("_work", None)
        return out

    def _workspace(self, shape: Tuple[int, int]) -> Dict[str, Any]:
        work = self._work.get(shape)
        if work is None:
            r = min(shape)
            U = np.empty(shape, np.float32)
            work = self._work[shape] = {
                "U": U,
                "Ut": torch.from_numpy(U),
                "X": torch.empty(shape),
                "Y": torch.empty(shape),
                "A": torch.empty(r, r),
                "B": torch.empty(r, r),
            }
        return work

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Performs a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            why = None
            try:
                core = _muon.validate(
                    {
                        "lr": _scalar(group["lr"]),
                        "weight_decay": group["weight_decay"],
                        "momentum": group["momentum"],
                        "nesterov": group["nesterov"],
                        **dict(zip(("ns_a", "ns_b", "ns_c"), _triple(group["ns_coefficients"]))),
                        "eps": group["eps"],
                        "ns_steps": group["ns_steps"],
                        "adjust_lr_fn": group["adjust_lr_fn"],
                    }
                )
            except (TypeError, ValueError) as err:
                why = f"{err}, which optkern's passes do not take"
            work = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None or why:
                    continue
                buf = self.state.get(p, {}).get("momentum_buffer")
                if not (_fast(p) and _fast(g) and g.shape == p.shape and p.dim() == 2) or not (
                    buf is None or (_fast(buf) and buf.shape == p.shape)
                ):
                    why = (
                        f"parameter {i}, its gradient or its momentum buffer is not a CPU float32 "
                        "contiguous 2-D tensor of the parameter's shape"
                    )
                    break
                work.append((p, g))
            if why:
                self._torch_step([group], why)
                continue
            stepped = []
            for p, g in work:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        g, memory_format=torch.preserve_format
                    )
                self._step_one(p, g, state["momentum_buffer"], group, core)
                stepped.append(p)
            if stepped:
                increment_version(stepped)
        return loss

    def _step_one(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        buf: torch.Tensor,
        group: Dict[str, Any],
        core: Dict[str, Any],
    ) -> None:
        shape = tuple(p.shape)
        work = self._workspace(shape)
        sumsq = _core.muon_momentum(
            _np(g), _np(buf), work["U"], momentum=core["momentum"], nesterov=core["nesterov"]
        )
        a, b, c = core["ns_a"], core["ns_b"], core["ns_c"]
        tall = shape[0] > shape[1]
        if self.ns_dtype == torch.bfloat16:  # torch's _zeropower_via_newtonschulz, as it runs
            X = work["Ut"].bfloat16()
            if tall:
                X = X.T
            X.div_(X.norm().clamp(min=core["eps"]))
            for _ in range(core["ns_steps"]):
                A = X @ X.T
                B = torch.addmm(A, A, A, beta=b, alpha=c)
                X = torch.addmm(X, B, X, beta=a)
            if tall:
                X = X.T
            out = X.float().contiguous()
        else:  # float32, the tall case without transposing: A = X^T X, X <- a X + X B
            X, Y, A, B = work["X"], work["Y"], work["A"], work["B"]
            torch.div(work["Ut"], max(math.sqrt(sumsq), core["eps"]), out=X)
            for _ in range(core["ns_steps"]):
                torch.mm(X.T, X, out=A) if tall else torch.mm(X, X.T, out=A)
                torch.addmm(A, A, A, beta=b, alpha=c, out=B)
                if tall:
                    torch.addmm(X, X, B, beta=a, out=Y)
                else:
                    torch.addmm(X, B, X, beta=a, out=Y)
                X, Y = Y, X
            out = X
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):  # torch computes with a tensor lr in float32 tensors
            lr = lr.detach().cpu().reshape(())
            decay = (1 - lr * core["weight_decay"]).item()
            adjusted = _muon.adjusted_lr(lr, core["adjust_lr_fn"], shape).item()
        else:
            decay = 1.0 - lr * core["weight_decay"]
            adjusted = _muon.adjusted_lr(lr, core["adjust_lr_fn"], shape)
        _core.muon_update(_np(p), _np(out), decay=decay, coeff=-adjusted)


def _triple(value: Any) -> List[Any]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    return [_scalar(v) for v in value]


Muon.__doc__ = (Muon.__doc__ or "") + (_muon.Muon.__doc__ or "")


# -- LBFGS ----------------------------------------------------------------------------------------


class _TorchStateIO(_lbfgs.StateIO):
    """torch's LBFGS state: vectors as float32 tensors (sharing the engine's arrays' memory, the
    same tensor object for the same array from step to step), ro, H_diag and al as 0-d tensors,
    t and prev_loss as floats."""

    def __init__(self) -> None:
        self._tensors: Dict[int, Tuple[np.ndarray, torch.Tensor]] = {}

    def _tensor(self, arr: Optional[np.ndarray]) -> Optional[torch.Tensor]:
        if arr is None:
            return None
        hit = self._tensors.get(id(arr))
        if hit is not None and hit[0] is arr:
            return hit[1]
        t = torch.from_numpy(arr)
        self._tensors[id(arr)] = (arr, t)
        return t

    def scalar(self, value: float) -> float:
        return float(np.float32(value))

    def read(self, state: Dict[str, Any]) -> _lbfgs.Saved:
        saved = super().read(state)
        saved.d = _vector(state.get("d"))
        saved.prev_flat_grad = _vector(state.get("prev_flat_grad"))
        saved.old_dirs = [_vector(v) for v in saved.old_dirs]
        saved.old_stps = [_vector(v) for v in saved.old_stps]
        return saved

    def write(self, state: Dict[str, Any], saved: _lbfgs.Saved) -> tuple:
        live = [saved.d, saved.prev_flat_grad, *saved.old_dirs, *saved.old_stps]
        keep = {id(a) for a in live if a is not None}
        self._tensors = {k: v for k, v in self._tensors.items() if k in keep}
        dirs = [self._tensor(v) for v in saved.old_dirs]
        stps = [self._tensor(v) for v in saved.old_stps]
        state.update(
            func_evals=saved.func_evals,
            n_iter=saved.n_iter,
            d=self._tensor(saved.d),
            t=saved.t,
            old_dirs=dirs,
            old_stps=stps,
            ro=[torch.tensor(r, dtype=torch.float32) for r in saved.ro],
            H_diag=None if saved.H_diag is None else torch.tensor(saved.H_diag, dtype=torch.float32),
            prev_flat_grad=self._tensor(saved.prev_flat_grad),
            prev_loss=saved.prev_loss,
        )
        if saved.al is not None:
            state["al"] = [
                None if a is None else torch.tensor(a, dtype=torch.float32) for a in saved.al
            ]
        return tuple(dirs) + tuple(stps)


def _as_real(t: torch.Tensor) -> torch.Tensor:
    """A complex64 tensor as its float32 (real, imaginary) pairs, sharing its memory (as torch's
    LBFGS steps a complex parameter); any other tensor as it is."""
    return torch.view_as_real(t) if t.dtype is torch.complex64 and not t.is_conj() else t


def _vector(v: Any) -> Optional[np.ndarray]:
    """A state vector (a tensor) as a flat float32 NumPy array: its own memory when it is a CPU
    float32 contiguous tensor, else a converted copy."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        if not _fast(v):
            v = v.detach().to(device="cpu", dtype=torch.float32).contiguous()
        return v.detach().numpy().reshape(-1)
    return np.ascontiguousarray(v, dtype=np.float32).reshape(-1)


class LBFGS(_TorchBuilt):
    """torch.optim.LBFGS on CPU float32 tensors (closure API: the closure re-evaluates the model,
    calls backward and returns the loss), stepped with optkern's fused passes: the two-loop
    recursion runs on the history's inner products, two passes over the history per iteration
    instead of about 2 per pair (see optkern.LBFGS). Same arguments, defaults, iterates (up to
    rounding) and state_dict layout as torch's. A complex64 parameter is stepped as its float32
    (real, imaginary) pairs, as torch's LBFGS steps it. Parameters optkern cannot step in place
    (not CPU float32 or complex64 contiguous tensors), or hyperparameters its passes do not
    take, run torch's own LBFGS, with a TorchFallbackWarning.

    The algorithm, as optkern.LBFGS states it:
    """

    _torch_cls = torch.optim.LBFGS

    def __init__(
        self,
        params: Any,
        lr: float = 1,
        max_iter: int = 20,
        max_eval: Optional[int] = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: Optional[str] = None,
    ) -> None:
        self._adopt(
            params,
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
        )  # torch's checks, in its order and words (one param group only)
        self._engine = _lbfgs.Engine()
        self._io = _TorchStateIO()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._params = self.param_groups[0]["params"]
        self._engine = _lbfgs.Engine()
        self._io = _TorchStateIO()

    def __getstate__(self) -> Dict[str, Any]:
        out = super().__getstate__()
        return {k: v for k, v in out.items() if k not in ("_engine", "_io")}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Performs a single optimization step.

        Args:
            closure (Callable): A closure that reevaluates the model and returns the loss.
        """
        if len(self.param_groups) != 1:
            raise AssertionError(
                f"Expected exactly one param_group, but got {len(self.param_groups)}"
            )
        group = self.param_groups[0]
        why = None
        try:
            if group["line_search_fn"] not in (None, "strong_wolfe"):
                raise ValueError(f"line_search_fn={group['line_search_fn']!r}")
            core = _lbfgs.validate(
                {
                    "lr": _scalar(group["lr"]),
                    "max_iter": group["max_iter"],
                    "max_eval": group["max_eval"],
                    "tolerance_grad": _scalar(group["tolerance_grad"]),
                    "tolerance_change": _scalar(group["tolerance_change"]),
                    "history_size": group["history_size"],
                    "line_search_fn": group["line_search_fn"],
                }
            )
        except (TypeError, ValueError) as err:
            why = f"{err}, which optkern's passes do not take"
        params = self._params = group["params"]
        reals = [_as_real(p) for p in params]  # a complex parameter as torch's LBFGS takes it
        bad = next((i for i, r in enumerate(reals) if not _fast(r)), None)
        if why is None and bad is not None:
            p = reals[bad]
            why = (
                f"parameter {bad} is not a CPU float32 contiguous tensor ({p.dtype} on {p.device}, "
                f"contiguous: {p.is_contiguous()})"
            )
        if why:
            self._engine = _lbfgs.Engine()  # torch's step changes the state: read it afresh
            return self._torch_step([group], why, closure)
        views = [_np(r) for r in reals]
        closure = torch.enable_grad()(closure)

        def evaluate() -> Tuple[Any, List[np.ndarray]]:
            increment_version(params)  # the parameters moved in place (as torch's add_ does)
            loss = closure()
            grads = []
            for p, v in zip(params, views):
                g = p.grad
                if g is None:
                    grads.append(np.zeros(v.shape, np.float32))
                    continue
                if g.is_sparse:
                    g = g.to_dense()
                g = _as_real(g)
                if not _fast(g):
                    g = g.detach().to(device="cpu", dtype=torch.float32).contiguous()
                grads.append(_np(g).reshape(v.shape))
            return loss, grads

        state = self.state[params[0]]
        loss = self._engine.step(core, views, state, evaluate, self._io)
        increment_version(params)
        return loss


LBFGS.__doc__ = (LBFGS.__doc__ or "") + (_lbfgs.LBFGS.__doc__ or "")
