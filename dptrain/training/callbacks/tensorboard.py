"""TensorBoard event files of a run, written by rank 0 (``log.tensorboard = true``).

:class:`TensorBoardLogger` is a :class:`~dptrain.training.Callback` writing with tensorboardX (the
``tensorboard`` extra: no TensorFlow, no torch) into ``<out>/tensorboard``; ``tensorboard --logdir
runs`` shows every run. The scalars, by global optimizer step:

    train/loss, lr, samples_per_s, step_ms/data, step_ms/forward, step_ms/backward,
    step_ms/exchange, step_ms/optimizer
                           every ``every_steps`` steps, over the steps since the previous point
    epoch/train_loss, val/loss, val/accuracy (or val/rmse, val/r2)
                           at each evaluation (each epoch, or every eval.every_steps steps)

A resumed or requeued run writes into the same folder, and its first event purges the points after
the step it resumed from (written by the interrupted run after its last checkpoint), so each step
appears once and the steps only go up.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dptrain.errors import UserError
from dptrain.training.callback import Callback

from .metrics import Window

if TYPE_CHECKING:
    from dptrain.training.trainer import Trainer

FOLDER = "tensorboard"


def check_available() -> None:
    """UserError (exit 2, before anything is written) if tensorboardX is not installed."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise UserError('log.tensorboard = true needs tensorboardX: pip install "dptrain[tensorboard]"') from None


class TensorBoardLogger(Callback):
    """Write TensorBoard scalars on rank 0.

    folder : where the event files go; None: ``<trainer.out_dir>/tensorboard`` (nothing is written if
        the trainer has no out_dir either).
    every_steps : a point of the step scalars every N optimizer steps; 0: only at evaluations.
    """

    def __init__(self, folder: str | Path | None = None, every_steps: int = 50) -> None:
        if every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {every_steps}")
        self.folder = Path(folder) if folder is not None else None
        self.every_steps = every_steps
        self._writer = None
        self._window = Window()

    def on_train_begin(self, trainer: Trainer) -> None:
        folder = self.folder if self.folder is not None else (
            trainer.out_dir / FOLDER if trainer.out_dir is not None else None)
        if trainer.comm.rank != 0 or folder is None:
            return
        check_available()
        from tensorboardX import SummaryWriter

        # a resumed run: hide what the interrupted one wrote after the checkpoint it resumes from
        purge = trainer.step + 1 if trainer.step > 0 else None
        # the file's name ends with the step it starts from: a resume in the same second (names hold the
        # second) gets a new file, read after the older one
        self._writer = SummaryWriter(logdir=str(folder), purge_step=purge, flush_secs=30,
                                     filename_suffix=f".from-step-{trainer.step:09d}")
        self._window.reset(trainer)

    def on_step_end(self, trainer: Trainer, step: int, loss_sum: float) -> None:
        if self._writer is None or not self.every_steps or step % self.every_steps:
            return
        done, w = self._window.totals(trainer), self._writer
        w.add_scalar("train/loss", done.train_loss, step)
        w.add_scalar("lr", trainer.lr, step)
        w.add_scalar("samples_per_s", done.samples_per_s, step)
        for name, ms in self._window.phase_ms(trainer).items():
            w.add_scalar(f"step_ms/{name.removesuffix('_ms')}", ms, step)
        self._window.reset(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if self._writer is None:
            return
        step = metrics["step"]
        self._writer.add_scalar("epoch/train_loss", metrics["train_loss"], step)
        for key, value in metrics.items():
            if key.startswith("val_") and value is not None:
                self._writer.add_scalar(f"val/{key.removeprefix('val_')}", value, step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self._writer is not None:
            self._writer.close()  # flushes
            self._writer = None
