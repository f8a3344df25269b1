"""``dptrain doctor``: checks to run on a new allocation before a long job, one line each.

    dptrain doctor --out runs/big --config digits_cnn
    srun dptrain doctor --out runs/big            # or mpirun -n N, as the job will start

Every rank takes part (collective under MPI); rank 0 prints. Each check is OK, or says the problem
and the fix; :func:`run_checks` returns the lines and whether all passed. The checks: MPI started on
every rank; the hosts and ranks per node; the scheduler's task and CPU counts against what started;
the BLAS threads per rank against the cores; allreduce latency and bus bandwidth at a few sizes (as
nccl-tests' busbw: bytes x 2 (n - 1) / n / time); the collective watchdog's thread on every rank;
the run folder writable and the SAME folder on every node (each rank writes a token, rank 0 looks
for them all: a node-local /tmp fails); and its free space against the checkpoints of the config.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from dptrain.config import load_config
from dptrain.runtime.sysinfo import blas_libraries, threads
from dptrain.runtime.threads import available_cores
from dptrain.runtime.units import format_bytes

from .build import build_model, build_optimizer, load_dataset

ALLREDUCE_SIZES = (8, 1 << 20, 16 << 20)  # bytes: latency, and two sizes for the bandwidth
ALLREDUCE_REPEATS = 5


def run_checks(comm, out: str, config_path: str | None, overrides: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """Collective. (lines, every check passed): rank 0's are the ones to print."""
    results: list[tuple[str, bool, str]] = []  # (check, ok, what it found or the problem and the fix)
    hosts = [host for host, _ in comm.peers]
    per_host = Counter(hosts)
    results.append(_mpi(comm))
    results.append(("hosts", True, f"{len(per_host)} node{'s' if len(per_host) > 1 else ''}: "
                    + ", ".join(f"{h} ({n} rank{'s' if n > 1 else ''})" for h, n in per_host.items())))
    results.append(_scheduler(comm.size, os.environ))
    results.append(_threads(comm, max(per_host.values())))
    results.append(_allreduce(comm))
    results.append(_watchdog(comm))
    results += _run_folder(comm, Path(out), hosts, config_path, overrides)
    lines = [f"{'OK  ' if ok else 'FAIL'}  {name:<12} {text}" for name, ok, text in results]
    return lines, all(ok for _, ok, _ in results)


def _mpi(comm) -> tuple[str, bool, str]:
    if not comm.is_mpi:
        return "mpi", True, "single process (not started by mpirun, mpiexec or srun)"
    answered = int(comm.allreduce_sum(np.ones(1, dtype=np.int64))[0])
    ok = answered == comm.size
    return "mpi", ok, (f"{comm.size} ranks started and answered ({comm.library})" if ok else
                       f"{answered} of {comm.size} ranks answered: check the launcher and the MPI library")


def _watchdog(comm) -> tuple[str, bool, str]:
    """Whether every rank has the watchdog's thread (it needs MPI_THREAD_MULTIPLE to answer while stuck)."""
    if not comm.is_mpi:
        return "watchdog", True, "single process: a stop signal not honoured within comm.timeout_s ends it (exit 124)"
    with_thread = int(comm.allreduce_sum(np.array([int(comm.watchdog.running)], dtype=np.int64))[0])
    if with_thread == comm.size:
        return "watchdog", True, (f"a thread on each of the {comm.size} ranks (MPI_THREAD_MULTIPLE): a collective "
                                  f"waiting longer than comm.timeout_s ends the job (exit 124), naming the ranks")
    return "watchdog", True, (f"{comm.size - with_thread} rank(s) without MPI_THREAD_MULTIPLE check in their own "
                              f"waits: a rank stuck in a step cannot show its stack, but is still named")


def _scheduler(size: int, environ) -> tuple[str, bool, str]:
    """The scheduler's view (Slurm, PBS) against the ranks that started."""
    if "SLURM_JOB_ID" in environ:
        tasks = environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
        cpus = environ.get("SLURM_CPUS_PER_TASK", "1")
        if tasks and int(tasks) != size:
            return "scheduler", False, (f"Slurm job {environ['SLURM_JOB_ID']} has {tasks} tasks but {size} ranks "
                                        f"started: start with srun (or mpirun -n $SLURM_NTASKS)")
        return "scheduler", True, f"Slurm job {environ['SLURM_JOB_ID']}: {tasks or size} tasks, {cpus} CPU(s) per task"
    if "PBS_JOBID" in environ:
        nodefile = environ.get("PBS_NODEFILE")
        slots = len(Path(nodefile).read_text().split()) if nodefile and Path(nodefile).is_file() else None
        if slots is not None and slots != size:
            return "scheduler", False, (f"PBS job {environ['PBS_JOBID']} has {slots} slots but {size} ranks started: "
                                        f"start with mpirun -n {slots}")
        return "scheduler", True, f"PBS job {environ['PBS_JOBID']}: {slots or size} slots"
    return "scheduler", True, "none (no Slurm or PBS job)"


