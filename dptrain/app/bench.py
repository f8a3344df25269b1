"""``dptrain bench``: throughput of the training step, where its time goes, and how it scales.

One run (every rank of the current world, collectively)::

    config  = the reference workload, or a config file; --set overrides apply to both
    trainer = build_trainer(config, ...)                  # honours every training key of the config
    the bare kernel of the same step: the matrix multiplies of forward and backward on preallocated arrays
    and one Allreduce of a flat buffer of the parameter count
    warmup steps of each; then ROUNDS rounds, each timing steps / ROUNDS calls of trainer.train_step(batch)
    and as many kernel steps (between barriers), so both see the same machine, side by side
    -> global samples/s, the step split into forward, backward, exchange and optimizer (Trainer.phase_seconds),
       peak resident memory of each rank (after the trainer's warmup: its steady state),
       the trainer's overhead over the kernel

With ``-n 1,2,4`` (outside MPI) one ``mpiexec -n N python -m dptrain bench --json`` child runs per N, and
the rows are merged with scaling efficiency = samples/s(N) / (N x samples/s(1)).

The reference workload: MLP 784-1024-1024-10, ReLU, softmax cross-entropy, SGD lr 0.01 momentum 0.9,
float32, 256 samples per rank per step, synthetic data.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dptrain._version import __version__
from dptrain.config import Config, load_config
from dptrain.errors import CollectiveError, ExitQuietly, UserError
from dptrain.launch.mpiexec import build_command, find_mpiexec
from dptrain.nn import Dense, ReLU, Sigmoid, Tanh
from dptrain.parallel.comm import refuse_under_mpi
from dptrain.parallel.sampler import epoch_order, global_batch, shard
from dptrain.runtime.sysinfo import blas_info, cpu_info, openmp_threads, thread_pools
from dptrain.runtime.threads import describe_threads, thread_setup
from dptrain.training.trainer import PHASES

from .build import build_parts, build_trainer

REFERENCE_PER_RANK_BATCH = 256
REFERENCE_BATCHES = 4  # the synthetic reference data holds this many global batches; steps cycle over them
#: The reference workload as config overrides; --set overrides are applied after these.
REFERENCE_SETTINGS = (
    "data.name=\"synthetic\"", "data.n_features=784", "data.n_classes=10", "data.val_fraction=0.0",
    "model.hidden=[1024, 1024]", "model.activation=\"relu\"", "train.loss=\"cross_entropy\"",
    "train.dtype=\"float32\"", "optim.name=\"sgd\"", "optim.lr=0.01", "optim.momentum=0.9",
    "optim.nesterov=false", "optim.weight_decay=0.0",
)
ROUNDS = 5  # the timed steps alternate between trainer and kernel in this many rounds


# ---------------------------------------------------------------------------------------------
# The workload

def bench_config(config_path: str | None, overrides: tuple[str, ...] | list[str], world_size: int,
                 per_rank_batch: int | None) -> Config:
    """The config one run at ``world_size`` ranks trains.

    Without ``config_path``: the reference workload with ``per_rank_batch`` (default 256) samples per
    rank per step, i.e. train.batch_size = per_rank_batch x world_size, on synthetic data of
    REFERENCE_BATCHES global batches. With ``config_path``: that config; its train.batch_size is the
    global batch unless ``per_rank_batch`` is given. ``overrides`` (--set) apply last, in both cases.
    """
    overrides = list(overrides)
    if config_path is None:
        batch = (per_rank_batch or REFERENCE_PER_RANK_BATCH) * world_size
        base = [*REFERENCE_SETTINGS, f"train.batch_size={batch}"]
        first = load_config(None, base + overrides)  # the batch size after --set
        n_samples = REFERENCE_BATCHES * first.train.batch_size
        return load_config(None, [*base, f"data.n_samples={n_samples}", *overrides])
    if per_rank_batch is not None:
        return load_config(config_path, [f"train.batch_size={per_rank_batch * world_size}", *overrides])
    return load_config(config_path, overrides)


def describe_model(model) -> str:
    """``MLP 784-1024-1024-10 relu`` for a Dense/activation stack, else the layers' descriptions."""
    layers = kernel_layers(model)
    if layers is None:
        return " -> ".join(layer.describe() for layer in model.layers)
    widths = [model.in_features] + [w.shape[1] for kind, w in layers if kind == "dense"]
    activations = sorted({kind for kind, _ in layers if kind != "dense"})
    return f"MLP {'-'.join(map(str, widths))}" + (f" {'/'.join(activations)}" if activations else "")


