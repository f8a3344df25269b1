"""The BLAS/OpenMP threads of each rank: how many, and capping them in this process.

Used by the launchers (the thread variables to set for N ranks on a node), by a bare ``mpirun
dptrain`` (threadpoolctl caps in the process), and by ``dptrain info`` and ``bench`` to say why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

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


def describe_threads(ranks_per_node: int | None, environ: Mapping[str, str] | None = None,
                     cores: int | None = None) -> str:
    """What sets a rank's BLAS/OpenMP threads, as ``dptrain info`` and ``dptrain bench`` word it.

    "set by OMP_NUM_THREADS=2" when the user set a thread variable (dptrain then sets none);
    else, for ``ranks_per_node`` ranks sharing a node, dptrain's choice: "dptrain: " and the
    explanation of :func:`thread_choice`; else (``ranks_per_node`` None: a single process, which
    dptrain does not cap) the BLAS's default.
    """
    env = os.environ if environ is None else environ
    if user_set_threads(env):
        return "set by " + ", ".join(f"{v}={env[v]}" for v in THREAD_VARIABLES if env.get(v))
    if ranks_per_node is None:
        return "the BLAS's default: dptrain sets none for a single process"
    return "dptrain: " + thread_choice(ranks_per_node, cores, env)[1]


def thread_setup(n_ranks: int, environ: Mapping[str, str] | None = None,
                 cores: int | None = None) -> tuple[dict[str, str], str]:
    """:func:`thread_environment` and what set the threads (:func:`describe_threads`), for a
    launcher that starts ``n_ranks`` ranks on this node with that environment added."""
    env = os.environ if environ is None else environ
    if user_set_threads(env):
        return {}, describe_threads(n_ranks, env, cores)
    n, how = thread_choice(n_ranks, cores, env)
    return {v: str(n) for v in THREAD_VARIABLES}, f"dptrain: {how}"


def thread_environment(n_ranks: int, environ: Mapping[str, str] | None = None,
                       cores: int | None = None) -> dict[str, str]:
    """Thread variables to add for ``n_ranks`` ranks on this node; {} if the user set any."""
    return thread_setup(n_ranks, environ, cores)[0]


def bundled_with(filepath: str) -> str | None:
    """"numpy" or "scipy" for a library a pip wheel bundles (numpy.libs/, scipy/.dylibs/ ...), else None.

    A BLAS bundled with SciPy is SciPy's own (the optimizers' in-place updates use it), not NumPy's.
    """
    parts = (filepath or "").replace("\\", "/").split("/")
    for package in ("numpy", "scipy"):
        if f"{package}.libs" in parts or (package in parts and ".dylibs" in parts):
            return package
    return None


def single_thread_scipys_own_blas() -> None:
    """One thread for a BLAS that SciPy bundles for itself (pip wheels), not the one NumPy uses: what
    the optimizers run their in-place updates with. Where SciPy shares NumPy's BLAS, nothing changes."""
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().lib_controllers:
        if bundled_with(lib.filepath) == "scipy":
            lib.set_num_threads(1)


def limit_threads_in_process(ranks_per_node: int) -> int | None:
    """For a bare ``mpirun dptrain``: cap BLAS/OpenMP threads of this rank with threadpoolctl,
    unless the user set a thread variable. Returns the cap applied, or None.

    A library bundled with SciPy is left out: the optimizers run SciPy's own BLAS on one thread
    (:mod:`dptrain.optim`), whatever the cap.
    """
    if user_set_threads(os.environ):
        return None
    n = threads_per_rank(ranks_per_node)
    import scipy.linalg.blas  # noqa: F401 - load every BLAS dptrain uses, so the limit reaches one SciPy shares
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().lib_controllers:
        if bundled_with(lib.filepath) != "scipy":
            lib.set_num_threads(n)
    return n
