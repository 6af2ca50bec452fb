"""How the benchmark measures: every timing is the minimum over repeats of a batch of steps, the
implementations compared at one size are interleaved (so a slow spell of a shared machine hits
them alike), and the machine's in-place streaming bandwidth (``a += s*b``, optkern's threads) is
timed at the same sizes in the same run, interleaved with each case. Ratios come from one run.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

import optkern as ok

from .. import _platform
from .._progress import ProgressBar
from .cases import CASES, Case, torch_available

TARGET_BATCH_SECONDS = 0.02  # each timed batch of steps lasts at least this long


def machine() -> Dict[str, object]:
    return _platform.machine(torch_available())


def time_per_step(step: Callable[[], None], batch: int) -> float:
    start = time.perf_counter()
    for _ in range(batch):
        step()
    return (time.perf_counter() - start) / batch


def batch_for(step: Callable[[], None]) -> int:
    """Steps per timed batch, from one warm step."""
    once = time_per_step(step, 1)
    return max(1, min(10_000, math.ceil(TARGET_BATCH_SECONDS / max(once, 1e-9))))


def compare(steps: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Seconds per step of each implementation: minimum over repeats, interleaved."""
    for step in steps.values():  # first steps allocate state and warm caches
        step()
    batches = {name: batch_for(step) for name, step in steps.items()}
    best = {name: math.inf for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            best[name] = min(best[name], time_per_step(step, batches[name]))
    return best


def shuffled_times(
    steps: Dict[str, Callable[[], None]], repeats: int, fewer: Optional[Dict[str, int]] = None
) -> Dict[str, List[float]]:
    """Seconds of one call of each step in each repeat, the steps in a new random order every
    repeat, so that none always runs right after the same other (for steps long enough to time
    one call: tens of milliseconds, as at 50M elements). Min or median is the caller's.

    ``fewer`` names steps too slow to run in every repeat (seconds a call) and in how many of
    the repeats each runs: those repeats are spread evenly over the run, and in each the step is
    shuffled in with the others."""
    fewer = fewer or {}
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for i in range(repeats):
        order = [
            k
            for k in steps
            # a step run r times of R runs in the repeats where floor(i * r / R) moves on
            if k not in fewer or (i * fewer[k]) // repeats != ((i + 1) * fewer[k]) // repeats
        ]
        random.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def arrays(sizes: Sequence[int], seed: int, scale: float = 1.0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n, dtype=np.float32) * np.float32(scale)) for n in sizes]


def parse_size(text: str) -> int:
    t = text.strip().lower().replace("_", "")
    factor = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1:], 1)
    return int(float(t[:-1] if factor != 1 else t) * factor)


def size_label(n: int) -> str:
    for factor, suffix in [(10**9, "G"), (10**6, "M"), (10**3, "K")]:
        if n >= factor and n % (factor // 10) == 0:
            return f"{n / factor:g}{suffix}"
    return str(n)


class Progress:
    """``progress(what)`` marks one more measurement done (the demo's progress bar)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.done = 0
        self.bar = ProgressBar(total) if enabled else None

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.done, what)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the main table ----------------------------------------------------------------------------------


def stream_step(n: int) -> Callable[[], None]:
    """a += s*b over n elements (12 bytes each), optkern's threads: the bandwidth yardstick."""
    a, b = arrays([n, n], seed=1)
    return lambda: ok._core.stream_axpy([a], [b], 1e-7)


def run_main(
    cases: Sequence[Case], sizes: Sequence[int], repeats: int, use_torch: bool, progress: Progress
) -> List[Dict[str, object]]:
    """Each case at each size, with the yardstick (a += s*b) timed in the same interleaved set:
    its fraction of the bandwidth compares measurements taken side by side."""
    rows = []
    for n in sizes:
        stream = stream_step(n)
        for case in cases:
            progress(f"{case.label} {size_label(n)}")
            impls = {"optkern": case.optkern}
            if case.numpy is not None:
                impls["numpy"] = case.numpy
            missing = case.peer_missing() if use_torch else None
            if use_torch and missing is None:
                impls["torch"] = case.torch
            steps = {"stream": stream}
            shape = case.shape(n) if case.shape is not None else (n,)
            for name, make in impls.items():
                params = [a.reshape(shape) for a in arrays([n], seed=2, scale=0.5)]
                grads = [a.reshape(shape) for a in arrays([n], seed=3, scale=0.01)]
                steps[name] = make(params, grads)
            seconds = compare(steps, repeats)
            del steps
            gc.collect()
            bw = 12 * n / seconds.pop("stream")
            row: Dict[str, object] = {
                "optimizer": case.key,
                "label": case.label,
                "size": n,
                "shape": list(shape),
                "bytes_per_element": case.bytes_per_element,
                "stream_gbps": bw / 1e9,
                "torch_impl": case.torch_impl if use_torch else None,
            }
            if missing is not None:
                row["torch_missing"] = missing
            for name, t in seconds.items():
                gbps = case.bytes_per_element * n / t / 1e9
                row[name] = {"seconds": t, "gbps": gbps, "fraction_of_stream": gbps * 1e9 / bw}
            if "numpy" in seconds:
                row["speedup_vs_numpy"] = seconds["numpy"] / seconds["optkern"]
            if "torch" in seconds:
                row["speedup_vs_torch"] = seconds["torch"] / seconds["optkern"]
            rows.append(row)
    return rows


def main_table(rows: List[Dict[str, object]]) -> str:
    torch = any("torch" in r or "torch_missing" in r for r in rows)
    head = (
        f"{'optimizer':<16}{'size':>6} {'optkern':>10} {'GB/s':>6} {'%bw':>5} {'numpy':>10} {'x':>6}"
    )
    if torch:
        head += f" {'torch':>10} {'(impl)':<9}{'x':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        o = r["optkern"]
        line = (
            f"{r['label']:<16}{size_label(r['size']):>6} {_ms(o['seconds'])} "
            f"{o['gbps']:6.1f} {100 * o['fraction_of_stream']:4.0f}% "
            + (
                f"{_ms(r['numpy']['seconds'])} {r['speedup_vs_numpy']:5.1f}x"
                if "numpy" in r
                else f"{'-':>10} {'-':>6}"
            )
        )
        if torch and "torch" in r:
            line += (
                f" {_ms(r['torch']['seconds'])} ({r['torch_impl']:<7}) {r['speedup_vs_torch']:4.2f}x"
            )
        elif torch:
            line += f" {'-':>10} {'':<9}{'-':>5}  ({r.get('torch_missing', 'not measured')})"
        lines.append(line)
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f}ms"


