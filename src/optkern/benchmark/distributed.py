"""``mpiexec -n N python -m optkern bench --distributed``: Adam over MPI ranks.

For each size (default 10M and 50M float32 parameters, one flat buffer) it measures, on every
rank, synchronised by a barrier and taking the slowest rank's time, the minimum over repeats of

- ``local``: the plain Adam step of the whole model in this process (what one rank of a
  DataParallel job computes after the allreduce);
- ``allreduce``: the in-place Allreduce of the gradient (MPI's algorithm), its bytes and
  bandwidths (algorithm bandwidth = model bytes / time; bus bandwidth = a ring's bytes per rank,
  2 (N-1)/N x model bytes, / time, as NCCL's tests report it);
- ``dp``: a whole DataParallel step (allreduce, average, Adam);
- ``zero``: a whole ZeroRedundancyOptimizer step (reduce-scatter, Adam on 1/N, allgather) and
  its parts, and the optimizer state each rank holds.

Then it models 8 to 64 ranks on a real network from these numbers: a ring allreduce (or
reduce-scatter + allgather) moves 2 (N-1)/N x model bytes per rank, so a step costs about
``update + 2 (N-1)/N * bytes / link + 2 (N-1) * latency``, with the update of the whole model
(DataParallel) or of 1/N of it (ZeRO) as measured here on one rank.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Dict, List

import numpy as np

import optkern as ok

from .runner import parse_size, size_label

DEFAULT_SIZES = ["10m", "50m"]
LINKS_GBITS = [10, 25, 100]
MODEL_RANKS = [8, 16, 32, 64]
LATENCY_S = 5e-6  # per message on a good Ethernet/InfiniBand link (assumed, not measured)


def _timed(comm, fn: Callable[[], Any], repeats: int) -> float:
    """The slowest rank's time of ``fn``, minimum over ``repeats`` (after one warm-up)."""
    from mpi4py import MPI

    fn()
    best = float("inf")
    for _ in range(repeats):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        dt = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
        best = min(best, dt)
    return best


def measure(n: int, repeats: int, comm) -> Dict[str, Any]:
    from mpi4py import MPI
    from optkern import distributed as okd

    size = comm.Get_size()
    rng = np.random.default_rng(comm.Get_rank())
    grad = rng.standard_normal(n).astype(np.float32) * 1e-3
    row: Dict[str, Any] = {"size": n, "ranks": size, "threads": ok.get_num_threads()}

    p = np.zeros(n, np.float32)
    local = ok.Adam([p], lr=1e-3)
    row["local_s"] = _timed(comm, lambda: local.step([grad]), repeats)
    local = p = None  # free before the next allocation

    buf = grad.copy()
    row["allreduce_s"] = (
        _timed(comm, lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), repeats)
        if size > 1
        else 0.0
    )
    buf = None
    model_bytes = 4 * n
    row["model_bytes"] = model_bytes
    row["bytes_per_rank"] = 2 * (size - 1) * model_bytes // size
    if size > 1:
        row["algbw_gbs"] = model_bytes / row["allreduce_s"] / 1e9
        row["busbw_gbs"] = row["bytes_per_rank"] / row["allreduce_s"] / 1e9

    p = np.zeros(n, np.float32)
    dp = okd.DataParallel(ok.Adam([p], lr=1e-3), comm, num_threads=None)
    row["dp_s"] = _timed(comm, lambda: dp.step([grad]), repeats)
    row["dp_state_bytes"] = 2 * model_bytes
    dp = p = None

    p = np.zeros(n, np.float32)
    zero = okd.ZeroRedundancyOptimizer(ok.Adam, [p], comm, num_threads=None, lr=1e-3)
    row["zero_s"] = _timed(comm, lambda: zero.step([grad]), repeats)
    row["zero_state_bytes"] = comm.allreduce(zero.state_bytes(), op=MPI.MAX)
    coll = zero._coll
    (shard,) = zero._shards  # one float32 part
    row["zero_reduce_scatter_s"] = _timed(
        comm,
        lambda: coll.reduce_scatter(grad, shard.gslice, shard.ranges, False, None, "bench"),
        repeats,
    )
    row["zero_update_s"] = _timed(comm, lambda: zero.inner.step(zero._inner_grads), repeats)
    row["zero_allgather_s"] = _timed(
        comm, lambda: coll.allgatherv(shard.flat, shard.ranges, "bench"), repeats
    )
    zero = p = None
    return row


