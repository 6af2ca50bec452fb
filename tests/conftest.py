import os
import re
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import optim_db.py, reference.py, helpers.py

import optkern as ok  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs the same examples every time (a failure reproduces); HYPOTHESIS_PROFILE=explore searches
# twenty times as many, randomly, for local bug hunting.
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    return (
        f"optkern {ok.__version__}: active ISA {ok.active_isa()} "
        f"(available {', '.join(ok.available_isas())}), {ok.get_num_threads()} threads"
    )


@pytest.fixture(autouse=True)
def _restore_threading():
    """Tests may change the thread count or the split threshold; put both back afterwards."""
    threads = ok.get_num_threads()
    threshold = ok._core._testing.min_elements_per_thread()
    yield
    ok.set_num_threads(threads)
    ok._core._testing.set_min_elements_per_thread(threshold)


# -- oracles ----------------------------------------------------------------------------------------
# The packages the tests compare optkern with. A test needing one is marked `oracle`: explicitly
# when it imports the package inside (pytest.importorskip), automatically when its module imports
# one at its top. CI's oracle lane (.ci/oracles.sh) installs them and runs `-m oracle` only: the
# other tests of a file that holds both run in the main lane. A test that skips for a missing
# oracle without the mark fails, so the oracle lane cannot silently leave it out.
ORACLES = {
    "torch",
    "jax",
    "optax",
    "schedulefree",
    "lion_pytorch",
    "sklearn",
    "keras",
    "bitsandbytes",
    "torchao",
}
_MISSING_ORACLE = re.compile(r"could not import '([\w.]+)'")


def _imports_an_oracle(module) -> bool:
    return any(
        isinstance(v, types.ModuleType) and v.__name__.split(".")[0] in ORACLES
        for v in vars(module).values()
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and _imports_an_oracle(module):
            item.add_marker(pytest.mark.oracle)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or item.get_closest_marker("oracle") is not None:
        return
    missing = _MISSING_ORACLE.search(str(report.longrepr))
    if missing and missing.group(1).split(".")[0] in ORACLES:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped for want of the oracle {missing.group(1)!r} but is not marked "
            "@pytest.mark.oracle: CI's oracle lane runs only the tests so marked"
        )
