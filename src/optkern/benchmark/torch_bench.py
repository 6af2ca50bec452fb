"""``python -m optkern bench --torch``: optkern.torch against torch.optim on the CPU.

Three measurements, each interleaving torch and optkern repeat by repeat and keeping medians:

* the optimizer step alone on one float32 parameter of 1M and 50M elements, against torch's
  fastest CPU path (``fused=True`` where torch's class takes it: SGD, Adam, AdamW, Adagrad;
  ``foreach=True`` otherwise), or the class's own reference package where torch.optim lacks it
  (Lion: lion-pytorch, LAMB: optax, Schedule-Free: schedulefree); a peer that is not installed
  leaves its cell blank with the reason;
* a whole training loop (autograd MLP of about 2M parameters, batch 64: zero_grad, forward,
  cross-entropy, backward, step), the number users feel;
* the per-parameter overhead of optkern.torch's Python side (views, checks) over many small
  parameters, against calling optkern.functional on the same arrays directly.

By default the six classes with a torch.optim counterpart that the first version covered run
(``ORIGINALS``: 3 minutes on a shared 2-core machine); ``--all`` runs every optkern.torch
class (about three times as long), ``--optimizers``
the ones named.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import registry
from .cases import CASES


#: The default run: the classes the main benchmark has a hand-written NumPy version of (the
#: first version's optimizers, ``cases.CASES``), in the registry's order, each against torch's
#: fused or foreach path.
ORIGINALS = [
    r.cls
    for r in registry.rules()
    if r.cls in {c.torch_name for c in CASES.values() if c.numpy is not None}
]

# The step cases repeat until they take about STEP_SECONDS (at least --repeats, at most
# MAX_REPEATS repeats): a 1M step takes under a millisecond, and 5 medians of it moved by 15%
# between runs on a noisy 2-core VM, where 41 agreed to a few percent (docs/torch.md). A 50M pair
# takes about 0.1 s, so --repeats 5 already fills it; the loops keep --repeats.
STEP_SECONDS = 0.5
MAX_REPEATS = 101


def _bench_hyper(rule: Any) -> Dict[str, Any]:
    """The hyperparameters both sides take in the benchmark: the defaults, with lr at most 0.1
    (Schedule-Free SGD's default 1.0 diverges on the benchmark's MLP); a rule that keeps no state
    at its defaults (SGD) has the option that makes one set (momentum 0.9), so that it is
    measured with a buffer like the others."""
    hp: Dict[str, Any] = {}
    lr = next(h.default for h in rule.hyper if h.name == "lr")
    if lr > 0.1:
        hp["lr"] = 0.1
    if rule.states and all(s.when is not None for s in rule.states):
        flag = next(h for h in rule.hyper if h.name == rule.states[0].when)
        hp[flag.torch] = True if flag.range == "flag" else 0.9
    return hp


#: optkern class (optkern.torch's of the same name) -> the hyperparameters both sides take in the
#: benchmark (``_bench_hyper``); a preset (Nesterov) runs at its own defaults.
HYPER: Dict[str, Dict[str, Any]] = {r.cls: _bench_hyper(r) for r in registry.rules()}


@dataclass(frozen=True)
class Peer:
    """What an optkern.torch class is compared with: ``cls`` (dotted: torch.optim.X or a
    package's class) built with the same hyperparameters (``rename`` maps them where the names
    differ) plus ``flags`` (torch's fused/foreach). ``impl`` labels the column. A peer that is
    not a torch optimizer (optax's LAMB) times the step alone, on the same memory."""

    cls: str
    impl: str
    flags: Tuple[Tuple[str, Any], ...] = ()
    rename: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    modules: Tuple[str, ...] = ("torch",)
    torch_optimizer: bool = True

    def missing(self, loop: bool = False) -> Optional[str]:
        """Why this peer cannot be measured here, else None (nothing is imported but torch)."""
        if not self.cls:
            return self.impl
        if loop and not self.torch_optimizer:
            return f"{self.cls} is not a torch optimizer (no training loop)"
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        if self.cls.startswith("torch.optim."):
            import torch

            if not hasattr(torch.optim, self.cls.rsplit(".", 1)[1]):
                return f"{self.cls} does not exist in torch {torch.__version__}"
        return None

    def make(self, params: Any, hp: Dict[str, Any]) -> Any:
        """The peer optimizer over torch ``params``, in train mode (Schedule-Free)."""
        module, name = self.cls.rsplit(".", 1)
        kwargs = dict(self.rename(hp) if self.rename else hp, **dict(self.flags))
        opt = getattr(importlib.import_module(module), name)(params, **kwargs)
        if module == "schedulefree":
            opt.train()  # the package starts in eval mode
        return opt

    def stepper(self, params: List[Any], hp: Dict[str, Any]) -> Callable[[], None]:
        """One step of the peer over ``params`` (each with its ``grad``)."""
        if self.torch_optimizer:
            return self.make(params, hp).step
        from .cases import _optax

        make = _optax(self.cls, hp.get("lr", 1e-3))
        return make([p.detach().numpy() for p in params], [p.grad.numpy() for p in params])


def _declared_peer(rule: Any) -> Peer:
    """The peer a rule declares (``registry.Rule.peer``): ``module.name``, its arguments
    optionally given as the class's own (``torch.optim.SGD(momentum=beta, dampening=beta)``:
    SGD's momentum and dampening take the class's beta; the other arguments are passed as they
    are, at their defaults when not given)."""
    from .cases import PEER_PACKAGES

    dotted, _, args = rule.peer.partition("(")
    rename = None
    if args:
        mapping = dict(a.strip().split("=") for a in args.rstrip(")").split(","))
        defaults = dict(rule.torch_args())

        def rename(hp, mapping=mapping, defaults=defaults):
            values = {**defaults, **hp}
            out = {k: v for k, v in values.items() if k not in mapping.values()}
            out.update((theirs, values[ours]) for theirs, ours in mapping.items())
            return out

    package = dotted.split(".")[0]
    if package == "torch":
        return Peer(dotted, *_torch_path(dotted.rsplit(".", 1)[1]), rename=rename)
    if package not in PEER_PACKAGES:
        return Peer("", f"no benchmark of {package}")
    impl, modules, is_torch = PEER_PACKAGES[package]
    return Peer(dotted, impl, rename=rename, modules=modules, torch_optimizer=is_torch)


def _torch_path(theirs: str) -> Tuple[str, Tuple[Tuple[str, Any], ...]]:
    """torch.optim's fastest CPU path of class ``theirs``: fused where it takes it, else foreach, else its
    single-tensor loop (SparseAdam, LBFGS)."""
    import torch

    takes = inspect.signature(getattr(torch.optim, theirs)).parameters
    impl = "fused" if "fused" in takes else "foreach" if "foreach" in takes else "single"
    return impl, ((impl, True),) if impl != "single" else ()


def peers() -> Dict[str, Peer]:
    """The peer of every optkern.torch class, in optkern.torch's order: torch.optim's class of
    the same algorithm, else the peer its rule declares."""
    import optkern.torch as okt

    out: Dict[str, Peer] = {}
    for name, rule in okt.RULES.items():
        theirs = rule.torch_name
        if theirs is not None:
            impl, flags = _torch_path(theirs)
            rename = None
            if theirs != name:  # Nesterov: torch's SGD with optkern's defaults and nesterov=True
                defaults = dict(rule.args)

                def rename(hp, defaults=defaults, fixed=rule.fixed):
                    return {**defaults, **hp, **fixed}

            out[name] = Peer(f"torch.optim.{theirs}", impl, flags, rename)
        elif rule.rule.peer is not None:
            out[name] = _declared_peer(rule.rule)
        else:
            out[name] = Peer("", "no peer known")
    return out


def _median_pair(
    fa: Callable[[], None],
    fb: Callable[[], None],
    repeats: int,
    inner: int,
    min_seconds: float = 0.0,
) -> Tuple[float, float]:
    """Median seconds per call of fa and fb, timed alternately, the order swapped every repeat
    (a, b, b, a, a, b, ...): each follows the other as often, so neither always runs while
    torch's OpenMP workers still spin from the other's last op (docs/torch.md).

    At least ``repeats`` repeats, more (up to MAX_REPEATS) until they take about
    ``min_seconds``: cheap cases get the samples a noisy machine needs for a stable median."""
    ta: List[float] = []
    tb: List[float] = []
    t0 = time.perf_counter()
    fa()
    fb()  # warm-up: state allocation, first-touch of pages
    once = (time.perf_counter() - t0) * inner  # about one repeat of both (warm-up is slower)
    if min_seconds > 0.0:
        repeats = max(repeats, min(MAX_REPEATS, math.ceil(min_seconds / max(once, 1e-9))))
    for r in range(repeats):
        pairs = ((fa, ta), (fb, tb))
        for f, out in pairs if r % 2 == 0 else pairs[::-1]:
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            out.append((time.perf_counter() - t0) / inner)
    return statistics.median(ta), statistics.median(tb)


def _median_one(f: Callable[[], None], repeats: int, inner: int) -> float:
    f()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        out.append((time.perf_counter() - t0) / inner)
    return statistics.median(out)


def _row(name: str, peer: Peer, why: Optional[str], tt: Optional[float], to: float) -> Dict:
    row: Dict[str, Any] = {"optimizer": name, "torch_path": peer.impl, "okt_s": to}
    if why is None and tt is not None:
        row.update(torch_s=tt, speedup=tt / to)
    else:
        row["torch_missing"] = why
    return row


def bench_steps(
    names: List[str],
    sizes: List[int],
    repeats: int,
    table: Optional[Dict[str, Peer]] = None,
    min_seconds: float = 0.0,
) -> List[Dict[str, Any]]:
    import torch

    import optkern.torch as okt

    table = table or peers()
    rows = []
    for n in sizes:
        for name in names:
            peer, hp = table[name], HYPER.get(name, {})
            why = peer.missing()
            gen = torch.Generator().manual_seed(0)
            p0 = torch.randn(n, generator=gen)
            grad = torch.randn(n, generator=gen) * 1e-3
            if okt.RULES[name].sparse_only:  # SparseAdam: a sparse gradient listing every row
                grad = grad.to_sparse()
            pt, po = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0)
            pt.grad, po.grad = grad.clone(), grad
            oo = getattr(okt, name)([po], **hp)
            inner = max(1, int(2_000_000 // n))
            if why is None:
                tt, to = _median_pair(peer.stepper([pt], hp), oo.step, repeats, inner, min_seconds)
            else:
                tt, to = None, _median_one(oo.step, repeats, inner)
            rows.append(dict(_row(name, peer, why, tt, to), size=n))
            del oo, pt, po, p0, grad
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


def bench_loop(
    names: List[str], repeats: int, iters: int = 20, table: Optional[Dict[str, Peer]] = None
) -> List[Dict[str, Any]]:
    import torch

    import optkern.torch as okt

    table = table or peers()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 784, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    rows = []
    for name in names:
        peer, hp = table[name], HYPER.get(name, {})
        why = peer.missing(loop=True)
        mt = _mlp(0)
        mo = copy.deepcopy(mt)
        oo = getattr(okt, name)(mo.parameters(), **hp)

        def loop(model, opt):
            def one():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            return one

        if why is None:
            ot = peer.make(list(mt.parameters()), hp)
            tt, to = _median_pair(loop(mt, ot), loop(mo, oo), repeats, iters)
        else:
            tt, to = None, _median_one(loop(mo, oo), repeats, iters)
        nparams = sum(p.numel() for p in mt.parameters())
        rows.append(dict(_row(name, peer, why, tt, to), params=nparams))
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
        "steps": bench_steps(names, sizes, repeats, min_seconds=STEP_SECONDS),
        "loop": bench_loop(names, repeats),
        "overhead": bench_overhead(repeats),
    }


def _cells(r: Dict[str, Any]) -> str:
    if "torch_s" in r:
        return f"{r['torch_s'] * 1e3:9.3f}ms {r['okt_s'] * 1e3:9.3f}ms {r['speedup']:6.2f}"
    return f"{'':>11} {r['okt_s'] * 1e3:9.3f}ms {'':>6}  ({r['torch_missing']})"


def report_torch(res: Dict[str, Any]) -> None:
    print(
        f"\noptkern.torch against torch.optim {res['torch']} ({res['threads']} threads each), or "
        "the class's reference package; medians of interleaved repeats (the step alone: "
        f"--repeats or more, about {STEP_SECONDS} s a case); x = peer time / optkern time"
    )
    print(f"\n{'step alone':<18} {'size':>6} {'peer':>8} {'peer':>11} {'okt':>11} {'x':>6}")
    for r in res["steps"]:
        print(f"{r['optimizer']:<18} {_label(r['size']):>6} {r['torch_path']:>8} {_cells(r)}")
    print(
        f"\n{'loop':<18} {'params':>9} {'peer':>8} {'peer':>11} {'okt':>11} {'x':>6}"
        "   (MLP 784-1024-1024-10, batch 64, zero_grad+forward+backward+step)"
    )
    for r in res["loop"]:
        print(f"{r['optimizer']:<18} {r['params']:>9} {r['torch_path']:>8} {_cells(r)}")
    o = res["overhead"]
    print(
        f"\nAdam over {o['params']} parameters of {o['elements_each']} elements: okt "
        f"{o['okt_s'] * 1e6:.1f} us (new grad tensors each step: "
        f"{o['okt_fresh_grads_s'] * 1e6:.1f} us), optkern.functional on the same memory "
        f"{o['functional_s'] * 1e6:.1f} us, torch fused {o['torch_fused_s'] * 1e6:.1f} us; "
        f"optkern.torch's overhead {o['overhead_per_param_us']:.2f} us per parameter "
        f"({o['overhead_per_param_fresh_grads_us']:.2f} us with new grad tensors)"
    )
    left = res.get("not_run") or []
    if left:
        print(f"\nNot run: {', '.join(left)} (--all runs every optkern.torch class)")


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def select(optimizers: Optional[List[str]], every: bool) -> List[str]:
    """The optkern.torch classes to run: every one (``--all``), the ones ``--optimizers`` names
    (optkern.torch class names, or the main benchmark's keys: ``nadam``, ``sgd-momentum``, ...),
    else ``ORIGINALS``."""
    import optkern as ok
    import optkern.torch as okt

    classes = list(okt.RULES)
    if every:
        return classes
    if not optimizers:
        return list(ORIGINALS)
    by_key = {n.lower(): n for n in classes}
    by_key.update({r.name: r.cls for r in ok.registry.rules() if r.cls in okt.RULES})
    by_key.update({k: c.torch_name for k, c in CASES.items() if k not in by_key})
    chosen = set()
    for o in optimizers:
        if o.lower() not in by_key:
            raise SystemExit(f"--torch: no optkern.torch class {o!r}; one of {', '.join(classes)}")
        chosen.add(by_key[o.lower()])
    return [n for n in classes if n in chosen]


def main_cli(args: Any) -> int:
    from .cases import torch_available

    if torch_available() is None:
        raise SystemExit("--torch needs torch: pip install 'optkern[torch]'")
    import optkern as ok
    from .runner import machine, parse_size, write_json

    given = getattr(args, "optimizers_given", True)
    names = select(args.optimizers if given else None, getattr(args, "all", False))
    sizes = [parse_size(s) for s in (args.sizes if args.sizes_given else ["1m", "50m"])]
    threads = args.threads or ok.get_num_threads()
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores; optkern {info['optkern']} ({info['isa']})")
    res = run_torch(names, sizes, args.repeats, threads)
    res["machine"] = info
    res["not_run"] = [n for n in peers() if n not in names]
    report_torch(res)
    if args.json:
        write_json(args.json, res)
        print(f"JSON written to {args.json}")
    return 0


__all__ = ["ORIGINALS", "HYPER", "Peer", "peers", "select", "run_torch", "report_torch", "main_cli"]
