"""Launching: the mpiexec argv and the BLAS/OpenMP threads per rank.

The command is an argv list handed to ``subprocess`` without a shell, so a path or a config value
with spaces or shell metacharacters reaches dptrain verbatim.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Mapping

from .errors import UserError

#: Variables that size the thread pools of OpenMP and the BLAS libraries NumPy may use.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def user_set_threads(environ: Mapping[str, str]) -> bool:
    return any(environ.get(v) for v in THREAD_VARIABLES)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def threads_per_rank(ranks_per_node: int, cores: int | None = None,
                     environ: Mapping[str, str] | None = None) -> int:
    """max(1, cores / ranks per node): Slurm's cpus-per-task if given, PBS's NCPUS (the cores of the
    node's chunk) shared by the ranks on the node, else the cores this process may use."""
    return thread_choice(ranks_per_node, cores, environ)[0]


def thread_choice(ranks_per_node: int, cores: int | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """:func:`threads_per_rank` and how it was found, e.g. (4, "SLURM_CPUS_PER_TASK=4")."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        n = max(1, int(env["SLURM_CPUS_PER_TASK"]))
        return n, f"SLURM_CPUS_PER_TASK={env['SLURM_CPUS_PER_TASK']}"
    k = max(1, ranks_per_node)
    per_node = f"{k} rank{'s' if k > 1 else ''} per node"
    if env.get("NCPUS", "").isdigit() and "PBS_JOBID" in env:
        n = max(1, int(env["NCPUS"]) // k)
        return n, f"max(1, NCPUS={env['NCPUS']} (PBS) / {per_node})"
    cores = available_cores() if cores is None else cores
    return max(1, cores // k), f"max(1, {cores} cores / {per_node})"


def thread_environment(n_ranks: int, environ: Mapping[str, str] | None = None,
                       cores: int | None = None) -> dict[str, str]:
    """Thread variables to add for ``n_ranks`` ranks on this node; {} if the user set any."""
    env = os.environ if environ is None else environ
    if user_set_threads(env):
        return {}
    n = str(threads_per_rank(n_ranks, cores, env))
    return {v: n for v in THREAD_VARIABLES}


def find_mpiexec(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``--mpirun``, else ``DPTRAIN_MPIRUN``, else mpiexec/mpirun next to this Python, else on PATH."""
    env = os.environ if environ is None else environ
    chosen = explicit or env.get("DPTRAIN_MPIRUN")
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise UserError(f"--mpirun {chosen}: not found or not executable")
        return found
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        if os.access(here / name, os.X_OK):
            return str(here / name)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name, path=env.get("PATH"))
        if found:
            return found
    raise UserError("no mpiexec or mpirun found: install dptrain[mpi], load your site's MPI module, "
                    "or pass --mpirun PATH")


def build_command(mpiexec: str, n_ranks: int, train_args: list[str] | tuple[str, ...],
                  python: str | None = None) -> list[str]:
    """The argv that runs ``dptrain train TRAIN_ARGS`` on ``n_ranks`` ranks."""
    if n_ranks < 1:
        raise UserError(f"-n {n_ranks}: the number of ranks must be >= 1")
    return [mpiexec, "-n", str(n_ranks), python or sys.executable, "-m", "dptrain", "train", *train_args]


def limit_threads_in_process(ranks_per_node: int) -> int | None:
    """For a bare ``mpirun dptrain``: cap BLAS/OpenMP threads of this rank with threadpoolctl,
    unless the user set a thread variable. Returns the cap applied, or None."""
    if user_set_threads(os.environ):
        return None
    n = threads_per_rank(ranks_per_node)
    import scipy.linalg.blas  # noqa: F401 - load every BLAS dptrain uses (SGD's), so the limit reaches it too
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)
    return n
