"""Training past one process with MPI (through mpi4py): data parallelism and sharded optimizer
state. An optional layer: ``pip install "optkern[mpi]"`` (mpi4py and Open MPI's wheel), and
``import optkern`` never imports it.

    from optkern import distributed as okd
    opt = okd.DataParallel(ok.Adam(params, lr=1e-3))          # every rank: the whole state
    opt = okd.ZeroRedundancyOptimizer(ok.Adam, params, lr=1e-3)  # each rank: 1/N of the state
    opt.step(grads)              # this rank's gradients; the average over ranks is applied
    okd.save(opt, "ckpt")        # sharded (a directory) or consolidated=True (ok.save's file)
    okd.load(opt, "ckpt")        # onto any number of ranks

Run with ``mpiexec -n N python train.py``. See docs/distributed.md.
"""

from ._mpi import (
    MPI,
    TIMEOUT_ENV,
    Collectives,
    DistributedError,
    configure_threads,
    default_threads,
    install_excepthook,
)
from ._agree import RanksDisagree
from .data_parallel import DataParallel, check_identical, params_digest
from .zero import ZeroRedundancyOptimizer
from .checkpoint import ShardedCheckpointError, load, save

__all__ = [
    "DataParallel",
    "ZeroRedundancyOptimizer",
    "save",
    "load",
    "DistributedError",
    "RanksDisagree",
    "ShardedCheckpointError",
    "configure_threads",
    "default_threads",
    "install_excepthook",
    "check_identical",
    "params_digest",
    "Collectives",
    "TIMEOUT_ENV",
    "MPI",
]
