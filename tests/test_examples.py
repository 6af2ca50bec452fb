"""The worked examples run at small settings, and what they claim holds.

Each claim is asserted with a margin measured on several seeds, so it does not hinge on the last
bits of one ISA's rounding (this file runs once per ISA in CI).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import optkern
from optkern.__main__ import main as cli
from optkern.examples import datasets, ill_conditioned, linear_regression, mlp, sparse_logistic
from optkern.examples._blas import blas_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_matplotlib(monkeypatch):
    """Make ``import matplotlib`` (and its submodules) fail, as if it were not installed."""
    for mod in list(sys.modules):
        if mod == "matplotlib" or mod.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)


# -- (a) linear regression: BGD / SGD / MBGD --------------------------------------------------------


@pytest.fixture(scope="module")
def linreg():
    return linear_regression.run(
        n=200, d=5, lr=0.1, epochs={"BGD": 300, "MBGD": 10, "SGD": 5}, seed=0
    )


def test_bgd_reaches_the_closed_form(linreg):
    bgd = linreg["results"]["BGD"]
    assert bgd["max_abs_error"] < 1e-4
    assert bgd["final_excess"] < 1e-9
    assert bgd["updates"] == 300  # one update per epoch


def test_sgd_is_noisy_and_minibatches_less_so(linreg):
    r = linreg["results"]
    # With a constant lr the single-sample iterate keeps jittering around the minimum: its
    # excess loss over the last epoch stays far above the mini-batch one, which stays above BGD.
    assert r["SGD"]["last_epoch_mean"] > 10 * r["MBGD"]["last_epoch_mean"]
    assert r["MBGD"]["last_epoch_mean"] > 100 * r["BGD"]["last_epoch_mean"]
    assert r["SGD"]["last_epoch_std"] > 0.2 * r["SGD"]["last_epoch_mean"]
    assert r["SGD"]["max_abs_error"] > 1e-2
    assert r["SGD"]["updates"] == 5 * 200 and r["MBGD"]["updates"] == 10 * 7


def test_sgd_makes_more_progress_per_epoch(linreg):
    # after one pass over the data SGD (200 small steps) is far ahead of BGD (one step)
    r = linreg["results"]

    def after_one_epoch(res):
        i = np.searchsorted(res["curve_epochs"], 1.0)
        return res["curve_excess"][i]

    assert after_one_epoch(r["SGD"]) < 0.1 * after_one_epoch(r["BGD"])


def test_linear_regression_main(capsys):
    assert linear_regression.main(["--n", "100", "--epochs", "2", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| BGD |" in out and "| SGD |" in out and "| MBGD |" in out


# -- (b) the MLP -------------------------------------------------------------------------------------


def test_mlp_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    model = mlp.MLP([6, 5, 4, 3], seed=1)
    X = rng.standard_normal((7, 6)).astype(np.float32)
    y = rng.integers(0, 3, 7)
    _, grads = model.loss_and_gradients(X, y)
    assert [g.shape for g in grads] == [p.shape for p in model.params]
    assert all(g.dtype == np.float32 and g.flags.c_contiguous for g in grads)
    # central differences in float64 on a float64 copy of the model
    model64 = mlp.MLP([6, 5, 4, 3], seed=1)
    model64.params = [p.astype(np.float64) for p in model.params]
    X64 = X.astype(np.float64)
    for p, g in zip(model64.params, grads):
        for idx in list(np.ndindex(p.shape))[:6]:
            old = p[idx]
            p[idx] = old + 1e-6
            up, _ = model64.loss_and_gradients(X64, y)
            p[idx] = old - 1e-6
            down, _ = model64.loss_and_gradients(X64, y)
            p[idx] = old
            assert abs((up - down) / 2e-6 - g[idx]) < 1e-4


def test_digits_are_balanced_and_reproducible():
    X, y = datasets.make_digits(200, seed=3)
    assert X.shape == (200, 144) and X.dtype == np.float32
    assert np.bincount(y, minlength=10).tolist() == [20] * 10
    X2, y2 = datasets.make_digits(200, seed=3)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(X, datasets.make_digits(200, seed=4)[0])


def test_every_optimizer_trains_the_mlp():
    # Small: 1500 digits, 4 epochs, one hidden layer. Chance is 10%; measured 84.4-93.6%
    # (RAdam lowest, 84.4%: its first steps are plain momentum, then damped by the
    # rectification, which costs most in a run this short; the others 87.6-93.6%).
    with blas_threads(1):
        out = mlp.run(n_train=1500, n_test=500, hidden=(64,), epochs=4)
    assert set(out["results"]) == set(mlp.DEFAULT_HYPER)
    floor = {"RAdam": 0.80}  # the others keep the 85% they always had
    for name, r in out["results"].items():
        assert r["final_test_acc"] >= floor.get(name, 0.85), (name, r["final_test_acc"])
        assert r["train_loss"][-1] < 0.5 * r["train_loss"][0], name


def test_mlp_reaches_97_percent_at_the_demo_setting():
    # The demo's setting (6000 digits, hidden (128, 64), 10 epochs of batch 64); measured 97.8%.
    with blas_threads(1):
        out = mlp.run(["Adam"])
    assert out["results"]["Adam"]["final_test_acc"] >= 0.97


def test_same_start_and_batches_for_every_optimizer():
    # an equal budget: identical runs for the same optimizer and seed
    with blas_threads(1):
        a = mlp.run(["SGD"], n_train=300, n_test=100, hidden=(16,), epochs=2)
        b = mlp.run(["SGD"], n_train=300, n_test=100, hidden=(16,), epochs=2)
    np.testing.assert_array_equal(
        a["results"]["SGD"]["train_loss"], b["results"]["SGD"]["train_loss"]
    )


def test_mlp_sweep_and_summary():
    with blas_threads(1):
        res = mlp.sweep(
            ["SGD", "Adam"], lrs=(1e-3, 0.1), n_train=300, n_val=100, epochs=1, hidden=(16,)
        )
    assert set(res) == {"SGD", "Adam"} and set(res["SGD"]) == {1e-3, 0.1}
    assert all(0.0 <= acc <= 1.0 for by_lr in res.values() for _, acc in by_lr.values())
    summary = mlp.sweep_summary(res, markdown=True)
    assert summary.count("\n") == 3 and "| SGD |" in summary


# -- (c) sparse logistic regression ------------------------------------------------------------------


def test_adaptive_methods_beat_sgd_on_sparse_features():
    # Equal budget (2 epochs of batch 32), each optimizer at its best lr on a validation set.
    # Measured on seeds 0-7: every adaptive method ahead of SGD by 0.035-0.10 in test log-loss.
    out = sparse_logistic.run(
        optimizers=("SGD", "Adagrad", "RMSprop", "Adam"),
        n_train=2000,
        n_val=1000,
        n_test=2000,
        n_features=300,
        epochs=2,
        seed=0,
    )
    r = out["results"]
    for name in ("Adagrad", "RMSprop", "Adam"):
        assert r[name]["test_loss"] < r["SGD"]["test_loss"] - 0.02, (
            name,
            r[name]["test_loss"],
            r["SGD"]["test_loss"],
        )
    # SGD's best lr is inside the grid, not at its edge (so a larger lr would not rescue it)
    grid = sorted(r["SGD"]["sweep"])
    assert grid[0] < r["SGD"]["lr"] < grid[-1]


# -- (d) ill-conditioned valley ----------------------------------------------------------------------


def test_momentum_and_nesterov_beat_sgd_in_a_narrow_valley():
    out = ill_conditioned.run("quadratic", steps=200, kappa=100, lr_grid=np.geomspace(1e-3, 1.0, 13))
    r = out["results"]
    assert r["SGD"]["steps_to_tol"] is None  # not within 1e-6 after 200 steps, at any lr
    for name in ("SGD+momentum", "Momentum", "Nesterov"):
        assert r[name]["steps_to_tol"] is not None and r[name]["steps_to_tol"] < 200
        assert r[name]["final_loss"] < 1e-4 * r["SGD"]["final_loss"]
    # Nesterov's look-ahead damps the oscillation across the valley that momentum keeps
    assert r["Nesterov"]["steep_settled"] < r["SGD+momentum"]["steep_settled"]


def test_sgd_oscillates_across_the_valley():
    # near its stability limit (lr just under 2/(L+mu)) gradient descent crosses the valley
    # floor on every step and crawls along it
    out = ill_conditioned.run(
        "quadratic", steps=200, kappa=100, lr_grid=[0.0198], methods=["SGD", "SGD+momentum"]
    )
    sgd, mom = out["results"]["SGD"], out["results"]["SGD+momentum"]
    assert sgd["steep_flips"] == 200 and sgd["reversal_fraction"] > 0.95
    assert mom["reversal_fraction"] < 0.5
    assert mom["final_loss"] < 1e-4 * sgd["final_loss"]


def test_rosenbrock_runs():
    out = ill_conditioned.run(
        "rosenbrock", steps=300, lr_grid=[1e-3, 2e-3], methods=["SGD", "Nesterov"], tol=1e-4
    )
    assert all(np.isfinite(r["final_loss"]) for r in out["results"].values())


def test_divergence_is_reported_not_raised():
    out = ill_conditioned.run("quadratic", steps=50, lr_grid=[1.0], methods=["SGD"])
    assert out["results"]["SGD"]["diverged"]
    assert "diverged" in ill_conditioned.table(out)


# -- plotting with and without matplotlib ------------------------------------------------------------


def test_plots_without_matplotlib(monkeypatch, tmp_path, capsys):
    _no_matplotlib(monkeypatch)
    out = ill_conditioned.run("quadratic", steps=20, lr_grid=[0.01], methods=["SGD"])
    assert ill_conditioned.plot(out, str(tmp_path / "x.png")) is None
    assert not (tmp_path / "x.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_plots_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    out = linear_regression.run(n=50, d=3, epochs=2)
    written = linear_regression.plot(out, str(tmp_path / "sub" / "lr.png"))
    with open(written, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- the demo and the scripts ------------------------------------------------------------------------


DEMO_SMALL = ["demo", "--epochs", "1", "--n-train", "300", "--n-test", "100", "--hidden", "16"]


def test_demo_prints_a_table_and_a_progress_bar(capsys):
    assert cli(DEMO_SMALL + ["--no-plot"]) == 0
    captured = capsys.readouterr()
    for name in mlp.DEFAULT_HYPER:
        assert f"\n{name} " in captured.out
    assert "test acc" in captured.out and "time s" in captured.out
    assert "written" not in captured.out
    # not a terminal: one progress line per optimizer, on stderr
    assert captured.err.count("done") == len(mlp.DEFAULT_HYPER)
    assert "[" in captured.err and "100%" in captured.err


def _blas_counts():
    from threadpoolctl import threadpool_info

    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


def test_demo_leaves_blas_threads_as_a_users_loop_has_them(monkeypatch, capsys):
    """By default the demo trains with the BLAS library's own thread count (what the user's
    loop gets), and says so; --blas-threads N sets N for the run only."""
    seen = []
    real_run = mlp.run

    def spy(*a, **kw):
        try:
            seen.append(_blas_counts())
        except ImportError:
            seen.append(None)
        return real_run(*a, **kw)

    monkeypatch.setattr(mlp, "run", spy)
    try:
        before = _blas_counts()
    except ImportError:
        before = None
    assert cli(DEMO_SMALL + ["--optimizers", "SGD", "--no-plot", "--no-progress"]) == 0
    assert "BLAS threads: library default" in capsys.readouterr().out
    assert seen[-1] == before
    assert (
        cli(DEMO_SMALL + ["--optimizers", "SGD", "--no-plot", "--no-progress", "--blas-threads", "1"])
        == 0
    )
    out = capsys.readouterr().out
    if "library default" not in out:  # threadpoolctl or OpenBLAS found: it was set
        assert "BLAS threads: 1 (" in out
        if before is not None:
            assert set(seen[-1]) == {1}
    if before is not None:
        assert _blas_counts() == before  # restored after the run
    with pytest.raises(SystemExit):
        cli(DEMO_SMALL + ["--blas-threads", "-1"])


def test_demo_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert cli(DEMO_SMALL + ["--optimizers", "SGD", "Adam", "--plot", str(png)]) == 0
    assert f"loss curves written to {png}" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_demo_without_matplotlib(monkeypatch, capsys, tmp_path):
    _no_matplotlib(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert cli(DEMO_SMALL + ["--optimizers", "SGD", "Adam", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert "written" not in captured.out and not list(tmp_path.iterdir())
    assert captured.err.count("done") == 0


def test_demo_rejects_unknown_optimizer(capsys):
    with pytest.raises(SystemExit):
        cli(["demo", "--optimizers", "Adamm"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_examples_compare_the_rules_that_declare_an_example_lr():
    """The examples' default set and learning rates come from the rules' declarations: each rule
    with an example_lr at that lr, followed by its class's presets (Nesterov after SGD)."""
    from optkern.examples._common import MORE_OPTIMIZERS, OPTIMIZERS

    declared = [r for r in optkern.registry.rules() if r.example_lr is not None]
    rules_in = [n for n in OPTIMIZERS if n in {r.cls for r in optkern.registry.rules()}]
    assert rules_in == [r.cls for r in declared]
    assert list(OPTIMIZERS).index("Nesterov") == list(OPTIMIZERS).index("SGD") + 1
    assert not set(OPTIMIZERS) & set(MORE_OPTIMIZERS)
    for r in declared:
        assert mlp.DEFAULT_HYPER[r.cls] == {"lr": r.example_lr}
    assert sparse_logistic.DEFAULT_OPTIMIZERS == tuple(OPTIMIZERS)


