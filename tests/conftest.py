import os
import sys

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
