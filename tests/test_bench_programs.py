"""The program shapes of the training-loop study (optkern/benchmark/programs.py): each program
trains, its optkern variant computes what its NumPy update lines compute, and the study writes
every row and field. No timing is asserted."""

import json

import numpy as np
import pytest

from optkern.__main__ import main
from optkern.benchmark import programs
from optkern.benchmark.programs import PROGRAMS


def _run(program: str, optimizer: str, variant: str, iterations: int):
    inst = PROGRAMS[program].build(0, optimizer, variant)
    losses = []
    for _ in range(iterations):
        inst.forward_backward()
        losses.append(inst.loss())
        inst.update()
    return inst, losses


@pytest.mark.parametrize(
    "program, optimizer", [(k, o) for k, p in PROGRAMS.items() for o in p.optimizers]
)
def test_numpy_program_trains(program, optimizer):
    # Windows of whole passes over the char-RNN's text (52 windows of 25 characters each).
    n, window = (6 * 52, 52) if program == "charrnn" else (60, 10)
    inst, losses = _run(program, optimizer, "numpy", n)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-window:]) < 0.9 * np.mean(losses[:window])
    assert all(p.dtype == PROGRAMS[program].dtype for p in inst.params())


# Iterations compared, and how closely (fcnet's SGD-momentum runs 25 iterations: two lr decays;
# the char-RNN amplifies rounding: 1e-16 grows to 1e-5 within 12 steps, see below).
AGREE = {
    ("fcnet", "adam"): (12, 1e-4),
    ("fcnet", "rmsprop"): (12, 1e-4),
    ("fcnet", "sgd-momentum"): (25, 1e-4),
    ("charrnn", "adagrad"): (5, 1e-9),
    ("mlp64", "sgd"): (30, 1e-9),
}


@pytest.mark.parametrize("program, optimizer", sorted(AGREE))
def test_optkern_variant_matches_numpy_lines(program, optimizer):
    steps, rtol = AGREE[(program, optimizer)]
    a, _ = _run(program, optimizer, "numpy", steps)
    b, _ = _run(program, optimizer, "optkern", steps)
    start, _ = _run(program, optimizer, "numpy", 0)
    for pa, pb, p0 in zip(a.params(), b.params(), start.params()):
        assert not np.array_equal(pb, p0)  # optkern's variant did update the arrays it reads
        np.testing.assert_allclose(pb, pa, rtol=rtol, atol=rtol * 1e-2)


def test_charrnn_optkern_is_its_textbook_adagrad():
    """The char-RNN's optkern variant steps its float64 arrays in place, in float64 (no copy),
    as its NumPy lines do (eps inside the square root). The RNN amplifies rounding (1e-16 grows
    to 1e-5 within 12 steps), so each step starts both from the same parameters."""
    a, b = programs.CharRNN(0), programs.CharRNN(0)
    arrays = [id(p) for p in b.params]
    numpy_update = a.numpy_update("adagrad")
    update = b.optkern_update("adagrad")
    for _ in range(12):
        a.forward_backward()
        b.forward_backward()
        numpy_update()
        update()
        for pa, pb in zip(a.params, b.params):
            assert pb.dtype == np.float64
            np.testing.assert_allclose(pb, pa, rtol=1e-12, atol=1e-15)
            np.copyto(pb, pa)
    assert [id(p) for p in b.params] == arrays


def test_solver_keeps_the_arrays_it_trains():
    """train() ends by copying the best parameters into the model's arrays (not rebinding them),
    so an optimizer built on those arrays keeps stepping what the model reads."""
    pytest.importorskip("optkern")
    prog = programs.FCNetProgram(0, "adam", use_optkern=True)
    before = {k: id(v) for k, v in prog.solver.model.params.items()}
    prog.solver.train(2)
    assert {k: id(v) for k, v in prog.solver.model.params.items()} == before
    assert prog.solver.best_acc > 0.1


def test_programs_in_the_loops_study(tmp_path, capsys):
    out = tmp_path / "programs.json"
    args = ["bench", "--loops", "--loop-sizes", "none", "--programs", "mlp64", "fcnet"]
    args += ["--loop-steps", "2", "--rounds", "2", "--loop-conditions", "quiet", "--quiet"]
    assert main(args + ["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Program shapes" in text and "targets:" in text
    result = json.loads(out.read_text())["loops"]
    (cond,) = result["conditions"]
    assert cond["rows"] == []  # --loop-sizes none: no MLP rows
    rows = cond["program_rows"]
    expected = [(k, o) for k in ("mlp64", "fcnet") for o in PROGRAMS[k].optimizers]
    assert [(r["program"], r["optimizer"]) for r in rows] == expected
    for r in rows:
        assert r["steps"] == 2 and r["rounds"] == 2 and r["finite"]
        assert r["dtype"] == np.dtype(PROGRAMS[r["program"]].dtype).name
        assert set(r["seconds"]) == set(programs.VARIANTS)
        for s in r["seconds"].values():
            assert all(np.isfinite(v) and v > 0 for v in s.values())
            assert s["update_p90"] >= s["update_median"]
        for k in ("loop_ratio", "loop_ratio_1t", "update_ratio", "p90_vs_1t", "loop_ratio_same_fb"):
            assert np.isfinite(r[k]) and r[k] > 0
        assert r["label"] in text
    targets = [t["target"] for t in result["targets"]]
    assert "program loop optkern/numpy <= 1.0" in targets
