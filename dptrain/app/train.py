"""``dptrain train`` without the command line: set up on every rank, train, report.

    run_training(comm, TrainRequest(config_path="configs/digits_cnn.toml", out="runs/cnn"), stop_signals, ...)

Every rank checks its own input (config, data, run folder on rank 0) and all agree before the first
collective of training; rank 0 alone writes the run folder and prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dptrain._version import __version__
from dptrain.config import load_config
from dptrain.errors import EXIT_REQUEUE, ExitQuietly
from dptrain.parallel.agreement import agreed
from dptrain.storage.lock import RunLock
from dptrain.storage.rundir import choose_out_dir, find_checkpoint, set_up_out_dir
from dptrain.training.callbacks import MetricsLogger, MLflowLogger, ProgressBar, TensorBoardLogger, Timeline
from dptrain.training.callbacks.metrics import summary_line
from dptrain.training.callbacks.mlflow_logger import check_available as check_mlflow
from dptrain.training.callbacks.tensorboard import check_available as check_tensorboard
from dptrain.training.evaluation import VALIDATION_KEYS

from .build import build_parts, build_trainer
from .image_cache import prepare_images
from .init_from import initialise_from, read_weights


@dataclass(frozen=True)
class TrainRequest:
    """What ``dptrain train`` was asked (its options)."""

    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    out: str | None = None
    overwrite: bool = False
    resume: str | None = None  # "auto", a checkpoint path, or None
    quiet: bool = False
    timeline: str | None = None
    debug: bool = False
    init_from: str | None = None  # a checkpoint, run folder or .safetensors file to start from


def run_training(comm, request: TrainRequest, stop_signals, echo: Callable[..., None]) -> None:
    """Train as ``request`` says, on every rank of ``comm``; ``echo(text, err=False)`` prints.

    Raises ExitQuietly(75) after a stop signal (a checkpoint was written: requeue with --resume auto).
    """
    r = request
    info = (lambda line: None) if r.quiet else echo  # what --quiet leaves out
    config = agreed(comm, r.debug, lambda: _load_config(comm, r))
    # images: every rank lists them; rank 0 decodes them into the cache if needed while the others wait
    images = prepare_images(config, comm, r.debug, info) if config.data.name == "images" else None
    config, parts, out_dir, checkpoint = agreed(comm, r.debug, lambda: _set_up(comm, r, config, images, info, echo))
    comm.watchdog.timeout_s = config.comm.timeout_s
    train_set, val_set, model = parts.train_set, parts.val_set, parts.model
    out_dir = Path(comm.broadcast_text(str(out_dir) if comm.rank == 0 else ""))

    # rank 0 writes metrics.jsonl, metrics.csv and summary.json; prints progress (a bar on a terminal)
    metrics = MetricsLogger(out_dir, every_steps=config.log.every_steps)
    progress = None if r.quiet else ProgressBar(every_steps=config.log.every_steps, echo=echo)
    tensorboard = TensorBoardLogger(every_steps=config.log.every_steps) if config.log.tensorboard else None
    mlflow = MLflowLogger(every_steps=config.log.every_steps) if config.log.mlflow else None
    callbacks = [c for c in (progress, metrics, tensorboard, mlflow, Timeline(r.timeline) if r.timeline else None)
                 if c is not None]
    trainer = build_trainer(config, model, parts.loss, parts.optimizer, train_set, val_set, comm, out_dir=out_dir,
                            stop_on_signals=stop_signals, callbacks=callbacks,
                            log=None if r.quiet else progress.write)
    trainer.check_agreement()  # every rank holds the same config, data and model: only then is anything written
    # one job per run folder: rank 0 takes its lock (a live holder: exit 2 on every rank, nothing written)
    lock = RunLock(out_dir)
    agreed(comm, r.debug, lambda: lock.acquire(lambda line: echo(line, err=True)) if comm.rank == 0 else None)
    try:
        _train(comm, r, config, trainer, checkpoint, metrics, out_dir, info, echo)
    finally:
        lock.release()
        if trainer.stopped:  # this process ends now (exit 75): a late repeat of the signal must not kill it
            stop_signals.keep_ignoring()


def _train(comm, r: TrainRequest, config, trainer, checkpoint, metrics, out_dir: Path, info, echo) -> None:
    """Set up the run folder (rank 0), resume, fit and report."""
    model, train_set, val_set = trainer.model, trainer.train_data, trainer.val_data
    if comm.rank == 0:
        set_up_out_dir(out_dir, r.overwrite, config.to_toml())
        info(f"dptrain {__version__}: {comm.size} rank{'s' if comm.size > 1 else ''} ({comm.library}), "
             f"{len(train_set)} training / {len(val_set) if val_set is not None else 0} validation samples, "
             f"{model.n_params:,} parameters, run folder {out_dir}")
        info("resolved config:\n" + "\n".join("  " + line for line in config.to_toml().strip().splitlines()))

    if trainer.resume(checkpoint) and comm.rank == 0:
        info(f"resuming from {checkpoint.path} (step {trainer.step}, epoch {trainer.epoch}, "
             f"written by {checkpoint.meta.get('world_size')} rank(s))")
        changes = config_changes(checkpoint.meta.get("config", {}), config.to_dict())
        if changes:
            info("note: the config differs from the checkpoint's: " + "; ".join(changes))
    t0 = time.perf_counter()
    trainer.fit()
    if trainer.stopped:
        if comm.rank == 0:
            echo(f"continue with --resume auto --out {out_dir} (exit status {EXIT_REQUEUE}: requeue)")
        raise ExitQuietly(EXIT_REQUEUE)
    if comm.rank == 0:
        last = trainer.last_metrics
        summary = ", ".join(f"{k} {last[k]:.4f}" for k in VALIDATION_KEYS if k in last)
        summary = summary or f"train_loss {last.get('train_loss', math.nan):.4f}"
        echo(f"done in {time.perf_counter() - t0:.1f} s: {summary}; {summary_line(metrics.summary)}; "
             f"checkpoint {trainer.last_checkpoint}")


def _load_config(comm, r: TrainRequest):
    """The config of ``r``; the extras its logging needs must be installed (rank 0, which logs)."""
    config = load_config(r.config_path, r.overrides)
    if config.log.tensorboard and comm.rank == 0:
        check_tensorboard()
    if config.log.mlflow and comm.rank == 0:
        check_mlflow()
    return config


def _set_up(comm, r: TrainRequest, config, images, info, echo):
    """(config, run parts, run folder and checkpoint to resume from: on rank 0, else None and None)."""
    parts = build_parts(config, comm.size, images)
    out_dir, checkpoint = None, None
    if comm.rank == 0:
        out_dir = choose_out_dir(r.out, r.overwrite, r.resume)
        if r.resume:
            checkpoint = find_checkpoint(r.resume, out_dir, parts.model, info, lambda line: echo(line, err=True),
                                         parts.optimizer)
        if r.init_from and checkpoint is None:  # (a requeued run continues its own checkpoint instead)
            weights = read_weights(r.init_from, lambda line: echo(line, err=True))
            left = initialise_from(parts.model, weights, config.model.init_from_strict, r.init_from)
            info(f"initialised from {r.init_from}: {len(parts.model.state_shapes()) - len(left)} of "
                 f"{len(parts.model.state_shapes())} parameters and buffers"
                 + (f"; left at their initial values: {', '.join(left)}" if left else ""))
        elif r.init_from:
            info(f"--init-from {r.init_from} not used: continuing {checkpoint.path}")
    return config, parts, out_dir, checkpoint


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config trees, e.g. ["train.epochs 30 -> 50"]."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key} {a!r} -> {b!r}")
    return changes
