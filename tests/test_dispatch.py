"""Runtime ISA dispatch: the best ISA by default, OPTKERN_FORCE_ISA to force one, clear errors."""

import os
import platform
import subprocess
import sys

import pytest

import optkern as ok

# The ISA builds of this machine's architecture, from the baseline up (src/cpp/isa_builds.txt).
ARCH_ISAS = {"x86_64": ["scalar", "avx2", "avx512"], "aarch64": ["neon", "sve"]}
ARCH = {"AMD64": "x86_64", "arm64": "aarch64", "ARM64": "aarch64"}.get(
    platform.machine(), platform.machine()
)
ORDER = ARCH_ISAS.get(ARCH, ["scalar"])
OTHER_ARCH_ISAS = [i for isas in ARCH_ISAS.values() for i in isas if i not in ORDER]


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "OPTKERN_FORCE_ISA"}  # CI sets it
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True)


def test_available_isas_are_ordered_and_include_the_baseline():
    isas = ok.available_isas()
    assert isas[0] == ORDER[0]
    assert isas == [i for i in ORDER if i in isas]
    assert ok.active_isa() in isas
    assert set(ok.build_info()["isa_flags"]) <= set(ORDER)


@pytest.mark.spawns
def test_default_is_the_best_available():
    out = run_python("import optkern; print(optkern.active_isa(), optkern.available_isas()[-1])")
    assert out.returncode == 0, out.stderr
    active, best = out.stdout.split()
    assert active == best


@pytest.mark.spawns
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


@pytest.mark.spawns
def test_force_is_case_and_space_insensitive():
    forced = f" {ORDER[0].title()} "
    out = run_python("import optkern; print(optkern.active_isa())", OPTKERN_FORCE_ISA=forced)
    assert out.returncode == 0 and out.stdout.strip() == ORDER[0]


@pytest.mark.spawns
def test_unknown_isa_fails_at_import_with_its_name():
    out = run_python("import optkern", OPTKERN_FORCE_ISA="avx1024")
    assert out.returncode == 1
    assert "ImportError" in out.stderr
    assert "OPTKERN_FORCE_ISA='avx1024' is not an ISA optkern knows" in out.stderr
    assert "scalar, avx2, avx512, neon, sve" in out.stderr


@pytest.mark.spawns
@pytest.mark.parametrize("isa", OTHER_ARCH_ISAS)
def test_isa_of_another_architecture_is_not_built(isa):
    out = run_python("import optkern", OPTKERN_FORCE_ISA=isa)
    assert out.returncode == 1
    assert f"OPTKERN_FORCE_ISA='{isa}': this build of optkern has no {isa} kernels" in out.stderr


def test_fused_builds_are_listed():
    fused = ok.build_info()["fused_multiply_add"]
    assert fused == [i for i in ok.available_isas() if i in fused]
    # aarch64 has fused multiply-add in its base architecture: every build there fuses.
    want = ORDER if ARCH == "aarch64" else [i for i in ORDER if i != "scalar"]
    assert fused == [i for i in want if i in ok.available_isas()]


def test_build_info():
    info = ok.build_info()
    assert info["version"] == ok.__version__
    assert set(info["isa_flags"]) >= set(ok.available_isas())
    assert "-march=native" not in " ".join(info["isa_flags"].values())


@pytest.mark.spawns
def test_cli_info():
    info = ok.build_info()
    out = subprocess.run(
        [sys.executable, "-m", "optkern", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert f"active ISA: {ok.active_isa()}" in out
    assert ok.__version__ in out
    for isa in info["isa_flags"]:
        assert isa in out
