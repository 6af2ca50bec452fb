"""Stragglers: the update's median and p90 on optkern's default threads against one thread, at
sizes from 10K to 10M elements, on a quiet machine and beside busy processes.

A helper thread that is descheduled while it holds part of a call holds the whole call back for
a scheduler time slice (milliseconds), so a split that pays on a quiet machine can make the
update's slow steps (its p90) many times slower on a busy one. This study measures exactly that,
for each condition in its own worker process (a fresh thread pool):

- ``quiet``: nothing else started by the benchmark;
- ``busy1``: one other process spinning (``while True: pass``) for the whole condition;
- ``busy3``: three of them: more runnable threads than cores on a 2-core machine.

For each optimizer and size, the step on default threads and on one thread run in blocks of
about 10 ms, interleaved in a new random order every round, each step timed on its own; the rows
report the median and p90 over all steps. Each condition also measures how long a helper takes
to start running after a call wakes it (``_core._testing.helper_wake_latencies``), and every row carries
the pool's counters over its steps (multi-threaded calls, chunks the helpers ran, calls that did
not pay, calls run alone by the backoff).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

DEFAULT_SIZES = [10_000, 30_000, 48_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000]
DEFAULT_OPTIMIZERS = ["adam", "sgd"]
CONDITIONS = {"quiet": 0, "busy1": 1, "busy3": 3}
DEFAULT_SECONDS = 2.0  # per optimizer and size, both variants together
BLOCK_SECONDS = 0.01  # steps of one variant in a row
MIN_ROUNDS = 10
WAKE_SAMPLES = 300

# Targets of issue 23 (default threads against one thread).
P90_LIMIT = 1.5  # busy conditions: p90 default / p90 one thread
MEDIAN_LIMIT = 1.05  # quiet: median default / median one thread
PAYS_BELOW = 0.9  # quiet, largest size: two threads pay when the median ratio is below this


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def overhead(case) -> float:
    """Seconds of a one-thread step of 64 elements (median): the fixed cost of a call, to take
    off the per-element estimates."""
    import optkern as ok

    from .runner import arrays

    step = case.optkern(arrays([64], seed=2, scale=0.5), arrays([64], seed=3, scale=0.01))
    threads = ok.get_num_threads()
    ok.set_num_threads(1)
    try:
        step()
        xs = []
        for _ in range(2000):
            a = time.perf_counter()
            step()
            xs.append(time.perf_counter() - a)
    finally:
        ok.set_num_threads(threads)
    return _pct(xs, 50)


def measure(case, n: int, seconds: float, default_threads: int) -> Dict[str, object]:
    """One optimizer at one size: default threads and one thread, interleaved; every step's time."""
    import optkern as ok

    from .runner import arrays

    params, grads = arrays([n], seed=2, scale=0.5), arrays([n], seed=3, scale=0.01)
    step = case.optkern(params, grads)
    variants = {"default": default_threads, "one": 1}
    for k in variants.values():  # state allocated, helpers started
        ok.set_num_threads(k)
        step()
    t0 = time.perf_counter()
    step()
    block = max(1, min(1000, math.ceil(BLOCK_SECONDS / max(time.perf_counter() - t0, 1e-7))))
    times: Dict[str, List[float]] = {name: [] for name in variants}
    before = ok._core._testing.pool_stats()
    clock = time.perf_counter
    start = clock()
    rounds = 0
    try:
        while rounds < MIN_ROUNDS or clock() - start < seconds:
            order = list(variants)
            random.shuffle(order)
            for name in order:
                ok.set_num_threads(variants[name])
                out = times[name]
                for _ in range(block):
                    a = clock()
                    step()
                    out.append(clock() - a)
            rounds += 1
    finally:
        ok.set_num_threads(default_threads)
    after = ok._core._testing.pool_stats()
    row: Dict[str, object] = {
        "optimizer": case.key,
        "label": case.label,
        "size": n,
        "rounds": rounds,
        "block": block,
        "pool": {
            k: after[k] - before[k] for k in ("calls", "helper_chunks", "late_calls", "serial_calls")
        },
    }
    for name, xs in times.items():
        row[name] = {
            "median": _pct(xs, 50),
            "p90": _pct(xs, 90),
            "p99": _pct(xs, 99),
            "steps": len(xs),
        }
    row["median_ratio"] = row["default"]["median"] / row["one"]["median"]
    row["p90_ratio"] = row["default"]["p90"] / row["one"]["p90"]
    row["finite"] = bool(np.all(np.isfinite(params[0])))
    return row


