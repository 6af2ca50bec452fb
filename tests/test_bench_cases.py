"""The benchmark's cases: a comparison column whose package or class is missing is left blank
with the reason, instead of crashing the run (python -m optkern bench is the README's main job)."""

import argparse
import dataclasses
import math

import pytest

import optkern
from optkern import benchmark
from optkern.benchmark import cases, runner


def test_missing_peer_package_is_reported_not_imported():
    case = dataclasses.replace(
        cases.CASES["lion"], oracle_modules=("optkern_no_such_package_for_tests",)
    )
    assert case.peer_missing() == "optkern_no_such_package_for_tests is not installed"


def test_a_row_without_its_peer_is_blank_with_the_reason():
    case = dataclasses.replace(
        cases.CASES["lion"], oracle_modules=("optkern_no_such_package_for_tests",)
    )
    rows = runner.run_main([case], [1000], 1, True, runner.Progress(1, enabled=False))
    (row,) = rows
    assert "torch" not in row and "speedup_vs_torch" not in row
    assert row["torch_missing"] == "optkern_no_such_package_for_tests is not installed"
    assert row["optkern"]["seconds"] > 0
    table = runner.main_table(rows)
    assert "optkern_no_such_package_for_tests is not installed" in table


def test_every_registry_rule_has_a_case():
    import optkern as ok

    for r in ok.registry.rules():
        assert r.name in cases.CASES or any(
            r.cls in (c.label, c.torch_name) for c in cases.CASES.values()
        ), r.cls


# -- python -m optkern bench --torch and examples/torch_mlp.py: every optkern.torch class ----------


@pytest.mark.oracle
def test_torch_bench_has_a_peer_for_every_okt_class():
    import inspect

    import pytest

    torch = pytest.importorskip("torch")
    okt = pytest.importorskip("optkern.torch")
    from optkern.benchmark import torch_bench as tb

    table = tb.peers()
    assert list(table) == list(okt.RULES)
    for name, peer in table.items():
        rule = okt.RULES[name]
        if rule.torch_name:  # torch.optim's class, on its fused path where it takes fused=True
            takes = inspect.signature(getattr(torch.optim, rule.torch_name)).parameters
            assert peer.cls == f"torch.optim.{rule.torch_name}", name
            flag = "fused" if "fused" in takes else "foreach" if "foreach" in takes else None
            assert peer.flags == (((flag, True),) if flag else ()), name
    assert table["Momentum"].cls == "torch.optim.SGD"
    assert table["Lion"].cls == "lion_pytorch.Lion"
    assert table["LAMB"].cls == "optax.lamb" and not table["LAMB"].torch_optimizer
    assert table["ScheduleFreeAdamW"].cls == "schedulefree.AdamWScheduleFree"
    assert table["ScheduleFreeSGD"].cls == "schedulefree.SGDScheduleFree"
    assert table["Nesterov"].make([torch.nn.Parameter(torch.zeros(2))], {"lr": 0.1}).defaults == dict(
        torch.optim.SGD([torch.zeros(1)], lr=0.1, momentum=0.9, nesterov=True, fused=True).defaults
    )
    assert all(tb.peers()[n].missing() is None for n in tb.ORIGINALS)  # torch is enough


@pytest.mark.oracle
def test_declared_peers_are_measurable_and_take_the_rules_arguments():
    """Every peer a rule declares is torch.optim's or a package the benchmarks know (none is
    left as "no benchmark of ..."), and Momentum's declared arguments map its beta onto torch
    SGD's momentum and dampening, the other arguments passed as they are."""
    import pytest

    pytest.importorskip("torch")
    from optkern.benchmark import torch_bench as tb
    from optkern.benchmark.cases import CASES, PEER_PACKAGES

    declared = [r for r in optkern.registry.rules() if r.peer is not None]
    assert declared
    table = tb.peers()
    for r in declared:
        package = r.peer.split(".")[0]
        assert package == "torch" or package in PEER_PACKAGES, r.peer
        assert table[r.cls].cls == r.peer.partition("(")[0], r.cls
        if package != "torch":  # the main table's torch column measures the same peer
            assert CASES[r.name].oracle_impl == PEER_PACKAGES[package][0], r.name
    assert table["Momentum"].rename({"lr": 0.01, "beta": 0.8}) == {
        "lr": 0.01,
        "weight_decay": 0.0,
        "momentum": 0.8,
        "dampening": 0.8,
    }


