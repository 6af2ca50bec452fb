"""Type stub for optkern._classes, written by `python -m optkern._stubs` from the rule
declarations: do not edit (tests/test_stubs.py checks that it is current)."""

from typing import Any, Optional, Tuple

from .optimizer import Optimizer

__all__ = [
    "SGD",
    "Momentum",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "ASGD",
    "Lion",
    "Rprop",
    "LAMB",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "Adafactor",
    "SparseAdam",
    "AdEMAMix",
    "Nesterov",
]

class SGD(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.001,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        lr_in_velocity: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class Momentum(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.001,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class RMSprop(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        alpha: float = 0.99,
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        eps_inside_sqrt: bool = False,
        lr_in_velocity: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class Adagrad(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        eps_inside_sqrt: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class Adadelta(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        rho: float = 0.9,
        eps: float = 1e-06,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class Adam(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.001,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class AdamW(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.001,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        weight_decay: float = 0.01,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class Adamax(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.002,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class NAdam(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.002,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        momentum_decay: float = 0.004,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class RAdam(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.001,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class ASGD(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        lambd: float = 0.0001,
        alpha: float = 0.75,
        t0: float = 1000000.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class Lion(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.0001,
        betas: Tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class Rprop(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        etas: Tuple[float, float] = (0.5, 1.2),
        step_sizes: Tuple[float, float] = (1e-06, 50.0),
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class LAMB(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.001,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-06,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class ScheduleFreeAdamW(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.0025,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        warmup_steps: float = 0.0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...
    def eval(self) -> None: ...
    def train(self) -> None: ...

class ScheduleFreeSGD(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: float = 0.0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...
    def eval(self) -> None: ...
    def train(self) -> None: ...

class Adafactor(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        beta2_decay: float = -0.8,
        eps: Tuple[Optional[float], float] = (None, 0.001),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class SparseAdam(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.001,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class AdEMAMix(Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 0.001,
        betas: Tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 2.0,
        beta3_warmup: Optional[float] = None,
        alpha_warmup: Optional[float] = None,
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...

class Nesterov(SGD):
    def __init__(
        self,
        params: Any,
        lr: float = 0.001,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        *,
        lr_in_velocity: bool = False,
        maximize: bool = False,
        foreach: Any = None,
        fused: Any = None,
        differentiable: Any = False,
        capturable: Any = False,
        state_dtype: Any = "float32",
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None: ...
