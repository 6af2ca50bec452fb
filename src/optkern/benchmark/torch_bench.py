"""``python -m optkern bench --torch``: optkern.torch against torch.optim on the CPU.

Three measurements, each interleaving torch and optkern repeat by repeat and keeping medians:

* the optimizer step alone on one float32 parameter of 1M and 50M elements, against torch's
  fastest CPU path (``fused=True`` for SGD, Adam, AdamW and Adagrad, ``foreach=True`` otherwise);
* a whole training loop (autograd MLP of about 2M parameters, batch 64: zero_grad, forward,
  cross-entropy, backward, step), the number users feel;
* the per-parameter overhead of optkern.torch's Python side (views, checks) over many small
  parameters, against calling optkern.functional on the same arrays directly.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

#: name -> (torch kwargs for the fastest CPU path, shared hyperparameters)
CONFIGS: Dict[str, Tuple[Dict[str, Any], Dict[str, Any]]] = {
    "SGD": ({"fused": True}, {"lr": 0.01, "momentum": 0.9}),
    "Adam": ({"fused": True}, {"lr": 1e-3}),
    "AdamW": ({"fused": True}, {"lr": 1e-3}),
    "Adagrad": ({"fused": True}, {"lr": 0.01}),
    "RMSprop": ({"foreach": True}, {"lr": 1e-3}),
    "Adadelta": ({"foreach": True}, {"lr": 1.0}),
}


def _median_pair(
    fa: Callable[[], None], fb: Callable[[], None], repeats: int, inner: int
) -> Tuple[float, float]:
    """Median seconds per call of fa and fb, timed alternately, the order swapped every repeat
    (a, b, b, a, a, b, ...): each follows the other as often, so neither always runs while
    torch's OpenMP workers still spin from the other's last op (docs/torch.md)."""
    ta: List[float] = []
    tb: List[float] = []
    fa()
    fb()  # warm-up: state allocation, first-touch of pages
    for r in range(repeats):
        pairs = ((fa, ta), (fb, tb))
        for f, out in pairs if r % 2 == 0 else pairs[::-1]:
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            out.append((time.perf_counter() - t0) / inner)
    return statistics.median(ta), statistics.median(tb)


def bench_steps(names: List[str], sizes: List[int], repeats: int) -> List[Dict[str, Any]]:
    import torch

    import optkern.torch as okt

    rows = []
    for n in sizes:
        for name in names:
            impl, hp = CONFIGS[name]
            gen = torch.Generator().manual_seed(0)
            p0 = torch.randn(n, generator=gen)
            grad = torch.randn(n, generator=gen) * 1e-3
            pt, po = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0)
            pt.grad, po.grad = grad.clone(), grad
            ot = getattr(torch.optim, name)([pt], **impl, **hp)
            oo = getattr(okt, name)([po], **hp)
            inner = max(1, int(2_000_000 // n))
            tt, to = _median_pair(ot.step, oo.step, repeats, inner)
            rows.append(
                {
                    "optimizer": name,
                    "size": n,
                    "torch_path": next(iter(impl)),
                    "torch_s": tt,
                    "okt_s": to,
                    "speedup": tt / to,
                }
            )
            del ot, oo, pt, po, p0, grad
    return rows


def _mlp(seed: int):
    import torch

    torch.manual_seed(seed)
    # 784*1024 + 1024 + 1024*1024 + 1024 + 1024*10 + 10 = 1,863,690 parameters
    return torch.nn.Sequential(
        torch.nn.Linear(784, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


def bench_loop(names: List[str], repeats: int, iters: int = 20) -> List[Dict[str, Any]]:
    import torch

    import optkern.torch as okt

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 784, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    rows = []
    for name in names:
        impl, hp = CONFIGS[name]
        mt = _mlp(0)
        mo = copy.deepcopy(mt)
        ot = getattr(torch.optim, name)(mt.parameters(), **impl, **hp)
        oo = getattr(okt, name)(mo.parameters(), **hp)

        def loop(model, opt):
            def one():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            return one

        tt, to = _median_pair(loop(mt, ot), loop(mo, oo), repeats, iters)
        nparams = sum(p.numel() for p in mt.parameters())
        rows.append(
            {
                "optimizer": name,
                "params": nparams,
                "torch_path": next(iter(impl)),
                "torch_s": tt,
                "okt_s": to,
                "speedup": tt / to,
            }
        )
    return rows


def bench_overhead(repeats: int, nparams: int = 200, size: int = 16) -> Dict[str, Any]:
    """okt.Adam's step over many tiny parameters, against optkern.functional.adam_ on the same
    memory: the difference per parameter is what the torch layer costs."""
    import torch

    import optkern.torch as okt
    from optkern import functional as F

    params = [torch.nn.Parameter(torch.zeros(size)) for _ in range(nparams)]
    grads = [torch.full((size,), 1e-3) for _ in range(nparams)]
    for p, g in zip(params, grads):
        p.grad = g
    opt = okt.Adam(params)
    opt.step()
    pv = [p.detach().numpy() for p in params]
    gv = [g.numpy() for g in grads]
    mv = [opt.state[p]["exp_avg"].numpy() for p in params]
    vv = [opt.state[p]["exp_avg_sq"].numpy() for p in params]
    count = [1]

    def direct():
        count[0] += 1
        F.adam_(pv, gv, mv, vv, step=count[0], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)

    def fresh_grads():  # zero_grad(set_to_none=True) + backward: new gradient tensors each step
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()

    t_okt, t_direct = _median_pair(opt.step, direct, repeats, 200)
    t_fresh, t_clone = _median_pair(fresh_grads, lambda: [g.clone() for g in grads], repeats, 200)
    topt = torch.optim.Adam(
        [torch.nn.Parameter(torch.zeros(size)) for _ in range(nparams)], fused=True
    )
    for p in topt.param_groups[0]["params"]:
        p.grad = torch.full((size,), 1e-3)
    t_torch, _ = _median_pair(topt.step, direct, repeats, 50)
    return {
        "params": nparams,
        "elements_each": size,
        "okt_s": t_okt,
        "functional_s": t_direct,
        "okt_fresh_grads_s": t_fresh - t_clone,
        "torch_fused_s": t_torch,
        "overhead_per_param_us": (t_okt - t_direct) / nparams * 1e6,
        "overhead_per_param_fresh_grads_us": (t_fresh - t_clone - t_direct) / nparams * 1e6,
    }


def run_torch(names: List[str], sizes: List[int], repeats: int, threads: int) -> Dict[str, Any]:
    import torch

    import optkern as ok

    torch.set_num_threads(threads)
    ok.set_num_threads(threads)
    return {
        "threads": threads,
        "torch": torch.__version__,
        "steps": bench_steps(names, sizes, repeats),
        "loop": bench_loop(names, repeats),
        "overhead": bench_overhead(repeats),
    }


def report_torch(res: Dict[str, Any]) -> None:
    print(
        f"\noptkern.torch against torch.optim {res['torch']} ({res['threads']} threads each); "
        "medians of interleaved repeats; x = torch time / optkern time"
    )
    print(f"\n{'step alone':<10} {'size':>6} {'torch path':>10} {'torch':>11} {'okt':>11} {'x':>6}")
    for r in res["steps"]:
        print(
            f"{r['optimizer']:<10} {_label(r['size']):>6} {r['torch_path']:>10} "
            f"{r['torch_s'] * 1e3:9.3f}ms {r['okt_s'] * 1e3:9.3f}ms {r['speedup']:6.2f}"
        )
    print(
        f"\n{'loop':<10} {'params':>9} {'torch path':>10} {'torch':>11} {'okt':>11} {'x':>6}"
        "   (MLP 784-1024-1024-10, batch 64, zero_grad+forward+backward+step)"
    )
    for r in res["loop"]:
        print(
            f"{r['optimizer']:<10} {r['params']:>9} {r['torch_path']:>10} "
            f"{r['torch_s'] * 1e3:9.3f}ms {r['okt_s'] * 1e3:9.3f}ms {r['speedup']:6.2f}"
        )
    o = res["overhead"]
    print(
        f"\nAdam over {o['params']} parameters of {o['elements_each']} elements: okt "
        f"{o['okt_s'] * 1e6:.1f} us (new grad tensors each step: "
        f"{o['okt_fresh_grads_s'] * 1e6:.1f} us), optkern.functional on the same memory "
        f"{o['functional_s'] * 1e6:.1f} us, torch fused {o['torch_fused_s'] * 1e6:.1f} us; "
        f"optkern.torch's overhead {o['overhead_per_param_us']:.2f} us per parameter "
        f"({o['overhead_per_param_fresh_grads_us']:.2f} us with new grad tensors)"
    )


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def main_cli(args: Any) -> int:
    from .cases import torch_available

    if torch_available() is None:
        raise SystemExit("--torch needs torch: pip install 'optkern[torch]'")
    import optkern as ok
    from .runner import machine, parse_size, write_json

    chosen = {o.lower().replace("-momentum", "") for o in args.optimizers}
    names = [n for n in CONFIGS if n.lower() in chosen] or list(CONFIGS)
    sizes = [parse_size(s) for s in (args.sizes if args.sizes_given else ["1m", "50m"])]
    threads = args.threads or ok.get_num_threads()
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores; optkern {info['optkern']} ({info['isa']})")
    res = run_torch(names, sizes, args.repeats, threads)
    res["machine"] = info
    report_torch(res)
    if args.json:
        write_json(args.json, res)
        print(f"JSON written to {args.json}")
    return 0


__all__ = ["CONFIGS", "run_torch", "report_torch", "main_cli"]