@pytest.mark.oracle
def test_torch_bench_missing_peer_is_blank_with_the_reason(capsys):
    import pytest

    pytest.importorskip("torch")
    from optkern.benchmark import torch_bench as tb

    table = dict(tb.peers())
    table["Lion"] = dataclasses.replace(
        table["Lion"], modules=("torch", "optkern_no_such_package_for_tests")
    )
    steps = tb.bench_steps(["Lion", "NAdam", "ScheduleFreeSGD"], [1000], 1, table)
    lion, nadam, sf = steps
    assert "torch_s" not in lion and lion["okt_s"] > 0
    assert lion["torch_missing"] == "optkern_no_such_package_for_tests is not installed"
    assert nadam["torch_path"] == "foreach" and nadam["torch_s"] > 0 and nadam["okt_s"] > 0
    assert "torch_s" in sf or sf["torch_missing"] == "schedulefree is not installed"
    loop = tb.bench_loop(["LAMB"], 1, iters=1, table=table)
    assert loop[0]["torch_missing"] == "optax.lamb is not a torch optimizer (no training loop)"
    over = tb.bench_overhead(repeats=1, nparams=5, size=8)
    tb.report_torch(
        {
            "torch": "x",
            "threads": 1,
            "steps": steps,
            "loop": loop,
            "overhead": over,
            "not_run": ["SGD"],
        }
    )
    out = capsys.readouterr().out
    assert "(optkern_no_such_package_for_tests is not installed)" in out
    assert "(optax.lamb is not a torch optimizer (no training loop))" in out
    assert "Not run: SGD (--all runs every optkern.torch class)" in out


@pytest.mark.oracle
def test_torch_bench_steps_every_okt_class():
    import pytest

    pytest.importorskip("torch")
    okt = pytest.importorskip("optkern.torch")
    from optkern.benchmark import torch_bench as tb

    rows = tb.bench_steps(list(okt.RULES), [200_000], 1)  # 10 steps a repeat
    assert [r["optimizer"] for r in rows] == list(okt.RULES)
    for r in rows:
        assert r["okt_s"] > 0
        assert (r.get("torch_s", 0) > 0) != ("torch_missing" in r), r


@pytest.mark.oracle
def test_torch_bench_selection():
    import pytest

    pytest.importorskip("torch")
    okt = pytest.importorskip("optkern.torch")
    from optkern.benchmark import torch_bench as tb

    assert tb.select(None, False) == tb.ORIGINALS  # the default run stays short
    assert tb.select(None, True) == list(okt.RULES)
    assert tb.select(["nadam", "sgd-momentum", "schedule_free_sgd", "Lion"], False) == [
        "SGD",
        "NAdam",
        "Lion",
        "ScheduleFreeSGD",
    ]
    with pytest.raises(SystemExit, match="no optkern.torch class 'nope'"):
        tb.select(["nope"], False)


@pytest.mark.oracle
def test_bench_torch_cli_picks_the_classes(monkeypatch, capsys):
    pytest.importorskip("torch")
    from optkern.benchmark import torch_bench as tb

    seen = []

    def fake(names, sizes, repeats, threads):
        seen.append((names, sizes))
        return {"threads": 1, "torch": "x", "steps": [], "loop": [], "overhead": _OVERHEAD}

    monkeypatch.setattr(tb, "run_torch", fake)
    parser = argparse.ArgumentParser()
    benchmark.add_parser(parser.add_subparsers())
    for argv, names in (
        ([], tb.ORIGINALS),
        (["--all"], list(tb.peers())),
        (["--optimizers", "rprop", "adam"], ["Adam", "Rprop"]),
    ):
        args = parser.parse_args(["bench", "--torch", "--quiet", *argv])
        assert args.run(args) == 0
        assert seen[-1] == (names, [1_000_000, 50_000_000])
    assert "Not run: Nesterov" in capsys.readouterr().out


_OVERHEAD = {
    "params": 1,
    "elements_each": 1,
    "okt_s": 1e-6,
    "okt_fresh_grads_s": 1e-6,
    "functional_s": 1e-6,
    "torch_fused_s": 1e-6,
    "overhead_per_param_us": 0.0,
    "overhead_per_param_fresh_grads_us": 0.0,
}


@pytest.mark.oracle
def test_torch_mlp_example_runs_every_okt_class():
    import pytest

    pytest.importorskip("torch")
    okt = pytest.importorskip("optkern.torch")
    from optkern.examples import torch_mlp

    dense = [n for n, r in okt.RULES.items() if not r.sparse_only]  # SparseAdam: embeddings
    assert set(torch_mlp.HYPER) <= set(okt.RULES)  # the others run at their defaults
    rows = torch_mlp.run(dense, n=200, hidden=16, epochs=1)
    assert [r["optimizer"] for r in rows] == dense
    for r in rows:
        assert r["okt_loss"] > 0 and r["okt_s"] > 0
        if "peer_missing" in r:  # only where torch.optim lacks the class
            assert okt.RULES[r["optimizer"]].torch_name is None, r
            continue
        if r["optimizer"] == "Momentum":  # torch's SGD with dampening: differs at the first step
            continue
        assert abs(r["okt_loss"] - r["torch_loss"]) < 1e-3 * max(1.0, r["torch_loss"]), r
        assert r["max_param_difference"] < 1e-3, r


