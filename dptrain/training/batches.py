"""Each training step's local batch (x, y), taken through the data hook with the step's epoch.

    loader = BatchLoader(train_data, steps_per_epoch)
    x, y = loader.get(step, local)             # = train_data.take(local, epoch=step // steps_per_epoch)

A step's batch is ``data.take(local, epoch)``: the rows of the step's global batch that this rank
holds, read, converted and augmented as in the step's epoch (augmentation is a pure function of seed,
epoch and row, so a run is the same at any number of ranks and resumes exactly).
"""

from __future__ import annotations

import numpy as np

from dptrain.data import Dataset

Batch = tuple[np.ndarray, np.ndarray]


class BatchLoader:
    """The local (x, y) of each training step of ``data``.

    Parameters
    ----------
    data : the training Dataset; a step's batch is ``data.take(local, epoch=step // steps_per_epoch)``.
    steps_per_epoch : optimizer steps per epoch (the epoch of a step, for augmentation).
    """

    def __init__(self, data: Dataset, steps_per_epoch: int) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.data, self.steps_per_epoch = data, steps_per_epoch

    def read(self, step: int, local: np.ndarray) -> Batch:
        """The batch of ``step`` read now: rows ``local`` augmented as in the step's epoch."""
        return self.data.take(local, epoch=step // self.steps_per_epoch)

    def get(self, step: int, local: np.ndarray) -> Batch:
        """The batch of optimizer step ``step``, whose local indices are ``local``."""
        return self.read(step, local)
