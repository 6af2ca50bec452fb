"""Best-effort control of the BLAS thread pool that NumPy's matrix products use.

The demo and the examples run with NumPy's BLAS as the user's own training loop would: the
library's default (OpenBLAS in NumPy's wheels: one thread per CPU). ``--blas-threads N`` sets
another count, for example to compare with one BLAS thread; nothing is changed otherwise.

``threadpoolctl`` is used when it is installed (any BLAS); otherwise the OpenBLAS library that
NumPy loaded is found in ``/proc/self/maps`` (Linux) and called through ctypes. When neither
works nothing changes and the description says so.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator, Optional, Tuple

_SET = (
    "openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "openblas_set_num_threads64_",
)
_GET = (
    "openblas_get_num_threads",
    "scipy_openblas_get_num_threads64_",
    "openblas_get_num_threads64_",
)


def _openblas() -> Optional[Tuple[object, object]]:
    try:
        with open("/proc/self/maps") as f:
            paths = sorted(
                {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
            )
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _SET if hasattr(lib, s)), None)
        getter = next((getattr(lib, s) for s in _GET if hasattr(lib, s)), None)
        if setter is not None and getter is not None:
            setter.argtypes = [ctypes.c_int]
            getter.restype = ctypes.c_int
            return setter, getter
    return None


@contextlib.contextmanager
def blas_threads(n: Optional[int]) -> Iterator[str]:
    """Within the block, BLAS uses ``n`` threads (``None``: leave it alone). Yields a short
    description of what was done, for the demo's header."""
    if n is None:
        yield "BLAS threads: library default"
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=n, user_api="blas"):
            yield f"BLAS threads: {n} (threadpoolctl)"
        return
    found = _openblas()
    if found is None:
        yield "BLAS threads: library default (OpenBLAS not found; install threadpoolctl to set them)"
        return
    setter, getter = found
    before = getter()
    setter(n)
    try:
        yield f"BLAS threads: {n} (OpenBLAS; was {before})"
    finally:
        setter(before)
