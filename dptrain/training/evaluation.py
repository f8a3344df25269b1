"""Exact distributed evaluation of a model on a dataset.

Each rank takes a strided share of the samples and the sums (loss, correct count, samples, and
for regression the sums that R^2 needs) are added over the ranks in one allreduce, so every
sample counts once whatever the world size and every rank gets the same metrics.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dptrain.data import Dataset
from dptrain.nn import Loss, Sequential
from dptrain.parallel.comm import SingleProcessComm
from dptrain.parallel.sampler import shard

#: samples per forward pass in evaluation, at most: the layers' workspaces grow with it (the digits CNN
#: holds about 115 KB per sample: 116 MB at 1024, against 13 MB for a training batch of 64) ...
EVAL_CHUNK = 1024
#: ... and at most this many values in the widest activation between the model's layers: a sample of
#: text (64 positions x 128 features, 512 inside the MLPs) takes 128 per pass, not 1024 (which held
#: 1 GB of workspaces, paid for in page faults at the first evaluation)
EVAL_VALUES = 2**20


def eval_chunk(model: Sequential) -> int:
    """Samples per forward pass when evaluating ``model``: EVAL_CHUNK, fewer for big samples."""
    widest = max(math.prod(shape) for shape in model.shapes)
    return max(1, min(EVAL_CHUNK, EVAL_VALUES // max(widest, 1)))

#: The one table of validation metrics: the keys that :func:`evaluate` reports for each loss task,
#: as the trainer names them ("val_" + key; "n_samples" aside), ...
VALIDATION_METRICS = {
    "classification": ("val_loss", "val_accuracy"),
    "multilabel": ("val_loss", "val_accuracy"),
    "regression": ("val_loss", "val_rmse", "val_r2"),
}
#: ... and for each of them, whether a lower value is better (early stopping, the run summary)
LOWER_IS_BETTER = {"val_loss": True, "val_accuracy": False, "val_rmse": True, "val_r2": False}
#: every validation metric, in the order the epoch lines show them
VALIDATION_KEYS = tuple(LOWER_IS_BETTER)


def validation_metrics(task: str) -> tuple[str, ...]:
    """The validation metrics reported for a loss's ``task`` (an unknown task: its loss only)."""
    return VALIDATION_METRICS.get(task, ("val_loss",))


def evaluate(model: Sequential, loss: Loss, dataset: Dataset, comm=None) -> dict[str, Any]:
    """Exact distributed evaluation: each rank takes a strided share; the sums are allreduced.

    Every sample counts once whatever the world size. Returns {"loss": mean loss, "n_samples": N}
    plus "accuracy" (classification; for multi-label, the share of labels right) or, for
    regression, "rmse" (sqrt(SS_res / (N * k)): the root of the mean squared residual over all
    samples and output columns, whatever the loss) and "r2", the coefficient of
    determination 1 - SS_res / SS_tot over all samples and output columns: SS_res sums the
    squared residuals, SS_tot the squared deviations of y from its column's mean over the whole
    dataset (for one output column, the usual R^2; for several, scikit-learn's
    ``r2_score(..., multioutput="variance_weighted")``). NaN when SS_tot is 0.
    Collective: every rank must call it, and makes one allreduce.
    """
    comm = comm if comm is not None else SingleProcessComm()
    mine = shard(np.arange(len(dataset)), comm.rank, comm.size)
    regression = loss.task == "regression"
    k = dataset.n_outputs if regression else 0
    # loss sum, correct count, sample count; regression: SS_res, sum(y - c) and sum((y - c)**2) per column
    sums = np.zeros(3 + (1 + 2 * k if regression else 0), dtype=np.float64)
    if regression:  # c: the first sample's targets, the same on every rank; shifting y by it keeps
        # sum((y - c)**2) - sum(y - c)**2 / N accurate when the mean of y is large against its spread
        c = dataset.take(np.arange(min(len(dataset), 1)))[1].astype(np.float64).reshape(-1, k)
        c = c[0] if len(c) else np.zeros(k)
    chunk = eval_chunk(model)
    for start in range(0, len(mine), chunk):
        idx = mine[start : start + chunk]
        x, y = dataset.take(idx)
        z = model.forward(x, train=False)
        sums[0] += loss.value(z, y)
        if loss.task == "classification":  # a sequence's accuracy: the share of its positions right
            right = z.argmax(axis=-1) == y
            sums[1] += np.count_nonzero(right) / (right[0].size if right.ndim > 1 else 1)
        elif loss.task == "multilabel":  # the share of labels right, each predicted by logit > 0
            sums[1] += np.count_nonzero((z > 0) == (y > 0.5)) / max(z.shape[1], 1)
        else:
            y64 = y.astype(np.float64).reshape(len(idx), k)
            sums[3] += np.square(z.astype(np.float64).reshape(len(idx), k) - y64).sum()
            shifted = y64 - c
            sums[4 : 4 + k] += shifted.sum(axis=0)
            sums[4 + k :] += np.square(shifted).sum(axis=0)
        sums[2] += len(idx)
    comm.allreduce_sum(sums)
    n = int(sums[2])
    mean_loss = sums[0] / n if n else math.nan
    result: dict[str, Any] = {"loss": mean_loss, "n_samples": n}
    if loss.task in ("classification", "multilabel"):
        result["accuracy"] = sums[1] / n if n else math.nan
    else:
        result["rmse"] = math.sqrt(sums[3] / (n * k)) if n and k else math.nan
        result["r2"] = _r2(sums[3], sums[4 : 4 + k], sums[4 + k :], n)
    return result


def _r2(ss_res: float, sum_y: np.ndarray, sum_y2: np.ndarray, n: int) -> float:
    """1 - SS_res / SS_tot from the sums of y and y**2 per column over n samples (NaN if SS_tot is 0)."""
    if n == 0:
        return math.nan
    ss_tot = float(np.maximum(sum_y2 - np.square(sum_y) / n, 0.0).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
