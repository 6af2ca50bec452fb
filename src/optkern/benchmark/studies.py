"""The benchmark's narrower studies, each a question behind a design choice or a bound quoted in
the docs; ``python -m optkern bench --studies NAME`` runs one (none runs by default):

* ``threshold``: what the split threshold of src/cpp/multi_tensor.cpp rests on: one thread's
  time per element of several rules (thread CPU time, the fixed cost of a call taken off), and
  SGD, Adam and Adadelta at 16K-512K elements on 1 thread, on 2 threads with no threshold, and
  at the defaults (minimum of the repeats: a quiet machine's best case; the threads study has
  the medians and p90s);
* ``thread-placement``: the threads study's measurement with helpers kept off the calling
  thread's CPU and allowed anywhere, each in its own process, alternated (repeats: how many
  times), beside 0, 1 and 3 spinning processes; every call traced;
* ``adafactor-shapes``: one Adafactor step on 4M-element matrices of several aspect ratios (and
  a 4M vector): the factored driver's cost should depend on the element count, not the shape;
* ``pass-bounds``: Adafactor's and LAMB's 50M step beside passes that move exactly their bytes
  (built from optkern's streaming kernels): a step at 100% of that bound is as fast as its
  passes can be on this machine, whatever its share of the in-place stream;
* ``torch-bandwidth`` (needs torch): torch's fused step and optkern.torch's at 50M as a share of
  the in-place streaming bandwidth measured in the same run;
* ``precision``: Adam's 50M step with bfloat16 and int8 state, bfloat16 parameters and
  gradients (rounded to nearest and stochastically), against optkern's float32 step, torch's
  fused Adam on bfloat16 tensors, bitsandbytes' 8-bit Adam and torchao's 8-bit AdamW and
  bfloat16 AdamW with stochastic rounding on CPU (each where installed:
  optkern/benchmark/precision_peers.py), as a share of the in-place streaming bandwidth for the
  bytes each moves; and the bytes of state per parameter;
* ``precision-loop``: the loops study's MLP (784-256-128-10, 0.24M parameters) with Adam in
  float32 and with bfloat16 and int8 state: the update's share of the training step;
* ``precision-accuracy``: the digits MLP of ``python -m optkern demo`` (Adam, 10 epochs) and a
  small char-RNN (optkern.examples.char_rnn) with float32, bfloat16 and int8 state, and with
  bfloat16 parameters rounded to nearest, rounded stochastically and kept with float32 master
  weights: test accuracy, and held-out bits per character, of each (seeds: repeats);
* ``torch-phases`` (needs torch): zero_grad, forward, backward and step timed inside the torch
  training loop of ``bench --torch``, for torch fused, optkern.torch (2 threads and 1) and torch
  foreach;
* ``sparse``, ``muon``, ``lbfgs``: the optimizers that are not one element-wise pass, against
  torch's on the same inputs when torch is installed (optkern.benchmark.algos): SparseAdam,
  Adagrad and SGD on a 1M x 64 embedding table with 4096 looked-up rows a step; a 1024 x 1024
  Muon step; an LBFGS step at 1M parameters with the closure's time subtracted.
* ``step-cost``: the fixed cost of a small step (optkern/benchmark/step_cost.py): SGD and Adam on
  a 4-array model against NumPy's in-place updates, a hyperparameter written before each step,
  the functional call per call and per array, the stale-parameter check per array, in float32
  and float64; Adam on one element and on the 4-array model under each precision option
  (repeats: rounds).
* ``torch-small-step`` (needs torch): the fixed cost of a step on a small model (Adam over the
  six tensors of an MLP 784-128-64-10, 109K parameters): optkern.torch's step beside torch's
  fused and single-tensor steps, each timed alone, interleaved in a new random order every
  round; median and p90 per step.

Each returns a JSON-able dict whose ``"text"`` is what it prints.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

import optkern as ok

from . import algos, precision_peers
from .runner import compare, shuffled_times
from .step_cost import step_cost

NAMES = [
    "threshold",
    "thread-placement",
    "adafactor-shapes",
    "pass-bounds",
    "torch-bandwidth",
    "torch-phases",
    *algos.STUDIES,
    "step-cost",
    "torch-small-step",
    "precision",
    "precision-loop",
    "precision-accuracy",
]
#: repeats (rounds for torch-phases) when --repeats is not given
DEFAULT_REPEATS = {
    "threshold": 9,
    "thread-placement": 2,
    "adafactor-shapes": 15,
    "pass-bounds": 9,
    "torch-bandwidth": 9,
    "torch-phases": 30,
    "sparse": 41,
    "muon": 5,
    "lbfgs": 5,
    "step-cost": 301,
    "torch-small-step": 60,
    "precision": 9,
    "precision-loop": 7,
    "precision-accuracy": 3,
}
NEEDS_TORCH = {"torch-bandwidth", "torch-phases", "torch-small-step"}


ELEMENT_COST_RULES = [
    ("SGD", {}),
    ("SGD", {"momentum": 0.9}),
    ("Lion", {}),
    ("Adam", {}),
    ("RMSprop", {}),
    ("Adadelta", {}),
    ("LAMB", {}),
]


def element_costs(repeats: int) -> List[Dict[str, Any]]:
    """One thread's CPU time per element of each rule at 24K-1M elements: the step's thread CPU
    time (minimum over repeats of a batch) less a 64-element step's, over the elements."""
    threads = ok.get_num_threads()
    ok.set_num_threads(1)

    def cost(name: str, hp: Dict[str, Any], n: int) -> float:
        rng = np.random.default_rng(0)
        p = rng.random(n, dtype=np.float32)
        g = (rng.random(n, dtype=np.float32) - 0.5) * np.float32(1e-3)
        opt = getattr(ok, name)([p], lr=1e-4, **hp)
        opt.step([g])
        batch = max(20, 10_000_000 // max(n, 1000))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.thread_time()
            for _ in range(batch):
                opt.step([g])
            best = min(best, (time.thread_time() - t0) / batch)
        return best

    rows = []
    try:
        for name, hp in ELEMENT_COST_RULES:
            fixed = cost(name, hp, 64)
            per = {
                n: (cost(name, hp, n) - fixed) / n * 1e9 for n in (24_000, 48_000, 200_000, 1_000_000)
            }
            rows.append({"rule": name, "hyper": hp, "fixed_us": fixed * 1e6, "ns_per_element": per})
    finally:
        ok.set_num_threads(threads)
    return rows


def threshold(repeats: int) -> Dict[str, Any]:
    """One thread's time per element of each rule; then each rule's step near the threshold: 1
    thread, 2 threads with no threshold, the defaults; interleaved, minimum of the repeats."""
    testing = ok._core._testing
    threads, floor = ok.get_num_threads(), testing.min_elements_per_thread()
    costs = element_costs(repeats)
    rows: List[Dict[str, Any]] = []
    try:
        for name in ("SGD", "Adam", "Adadelta"):
            for n in (16384, 32768, 65536, 131072, 262144, 524288):
                params, grads = [np.zeros(n, np.float32)], [np.full(n, 1e-3, np.float32)]
                opt = getattr(ok, name)(params)

                def on(k: int, least: int) -> Callable[[], None]:
                    def step() -> None:
                        ok.set_num_threads(k)
                        testing.set_min_elements_per_thread(least)
                        opt.step(grads)

                    return step

                s = compare(
                    {"one": on(1, floor), "two": on(2, 1), "default": on(threads, floor)}, repeats
                )
                rows.append({"optimizer": name, "size": n, **{k: v for k, v in s.items()}})
    finally:
        ok.set_num_threads(threads)
        testing.set_min_elements_per_thread(floor)
    text = [f"One thread's time per element (thread CPU time, min of {repeats}, fixed cost off):"]
    for c in costs:
        text.append(
            f"  {c['rule']:9}{str(c['hyper']):18} fixed {c['fixed_us']:5.1f} us | "
            + " | ".join(f"{n}: {v:5.3f} ns" for n, v in c["ns_per_element"].items())
        )
    text.append(f"Where a second thread pays (min of {repeats}; threshold {floor} units per thread):")
    for r in rows:
        text.append(
            f"  {r['optimizer']:9}{r['size']:8}: 1 thread {r['one'] * 1e6:7.1f} us, 2 threads "
            f"{r['two'] * 1e6:7.1f} us ({r['one'] / r['two']:.2f}x); default {r['default'] * 1e6:7.1f} us"
        )
    return {"element_costs": costs, "rows": rows, "text": "\n".join(text)}


def thread_placement(
    repeats: int,
    busy: Sequence[int] = (0, 1, 3),
    sizes: Sequence[int] = (30_000, 100_000, 300_000, 1_000_000, 3_000_000),
    optimizers: Sequence[str] = ("adam", "sgd"),
    seconds: float = 0.8,
) -> Dict[str, Any]:
    """Helpers kept off the calling thread's CPU or allowed anywhere: the threads study's
    measurement (threads.placement_rows), each variant in a fresh process, the variants
    alternated `repeats` times, beside 0, 1 and 3 spinning processes."""
    from . import loops

    variants = {"kept off": True, "anywhere": False}
    code = (
        "import json, sys; from optkern.benchmark.threads import placement_rows; "
        "print(json.dumps(placement_rows(json.loads(sys.argv[1]))))"
    )
    out: Dict[str, Any] = {"conditions": []}
    text = []
    for count in busy:
        runs: Dict[str, List[Any]] = {v: [] for v in variants}
        with loops.busy_processes(count):
            for _ in range(repeats):
                for name, on in variants.items():
                    cfg = dict(keep_off=on, seconds=seconds, optimizers=list(optimizers))
                    cfg["sizes"] = list(sizes)
                    res = subprocess.run(
                        [sys.executable, "-c", code, json.dumps(cfg)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    runs[name].append(json.loads(res.stdout))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        text.append(f"{count} busy processes; load average {load:.1f} after")
        out["conditions"].append({"busy": count, "load_after": load, "runs": runs})
        for i, (key, n) in enumerate((k, n) for k in optimizers for n in sizes):
            line = f"  {key:5}{n:9}"
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
            text.append(line)
    out["text"] = "\n".join(text)
    return out


def _p90(xs: List[float]) -> str:
    return f"{np.percentile(xs, 90):6.0f}" if xs else f"{'-':>6}"


ADAFACTOR_SHAPES = [
    (2000, 2000),
    (4_000_000,),
    (1, 4_000_000),
    (16, 250_000),
    (64, 62_500),
    (4000, 1000),
    (250_000, 16),
    (2, 2, 1_000_000),
]


def adafactor_shapes(repeats: int) -> Dict[str, Any]:
    """One Adafactor step per shape (4M elements each), after 3 warm-up steps: min and median."""
    rows = []
    for shape in ADAFACTOR_SHAPES:
        rng = np.random.default_rng(0)
        p = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        opt = ok.Adafactor([p])
        for _ in range(3):
            opt.step([g])
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            opt.step([g])
            ts.append(time.perf_counter() - t)
        rows.append({"shape": list(shape), "min": min(ts), "median": statistics.median(ts)})
    first = rows[0]
    text = [
        f"Adafactor, one step on 4M elements by shape (min / median of {repeats}; "
        f"x: min over {tuple(first['shape'])}'s):"
    ]
    for r in rows:
        text.append(
            f"  {str(tuple(r['shape'])):>20} {r['min'] * 1e3:7.2f} ms / {r['median'] * 1e3:7.2f} ms"
            f"  {r['min'] / first['min']:4.2f}x"
        )
    return {"rows": rows, "text": "\n".join(text)}


def pass_bounds(repeats: int, n: int = 50_000_000) -> Dict[str, Any]:
    """Adafactor's (5000 x 10000) and LAMB's step beside passes moving exactly their bytes."""
    from .. import _core

    rng = np.random.default_rng(0)

    def arr(shape=(n,), scale=1.0):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    shape = (n // 10000, 10000)
    pa, ga = arr(shape), arr(shape, 1e-3)
    adafactor = ok.Adafactor([pa])
    pl, gl = arr(), arr(scale=1e-3)
    lamb = ok.LAMB([pl])
    adafactor.step([ga])  # state allocated, pages touched
    lamb.step([gl])
    a, b, c, d = arr(), arr(), arr(), arr()
    cases = {
        "Adafactor": lambda: adafactor.step([ga]),
        "LAMB": lambda: lamb.step([gl]),
        # a += s*b: the yardstick, and the traffic of Adafactor's pass 2 (p, g read; p written)
        "stream": lambda: _core.stream_axpy([a], [b], 1e-9),
        "read 2": lambda: ok.grad_norms([a, b]),  # Adafactor's pass 0: p and g read
        "read 1": lambda: ok.grad_norms([b]),  # Adafactor's pass 1: g read
        # LAMB's pass 1: p, g, m, v read, m and v written (two in-place streams)
        "stream x2": lambda: _core.stream_axpy([c, d], [a, b], 1e-9),
    }
    cases["stream"]()
    best = {k: min(v) for k, v in shuffled_times(cases, repeats).items()}
    stream_rate = 12 * n / best["stream"]
    # LAMB's pass 2 (p, m, v read; p written) = one in-place stream + one read-only array
    bounds = {
        "Adafactor": (24, best["read 2"] + best["read 1"] + best["stream"]),
        "LAMB": (40, best["stream x2"] + best["stream"] + best["read 1"]),
    }
    text = [f"{n / 1e6:g}M elements, min of {repeats} shuffled repeats:"]
    for k, nbytes in (("stream", 12), ("read 2", 8), ("read 1", 4), ("stream x2", 24)):
        text.append(f"  {k:10s} {best[k] * 1e3:7.1f} ms  {nbytes * n / best[k] / 1e9:5.1f} GB/s")
    rows = []
    for k, (nbytes, bound) in bounds.items():
        t = best[k]
        rows.append(
            {
                "optimizer": k,
                "seconds": t,
                "bound_seconds": bound,
                "fraction_of_stream": nbytes * n / t / stream_rate,
                "fraction_of_bound": bound / t,
            }
        )
        text.append(
            f"  {k:10s} {t * 1e3:7.1f} ms  {nbytes * n / t / 1e9:5.1f} GB/s  %stream "
            f"{nbytes * n / t / stream_rate:4.0%}  same-bytes passes {bound * 1e3:6.1f} ms  %bound {bound / t:4.0%}"
        )
    return {"passes": best, "rows": rows, "text": "\n".join(text)}


def torch_bandwidth(repeats: int, n: int = 50_000_000) -> Dict[str, Any]:
    """torch's fused step and optkern.torch's at n elements over the in-place stream's rate,
    shuffled, medians."""
    import torch

    import optkern.torch as okt

    from .. import _core
    from .torch_bench import HYPER

    # Every rule whose torch.optim class has a fused CPU step, at the benchmark's settings
    # (HYPER: SGD with momentum); bytes moved per element in place: p and g read, p written,
    # each state it keeps there read and written.
    nbytes = {
        r.cls: 12 + 8 * len(r.state_spec(r.to_core({**dict(r.torch_args()), **HYPER[r.cls]})))
        for r in ok.registry.rules()
        if "fused" in inspect.signature(getattr(torch.optim, r.cls, lambda: None)).parameters
    }
    a, b = np.ones(n, np.float32), np.ones(n, np.float32)
    steps: Dict[str, Callable[[], Any]] = {"stream": lambda: _core.stream_axpy([a], [b], 1e-9)}
    keep = []
    for name in nbytes:
        for side, make in (
            ("torch", lambda ps, k=name: getattr(torch.optim, k)(ps, fused=True, **HYPER[k])),
            ("okt", lambda ps, k=name: getattr(okt, k)(ps, **HYPER[k])),
        ):
            p = torch.nn.Parameter(torch.randn(n))
            p.grad = torch.randn(n) * 1e-3
            opt = make([p])
            opt.step()  # state allocated, pages touched
            keep.append((p, opt))
            steps[f"{name}/{side}"] = opt.step
    med = {k: statistics.median(v) for k, v in shuffled_times(steps, repeats).items()}
    stream = 12 * n / med["stream"]
    text = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n / 1e6:g}M elements, "
        f"medians of {repeats} shuffled repeats",
        f"  in-place stream a += s*b: {stream / 1e9:.1f} GB/s ({med['stream'] * 1e3:.1f} ms)",
    ]
    rows = []
    for name, nb in nbytes.items():
        cells = []
        for side in ("torch", "okt"):
            t = med[f"{name}/{side}"]
            cells.append(
                f"{side} {t * 1e3:6.1f} ms {nb * n / t / 1e9:5.1f} GB/s ({nb * n / t / stream:4.0%})"
            )
        x = med[f"{name}/torch"] / med[f"{name}/okt"]
        rows.append(
            {"optimizer": name, "torch": med[f"{name}/torch"], "okt": med[f"{name}/okt"], "x": x}
        )
        text.append(f"  {name:8s} fused  " + "   ".join(cells) + f"   x = {x:.2f}")
    return {"stream_gbps": stream / 1e9, "rows": rows, "text": "\n".join(text)}


PHASES = ("zero_grad", "forward", "backward", "step")


def torch_phases(rounds: int, name: str = "Adam", per_round: int = 8) -> Dict[str, Any]:
    """zero_grad, forward, backward and step inside the loop of ``bench --torch`` (MLP
    784-1024-1024-10, batch 64), shuffled order, medians over rounds of per_round steps."""
    import torch

    import optkern.torch as okt

    from .. import _core
    from .torch_bench import HYPER, _mlp

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 784, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    hp = HYPER.get(name, {})
    model0 = _mlp(0)
    threads = _core.get_num_threads()

    def one_thread(on: bool) -> None:
        _core.set_num_threads(1 if on else threads)

    configs = {
        "torch fused": (lambda ps: getattr(torch.optim, name)(ps, fused=True, **hp), None),
        "okt": (lambda ps: getattr(okt, name)(ps, **hp), None),
        "okt 1 thread": (lambda ps: getattr(okt, name)(ps, **hp), one_thread),
        "torch foreach": (lambda ps: getattr(torch.optim, name)(ps, foreach=True, **hp), None),
    }
    runs = {}
    for key, (make, around) in configs.items():
        model = copy.deepcopy(model0)
        runs[key] = (model, make(model.parameters()), around)
    samples: Dict[str, List[List[float]]] = {k: [] for k in runs}

    def run(key: str) -> None:
        model, opt, around = runs[key]
        per: List[List[float]] = [[] for _ in PHASES]
        for _ in range(per_round):
            t0 = time.perf_counter()
            opt.zero_grad()
            t1 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            if around:
                around(True)
            opt.step()
            if around:
                around(False)
            t4 = time.perf_counter()
            for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                per[k].append(dt)
        samples[key].append([statistics.median(v) for v in per])

    try:
        for _ in range(rounds + 2):  # the first two rounds warm up
            order = list(runs)
            random.shuffle(order)
            for key in order:
                run(key)
    finally:
        _core.set_num_threads(threads)
    text = [
        f"{name} inside the torch loop: torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"medians of {rounds} rounds of {per_round} steps, ms",
        f"  {'':14s}" + "".join(f"{p:>10s}" for p in PHASES) + f"{'sum':>10s}",
    ]
    rows = {}
    for key, got in samples.items():
        med = [statistics.median(col) * 1e3 for col in zip(*got[2:])]
        rows[key] = dict(zip(PHASES, med))
        text.append(f"  {key:14s}" + "".join(f"{v:10.3f}" for v in med) + f"{sum(med):10.3f}")
    return {"optimizer": name, "ms": rows, "text": "\n".join(text)}


SMALL_MLP = [(128, 784), (128,), (64, 128), (64,), (10, 64), (10,)]


def torch_small_step(rounds: int, inner: int = 20, fresh: bool = False) -> Dict[str, Any]:
    """Adam's step over the six tensors of an MLP 784-128-64-10: optkern.torch, torch fused and
    torch single-tensor, ``rounds`` rounds of ``inner`` steps each (a new random order every
    round); median and p90 of the rounds' means, in us. ``fresh``: new gradient tensors before
    every step (what zero_grad() and backward() leave), made outside the timing."""
    import torch

    import optkern.torch as okt

    def stepper(make: Callable[[Any], Any]) -> Callable[[int], float]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.05) for s in SMALL_MLP]
        grads = [torch.randn(*s, generator=gen) * 1e-3 for s in SMALL_MLP]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = make(params)
        opt.step()  # the state made outside the timings

        def run(n: int) -> float:
            total = 0.0
            for _ in range(n):
                if fresh:
                    for p, g in zip(params, grads):
                        p.grad = g.clone()
                t0 = time.perf_counter()
                opt.step()
                total += time.perf_counter() - t0
            return total / n

        return run

    impls = {
        "optkern.torch": stepper(lambda ps: okt.Adam(ps, lr=1e-3)),
        "torch fused": stepper(lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        "torch single-tensor": stepper(lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False)),
    }
    times: Dict[str, List[float]] = {k: [] for k in impls}
    for _ in range(rounds):
        order = list(impls)
        random.shuffle(order)
        for k in order:
            times[k].append(impls[k](inner) * 1e6)
    elements = sum(int(np.prod(s)) for s in SMALL_MLP)
    text = [
        f"Adam's step, {len(SMALL_MLP)} tensors ({elements} elements): torch {torch.__version__}, "
        f"optkern {ok.get_num_threads()} threads, {ok.active_isa()}; {rounds} rounds of {inner} "
        f"steps, fresh gradients: {fresh}; load {os.getloadavg()[0]:.1f}"
    ]
    rows = {}
    base = statistics.median(times["optkern.torch"])
    for k, t in times.items():
        med, p90 = statistics.median(t), float(np.percentile(t, 90))
        rows[k] = {"median_us": med, "p90_us": p90}
        text.append(f"  {k:20s} median {med:7.1f} us  p90 {p90:7.1f} us  ({med / base:.2f}x)")
    return {"us": rows, "text": "\n".join(text)}


def precision(repeats: int, n: int = 50_000_000) -> Dict[str, Any]:
    """Adam's step at n elements per precision, shuffled, medians and p90s, beside the other
    libraries' low-precision Adam where installed (precision_peers: warmed up first, and timed in
    fewer of the rounds when a step takes seconds)."""
    from .. import _core, _lowbits

    rng = np.random.default_rng(0)
    bf16 = _lowbits.BFLOAT16
    a, b = np.ones(n, np.float32), np.ones(n, np.float32)
    steps: Dict[str, Callable[[], Any]] = {"stream": lambda: _core.stream_axpy([a], [b], 1e-9)}
    nbytes: Dict[str, float] = {}
    state_bytes: Dict[str, float] = {}
    keep: List[Any] = []
    # (label, parameter and gradient dtype, state_dtype, stochastic rounding, bytes moved per
    # element)
    cases = [
        ("optkern f32", np.float32, "float32", False, 28),
        ("optkern f32, bf16 state", np.float32, "bfloat16", False, 20),
        ("optkern f32, int8 state", np.float32, "int8", False, 16 + 16 / 256),
    ]
    if bf16 is not None:
        cases += [
            ("optkern bf16, bf16 state", bf16, "bfloat16", False, 14),
            ("optkern bf16, bf16 state, SR", bf16, "bfloat16", True, 14),
            ("optkern bf16, int8 state", bf16, "int8", False, 10 + 16 / 256),
        ]
    for label, dtype, state_dtype, sr, per in cases:
        p = rng.standard_normal(n, dtype=np.float32).astype(dtype)
        g = (rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)).astype(dtype)
        opt = ok.Adam([p], lr=1e-3, state_dtype=state_dtype, stochastic_rounding=sr)
        opt.step([g])  # state allocated, pages touched
        state_bytes[label] = (
            sum(v.nbytes for v in opt.state[p].values() if isinstance(v, np.ndarray)) / n
        )
        keep.append((p, g, opt))
        steps[label] = lambda o=opt, g=g: o.step([g])
        nbytes[label] = per
    torch_version = None
    try:
        import torch

        torch_version = torch.__version__
        for label, dt, per in (
            ("torch fused f32", torch.float32, 28),
            ("torch fused bf16", torch.bfloat16, 14),
        ):
            tp = torch.nn.Parameter(torch.randn(n).to(dt))
            tp.grad = (torch.randn(n) * 1e-3).to(dt)
            topt = torch.optim.Adam([tp], lr=1e-3, fused=True)
            topt.step()
            keep.append((tp, topt))
            steps[label] = topt.step
            nbytes[label] = per
    except ImportError:
        pass
    peer_lines, peer_json, fewer = [], {}, {}
    for peer in precision_peers.PEERS:
        if peer.compared_with not in steps:
            peer_lines.append(f"  {peer.label}: not measured: no row {peer.compared_with!r}")
            peer_json[peer.label] = {"skipped": f"no row {peer.compared_with!r}"}
            continue
        ready = precision_peers.prepare(peer, n)
        if isinstance(ready, str):
            peer_lines.append(f"  {peer.label}: not measured: {ready}")
            peer_json[peer.label] = {"skipped": ready}
            continue
        fewer[peer.label] = precision_peers.timed_rounds(ready, repeats)
        peer_lines.append(precision_peers.describe(ready, fewer[peer.label], repeats))
        peer_json[peer.label] = precision_peers.as_json(ready, fewer[peer.label])
        steps[peer.label] = ready.step
        nbytes[peer.label] = peer.bytes_per_element
        state_bytes[peer.label] = ready.state_bytes
    times = shuffled_times(steps, repeats, fewer)
    med = {k: statistics.median(v) for k, v in times.items()}
    stream = 12 * n / med["stream"]
    torch_threads = f" ({sys.modules['torch'].get_num_threads()} threads)" if torch_version else ""
    text = [
        f"Adam, {n / 1e6:g}M elements, {ok.get_num_threads()} threads, ISA {ok.active_isa()}, "
        f"torch {torch_version}{torch_threads}; medians (p90) of {repeats} shuffled repeats; "
        "lr 1e-3, no weight decay",
        f"  in-place stream a += s*b: {stream / 1e9:.1f} GB/s ({med['stream'] * 1e3:.1f} ms)",
    ]
    rows = []
    for k, per in nbytes.items():
        t = med[k]
        share = per * n / t / stream
        rows.append(
            {
                "case": k,
                "seconds": t,
                "p90": _p90s(times[k]),
                "bytes": per,
                "fraction_of_stream": share,
                "state_bytes": state_bytes.get(k),
            }
        )
        sb = f"  state {state_bytes[k]:.3f} B/param" if k in state_bytes else ""
        text.append(
            f"  {k:28s} {t * 1e3:8.1f} ms (p90 {_p90s(times[k]) * 1e3:8.1f})  "
            f"{per:5.1f} B/elem  {per * n / t / 1e9:5.1f} GB/s ({share:4.0%}){sb}"
        )
    ratios = [
        ("bf16 state vs f32 (x = f32 / bf16 state)", "optkern f32", "optkern f32, bf16 state"),
        ("int8 state vs f32", "optkern f32", "optkern f32, int8 state"),
        ("torch fused bf16 / optkern bf16+int8", "torch fused bf16", "optkern bf16, int8 state"),
        ("torch fused f32 / optkern f32", "torch fused f32", "optkern f32"),
        *((p.ratio, p.label, p.compared_with) for p in precision_peers.PEERS),
    ]
    out_ratios = {}
    for label, num, den in ratios:
        if num in med and den in med:
            out_ratios[label] = med[num] / med[den]
            text.append(f"  {label}: x = {med[num] / med[den]:.2f}")
    text += ["  the other libraries' rows (x = their time / optkern's):", *peer_lines]
    return {
        "stream_gbps": stream / 1e9,
        "rows": rows,
        "ratios": out_ratios,
        "peers": peer_json,
        "text": "\n".join(text),
    }


