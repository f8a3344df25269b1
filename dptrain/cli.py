"""The ``dptrain`` command: parse, load the config, call the API. No training logic here.

    dptrain                                   # train the built-in default, single process
    mpirun -n 4 dptrain                       # the same job on 4 ranks
    dptrain launch -n 2 --config configs/digits_mlp.toml --out runs/d1
    dptrain eval --checkpoint runs/d1/checkpoints/latest --json
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from . import __version__
from .bench import bench_command
from .build import (
    build_loss,
    build_model,
    build_parts,
    build_trainer,
    load_dataset,
    train_val_split,
)
from .checkpoint import (
    Checkpoint,
    check_compatible,
    clean_stale_temporaries,
    load_checkpoint,
    restore_model,
    step_dirs,
)
from .comm import make_comm, refuse_under_mpi
from .config import load_config
from .errors import EXIT_REQUEUE, CollectiveError, ExitQuietly, UserError
from .launcher import (
    build_command,
    find_mpiexec,
    thread_environment,
)
from .metrics import MetricsLogger, summary_line
from .progress import ProgressBar
from .signals import StopOnSignal
from .timeline import Timeline
from .evaluation import VALIDATION_KEYS, evaluate
from .predict import checkpoint_config, evaluation_inputs

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _common_options(fn):
    fn = click.option("--debug", is_flag=True, help="Show the full traceback of an error.")(fn)
    fn = click.option("--comm", "comm_kind", type=click.Choice(["auto", "mpi", "single"]), default="auto",
                      show_default=True, help="Communicator: MPI when started by mpirun/mpiexec/srun (auto), "
                      "or forced.")(fn)
    return fn


def _reports_errors(fn):
    """Turn UserError into one line on stderr and exit status 2 (the traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if kwargs.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except ExitQuietly as exc:
            sys.exit(exc.code)

    return wrapper


def _agreed_setup(comm, debug: bool, work):
    """``work()`` on every rank, each checking its own input, then every rank agrees before any
    other collective: returns what ``work`` returned if no rank raised a UserError; otherwise
    every rank exits with status 2 and the error is printed once (comm.raise_if_any_failed).
    With ``debug`` a UserError propagates instead, with its traceback. Collective."""
    error, result = None, None
    try:
        result = work()
    except UserError as exc:
        if debug:
            raise
        error = exc
    comm.raise_if_any_failed(error)
    return result


def _train_options(fn):
    fn = click.option("--timeline", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                      help="Write a Chrome trace of every rank's steps (forward, backward, exchange, optimizer), "
                      "evaluations and checkpoints to FILE (open it in Perfetto or chrome://tracing).")(fn)
    fn = click.option("--quiet", is_flag=True,
                      help="Print only errors, warnings and the final summary line (metrics files are still "
                      "written).")(fn)
    fn = click.option("--resume", default=None, metavar="auto|PATH",
                      help="Continue from the newest valid checkpoint of --out (auto; starts fresh if there is "
                      "none) or from the checkpoint at PATH.")(fn)
    fn = click.option("--overwrite", is_flag=True,
                      help="Train into an --out folder that already holds checkpoints (they are deleted).")(fn)
    fn = click.option("--out", type=click.Path(), default=None,
                      help="Run folder for checkpoints and the resolved config [default: runs/<date-time>].")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config key, e.g. --set train.epochs=5 (repeatable).")(fn)
    fn = click.option("--config", "config_path", type=click.Path(), default=None,
                      help="TOML config file [default: the built-in digits MLP].")(fn)
    return fn


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="dptrain")
@click.pass_context
def main(ctx: click.Context) -> None:
    """dptrain: data-parallel neural-network training with NumPy over MPI.

    With no command, trains the built-in default (an MLP on the digits data), like `dptrain train`.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(train)


def _default_out_dir() -> Path:
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def _prepare_out_dir(out: str | None, overwrite: bool, resume: str | None) -> Path:
    """Rank 0 only: choose the run folder and refuse to train over an earlier run's checkpoints."""
    if resume == "auto" and not out:
        raise UserError("--resume auto needs --out, the run folder to continue")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    path = Path(out) if out else _default_out_dir()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a folder")
    if step_dirs(path / "checkpoints") and not overwrite and not resume:
        raise UserError(f"--out {path}: already holds checkpoints of an earlier run; pass --resume auto to "
                        f"continue it, --overwrite to replace it, or choose another folder")
    return path


