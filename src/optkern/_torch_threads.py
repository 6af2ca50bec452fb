"""optkern.torch's choice of parallel backend: optkern's chunks on torch's own OpenMP team.

torch's CPU wheel runs its intra-op threads on the libgomp it ships (``torch/lib/libgomp*.so*``);
after each torch op those workers spin for a while. An optkern step that follows a torch op
(the step after backward) then competes with them for the cores when it runs on optkern's own
pool; on the "gomp" backend it hands its chunks to that same team instead, and the spinning
workers take them (docs/threading.md, "The gomp backend"; measurements in docs/torch.md, Speed).

``OPTKERN_PARALLEL_BACKEND=pool`` (read when optkern.torch is imported) keeps optkern's pool;
``gomp`` is the default said explicitly; anything else fails the import (ImportError naming the
variable), as a misspelt ``OPTKERN_FORCE_ISA`` does.
Only torch's own libgomp is used, and only when it is already loaded: never a second OpenMP
runtime, and never another library's team. Results are bit-identical on either backend.
"""

from __future__ import annotations

import glob
import os
from types import ModuleType

from . import _core

ENV = "OPTKERN_PARALLEL_BACKEND"
#: What the variable may say ("" when unset; case and surrounding blanks do not matter).
CHOICES = ("", "pool", "gomp")


def torch_libgomp(torch: ModuleType) -> list:
    """The libgomp files of torch's wheel (``torch/lib/libgomp*.so*``), if any."""
    lib_dir = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "lib")
    return sorted(glob.glob(os.path.join(lib_dir, "libgomp*.so*")))


def use_torch_openmp(torch: ModuleType) -> str:
    """Sets the gomp backend on torch's libgomp unless ``OPTKERN_PARALLEL_BACKEND=pool``;
    returns the backend in effect ("pool" when torch has no loaded libgomp of its own)."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in CHOICES:
        raise ImportError(
            f"{ENV}={os.environ[ENV]!r} is not a backend optkern.torch knows; expected one of "
            f"{', '.join(c for c in CHOICES if c)} (or unset: gomp where torch has its libgomp)"
        )
    if choice == "pool":
        return _core.set_parallel_backend("pool")
    for path in torch_libgomp(torch):
        if _core.set_parallel_backend("gomp", path) == "gomp":
            return "gomp"
    return _core.parallel_backend()[0]