def precision_loop(rounds: int, dims: Sequence[int] = (784, 256, 128, 10)) -> Dict[str, Any]:
    """The loops study's measurement (optkern.benchmark.loops.measure: interleaved loops, medians
    of the rounds) for Adam with each state_dtype; the update's share of optkern's loop."""
    import dataclasses

    from .cases import CASES, _optkern
    from .loops import measure

    text = [f"MLP {'-'.join(map(str, dims))}, Adam, medians of {rounds} rounds"]
    rows = []
    for state_dtype in ("float32", "bfloat16", "int8"):
        case = dataclasses.replace(
            CASES["adam"],
            key=f"adam-{state_dtype}",
            label=f"Adam, {state_dtype} state",
            optkern=_optkern(ok.Adam, lr=1e-3, state_dtype=state_dtype),
        )
        r = measure(case, dims, rounds, None, lambda: None)
        share = r["update_in_loop"] / r["loop_optkern"]
        rows.append(
            {
                "state_dtype": state_dtype,
                "loop": r["loop_optkern"],
                "update_in_loop": r["update_in_loop"],
                "update_alone": r["update_alone"],
                "share": share,
            }
        )
        text.append(
            f"  {state_dtype:8s} loop {r['loop_optkern'] * 1e3:6.3f} ms  update in loop "
            f"{r['update_in_loop'] * 1e3:6.3f} ms ({share:4.0%})  alone "
            f"{r['update_alone'] * 1e3:6.3f} ms"
        )
    return {"rows": rows, "text": "\n".join(text)}