def _find_checkpoint(resume: str, out_dir: Path, model, info=click.echo) -> Checkpoint | None:
    """Rank 0 only: the checkpoint to resume from, verified and matching the model, or None."""

    def compatible(ckpt: Checkpoint) -> Checkpoint:
        check_compatible(ckpt, model)
        return ckpt

    if resume != "auto":
        return compatible(load_checkpoint(resume))
    for candidate in reversed(step_dirs(out_dir / "checkpoints")):
        try:
            ckpt = load_checkpoint(candidate)
        except UserError as exc:
            click.echo(f"warning: skipping damaged checkpoint {candidate}: {exc}", err=True)
            continue
        return compatible(ckpt)
    info(f"no checkpoint in {out_dir / 'checkpoints'}: starting fresh")
    return None


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config trees, e.g. ["train.epochs 30 -> 50"]."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key} {a!r} -> {b!r}")
    return changes


@main.command(context_settings=CONTEXT)
@_train_options
@_common_options
@_reports_errors
def train(config_path, overrides, out, overwrite, resume, quiet=False, timeline=None, comm_kind="auto", debug=False):
    """Train a model, on one process or on every rank of an MPI job.

    Exit status: 0 done; 1 crashed; 2 bad input; 3 diverged (NaN/inf) or ranks out of sync;
    75 stopped by SIGTERM/SIGUSR1/SIGINT after writing a checkpoint (requeue with --resume auto).
    """
    comm = make_comm(comm_kind)
    with comm.fail_fast(), StopOnSignal() as stop_signals:  # from the start: a signal in set-up stops at step 1
        try:
            _train(comm, config_path, overrides, out, overwrite, resume, debug, stop_signals, quiet, timeline)
        except CollectiveError as exc:  # raised by every rank at the same step
            if debug:
                raise
            if comm.rank == 0:
                click.echo(f"error: {exc}", err=True)
            raise ExitQuietly(exc.exit_code) from None


def _train(comm, config_path, overrides, out, overwrite, resume, debug, stop_signals, quiet=False,
           timeline=None) -> None:
    info = (lambda line: None) if quiet else click.echo  # what --quiet leaves out
    # set-up: every rank checks its own input, then all agree before any training collective
    config, parts, out_dir, checkpoint = _agreed_setup(
        comm, debug, lambda: _training_setup(comm, config_path, overrides, out, overwrite, resume, info))
    train_set, val_set, model = parts.train_set, parts.val_set, parts.model
    out_dir = Path(comm.broadcast_text(str(out_dir) if comm.rank == 0 else ""))

    if comm.rank == 0:
        if overwrite and (out_dir / "checkpoints").is_dir():
            shutil.rmtree(out_dir / "checkpoints")
        clean_stale_temporaries(out_dir / "checkpoints")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(config.to_toml(), encoding="utf-8")
        info(f"dptrain {__version__}: {comm.size} rank{'s' if comm.size > 1 else ''} ({comm.library}), "
             f"{len(train_set)} training / {len(val_set)} validation samples, {model.n_params:,} parameters, "
             f"run folder {out_dir}")
        info("resolved config:\n" + "\n".join("  " + line for line in config.to_toml().strip().splitlines()))

    # rank 0 writes metrics.jsonl, metrics.csv and summary.json; prints progress (a bar on a terminal)
    metrics = MetricsLogger(out_dir, every_steps=config.log.every_steps)
    progress = None if quiet else ProgressBar(every_steps=config.log.every_steps, echo=click.echo)
    callbacks = [c for c in (progress, metrics, Timeline(timeline) if timeline else None) if c is not None]
    trainer = build_trainer(config, model, parts.loss, parts.optimizer, train_set, val_set, comm, out_dir=out_dir,
                            stop_on_signals=stop_signals, callbacks=callbacks,
                            log=None if quiet else progress.write)
    if trainer.resume(checkpoint) and comm.rank == 0:
        info(f"resuming from {checkpoint.path} (step {trainer.step}, epoch {trainer.epoch}, "
             f"written by {checkpoint.meta.get('world_size')} rank(s))")
        changes = _config_changes(checkpoint.meta.get("config", {}), config.to_dict())
        if changes:
            info("note: the config differs from the checkpoint's: " + "; ".join(changes))
    t0 = time.perf_counter()
    trainer.fit()
    if trainer.stopped:
        if comm.rank == 0:
            click.echo(f"continue with --resume auto --out {out_dir} (exit status {EXIT_REQUEUE}: requeue)")
        raise ExitQuietly(EXIT_REQUEUE)
    if comm.rank == 0:
        last = trainer.last_metrics
        keys = VALIDATION_KEYS
        summary = ", ".join(f"{k} {last[k]:.4f}" for k in keys if k in last)
        summary = summary or f"train_loss {last.get('train_loss', math.nan):.4f}"
        click.echo(f"done in {time.perf_counter() - t0:.1f} s: {summary}; {summary_line(metrics.summary)}; "
                   f"checkpoint {trainer.last_checkpoint}")


