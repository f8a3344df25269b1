"""Losses on a batch, returning the SUM of per-sample losses and its gradient.

Summing (not averaging) is what makes data parallelism exact: every rank returns the sum over
its part of the global batch, the trainer adds the sums of all ranks and divides once by the
number of samples in the global batch, so a partial batch or an empty shard needs no special case.
"""

from __future__ import annotations

import numpy as np

from .layers import Workspaces


class Loss(Workspaces):
    """Base class. The gradient a loss returns lives in a workspace (see :class:`Workspaces`): valid
    until the next ``value_and_grad`` call, whatever its shape; ``value`` calls leave it alone."""

    #: "classification" (integer labels), "regression" (float targets) or "multilabel" (0/1 targets)
    task: str = "classification"

    def _check(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Float targets ``y`` of the outputs' shape (batch, k); (batch,) is accepted when k == 1
        (returned reshaped). ValueError otherwise: broadcasting would compute another loss."""
        if y.shape != z.shape:
            if z.ndim == 2 and z.shape[1] == 1 and y.shape == (len(z),):
                return y.reshape(z.shape)
            raise ValueError(f"{type(self).__name__} needs targets of the outputs' shape {z.shape}, got {y.shape}")
        return y

    def value_and_grad(self, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Return (sum of per-sample losses, d(sum)/dz of the same shape as z)."""
        raise NotImplementedError

    def value(self, z: np.ndarray, y: np.ndarray) -> float:
        """Sum of per-sample losses, without the gradient."""
        return self.value_and_grad(z, y)[0]


class SoftmaxCrossEntropy(Loss):
    """Softmax cross-entropy fused on logits.

    z : (batch, n_classes) logits; y : (batch,) integer labels in [0, n_classes).
    Per-sample loss: logsumexp(z_i) - z_i[y_i]. Gradient of the sum: softmax(z) - onehot(y).

    Sequences: z : (batch, T, n_classes) with y : (batch, T) integer labels (e.g. int64). A sample's
    loss is the MEAN over its T positions of their cross-entropy, so the trainer's sum over the global
    batch divided by its number of samples is the mean over all its positions (T is the same for every
    sample), as torch's CrossEntropyLoss on (batch * T, n_classes); the gradient is scaled by 1 / T.
    Computed on z as (batch * T, n_classes) rows.
    """

    task = "classification"

    def _exp_shifted(self, z: np.ndarray, use: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shifted = z - max, exp(shifted), row sums), the first two in workspaces reused per ``use``."""
        shifted = self.workspace(use + "_shifted", z.shape, z.dtype)
        e = self.workspace(use + "_exp", z.shape, z.dtype)
        if len(z):
            np.subtract(z, z.max(axis=1, keepdims=True), out=shifted)
        np.exp(shifted, out=e)
        return shifted, e, e.sum(axis=1, keepdims=True)

    def _loss_sum(self, shifted: np.ndarray, sums: np.ndarray, y: np.ndarray) -> float:
        # sum_i logsumexp(z_i) - z_i[y_i], with the max shift cancelling out
        return float(np.log(sums).sum(dtype=np.float64) - shifted[np.arange(len(y)), y].sum(dtype=np.float64))

    @staticmethod
    def _rows(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(z, y, 1) for (batch, C) logits; (z as (batch * T, C), y as (batch * T,), T) for sequences."""
        if z.ndim == 2:
            return z, y, 1
        if z.ndim != 3 or y.shape != z.shape[:2]:
            raise ValueError(f"SoftmaxCrossEntropy takes logits (batch, C) with labels (batch,), or (batch, T, C) "
                             f"with labels (batch, T); got logits {z.shape} and labels {y.shape}")
        rows = z.shape[0] * z.shape[1]
        return z.reshape(rows, z.shape[2]), y.reshape(rows), z.shape[1]

    def value_and_grad(self, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        z2, y2, positions = self._rows(z, y)
        shifted, dz, sums = self._exp_shifted(z2, "grad")  # dz stays valid across value() calls
        loss = self._loss_sum(shifted, sums, y2)
        dz /= sums  # softmax, in place of the exponentials
        dz[np.arange(len(y2)), y2] -= 1
        if positions > 1:  # a sequence's loss is the mean over its positions
            loss /= positions
            dz *= 1.0 / positions
        return loss, dz.reshape(z.shape)

    def value(self, z: np.ndarray, y: np.ndarray) -> float:
        z2, y2, positions = self._rows(z, y)
        shifted, _, sums = self._exp_shifted(z2, "value")
        loss = self._loss_sum(shifted, sums, y2)
        return loss / positions if positions > 1 else loss


class MeanSquaredError(Loss):
    """Mean squared error, averaged over the output columns, summed over samples.

    z : (batch, k) predictions; y : (batch, k) float targets ((batch,) is accepted when k == 1;
    any other shape is a ValueError, not a broadcast).
    Per-sample loss: mean_j (z_ij - y_ij)**2 (so the global mean equals PyTorch's MSELoss).
    Gradient of the sum: 2 * (z - y) / k.
    """

    task = "regression"

    def _loss_sum(self, z: np.ndarray, y: np.ndarray, use: str) -> tuple[float, np.ndarray]:
        """(sum of per-sample losses, z - y in a workspace reused per ``use``)."""
        y = self._check(z, y)
        dtype = np.result_type(z, y)  # that of z - y
        diff = np.subtract(z, y, out=self.workspace(use + "_diff", z.shape, dtype))
        squares = np.multiply(diff, diff, out=self.workspace(use + "_squares", z.shape, dtype))
        return float(squares.sum(dtype=np.float64)) / z.shape[1], diff

    def value_and_grad(self, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        loss, diff = self._loss_sum(z, y, "grad")
        return loss, np.multiply(diff, 2.0 / z.shape[1], out=diff)

    def value(self, z: np.ndarray, y: np.ndarray) -> float:
        return self._loss_sum(z, y, "value")[0]


class BCEWithLogits(Loss):
    """Binary cross-entropy on logits, averaged over the output columns, summed over samples.

    z : (batch, k) logits; y : (batch, k) float targets in [0, 1] (usually 0 or 1; binary
    targets come as (batch, 1), and (batch,) is accepted when k == 1).
    Per-sample loss: mean_j max(z_ij, 0) - z_ij * y_ij + log1p(exp(-|z_ij|)), the stable form of
    -y log sigmoid(z) - (1 - y) log(1 - sigmoid(z)) (so the global mean equals PyTorch's
    BCEWithLogitsLoss). Gradient of the sum: (sigmoid(z) - y) / k.
    """

    task = "multilabel"

    def _loss_sum(self, z: np.ndarray, y: np.ndarray, use: str) -> tuple[float, np.ndarray]:
        """(sum of per-sample losses, exp(-|z|) in a workspace reused per ``use``)."""
        e = np.abs(z, out=self.workspace(use + "_e", z.shape, z.dtype))
        np.negative(e, out=e)
        np.exp(e, out=e)
        elem = np.log1p(e, out=self.workspace(use + "_elem", z.shape, z.dtype))
        t = np.maximum(z, 0, out=self.workspace(use + "_t", z.shape, z.dtype))
        elem += t
        np.multiply(z, y, out=t)
        elem -= t
        k = z.shape[1]
        return float(elem.sum(dtype=np.float64)) / k, e

    def value_and_grad(self, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        y = self._check(z, y)
        loss, e = self._loss_sum(z, y, "grad")
        # With e = exp(-|z|) and s = e / (1 + e) = sigmoid(-|z|): sigmoid(z) - y is s - y for
        # z < 0 and (1 - y) - s for z >= 0. Nothing overflows, and a saturated logit with the
        # matching 0/1 target keeps its tiny gradient instead of rounding 1 - s - 1 to 0.
        dz = np.add(e, 1, out=self.workspace("dz", z.shape, z.dtype))
        np.reciprocal(dz, out=dz)
        dz *= e
        nonnegative = np.greater_equal(z, 0, out=self.workspace("nonnegative", z.shape, np.bool_))
        np.negative(dz, out=dz, where=nonnegative)
        dz += np.subtract(nonnegative, y, out=self.workspace("grad_t", z.shape, z.dtype), dtype=z.dtype)
        dz *= 1.0 / z.shape[1]
        return loss, dz

    def value(self, z: np.ndarray, y: np.ndarray) -> float:
        return self._loss_sum(z, self._check(z, y), "value")[0]


LOSSES: dict[str, type[Loss]] = {
    "cross_entropy": SoftmaxCrossEntropy, "mse": MeanSquaredError, "bce_with_logits": BCEWithLogits,
}
