"""A/B of optkern's parallel backends with torch in the process: optkern's own pool against
"gomp" (optkern's chunks on torch's own OpenMP team, docs/threading.md), beside torch.optim.

One process, torch as installed (no OMP_WAIT_POLICY). For the step alone (1M and 50M elements)
and the training loop of ``python -m optkern bench --torch`` it times torch's fastest path,
okt on the pool and okt on the gomp backend, interleaved repeat by repeat in a rotating order
(each follows each of the others as often), medians over repeats.

    python bench/gomp_ab.py                # REPEATS=5 SIZES=1m,50m LOOP=1 NAMES=all
    REPEATS=9 SIZES=1m LOOP=0 NAMES=SGD,Adam python bench/gomp_ab.py

Results: docs/torch.md, "optkern's chunks on torch's OpenMP team".
"""

import copy
import os
import statistics
import time

import torch

import optkern.torch as okt
from optkern import _core
from optkern.benchmark.torch_bench import CONFIGS, _mlp


def median_multi(variants, repeats, inner):
    """variants: name -> (backend, fn). Median seconds per call of each fn, the backend set
    before each block (outside the timing), the order rotated every repeat."""
    names = list(variants)
    out = {k: [] for k in names}
    for k in names:  # warm-up: state allocation, first touch
        _core.set_parallel_backend(variants[k][0])
        variants[k][1]()
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        if (r // len(names)) % 2:
            order = order[::-1]
        for k in order:
            backend, f = variants[k]
            _core.set_parallel_backend(backend)
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            out[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in out.items()}


def steps(names, sizes, repeats):
    for n in sizes:
        for name in names:
            impl, hp = CONFIGS[name]
            gen = torch.Generator().manual_seed(0)
            p0 = torch.randn(n, generator=gen)
            grad = torch.randn(n, generator=gen) * 1e-3
            pt, pa, pb = (torch.nn.Parameter(p0.clone()) for _ in range(3))
            pt.grad, pa.grad, pb.grad = grad.clone(), grad.clone(), grad.clone()
            ot = getattr(torch.optim, name)([pt], **impl, **hp)
            oa = getattr(okt, name)([pa], **hp)
            ob = getattr(okt, name)([pb], **hp)
            inner = max(1, int(2_000_000 // n))
            m = median_multi(
                {"torch": ("pool", ot.step), "pool": ("pool", oa.step), "gomp": ("gomp", ob.step)},
                repeats,
                inner,
            )
            assert torch.equal(pa, pb), "backends must give bit-identical results"
            yield name, f"{n // 1_000_000}M", next(iter(impl)), m


def loops(names, repeats, iters=20):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 784, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    for name in names:
        impl, hp = CONFIGS[name]
        mt = _mlp(0)
        ma, mb = copy.deepcopy(mt), copy.deepcopy(mt)
        ot = getattr(torch.optim, name)(mt.parameters(), **impl, **hp)
        oa = getattr(okt, name)(ma.parameters(), **hp)
        ob = getattr(okt, name)(mb.parameters(), **hp)

        def loop(model, opt):
            def one():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            return one

        m = median_multi(
            {
                "torch": ("pool", loop(mt, ot)),
                "pool": ("pool", loop(ma, oa)),
                "gomp": ("gomp", loop(mb, ob)),
            },
            repeats,
            iters,
        )
        yield name, "loop", next(iter(impl)), m


def main():
    repeats = int(os.environ.get("REPEATS", "5"))
    sizes = [int(float(s[:-1]) * 1_000_000) for s in os.environ.get("SIZES", "1m,50m").split(",")]
    names = os.environ.get("NAMES", ",".join(CONFIGS)).split(",")
    restore = _core.parallel_backend()[0]
    assert _core.set_parallel_backend("gomp") == "gomp", "torch's libgomp not found"
    print(
        f"torch {torch.__version__}, threads torch {torch.get_num_threads()} / optkern "
        f"{_core.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load {os.getloadavg()[0]:.1f}, repeats {repeats}; x = torch time / okt time"
    )
    print(
        f"{'':10} {'size':>5} {'torch path':>10} {'torch':>9} {'pool':>9} {'gomp':>9}"
        f" {'x pool':>7} {'x gomp':>7} {'gomp/pool':>9}"
    )
    rows = list(steps(names, sizes, repeats))
    if int(os.environ.get("LOOP", "1")):
        rows += list(loops(names, repeats))
    for name, size, path, m in rows:
        print(
            f"{name:10} {size:>5} {path:>10} {m['torch'] * 1e3:7.3f}ms {m['pool'] * 1e3:7.3f}ms "
            f"{m['gomp'] * 1e3:7.3f}ms {m['torch'] / m['pool']:7.2f} {m['torch'] / m['gomp']:7.2f}"
            f" {m['gomp'] / m['pool']:9.2f}"
        )
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    _core.set_parallel_backend(restore)


if __name__ == "__main__":
    main()
