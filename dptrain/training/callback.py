"""The hooks a :class:`~dptrain.training.trainer.Trainer` calls, on every rank, in the same order.

A callback reads the trainer through its public attributes (``step``, ``epoch``, ``totals``,
``phase_seconds``, ``last_step_times``, ``comm`` ...) and never sets them. Collectives in a hook
are allowed: every rank calls every hook at the same point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """Hooks called on every rank, in the same order. Override what you need."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """At the start of fit(), after the parameters are broadcast, before the first step."""

    def on_train_end(self, trainer: Trainer) -> None:
        """When fit() returns normally (done, stopped early or by a signal), after the last checkpoint."""

    def on_step_end(self, trainer: Trainer, step: int, loss_sum: float) -> None:
        """After optimizer step ``step``; loss_sum is summed over the whole global batch.

        ``trainer.last_step_times`` holds the step's perf_counter marks (see :class:`StepTimes`)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        """After epoch ``epoch`` (1-based) and its evaluation."""

    def on_span(self, trainer: Trainer, kind: str, step: int, start: float, end: float) -> None:
        """After an "evaluation" or a "checkpoint" at ``step``, with its perf_counter marks."""