def _training_setup(comm, config_path, overrides, out, overwrite, resume, info):
    """(config, run parts, run folder and checkpoint to resume from: on rank 0, else None and None)."""
    config = load_config(config_path, overrides)
    parts = build_parts(config, comm.size)
    out_dir, checkpoint = None, None
    if comm.rank == 0:
        out_dir = _prepare_out_dir(out, overwrite, resume)
        if resume:
            checkpoint = _find_checkpoint(resume, out_dir, parts.model, info)
    return config, parts, out_dir, checkpoint


@main.command("eval", context_settings=CONTEXT)
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(),
              help="A checkpoint folder (e.g. runs/d1/checkpoints/latest), or a run folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a line of text.")
@click.option("--data", "data_path", default=None, type=click.Path(),
              help="Evaluate on every row of this file instead: an .npz with x and y (or a folder with x.npy and "
              "y.npy), or a .csv with the config's data.target column.")
@_common_options
@_reports_errors
def eval_command(checkpoint_path, as_json, data_path=None, comm_kind="auto", debug=False):
    """Evaluate a checkpoint's model on its config's validation split, or on every row of --data."""
    comm = make_comm(comm_kind)
    with comm.fail_fast():
        ckpt, model, loss, val_set = _agreed_setup(comm, debug, lambda: _evaluation_setup(checkpoint_path, data_path))
        result = evaluate(model, loss, val_set, comm)
        result.update(checkpoint=str(ckpt.path), step=ckpt.meta.get("step"))
        if data_path is not None:
            result["data"] = str(data_path)
        if comm.rank == 0:
            if as_json:
                click.echo(json.dumps(result))
            else:
                metric = (f"accuracy {result['accuracy']:.4f}" if "accuracy" in result
                          else f"rmse {result['rmse']:.4f}  r2 {result['r2']:.4f}")
                click.echo(f"loss {result['loss']:.4f}  {metric}  n_samples {result['n_samples']}  "
                           f"(checkpoint {result['checkpoint']}, step {result['step']})")


def _evaluation_setup(checkpoint_path, data_path):
    """(checkpoint, model with its weights, loss, data) to evaluate: every row of ``data_path``, or
    (None) the validation split of the checkpoint's config."""
    ckpt = load_checkpoint(checkpoint_path, optimizer=False)
    if data_path is not None:  # the model from the checkpoint alone; the config's data is not needed
        return ckpt, *evaluation_inputs(ckpt, data_path)
    config = checkpoint_config(ckpt)
    dataset = load_dataset(config)
    _, val_set = train_val_split(config, dataset)
    if len(val_set) == 0:
        raise UserError(f"checkpoint {ckpt.path}: its config has data.val_fraction = 0, no validation split")
    loss = build_loss(config, dataset)
    model = build_model(config, dataset.n_features, dataset.n_outputs, init=False)
    return ckpt, restore_model(ckpt, model), loss, val_set


