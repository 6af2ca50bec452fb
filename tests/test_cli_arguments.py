"""``python -m optkern demo`` and ``bench`` refuse values they cannot use at the command line:
argparse's usage error (exit status 2) naming the option, before any work starts, instead of a
traceback (or a "nan%") at the end of a run."""

import os

import pytest

from optkern import _cli
from optkern.__main__ import main

BAD = [
    ("demo", "--epochs", "0"),
    ("demo", "--epochs", "-1"),
    ("demo", "--epochs", "two"),
    ("demo", "--n-train", "0"),
    ("demo", "--n-test", "0"),
    ("demo", "--hidden", "0"),
    ("demo", "--hidden", "-3"),
    ("demo", "--batch-size", "0"),
    ("demo", "--seed", "-1"),
    ("demo", "--blas-threads", "-1"),
    ("demo", "--plot", "/"),
    ("demo", "--plot", "/nonexistent-dir/x.png"),
    ("bench", "--sizes", "0"),
    ("bench", "--sizes", "-5"),
    ("bench", "--sizes", "abc"),
    ("bench", "--sizes", ""),
    ("bench", "--threads", "0"),
    ("bench", "--threads", "100000"),
    ("bench", "--threads", "2.5"),
    ("bench", "--repeats", "0"),
    ("bench", "--rounds", "0"),
    ("bench", "--loop-steps", "-2"),
    ("bench", "--json", "/"),
    ("bench", "--json", "/nonexistent-dir/out.json"),
    ("bench", "--plot", "/"),
    ("bench", "--loop-sizes", "10--5"),
    ("bench", "--loop-sizes", "10-0-5"),
    ("bench", "--loop-sizes", "10"),
    ("bench", "--loop-sizes", "-10-5"),
    ("bench", "--loop-sizes", "10-x"),
]


@pytest.mark.parametrize("command, option, value", BAD, ids=lambda v: str(v))
def test_bad_value_is_an_argparse_error_naming_the_option(command, option, value, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err, err
    assert "Traceback" not in err


def test_unwritable_json_path_is_refused_before_the_run(tmp_path, capsys):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(SystemExit):
            main(["bench", "--json", str(tmp_path / "out.json")])
    finally:
        tmp_path.chmod(0o700)
    assert "argument --json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, dims", [("784-256-10", [784, 256, 10]), ("3x4", [3, 4]), ("1-1", [1, 1])]
)
def test_layer_sizes_parse(text, dims):
    assert _cli.parse_dims(text) == dims


def test_a_writable_new_file_is_accepted(tmp_path):
    assert _cli.writable_file(str(tmp_path / "new.json")) == str(tmp_path / "new.json")


def test_tiny_demo_runs(capsys):
    main(
        ["demo", "--epochs", "1", "--n-train", "1", "--n-test", "1", "--batch-size", "1000"]
        + ["--optimizers", "SGD", "--no-plot", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert "nan" not in out and "best test accuracy" in out
