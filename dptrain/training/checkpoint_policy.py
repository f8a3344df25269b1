"""When rank 0 writes checkpoints."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointPolicy:
    """When rank 0 writes checkpoints. A checkpoint is always written at the end of training."""

    every_steps: int = 0  # 0 = off
    every_epochs: int = 1  # 0 = off
    keep: int = 3
