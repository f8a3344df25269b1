"""Exact distributed evaluation of a model on a dataset.

Each rank takes a strided share of the samples and the sums (loss, correct count, samples) are
added over the ranks, so every sample counts once whatever the world size and every rank gets
the same metrics.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .comm import SingleProcessComm
from .data import Dataset, shard
from .nn import Loss, Sequential

EVAL_CHUNK = 4096  # samples per forward pass in evaluation, to bound memory


def evaluate(model: Sequential, loss: Loss, dataset: Dataset, comm=None) -> dict[str, Any]:
    """Exact distributed evaluation: each rank takes a strided share; the sums are allreduced.

    Every sample counts once whatever the world size. Returns {"loss": mean loss, "n_samples": N}
    plus "accuracy" (classification; for multi-label, the share of labels right) or "rmse" (regression). Collective: every rank must call it.
    """
    comm = comm if comm is not None else SingleProcessComm()
    mine = shard(np.arange(len(dataset)), comm.rank, comm.size)
    sums = np.zeros(3, dtype=np.float64)  # loss sum, correct count, sample count
    for start in range(0, len(mine), EVAL_CHUNK):
        idx = mine[start : start + EVAL_CHUNK]
        x, y = dataset.take(idx)
        z = model.forward(x, train=False)
        sums[0] += loss.value(z, y)
        if loss.task == "classification":
            sums[1] += np.count_nonzero(z.argmax(axis=1) == y)
        elif loss.task == "multilabel":  # the share of labels right, each predicted by logit > 0
            sums[1] += np.count_nonzero((z > 0) == (y > 0.5)) / max(z.shape[1], 1)
        sums[2] += len(idx)
    comm.allreduce_sum(sums)
    n = int(sums[2])
    mean_loss = sums[0] / n if n else math.nan
    result: dict[str, Any] = {"loss": mean_loss, "n_samples": n}
    if loss.task in ("classification", "multilabel"):
        result["accuracy"] = sums[1] / n if n else math.nan
    else:
        result["rmse"] = math.sqrt(mean_loss) if n else math.nan
    return result
