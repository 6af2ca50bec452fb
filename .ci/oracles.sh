#!/usr/bin/env bash
# The oracle stage: the tests that compare optkern with other libraries (torch.optim and its own
# optimizer test database, torch's schedulers and clipping, optkern.torch; jax/optax,
# schedulefree, scikit-learn, Keras, bitsandbytes' blockwise quantisation, and bitsandbytes' and
# torchao's optimizers as the precision study times them, where tests use them) run with those
# libraries installed, and fail, rather than skip, when one of them does not import.
#
#   bash .ci/oracles.sh [PYTHON]
#
# PYTHON: the interpreter of a virtual environment where optkern (with its test extras) is
# installed already, e.g. .ci-venv/bin/python after the install stage of .ci/run; the oracles are
# installed into that environment. Without it, the script makes its own environment
# (.ci-venv-oracles), installs the oracles into it, then optkern with its test extras: the wheel
# whose path .ci/run writes into the file OPTKERN_CI_WHEEL_FILE names (waiting for it: the
# oracles install while .ci/run builds), or else '.[test]' built here.
#
# torch is pinned to 2.13.0: the CPU-only wheel (an unpinned torch would pull a multi-GB CUDA
# build). expecttest is a test-only dependency of torch's optimizer test database
# (torch.testing._internal.common_optimizers). torchao is pinned beside torch: it declares no torch
# requirement, and each of its releases needs a recent torch (0.18.0 refuses torch below 2.11)
# while the lane's torch stays at 2.13.0. Its optimizers compile their step with torch.compile,
# which needs the C++ compiler this machine builds optkern with.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0

oracles=("torch==2.13.0" expecttest "jax[cpu]" optax schedulefree lion-pytorch scikit-learn keras
         bitsandbytes "torchao==0.18.0")
# Keras 3 (the oracle of the textbook forms) runs on jax here; without it, it would look for
# tensorflow and fail to import, which fails this stage.
export KERAS_BACKEND=jax
if [[ $# -ge 1 ]]; then
  py=$1
  echo "== oracles into $py"
  "$py" -m pip install "${oracles[@]}"
else
  python3 -m venv .ci-venv-oracles
  py=.ci-venv-oracles/bin/python
  "$py" -m pip install --upgrade pip >/dev/null
  echo "== oracles into $py"
  "$py" -m pip install "${oracles[@]}"
  if [[ -n ${OPTKERN_CI_WHEEL_FILE:-} ]]; then
    echo "   installed in ${SECONDS}s; waiting for the wheel (.ci/run builds it)"
    while [[ ! -s $OPTKERN_CI_WHEEL_FILE ]]; do sleep 2; done
    wheel=$(cat "$OPTKERN_CI_WHEEL_FILE")
    echo "== $wheel with its test extras into $py (at ${SECONDS}s)"
    "$py" -m pip install "${wheel}[test]"
  else
    # its own build directory: .ci/run may build other environments at the same time
    "$py" -m pip install ".[test]" -C build-dir=build/oracles
  fi
fi
echo "   installed in ${SECONDS}s"

# Every test file that imports an oracle or takes one from the optimizer database (tests/optim_db.py),
# beside the ones known today; of those, the tests marked `oracle` (tests/conftest.py: the ones that
# import an oracle, and every test of a module that imports one at its top). The files' other
# tests run in the main lane; one that skips for a missing oracle without the mark fails there.
files=(tests/test_torch_parity.py tests/test_lr_scheduler_torch.py tests/test_clip.py
       tests/test_torch_adapter.py tests/test_oracle_parity.py)
while IFS= read -r f; do
  [[ " ${files[*]} " == *" $f "* ]] || files+=("$f")
done < <(grep -lE "importorskip\(\s*[\"'](torch|jax|optax|schedulefree|lion_pytorch|sklearn|keras|bitsandbytes|torchao)|with_oracle\(|\.oracle\(" tests/test_*.py | sort)

echo "== oracle tests: ${files[*]}"
start=$SECONDS
PYTHONPATH="$PWD/.ci${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest -q -p no:cacheprovider \
  -p require_oracles -rs -m "oracle and not slow" "${files[@]}"
echo "== oracle stage: tests $((SECONDS - start))s, total ${SECONDS}s; CPU (user system, this shell then its children):"
times
