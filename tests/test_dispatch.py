"""Runtime ISA dispatch: the best ISA by default, OPTKERN_FORCE_ISA to force one, clear errors."""

import os
import subprocess
import sys

import pytest

import optkern as ok

ORDER = ["scalar", "avx2", "avx512"]


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "OPTKERN_FORCE_ISA"}  # CI sets it
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True)


def test_available_isas_are_ordered_and_include_scalar():
    isas = ok.available_isas()
    assert isas[0] == "scalar"
    assert isas == [i for i in ORDER if i in isas]
    assert ok.active_isa() in isas


def test_default_is_the_best_available():
    out = run_python("import optkern; print(optkern.active_isa(), optkern.available_isas()[-1])")
    assert out.returncode == 0, out.stderr
    active, best = out.stdout.split()
    assert active == best


@pytest.mark.parametrize("isa", ORDER)
def test_force_each_available_isa(isa):
    out = run_python("import optkern; print(optkern.active_isa())", OPTKERN_FORCE_ISA=isa)
    if isa in ok.available_isas():
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == isa
    else:
        assert out.returncode != 0
        assert f"OPTKERN_FORCE_ISA='{isa}'" in out.stderr
        assert "Traceback" in out.stderr and "ImportError" in out.stderr  # an exception, no crash


def test_force_is_case_and_space_insensitive():
    out = run_python("import optkern; print(optkern.active_isa())", OPTKERN_FORCE_ISA=" Scalar ")
    assert out.returncode == 0 and out.stdout.strip() == "scalar"


def test_unknown_isa_fails_at_import_with_its_name():
    out = run_python("import optkern", OPTKERN_FORCE_ISA="avx1024")
    assert out.returncode == 1
    assert "ImportError" in out.stderr
    assert "OPTKERN_FORCE_ISA='avx1024' is not an ISA optkern knows" in out.stderr
    assert "scalar, avx2, avx512" in out.stderr


def test_build_info_and_cli():
    info = ok.build_info()
    assert info["version"] == ok.__version__
    assert set(info["isa_flags"]) >= set(ok.available_isas())
    assert "-march=native" not in " ".join(info["isa_flags"].values())
    out = subprocess.run(
        [sys.executable, "-m", "optkern", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert f"active ISA: {ok.active_isa()}" in out
    assert ok.__version__ in out
    for isa in info["isa_flags"]:
        assert isa in out