def precision_accuracy(seeds: int) -> Dict[str, Any]:
    """Test accuracy of the digits MLP (144-128-64-10, 6000/2000 digits, 10 epochs, batch 64)
    trained with Adam at two learning rates, per precision setting, for ``seeds`` seeds (the
    initial weights and batch order); mean and range over the seeds."""
    from .. import _lowbits
    from ..examples.mlp import MLP, load_data
    from ..data import batches

    if _lowbits.BFLOAT16 is None:
        raise RuntimeError("precision-accuracy needs ml_dtypes (bfloat16)")
    bf16 = _lowbits.BFLOAT16
    settings = [
        ("float32", {}, False),
        ("bfloat16 state", {"state_dtype": "bfloat16"}, False),
        ("int8 state", {"state_dtype": "int8"}, False),
        ("bf16 params, nearest", {}, True),
        ("bf16 params, stochastic", {"stochastic_rounding": True}, True),
        ("bf16 params, master weights", {"master_weights": True}, True),
    ]
    data = load_data(6000, 2000, 0)
    X, y, X_test, y_test = data
    rows = []
    text = [
        "digits MLP 144-128-64-10, Adam, 10 epochs of batch 64; test accuracy, mean "
        f"[min, max] over {seeds} seeds"
    ]
    for lr in (3e-3, 3e-4):
        for label, options, half in settings:
            accs = []
            for seed in range(seeds):
                model = MLP([X.shape[1], 128, 64, 10], seed=seed)
                params = [p.astype(bf16) for p in model.params] if half else model.params
                opt = ok.Adam(params, lr=lr, **options)
                with np.errstate(over="ignore", invalid="ignore"):
                    for epoch in range(10):
                        for Xb, yb in batches(X, y, batch_size=64, seed=(seed, epoch)):
                            if half:  # the float32 model computes with the bfloat16 weights
                                for p32, p16 in zip(model.params, params):
                                    p32[...] = p16
                            _, grads = model.loss_and_gradients(Xb, yb)
                            opt.step(grads)
                    if half:
                        for p32, p16 in zip(model.params, params):
                            p32[...] = p16
                    accs.append(model.evaluate(X_test, y_test)[1])
            rows.append({"task": "digits-mlp", "lr": lr, "setting": label, "test_acc": accs})
            text.append(
                f"  lr {lr:g}  {label:30s} {100 * np.mean(accs):5.1f}% "
                f"[{100 * min(accs):.1f}, {100 * max(accs):.1f}]"
            )
    rnn_rows, rnn_text = _char_rnn_accuracy(seeds, settings, bf16)
    return {"rows": rows + rnn_rows, "text": "\n".join(text + rnn_text)}