# -- studies ---------------------------------------------------------------------------------------


def many_small_sizes(count: int = 300, seed: int = 0) -> List[int]:
    """Sizes log-uniform in [64, 65536], like a network's weights and biases."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.exp(rng.uniform(math.log(64), math.log(65536), count)).round()]


def run_many_small(
    repeats: int, use_torch: bool, progress: Progress, key: str = "adam"
) -> Dict[str, object]:
    """One optimizer (Adam by default) over 300 separate arrays (one call per group) against the
    same elements as one contiguous FlatParams block, and against torch's over the 300
    tensors."""
    case = CASES[key]
    progress(f"300 small buffers, {case.label}")
    sizes = many_small_sizes()
    steps = {"optkern (300 arrays)": case.optkern(arrays(sizes, 4, 0.5), arrays(sizes, 5, 0.01))}
    flat, flat_grads = ok.FlatParams(sizes), ok.FlatParams(sizes)
    flat.flat[...] = 0.5
    flat_grads.flat[...] = 0.01
    steps["optkern (one FlatParams block)"] = case.optkern([flat.flat], [flat_grads.flat])
    torch_label = f"torch {case.torch_impl} (300 tensors)"
    if use_torch:
        steps[torch_label] = case.torch(arrays(sizes, 4, 0.5), arrays(sizes, 5, 0.01))
    # The overhead is a difference of two ~1.5 ms times on a machine whose bandwidth drifts by
    # 10%: more repeats than elsewhere.
    seconds = compare(steps, max(repeats, 15))
    separate, one = seconds["optkern (300 arrays)"], seconds["optkern (one FlatParams block)"]
    out: Dict[str, object] = {
        "optimizer": case.label,
        "buffers": len(sizes),
        "elements": int(sum(sizes)),
        "seconds": seconds,
        "overhead_per_buffer_us": (separate - one) / len(sizes) * 1e6,
    }
    if use_torch:
        out["speedup_vs_torch"] = seconds[torch_label] / separate
        out["torch_impl"] = case.torch_impl
    return out


def run_clip(n: int, repeats: int, progress: Progress) -> Dict[str, object]:
    """Adam with clipping fused into the step against clip_grad_norm_ followed by step, with
    clipping active on every step of both (as with fresh, too-large gradients each step)."""
    progress(f"fused clipping at {size_label(n)}")
    g_fused, g_pair = arrays([n], 8, 1.0), arrays([n], 8, 1.0)
    fused_opt, pair_opt = ok.Adam(arrays([n], 9, 0.5)), ok.Adam(arrays([n], 9, 0.5))
    # The fused step leaves its gradients as they are, so a limit far below their norm (~sqrt(n))
    # clips every time. clip_grad_norm_ rewrites its gradients to the limit, after which they
    # would no longer need clipping: its limit is half their current norm, every time.
    norm = [float(np.sqrt(n))]

    def pair() -> None:
        total = ok.clip_grad_norm_(g_pair, 0.5 * norm[0])
        norm[0] = 0.5 * total  # their norm now
        pair_opt.step(g_pair)

    seconds = compare(
        {"fused": lambda: fused_opt.step(g_fused, max_grad_norm=1.0), "clip_grad_norm_ + step": pair},
        repeats,
    )
    return {
        "size": n,
        "seconds": seconds,
        "speedup": seconds["clip_grad_norm_ + step"] / seconds["fused"],
    }


# -- output ----------------------------------------------------------------------------------------


def write_json(path: str, result: Dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)


def write_plot(path: str, rows: List[Dict[str, object]]) -> Optional[str]:
    """Time per step against size, one panel per optimizer; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = list(dict.fromkeys(r["optimizer"] for r in rows))
    cols = min(4, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        mine = [r for r in rows if r["optimizer"] == key]
        sizes = [r["size"] for r in mine]
        for impl, style in [("optkern", "o-"), ("numpy", "s--"), ("torch", "^:")]:
            if impl in mine[0]:
                ax.loglog(sizes, [r[impl]["seconds"] for r in mine], style, label=impl)
        stream = [r["bytes_per_element"] * r["size"] / (r["stream_gbps"] * 1e9) for r in mine]
        ax.loglog(sizes, stream, "k-", lw=0.8, alpha=0.5, label="bandwidth limit")
        ax.set_title(mine[0]["label"])
        ax.set_xlabel("elements")
        ax.set_ylabel("seconds per step")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
