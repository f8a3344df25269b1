#!/bin/bash
# Run `dptrain train` on every MPI slot of a PBS Pro or Torque job.
#
# Submit from the repository root (the script changes to the folder you submitted from):
#   qsub launch/pbs.sh
#   qsub -l select=2:ncpus=4:mpiprocs=4 launch/pbs.sh
#   qsub -v DPTRAIN_CONFIG=my.toml,DPTRAIN_OUT=runs/big launch/pbs.sh
# Torque uses nodes/ppn instead of select: qsub -l nodes=2:ppn=4 launch/pbs.sh
# Arguments for `dptrain train`: Torque passes them with qsub -F "--set train.epochs=50";
# run directly (e.g. inside `qsub -I`), `bash launch/pbs.sh --set train.epochs=50` passes them
# verbatim (a later --config/--out wins).
#
# PBS does not export your shell environment unless you give qsub -V: activate your virtualenv
# or load your MPI module below, or set DPTRAIN_PYTHON.
#
# Environment:
#   DPTRAIN_CONFIG  TOML config [configs/digits_mlp.toml]; set it empty for the built-in default
#   DPTRAIN_OUT     run folder [runs/pbs-$PBS_JOBID]
#   DPTRAIN_NP      number of ranks [the number of lines of $PBS_NODEFILE]
#   DPTRAIN_MPIRUN  launcher [mpiexec], run as `$DPTRAIN_MPIRUN -n $NP -hostfile $PBS_NODEFILE ...`
#   DPTRAIN_HOSTFILE_FLAG
#                   the launcher's host-file option [-hostfile, which Open MPI and MPICH accept];
#                   set it empty to pass no host file (a launcher that reads the PBS allocation)
#   DPTRAIN_PYTHON  if set, run `$DPTRAIN_PYTHON -m dptrain` instead of the `dptrain` on PATH
#   OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS
#                   BLAS/OpenMP threads per rank [$OMP_NUM_THREADS, else 1]
#
#PBS -N dptrain
#PBS -S /bin/bash
#PBS -l select=1:ncpus=4:mpiprocs=4
#PBS -l walltime=01:00:00
#PBS -j oe
#PBS -r y

set -euo pipefail

if [[ -n "${PBS_O_WORKDIR:-}" ]]; then
    cd "$PBS_O_WORKDIR"
fi

nodefile=${PBS_NODEFILE:-}
if [[ -n "${DPTRAIN_NP:-}" ]]; then
    np=$DPTRAIN_NP
elif [[ -n "$nodefile" ]]; then
    np=$(wc -l < "$nodefile")
    np=${np//[[:space:]]/}
else
    echo "pbs.sh: neither PBS_NODEFILE nor DPTRAIN_NP is set: submit this script with qsub" >&2
    exit 2
fi
if ! [[ "$np" =~ ^[0-9]+$ ]] || (( 10#$np < 1 )); then
    echo "pbs.sh: number of ranks '$np' is not a positive integer" >&2
    exit 2
fi

config=${DPTRAIN_CONFIG-configs/digits_mlp.toml}
out=${DPTRAIN_OUT:-runs/pbs-${PBS_JOBID:-$$}}
launcher=${DPTRAIN_MPIRUN:-mpiexec}
hostfile_flag=${DPTRAIN_HOSTFILE_FLAG--hostfile}

# The threads of a chunk (ncpus / mpiprocs) are not reliably known here: keep what PBS or the
# user set, else one thread per rank.
threads=${OMP_NUM_THREADS:-1}
export OMP_NUM_THREADS="$threads"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-$threads}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$threads}"

if [[ -n "${DPTRAIN_PYTHON:-}" ]]; then
    dptrain=("$DPTRAIN_PYTHON" -m dptrain)
elif found=$(command -v dptrain); then
    dptrain=("$found")
else
    dptrain=(python3 -m dptrain)
fi

cmd=("$launcher" -n "$np")
if [[ -n "$hostfile_flag" && -n "$nodefile" ]]; then
    cmd+=("$hostfile_flag" "$nodefile")
fi
cmd+=("${dptrain[@]}" train)
if [[ -n "$config" ]]; then
    cmd+=(--config "$config")
fi
cmd+=(--out "$out" "$@")

echo "dptrain job ${PBS_JOBID:-?}: $np ranks, $OMP_NUM_THREADS thread(s) per rank" >&2
printf 'running:' >&2
printf ' %q' "${cmd[@]}" >&2
printf '\n' >&2

# exec: mpiexec replaces this shell, so its exit status (dptrain's) is the job's.
exec "${cmd[@]}"
