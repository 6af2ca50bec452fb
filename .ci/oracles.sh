#!/usr/bin/env bash
# The oracle stage: the tests that compare optkern with other libraries (torch.optim and its own
# optimizer test database, torch's schedulers and clipping, optkern.torch; jax/optax,
# schedulefree and scikit-learn where tests use them) run with those libraries installed, and
# fail, rather than skip, when one of them does not import.
#
#   bash .ci/oracles.sh [PYTHON]
#
# PYTHON: the interpreter of a virtual environment where optkern (with its test extras) is
# installed already, e.g. .ci-venv/bin/python after the install stage of .ci/run; the oracles are
# installed into that environment. Without it, the script makes its own environment
# (.ci-venv-oracles) and installs '.[test]' into it first.
#
# torch is pinned to 2.13.0: the CPU-only wheel (an unpinned torch would pull a multi-GB CUDA
# build). expecttest is a test-only dependency of torch's optimizer test database
# (torch.testing._internal.common_optimizers).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0

if [[ $# -ge 1 ]]; then
  py=$1
else
  python3 -m venv .ci-venv-oracles
  py=.ci-venv-oracles/bin/python
  "$py" -m pip install --upgrade pip >/dev/null
  # its own build directory: .ci/run builds the other environments at the same time
  "$py" -m pip install ".[test]" -C build-dir=build/oracles
fi

echo "== oracles into $py"
"$py" -m pip install "torch==2.13.0" expecttest "jax[cpu]" optax schedulefree lion-pytorch scikit-learn
echo "   installed in ${SECONDS}s"

# Every test file that imports an oracle, beside the ones known today.
files=(tests/test_torch_parity.py tests/test_lr_scheduler_torch.py tests/test_clip.py
       tests/test_torch_adapter.py tests/test_oracle_parity.py)
while IFS= read -r f; do
  [[ " ${files[*]} " == *" $f "* ]] || files+=("$f")
done < <(grep -lE "importorskip\(\s*[\"'](torch|jax|optax|schedulefree|lion_pytorch|sklearn)" tests/*.py | sort)

echo "== oracle tests: ${files[*]}"
start=$SECONDS
PYTHONPATH="$PWD/.ci${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest -q -p no:cacheprovider \
  -p require_oracles -rs "${files[@]}"
echo "== oracle stage: tests $((SECONDS - start))s, total ${SECONDS}s"
