"""The sampler that makes runs exact: which samples form global batch k, and which of them a rank takes.

Every function is pure, so every rank computes the same order, the same batches and the same step
counts, and the samples of a global batch do not depend on the number of ranks::

    order = epoch_order(n_samples, seed, epoch)             # a permutation, a function of (seed, epoch)
    batch = global_batch(order, k, global_batch_size)       # the k-th global batch of the epoch
    mine = shard(batch, rank, world_size)                   # this rank's part of it (every world_size-th)
"""

from __future__ import annotations

import numpy as np

from dptrain.data import steps_per_epoch

__all__ = ["epoch_order", "global_batch", "shard", "steps_per_epoch"]

_EPOCH_STREAM = 2  # the seed stream of the epoch order (1 and 3 are dptrain.data's)


def epoch_order(n_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The one global permutation of sample indices for ``epoch`` (identical on every rank)."""
    if not shuffle:
        return np.arange(n_samples)
    return np.random.default_rng([seed, _EPOCH_STREAM, epoch]).permutation(n_samples)


def global_batch(order: np.ndarray, step_in_epoch: int, global_batch_size: int) -> np.ndarray:
    """Indices of global batch ``step_in_epoch`` of an epoch whose order is ``order``."""
    return order[step_in_epoch * global_batch_size : (step_in_epoch + 1) * global_batch_size]


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's strided part of a global batch; may be empty when world_size > len(indices)."""
    return indices[rank::world_size]
