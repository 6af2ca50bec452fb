"""Array helpers shared by the tests."""

from __future__ import annotations

import hashlib
from typing import Iterable, List

import numpy as np


def unaligned(values: np.ndarray, misalign: int = 4) -> np.ndarray:
    """A writeable float32 copy of ``values`` whose data starts ``misalign`` bytes past a 64-byte
    boundary (still 4-byte aligned, as float32 needs)."""
    values = np.asarray(values, dtype=np.float32)
    raw = np.empty(values.nbytes + 128, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + misalign
    out = raw[start : start + values.nbytes].view(np.float32).reshape(values.shape)
    out[...] = values
    assert values.size == 0 or out.ctypes.data % 64 == misalign
    return out


def aligned(values: np.ndarray) -> np.ndarray:
    """A float32 copy of ``values`` starting on a 64-byte boundary."""
    return unaligned(values, misalign=0)


def make(values: np.ndarray, layout: str) -> np.ndarray:
    return aligned(values) if layout == "aligned" else unaligned(values)


def bits(a: np.ndarray) -> bytes:
    """The exact bytes of an array (NaNs compare equal by bit pattern)."""
    return np.ascontiguousarray(a).tobytes()


def digest(arrays: Iterable) -> str:
    """One hash over a list of arrays and nested state dicts, for 'nothing changed' checks."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, np.ndarray):
            h.update(str((x.dtype, x.shape)).encode())
            h.update(bits(x))
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    feed(list(arrays))
    return h.hexdigest()


def gradient_sequence(size: int, steps: int, seed: int, scale: float = 1.0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(size) * scale).astype(np.float32) for _ in range(steps)]


#: Sizes of the thread tests' tensors: vector bodies and tails, one split across threads, an
#: empty tensor, one of 64 elements.
THREAD_TEST_SIZES = [1023, 100003, 17, 5000, 0, 64]


def step_bits(name: str, hp: dict, threads: int, min_per_thread: int, steps: int, seed: int):
    """The bits of every parameter and state array after ``steps`` steps of ``optkern.<name>``
    over tensors of THREAD_TEST_SIZES (aligned and unaligned by turns), on ``threads`` threads
    with the given per-thread threshold: results to compare across thread counts and backends."""
    import optkern as ok

    ok.set_num_threads(threads)
    ok._core._testing.set_min_elements_per_thread(min_per_thread)
    rng = np.random.default_rng(seed)
    params = [
        make(rng.standard_normal(n), "unaligned" if i % 2 else "aligned")
        for i, n in enumerate(THREAD_TEST_SIZES)
    ]
    opt = getattr(ok, name)(params, **hp)
    for _ in range(steps):
        opt.step([rng.standard_normal(n).astype(np.float32) for n in THREAD_TEST_SIZES])
    return [bits(p) for p in params] + [
        bits(v)
        for p in params
        if p in opt.state
        for v in opt.state[p].values()
        if isinstance(v, np.ndarray)
    ]


def step_from_threads(opt, grads, threads: int, steps: int) -> None:
    """``steps`` steps of ``opt`` from each of ``threads`` Python threads started together, each
    stepping with its own copies of ``grads``."""
    import threading

    barrier = threading.Barrier(threads)

    def run():
        mine = [x.copy() for x in grads]
        barrier.wait()
        for _ in range(steps):
            opt.step(mine)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
