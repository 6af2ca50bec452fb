"""The benchmark of record: optkern inside a user's training loop, not alone.

A NumPy MLP (ReLU, softmax cross-entropy, float32, forward and backward with NumPy's matmuls on
its default BLAS threads) trains on synthetic data, batch 64, at two sizes. For each optimizer,
in rounds that interleave them (A B C D E, A B C D E, ...):

- A ``numpy``: the loop with the best hand-written NumPy update (``cases.py``);
- B ``optkern``: the loop with optkern at its defaults;
- C ``optkern_1t``: the loop with optkern on one thread;
- D ``no_update``: forward and backward alone, no update (the matmul time without optkern);
- E ``alone``: optkern's update alone, a hot loop over the same shapes, no matmuls between.

Each round runs one untimed step of each, then ``steps`` timed steps, timing forward+backward
and the update of every step apart. A row reports medians over rounds of the per-step means.

Each condition runs in a fresh worker process (``python -m optkern.benchmark._loops_worker``), so that
"quiet" and the busy conditions never see torch or what other studies left behind:

- ``quiet``: nothing else started by the benchmark;
- ``busy``: one other process spinning (``while True: pass``) for the whole condition, started
  before the worker and killed after it, also on an exception or Ctrl-C (and, on Linux, when
  this process dies: the child is asked to get SIGKILL with its parent);
- ``busy3``: three of them (more runnable threads than cores on a 2-core machine);
- ``torch``: torch imported in the worker, its intra-op pool warmed by a few matmuls before the
  first round and by one matmul (untimed) before each timed stretch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from .._cli import parse_dims  # noqa: F401  (one rule for --loop-sizes and the study)

DEFAULT_LOOP_SIZES = ["784-256-128-10", "1024-1024-1024-10"]
CONDITIONS = ["quiet", "busy", "busy3", "torch"]
LOOPS = ["numpy", "optkern", "optkern_1t", "no_update", "alone"]
BATCH = 64
DEFAULT_ROUNDS = 5
TARGET_SEGMENT_SECONDS = 0.04  # each timed stretch of steps lasts about this long (auto steps)

# Targets of issue 10 on the loop ratio optkern / numpy (every optimizer: at most 1.0).
LOOP_RATIO_TARGETS = {"adam": 0.8, "adamw": 0.8, "rmsprop": 0.85, "adadelta": 0.85}


def n_params(dims: Sequence[int]) -> int:
    return sum(i * o + o for i, o in zip(dims[:-1], dims[1:]))


def _short(n: int) -> str:
    if n < 1000:
        return str(n)
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}K"


def dims_label(dims: Sequence[int]) -> str:
    return f"{'-'.join(map(str, dims))} ({_short(n_params(dims))})"


# -- the model -------------------------------------------------------------------------------------


def init_params(dims: Sequence[int], seed: int) -> List[np.ndarray]:
    """He-initialised weights (in, out) and zero biases: [W1, b1, W2, b2, ...]."""
    rng = np.random.default_rng(seed)
    out: List[np.ndarray] = []
    for i, o in zip(dims[:-1], dims[1:]):
        w = rng.standard_normal((i, o), dtype=np.float32) * np.float32(math.sqrt(2.0 / i))
        out += [w, np.zeros(o, np.float32)]
    return out


class MLP:
    """Its own parameters, gradients and activation buffers; matmuls write in place."""

    def __init__(self, dims: Sequence[int], init: List[np.ndarray], batch: int) -> None:
        self.params = [p.copy() for p in init]
        self.grads = [np.zeros_like(p) for p in init]
        self.z = [np.empty((batch, o), np.float32) for o in dims[1:]]
        self.dz = [np.empty((batch, o), np.float32) for o in dims[1:]]
        self.rows = np.arange(batch)
        self.loss = float("nan")

    def reset(self, init: List[np.ndarray]) -> None:
        for p, p0 in zip(self.params, init):
            np.copyto(p, p0)

    def forward_backward(self, X: np.ndarray, y: np.ndarray) -> None:
        L = len(self.z)
        W, b = self.params[0::2], self.params[1::2]
        dW, db = self.grads[0::2], self.grads[1::2]
        acts = [X]
        for k in range(L):
            z = self.z[k]
            np.matmul(acts[k], W[k], out=z)
            z += b[k]
            if k < L - 1:
                np.maximum(z, 0, out=z)
            acts.append(z)
        p = self.z[-1]  # logits -> probabilities, in place
        p -= p.max(axis=1, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=1, keepdims=True)
        self.loss = float(-np.log(p[self.rows, y] + 1e-30).mean())
        d = self.dz[-1]
        np.copyto(d, p)
        d[self.rows, y] -= 1
        d /= len(y)
        for k in reversed(range(L)):
            np.matmul(acts[k].T, d, out=dW[k])
            np.sum(d, axis=0, out=db[k])
            if k > 0:
                prev = self.dz[k - 1]
                np.matmul(d, W[k].T, out=prev)
                prev[acts[k] <= 0] = 0
                d = prev


def make_data(dims: Sequence[int], batches: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    X = [rng.standard_normal((batch, dims[0]), dtype=np.float32) for _ in range(batches)]
    y = [rng.integers(0, dims[-1], batch) for _ in range(batches)]
    return X, y


# -- one condition, in the worker ------------------------------------------------------------------


def _blas_info() -> Optional[List[Dict[str, object]]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{k: v for k, v in d.items() if k != "filepath"} for d in threadpool_info()]


def _median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def _p90(per_round: List[List[float]]) -> float:
    return float(np.percentile(np.asarray([x for r in per_round for x in r], np.float64), 90))


def measure(
    case,
    dims: Sequence[int],
    rounds: int,
    steps: Optional[int],
    poke: Callable[[], None],
    seed: int = 0,
) -> Dict[str, object]:
    """One optimizer at one size: the five loops interleaved in rounds."""
    import optkern as ok

    default_threads = ok.get_num_threads()
    init = init_params(dims, seed)
    X, y = make_data(dims, 4, BATCH, seed + 1)
    models = {
        name: MLP(dims, init, BATCH) for name in ["numpy", "optkern", "optkern_1t", "no_update"]
    }
    updates: Dict[str, Optional[Callable[[], None]]] = {
        "numpy": case.numpy(models["numpy"].params, models["numpy"].grads),
        "optkern": case.optkern(models["optkern"].params, models["optkern"].grads),
        "optkern_1t": case.optkern(models["optkern_1t"].params, models["optkern_1t"].grads),
        "no_update": None,
    }
    # The update alone: same shapes, a real gradient, no matmuls between steps.
    models["numpy"].forward_backward(X[0], y[0])
    alone_params = [p.copy() for p in init]
    alone_grads = [g.copy() for g in models["numpy"].grads]
    alone_step = case.optkern(alone_params, alone_grads)

    def segment(name: str, count: int) -> Dict[str, object]:
        """One untimed step, then ``count`` timed ones. Per-step seconds of each phase."""
        fb: List[float] = []
        up: List[float] = []
        clock = time.perf_counter
        if name == "alone":
            for p, p0 in zip(alone_params, init):
                np.copyto(p, p0)
            alone_step()
            t0 = clock()
            for _ in range(count):
                a = clock()
                alone_step()
                up.append(clock() - a)
            wall = clock() - t0
            return {"wall": wall / count, "fwd_bwd": [], "update": up}
        model, update = models[name], updates[name]
        model.reset(init)
        model.forward_backward(X[0], y[0])
        if update is not None:
            update()
        t0 = clock()
        for s in range(count):
            a = clock()
            model.forward_backward(X[s & 3], y[s & 3])
            b = clock()
            if update is not None:
                update()
            c = clock()
            fb.append(b - a)
            up.append(c - b)
        wall = clock() - t0
        return {"wall": wall / count, "fwd_bwd": fb, "update": up}

    def run_segment(name: str, count: int) -> Dict[str, object]:
        poke()
        if name == "optkern_1t":
            ok.set_num_threads(1)
        try:
            return segment(name, count)
        finally:
            if name == "optkern_1t":
                ok.set_num_threads(default_threads)

    if steps is None:  # from the NumPy loop's pace, warm
        seg = run_segment("numpy", 3)
        steps = max(2, min(200, math.ceil(TARGET_SEGMENT_SECONDS / max(seg["wall"], 1e-6))))

    raw: Dict[str, Dict[str, List]] = {
        name: {"wall": [], "fwd_bwd": [], "update": []} for name in LOOPS
    }
    for _ in range(rounds):
        for name in LOOPS:
            seg = run_segment(name, steps)
            for k in ("wall", "fwd_bwd", "update"):
                raw[name][k].append(seg[k])

    def per_round_mean(name: str, k: str) -> List[float]:
        return [float(np.mean(v)) for v in raw[name][k]] if raw[name][k][0] else []

    med: Dict[str, Dict[str, float]] = {}
    for name in LOOPS:
        med[name] = {"loop": _median(raw[name]["wall"])}
        for k in ("fwd_bwd", "update"):
            means = per_round_mean(name, k)
            if means:
                med[name][k] = _median(means)
    loss = {name: models[name].loss for name in models}
    finite = all(bool(np.all(np.isfinite(p))) for m in models.values() for p in m.params)
    summary = {
        "loop_numpy": med["numpy"]["loop"],
        "loop_optkern": med["optkern"]["loop"],
        "loop_optkern_1t": med["optkern_1t"]["loop"],
        "loop_ratio": med["optkern"]["loop"] / med["numpy"]["loop"],
        "loop_ratio_1t": med["optkern_1t"]["loop"] / med["numpy"]["loop"],
        "default_vs_1t": med["optkern"]["loop"] / med["optkern_1t"]["loop"],
        "update_numpy_in_loop": med["numpy"]["update"],
        "update_in_loop": med["optkern"]["update"],
        "update_in_loop_1t": med["optkern_1t"]["update"],
        "update_alone": med["alone"]["update"],
        # Every step's update, not the rounds' means: a slow step now and then shows here.
        "update_p90_in_loop": _p90(raw["optkern"]["update"]),
        "update_p90_in_loop_1t": _p90(raw["optkern_1t"]["update"]),
        "update_ratio": med["optkern"]["update"] / med["alone"]["update"],
        "fwd_bwd_no_update": med["no_update"]["fwd_bwd"],
        "fwd_bwd_numpy": med["numpy"]["fwd_bwd"],
        "fwd_bwd_optkern": med["optkern"]["fwd_bwd"],
        "fwd_bwd_optkern_1t": med["optkern_1t"]["fwd_bwd"],
        "fwd_bwd_ratio": med["optkern"]["fwd_bwd"] / med["no_update"]["fwd_bwd"],
    }
    return {
        "optimizer": case.key,
        "label": case.label,
        "dims": list(dims),
        "params": n_params(dims),
        "batch": BATCH,
        "rounds": rounds,
        "steps": steps,
        "threads": default_threads,
        "final_loss": loss,
        "finite": finite,
        "median_seconds": med,
        **summary,
        "raw_seconds": raw,
    }


def run_worker(cfg: Dict[str, object]) -> Dict[str, object]:
    """One condition: every size and optimizer, in this (fresh) process."""
    import optkern as ok

    from .cases import CASES
    from .programs import PROGRAMS, measure_program

    if cfg.get("threads"):
        ok.set_num_threads(int(cfg["threads"]))
    torch_matrix = None
    note = None
    if cfg["condition"] == "torch":
        import torch

        a = torch.randn(256, 256)
        for _ in range(20):
            a @ a
        torch_matrix = a
        note = (
            f"torch {torch.__version__} imported, intra-op pool of "
            f"{torch.get_num_threads()} threads warmed (one matmul before each stretch)"
        )

    def poke() -> None:  # a torch matmul before each stretch keeps torch's pool awake
        if torch_matrix is not None:
            torch_matrix @ torch_matrix

    out: Dict[str, object] = {
        "condition": cfg["condition"],
        "note": note,
        "pid": os.getpid(),
        "torch_imported": "torch" in sys.modules,
        "optkern_threads": ok.get_num_threads(),
        "blas": _blas_info(),
        "env": {
            k: os.environ[k]
            for k in sorted(os.environ)
            if k.startswith(("OMP_", "OPENBLAS_", "MKL_", "GOMP_", "OPTKERN_"))
        },
    }
    rows = []
    programs = [(PROGRAMS[k], o) for k in cfg.get("programs", []) for o in PROGRAMS[k].optimizers]
    total = len(cfg["sizes"]) * len(cfg["optimizers"]) + len(programs)
    for dims in cfg["sizes"]:
        for key in cfg["optimizers"]:
            case = CASES[key]
            if cfg.get("progress"):
                sys.stderr.write(
                    f"\r[loops {cfg['condition']:<5} {len(rows) + 1:>2}/{total}] "
                    f"{case.label} {dims_label(dims):<28}"
                )
                sys.stderr.flush()
            rows.append(measure(case, dims, int(cfg["rounds"]), cfg.get("steps"), poke))
    program_rows = []
    for program, optimizer in programs:
        if cfg.get("progress"):
            sys.stderr.write(
                f"\r[loops {cfg['condition']:<5} {len(rows) + len(program_rows) + 1:>2}/{total}] "
                f"{program.key} {optimizer:<28}"
            )
            sys.stderr.flush()
        program_rows.append(
            measure_program(program, optimizer, int(cfg["rounds"]), cfg.get("steps"), poke)
        )
    if cfg.get("progress"):
        sys.stderr.write("\r" + " " * 70 + "\r")
    out["rows"] = rows
    out["program_rows"] = program_rows
    return out


# -- the parent: conditions, the busy neighbour ----------------------------------------------------

# The spinning child asks the kernel to kill it when its parent dies (Linux's PR_SET_PDEATHSIG),
# then checks that the parent is still the one that started it (it may have died before). Done by
# the child itself, not in a preexec_fn: a preexec_fn makes subprocess fork() this (multithreaded)
# process, which libraries such as JAX warn about.
_SPIN = """import ctypes, os, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit()
while True:
    pass