def wake_latencies(samples: int = WAKE_SAMPLES) -> Dict[str, Dict[str, float]]:
    """Microseconds from a call to its helper running: back to back (the helper just went to
    sleep) and 1 ms apart (asleep for a while, as between a training loop's steps)."""
    import optkern as ok

    out = {}
    for label, gap in (("back_to_back", 0), ("after_1ms", 1000)):
        xs = np.asarray(ok._core._testing.helper_wake_latencies(samples, gap), dtype=np.float64)
        ran = xs[xs >= 0]
        out[label] = {
            "samples": int(xs.size),
            "none": int((xs < 0).sum()),
            **(
                {"p50": _pct(ran, 50), "p90": _pct(ran, 90), "p99": _pct(ran, 99)} if ran.size else {}
            ),
        }
    # The probe's calls count towards the late-helper backoff: start the measurements afresh.
    ok._core._testing.set_adaptive_threads(ok._core._testing.adaptive_threads())
    return out


def placement_rows(cfg: Dict[str, object]) -> List[Dict[str, object]]:
    """The study ``thread-placement``'s worker (a fresh process): ``measure`` with helpers kept
    off the caller's CPU or not (cfg["keep_off"]), every multi-threaded call traced: the time
    (caller's work and wait, us) of the calls whose helper ran its first chunk on the CPU the
    caller started on ("same") and of the others."""
    import optkern as ok

    from .cases import CASES

    testing = ok._core._testing
    testing.set_keep_off_caller_cpu(bool(cfg["keep_off"]))
    rows = []
    for key in cfg["optimizers"]:
        for n in cfg["sizes"]:
            testing.pool_trace(True)
            row = measure(CASES[key], int(n), float(cfg["seconds"]), ok.get_num_threads())
            trace = testing.pool_take_trace()
            testing.pool_trace(False)
            # (wake_us, caller_us, wait_us, chunks, helper_chunks, caller_cpu, helper_cpu)
            same = [t[0] >= 0 and t[5] == t[6] for t in trace]
            row["same"] = [t[1] + t[2] for t, s in zip(trace, same) if s]
            row["other"] = [t[1] + t[2] for t, s in zip(trace, same) if not s]
            rows.append(row)
    return rows


