"""The precision study's peers (optkern/benchmark/precision_peers.py): other libraries' 8-bit and
bfloat16 Adam, timed beside optkern's. A peer whose package is missing is a line of the study,
not a failure; one that imports is timed, interleaved with optkern's rows after its warm-up steps,
on its quantised path, and computes Adam's step (so the study does not time a broken path)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from optkern import _lowbits
from optkern.benchmark import precision_peers, runner, studies

N = 256 * 64  # torchao quantises only whole blocks of 256, at least 4096 elements

OPTKERN_ROWS = ["optkern f32", "optkern f32, bf16 state", "optkern f32, int8 state"]
if _lowbits.BFLOAT16 is not None:
    OPTKERN_ROWS += [
        "optkern bf16, bf16 state",
        "optkern bf16, bf16 state, SR",
        "optkern bf16, int8 state",
    ]

# Warnings torch 2.13 gives while torch.compile compiles torchao's step, not about the step: the
# first compile in a process imports torch.utils.mkldnn, which uses the deprecated
# torch.jit.script_method; AOT autograd's cache asks torchao's 8-bit state for a hash it lacks.
COMPILE_WARNINGS = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:OptimState8bit does not implement _stable_hash_for_caching"),
]


def compiles(test):
    for mark in COMPILE_WARNINGS:
        test = mark(test)
    return test


def peers_of(package):
    return [p for p in precision_peers.PEERS if p.package == package]


def test_every_peer_is_compared_with_a_row_of_the_study():
    """Each peer's ratio needs its optkern row; where ml_dtypes is installed, every one has it."""
    assert {p.package for p in precision_peers.PEERS} == {"bitsandbytes", "torchao"}
    if _lowbits.BFLOAT16 is not None:
        assert {p.compared_with for p in precision_peers.PEERS} <= set(OPTKERN_ROWS)
    assert len({p.label for p in precision_peers.PEERS}) == len(precision_peers.PEERS)


def test_a_peer_that_does_not_import_is_a_line_of_the_study(monkeypatch):
    missing = dataclasses.replace(
        precision_peers.PEERS[1],
        label="nowhere AdamW8bit",
        package="optkern_no_such_package",
        make=lambda n: pytest.fail("a peer that does not import is not made"),
    )
    monkeypatch.setattr(precision_peers, "PEERS", [missing])
    r = studies.precision(2, n=N)
    assert [row["case"] for row in r["rows"] if row["case"].startswith("optkern")] == OPTKERN_ROWS
    assert "nowhere AdamW8bit" not in [row["case"] for row in r["rows"]]
    assert "  nowhere AdamW8bit: not measured: optkern_no_such_package does not import" in r["text"]
    assert r["peers"]["nowhere AdamW8bit"]["skipped"].startswith("optkern_no_such_package")
    assert missing.ratio not in r["ratios"]
    assert "int8 state vs f32" in r["ratios"] and "lr 1e-3, no weight decay" in r["text"]


class CountingOptimizer:
    def __init__(self, n):
        self.n, self.steps = n, 0

    def step(self):
        self.steps += 1


def test_a_peer_off_its_low_precision_path_is_not_timed():
    """torchao keeps float32 state for a tensor that is not whole blocks of 256, or is under 4096
    elements: a peer whose state comes out larger than its form's is a line, not a row. Its
    elements are rounded down to its whole blocks."""
    made = []

    def make(n):
        made.append(CountingOptimizer(n))
        return made[-1]

    peer = dataclasses.replace(
        precision_peers.PEERS[1], package="numpy", make=make, state_bytes=lambda opt: 8.0
    )
    why = precision_peers.prepare(peer, N + 100)
    assert why == (
        f"its state is 8.000 bytes per parameter at {N} elements, over the 2.1 of the form it is "
        "meant to time"
    )
    assert made[0].n == N and made[0].steps == peer.warmup_steps == 2
    assert precision_peers.prepare(peer, 255) == "not one whole block of 256 elements"
    assert len(made) == 1
    ready = precision_peers.prepare(dataclasses.replace(peer, state_bytes=lambda o: 2.03), N + 100)
    assert ready.n == N and ready.state_bytes == 2.03 and len(ready.warmup_seconds) == 2
    assert f"; {N} elements (whole blocks); 2 warm-up steps not timed (first " in (
        precision_peers.describe(ready, 3, 9)
    )


def test_slow_steps_run_in_fewer_rounds_spread_out_and_shuffled_in():
    calls = []
    steps = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    times = runner.shuffled_times(steps, 9, fewer={"d": 3, "c": 9})
    assert [len(times[k]) for k in "abcd"] == [9, 9, 9, 3]
    rounds, i = [], 0
    while i < len(calls):
        size = 4 if len(rounds) in (2, 5, 8) else 3  # d in one round of each third of the run
        rounds.append(calls[i : i + size])
        i += size
    assert [sorted(r) for r in rounds] == [list("abcd") if "d" in r else list("abc") for r in rounds]
    assert [j for j, r in enumerate(rounds) if "d" in r] == [2, 5, 8]


