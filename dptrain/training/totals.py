"""What the steps of a run add up to (steps, samples, the exact loss sum, wall time), and the clock
that times them without evaluation, checkpoints and sync checks."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from fractions import Fraction


@dataclass
class RunningTotals:
    """What the steps of :meth:`Trainer.fit` add up to, updated once per step.

    A callback keeps a :meth:`copy` as a mark and subtracts it later: ``trainer.totals - mark``
    holds the steps, samples, loss and training seconds since the mark. The loss is summed exactly
    (a Fraction; NaN and infinite step losses are counted aside), so the mean loss of a window is
    the same whatever came before it, in a resumed run too.
    """

    steps: int = 0
    samples: int = 0
    loss: Fraction = Fraction(0)  # exact sum of the finite step losses (each summed over its global batch)
    non_finite: int = 0  # steps whose loss was NaN or infinite (on_nan = "skip")
    seconds: float = 0.0  # wall time of the steps; evaluation, checkpoints and sync checks excluded

    def add(self, samples: int, loss_sum: float, seconds: float) -> None:
        """One step of ``samples`` samples whose loss summed to ``loss_sum``, taking ``seconds``."""
        self.steps += 1
        self.samples += samples
        if math.isfinite(loss_sum):
            self.loss += Fraction(loss_sum)
        else:
            self.non_finite += 1
        self.seconds += seconds

    def copy(self) -> RunningTotals:
        return replace(self)

    def __sub__(self, mark: RunningTotals) -> RunningTotals:
        return RunningTotals(self.steps - mark.steps, self.samples - mark.samples, self.loss - mark.loss,
                             self.non_finite - mark.non_finite, self.seconds - mark.seconds)

    @property
    def train_loss(self) -> float:
        """Mean loss per sample (NaN without samples or after a non-finite step loss)."""
        return float(self.loss) / self.samples if self.samples and not self.non_finite else math.nan

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


class Stopwatch:
    """The training clock: :meth:`lap` gives the seconds since the last lap (or :meth:`start`), less
    the time spent inside :meth:`paused` blocks."""

    def __init__(self) -> None:
        self._mark = 0.0

    def start(self) -> None:
        self._mark = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        return seconds

    @contextlib.contextmanager
    def paused(self):
        """The clock does not run over the body."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._mark += time.perf_counter() - start