def run_worker(cfg: Dict[str, object]) -> Dict[str, object]:
    """One condition, in this (fresh) process: every optimizer at every size."""
    import optkern as ok

    from .cases import CASES

    if cfg.get("threads"):
        ok.set_num_threads(int(cfg["threads"]))
    threads = ok.get_num_threads()
    out: Dict[str, object] = {
        "condition": cfg["condition"],
        "busy_processes": cfg["busy"],
        "pid": os.getpid(),
        "threads": threads,
        "build_info": {k: v for k, v in ok.build_info().items() if k != "isa_flags"},
        "load_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    out["wake_us"] = wake_latencies() if threads > 1 else None
    rows = []
    total = len(cfg["sizes"]) * len(cfg["optimizers"])
    out["overhead_us"] = {}
    for key in cfg["optimizers"]:
        fixed = overhead(CASES[key])
        out["overhead_us"][key] = fixed * 1e6
        for n in cfg["sizes"]:
            if cfg.get("progress"):
                sys.stderr.write(
                    f"\r[threads {cfg['condition']:<5} {len(rows) + 1:>2}/{total}] "
                    f"{CASES[key].label} {n:<10}"
                )
                sys.stderr.flush()
            row = measure(CASES[key], int(n), float(cfg["seconds"]), threads)
            # One thread's time per element, the fixed cost of a call taken off.
            row["ns_per_element_1t"] = (row["one"]["median"] - fixed) / int(n) * 1e9
            rows.append(row)
    if cfg.get("progress"):
        sys.stderr.write("\r" + " " * 70 + "\r")
    out["rows"] = rows
    out["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return out


def run_threads_study(
    optimizers: Sequence[str],
    sizes: Sequence[int],
    conditions: Sequence[str],
    seconds: float,
    threads: Optional[int],
    progress: Callable[[str], None],
    show_progress: bool = True,
    worker: Optional[Callable[[Dict[str, object]], Dict[str, object]]] = None,
) -> Dict[str, object]:
    """Every condition in its own worker process, its busy processes started before the worker
    and killed after it, whatever happens."""
    from . import loops

    worker = worker or loops._run_in_worker
    results = []
    for condition in conditions:
        progress(f"threads: {condition}")
        busy = CONDITIONS[condition]
        cfg = {
            "study": "threads",
            "condition": condition,
            "busy": busy,
            "optimizers": list(optimizers),
            "sizes": [int(n) for n in sizes],
            "seconds": seconds,
            "threads": threads,
            "progress": show_progress,
        }
        with loops.busy_processes(busy) as procs:
            res = worker(cfg)
            res["busy_pids"] = [p.pid for p in procs]
        results.append(res)
    return {"seconds": seconds, "conditions": results, "targets": targets(results)}


# -- targets and the table -------------------------------------------------------------------------


def targets(conditions: List[Dict[str, object]]) -> List[Dict[str, object]]:
    out = []

    def check(name: str, items, limit: float, below: bool = True) -> None:
        if not items:
            return
        fails = [f"{c} {r['label']} {r['size']}: {v:.2f}" for c, r, v in items if not v <= limit]
        worst = max(items, key=lambda x: x[2])
        out.append(
            {
                "target": name,
                "met": not fails,
                "failures": fails,
                "worst": {
                    "condition": worst[0],
                    "optimizer": worst[1]["optimizer"],
                    "size": worst[1]["size"],
                    "value": worst[2],
                    "limit": limit,
                },
            }
        )

    rows = [(c["condition"], r) for c in conditions for r in c["rows"]]
    busy = [(c, r, r["p90_ratio"]) for c, r in rows if c != "quiet"]
    check(f"busy: p90 default / p90 one thread <= {P90_LIMIT}", busy, P90_LIMIT)
    quiet = [(c, r, r["median_ratio"]) for c, r in rows if c == "quiet"]
    check(f"quiet: median default / median one thread <= {MEDIAN_LIMIT}", quiet, MEDIAN_LIMIT)
    if quiet:
        largest = max(r["size"] for _, r, _ in quiet)
        big = [(c, r, v) for c, r, v in quiet if r["size"] == largest]
        check(f"quiet, largest size: two threads pay (median ratio < {PAYS_BELOW})", big, PAYS_BELOW)
    return out


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f}"


def table(result: Dict[str, object]) -> str:
    head = (
        f"{'condition':<10}{'optimizer':<10}{'size':>9} | {'1 thread':>9}{'p90':>9} | "
        f"{'default':>9}{'p90':>9} | {'med x':>6}{'p90 x':>6} | {'helped':>7}{'unpaid':>7}{'alone':>7}"
        f" | {'ns/el':>6}"
    )
    lines = [
        "update step, us (median and p90 over every step); x = default / one thread; helped = "
        "multi-threaded calls,",
        "unpaid = of those, calls whose helpers ran under half their share or held the caller "
        "back; alone = calls the backoff ran on one thread; ns/el = one thread's time per "
        "element, the fixed cost of a call taken off",
        head,
        "-" * len(head),
    ]
    for c in result["conditions"]:
        for r in c["rows"]:
            pool = r["pool"]
            lines.append(
                f"{c['condition']:<10}{r['label']:<10}{r['size']:>9} |"
                f"{_us(r['one']['median'])}{_us(r['one']['p90'])} |"
                f"{_us(r['default']['median'])}{_us(r['default']['p90'])} | "
                f"{r['median_ratio']:6.2f}{r['p90_ratio']:6.2f} | "
                f"{pool['calls']:7d}{pool['late_calls']:7d}{pool['serial_calls']:7d} | "
                f"{r['ns_per_element_1t']:6.3f}" + ("" if r["finite"] else "  (non-finite!)")
            )
    if result["conditions"]:
        info = result["conditions"][0]["build_info"]
        by_weight = info.get("min_elements_per_thread_by_weight", {})
        lines.append(
            f"split rule of this build: each thread's share >= {info.get('min_us_per_thread')} us "
            f"on one thread at {info.get('ns_per_work')} ns per unit: "
            + ", ".join(f"{n} elements per thread at weight {w}" for w, n in by_weight.items())
            + " (Adam: weight 4, SGD: 1)"
        )
    for c in result["conditions"]:
        wake = c.get("wake_us")
        load = c.get("load_before")
        text = f"{c['condition']}: {c['threads']} threads"
        if load:
            text += f", load average {load[0]:.2f} before"
        if wake:
            text += "; helper wake-up us " + ", ".join(
                f"{k.replace('_', ' ')} p50 {v['p50']:.1f} p90 {v['p90']:.1f} p99 {v['p99']:.1f}"
                for k, v in wake.items()
                if "p50" in v
            )
        lines.append(text)
    return "\n".join(lines)


def target_lines(result: Dict[str, object]) -> str:
    lines = []
    for t in result["targets"]:
        w = t["worst"]
        lines.append(
            f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: worst {w['value']:.2f} "
            f"({w['optimizer']}, {w['size']}, {w['condition']})"
            + (f"; {len(t['failures'])} rows over" if t["failures"] else "")
        )
    return "\n".join(lines)
