"""Other libraries' low-precision Adam on the CPU, which the precision study (studies.precision)
times beside optkern's: bitsandbytes' 8-bit Adam, torchao's 8-bit AdamW and torchao's AdamW on
bfloat16 parameters with stochastic rounding, each where its package is installed (a line of
the study says which is not).

Each is set up like the optkern row it is compared with: the same elements, the same
hyperparameters (lr 1e-3, betas (0.9, 0.999), eps 1e-8) and no weight decay: torchao's AdamW
with ``weight_decay=0`` takes Adam's step, as optkern's Adam rows do.

They take from a fraction of a second to seconds a step on the CPU, and torchao's step is
compiled by torch.compile on its first call (tens of seconds). So each takes its warm-up steps
before the study's timed rounds start (their times are reported, not counted), and a peer whose
warm step is slow is timed in fewer of the rounds, spread among them (runner.shuffled_times'
``fewer``): still interleaved with every other row.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import time
from typing import Any, Callable, Dict, List, Tuple, Union

#: a peer's timed steps take about this long in one run, and at least MIN_REPEATS of them
PEER_SECONDS = 10.0
MIN_REPEATS = 3


#: bytes of 8-bit state per parameter, at most: two moments of uint8 codes and a float32 scale a
#: block of 256 (2.031, and a partial last block's scale); float32 state is 8
EIGHT_BIT = 2.1


@dataclasses.dataclass(frozen=True)
class Peer:
    label: str  # the study's row
    package: str  # the module whose absence skips the peer
    compared_with: str  # the optkern row doing the same arithmetic on the same bytes
    ratio: str  # the label of x = this peer's time / that row's
    bytes_per_element: float  # bytes moved per element by one step (the study's convention)
    warmup_steps: int  # untimed steps first: state allocated, the step compiled
    setup: str  # how it is made like for like (printed with the results)
    # the bytes of state per parameter of the path it is meant to time: more, and it is not timed
    state_bytes_at_most: float
    # n -> the optimizer, over one parameter of n elements whose .grad is set
    make: Callable[[int], Any]
    # the optimizer -> its state's bytes per parameter
    state_bytes: Callable[[Any], float]
    # its parameter's elements are a multiple of this (n rounded down): torchao keeps float32
    # state for a tensor that is not whole blocks
    whole_blocks: int = 1


@dataclasses.dataclass
class Ready:
    """A peer whose package imported, warmed up and ready to time."""

    peer: Peer
    version: str
    n: int
    step: Callable[[], Any]
    state_bytes: float
    warmup_seconds: List[float]


def _parameter(n: int, dtype: Any) -> Any:
    import torch

    p = torch.nn.Parameter(torch.randn(n).to(dtype))
    p.grad = (torch.randn(n) * 1e-3).to(dtype)
    return p


def _the_state(opt: Any) -> Tuple[Dict[str, Any], int]:
    (p,) = opt.param_groups[0]["params"]
    return opt.state[p], p.numel()


def _bitsandbytes_adam8bit(n: int) -> Any:
    import bitsandbytes as bnb
    import torch

    return bnb.optim.Adam8bit([_parameter(n, torch.float32)], lr=1e-3, min_8bit_size=0)


def _bitsandbytes_state_bytes(opt: Any) -> float:
    # the codes and the absmax per block; the two 256-entry maps are the optimizer's constants
    state, n = _the_state(opt)
    return sum(state[k].nbytes for k in ("state1", "state2", "absmax1", "absmax2")) / n


def _torchao_adamw8bit(n: int) -> Any:
    import torch
    from torchao.optim import AdamW8bit

    # torchao quantises a tensor of at least 4096 elements that are whole blocks of 256, and keeps
    # any other in float32; weight_decay=0: Adam's step
    return AdamW8bit([_parameter(n, torch.float32)], lr=1e-3, weight_decay=0.0)


def _torchao_adamw_bf16_sr(n: int) -> Any:
    import torch
    from torchao.optim import _AdamW

    # state in the parameter's dtype (bfloat16), the parameter rounded stochastically
    p = _parameter(n, torch.bfloat16)
    return _AdamW([p], lr=1e-3, weight_decay=0.0, bf16_stochastic_round=True)


def _torchao_state_bytes(opt: Any) -> float:
    def nbytes(t: Any) -> int:
        # OptimState8bit: uint8 codes and a float32 scale per block (its 256-entry map is a constant)
        return t.codes.nbytes + t.scale.nbytes if hasattr(t, "codes") else t.nbytes

    state, n = _the_state(opt)
    return sum(nbytes(state[k]) for k in ("exp_avg", "exp_avg_sq")) / n


PEERS = [
    Peer(
        label="bitsandbytes Adam8bit f32",
        package="bitsandbytes",
        compared_with="optkern f32, int8 state",
        ratio="bitsandbytes 8-bit / optkern f32+int8",
        bytes_per_element=16 + 16 / 256,
        warmup_steps=1,
        setup="bitsandbytes.optim.Adam8bit(min_8bit_size=0), float32 parameter",
        state_bytes_at_most=EIGHT_BIT,
        make=_bitsandbytes_adam8bit,
        state_bytes=_bitsandbytes_state_bytes,
    ),
    Peer(
        label="torchao AdamW8bit f32, wd 0",
        package="torchao",
        compared_with="optkern f32, int8 state",
        ratio="torchao 8-bit / optkern f32+int8",
        bytes_per_element=16 + 16 / 256,
        warmup_steps=2,
        setup="torchao.optim.AdamW8bit(weight_decay=0): Adam's step, like optkern's Adam rows "
        "(no weight decay); float32 parameter, int8 state in blocks of 256",
        state_bytes_at_most=EIGHT_BIT,
        make=_torchao_adamw8bit,
        state_bytes=_torchao_state_bytes,
        whole_blocks=256,
    ),
    Peer(
        label="torchao AdamW bf16 SR, wd 0",
        package="torchao",
        compared_with="optkern bf16, bf16 state, SR",
        ratio="torchao bf16 SR / optkern bf16+bf16 SR",
        bytes_per_element=14,
        warmup_steps=2,
        setup="torchao.optim._AdamW(weight_decay=0, bf16_stochastic_round=True): bfloat16 "
        "parameter, gradient and state, the parameter rounded stochastically",
        state_bytes_at_most=4,
        make=_torchao_adamw_bf16_sr,
        state_bytes=_torchao_state_bytes,
    ),
]


def prepare(peer: Peer, n: int) -> Union[Ready, str]:
    """The peer set up at n elements (rounded down to its whole blocks) and warmed up, or why it
    is not measured: its package does not import, or its state is not the low-precision form it
    is meant to time (torchao's below 4096 elements). Other errors are the peer's failures and
    propagate."""
    try:
        module = importlib.import_module(peer.package)
    except ImportError as exc:
        return f"{peer.package} does not import ({exc})"
    n -= n % peer.whole_blocks
    if n == 0:
        return f"not one whole block of {peer.whole_blocks} elements"
    opt = peer.make(n)
    warmup = []
    for _ in range(peer.warmup_steps):
        t0 = time.perf_counter()
        opt.step()
        warmup.append(time.perf_counter() - t0)
    state_bytes = peer.state_bytes(opt)
    if state_bytes > peer.state_bytes_at_most:
        return (
            f"its state is {state_bytes:.3f} bytes per parameter at {n} elements, over the "
            f"{peer.state_bytes_at_most:g} of the form it is meant to time"
        )
    version = getattr(module, "__version__", "?")
    return Ready(peer, version, n, opt.step, state_bytes, warmup)


def timed_rounds(ready: Ready, repeats: int) -> int:
    """In how many of the study's rounds a peer is timed: every round, unless its last warm-up
    step says that would take over PEER_SECONDS (then fewer, at least MIN_REPEATS)."""
    fit = math.floor(PEER_SECONDS / max(ready.warmup_seconds[-1], 1e-9))
    return min(repeats, max(MIN_REPEATS, fit))


def describe(ready: Ready, rounds: int, repeats: int) -> str:
    first, *rest = ready.warmup_seconds
    after = "".join(f", then {t:.2f} s" for t in rest)
    return (
        f"  {ready.peer.label}: {ready.peer.package} {ready.version}; {ready.peer.setup}; "
        f"{ready.n} elements{' (whole blocks)' if ready.peer.whole_blocks > 1 else ''}; "
        f"{len(ready.warmup_seconds)} warm-up step{'s' if rest else ''} not timed "
        f"(first {first:.2f} s{after}); "
        f"timed in {rounds} of the {repeats} rounds"
    )


def as_json(ready: Ready, rounds: int) -> Dict[str, Any]:
    return {
        "package": ready.peer.package,
        "version": ready.version,
        "setup": ready.peer.setup,
        "compared_with": ready.peer.compared_with,
        "elements": ready.n,
        "warmup_seconds": ready.warmup_seconds,
        "timed_rounds": rounds,
    }