# ---------------------------------------------------------------------------------------------
# Threads, BLAS, memory

def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------------------------------------
# The bare kernel: the matrix multiplies and the allreduce alone

_ACTIVATION_KINDS = ((ReLU, "relu"), (Tanh, "tanh"), (Sigmoid, "sigmoid"))


def kernel_layers(model) -> list[tuple[str, np.ndarray | None]] | None:
    """[("dense", weight) | ("relu"|"tanh"|"sigmoid", None), ...] for a Dense + activation stack;
    None for a model with any other layer (no bare kernel is derived for it)."""
    out: list[tuple[str, np.ndarray | None]] = []
    for layer in model.layers:
        if isinstance(layer, Dense):
            out.append(("dense", layer.params["weight"]))
            continue
        kind = next((name for cls, name in _ACTIVATION_KINDS if type(layer) is cls), None)
        if kind is None:
            return None
        out.append((kind, None))
    if not any(kind == "dense" for kind, _ in out):
        return None
    return out


def _activate(kind: str, a: np.ndarray) -> None:
    if kind == "relu":
        np.maximum(a, 0, out=a)
    elif kind == "tanh":
        np.tanh(a, out=a)
    else:  # sigmoid = (1 + tanh(a / 2)) / 2, in place
        a *= 0.5
        np.tanh(a, out=a)
        a += 1
        a *= 0.5


class BareKernel:
    """The step's math alone, on preallocated arrays of the model's shapes, for ``local_batch`` rows.

    Forward: x @ W1, activation in place, @ W2, ..., @ Wk. Backward: dWk = a_{k-1}.T @ dz,
    da_{k-1} = dz @ Wk.T, ..., dW1 = x.T @ da_1 (no gradient for the input), the weight gradients
    being views into one flat buffer of the model's parameter count, then one in-place Allreduce of it.
    No loss, bias, activation backward or optimizer update.
    """

    def __init__(self, model, local_batch: int, comm, seed: int = 0) -> None:
        layers = kernel_layers(model)
        if layers is None:
            raise ValueError("the bare kernel needs a stack of Dense and activation layers")
        dtype = model.dtype
        rng = np.random.default_rng(seed)
        self.comm = comm
        self.flat = np.zeros(model.n_params, dtype=dtype)  # the gradient exchanged, as the trainer's
        self.x = rng.standard_normal((local_batch, model.in_features)).astype(dtype)
        self.weights, self.grads, self.acts, self.kinds = [], [], [], []
        offset, width = 0, model.in_features
        for kind, w in layers:
            if kind != "dense":
                if self.kinds:
                    self.kinds[-1] = kind  # the activation applied to the previous Dense's output
                continue
            fan_in, fan_out = w.shape
            self.weights.append((rng.standard_normal(w.shape) * math.sqrt(2.0 / fan_in)).astype(dtype))
            self.grads.append(self.flat[offset : offset + w.size].reshape(w.shape))
            offset += w.size + fan_out  # the bias follows the weight in the flat buffer
            self.acts.append(np.empty((local_batch, fan_out), dtype=dtype))
            self.kinds.append(None)
            width = fan_out
        self.dz = (rng.standard_normal((local_batch, width)) / max(1, local_batch)).astype(dtype)
        # gradients of the hidden activations, one per Dense but the first
        self.dacts = [np.empty_like(a) for a in self.acts[:-1]]

    def step(self) -> None:
        h = self.x
        for w, a, kind in zip(self.weights, self.acts, self.kinds):
            np.matmul(h, w, out=a)
            if kind is not None:
                _activate(kind, a)
            h = a
        d = self.dz
        for i in range(len(self.weights) - 1, -1, -1):
            inp = self.acts[i - 1] if i > 0 else self.x
            np.matmul(inp.T, d, out=self.grads[i])
            if i > 0:
                np.matmul(d, self.weights[i].T, out=self.dacts[i - 1])
                d = self.dacts[i - 1]
        self.comm.allreduce_sum(self.flat)


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


