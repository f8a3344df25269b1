"""Rank 0's view of a run while it trains.

:class:`ProgressBar` is a :class:`~dptrain.training.Callback`. On a terminal it draws a tqdm bar
over all the run's steps, showing the epoch, the mean training loss of the epoch so far and the
samples per second; the trainer's epoch lines are printed above it. Off a terminal (a batch job's
log file) it prints a plain line every ``every_steps`` steps instead, so logs stay readable::

    step 50/690  epoch 3  train_loss 0.3056  samples/s 601,873  lr 0.05

``train_loss`` is the mean loss per sample over the steps since the previous line; ``samples/s``
the global samples per second of wall time over them. Pass :meth:`ProgressBar.write` as the
trainer's ``log`` so that its lines do not break the bar::

    progress = ProgressBar(every_steps=50)
    trainer = Trainer(..., callbacks=[progress], log=progress.write)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from dptrain.training.callback import Callback
from dptrain.training.totals import RunningTotals

if TYPE_CHECKING:
    from dptrain.training.trainer import Trainer


class ProgressBar(Callback):
    """A tqdm bar on a terminal, plain lines every ``every_steps`` steps otherwise (rank 0 only).

    Parameters
    ----------
    every_steps : off a terminal, a line every N optimizer steps; 0: none (the epoch lines remain).
    tty : draw the bar (True) or print lines (False); None: bar if ``file`` is a terminal.
    echo : prints a line when there is no bar (e.g. ``click.echo``).
    file : where the bar goes [default: sys.stdout at the start of fit()].
    """

    def __init__(self, every_steps: int = 50, tty: bool | None = None, echo: Callable[[str], None] = print,
                 file: TextIO | None = None) -> None:
        if every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {every_steps}")
        self.every_steps, self.tty, self.echo, self.file = every_steps, tty, echo, file
        self._active = False
        self._bar = None
        # marks of the trainer's running totals: at the last plain line, at the start of the epoch
        self._line_mark, self._epoch_mark = RunningTotals(), RunningTotals()

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (or plainly when there is none)."""
        if self._bar is not None:
            self._bar.write(line, file=self._file)
        else:
            self.echo(line)

    # -- the hooks ------------------------------------------------------------------------------

    def on_train_begin(self, trainer: Trainer) -> None:
        self._active = trainer.comm.rank == 0
        if not self._active:
            return
        self._file = self.file if self.file is not None else sys.stdout
        tty = self.tty if self.tty is not None else _isatty(self._file)
        self._line_mark, self._epoch_mark = trainer.totals.copy(), trainer.totals.copy()
        self._total = trainer.total_steps
        if tty and trainer.step < self._total:
            from tqdm import tqdm

            self._bar = tqdm(total=self._total, initial=trainer.step, unit="step", file=self._file,
                             dynamic_ncols=True, desc=self._description(trainer), leave=True)

    def on_step_end(self, trainer: Trainer, step: int, loss_sum: float) -> None:
        if not self._active:
            return
        if self._bar is not None:
            if _redraws_at_next_update(self._bar):  # the postfix is formatted only to be drawn
                self._set_postfix(trainer)
            self._bar.update(1)
            return
        if self.every_steps and step % self.every_steps == 0:
            done = trainer.totals - self._line_mark
            epoch = f"{step / trainer.steps_per_epoch:.2f}" if trainer.by_steps else trainer.epoch + 1
            self.echo(f"step {step}/{self._total}  epoch {epoch}  train_loss {done.train_loss:.4f}  "
                      f"samples/s {done.samples_per_s:,.0f}  lr {trainer.lr:.4g}")
            self._line_mark = trainer.totals.copy()

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if not self._active:
            return
        if self._bar is not None:
            self._set_postfix(trainer)  # the whole epoch's, shown until the next epoch's first redraw
            self._bar.set_description_str(self._description(trainer), refresh=False)
        self._epoch_mark = trainer.totals.copy()

    def on_train_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._active = False

    def _set_postfix(self, trainer: Trainer) -> None:
        """The epoch so far: its mean loss per sample and samples per second (drawn at the next redraw)."""
        done = trainer.totals - self._epoch_mark
        self._bar.set_postfix_str(f"loss {done.train_loss:.4f}, {done.samples_per_s:,.0f} samples/s", refresh=False)

    @staticmethod
    def _description(trainer: Trainer) -> str:
        if trainer.by_steps:
            return f"epoch {trainer.step / trainer.steps_per_epoch:.2f}"
        return f"epoch {min(trainer.epoch + 1, trainer.epochs)}/{trainer.epochs}"


def _redraws_at_next_update(bar) -> bool:
    """Whether ``bar.update(1)`` will redraw the bar (tqdm's own test: miniters and mininterval)."""
    if bar.n + 1 - bar.last_print_n < bar.miniters:
        return False
    now = bar._time()
    return now - bar.last_print_t >= bar.mininterval and now >= bar.start_t + bar.delay


def _isatty(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
