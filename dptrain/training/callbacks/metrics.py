"""Metrics files and the run summary, written by rank 0 while training goes on.

:class:`MetricsLogger` is a :class:`~dptrain.training.Callback`; ``dptrain train`` adds one, and an
API user passes one in ``Trainer(..., callbacks=[MetricsLogger(every_steps=50)])``::

    <out>/metrics.jsonl   one JSON object per row
    <out>/metrics.csv     the same rows and columns, a header first
    <out>/summary.json    written at the end of fit(): best validation metric, final metrics, time ...

Rows: a "step" row every ``every_steps`` optimizer steps (0: none) and an "epoch" row after each
epoch's evaluation. Columns, in this order (empty in the CSV and null in the JSON when not reported)::

    kind, step, epoch, train_loss, <validation columns>, lr, samples_per_s,
    data_ms, forward_ms, backward_ms, exchange_ms, optimizer_ms

* ``epoch``: the epoch the row belongs to, 1-based (a step row: the epoch in progress);
* ``train_loss``: mean loss per sample over the samples of the row's steps (step row: the steps since
  the previous step row; epoch row: the whole epoch, as in the epoch line);
* validation columns, fixed at the start of the run from the task: ``val_loss, val_accuracy`` for
  classification and multi-label, ``val_loss, val_rmse, val_r2`` for regression, none without
  validation data; filled on epoch rows;
* ``lr``: the learning rate of the row's last update;
* ``samples_per_s``: global samples per second of wall time over the row's steps (evaluation,
  checkpoints and parameter sync checks excluded: :attr:`Trainer.totals`); an epoch row repeats the
  epoch line's value;
* ``*_ms``: the mean time per step of each phase of the step (:attr:`Trainer.phase_seconds`);
  ``data_ms`` is the time until the step's local batch is in hand (read, or with ``data.prefetch``
  waited for).

On resume the files are continued: rows after the resumed step (written by the interrupted run after
its last checkpoint) are dropped, the others kept, so each step and epoch appears once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dptrain.storage.atomic import write_atomically
from dptrain.training.callback import Callback
from dptrain.training.evaluation import LOWER_IS_BETTER, validation_metrics
from dptrain.training.step import PHASES
from dptrain.training.totals import RunningTotals

if TYPE_CHECKING:
    from dptrain.training.trainer import Trainer

METRICS_JSONL, METRICS_CSV, SUMMARY_JSON = "metrics.jsonl", "metrics.csv", "summary.json"


def metric_columns(task: str, has_validation: bool = True) -> tuple[str, ...]:
    """The columns of the metrics files for a loss's ``task`` ("classification", "multilabel", "regression")."""
    validation = validation_metrics(task) if has_validation else ()
    return ("kind", "step", "epoch", "train_loss", *validation, "lr", "samples_per_s",
            *(f"{p}_ms" for p in PHASES))


class Window:
    """The steps since the last reset: the trainer's running totals and phase times less marks taken then."""

    def __init__(self) -> None:
        self._mark = RunningTotals()
        self._phase_mark = np.zeros(len(PHASES))

    def reset(self, trainer: Trainer) -> None:
        self._mark = trainer.totals.copy()
        self._phase_mark = np.array(trainer.phase_seconds, dtype=np.float64)

    def totals(self, trainer: Trainer) -> RunningTotals:
        """Steps, samples, loss and training seconds since the reset (``train_loss``, ``samples_per_s``)."""
        return trainer.totals - self._mark

    def phase_ms(self, trainer: Trainer) -> dict[str, float]:
        """Mean milliseconds per step of each phase over the window."""
        steps = trainer.totals.steps - self._mark.steps
        delta = trainer.phase_seconds - self._phase_mark
        per_step = delta * 1e3 / steps if steps else np.full(len(PHASES), math.nan)
        return {f"{p}_ms": float(v) for p, v in zip(PHASES, per_step)}