# ---------------------------------------------------------------------------------------------
# One run, in place, on every rank of ``comm``

def run_bench(comm, config_path: str | None = None, overrides: tuple[str, ...] | list[str] = (),
              steps: int = 100, warmup: int = 10, per_rank_batch: int | None = None,
              debug: bool = False) -> dict[str, Any]:
    """Benchmark the training step on every rank of ``comm`` (collective).

    Returns the report (see :func:`format_table`) with one run; meaningful on rank 0. Set-up errors
    raise ExitQuietly(2) on every rank after rank 0 printed them (comm.raise_if_any_failed).
    """
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    error = None
    try:
        config = bench_config(config_path, overrides, comm.size, per_rank_batch)
        parts = build_parts(config, comm.size)
        train_set, model = parts.train_set, parts.model
        trainer = build_trainer(config, model, parts.loss, parts.optimizer, train_set, None, comm,
                                stop_on_signals=False, log=None)
    except UserError as exc:
        if debug:
            raise
        error = exc
    comm.raise_if_any_failed(error)

    trainer.check_agreement()
    trainer.broadcast_parameters()
    order = epoch_order(len(train_set), config.seed, 0, config.data.shuffle)
    batches = [global_batch(order, k, trainer.batch_size) for k in range(trainer.steps_per_epoch)]
    position = {"k": 0, "samples": 0}

    def train_step() -> None:
        batch = batches[position["k"] % len(batches)]
        position["k"] += 1
        position["samples"] += len(batch)
        trainer.train_step(batch)

    with np.errstate(all="ignore"):  # a non-finite loss or gradient is the trainer's to report
        for _ in range(warmup):
            train_step()
        comm.barrier()
        rss = comm.allgather(np.array([peak_rss_mb()], dtype=np.float64))[:, 0]  # before the kernel's arrays
        local_batch = len(shard(batches[0], comm.rank, comm.size))
        bare = BareKernel(model, local_batch, comm, seed=config.seed) if kernel_layers(model) is not None else None
        for _ in range(warmup if bare is not None else 0):
            bare.step()
        phase_mark = trainer.phase_seconds.copy()
        position["samples"] = 0
        elapsed = kernel_elapsed = 0.0
        for r in range(min(ROUNDS, steps)):  # alternate, so drift in the machine's speed hits both alike
            n = steps * (r + 1) // min(ROUNDS, steps) - steps * r // min(ROUNDS, steps)
            elapsed += _timed(comm, train_step, n, 0)
            if bare is not None:
                kernel_elapsed += _timed(comm, bare.step, n, 0)
        samples = position["samples"]
        phases = trainer.phase_seconds - phase_mark
        comm.allreduce_sum(phases)
        phases_ms = phases / comm.size / steps * 1e3
        kernel = None
        if bare is not None:
            kernel_step = kernel_elapsed / steps
            kernel = {"samples_per_s": len(batches[0]) / kernel_step, "step_ms": kernel_step * 1e3,
                      "local_batch": local_batch}

    step_s = elapsed / steps
    pools = thread_pools()
    libs = blas_info(pools)
    threads = libs[0]["num_threads"] if libs else openmp_threads(pools)
    run = {
        "ranks": comm.size,
        "ranks_per_node": comm.local_size,
        "global_batch": len(batches[0]),
        "per_rank_batch": len(batches[0]) / comm.size,
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
    per_rank = per_rank_batch or (REFERENCE_PER_RANK_BATCH if config_path is None else None)
    if per_rank is not None and config.train.batch_size != per_rank * comm.size:
        per_rank = None  # --set train.batch_size chose a global batch
    workload = {
        "name": config_path or "reference",
        "model": describe_model(model),
        "layers": [layer.describe() for layer in model.layers],
        "n_params": model.n_params,
        "loss": config.train.loss,
        "optimizer": config.to_dict()["optim"],
        "dtype": config.train.dtype,
        "batch": {"per_rank": per_rank} if per_rank is not None else {"global": config.train.batch_size},
        "data": {"source": parts.dataset.source, "n_train": len(train_set)},
        "overrides": list(overrides),
        "steps": steps,
        "warmup": warmup,
    }
    return make_report(workload, [run])


def make_report(workload: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The report of ``runs``, with the scaling efficiency of each relative to the 1-rank run."""
    base = next((r for r in runs if r["ranks"] == 1), None)
    for r in runs:
        r["efficiency"] = (r["samples_per_s"] / (r["ranks"] * base["samples_per_s"])) if base else None
    first = runs[0]
    machine_cpu = cpu_info()
    return {
        "dptrain_version": __version__,
        "workload": workload,
        "runs": runs,
        "threads_per_rank": {str(r["ranks"]): r["threads_per_rank"] for r in runs},
        "blas": first["blas"][0] if first["blas"] else None,
        "mpi": first["mpi"],
        "machine": {"cpu": machine_cpu["model"], "cores": machine_cpu["cores"],
                    "python": platform.python_version(), "numpy": np.__version__},
    }


# ---------------------------------------------------------------------------------------------
# Several world sizes, one mpiexec child each

def parse_ranks(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (sorted, without repeats)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"-n {text}: expected a comma-separated list of rank counts >= 1, e.g. 1,2,4")
    return sorted(set(values))


def child_command(mpiexec: str, n_ranks: int, config_path: str | None, overrides, steps: int, warmup: int,
                  per_rank_batch: int | None, debug: bool = False) -> list[str]:
    """The argv of the child that benchmarks ``n_ranks`` ranks in place and prints its report as JSON."""
    argv = build_command(mpiexec, n_ranks, ["--json", "--steps", str(steps), "--warmup", str(warmup)],
                         subcommand="bench")
    if config_path is not None:
        argv += ["--config", config_path]
    for text in overrides:
        argv += ["--set", text]
    if per_rank_batch is not None:
        argv += ["--per-rank-batch", str(per_rank_batch)]
    if debug:
        argv.append("--debug")
    return argv


def run_children(ranks: list[int], mpiexec: str, config_path: str | None, overrides, steps: int, warmup: int,
                 per_rank_batch: int | None, debug: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one mpiexec child per world size in ``ranks``, one after the other, and merge their reports."""
    for n in ranks:  # refuse a bad config here, before starting any process
        bench_config(config_path, overrides, n, per_rank_batch)
    workload, runs = None, []
    for n in ranks:
        argv = child_command(mpiexec, n, config_path, overrides, steps, warmup, per_rank_batch, debug)
        extra, threads_set_by = thread_setup(n)
        if progress is not None:
            progress(" ".join([*(f"{k}={v}" for k, v in extra.items() if k == "OMP_NUM_THREADS"), *argv[:3],
                               "dptrain bench ..."]))
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False, env={**os.environ, **extra})
        except KeyboardInterrupt:
            raise ExitQuietly(130) from None
        if proc.returncode != 0:
            sys.stdout.write(proc.stdout)
            if proc.returncode == 2:
                raise ExitQuietly(2)  # the child printed its one-line error
            raise UserError(f"the benchmark at {n} rank{'s' if n > 1 else ''} failed (exit status "
                            f"{proc.returncode}); its messages are above")
        report = _last_json(proc.stdout)
        if report is None:
            raise UserError(f"the benchmark at {n} ranks printed no report: {proc.stdout.strip()[-300:]!r}")
        run = report["runs"][0]
        run["threads_set_by"] = threads_set_by  # the child takes the variables set here for the user's
        runs.append(run)
        workload = workload or report["workload"]
    return make_report(workload, runs)


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------------------------------------
# Output

def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    """Two lines about the workload and the machine, then one row per world size."""
    w, m, blas = report["workload"], report["machine"], report["blas"]
    batch = (f"{w['batch']['per_rank']} samples per rank per step" if "per_rank" in w["batch"]
             else f"global batch {w['batch']['global']}")
    o = w["optimizer"]
    head = (f"workload: {w['name']}: {w['model']} ({w['n_params']:,} parameters), {w['loss']}, "
            f"{o['name']} lr {o['lr']:g} momentum {o['momentum']:g}, {w['dtype']}, {batch}, data {w['data']['source']}; "
            f"{w['steps']} timed steps after {w['warmup']} warmup")
    blas_text = (f"{blas['internal_api']} {blas['version']} ({blas['architecture']} kernels, {blas['threading_layer']})"
                 if blas else "none found")
    threads = "; ".join(f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}: {r['threads_per_rank']} "
                        f"[{r['threads_set_by']}]" for r in report["runs"])
    machine = (f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, NumPy {m['numpy']}, "
               f"BLAS {blas_text}; MPI {report['mpi']}; BLAS/OpenMP threads per rank: {threads}")
    columns = ["ranks", "samples/s", "step ms", "fwd ms", "bwd ms", "exch ms", "opt ms", "kernel samples/s",
               "overhead %", "peak RSS MB", "efficiency"]
    rows = []
    for r in report["runs"]:
        p, k = r["phases_ms"], r["kernel"]
        rows.append([str(r["ranks"]), _fmt(r["samples_per_s"], ",.0f"), _fmt(r["step_ms"], ".2f"),
                     _fmt(p["forward"], ".2f"), _fmt(p["backward"], ".2f"), _fmt(p["exchange"], ".2f"),
                     _fmt(p["optimizer"], ".2f"), _fmt(k["samples_per_s"] if k else None, ",.0f"),
                     _fmt(r["overhead_pct"], ".1f"), _fmt(r["peak_rss_mb"]["max"], ".0f"),
                     _fmt(r["efficiency"], ".2f")])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = [head, machine, "  ".join(c.rjust(n) for c, n in zip(columns, widths))]
    lines += ["  ".join(v.rjust(n) for v, n in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _json_clean(value: Any) -> Any:
    """NaN and infinities as null, so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_clean(v) for v in value]
    return value


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(_json_clean(report), allow_nan=False)


# ---------------------------------------------------------------------------------------------
# The command

def _echo(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def bench_command(config_path: str | None, overrides, ranks: str | None, steps: int, warmup: int,
                  per_rank_batch: int | None, as_json: bool, mpirun: str | None, comm_kind: str = "auto",
                  debug: bool = False, echo: Callable[..., None] | None = None) -> None:
    """What ``dptrain bench`` does: in place (single process or the current MPI world), or with
    ``ranks`` one mpiexec child per world size. Prints the table, or the JSON report, on rank 0."""
    from dptrain.parallel.comm import make_comm

    echo = echo or _echo
    if ranks is not None:
        refuse_under_mpi("-n starts its own mpiexec runs; under mpirun, run `dptrain bench` without -n "
                         "(it benchmarks the job's world size)", comm_kind)
        world_sizes = parse_ranks(ranks)
        mpiexec = find_mpiexec(mpirun)
        report = run_children(world_sizes, mpiexec, config_path, overrides, steps, warmup, per_rank_batch, debug,
                              progress=lambda line: echo(f"running: {line}", err=True))
        echo(to_json(report) if as_json else format_table(report))
        return
    if mpirun is not None:
        raise UserError("--mpirun is used with -n only")
    comm = make_comm(comm_kind)
    with comm.fail_fast():
        try:
            report = run_bench(comm, config_path, overrides, steps, warmup, per_rank_batch, debug)
        except CollectiveError as exc:  # e.g. the workload diverged: raised by every rank at the same step
            if debug:
                raise
            if comm.rank == 0:
                echo(f"error: {exc}", err=True)
            raise ExitQuietly(exc.exit_code) from None
        if comm.rank == 0:
            echo(to_json(report) if as_json else format_table(report))