"""


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[List[subprocess.Popen]]:
    """`count` other processes, each spinning on a core, for the duration of the block; killed on
    the way out whatever happens (exception, Ctrl-C), and with this process on Linux."""
    procs: List[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _SPIN, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        if procs:
            time.sleep(0.05)  # let them start spinning
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@contextlib.contextmanager
def busy_neighbour() -> Iterator[subprocess.Popen]:
    """One other process spinning on one core for the duration of the block (busy_processes)."""
    with busy_processes(1) as procs:
        yield procs[0]


def torch_installed() -> bool:
    """Without importing it (the parent may not have imported it)."""
    return importlib.util.find_spec("torch") is not None


def _run_in_worker(cfg: Dict[str, object]) -> Dict[str, object]:
    fd, path = tempfile.mkstemp(prefix="optkern-loops-", suffix=".json")
    os.close(fd)
    try:
        with open(path, "w") as f:
            json.dump(cfg, f)
        proc = subprocess.Popen([sys.executable, "-m", "optkern.benchmark._loops_worker", path])
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0:
            raise RuntimeError(f"the loops worker for {cfg['condition']!r} failed (exit {rc})")
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def run_loops(
    optimizers: Sequence[str],
    sizes: Sequence[Sequence[int]],
    rounds: int,
    steps: Optional[int],
    conditions: Sequence[str],
    threads: Optional[int],
    use_torch: bool,
    progress: Callable[[str], None],
    show_progress: bool = True,
    worker: Callable[[Dict[str, object]], Dict[str, object]] = _run_in_worker,
    programs: Sequence[str] = (),
) -> Dict[str, object]:
    """Every condition in its own worker process; returns every measurement. A rule without a
    hand-written NumPy update (Adamax, say) has nothing to compare the loop with and is left out.
    ``programs``: keys of ``programs.PROGRAMS`` to run beside the MLP, each with its optimizers."""
    from .cases import CASES
    from .programs import program_targets

    optimizers = [k for k in optimizers if CASES[k].numpy is not None]
    results = []
    for condition in conditions:
        progress(f"loops: {condition}")
        cfg = {
            "condition": condition,
            "optimizers": list(optimizers),
            "sizes": [list(d) for d in sizes],
            "rounds": rounds,
            "steps": steps,
            "threads": threads,
            "progress": show_progress,
            "programs": list(programs),
        }
        if condition == "torch" and not use_torch:
            why = "torch is not installed" if not torch_installed() else "torch left out (--no-torch)"
            results.append({"condition": condition, "skipped": why, "rows": [], "program_rows": []})
            continue
        if condition == "busy":
            with busy_neighbour() as proc:
                res = worker(cfg)
                res["busy_pid"] = proc.pid
        elif condition == "busy3":
            with busy_processes(3) as procs:
                res = worker(cfg)
                res["busy_pids"] = [p.pid for p in procs]
        else:
            res = worker(cfg)
        res["skipped"] = None
        results.append(res)
    out: Dict[str, object] = {
        "batch": BATCH,
        "rounds": rounds,
        "steps": steps,
        "sizes": [list(d) for d in sizes],
        "conditions": results,
    }
    out["targets"] = targets(results) + program_targets(
        [(c["condition"], r) for c in results for r in c.get("program_rows", [])]
    )
    return out


# -- targets and the table -------------------------------------------------------------------------


def targets(conditions: List[Dict[str, object]]) -> List[Dict[str, object]]:
    rows = [(c["condition"], r) for c in conditions for r in c["rows"]]
    if not rows:
        return []
    sizes = sorted({r["params"] for _, r in rows})
    largest = sizes[-1]

    def check(name: str, items, limit_of) -> Dict[str, object]:
        worst, fails = None, []
        for cond, r, value in items:
            limit = limit_of(r)
            margin = value / limit
            if worst is None or margin > worst[0]:
                worst = (margin, cond, r, value, limit)
            if value > limit:
                fails.append(f"{r['label']} {r['params']} {cond}: {value:.3f} > {limit:g}")
        _, cond, r, value, limit = worst
        return {
            "target": name,
            "met": not fails,
            "failures": fails,
            "worst": {
                "condition": cond,
                "optimizer": r["optimizer"],
                "params": r["params"],
                "value": value,
                "limit": limit,
            },
        }

    out = []
    for key, limit in [("adam", 0.8), ("adamw", 0.8), ("rmsprop", 0.85), ("adadelta", 0.85)]:
        items = [(c, r, r["loop_ratio"]) for c, r in rows if r["optimizer"] == key]
        if items:
            out.append(
                check(
                    f"loop optkern/numpy <= {limit} for {items[0][1]['label']}",
                    items,
                    lambda r, lim=limit: lim,
                )
            )
    out.append(
        check(
            "loop optkern/numpy <= 1.0 for every optimizer",
            [(c, r, r["loop_ratio"]) for c, r in rows],
            lambda r: 1.0,
        )
    )
    out.append(
        check(
            "optkern's update in the loop <= 2x the same update alone",
            [(c, r, r["update_ratio"]) for c, r in rows],
            lambda r: 2.0,
        )
    )
    out.append(
        check(
            "forward+backward with optkern steps <= 1.05x without any update",
            [(c, r, r["fwd_bwd_ratio"]) for c, r in rows],
            lambda r: 1.05,
        )
    )
    out.append(
        check(
            "optkern's update in the loop: p90 on default threads <= 1.5x on one thread",
            [(c, r, r["update_p90_in_loop"] / r["update_p90_in_loop_1t"]) for c, r in rows],
            lambda r: 1.5,
        )
    )
    big = [(c, r, r["default_vs_1t"]) for c, r in rows if r["params"] == largest]
    out.append(
        check(
            f"loop at {_short(largest)} params: default threads <= 1.05x one thread",
            big,
            lambda r: 1.05,
        )
    )
    return out


def table(result: Dict[str, object]) -> str:
    head = (
        f"{'size':<8}{'optimizer':<16}{'condition':<8}{'numpy':>9}{'optkern':>9}{'x':>6}"
        f"{'1 thr':>9}{'x':>6} | {'upd loop':>9}{'alone':>9}{'x':>7} | "
        f"{'mm w/o':>9}{'mm with':>9}{'x':>6}"
    )
    lines = [
        "per step, ms (medians over rounds); loop = whole training step; x = optkern/numpy; "
        "1 thr = optkern on one thread;",
        "upd loop = optkern's update inside the loop, alone = same update in a hot loop; "
        "mm = forward+backward without any update / with optkern's",
        head,
        "-" * len(head),
    ]
    for c in result["conditions"]:
        if c.get("skipped"):
            lines.append(f"{c['condition']}: skipped ({c['skipped']})")
            continue
        for r in c["rows"]:
            size = _short(r["params"])
            lines.append(
                f"{size:<8}{r['label']:<16}{c['condition']:<8}"
                f"{r['loop_numpy'] * 1e3:9.3f}{r['loop_optkern'] * 1e3:9.3f}"
                f"{r['loop_ratio']:6.2f}{r['loop_optkern_1t'] * 1e3:9.3f}"
                f"{r['loop_ratio_1t']:6.2f} | {r['update_in_loop'] * 1e3:9.3f}"
                f"{r['update_alone'] * 1e3:9.3f}{r['update_ratio']:7.1f} | "
                f"{r['fwd_bwd_no_update'] * 1e3:9.3f}{r['fwd_bwd_optkern'] * 1e3:9.3f}"
                f"{r['fwd_bwd_ratio']:6.2f}" + ("" if r["finite"] else "  (non-finite!)")
            )
    for c in result["conditions"]:
        if not c.get("skipped"):
            blas = [
                f"{d.get('internal_api')} {d.get('num_threads')} threads"
                for d in (c.get("blas") or [])
                if d.get("user_api") == "blas"
            ]
            lines.append(
                f"{c['condition']}: optkern {c['optkern_threads']} threads"
                + (f"; BLAS {', '.join(blas)}" if blas else "")
                + (f"; {c['note']}" if c.get("note") else "")
                + ("; one other process spinning" if c["condition"] == "busy" else "")
                + ("; three other processes spinning" if c["condition"] == "busy3" else "")
            )
    return "\n".join(lines)


def target_lines(result: Dict[str, object]) -> str:
    lines = []
    for t in result["targets"]:
        w = t["worst"]
        if w is None:  # nothing measured: the reason instead
            lines.append(f"  NOT met  {t['target']}: {t['failures'][0]}")
            continue
        what = w["program"] if "program" in w else _short(w["params"])
        lines.append(
            f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: worst "
            f"{w['value']:.3f} ({w['optimizer']}, {what}, "
            f"{w['condition']})" + (f"; {len(t['failures'])} rows over" if t["failures"] else "")
        )
    return "\n".join(lines)
