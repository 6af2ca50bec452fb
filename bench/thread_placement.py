#!/usr/bin/env python3
"""Helpers kept off the calling thread's CPU, or not: the threads study's measurement (the
update's median and p90 on default threads against one thread) with `_core._testing.set_keep_off_caller_cpu`
on and off, each variant in its own process, the variants alternated REPS times, beside 0, 1 and
3 spinning processes. Every multi-threaded call is traced (`_core._testing.pool_trace`): "on caller's
CPU" is the share of calls whose helper ran its first chunk on the CPU the caller started on,
with the p90 of those calls' time and of the others'. The figures behind "Helpers stay off the
calling thread's CPU" in docs/threading.md.

    python bench/thread_placement.py [--reps 2] [--seconds 0.8] [--busy 0 1 3] [--sizes ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

from optkern.benchmark import loops
from optkern.benchmark.runner import parse_size

WORKER = r"""
import json, sys
import optkern as ok
from optkern.benchmark import threads
from optkern.benchmark.cases import CASES
cfg = json.loads(sys.argv[1])
ok._core._testing.set_keep_off_caller_cpu(cfg["keep_off"])
rows = []
for k in cfg["optimizers"]:
    for n in cfg["sizes"]:
        ok._core._testing.pool_trace(True)
        row = threads.measure(CASES[k], n, cfg["seconds"], ok.get_num_threads())
        trace = ok._core._testing.pool_take_trace()
        ok._core._testing.pool_trace(False)
        # (wake_us, caller_us, wait_us, chunks, helper_chunks, caller_cpu, helper_cpu)
        row["same"] = [t[1] + t[2] for t in trace if t[0] >= 0 and t[5] == t[6]]
        row["other"] = [t[1] + t[2] for t in trace if not (t[0] >= 0 and t[5] == t[6])]
        rows.append(row)
print(json.dumps(rows))
"""


def _p90(xs) -> str:
    return f"{np.percentile(xs, 90):6.0f}" if xs else f"{'-':>6}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=0.8)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument("--optimizers", nargs="+", default=["adam", "sgd"])
    ap.add_argument("--sizes", nargs="+", default=["30k", "100k", "300k", "1m", "3m"])
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes]
    variants = {"kept off": True, "anywhere": False}
    for busy in args.busy:
        runs = {v: [] for v in variants}
        with loops.busy_processes(busy):
            for _ in range(args.reps):
                for name, on in variants.items():
                    cfg = dict(
                        keep_off=on, seconds=args.seconds, optimizers=args.optimizers, sizes=sizes
                    )
                    out = subprocess.run(
                        [sys.executable, "-c", WORKER, json.dumps(cfg)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    runs[name].append(json.loads(out.stdout))
        print(f"# {busy} busy processes; load average {os.getloadavg()[0]:.1f} after")
        for i, (key, n) in enumerate((k, n) for k in args.optimizers for n in sizes):
            line = f"{key:5}{n:9}"
            for name in variants:
                rows = [rep[i] for rep in runs[name]]
                med = statistics.median(r["median_ratio"] for r in rows)
                p90 = statistics.median(r["p90_ratio"] for r in rows)
                one = statistics.median(r["one"]["p90"] for r in rows) * 1e6
                same = [x for r in rows for x in r["same"]]
                other = [x for r in rows for x in r["other"]]
                line += (
                    f" | {name}: median x{med:5.2f} p90 x{p90:5.2f} (1 thread p90 {one:6.0f} us);"
                    f" on caller's CPU {len(same)}/{len(same) + len(other)} calls, p90 "
                    f"{_p90(same)} us, others {_p90(other)} us"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
