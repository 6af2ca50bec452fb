"""CI's oracle lane cannot pass by skipping: .ci/require_oracles.py, the pytest plugin of
.ci/oracles.sh, fails a run in which an oracle did not import. Checked here on Keras as it fails
where its backend is missing (a shadow ``keras`` package raising the ImportError Keras raises
without jax), in a child pytest run, with and without the plugin."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

NEEDS_KERAS = """
import pytest


def test_against_keras():
    pytest.importorskip("keras")
"""


def run_child(tmp_path, plugin):
    (tmp_path / "keras").mkdir()
    (tmp_path / "keras" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'jax'\", name='jax')\n"
    )
    (tmp_path / "test_needs_keras.py").write_text(NEEDS_KERAS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = dict(os.environ, KERAS_BACKEND="jax")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / ".ci"), str(tmp_path)])
    args = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    args += ["-p", "require_oracles"] if plugin else []
    return subprocess.run(
        [*args, "test_needs_keras.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_keras_that_does_not_import_fails_the_oracle_lane(tmp_path):
    run = run_child(tmp_path, plugin=True)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "oracles that did not import" in run.stdout
    assert "could not import 'keras'" in run.stdout


def test_without_the_plugin_it_is_a_clean_skip(tmp_path):
    run = run_child(tmp_path, plugin=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout
