#!/usr/bin/env python3
"""Runs the test suite against the optkern installed in this Python (a wheel, say): the main
suite (pyproject's default selection: every test but the slow ones) once (its tests/test_isa.py
runs every ISA's kernels in that one process), then the end-to-end smoke tests (marker smoke)
once under every instruction set this machine supports (OPTKERN_FORCE_ISA=scalar, avx2, avx512).

    python .ci/test_installed.py [--quick | --suite-isa=ISA] [TESTS_DIR] [PYTEST_ARGS...]

--quick runs tests/test_isa.py instead of the main suite (for an installed module whose bytes the
main suite has already tested), then the smoke tests.
--suite-isa=ISA runs the main suite with OPTKERN_FORCE_ISA=ISA (the sanitizer lane runs it on
the scalar kernels, so every test that compares bits, with torch say, also meets the build
without FMA that machines without AVX2 get).

Run it from a directory where the source tree's src/ is not importable (cibuildwheel's test
directory, or a scratch directory holding copies of tests/ and pyproject.toml): it refuses to
test an optkern imported from a source tree. Used by .ci/run and by cibuildwheel's test-command.
"""

import os
import subprocess
import sys


def main() -> int:
    args = sys.argv[1:]
    quick = "--quick" in args[:1]
    if quick:
        args = args[1:]
    suite_isa = None
    if args and args[0].startswith("--suite-isa="):
        suite_isa = args[0].split("=", 1)[1]
        args = args[1:]
    tests = args[0] if args else "tests"
    extra = args[1:]
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import optkern, os; print(os.path.dirname(optkern.__file__)); "
            "print(' '.join(optkern.available_isas()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    location, isas = probe.stdout.splitlines()
    print(f"testing optkern from {location}; ISAs: {isas}", flush=True)
    if os.path.isdir(os.path.join(location, os.pardir, "cpp")):  # src/optkern next to src/cpp
        print("error: this optkern is the source tree's, not an installed one", file=sys.stderr)
        return 2
    failed = []
    env = {k: v for k, v in os.environ.items() if k != "OPTKERN_FORCE_ISA"}
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra]
    what = "test_isa.py" if quick else "the main suite"
    suite_env = env
    if suite_isa is not None:
        if suite_isa not in isas.split():
            print(f"error: --suite-isa={suite_isa}: this machine has {isas}", file=sys.stderr)
            return 2
        suite_env = dict(env, OPTKERN_FORCE_ISA=suite_isa)
        what += f" with OPTKERN_FORCE_ISA={suite_isa}"
    print(f"\n== {what} of the installed optkern (every ISA's kernels in-process)", flush=True)
    if (
        subprocess.call(
            pytest + [os.path.join(tests, "test_isa.py") if quick else tests], env=suite_env
        )
        != 0
    ):
        failed.append(what)
    smoke = pytest + ["-m", "smoke", os.path.join(tests, "test_smoke.py")]
    for isa in isas.split():
        print(f"\n== smoke tests of the installed optkern with OPTKERN_FORCE_ISA={isa}", flush=True)
        if subprocess.call(smoke, env=dict(env, OPTKERN_FORCE_ISA=isa)) != 0:
            failed.append(f"OPTKERN_FORCE_ISA={isa}")
    if failed:
        print(f"\nFAILED under: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
