"""optkern.torch's Muon and LBFGS: torch.optim's classes (arguments, defaults, checks and their
messages, state and state_dict layout), stepped with optkern's fused passes on CPU float32
tensors. Imported by :mod:`optkern.torch`, which exports them."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import _core
from . import lbfgs as _lbfgs
from . import muon as _muon

try:
    from torch.autograd.graph import increment_version
except ImportError:  # torch < 2.1

    def increment_version(tensors: Any) -> None:
        pass


__all__ = ["Muon", "LBFGS"]


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


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon on CPU float32 tensors, with optkern's fused momentum and update passes
    and the Newton-Schulz products through torch's matmul in ``ns_dtype`` (keyword only):
    ``torch.float32``, or ``torch.bfloat16`` as torch computes them (then the step equals
    torch's bit for bit). The default (None) is bfloat16 where this CPU multiplies bfloat16
    matrices natively (AVX512-BF16, AMX), float32 elsewhere, where torch's own bfloat16 products
    are about 100 times slower than float32 ones. A float32 update differs from torch's bfloat16
    one by about 1% (bfloat16 keeps 8 bits).

    Parameters optkern cannot step in place (not CPU float32 contiguous) take torch's own
    single-tensor Muon.

    The update, as optkern.Muon computes it:
    """

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
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ["original", "match_rms_adamw"]:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if native_bfloat16_matmul() else torch.float32
        if ns_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"ns_dtype must be torch.float32 or torch.bfloat16, got {ns_dtype!r}")
        self.ns_dtype = ns_dtype
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        "Muon only supports 2D parameters whereas we found a parameter with "
                        f"size: {p.size()}"
                    )
        self._work: Dict[Tuple[int, int], Dict[str, Any]] = {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("ns_dtype", torch.float32)
        self._work = {}

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
            work = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format
                    )
                work.append((p, p.grad, state["momentum_buffer"]))
            stepped = []
            for p, g, buf in work:
                if _fast(p) and _fast(g) and _fast(buf) and g.shape == p.shape == buf.shape:
                    self._step_one(p, g, buf, group, core)
                    stepped.append(p)
                else:
                    torch.optim._muon._single_tensor_muon(
                        [p], [g], [buf],
                        lr=group["lr"], weight_decay=core["weight_decay"],
                        momentum=core["momentum"], nesterov=core["nesterov"],
                        ns_coefficients=(core["ns_a"], core["ns_b"], core["ns_c"]),
                        ns_steps=core["ns_steps"], eps=core["eps"],
                        adjust_lr_fn=core["adjust_lr_fn"], has_complex=False,
                    )  # fmt: skip
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


class LBFGS(torch.optim.Optimizer):
    """torch.optim.LBFGS on CPU float32 tensors (closure API: the closure re-evaluates the model,
    calls backward and returns the loss), stepped with optkern's fused passes: the two-loop
    recursion runs on the history's inner products, two passes over the history per iteration
    instead of about 2 per pair (see optkern.LBFGS). Same arguments, defaults, iterates (up to
    rounding) and state_dict layout as torch's.

    The algorithm, as optkern.LBFGS states it:
    """

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
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._params = self.param_groups[0]["params"]
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
        if group["line_search_fn"] not in (None, "strong_wolfe"):
            raise RuntimeError("only 'strong_wolfe' is supported")
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
        params = self._params
        for i, p in enumerate(params):
            if not _fast(p):
                raise TypeError(
                    f"optkern.torch.LBFGS cannot update parameter {i} in place: it must be a "
                    f"CPU float32 contiguous tensor (got {p.dtype} on {p.device}, contiguous: "
                    f"{p.is_contiguous()}); use torch.optim.LBFGS for such parameters"
                )
        views = [_np(p) for p in params]
        closure = torch.enable_grad()(closure)

        def evaluate() -> Tuple[Any, List[np.ndarray]]:
            increment_version(params)  # the parameters moved in place (as torch's add_ does)
            loss = closure()
            grads = []
            for p in params:
                g = p.grad
                if g is None:
                    grads.append(np.zeros(p.shape, np.float32))
                    continue
                if g.is_sparse:
                    g = g.to_dense()
                if not _fast(g):
                    g = g.detach().to(device="cpu", dtype=torch.float32).contiguous()
                grads.append(_np(g).reshape(p.shape))
            return loss, grads

        state = self.state[params[0]]
        loss = self._engine.step(core, views, state, evaluate, self._io)
        increment_version(params)
        return loss


LBFGS.__doc__ = (LBFGS.__doc__ or "") + (_lbfgs.LBFGS.__doc__ or "")
