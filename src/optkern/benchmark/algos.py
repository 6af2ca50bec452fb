"""``python -m optkern bench --studies sparse muon lbfgs``: the optimizers that are not one
element-wise pass, against torch's on the same inputs (when torch is installed), interleaved in
one run.

- sparse: one step of SparseAdam, Adagrad and SGD on an embedding table of 1M x 64 float32 with
  4096 looked-up rows per step (the gradient ``nn.Embedding(sparse=True)`` makes, duplicates
  included): torch.optim, optkern.torch and optkern (NumPy, ``RowSparse``).
- muon: one Muon step of a 1024 x 1024 weight: torch.optim.Muon (its Newton-Schulz in bfloat16;
  also with oneDNN off, the path of a CPU without bfloat16 matrix units), optkern.torch.Muon
  (float32 and bfloat16) and optkern.Muon (float32, NumPy's BLAS); and 15 float32 matrix
  products alone, the floor of a float32 Newton-Schulz.
- lbfgs: one LBFGS step (20 iterations, history 100, full) on 1M parameters, the closure's own
  time subtracted: torch.optim.LBFGS, optkern.torch.LBFGS and optkern.LBFGS.

Times are medians (and 90th percentiles) of repeats taken in a new random order every round.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

import optkern as ok

STUDIES = ("sparse", "muon", "lbfgs")


def _stats(times: List[float]) -> Dict[str, float]:
    s = sorted(times)
    p90 = s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)]
    return {"median": statistics.median(s), "p90": p90, "min": s[0], "n": len(s)}


def interleaved(cases: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, Dict[str, float]]:
    """Each case's seconds per call: one call of every case per round, in a new random order
    every round; a case returning a number of seconds reports that instead of its wall time
    (the closure's time subtracted)."""
    times: Dict[str, List[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        order = list(cases)
        random.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            out = cases[k]()
            wall = time.perf_counter() - t0
            times[k].append(out if isinstance(out, float) else wall)
    return {k: _stats(v) for k, v in times.items()}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


# -- sparse ----------------------------------------------------------------------------------------

SPARSE_ROWS, SPARSE_DIM, SPARSE_LOOKUPS = 1_000_000, 64, 4096
#: The rules that take row-sparse gradients (their declarations' rows), each at its defaults
#: (the step's time does not depend on the values).
SPARSE_OPTIMIZERS: Dict[str, Dict[str, Any]] = {
    r.cls: {} for r in ok.registry.rules() if r.rows is not None and r.rows.accepted
}


def sparse_cases(
    rows: int = SPARSE_ROWS, dim: int = SPARSE_DIM, lookups: int = SPARSE_LOOKUPS, seed: int = 0
) -> Dict[str, Callable[[], Any]]:
    """One step per call of each optimizer, each implementation on its own copy of the table,
    gradients cycling through 8 precomputed lookups (uniform rows, with replacement)."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((rows, dim)) * 0.1).astype(np.float32)
    batches = []
    for _ in range(8):
        idx = rng.integers(0, rows, lookups).astype(np.int64)
        vals = rng.standard_normal((lookups, dim)).astype(np.float32)
        batches.append((idx, vals))
    cases: Dict[str, Callable[[], Any]] = {}
    for name, hp in SPARSE_OPTIMIZERS.items():
        W = table.copy()
        grads = [ok.RowSparse(i, v) for i, v in batches]
        opt = getattr(ok, name)([W], **hp)
        cases[f"{name} optkern"] = _cycle(lambda g, opt=opt: opt.step([g]), grads)
        if torch is None:
            continue
        tgrads = [
            torch.sparse_coo_tensor(torch.from_numpy(i)[None], torch.from_numpy(v), (rows, dim))
            for i, v in batches
        ]
        for label, module in (("torch", torch.optim), ("optkern.torch", _okt())):
            if module is None or not hasattr(module, name):
                continue
            p = torch.nn.Parameter(torch.from_numpy(table.copy()))
            topt = getattr(module, name)([p], **hp)

            def step(g, p=p, topt=topt):
                p.grad = g
                topt.step()

            cases[f"{name} {label}"] = _cycle(step, tgrads)
    return cases


def _okt() -> Any:
    try:
        import optkern.torch as okt
    except ImportError:
        return None
    return okt


def _cycle(step: Callable[[Any], None], items: List[Any]) -> Callable[[], None]:
    state = {"i": 0}

    def call() -> None:
        step(items[state["i"] % len(items)])
        state["i"] += 1

    return call


# -- muon ------------------------------------------------------------------------------------------


def muon_cases(n: int = 1024, seed: int = 0, slow_torch: bool = True) -> Dict[str, Callable[[], Any]]:
    torch = _torch()
    rng = np.random.default_rng(seed)
    W0 = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
    G = rng.standard_normal((n, n)).astype(np.float32)
    cases: Dict[str, Callable[[], Any]] = {}
    W = W0.copy()
    opt = ok.Muon([W])
    cases["Muon optkern (float32 NS, NumPy BLAS)"] = lambda: opt.step([G])
    A = rng.standard_normal((n, n)).astype(np.float32)
    B = np.empty_like(A)

    def fifteen() -> None:
        for _ in range(15):
            np.matmul(A, A, out=B)

    cases["15 float32 matmuls (NumPy BLAS)"] = fifteen
    if torch is None:
        return cases
    okt = _okt()
    variants = [("torch", torch.optim.Muon, {})]
    if okt is not None and hasattr(okt, "Muon"):
        variants += [
            ("optkern.torch (float32 NS)", okt.Muon, {"ns_dtype": torch.float32}),
            ("optkern.torch (bfloat16 NS)", okt.Muon, {"ns_dtype": torch.bfloat16}),
        ]
    for label, cls, kw in variants:
        p = torch.nn.Parameter(torch.from_numpy(W0.copy()))
        topt = cls([p], **kw)
        tg = torch.from_numpy(G.copy())

        def step(p=p, topt=topt, tg=tg) -> None:
            p.grad = tg
            topt.step()

        cases[f"Muon {label}"] = step
    if slow_torch:
        p = torch.nn.Parameter(torch.from_numpy(W0.copy()))
        topt = torch.optim.Muon([p])
        tg = torch.from_numpy(G.copy())

        def slow(p=p, topt=topt, tg=tg) -> None:
            p.grad = tg
            with torch.backends.mkldnn.flags(enabled=False):
                topt.step()

        cases["Muon torch, oneDNN off (no bfloat16 matmul units)"] = slow
    return cases


# -- lbfgs -----------------------------------------------------------------------------------------


class _Quadratic:
    """f(x) = 0.5 sum a_i (x_i - c_i)^2 with a_i log-uniform over six decades: L-BFGS keeps
    iterating (20 iterations a step, history full after 5 steps). The gradient is written into a
    preallocated array; the time spent in the closure is counted, to be subtracted."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.a = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), n)).astype(np.float32)
        self.c = rng.standard_normal(n).astype(np.float32)
        self.closure_seconds = 0.0


def lbfgs_cases(
    n: int = 1_000_000, seed: int = 0, warm_steps: int = 5
) -> Dict[str, Callable[[], Any]]:
    torch = _torch()
    q = _Quadratic(n, seed)
    cases: Dict[str, Callable[[], Any]] = {}

    x = np.zeros(n, np.float32)
    g = np.empty(n, np.float32)
    r = np.empty(n, np.float32)
    spent = [0.0]

    def closure():
        t0 = time.perf_counter()
        np.subtract(x, q.c, out=r)
        np.multiply(q.a, r, out=g)
        loss = 0.5 * float(np.dot(r, g))
        spent[0] += time.perf_counter() - t0
        return loss, [g]

    opt = ok.LBFGS([x])

    def ours() -> float:
        spent[0] = 0.0
        t0 = time.perf_counter()
        opt.step(closure)
        return time.perf_counter() - t0 - spent[0]

    for _ in range(warm_steps):
        ours()
    cases["LBFGS optkern"] = ours
    if torch is None:
        return cases
    okt = _okt()
    ta, tc = torch.from_numpy(q.a), torch.from_numpy(q.c)
    for label, cls in (("torch", torch.optim.LBFGS), ("optkern.torch", getattr(okt, "LBFGS", None))):
        if cls is None:
            continue
        p = torch.nn.Parameter(torch.zeros(n))
        tr = torch.empty(n)
        tspent = [0.0]

        def tclosure(p=p, tr=tr, tspent=tspent):
            t0 = time.perf_counter()
            with torch.no_grad():
                torch.sub(p, tc, out=tr)
                if p.grad is None:
                    p.grad = torch.empty(n)
                torch.mul(ta, tr, out=p.grad)
                loss = 0.5 * float(torch.dot(tr, p.grad))
            tspent[0] += time.perf_counter() - t0
            return loss

        topt = cls([p])

        def theirs(topt=topt, tclosure=tclosure, tspent=tspent) -> float:
            tspent[0] = 0.0
            t0 = time.perf_counter()
            topt.step(tclosure)
            return time.perf_counter() - t0 - tspent[0]

        for _ in range(warm_steps):
            theirs()
        cases[f"LBFGS {label}"] = theirs
    return cases


# -- the study runner ------------------------------------------------------------------------------


def run_study(name: str, repeats: int, threads: Optional[int] = None) -> Dict[str, Any]:
    """One study (``python -m optkern bench --studies sparse``): its timings and their text."""
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads or ok.get_num_threads())
    make = {"sparse": sparse_cases, "muon": muon_cases, "lbfgs": lbfgs_cases}[name]
    study = interleaved(make(), repeats)
    return {"cases": study, "text": report(name, study)}


def report(name: str, study: Dict[str, Dict[str, float]]) -> str:
    n = next(iter(study.values()))["n"]
    lines = [f"{name}: seconds per step (median and 90th percentile of {n}, interleaved)"]
    for case, s in study.items():
        lines.append(f"  {case:<56} {s['median'] * 1e3:10.3f} ms   p90 {s['p90'] * 1e3:10.3f} ms")
    groups: Dict[str, List[str]] = {}
    for case in study:
        groups.setdefault(case.split()[0], []).append(case)
    for opt, members in groups.items():
        base = f"{opt} torch"
        if base not in study:
            continue
        for case in members:
            if case != base and not case.startswith(f"{opt} torch,"):
                ratio = study[base]["median"] / study[case]["median"]
                lines.append(f"  {case}: {ratio:.1f}x faster than {base} (medians)")
    return "\n".join(lines)
