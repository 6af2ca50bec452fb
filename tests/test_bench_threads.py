"""The threads study of `python -m optkern bench` at tiny sizes: it runs, writes every row and
field, and kills its busy processes whatever happens. No timing is asserted (this is a check of
the benchmark's plumbing, not a benchmark)."""

import contextlib
import json
import os

import numpy as np
import pytest

from optkern.__main__ import main
from optkern.benchmark import loops, threads


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_threads_study_every_row_and_field(tmp_path, capsys):
    out = tmp_path / "threads.json"
    argv = ["bench", "--studies", "threads", "--optimizers", "adam", "sgd", "--thread-sizes"]
    argv += ["1k", "3k", "--thread-seconds", "0.01", "--thread-conditions", "quiet", "busy1"]
    assert main(argv + ["--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Default threads against one thread" in text and "targets:" in text
    assert "split rule of this build" in text
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "threads"}
    result = data["threads"]
    assert [c["condition"] for c in result["conditions"]] == ["quiet", "busy1"]
    for cond in result["conditions"]:
        assert cond["busy_processes"] == threads.CONDITIONS[cond["condition"]]
        assert len(cond["busy_pids"]) == cond["busy_processes"]
        assert all(_gone(pid) for pid in cond["busy_pids"]), "a busy process outlived the study"
        assert set(cond["overhead_us"]) == {"adam", "sgd"}
        if cond["threads"] > 1:
            for gap in ("back_to_back", "after_1ms"):
                assert cond["wake_us"][gap]["samples"] == threads.WAKE_SAMPLES
        rows = cond["rows"]
        assert [(r["optimizer"], r["size"]) for r in rows] == [
            (k, n) for k in ("adam", "sgd") for n in (1000, 3000)
        ]
        for r in rows:
            assert r["finite"] and r["rounds"] >= threads.MIN_ROUNDS
            for v in ("default", "one"):
                assert r[v]["steps"] == r["rounds"] * r["block"]
                assert 0 < r[v]["median"] <= r[v]["p90"] <= r[v]["p99"]
            assert np.isfinite(r["median_ratio"]) and np.isfinite(r["p90_ratio"])
            assert set(r["pool"]) == {"calls", "helper_chunks", "late_calls", "serial_calls"}
    names = [t["target"] for t in result["targets"]]
    assert len(names) == 3 and all(isinstance(t["met"], bool) for t in result["targets"])


def test_busy_processes_killed_on_interrupt(monkeypatch):
    """Ctrl-C while a condition runs: its three spinning processes are gone after."""
    started = []
    real = loops.busy_processes

    @contextlib.contextmanager
    def spy(count):
        with real(count) as procs:
            started.extend(p.pid for p in procs)
            yield procs

    def interrupted(cfg):
        assert len(started) == 3 and not any(_gone(pid) for pid in started)
        raise KeyboardInterrupt

    monkeypatch.setattr(loops, "busy_processes", spy)
    with pytest.raises(KeyboardInterrupt):
        threads.run_threads_study(
            ["sgd"], [1000], ["busy3"], 0.01, None, lambda _: None, worker=interrupted
        )
    assert all(_gone(pid) for pid in started)