def test_shuffled_times_times_every_step_once_per_repeat_in_varying_orders():
    """bench/pass_bounds.py and bench/torch_fused_bandwidth.py time their steps with it: one
    time per step per repeat, and the order changes between repeats (with 4 steps and 30
    repeats, one fixed order would come out every time with probability 24^-29)."""
    calls = []
    steps = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    times = runner.shuffled_times(steps, 30)
    assert sorted(times) == list("abcd")
    assert all(len(v) == 30 and all(t >= 0.0 for t in v) for v in times.values())
    rounds = ["".join(calls[i : i + 4]) for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert len(set(rounds)) > 1


@pytest.mark.parametrize(
    "argv", [["--repeats", "0"], ["--repeats", "-3"], ["--rounds", "0"], ["--loop-steps", "0"]]
)
def test_bench_refuses_counts_below_one(argv, capsys):
    """A count of repeats, rounds or loop steps below 1 would leave a case with no timings (it
    ended in a StatisticsError traceback): the command line refuses it, naming the option."""
    parser = argparse.ArgumentParser()
    benchmark.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["bench", *argv])
    assert exc.value.code == 2
    assert f"argument {argv[0]}: must be a positive integer" in capsys.readouterr().err
    assert parser.parse_args(["bench", argv[0], "1"]) is not None


def test_extra_studies_are_named_not_default():
    """The studies that were scripts in bench/ run only when named; the default run is the
    README's five."""
    from optkern.benchmark import studies

    assert benchmark.STUDIES == ["main", "small", "threads", "clip", "loops"]
    assert set(benchmark.EXTRA_STUDIES) == set(studies.DEFAULT_REPEATS) == set(studies.NAMES)
    parser = argparse.ArgumentParser()
    benchmark.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench"])
    assert args.studies == benchmark.STUDIES and args.repeats is None
    assert parser.parse_args(["bench", "--studies", "pass-bounds"]).studies == ["pass-bounds"]


def test_numpy_studies_run_small():
    """Each NumPy study runs end to end on small sizes (the timings mean nothing here) and
    reports a row per case."""
    from optkern.benchmark import studies

    t = studies.threshold(1)
    assert len(t["rows"]) == 18 and "1 thread" in t["text"]
    assert [c["rule"] for c in t["element_costs"]] == [r for r, _ in studies.ELEMENT_COST_RULES]
    assert all(len(c["ns_per_element"]) == 4 for c in t["element_costs"])
    pl = studies.thread_placement(1, busy=(0,), sizes=(1000,), optimizers=("sgd",), seconds=0.01)
    (cond,) = pl["conditions"]
    assert set(cond["runs"]) == {"kept off", "anywhere"} and "on caller's CPU" in pl["text"]
    p = studies.pass_bounds(1, n=200_000)
    assert [r["optimizer"] for r in p["rows"]] == ["Adafactor", "LAMB"]
    assert all(r["seconds"] > 0 and r["fraction_of_bound"] > 0 for r in p["rows"])


def test_bench_cli_runs_a_named_study(capsys, monkeypatch):
    from optkern.__main__ import main
    from optkern.benchmark import studies

    monkeypatch.setattr(studies, "ADAFACTOR_SHAPES", [(2000, 20), (40_000,)])
    monkeypatch.setitem(studies.DEFAULT_REPEATS, "adafactor-shapes", 2)
    assert main(["bench", "--studies", "adafactor-shapes", "--quiet", "--no-torch"]) == 0
    out = capsys.readouterr().out
    assert "Adafactor, one step on 4M elements by shape (min / median of 2" in out
    assert "(2000, 20)" in out and "(40000,)" in out


@pytest.mark.oracle
def test_torch_studies_run_small():
    pytest.importorskip("torch")
    from optkern.benchmark import studies

    b = studies.torch_bandwidth(1, n=20_000)
    # the registry's rules whose torch.optim class has a fused step, in the registry's order
    assert [r["optimizer"] for r in b["rows"]] == ["SGD", "Adagrad", "Adam", "AdamW"]
    ph = studies.torch_phases(1, per_round=1)
    assert set(ph["ms"]) == {"torch fused", "okt", "okt 1 thread", "torch foreach"}
    small = studies.torch_small_step(2, inner=1, fresh=True)
    assert set(small["us"]) == {"optkern.torch", "torch fused", "torch single-tensor"}
    assert all(r["median_us"] > 0 and r["p90_us"] >= r["median_us"] for r in small["us"].values())


def test_step_cost_study_runs_small():
    """The step-cost study measures every figure in both dtypes and states each target with its
    value (the timings mean nothing here)."""
    from optkern.benchmark import step_cost

    r = step_cost.step_cost(1, batch=2)
    assert set(r["figures"]) == set(step_cost.DTYPES)
    for figs in r["figures"].values():
        assert set(figs) == set(step_cost.FIGURES)
        assert figs["sgd"]["ratio"] > 0 and figs["adam"]["ratio"] > 0
        assert set(figs["functional"]["fit"]) == {"sgd_", "adam_"}
    names = [t["target"] for t in r["targets"]]
    assert "float64: ok.Adam.step / numpy in-place Adam <= 0.6" in names
    assert all(
        math.isfinite(t["value"]) and t["met"] == (t["value"] <= t["limit"]) for t in r["targets"]
    )
    assert "targets:" in r["text"] and "== float64" in r["text"]
    for where in ("one element", "the 4-array model"):
        assert "Adam, float32 state" in r["precision"][where]
        assert "Adam, int8 state" in r["precision"][where]
    assert "Adam, int8 state, whole path" in r["precision"]["one element"]
    assert "== precision options" in r["text"]
