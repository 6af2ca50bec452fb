"""optkern: fused SIMD + multi-threaded optimizer updates, applied in place to float32 or float64
NumPy arrays.

    import numpy as np, optkern as ok
    W = np.zeros((784, 10)); b = np.zeros(10)   # float64, NumPy's default (float32 works too)
    opt = ok.Adam([W, b], lr=1e-3)
    opt.step([dW, db])            # W and b are updated in place, in one C++ call

The kernels are picked once, at import, for the best instruction set the CPU supports
(``OPTKERN_FORCE_ISA=scalar|avx2|avx512`` on x86-64, ``neon|sve`` on aarch64, forces one).
"""

from . import _core
from . import _lowbits  # noqa: F401 (registers ml_dtypes' bfloat16 with the core when installed)
from . import data
from . import functional
from . import lr_scheduler
from ._core import active_isa, available_isas, get_num_threads, set_num_threads
from .clip import clip_grad_norm_, clip_grad_value_, grad_norms
from .flat import FlatParams
from .checkpoint import CheckpointError, load, save
from .optimizer import Optimizer, StaleParameterWarning
from . import registry
from ._classes import *  # noqa: F403 (one class per rule of the registry; _classes.pyi names them)
from ._classes import __all__ as _class_names
from .sparse import RowSparse
from .muon import Muon
from .lbfgs import LBFGS

__version__: str = _core.__version__

__all__ = [
    "Optimizer",
    "StaleParameterWarning",
    *_class_names,
    "Muon",
    "LBFGS",
    "RowSparse",
    "functional",
    "registry",
    "clip_grad_norm_",
    "clip_grad_value_",
    "grad_norms",
    "FlatParams",
    "lr_scheduler",
    "data",
    "active_isa",
    "available_isas",
    "get_num_threads",
    "set_num_threads",
    "build_info",
    "save",
    "load",
    "CheckpointError",
]


def build_info() -> dict:
    """Version, compiler, threading, the flags of each kernel build, and the active ISA."""
    info = dict(_core.build_info())
    info["active_isa"] = _core.active_isa()
    info["available_isas"] = _core.available_isas()
    info["num_threads"] = _core.get_num_threads()
    return info