def _threads(comm, ranks_on_busiest_node: int) -> tuple[str, bool, str]:
    n_threads, how = threads(comm, blas_libraries())
    cores = available_cores()
    if n_threads and n_threads * ranks_on_busiest_node > cores:
        return "threads", False, (f"{n_threads} BLAS thread(s) x {ranks_on_busiest_node} ranks on a node of {cores} "
                                  f"cores: oversubscribed; set OMP_NUM_THREADS={max(1, cores // ranks_on_busiest_node)}")
    return "threads", True, f"{n_threads} BLAS thread(s) per rank ({how}), {cores} cores per node"


def _allreduce(comm) -> tuple[str, bool, str]:
    if comm.size == 1:
        return "allreduce", True, "single rank: nothing to exchange"
    parts = []
    for size in ALLREDUCE_SIZES:
        buf = np.ones(max(1, size // 4), dtype=np.float32)
        comm.allreduce_sum(buf)  # warm-up
        comm.barrier()
        start = time.perf_counter()
        for _ in range(ALLREDUCE_REPEATS):
            comm.allreduce_sum(buf)
        seconds = np.array([(time.perf_counter() - start) / ALLREDUCE_REPEATS])
        comm.allreduce_max(seconds)  # the slowest rank's time: what a step waits for
        t = float(seconds[0])
        if size <= 8:
            parts.append(f"latency {t * 1e6:.0f} us")
        else:
            busbw = buf.nbytes * 2 * (comm.size - 1) / comm.size / t
            parts.append(f"{buf.nbytes >> 20} MiB {busbw / 1e9:.2f} GB/s bus bandwidth")
    return "allreduce", True, ", ".join(parts)


def _run_folder(comm, out: Path, hosts: list[str], config_path, overrides) -> list[tuple[str, bool, str]]:
    """The folder writable on every rank, the same on every node, and with room for the checkpoints."""
    nonce = comm.broadcast_text(secrets.token_hex(8) if comm.rank == 0 else "")
    token = out / f".doctor-{nonce}-{comm.rank}"
    wrote = np.zeros(comm.size, dtype=np.int64)
    problem = ""
    try:
        out.mkdir(parents=True, exist_ok=True)
        token.write_text(hosts[comm.rank])
        wrote[comm.rank] = 1
    except OSError as exc:
        problem = exc.strerror or str(exc)
    comm.allreduce_sum(wrote)
    comm.barrier()
    seen = np.array([1 if (out / f".doctor-{nonce}-{r}").exists() else 0 for r in range(comm.size)], dtype=np.int64)
    comm.barrier()
    if wrote[comm.rank]:
        token.unlink(missing_ok=True)
    results = []
    unwritable = [r for r in range(comm.size) if not wrote[r]]
    if unwritable:
        where = ", ".join(f"rank {r} ({hosts[r]})" for r in unwritable)
        detail = problem if comm.rank in unwritable else "not writable"
        return [("run folder", False, f"{out}: {detail} on {where}: choose a folder every rank can write")]
    missing = [r for r in range(comm.size) if not seen[r]]  # rank 0's view decides (broadcast below)
    missing_flag = np.array([len(missing)], dtype=np.int64)
    comm.broadcast(missing_flag)
    if missing_flag[0]:
        elsewhere = sorted({hosts[r] for r in missing}) if comm.rank == 0 else []
        return [("run folder", False, f"{out} is not the same folder on every node (rank 0 does not see the files "
                 f"of {', '.join(elsewhere) or 'other nodes'}): use a shared file system, not a node-local one")]
    results.append(("run folder", True, f"{out}: writable, the same folder on every node"))
    results.append(_free_space(out, config_path, overrides))
    return results


def _free_space(out: Path, config_path, overrides) -> tuple[str, bool, str]:
    """Free space against keep + 1 checkpoints of the config's model and optimizer (one is written before
    the oldest is pruned)."""
    config = load_config(config_path, overrides)
    dataset = load_dataset(config)
    model = build_model(config, dataset.n_features, dataset.n_outputs, init=False, data_shape=dataset.sample_shape)
    optimizer = build_optimizer(config, model)
    one = model.param_buffer.nbytes + model.state_buffer.nbytes + sum(a.nbytes for a in optimizer.state_dict().values())
    needed = one * (config.checkpoint.keep + 1)
    free = shutil.disk_usage(out).free
    text = f"{format_bytes(free)} free, checkpoints need {format_bytes(needed)} ({config.checkpoint.keep} kept + 1 being written)"
    if free < needed:
        return "free space", False, text + ": free some space, lower checkpoint.keep, or choose another folder"
    return "free space", True, text
