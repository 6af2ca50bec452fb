"""pytest plugin for .ci/oracles.sh: a test skipped because an oracle package (torch, jax,
optax, schedulefree, scikit-learn, keras, ...) could not be imported fails the run instead, so the
oracle stage cannot pass by skipping what it exists to run. Loaded with
``-p require_oracles`` and .ci on PYTHONPATH; the ordinary test runs never load it."""

_missing = []


def _check(report):
    if report.skipped and "could not import" in str(report.longrepr):
        _missing.append(f"{report.nodeid}: {report.longrepr}")


def pytest_collectreport(report):
    _check(report)


def pytest_runtest_logreport(report):
    _check(report)


def pytest_terminal_summary(terminalreporter):
    if _missing:
        terminalreporter.section("oracles that did not import (each fails this stage)")
        for line in _missing:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    if _missing:
        session.exitstatus = 1