def _char_rnn_accuracy(seeds: int, settings: list, bf16: Any) -> Tuple[list, List[str]]:
    """The char-RNN of optkern.examples.char_rnn (26 symbols, 64 tanh units, 32 streams of 32
    characters, 8 passes over 60,000 characters of its grammar's text, gradients clipped to
    norm 1) trained with Adam per precision setting: held-out bits per character, mean and
    range over the seeds (the initial weights)."""
    from ..examples.char_rnn import CharRNN, chunks, make_text

    train, held = make_text(60_000, 0), make_text(10_000, 1)
    vocab = {c: i for i, c in enumerate(sorted(set(train) | set(held)))}
    ids = np.array([vocab[c] for c in train])
    held_ids = np.array([vocab[c] for c in held])
    rows = []
    text = [
        f"char-RNN {len(vocab)}-64 tanh, Adam, 8 passes over 60k characters (32 streams x 32); "
        f"held-out bits per character, mean [min, max] over {seeds} seeds"
    ]
    for lr in (3e-3, 1e-3):
        for label, options, half in settings:
            scores = []
            for seed in range(seeds):
                model = CharRNN(len(vocab), 64, seed)
                params = [p.astype(bf16) for p in model.params] if half else model.params
                opt = ok.Adam(params, lr=lr, **options)
                for _ in range(8):
                    h = np.zeros((32, 64), np.float32)
                    for x, y in chunks(ids, 32, 32):
                        if half:  # the float32 model computes with the bfloat16 weights
                            for p32, p16 in zip(model.params, params):
                                p32[...] = p16
                        _, grads, h = model.loss_and_gradients(x, y, h)
                        opt.step(grads, max_grad_norm=1.0)
                if half:
                    for p32, p16 in zip(model.params, params):
                        p32[...] = p16
                scores.append(model.bits_per_char(held_ids))
            rows.append({"task": "char-rnn", "lr": lr, "setting": label, "bits_per_char": scores})
            text.append(
                f"  lr {lr:g}  {label:30s} {np.mean(scores):.3f} bits/char "
                f"[{min(scores):.3f}, {max(scores):.3f}]"
            )
    return rows, text


def _p90s(xs: List[float]) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(0.9 * len(ys)))]


def run_study(name: str, repeats: int) -> Dict[str, Any]:
    if name in algos.STUDIES:
        return algos.run_study(name, repeats)
    return {
        "precision": precision,
        "precision-loop": precision_loop,
        "precision-accuracy": precision_accuracy,
        "threshold": threshold,
        "thread-placement": thread_placement,
        "adafactor-shapes": adafactor_shapes,
        "pass-bounds": pass_bounds,
        "torch-bandwidth": torch_bandwidth,
        "torch-phases": torch_phases,
        "step-cost": step_cost,
        "torch-small-step": torch_small_step,
    }[name](repeats)