class MetricsLogger(Callback):
    """Write ``metrics.jsonl``, ``metrics.csv`` and ``summary.json`` into the run folder (rank 0).

    Parameters
    ----------
    out_dir : the folder; None: the trainer's ``out_dir`` (nothing is written if that is None too,
        but :attr:`summary` is still computed).
    every_steps : a step row every N optimizer steps; 0: epoch rows only.
    monitor : the validation metric whose best value the summary reports; None: the early-stopping
        metric if early stopping is on, else ``val_loss``. For the early-stopping metric, the best
        value and epoch are early stopping's own (which counts only improvements by more than its
        ``min_delta``), so the two never disagree; ``best_by_metric`` holds each metric's extreme.

    After fit(), :attr:`summary` holds the summary (rank 0; None on other ranks).
    """

    def __init__(self, out_dir: str | Path | None = None, every_steps: int = 50, monitor: str | None = None) -> None:
        if every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {every_steps}")
        if monitor is not None and monitor not in LOWER_IS_BETTER:
            raise ValueError(f"monitor must be one of {', '.join(LOWER_IS_BETTER)}, got {monitor!r}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.every_steps, self.monitor = every_steps, monitor
        self.columns: tuple[str, ...] = ()
        self.summary: dict[str, Any] | None = None
        self._active = False
        self._run_window, self._step_window, self._epoch_window = Window(), Window(), Window()
        self._jsonl = self._csv = None

    # -- the hooks ------------------------------------------------------------------------------

    def on_train_begin(self, trainer: Trainer) -> None:
        self._active = trainer.comm.rank == 0
        if not self._active:
            return
        self.columns = metric_columns(trainer.loss.task, trainer.val_data is not None)
        self._run_window.reset(trainer)
        self._step_window.reset(trainer)
        self._epoch_window.reset(trainer)
        self._best: dict[str, tuple[float, int]] = {}
        self._start_step = trainer.step
        self._t_begin = time.perf_counter()
        folder = self.out_dir if self.out_dir is not None else trainer.out_dir
        self._folder = folder
        if folder is not None:
            self._open(Path(folder), trainer.step)

    def on_step_end(self, trainer: Trainer, step: int, loss_sum: float) -> None:
        if not self._active:
            return
        if self.every_steps and step % self.every_steps == 0:
            w = self._step_window
            done = w.totals(trainer)
            self._write({"kind": "step", "step": step, "epoch": trainer.epoch + 1, "train_loss": done.train_loss,
                         "lr": trainer.lr, "samples_per_s": done.samples_per_s, **w.phase_ms(trainer)})
            w.reset(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if not self._active:
            return
        row = {k: metrics.get(k) for k in self.columns if k.startswith("val_")}
        row.update(kind="epoch", step=metrics["step"], epoch=epoch, train_loss=metrics["train_loss"],
                   lr=metrics.get("lr"), samples_per_s=metrics.get("samples_per_s"),
                   **self._epoch_window.phase_ms(trainer))
        self._write(row)
        self._update_best(row)
        self._epoch_window.reset(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if not self._active:
            return
        self.summary = self._summarize(trainer, time.perf_counter() - self._t_begin)
        if self._folder is not None:
            self._close()
            _write_text(Path(self._folder) / SUMMARY_JSON, json.dumps(self.summary, indent=2) + "\n")
        self._active = False

    # -- rows -----------------------------------------------------------------------------------

    def _open(self, folder: Path, resumed_step: int) -> None:
        """Keep the rows of an earlier run up to ``resumed_step``, rewrite both files with them, append after."""
        kept = [row for row in read_rows(folder) if _as_int(row.get("step")) is not None
                and _as_int(row["step"]) <= resumed_step]
        for row in kept:
            if row.get("kind") == "epoch":
                self._update_best(row)
        folder.mkdir(parents=True, exist_ok=True)
        _write_text(folder / METRICS_JSONL, "".join(self._json_line(row) for row in kept))
        _write_text(folder / METRICS_CSV, self._csv_line(self.columns) +
                          "".join(self._csv_line(self._csv_values(row)) for row in kept))
        self._jsonl = open(folder / METRICS_JSONL, "a", encoding="utf-8")
        self._csv = open(folder / METRICS_CSV, "a", encoding="utf-8", newline="")

    def _write(self, row: dict[str, Any]) -> None:
        if self._jsonl is None:
            return
        for fh, line in ((self._jsonl, self._json_line(row)), (self._csv, self._csv_line(self._csv_values(row)))):
            try:
                fh.write(line)
                fh.flush()  # a job killed later keeps every row written so far
            except OSError as exc:  # a full disk, say: name the file
                raise OSError(exc.errno, exc.strerror or str(exc), exc.filename or fh.name) from None

    def _close(self) -> None:
        for fh in (self._jsonl, self._csv):
            if fh is not None:
                fh.close()
        self._jsonl = self._csv = None

    def _json_line(self, row: dict[str, Any]) -> str:
        return json.dumps({k: _plain(row.get(k)) for k in self.columns}) + "\n"

    def _csv_values(self, row: dict[str, Any]) -> list[str]:
        return ["" if (v := _plain(row.get(k))) is None else repr(v) if isinstance(v, float) else str(v)
                for k in self.columns]

    @staticmethod
    def _csv_line(values) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    # -- summary --------------------------------------------------------------------------------

    def _update_best(self, row: dict[str, Any]) -> None:
        epoch, step = _as_float(row.get("epoch")), _as_int(row.get("step"))
        if epoch is not None and epoch == int(epoch):
            epoch = int(epoch)
        for name, lower in LOWER_IS_BETTER.items():
            value = _as_float(row.get(name))
            if value is None or not math.isfinite(value) or epoch is None:
                continue
            best = self._best.get(name)
            if best is None or (value < best[0] if lower else value > best[0]):
                self._best[name] = (value, epoch, step)

    def _monitored(self, trainer: Trainer) -> str:
        if self.monitor is not None:
            return self.monitor
        return trainer.early_stopping.metric if trainer.early_stopping is not None else "val_loss"

    def _summarize(self, trainer: Trainer, wall_time: float) -> dict[str, Any]:
        monitor = self._monitored(trainer)
        best = self._best.get(monitor)
        early = trainer.early_stopping
        if early is not None and early.metric == monitor:  # early stopping's best, whatever min_delta
            # early stopping counts in steps when evaluating every eval.every_steps steps
            counted = (None, early.best_epoch) if trainer.eval_every_steps else (early.best_epoch, None)
            best = None if math.isnan(early.best) else (early.best, *counted)
        samples = self._run_window.totals(trainer).samples
        final = {k: _plain(v) for k, v in trainer.last_metrics.items()
                 if k in ("epoch", "step", "train_loss", "lr") or k.startswith("val_")}
        status = "preempted" if trainer.stopped else "stopped_early" if trainer.stopped_early else "finished"
        return {
            "status": status,
            "preempted": bool(trainer.stopped),
            "stopped_early": bool(trainer.stopped_early),
            "best": None if best is None else {"metric": monitor, "value": best[0], "epoch": best[1], "step": best[2]},
            "best_by_metric": {k: {"value": v, "epoch": e, "step": s} for k, (v, e, s) in self._best.items()},
            "measured_in": "steps" if trainer.by_steps or trainer.eval_every_steps else "epochs",
            "final_metrics": final,
            "epochs": trainer.epoch,
            "steps": trainer.step,
            "resumed_from_step": self._start_step,
            "wall_time_s": wall_time,
            "samples_per_s": _plain(samples / wall_time if samples and wall_time > 0 else math.nan),
            "world_size": trainer.comm.size,
            "checkpoint": None if trainer.last_checkpoint is None else str(trainer.last_checkpoint),
        }


def read_rows(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of ``folder``'s metrics.jsonl (or, without it, of metrics.csv); [] if neither exists.

    A line that does not parse (the end of a file cut by a crash) is skipped.
    """
    folder = Path(folder)
    rows: list[dict[str, Any]] = []
    if (folder / METRICS_JSONL).is_file():
        for line in (folder / METRICS_JSONL).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    elif (folder / METRICS_CSV).is_file():
        with open(folder / METRICS_CSV, encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append({k: _from_csv(v) for k, v in row.items() if k is not None})
    return rows


def summary_line(summary: dict[str, Any]) -> str:
    """The summary's essentials in a few words, e.g. "690 steps, 8,260 samples/s, 2 ranks, best val_loss 0.0911 at epoch 30"."""
    parts = [f"{summary['steps']} steps"]
    if summary.get("samples_per_s") is not None:
        parts.append(f"{summary['samples_per_s']:,.0f} samples/s")
    parts.append(f"{summary['world_size']} rank{'s' if summary['world_size'] > 1 else ''}")
    best = summary.get("best")
    if best is not None:
        where = f"step {best.get('step')}" if summary.get("measured_in") == "steps" else f"epoch {best['epoch']}"
        parts.append(f"best {best['metric']} {best['value']:.4f} at {where}")
    if summary.get("stopped_early"):
        parts.append(f"stopped early after epoch {summary['epochs']}")
    return ", ".join(parts)


def _plain(value: Any) -> Any:
    """A JSON-safe scalar: NumPy scalars to Python, NaN and infinities to None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _from_csv(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda fh: fh.write(text), mode="w")
