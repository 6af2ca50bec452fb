"""The study ``step-cost``: the fixed cost of a small step. optkern against NumPy's own in-place
update on a 4-array model (shapes (64, 30), (30,), (30, 10), (10,): a 64-30-10 MLP), the cost of
writing a new hyperparameter value before each step, the functional call's cost per call and per
array, and the stale-parameter check's cost per array, in float32 and float64; and Adam's step on
one element and on the 4-array model under each precision option (bfloat16 or int8 state,
bfloat16 parameters with master weights or stochastic rounding) beside float32 state.

Every case is a callable timed in short batches of calls (about BATCH_SECONDS each, so that on a
loaded machine most batches run without being descheduled); the cases of one figure are
interleaved (A B C, A B C, ...) over ``rounds`` rounds, and each figure reports the median (and
min) over rounds of the time per call. The targets are issue 23's (item 2, and item 5's check
cost).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

import optkern as ok
from optkern import functional as F

SHAPES = [(64, 30), (30,), (30, 10), (10,)]
FIGURES = ["sgd", "adam", "lr", "functional", "stale"]
DTYPES = ("float32", "float64")
BATCH_SECONDS = 100e-6  # one timed batch of a case: a descheduling (milliseconds) spoils few


def model(dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [(rng.standard_normal(s) * 1e-3).astype(dtype) for s in SHAPES]
    return params, grads


def interleaved(
    cases: Dict[str, Callable[[], None]], rounds: int, batch: Optional[int] = None
) -> Dict[str, List[float]]:
    """Seconds per call of each case in each round, the cases interleaved within a round; each
    case's calls per batch are ``batch``, or as many as take about BATCH_SECONDS."""
    clock = time.perf_counter
    batches = {}
    for name, f in cases.items():  # warm: first steps make state and plans
        t0 = clock()
        for _ in range(200):
            f()
        once = min((clock() - t0) / 200, _best_call(f))
        batches[name] = batch or max(5, min(2000, round(BATCH_SECONDS / max(once, 1e-8))))
    out: Dict[str, List[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, f in cases.items():
            n = batches[name]
            t0 = clock()
            for _ in range(n):
                f()
            out[name].append((clock() - t0) / n)
    return out


def _best_call(f: Callable[[], None], tries: int = 20) -> float:
    clock = time.perf_counter
    best = float("inf")
    for _ in range(tries):
        t0 = clock()
        f()
        best = min(best, clock() - t0)
    return best


def show(
    text: List[str], title: str, times: Dict[str, List[float]], base: str = ""
) -> Dict[str, float]:
    med = {k: statistics.median(v) for k, v in times.items()}
    text.append(f"\n{title}")
    for k, v in times.items():
        ratio = f"  {med[k] / med[base]:5.2f}x {base}" if base and k != base else ""
        text.append(f"  {k:<40} median {med[k] * 1e6:8.2f} us   min {min(v) * 1e6:8.2f} us{ratio}")
    return med


def np_sgd(params, grads, lr=0.01):
    def step():
        for p, g in zip(params, grads):
            p -= lr * g

    return step


def np_adam(params, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """Adam as NumPy code writes it in place (moments updated in place, temporaries for the
    rest), with the learning rate read every step as a schedule would set it."""
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = [0]
    box = {"lr": lr}

    def step():
        t[0] += 1
        c1, c2 = 1 - b1 ** t[0], 1 - b2 ** t[0]
        rate = box["lr"]
        for p, g, mi, vi in zip(params, grads, m, v):
            mi *= b1
            mi += (1 - b1) * g
            vi *= b2
            vi += (1 - b2) * g * g
            p -= rate * (mi / c1) / (np.sqrt(vi / c2) + eps)

    return step, box


def lrs(base: float, n: int = 4096) -> List[float]:
    return [base * (1 + 1e-6 * i) for i in range(n)]


def fig_sgd(text, dtype, rounds, batch) -> Dict[str, Any]:
    p1, g1 = model(dtype)
    p2, g2 = model(dtype)
    opt = ok.SGD(p2, lr=0.01)
    cases = {"numpy p -= lr * g": np_sgd(p1, g1), "ok.SGD.step": lambda: opt.step(g2)}
    title = "SGD on the 4-array model: optkern's step against NumPy's p -= lr * g"
    med = show(text, title, interleaved(cases, rounds, batch), "numpy p -= lr * g")
    return {"us": _us(med), "ratio": med["ok.SGD.step"] / med["numpy p -= lr * g"]}


def fig_adam(text, dtype, rounds, batch) -> Dict[str, Any]:
    p1, g1 = model(dtype)
    p2, g2 = model(dtype)
    p3, g3 = model(dtype)
    np_step, box = np_adam(p1, g1)
    opt = ok.Adam(p2, lr=1e-3)
    opt_w = ok.Adam(p3, lr=1e-3)
    values = lrs(1e-3)
    i = [0]

    def numpy_lr():
        i[0] += 1
        box["lr"] = values[i[0] & 4095]
        np_step()

    def optkern_lr():
        i[0] += 1
        opt_w.param_groups[0]["lr"] = values[i[0] & 4095]
        opt_w.step(g3)

    cases = {
        "numpy Adam, lr written": numpy_lr,
        "ok.Adam.step, lr written": optkern_lr,
        "ok.Adam.step": lambda: opt.step(g2),
    }
    title = "Adam on the 4-array model (a new lr before each step in both): optkern against NumPy in place"
    med = show(text, title, interleaved(cases, rounds, batch), "numpy Adam, lr written")
    base = med["numpy Adam, lr written"]
    return {
        "us": _us(med),
        "ratio": med["ok.Adam.step"] / base,
        "ratio_lr_written": med["ok.Adam.step, lr written"] / base,
    }


def fig_lr(text, dtype, rounds, batch) -> Dict[str, Any]:
    cases = {}
    for name, cls, key, vals in [
        ("SGD", ok.SGD, "lr", lrs(0.01)),
        ("Adam", ok.Adam, "lr", lrs(1e-3)),
        ("Adam", ok.Adam, "betas", [(0.9, 0.999 - 1e-7 * k) for k in range(4096)]),
        ("Adam", ok.Adam, "weight_decay", lrs(1e-4)),
    ]:
        p, g = model(dtype)
        opt = cls(p, lr=vals[0] if key == "lr" else 1e-3)
        group = opt.param_groups[0]
        n = [0]

        def write(opt=opt, group=group, key=key, vals=vals, g=g, n=n):
            n[0] += 1
            group[key] = vals[n[0] & 4095]
            opt.step(g)

        def same(opt=opt, group=group, key=key, vals=vals, g=g, n=n):
            n[0] += 1
            vals[n[0] & 4095]  # the same list read, nothing written
            opt.step(g)

        cases[f"{name}.step"] = same
        cases[f"{name}.step, new {key} written"] = write
    times = interleaved(cases, rounds, batch)
    med = show(text, "A new value written into param_groups[0][key] before each step", times)
    added = {}
    for k in cases:
        if ", new " in k:
            added[k] = med[k] - med[k.split(",")[0]]
            text.append(f"  {k:<40} adds {added[k] * 1e6:6.2f} us")
    return {"us": _us(med), "added_us": _us(added)}


def fig_functional(text, dtype, rounds, batch) -> Dict[str, Any]:
    """F.sgd_ and F.adam_ over n arrays of 16 elements (their kernels take well under 0.1 us):
    the call's cost, fitted as a + b * n."""
    cases = {}
    counts = [1, 4, 16, 64]
    for n in counts:
        rng = np.random.default_rng(n)
        params = [rng.standard_normal(16).astype(dtype) for _ in range(n)]
        grads = [rng.standard_normal(16).astype(dtype) for _ in range(n)]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        cases[f"F.sgd_ {n:>2} arrays"] = lambda p=params, g=grads: F.sgd_(p, g, lr=0.01)
        cases[f"F.adam_ {n:>2} arrays"] = lambda p=params, g=grads, m=m, v=v: F.adam_(
            p, g, m, v, step=10, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8
        )
    p4, g4 = model(dtype)
    cases["F.sgd_ the 4-array model"] = lambda: F.sgd_(p4, g4, lr=0.01)
    med = show(text, "The functional call", interleaved(cases, rounds, batch))
    fits = {}
    for fn in ("sgd_", "adam_"):
        y = [med[f"F.{fn} {n:>2} arrays"] * 1e6 for n in counts]
        b, a = np.polyfit(counts, y, 1)
        fits[fn] = {"call_us": float(a), "per_array_us": float(b)}
        text.append(f"  F.{fn}: {a:.2f} us + {b:.3f} us per array (least squares over n = {counts})")
    return {"us": _us(med), "fit": fits}


def fig_stale(text, dtype, rounds, batch) -> Dict[str, Any]:
    """Adam over 256 arrays of 16 elements, the check on and off: the difference per array."""
    n = 256
    cases = {}
    for on in (True, False):
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(16).astype(dtype) for _ in range(n)]
        grads = [rng.standard_normal(16).astype(dtype) for _ in range(n)]
        opt = ok.Adam(params, lr=1e-3)
        opt.warn_stale = on
        cases[f"Adam, {n} arrays, check {'on' if on else 'off'}"] = lambda o=opt, g=grads: o.step(g)
    med = show(text, "The stale-parameter check", interleaved(cases, rounds, batch))
    on, off = (med[k] for k in cases)
    per_array = (on - off) / n
    text.append(f"  cost per array: {per_array * 1e9:.1f} ns (on minus off, over {n} arrays)")
    return {"us": _us(med), "per_array_us": per_array * 1e6}


#: label: (bfloat16 parameters, the optimizer's precision options)
PRECISION_OPTIONS = {
    "float32 state": (False, {}),
    "bfloat16 state": (False, {"state_dtype": "bfloat16"}),
    "int8 state": (False, {"state_dtype": "int8"}),
    "bf16 param, master": (True, {"master_weights": True}),
    "bf16 param, stochastic": (True, {"stochastic_rounding": True}),
}


def fig_precision(text, rounds, batch) -> Dict[str, Any]:
    """Adam's step on one element and on the 4-array model (float32 parameters, unless bfloat16
    ones are named) under each precision option, beside float32 state; on one element also each
    option's step through the whole path (no kept plan: every step validated whole, as a step
    after a change the plan does not follow). The options that need bfloat16 (ml_dtypes) are left
    out without it."""
    from .. import _lowbits

    bf16 = _lowbits.BFLOAT16
    out = {}
    for where, shapes in (("one element", [(1,)]), ("the 4-array model", SHAPES)):
        cases = {}
        for label, (half, options) in PRECISION_OPTIONS.items():
            if bf16 is None and (half or options.get("state_dtype") == "bfloat16"):
                continue
            params, grads = model(np.float32)
            if shapes != SHAPES:
                params, grads = [params[1][:1].copy()], [grads[1][:1].copy()]
            if half:
                params = [p.astype(bf16) for p in params]
            opt = ok.Adam(params, lr=1e-3, **options)
            cases[f"Adam, {label}"] = lambda o=opt, g=grads: o.step(g)
            if shapes != SHAPES:
                whole = ok.Adam([p.copy() for p in params], lr=1e-3, **options)
                whole._make_plan = lambda *a, **k: None  # no plan is ever kept
                cases[f"Adam, {label}, whole path"] = lambda o=whole, g=grads: o.step(g)
        title = f"Adam on {where} under each precision option"
        med = show(text, title, interleaved(cases, rounds, batch), "Adam, float32 state")
        out[where] = _us(med)
    if bf16 is None:
        text.append("  (ml_dtypes is not installed: the bfloat16 options are left out)")
    return out


def _us(med: Dict[str, float]) -> Dict[str, float]:
    return {k: v * 1e6 for k, v in med.items()}


def targets(figs: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Issue 23's targets (item 2; item 5's cost) over each dtype's figures: value and limit."""
    out = []

    def add(name, value, limit):
        out.append({"target": name, "value": value, "limit": limit, "met": value <= limit})

    for dtype, f in figs.items():
        if "sgd" in f:
            add(f"{dtype}: ok.SGD.step / numpy in-place SGD <= 1.0", f["sgd"]["ratio"], 1.0)
        if "adam" in f:
            add(f"{dtype}: ok.Adam.step / numpy in-place Adam <= 0.6", f["adam"]["ratio"], 0.6)
            add(
                f"{dtype}: ok.Adam.step, lr written / numpy Adam, lr written <= 0.6",
                f["adam"]["ratio_lr_written"],
                0.6,
            )
        if "lr" in f:
            for k, v in f["lr"]["added_us"].items():
                add(f"{dtype}: {k}: added us <= 1.5", v, 1.5)
        if "functional" in f:
            for fn, fit in f["functional"]["fit"].items():
                add(f"{dtype}: F.{fn} call us <= 2", fit["call_us"], 2.0)
                add(f"{dtype}: F.{fn} per array us <= 0.3", fit["per_array_us"], 0.3)
        if "stale" in f:
            add(f"{dtype}: stale check per array us <= 0.05", f["stale"]["per_array_us"], 0.05)
    return out


def step_cost(
    rounds: int,
    batch: Optional[int] = None,
    dtypes: Sequence[str] = DTYPES,
    figures: Sequence[str] = FIGURES,
    precision: bool = True,
) -> Dict[str, Any]:
    """Every figure for each dtype, then (``precision``) the precision options'; ``text`` is
    what the study prints."""
    import os

    text = [
        f"Step cost on the 4-array model ({ok.active_isa()}, {ok.get_num_threads()} threads): "
        f"median over {rounds} rounds of {batch or 'about 100 us of'} calls; load average before "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    ]
    figs: Dict[str, Dict[str, Any]] = {}
    for dtype in dtypes:
        text.append(f"\n== {dtype}")
        figs[dtype] = {
            name: globals()[f"fig_{name}"](text, np.dtype(dtype), rounds, batch) for name in figures
        }
    precision_us = None
    if precision:
        text.append("\n== precision options")
        precision_us = fig_precision(text, rounds, batch)
    goals = targets(figs)
    text.append("\ntargets:")
    for t in goals:
        text.append(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['value']:.3f}")
    text.append("load average after " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return {"figures": figs, "precision": precision_us, "targets": goals, "text": "\n".join(text)}
