"""What ``dptrain info`` reports: versions, the MPI job, the BLAS and its threads, the machine.

:func:`collect` is collective under MPI (every rank sends its host name, so the nodes can be counted);
the report it returns is the same on every rank, and only rank 0 needs to print it::

    comm = make_comm()
    report = collect(comm)
    if comm.rank == 0:
        print(format_text(report))
"""

from __future__ import annotations

import os
import platform
import sys
from collections import Counter
from importlib import metadata
from typing import Any

import numpy as np

from dptrain._version import __version__

from .threads import (
    available_cores,
    bundled_with,
    describe_threads,
    single_thread_scipys_own_blas,
    threads_per_rank,
    user_set_threads,
)

HOSTNAME_BYTES = 256  # a host name is at most 255 bytes (POSIX HOST_NAME_MAX is 64 on Linux)
#: What :func:`blas_info` reports of each BLAS (threadpoolctl's keys).
BLAS_KEYS = ("internal_api", "version", "architecture", "threading_layer", "num_threads", "prefix")


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None if it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def thread_pools() -> list[dict[str, Any]]:
    """threadpoolctl's snapshot of the BLAS and OpenMP libraries loaded in this process."""
    from threadpoolctl import threadpool_info

    return threadpool_info()


def blas_info(pools: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The BLAS libraries of ``pools`` (default: a new :func:`thread_pools` snapshot): library,
    version, kernel, threads."""
    pools = thread_pools() if pools is None else pools
    return [{k: lib.get(k) for k in BLAS_KEYS} for lib in pools if lib.get("user_api") == "blas"]


def openmp_threads(pools: list[dict[str, Any]] | None = None) -> int | None:
    """The largest thread count of the OpenMP runtimes in ``pools``, or None if none is loaded."""
    pools = thread_pools() if pools is None else pools
    counts = [lib["num_threads"] for lib in pools if lib.get("user_api") == "openmp"]
    return max(counts) if counts else None


def blas_libraries() -> list[dict[str, Any]]:
    """:func:`blas_info` of every BLAS dptrain uses (NumPy's, and SciPy's for the optimizers'
    in-place updates, loaded here if it is not yet, on the one thread the optimizers give a BLAS
    SciPy bundles for itself), each with its file's name and ``bundled_with`` (numpy, scipy or None:
    a shared library); a SciPy-only one comes last."""
    import scipy.linalg.blas  # noqa: F401 - load SciPy's BLAS too, as a training run does

    single_thread_scipys_own_blas()  # as the optimizers do
    libs = []
    for lib in thread_pools():
        if lib.get("user_api") == "blas":
            path = lib.get("filepath") or ""
            libs.append({**{k: lib.get(k) for k in BLAS_KEYS}, "filename": os.path.basename(path),
                         "bundled_with": bundled_with(path)})
    return sorted(libs, key=lambda lib: lib["bundled_with"] == "scipy")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info() -> dict[str, Any]:
    """The CPU's model, the cores this process may use, and the machine's logical CPUs."""
    return {"model": cpu_model(), "cores": available_cores(), "logical_cpus": os.cpu_count()}


def threads(comm, blas: list[dict[str, Any]]) -> tuple[int | None, str]:
    """BLAS/OpenMP threads per rank, and what set them (:func:`dptrain.runtime.threads.describe_threads`):
    the user's variables, dptrain's cap under MPI (``comm.thread_limit``), or the library's default.
    Without a cap, the count is read from the first of ``blas`` (NumPy's, which does the matrix
    products)."""
    how = describe_threads(comm.local_size if comm.is_mpi else None)
    if comm.is_mpi and not user_set_threads(os.environ):
        return comm.thread_limit or threads_per_rank(comm.local_size), how
    return (blas[0]["num_threads"] if blas else None), how


def collect(comm) -> dict[str, Any]:
    """Collective under MPI. The report as plain data (what ``dptrain info --json`` prints)."""
    hosts = [host for host, _ in comm.peers]  # gathered when the communicator was made
    per_node = Counter(hosts)
    blas = blas_libraries()
    n_threads, threads_set_by = threads(comm, blas)
    return {
        "dptrain": __version__,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "numpy": np.__version__,
        "mpi4py": package_version("mpi4py"),
        "mpi": {
            "under_mpi": comm.is_mpi,
            "library": comm.library if comm.is_mpi else None,
            "world_size": comm.size,
            "nodes": len(per_node),
            "ranks_per_node": comm.local_size,  # on rank 0's node (MPI_COMM_TYPE_SHARED)
            "ranks_per_host": dict(per_node),
        },
        "blas": blas,
        "threads_per_rank": n_threads,
        "threads_set_by": threads_set_by,
        "cpu": cpu_info(),
        "hostname": hosts[0],
    }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _owner(blas: dict[str, Any]) -> str:
    return {"numpy": "NumPy's: ", "scipy": "SciPy's: "}.get(blas.get("bundled_with"), "")


def format_text(report: dict[str, Any]) -> str:
    """The report as aligned ``key  value`` lines."""
    m = report["mpi"]
    if m["under_mpi"]:
        counts = sorted(set(m["ranks_per_host"].values()))
        if len(counts) == 1:
            spread = f"{_plural(counts[0], 'rank')} per node"
        else:
            spread = "ranks per node: " + ", ".join(f"{h} {n}" for h, n in m["ranks_per_host"].items())
        library = " ".join(m["library"].split())  # "MPICH Version:      5.0.2" -> "MPICH Version: 5.0.2"
        mpi = f"{library}; {_plural(m['world_size'], 'rank')} on {_plural(m['nodes'], 'node')}, {spread}"
    else:
        mpi = "not under MPI (single process)"
        if m.get("mpi4py_library"):
            mpi += f"; mpi4py is built against {' '.join(m['mpi4py_library'].split())}"
    blas = [f"{b['internal_api']} {b['version']} ({_owner(b)}{b['filename']}, {b['architecture']} kernels, "
            f"{b['threading_layer']})" for b in report["blas"]] or ["none found"]
    n = report["threads_per_rank"]
    cpu = report["cpu"]
    py = report["python"]
    rows = [
        ("dptrain", report["dptrain"]),
        ("Python", f"{py['version']} ({py['implementation']}, {py['executable']})"),
        ("NumPy", report["numpy"]),
        ("mpi4py", report["mpi4py"] or "not installed: single process only (pip install dptrain[mpi])"),
        ("MPI", mpi),
        ("BLAS", blas[0]),
        *(("", line) for line in blas[1:]),
        ("threads", f"{'?' if n is None else n} per rank ({report['threads_set_by']})"),
        ("CPU", f"{cpu['model']}, {_plural(cpu['cores'], 'core')} available to this process "
                f"({cpu['logical_cpus']} on the machine)"),
        ("host", report["hostname"] + (" (rank 0)" if m["under_mpi"] else "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)