def _check_train_args(train_args) -> dict:
    """`dptrain train TRAIN_ARGS` parsed and its config loaded, so bad input stops a launch before it starts."""
    try:
        sub = train.make_context("train", list(train_args))
    except click.UsageError as exc:
        raise UserError(f"train options: {exc.format_message()}") from None
    load_config(sub.params["config_path"], sub.params["overrides"])
    return sub.params


@main.command(context_settings=dict(CONTEXT, ignore_unknown_options=True))
@click.option("-n", "--ranks", "n_ranks", type=int, default=None, help="Number of MPI ranks, started here.")
@click.option("--mpirun", default=None, metavar="PATH",
              help="mpiexec/mpirun to use [default: $DPTRAIN_MPIRUN, the one next to this Python, or PATH].")
@click.option("--dry-run", is_flag=True, help="Print the command instead of running it.")
@click.option("--scheduler", default=None, metavar="slurm|pbs",
              help="Instead of -n: make a batch job from launch/slurm.sbatch or launch/pbs.sh.")
@click.option("--nodes", default=None, metavar="N", help="With --scheduler: nodes.")
@click.option("--ranks-per-node", default=None, metavar="K", help="With --scheduler: MPI ranks per node.")
@click.option("--time", "time_limit", default=None, metavar="HH:MM:SS", help="With --scheduler: the time limit.")
@click.option("--job-name", default=None, help="With --scheduler: the job's name [default: dptrain].")
@click.option("--print", "print_script", is_flag=True,
              help="With --scheduler: print the batch script (the default without --submit/--script-out).")
@click.option("--script-out", default=None, metavar="FILE", help="With --scheduler: write the batch script to FILE.")
@click.option("--submit", is_flag=True,
              help="With --scheduler: write the script (to --script-out, else runs/jobs/) and submit it with "
              "sbatch or qsub; prints the job id.")
@click.option("--template", default=None, metavar="FILE",
              help="With --scheduler: the template [default: launch/slurm.sbatch or launch/pbs.sh].")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
@_reports_errors
def launch(n_ranks, mpirun, dry_run, train_args, debug=False, **job):
    """Run `dptrain train TRAIN_ARGS` on N ranks with mpiexec (no shell involved), or make a Slurm or
    PBS batch job that runs it (--scheduler).

    Sets BLAS/OpenMP threads per rank to max(1, cores / N) unless you set OMP_NUM_THREADS or
    similar. Example: dptrain launch -n 2 --config configs/digits_mlp.toml --out runs/d1

    Batch job: dptrain launch --scheduler slurm --nodes 2 --ranks-per-node 4 --time 01:00:00 --submit
    --config configs/digits_mlp.toml --out runs/big. The job always trains with --resume auto, so that
    a requeued or continued job carries on from its newest checkpoint.
    """
    # under mpirun every rank would start its own mpiexec (or job): refuse, in one line from rank 0
    refuse_under_mpi("launch: run it outside mpirun/mpiexec/srun: it starts or submits the ranks itself")
    if n_ranks is None or any(job.values()):  # a batch job (or a mix of the two modes): in cli_jobs.py
        from .cli_jobs import launch_batch_job

        return launch_batch_job(n_ranks, mpirun, dry_run, list(train_args), **job)
    _check_train_args(train_args)  # before starting N processes

    argv = build_command(find_mpiexec(mpirun), n_ranks, list(train_args))
    extra_env = thread_environment(n_ranks)
    if dry_run:
        click.echo(" ".join([*(f"{k}={v}" for k, v in extra_env.items()), shlex.join(argv)]))
        return
    proc = subprocess.Popen(argv, env={**os.environ, **extra_env})

    def forward(signum, _frame):  # pass preemption signals on to mpiexec, which relays them to the ranks
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # mpiexec got the same SIGINT from the terminal
        code = proc.wait()
    sys.exit(code if code >= 0 else 128 - code)


