"""Early stopping on a validation metric, as a pure function of the epochs' metrics.

The metrics are computed by an exact distributed evaluation (sums over all ranks), so every
rank sees the same values, takes the same decision and stops after the same epoch: no extra
collective is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .evaluation import LOWER_IS_BETTER


@dataclass
class EarlyStopping:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    State (``best``, ``best_epoch``, ``bad_epochs``, ``stopped``) goes into checkpoints, so a
    resumed run continues the count and a run that stopped early stays stopped.
    """

    patience: int
    metric: str = "val_loss"
    min_delta: float = 0.0
    best: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.metric not in LOWER_IS_BETTER:
            raise ValueError(f"metric must be one of {', '.join(LOWER_IS_BETTER)}, got {self.metric!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    def update(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Record epoch ``epoch``'s metrics; True if training should stop now.

        KeyError naming the metric if the epoch has no such value (no validation data, or
        val_accuracy on a regression task).
        """
        if self.metric not in metrics:
            raise KeyError(f"early stopping monitors {self.metric}, which this run does not report "
                           f"(it reports {', '.join(k for k in metrics if k.startswith('val_')) or 'no validation metric'})")
        value = float(metrics[self.metric])
        sign = 1.0 if LOWER_IS_BETTER[self.metric] else -1.0
        if math.isnan(self.best) or sign * (self.best - value) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.patience
        return self.stopped

    def state(self) -> dict[str, Any]:
        return {"best": None if math.isnan(self.best) else self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "stopped": self.stopped}

    def load_state(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = math.nan if best is None else float(best)
        self.best_epoch = int(state.get("best_epoch", 0))
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.stopped = bool(state.get("stopped", False))