def test_a_peer_with_slow_steps_is_timed_in_fewer_rounds():
    def ready(seconds):
        return precision_peers.Ready(precision_peers.PEERS[0], "0", N, lambda: None, 2.0, seconds)

    assert precision_peers.timed_rounds(ready([30.0, 0.5]), 9) == 9
    assert precision_peers.timed_rounds(ready([30.0, 2.0]), 9) == 5
    assert precision_peers.timed_rounds(ready([30.0, 60.0]), 9) == precision_peers.MIN_REPEATS
    assert precision_peers.timed_rounds(ready([60.0]), 2) == 2


def adam_against_torch(peer, scale):
    """Ten steps of the peer's optimizer and of torch.optim.AdamW (weight_decay=0, float32) from
    the same start on the same gradients: the displacements of both."""
    import torch

    opt = peer.make(N)
    (p,) = opt.param_groups[0]["params"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        p.copy_(torch.randn(N, generator=gen) * scale)
    start = p.detach().float().clone()
    q = torch.nn.Parameter(start.clone())
    ref = torch.optim.AdamW([q], lr=1e-3, weight_decay=0.0)
    for k in range(10):
        g = (torch.randn(N, generator=gen) * 1e-3 * (1 + k)).to(p.dtype)
        p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
    return (p.detach().float() - start).numpy(), (q.detach() - start).numpy(), opt


@pytest.mark.oracle
@compiles
@pytest.mark.parametrize("package", ["bitsandbytes", "torchao"])
def test_the_8bit_peers_take_adams_step_on_int8_state(package):
    """A few steps on a small tensor: close to torch's float32 AdamW, not equal (8-bit state)."""
    pytest.importorskip(package)
    (peer,) = [p for p in peers_of(package) if p.bytes_per_element == 16 + 16 / 256]
    moved, ref, opt = adam_against_torch(peer, 1.0)
    assert peer.state_bytes(opt) == pytest.approx(2 + 8 / 256)  # quantised, not float32
    err = np.linalg.norm(moved - ref) / np.linalg.norm(ref)
    assert 1e-4 < err < 0.05, err
    # not whole blocks (as 50M elements are not): still timed on int8 state
    ready = precision_peers.prepare(peer, N + 100)
    assert isinstance(ready, precision_peers.Ready), ready
    assert ready.n == N + 100 - 100 * (package == "torchao")
    assert ready.state_bytes == pytest.approx(2 + 8 / 256, abs=1e-3)


@pytest.mark.oracle
@compiles
def test_torchaos_bfloat16_adamw_rounds_stochastically():
    """Every element at 1.0 and the same gradient every step: Adam moves each by lr, a quarter of
    bfloat16's spacing below 1, so rounding to nearest never moves it and stochastic rounding
    moves it by lr on average."""
    pytest.importorskip("torchao")
    import torch

    (peer,) = [p for p in peers_of("torchao") if p.bytes_per_element == 14]
    opt = peer.make(N)
    (p,) = opt.param_groups[0]["params"]
    assert p.dtype == torch.bfloat16
    with torch.no_grad():
        p.fill_(1.0)
    p.grad = torch.full((N,), 1e-3, dtype=torch.bfloat16)
    for _ in range(10):
        opt.step()
    assert peer.state_bytes(opt) == 4.0  # bfloat16 moments
    assert float(p.detach().float().mean()) == pytest.approx(1 - 10 * 1e-3, abs=5e-4)
    assert len(torch.unique(p)) > 1
    moved, ref, _ = adam_against_torch(peer, 0.01)  # where bfloat16's spacing is below the step
    assert np.linalg.norm(moved - ref) / np.linalg.norm(ref) < 0.05


@pytest.mark.oracle
@compiles
def test_the_precision_study_times_torchao_when_it_imports(monkeypatch):
    pytest.importorskip("torchao")
    monkeypatch.setattr(precision_peers, "PEERS", peers_of("torchao"))
    r = studies.precision(3, n=N + 100)  # not whole blocks of 256, as 50M is not
    rows = {row["case"]: row for row in r["rows"]}
    int8, bf16 = precision_peers.PEERS
    assert r["peers"][int8.label]["elements"] == N  # rounded down: int8 state, not float32
    assert r["peers"][bf16.label]["elements"] == N + 100
    assert rows[int8.label]["state_bytes"] == pytest.approx(2 + 8 / 256)
    assert rows[bf16.label]["state_bytes"] == 4.0
    assert r["ratios"]["torchao 8-bit / optkern f32+int8"] > 0
    assert r["ratios"]["torchao bf16 SR / optkern bf16+bf16 SR"] > 0
    assert "torchao 8-bit / optkern f32+int8: x = " in r["text"]
    assert "torchao.optim.AdamW8bit(weight_decay=0): Adam's step" in r["text"]
    for peer in (int8, bf16):
        assert len(r["peers"][peer.label]["warmup_seconds"]) == peer.warmup_steps == 2
        assert r["peers"][peer.label]["timed_rounds"] == 3
        assert "warm-up steps not timed" in r["text"]