def model(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Step times of 8..64 ranks on 10/25/100 Gb/s links, from the measured update times."""
    out = []
    for r in rows:
        # the update of the whole model on one rank of this run (its threads)
        update = r["local_s"]
        for n_ranks in MODEL_RANKS:
            comm_bytes = 2 * (n_ranks - 1) * r["model_bytes"] / n_ranks
            for gbit in LINKS_GBITS:
                net = comm_bytes / (gbit * 1e9 / 8) + 2 * (n_ranks - 1) * LATENCY_S
                out.append(
                    {
                        "size": r["size"],
                        "ranks": n_ranks,
                        "link_gbits": gbit,
                        "bytes_per_rank": comm_bytes,
                        "network_s": net,
                        "dp_step_s": update + net,
                        "zero_step_s": update / n_ranks + net,
                        "zero_state_bytes_per_rank": 2 * r["model_bytes"] / n_ranks,
                    }
                )
    return out


def run_distributed(args: argparse.Namespace) -> int:
    from optkern import distributed as okd
    from .runner import machine

    comm = okd.MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.threads is None:
        okd.configure_threads(comm)
    sizes = [
        parse_size(s) for s in (DEFAULT_SIZES if args.sizes == args.default_sizes else args.sizes)
    ]
    threads = comm.allgather(ok.get_num_threads())
    if rank == 0:
        info = machine()
        print(
            f"# {info['cpu']}, {info['cores']} cores; optkern {info['optkern']} "
            f"({info['isa']}); {size} ranks x threads {threads}; "
            f"{okd.MPI.Get_library_version().replace(chr(0), '').splitlines()[0].strip()}"
        )
    rows = [measure(n, args.repeats, comm) for n in sizes]
    if rank != 0:
        return 0
    print(
        "\nAdam, seconds per step (slowest rank, min of repeats). local: the whole model's "
        "update in one process; allreduce: in-place MPI_Allreduce of the gradient; dp: "
        "DataParallel.step; zero: ZeroRedundancyOptimizer.step = reduce-scatter + update of "
        "1/N + allgather."
    )
    head = (
        f"{'size':>6} {'ranks':>5} {'local':>9} {'allreduce':>9} {'dp':>9} {'zero':>9} "
        f"{'zero RS':>9} {'zero upd':>9} {'zero AG':>9} {'bytes/rank':>11} {'busbw GB/s':>10} "
        f"{'state/rank dp':>13} {'zero':>9}"
    )
    print(head)
    for r in rows:
        print(
            f"{size_label(r['size']):>6} {r['ranks']:>5} {r['local_s'] * 1e3:8.1f}m "
            f"{r['allreduce_s'] * 1e3:8.1f}m {r['dp_s'] * 1e3:8.1f}m {r['zero_s'] * 1e3:8.1f}m "
            f"{r['zero_reduce_scatter_s'] * 1e3:8.1f}m {r['zero_update_s'] * 1e3:8.1f}m "
            f"{r['zero_allgather_s'] * 1e3:8.1f}m {r['bytes_per_rank'] / 1e6:9.1f}MB "
            f"{r.get('busbw_gbs', float('nan')):10.2f} {r['dp_state_bytes'] / 1e6:11.1f}MB "
            f"{r['zero_state_bytes'] / 1e6:7.1f}MB"
        )
    modelled = model(rows)
    print(
        f"\nModel of a real network (ring allreduce, 2(N-1)/N x model bytes per rank, "
        f"{LATENCY_S * 1e6:g} us per message assumed; update times from the 'local' column "
        "above: whole model for DataParallel, 1/N for ZeRO; backward/forward not included):"
    )
    print(
        f"{'size':>6} {'ranks':>5} {'MB/rank':>8} "
        + " ".join(f"{f'{g}Gb/s net':>11} {'dp':>8} {'zero':>8}" for g in LINKS_GBITS)
        + f" {'zero state/rank':>15}"
    )
    for n in sizes:
        for n_ranks in MODEL_RANKS:
            cells = [m for m in modelled if m["size"] == n and m["ranks"] == n_ranks]
            print(
                f"{size_label(n):>6} {n_ranks:>5} {cells[0]['bytes_per_rank'] / 1e6:8.1f} "
                + " ".join(
                    f"{c['network_s'] * 1e3:10.1f}m {c['dp_step_s'] * 1e3:7.1f}m "
                    f"{c['zero_step_s'] * 1e3:7.1f}m"
                    for c in cells
                )
                + f" {cells[0]['zero_state_bytes_per_rank'] / 1e6:13.1f}MB"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": rows, "model": modelled, "threads": threads}, f, indent=1)
        print(f"JSON written to {args.json}")
    return 0
