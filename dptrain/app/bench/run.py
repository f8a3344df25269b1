"""One benchmark run, in place, on every rank of the current world (collectively)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dptrain.errors import UserError
from dptrain.parallel.agreement import agreed
from dptrain.parallel.sampler import shard
from dptrain.runtime.sysinfo import blas_info, openmp_threads, thread_pools
from dptrain.runtime.threads import describe_threads
from dptrain.training.step import PHASES

from ..build import build_parts, build_trainer
from ..image_cache import prepare_images
from .kernel import BareKernel
from .report import describe_model, make_report
from .request import REFERENCE_PER_RANK_BATCH, BenchRequest

ROUNDS = 5  # the timed steps alternate between trainer and kernel in this many rounds


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _timed(comm, step: Callable[[], Any], steps: int, warmup: int) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` calls, between barriers (rank 0's view)."""
    for _ in range(warmup):
        step()
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    comm.barrier()
    return time.perf_counter() - t0


def run_bench(comm, request: BenchRequest) -> dict[str, Any]:
    """Benchmark the training step on every rank of ``comm`` (collective).

    Returns the report (see :func:`format_table`) with one run; meaningful on rank 0. Set-up errors
    raise ExitQuietly(2) on every rank after rank 0 printed them (comm.raise_if_any_failed).
    """
    steps, warmup = request.steps, request.warmup
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    config = agreed(comm, request.debug, lambda: request.config(comm.size))
    # images: every rank lists them; rank 0 decodes them into the cache if needed while the others wait
    images = prepare_images(config, comm, request.debug) if config.data.name == "images" else None

    def set_up():
        parts = build_parts(config, comm.size, images)
        return parts, build_trainer(config, parts.model, parts.loss, parts.optimizer,
                                                           parts.train_set, None, comm, stop_on_signals=False, log=None)

    parts, trainer = agreed(comm, request.debug, set_up)
    train_set, model = parts.train_set, parts.model

    trainer.check_agreement()
    trainer.broadcast_parameters()
    first = trainer.batch_indices(0)
    position = {"k": 0, "samples": 0}

    def train_step() -> None:  # the run's steps in order, as fit() takes them (data.prefetch prepares them)
        k = position["k"]
        batch = trainer.batch_indices(k)
        trainer.step = k
        position["k"] += 1
        position["samples"] += len(batch)
        trainer.train_step(batch)

    # a non-finite loss or gradient is the trainer's to report; the loader's thread ends however the run does
    with np.errstate(all="ignore"), trainer.batches.running(0, warmup + steps):
        for _ in range(warmup):
            train_step()
        comm.barrier()
        rss = comm.allgather(np.array([peak_rss_mb()], dtype=np.float64))[:, 0]  # before the kernel's arrays
        local_batch = len(shard(first, comm.rank, comm.size))
        bare = BareKernel(model, local_batch, comm, seed=config.seed)
        for _ in range(warmup):
            bare.step()
        phase_mark = trainer.phase_seconds.copy()
        bare.layer_seconds[...] = 0.0
        if request.layers:
            model.layer_seconds = np.zeros((len(model.layers), 2))
        position["samples"] = 0
        elapsed = kernel_elapsed = 0.0
        for r in range(min(ROUNDS, steps)):  # alternate, so drift in the machine's speed hits both alike
            n = steps * (r + 1) // min(ROUNDS, steps) - steps * r // min(ROUNDS, steps)
            elapsed += _timed(comm, train_step, n, 0)
            kernel_elapsed += _timed(comm, bare.step, n, 0)
        samples = position["samples"]
        phases = trainer.phase_seconds - phase_mark
        comm.allreduce_sum(phases)
        phases_ms = phases / comm.size / steps * 1e3
        layers = _layer_table(comm, model, bare, steps) if request.layers else None
        model.layer_seconds = None
        kernel_step = kernel_elapsed / steps
        kernel = {"samples_per_s": len(first) / kernel_step, "step_ms": kernel_step * 1e3,
                  "local_batch": local_batch}

    step_s = elapsed / steps
    pools = thread_pools()
    libs = blas_info(pools)
    threads = libs[0]["num_threads"] if libs else openmp_threads(pools)
    run = {
        "ranks": comm.size,
        "ranks_per_node": comm.local_size,
        "global_batch": len(first),
        "per_rank_batch": len(first) / comm.size,
        "steps": steps,
        "warmup": warmup,
        "elapsed_s": elapsed,
        "samples_per_s": samples / elapsed,
        "step_ms": step_s * 1e3,
        "phases_ms": {name: float(v) for name, v in zip(PHASES, phases_ms)},
        "kernel": kernel,
        "overhead_pct": (100.0 * (step_s * 1e3 - kernel["step_ms"]) / (step_s * 1e3)) if kernel else None,
        "peak_rss_mb": {"max": float(rss.max()), "per_rank": [float(v) for v in rss]},
        "efficiency": 1.0 if comm.size == 1 else None,
        "threads_per_rank": threads,
        "openmp_threads": openmp_threads(pools),
        "threads_set_by": describe_threads(comm.local_size if comm.thread_limit is not None else None),
        "blas": libs,
        "mpi": comm.library,
    }
    if layers is not None:
        run["layers"] = layers
    per_rank = request.per_rank_batch or (REFERENCE_PER_RANK_BATCH if request.config_path is None else None)
    if per_rank is not None and config.train.batch_size != per_rank * comm.size:
        per_rank = None  # --set train.batch_size chose a global batch
    workload = {
        "name": request.config_path or "reference",
        "model": describe_model(model),
        "layers": [layer.describe() for layer in model.layers],
        "n_params": model.n_params,
        "loss": config.train.loss,
        "optimizer": config.to_dict()["optim"],
        "dtype": config.train.dtype,
        "batch": {"per_rank": per_rank} if per_rank is not None else {"global": config.train.batch_size},
        "data": {"source": parts.dataset.source, "n_train": len(train_set)},
        "overrides": list(request.overrides),
        "steps": steps,
        "warmup": warmup,
    }
    return make_report(workload, [run])


def _layer_table(comm, model, bare: BareKernel, steps: int) -> list[dict[str, Any]]:
    """Per layer, the mean milliseconds per step (averaged over the ranks) of its forward and backward
    in the trainer's steps, and of its matrix products in the kernel's."""
    seconds = np.concatenate([model.layer_seconds, bare.layer_seconds[:, None]], axis=1)
    comm.allreduce_sum(seconds)
    ms = seconds / comm.size / steps * 1e3
    return [{"layer": layer.describe(), "output_shape": list(model.shapes[i + 1]), "forward_ms": float(ms[i, 0]),
             "backward_ms": float(ms[i, 1]), "matmul_ms": float(ms[i, 2]) if bare.shapes[i] else None}
            for i, layer in enumerate(model.layers)]