def test_demo_takes_every_class_by_name(capsys):
    """The default set is the examples' (README: which ones); any registry class can be named."""
    from optkern.examples._common import MORE_OPTIMIZERS, OPTIMIZERS

    assert {r.cls for r in optkern.registry.rules()} <= set(OPTIMIZERS) | set(MORE_OPTIMIZERS)
    assert cli(DEMO_SMALL + ["--no-plot", "--optimizers", "Lion", "ScheduleFreeAdamW"]) == 0
    out = capsys.readouterr().out
    assert "\nLion " in out and "\nScheduleFreeAdamW " in out


def _imports_of(path, package):
    """The modules of ``package`` that the module at ``path`` imports, at any depth of its code
    (an import inside a function counts: it closes a cycle as well)."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                base = package + ("." + base if base else "")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith(package + "."))
    return found


def test_examples_import_no_cycle():
    """optkern.examples' modules (and the scripts in examples/) import each other without a
    cycle: mlp imports mlp_distributed for --distributed, never the other way round."""
    import glob

    import optkern.examples as pkg

    package = "optkern.examples"
    paths = {
        f"{package}.{os.path.basename(f)[:-3]}": f
        for f in glob.glob(os.path.join(os.path.dirname(pkg.__file__), "*.py"))
    }
    for f in glob.glob(os.path.join(REPO, "examples", "*.py")):
        paths[f"examples/{os.path.basename(f)}"] = f
    graph = {m: _imports_of(f, package) & set(paths) for m, f in paths.items()}
    assert "optkern.examples.mlp_distributed" in graph["optkern.examples.mlp"]

    def visit(m, stack):
        assert m not in stack, "import cycle: " + " -> ".join([*stack, m])
        for n in graph[m]:
            visit(n, [*stack, m])

    for m in graph:
        visit(m, [])


def test_info_still_works(capsys):
    assert cli(["info"]) == 0
    assert "active ISA" in capsys.readouterr().out


def test_blas_threads_restores():
    with blas_threads(1) as what:
        assert "BLAS threads" in what
    with blas_threads(None) as what:
        assert "default" in what


@pytest.mark.spawns
def test_example_script_runs():
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(optkern.__file__)))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(REPO, "examples", "ill_conditioned.py")
    res = subprocess.run(
        [sys.executable, script, "--steps", "30", "--lr", "0.01"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "Nesterov" in res.stdout


def test_progress_bar_redraws_in_place_on_a_terminal():
    import io

    from optkern._progress import ProgressBar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = ProgressBar(4, stream=stream, width=8)
    for i in range(1, 5):
        bar.update(i, f"step {i}", milestone=True)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "[########] 100%  step 4" in text
    log = io.StringIO()  # not a terminal: lines for milestones only
    bar = ProgressBar(4, stream=log)
    bar.update(1, "a")
    bar.update(2, "b", milestone=True)
    bar.close()
    assert log.getvalue().count("\n") == 1 and "b" in log.getvalue() and "\r" not in log.getvalue()


# -- Muon on a transformer-shaped MLP --------------------------------------------------------------


def test_muon_mlp_gradients_are_exact():
    from optkern.examples.muon_mlp import ResidualMLP

    rng = np.random.default_rng(0)
    model = ResidualMLP(12, 8, 2, seed=1, dtype=np.float64)
    X = rng.standard_normal((16, 12))
    y = rng.integers(0, 10, 16)
    _, grads = model.gradients(X, y)
    for p, g in zip(model.params, grads):
        for _ in range(3):
            idx = tuple(int(rng.integers(0, s)) for s in p.shape)
            old = p[idx]
            p[idx] = old + 1e-6
            up = model.gradients(X, y)[0]
            p[idx] = old - 1e-6
            down = model.gradients(X, y)[0]
            p[idx] = old
            assert (up - down) / 2e-6 == pytest.approx(g[idx], rel=1e-5, abs=1e-8)


def test_muon_mlp_trains():
    from optkern.examples import muon_mlp

    with blas_threads(1):
        out = muon_mlp.run(
            ["muon", "adam"], {"muon": [0.1], "adam": [3e-3]}, width=32, epochs=3,
            batch_size=128, seeds=[0], n_train=2000,
        )  # fmt: skip
    for m in ("muon", "adam"):
        assert out["best"][m]["test_acc"] > 0.7  # chance: 0.1
    assert "muon" in muon_mlp.table(out, markdown=True)


# -- the recommender: row-sparse gradients --------------------------------------------------------


def test_recommender_learns_with_row_sparse_gradients():
    from optkern.examples import recommender

    out = recommender.run(n_users=2000, n_items=500, n_ratings=30000, epochs=3, seed=0)
    for m, res in out["results"].items():
        assert res["test_rmse"][-1] < out["baseline_rmse"], m  # better than the mean
    # the lazy methods touch a batch's rows only: much less work per step than dense Adam
    assert out["results"]["SparseAdam"]["test_rmse"][-1] < 0.9 * out["baseline_rmse"]
    assert "SparseAdam" in recommender.table(out, markdown=True)
