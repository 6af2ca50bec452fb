"""16-bit and 8-bit storage: bfloat16 (ml_dtypes, a soft dependency: ``pip install
'optkern[bf16]'``), the optimizers' ``state_dtype`` and its blockwise 8-bit form.

An ``"int8"`` state named ``exp_avg`` is two arrays in the state dict: ``exp_avg`` (uint8 codes,
shaped like the parameter: the index of the nearest of bitsandbytes' 256 dynamic-map values) and
``exp_avg_absmax`` (float32, one scale per block of ``BLOCK`` elements of the flattened array).
The value of element i is ``dynamic_map[codes[i]] * absmax[i // BLOCK]``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import _core
from .registry import ABSMAX_SUFFIX, as_flag  # noqa: F401 (ABSMAX_SUFFIX: read from here too)

try:  # a soft dependency: without it optkern takes no bfloat16 arrays
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - the bf16 extra not installed
    _ml_dtypes = None

#: ml_dtypes' bfloat16 as a NumPy dtype, or None when ml_dtypes is not installed.
BFLOAT16: Optional[np.dtype] = None if _ml_dtypes is None else np.dtype(_ml_dtypes.bfloat16)
if BFLOAT16 is not None:
    _core.set_bfloat16_dtype(BFLOAT16)

#: Elements per block of an int8 state, each block with its own float32 absmax (bitsandbytes'
#: block size for its 8-bit optimizers).
BLOCK = 256
#: The master copy's name (``<name>_absmax``, ABSMAX_SUFFIX: an int8 state's absmax array).
MASTER = "master_param"

STATE_DTYPES = ("float32", "bfloat16", "int8")


def check_state_dtype(value: Any) -> str:
    if isinstance(value, np.dtype) or value is np.float32:
        value = np.dtype(value).name
    if BFLOAT16 is not None and (value is _ml_dtypes.bfloat16 or value == BFLOAT16):
        value = "bfloat16"
    if not isinstance(value, str) or value not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {value!r}")
    if value == "bfloat16" and BFLOAT16 is None:
        raise ImportError(
            "state_dtype='bfloat16' needs ml_dtypes (pip install 'optkern[bf16]' or ml_dtypes)"
        )
    return value


def check_precision(
    rule: Any, state_dtype: Any, stochastic_rounding: Any, master_weights: Any
) -> Tuple[str, bool, bool]:
    """The precision options of an optimizer of ``rule`` (optkern's classes and optkern.torch's),
    checked: (state_dtype, stochastic_rounding, master_weights), or ValueError/TypeError naming
    the option."""
    state_dtype = check_state_dtype(state_dtype)
    if state_dtype == "int8":
        refused = [st.name for st in rule.states if not st.int8]
        if refused:
            raise ValueError(
                f"state_dtype='int8': {rule.cls}'s {', '.join(refused)} cannot be kept "
                "in 8 bits (an average of the parameter itself, the moments of a rule with "
                "a norm pass, or a factored state); use 'bfloat16' or 'float32'"
            )
    if rule.factored and state_dtype != "float32":
        raise ValueError(
            f"state_dtype={state_dtype!r}: {rule.cls}'s factored state is kept "
            "in the parameter's type; use 'float32'"
        )
    stochastic_rounding, master_weights = as_flag(stochastic_rounding), as_flag(master_weights)
    if not isinstance(stochastic_rounding, bool) or not isinstance(master_weights, bool):
        raise TypeError("stochastic_rounding and master_weights must be bools")
    if stochastic_rounding and master_weights:
        raise ValueError(
            "stochastic_rounding and master_weights exclude each other: with master "
            "weights the parameter is the float32 copy rounded to nearest"
        )
    return state_dtype, stochastic_rounding, master_weights


def is_half(dtype: np.dtype) -> bool:
    """A 16-bit parameter type: float16, or bfloat16."""
    return dtype == np.float16 or (BFLOAT16 is not None and dtype == BFLOAT16)


def storage_dtype(state_dtype: str, param_dtype: np.dtype) -> np.dtype:
    """The dtype of a state array of a parameter of ``param_dtype`` (a float64 parameter's state
    is float64; int8 state is stored as uint8 codes)."""
    if param_dtype == np.float64:
        return np.dtype(np.float64)
    if state_dtype == "bfloat16":
        assert BFLOAT16 is not None
        return BFLOAT16
    if state_dtype == "int8":
        return np.dtype(np.uint8)
    return np.dtype(np.float32)


def blocks(size: int) -> int:
    return -(-size // BLOCK)


def quantize(x: np.ndarray, nonnegative: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(codes shaped like x, absmax per block) of the int8 form of ``x`` (read as float32)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    codes = np.empty(flat.shape, np.uint8)
    absmax = np.empty(blocks(flat.size), np.float32)
    _core.quantize_blockwise(flat, codes, absmax, nonnegative=nonnegative)
    return codes.reshape(np.shape(x)), absmax


def dequantize(codes: np.ndarray, absmax: np.ndarray, nonnegative: bool) -> np.ndarray:
    """The float32 values of an int8 state."""
    flat = np.ascontiguousarray(codes).reshape(-1)
    out = np.empty(flat.shape, np.float32)
    _core.dequantize_blockwise(
        flat, np.ascontiguousarray(absmax, np.float32), out, nonnegative=nonnegative
    )
    return out.reshape(codes.shape)
