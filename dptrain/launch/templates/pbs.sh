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
#   DPTRAIN_CONFIG  TOML config [digits_mlp, a built-in config]; set it empty for the built-in default
#   DPTRAIN_OUT     run folder [runs/pbs-$PBS_JOBID]
#   DPTRAIN_NP      number of ranks [the number of lines of $PBS_NODEFILE]
#   DPTRAIN_MPIRUN  launcher [mpiexec], run as `$DPTRAIN_MPIRUN -n $NP -hostfile $PBS_NODEFILE ...`
#   DPTRAIN_HOSTFILE_FLAG
#                   the launcher's host-file option [-hostfile, which Open MPI and MPICH accept];
#                   set it empty to pass no host file (a launcher that reads the PBS allocation)
#   DPTRAIN_PYTHON  if set, run `$DPTRAIN_PYTHON -m dptrain` instead of the `dptrain` on PATH
#   DPTRAIN_PBS_SCRIPT
#                   this script, to resubmit [$PBS_O_WORKDIR/launch/pbs.sh] (PBS runs a copy)
#   DPTRAIN_REQUEUE_CMD
#                   command that submits the continuation [qsub]; `-v DPTRAIN_CONFIG=...,
#                   DPTRAIN_OUT=...,<the other DPTRAIN_ variables set> $DPTRAIN_PBS_SCRIPT` is
#                   appended. The #PBS lines of the script apply to it, not the -l options you gave
#                   qsub: set e.g. "qsub -l select=2:ncpus=4:mpiprocs=4" to keep them; `true` turns
#                   resubmission off (see #PBS -r below)
#   OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS
#                   BLAS/OpenMP threads per rank [$OMP_NUM_THREADS, else 1]
#
# Preemption, qdel, walltime: dptrain always runs with `--resume auto`, so a job continues from
# the newest valid checkpoint of its run folder. On preemption, qdel or the end of the walltime,
# PBS sends SIGTERM to every process of the job's session, then SIGKILL after a grace period
# (kill_delay: 10 s by default in PBS Pro; `qdel -W SECONDS` for one job): the checkpoint must be
# written within it. mpiexec, in that session, relays the SIGTERM to every rank; dptrain stops
# after the current step, writes a checkpoint and exits with 75. This shell traps SIGTERM and
# SIGUSR1 (`qsig -s USR1 JOBID` also stops the run) only to stay alive: it does not pass them on,
# since mpiexec got them from PBS already (dptrain ignores a repeat within 0.5 s, but a later one
# makes it quit at once, without a checkpoint). Signal the job (qdel, qsig), not this shell alone.
# On 75 the script submits a new job that continues the SAME run folder (qsub -v with DPTRAIN_OUT
# and DPTRAIN_CONFIG=DPTRAIN_OUT/config.toml, the run's resolved config: the arguments given to
# this script are not passed on, but their --set values are in that config) and exits 0.
# qdel sends SIGTERM too, so a deleted job is resubmitted: qdel its (queued) successor as well, or
# end the run without a checkpoint with `qsig -s KILL JOBID`.
#
# Exit status of the job:
#   0   training finished, or dptrain stopped with a checkpoint (75) and a continuation was
#       submitted
#   75  dptrain stopped with a checkpoint but the resubmission failed: run the script again
#       with DPTRAIN_OUT set to the run folder to continue
#   1   a crash (a rank's traceback is in the log)      2  bad input: config, data, options
#   3   the run diverged (NaN/inf) or the ranks went out of sync
#   other: the launcher's, e.g. 128+N when it was killed by signal N
#
#PBS -N dptrain
#PBS -S /bin/bash
#PBS -l select=1:ncpus=4:mpiprocs=4
#PBS -l walltime=01:00:00
#PBS -j oe
# Rerunnable: PBS may rerun the job after a node failure. Where the site preempts by requeueing,
# PBS reruns this job itself: set DPTRAIN_REQUEUE_CMD=true so that no second copy is submitted.
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