@main.command(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="TOML config file to benchmark [default: the reference workload: MLP 784-1024-1024-10, ReLU, "
              "softmax cross-entropy, SGD momentum 0.9, float32, synthetic data].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set model.hidden=[256] (repeatable; also on the reference).")
@click.option("-n", "--ranks", default=None, metavar="LIST",
              help="World sizes to run, e.g. 1,2,4: one mpiexec run each, with scaling efficiency "
              "[default: in place, single process or the current MPI job].")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Timed steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed steps before timing.")
@click.option("--per-rank-batch", type=click.IntRange(min=1), default=None,
              help="Samples per rank per step (global batch = this x ranks) [default: 256 for the reference, "
              "the config's train.batch_size as the global batch for --config].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--mpirun", default=None, metavar="PATH",
              help="mpiexec/mpirun for -n [default: $DPTRAIN_MPIRUN, the one next to this Python, or PATH].")
@_common_options
@_reports_errors
def bench(config_path, overrides, ranks, steps, warmup, per_rank_batch, as_json, mpirun, comm_kind="auto",
          debug=False):
    """Benchmark the training step: samples/s, the step split into forward, backward, gradient exchange
    and optimizer, peak memory per rank, the trainer's overhead over the bare matrix multiplies and
    allreduce, and with -n 1,2,4 the scaling efficiency samples/s(N) / (N x samples/s(1)).

    Prints the BLAS/OpenMP threads per rank it ran with: with -n, max(1, cores / N) unless you set
    OMP_NUM_THREADS or similar. Example: dptrain bench -n 1,2 --steps 150
    """
    bench_command(config_path, overrides, ranks, steps, warmup, per_rank_batch, as_json, mpirun, comm_kind,
                  debug, echo=click.echo)


@main.group("model", context_settings=CONTEXT)
def model_group() -> None:
    """Inspect the model a config describes."""


@model_group.command("summary", context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="TOML config file [default: the built-in digits MLP].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set model.hidden=[256] (repeatable).")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@_reports_errors
def model_summary(config_path, overrides, debug=False):
    """Print each layer, the shape of one sample after it, its parameter count, and the totals.

    The input shape comes from the data (data.shape), the output width from the data and loss.
    """
    from .cli_jobs import _echo_once  # noqa: PLC0415 (cli_jobs imports this module)

    _echo_once(lambda comm: _summary_text(config_path, overrides), "auto", debug)


def _summary_text(config_path, overrides) -> str:
    config = load_config(config_path, overrides)
    dataset = load_dataset(config)
    model = build_model(config, dataset.n_features, dataset.n_outputs, init=False)
    rows = [("#", "layer", "output shape", "parameters"), ("", "input", _shape_text(model.in_shape), "")]
    rows += [(str(i), desc, _shape_text(shape), f"{count:,}") for i, (desc, shape, count) in enumerate(model.summary())]
    widths = [max(len(r[j]) for r in rows) for j in range(4)]
    lines = [f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}".rstrip() for r in rows]
    n_buffers = len(model.state_buffer)
    lines.append(f"total: {model.n_params:,} parameters ({model.n_params * model.dtype.itemsize / 2**20:.2f} MiB "
                 f"as {model.dtype})" + (f", {n_buffers:,} buffer values" if n_buffers else "")
                 + f"; data {dataset.source}: {len(dataset)} samples, {dataset.n_outputs} outputs")
    return "\n".join(lines) + "\n"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


from .cli_model import plot_command, predict_command  # noqa: E402  (after main and the helpers it uses)

main.add_command(predict_command)
main.add_command(plot_command)

from .cli_jobs import info_command, config_group  # noqa: E402

main.add_command(info_command)
main.add_command(config_group)
