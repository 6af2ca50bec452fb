"""Failure scenarios, each run under mpiexec by test_mpi.py: ``python mpi_scenarios.py NAME DIR``.

raise      the last rank passes a bad gradient to DataParallel.step: the job must abort with a
           message naming the rank, not hang.
sigkill    the last rank kills itself (SIGKILL) between steps: the others must end.
hang       the last rank stops taking part (sleeps); with OPTKERN_MPI_TIMEOUT the others abort.
save1      ZeRO Adam: 3 steps, a sharded save (generation 1), the consolidated state's digest to
           DIR/expected; 2 more steps, a second save during which the last rank dies (SIGKILL)
           halfway through writing its shard.
load       loads DIR/ckpt (onto any number of ranks) and checks the digest against DIR/expected.
"""

import os
import signal
import sys
import time

import numpy as np

import optkern as ok
from optkern import distributed as okd
from optkern.distributed import checkpoint as okd_checkpoint

COMM = okd.MPI.COMM_WORLD
RANK, N = COMM.Get_rank(), COMM.Get_size()
SHAPES = [(301, 7), (7,), (33,)]


def params():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def grads(t):
    rng = np.random.default_rng(100 * t + RANK)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def state_digest(opt):
    sd = opt.state_dict()
    arrays = [
        sd["state"][i][k]
        for i in sorted(sd["state"])
        for k in sorted(sd["state"][i])
        if isinstance(sd["state"][i][k], np.ndarray)
    ]
    return okd.params_digest(arrays).hex() + f" step_count={sd['step_count']}"


def main(name, directory):
    last = RANK == N - 1
    if name == "raise":
        dp = okd.DataParallel(ok.Adam(params(), lr=1e-3))
        for t in range(3):
            g = grads(t)
            if t == 2 and last:
                g[0] = np.zeros((3, 3), np.float32)  # wrong shape on this rank only
            dp.step(g)
    elif name == "sigkill":
        dp = okd.DataParallel(ok.Adam(params(), lr=1e-3))
        for t in range(1000):
            if t == 3 and last:
                os.kill(os.getpid(), signal.SIGKILL)
            dp.step(grads(t))
    elif name == "hang":
        dp = okd.DataParallel(ok.Adam(params(), lr=1e-3))
        for t in range(1000):
            if t == 3 and last:
                time.sleep(600)
            dp.step(grads(t))
    elif name == "save1":
        ckpt = os.path.join(directory, "ckpt")
        zero = okd.ZeroRedundancyOptimizer(ok.Adam, params(), lr=1e-3)
        for t in range(3):
            zero.step(grads(t))
        okd.save(zero, ckpt)
        digest = state_digest(zero)
        if RANK == 0:
            with open(os.path.join(directory, "expected"), "w") as f:
                f.write(digest)
        for t in range(3, 5):
            zero.step(grads(t))
        if last:

            def dying_write(path, arrays):
                with open(f"{path}.tmp-{os.getpid()}", "wb") as f:
                    f.write(b"PK\x03\x04 half a shard")
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

            okd_checkpoint._write_shard = dying_write
        okd.save(zero, ckpt)
        print("the save finished, which it must not", flush=True)
    elif name == "load":
        zero = okd.ZeroRedundancyOptimizer(ok.Adam, params(), lr=1e-3)
        okd.load(zero, os.path.join(directory, "ckpt"))
        digest = state_digest(zero)
        with open(os.path.join(directory, "expected")) as f:
            expected = f.read()
        if digest != expected:
            raise SystemExit(f"loaded state {digest} differs from the saved {expected}")
        if RANK == 0:
            print(f"loaded generation 1 onto {N} ranks: {digest}", flush=True)
    else:
        raise SystemExit(f"unknown scenario {name}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ".")