config=${DPTRAIN_CONFIG-digits_mlp}
out=${DPTRAIN_OUT:-runs/pbs-${PBS_JOBID:-$$}}
launcher=${DPTRAIN_MPIRUN:-mpiexec}
hostfile_flag=${DPTRAIN_HOSTFILE_FLAG--hostfile}

# This script sets the threads per rank, not dptrain: OMP_NUM_THREADS as PBS (PBS Pro sets it, to the
# chunk's ompthreads if you give one) or you set it, else 1, exported for the BLAS libraries too. With
# one of these set, dptrain leaves a rank's threads alone (`dptrain info` in the job says "set by
# OMP_NUM_THREADS=..."); its own choice, NCPUS / ranks per node, applies only where none is set (e.g.
# a bare `mpirun dptrain` in an interactive job). T threads per rank: select=...:mpiprocs=R:ompthreads=T.
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
cmd+=(--out "$out" --resume auto "$@")

requeue_words=${DPTRAIN_REQUEUE_CMD:-qsub}
read -r -a requeue <<< "$requeue_words"
script=${DPTRAIN_PBS_SCRIPT:-${PBS_O_WORKDIR:-$PWD}/launch/pbs.sh}

echo "dptrain job ${PBS_JOBID:-?}: $np ranks, $OMP_NUM_THREADS thread(s) per rank" >&2
printf 'running:' >&2
printf ' %q' "${cmd[@]}" >&2
printf '\n' >&2

# mpiexec runs in the background so that this shell can survive PBS's signals (see above) and
# resubmit the job once dptrain has written its checkpoint.
interrupted=
on_signal() {  # $1: the signal this shell received
    interrupted=1
    echo "dptrain job ${PBS_JOBID:-?}: got SIG$1 (PBS signals mpiexec too): waiting for dptrain" >&2
}
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1

"${cmd[@]}" &
launcher_pid=$!

# `wait` returns early (status > 128) when a trapped signal arrives: wait again until the launcher
# has ended. Bash keeps an ended child's status for the next `wait`; 127 means the previous wait
# had already collected it (the launcher died of a signal just as one arrived here).
status=0
previous=
while :; do
    interrupted=
    status=0
    wait "$launcher_pid" 2>/dev/null || status=$?
    if [[ -n "$interrupted" ]] && (( status > 128 )); then
        previous=$status
        continue
    fi
    if (( status == 127 )) && [[ -n "$previous" ]]; then
        status=$previous
    fi
    break
done

if (( status != 75 )); then
    exit "$status"
fi

# Resubmit: the same run folder, and the run's resolved config (it includes any --set overrides).
resolved=$config
if [[ -f "$out/config.toml" ]]; then
    resolved=$out/config.toml
fi
qsub_value() {  # NAME=VALUE for qsub -v; a value with a comma goes in single quotes
    if [[ "$2" == *,* ]]; then
        printf "%s='%s'" "$1" "$2"
    else
        printf '%s=%s' "$1" "$2"
    fi
}
variables="$(qsub_value DPTRAIN_CONFIG "$resolved"),$(qsub_value DPTRAIN_OUT "$out")"
for name in DPTRAIN_NP DPTRAIN_MPIRUN DPTRAIN_HOSTFILE_FLAG DPTRAIN_PYTHON DPTRAIN_PBS_SCRIPT \
            DPTRAIN_REQUEUE_CMD; do
    if [[ -n "${!name+set}" ]]; then
        variables+=",$(qsub_value "$name" "${!name}")"
    fi
done
echo "dptrain job ${PBS_JOBID:-?}: stopped with a checkpoint in $out; resubmitting:" \
     "${requeue[*]} -v $variables $script" >&2
if [[ ! -f "$script" ]]; then
    echo "dptrain job ${PBS_JOBID:-?}: $script not found (set DPTRAIN_PBS_SCRIPT); to continue:" \
         "qsub -v DPTRAIN_OUT=$out launch/pbs.sh" >&2
    exit 75
fi
if ! "${requeue[@]}" -v "$variables" "$script"; then
    echo "dptrain job ${PBS_JOBID:-?}: resubmission failed; to continue:" \
         "qsub -v DPTRAIN_OUT=$out launch/pbs.sh" >&2
    exit 75
fi
exit 0
