"""The training-loop study of `python -m optkern bench` at tiny sizes: it runs, writes every row
and field, kills its busy neighbour whatever happens, and works without torch. No timing is
asserted (this is a check of the benchmark's plumbing, not a benchmark)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from optkern.__main__ import main
from optkern.benchmark import loops
from optkern.benchmark.cases import CASES

TINY = ["12-8-4", "16-8-8-3"]
SUMMARY = [
    "loop_numpy",
    "loop_optkern",
    "loop_optkern_1t",
    "loop_ratio",
    "loop_ratio_1t",
    "default_vs_1t",
    "update_numpy_in_loop",
    "update_in_loop",
    "update_in_loop_1t",
    "update_alone",
    "update_ratio",
    "fwd_bwd_no_update",
    "fwd_bwd_numpy",
    "fwd_bwd_optkern",
    "fwd_bwd_optkern_1t",
    "fwd_bwd_ratio",
]


def _gone(pid: int) -> bool:
    """Killed and reaped (a pid still there, even as a zombie, was not cleaned up)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_loops_study_every_row_and_field(tmp_path, capsys):
    out = tmp_path / "loops.json"
    assert (
        main(
            [
                "bench",
                "--loops",
                "--loop-sizes",
                *TINY,
                "--programs",
                "none",
                "--loop-steps",
                "2",
                "--rounds",
                "2",
                "--loop-conditions",
                "quiet",
                "busy",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "Inside a training loop" in text and "targets:" in text
    for label in ("Adam", "Adadelta", "SGD momentum"):
        assert label in text
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "loops"}  # --loops runs that study alone
    result = data["loops"]
    assert [c["condition"] for c in result["conditions"]] == ["quiet", "busy"]
    for cond in result["conditions"]:
        assert cond["skipped"] is None
        assert cond["torch_imported"] is False  # quiet and busy run without torch
        rows = cond["rows"]
        assert [(tuple(r["dims"]), r["optimizer"]) for r in rows] == [
            (tuple(loops.parse_dims(d)), k) for d in TINY for k in CASES if CASES[k].numpy is not None
        ]
        for r in rows:
            assert r["params"] == loops.n_params(r["dims"])
            assert r["steps"] == 2 and r["rounds"] == 2 and r["batch"] == 64
            for k in SUMMARY:
                assert np.isfinite(r[k]) and r[k] > 0, (r["optimizer"], k)
            assert r["finite"]
            raw = r["raw_seconds"]
            assert set(raw) == set(loops.LOOPS)
            for name, phases in raw.items():
                assert len(phases["wall"]) == 2
                if name == "no_update":
                    assert all(len(x) == 2 for x in phases["fwd_bwd"])
                if name == "alone":
                    assert phases["fwd_bwd"] == [[], []]
                    assert all(len(x) == 2 for x in phases["update"])
                else:
                    assert all(len(x) == 2 for x in phases["fwd_bwd"] + phases["update"])
    busy = result["conditions"][1]
    assert _gone(busy["busy_pid"]), "the busy neighbour outlived the benchmark"
    names = [t["target"] for t in result["targets"]]
    assert len(names) == 9 and all(isinstance(t["met"], bool) for t in result["targets"])
    assert "NOT met" in text or "met" in text


def test_steps_chosen_when_not_given(tmp_path):
    out = tmp_path / "loops.json"
    assert (
        main(
            [
                "bench",
                "--studies",
                "loops",
                "--optimizers",
                "sgd",
                "--loop-sizes",
                "8-4",
                "--programs",
                "none",
                "--rounds",
                "1",
                "--loop-conditions",
                "quiet",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    row = json.loads(out.read_text())["loops"]["conditions"][0]["rows"][0]
    assert 2 <= row["steps"] <= 200


def test_busy_neighbour_killed_on_interrupt():
    """Ctrl-C (KeyboardInterrupt) while a condition runs: the spinning child is gone after."""
    seen = []

    def interrupted(cfg):
        seen.append(cfg["condition"])
        raise KeyboardInterrupt

    pids = []
    real = loops.busy_neighbour

    def spy():
        cm = real()
        proc = cm.__enter__()
        pids.append(proc.pid)
        assert not _gone(proc.pid)
        return _Wrap(cm, proc)

    class _Wrap:
        def __init__(self, cm, proc):
            self.cm, self.proc = cm, proc

        def __enter__(self):
            return self.proc

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    mp = pytest.MonkeyPatch()
    mp.setattr(loops, "busy_neighbour", spy)
    try:
        with pytest.raises(KeyboardInterrupt):
            loops.run_loops(
                ["sgd"], [[8, 4]], 1, 1, ["busy"], None, False, lambda _: None, worker=interrupted
            )
    finally:
        mp.undo()
    assert seen == ["busy"] and len(pids) == 1
    assert _gone(pids[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_busy_neighbour_dies_with_its_parent():
    """A parent killed with SIGKILL (no finally runs) takes its spinning child with it; and the
    child is started without forking this process through a preexec_fn (JAX, say, warns then)."""
    code = (
        "import os, sys, time\n"
        "from optkern.benchmark import loops\n"
        "with loops.busy_neighbour() as proc:\n"
        "    print(proc.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while not _child_gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _child_gone(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()


def _child_gone(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it (it no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_busy_neighbour_uses_no_preexec_fn(monkeypatch):
    seen = {}
    real = subprocess.Popen

    def popen(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loops.subprocess, "Popen", popen)
    with loops.busy_neighbour():
        pass
    assert seen.get("preexec_fn") is None


def test_without_torch_the_torch_condition_is_skipped(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(loops, "torch_installed", lambda: False)
    out = tmp_path / "loops.json"
    assert (
        main(
            [
                "bench",
                "--loops",
                "--optimizers",
                "adam",
                "--loop-sizes",
                "8-4",
                "--programs",
                "none",
                "--loop-steps",
                "1",
                "--rounds",
                "1",
                "--loop-conditions",
                "quiet",
                "torch",
                "--no-torch",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert "torch: skipped (torch is not installed)" in capsys.readouterr().out
    conds = json.loads(out.read_text())["loops"]["conditions"]
    assert conds[1] == {
        "condition": "torch",
        "skipped": "torch is not installed",
        "rows": [],
        "program_rows": [],
    }
    assert len(conds[0]["rows"]) == 1


def test_torch_condition_when_installed(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "loops.json"
    assert (
        main(
            [
                "bench",
                "--loops",
                "--optimizers",
                "adamw",
                "--loop-sizes",
                "8-4",
                "--programs",
                "none",
                "--loop-steps",
                "1",
                "--rounds",
                "1",
                "--loop-conditions",
                "torch",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    cond = json.loads(out.read_text())["loops"]["conditions"][0]
    assert cond["skipped"] is None and cond["torch_imported"] is True
    assert "warmed" in cond["note"] and len(cond["rows"]) == 1


def test_mlp_gradient_matches_finite_differences():
    """The benchmark trains a real MLP: its backward pass is the gradient of its loss."""
    dims = [5, 4, 3]
    init = [p.astype(np.float32) for p in loops.init_params(dims, 0)]
    X, y = loops.make_data(dims, 1, 64, 1)
    m = loops.MLP(dims, init, 64)
    m.forward_backward(X[0], y[0])
    analytic = [g.astype(np.float64) for g in m.grads]
    eps = 1e-2
    for k, p in enumerate(m.params):
        for idx in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
            old = p[idx]
            p[idx] = old + eps
            m.forward_backward(X[0], y[0])
            up = m.loss
            p[idx] = old - eps
            m.forward_backward(X[0], y[0])
            down = m.loss
            p[idx] = old
            assert abs((up - down) / (2 * eps) - analytic[k][idx]) < 2e-3, (k, idx)


@pytest.mark.parametrize("text", ["784", "a-b", "4-0-2"])
def test_bad_loop_sizes_refused(text):
    with pytest.raises(SystemExit):
        main(["bench", "--loops", "--loop-sizes", text, "--quiet"])
