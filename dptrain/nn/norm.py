"""Normalization layers: synchronized BatchNorm and LayerNorm.

BatchNorm normalizes each channel with the mean and variance of the GLOBAL batch: the sums it
needs are added over the ranks with ``self.allreduce_sum`` (bound by the trainer, the identity in
a single process), so a run on R ranks computes what one process computes on the whole batch.
Collectives per call, the same on every rank whatever its local batch size (also 0 samples):

* ``forward(x, train=True)``: two ``allreduce_sum`` calls, both on float64 vectors:
  ``(C + 1,)`` = [per-channel sums of x, number of values per channel], then ``(C,)`` = the
  per-channel sums of squared deviations from the global mean (two passes: no cancellation);
* ``backward(dy)`` after a training forward: one ``allreduce_sum`` of a ``(2, C)`` float64 array,
  the per-channel sums of dy and of dy * xhat; none if ``input_grad=False`` (no dx to compute);
* ``forward(x, train=False)`` and the backward after it use the running statistics: no collective.

Parameter gradients are the LOCAL sums (this rank's samples only), like every other layer's: the
trainer's gradient exchange adds them up. Statistics are accumulated in float64 even for float32
activations; the elementwise work stays in the activations' dtype.

LayerNorm normalizes each sample over all its values, or each position's feature vector of a sequence
(``over="last"``), and needs no collective.
"""

from __future__ import annotations

import math

import numpy as np

from .layers import Layer

F64 = np.float64
SUM_BLOCK = 256  # rows summed in the activations' dtype before the float64 accumulation
#: what a LayerNorm normalizes over: each whole sample, or the last axis (each position of a sequence)
LAYERNORM_OVER = ("sample", "last")


def channel_sums(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-channel sums of ``a`` (batch, C, *spatial) into ``out`` (C,) float64.

    When the channel axis is innermost in memory (channels-last, as after a Conv2D, or flat (N, C)
    rows), blocks of SUM_BLOCK rows are summed by one matrix product in the activations' dtype and
    the block sums are added in float64 (measured: 15x faster than a float64 reduction, relative
    error ~1e-8 in float32); otherwise a float64 reduction over the other axes.
    """
    n_channels = a.shape[1]
    rows = np.moveaxis(a, 1, -1)
    if not rows.flags.c_contiguous or a.dtype not in (np.float32, np.float64) or a.size == 0:
        return np.sum(a, axis=(0, *range(2, a.ndim)), dtype=F64, out=out)
    rows = rows.reshape(-1, n_channels)
    full = len(rows) // SUM_BLOCK * SUM_BLOCK
    ones = np.ones((1, SUM_BLOCK), dtype=a.dtype)
    blocks = np.matmul(ones, rows[:full].reshape(-1, SUM_BLOCK, n_channels))  # (blocks, 1, C)
    np.sum(blocks, axis=(0, 1), dtype=F64, out=out)
    if full < len(rows):
        out += np.sum(rows[full:], axis=0, dtype=F64)
    return out


class BatchNorm(Layer):
    """Batch normalization with statistics synchronized over the ranks (torch's SyncBatchNorm).

    Samples of shape (F,) are normalized per feature over the batch; samples of shape
    (C, *spatial), e.g. (C, H, W), per channel over the batch and the spatial positions.
    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with, in training, the global batch's
    mean and biased variance, and in evaluation the running statistics.

    Parameters: weight (gamma, init 1) and bias (beta, init 0), both (C,).
    Buffers: running_mean (init 0) and running_var (init 1), both (C,), updated by each training
    forward as ``running = (1 - momentum) * running + momentum * batch_stat`` with the UNBIASED
    variance of the global batch; a training forward over an empty global batch leaves them alone.
    ValueError from a training forward if the global batch holds exactly one value per channel
    (its unbiased variance is undefined), raised on every rank at the same point.
    """

    #: the forward pass depends on the whole global batch (gradient accumulation would change it)
    syncs_batch_statistics = True

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"BatchNorm needs 0 <= momentum <= 1, got {momentum}")
        if not float(eps) > 0.0:
            raise ValueError(f"BatchNorm needs eps > 0, got {eps}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self._train = False
        self._count = 0.0  # values per channel in the global batch of the last forward
        self._xhat: np.ndarray | None = None
        self._invstd: np.ndarray | None = None  # (C,) float64

    def _check_shape(self, in_shape: tuple[int, ...]) -> None:
        if len(in_shape) < 1:
            raise ValueError(f"{type(self).__name__} needs samples of shape (C, ...), got {in_shape}")

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        self._check_shape(in_shape)
        return {"weight": (in_shape[0],), "bias": (in_shape[0],)}

    def buffer_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        self._check_shape(in_shape)
        return {"running_mean": (in_shape[0],), "running_var": (in_shape[0],)}

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        self._check_shape(in_shape)
        return in_shape

    def init_params(self, rng: np.random.Generator) -> None:
        self.params["weight"][...] = 1.0
        self.params["bias"][...] = 0.0

    def init_buffers(self) -> None:
        self.buffers["running_mean"][...] = 0.0
        self.buffers["running_var"][...] = 1.0

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (batch, C, *spatial) -> y of the same shape and dtype."""
        n_channels = x.shape[1]
        bshape = (1, n_channels) + (1,) * (x.ndim - 2)  # per-channel vectors broadcast to x
        xhat = self.workspace_like("xhat", x)
        y = self.workspace_like("y", x)
        invstd = self.workspace("invstd", (n_channels,), F64)
        if train:
            sums = self.workspace("sums", (n_channels + 1,), F64)
            channel_sums(x, sums[:n_channels])
            sums[n_channels] = x.size // n_channels
            self.allreduce_sum(sums)
            count = float(sums[n_channels])
            if count == 1:
                raise ValueError(f"{type(self).__name__} in training needs more than one value per channel "
                                 "in the global batch, got 1")
            mean = sums[:n_channels] / max(count, 1.0)
            np.subtract(x, mean.astype(x.dtype).reshape(bshape), out=xhat)
            np.multiply(xhat, xhat, out=y)  # y as scratch for the squared deviations
            sq = self.workspace("sq", (n_channels,), F64)
            channel_sums(y, sq)
            self.allreduce_sum(sq)
            var = sq / max(count, 1.0)  # biased: the one that normalizes
            if count > 1:
                m = self.momentum
                rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
                rm[...] = (1.0 - m) * rm + m * mean
                rv[...] = (1.0 - m) * rv + m * (sq / (count - 1.0))
            self._count = count
        else:
            mean = self.buffers["running_mean"].astype(F64)
            var = self.buffers["running_var"].astype(F64)
            np.subtract(x, mean.astype(x.dtype).reshape(bshape), out=xhat)
        np.sqrt(var + self.eps, out=invstd)
        np.reciprocal(invstd, out=invstd)
        xhat *= invstd.astype(x.dtype).reshape(bshape)
        np.multiply(xhat, self.params["weight"].astype(x.dtype, copy=False).reshape(bshape), out=y)
        y += self.params["bias"].astype(x.dtype, copy=False).reshape(bshape)
        self._train, self._xhat, self._invstd = bool(train), xhat, invstd
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dy : (batch, C, *spatial) -> dx of the same shape; writes the local dweight and dbias."""
        xhat, invstd = self._xhat, self._invstd
        n_channels = dy.shape[1]
        bshape = (1, n_channels) + (1,) * (dy.ndim - 2)
        dx = self.workspace_like("dx", dy)
        sums = self.workspace("dsums", (2, n_channels), F64)  # [sum dy, sum dy * xhat] per channel
        channel_sums(dy, sums[0])
        np.multiply(dy, xhat, out=dx)  # dx as scratch
        channel_sums(dx, sums[1])
        self.grads["bias"][...] = sums[0]
        self.grads["weight"][...] = sums[1]
        if not input_grad:
            return None
        scale = invstd * self.params["weight"]  # (C,) float64: d y / d x through xhat alone
        if not self._train:  # the running statistics are constants
            return np.multiply(dy, scale.astype(dy.dtype).reshape(bshape), out=dx)
        self.allreduce_sum(sums)
        if self._count == 0:
            return dx  # empty everywhere: nothing to compute
        mean_dy = sums[0] / self._count
        mean_dy_xhat = sums[1] / self._count
        # dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the global batch
        np.multiply(xhat, mean_dy_xhat.astype(dy.dtype).reshape(bshape), out=dx)
        np.subtract(dy, dx, out=dx)
        dx -= mean_dy.astype(dy.dtype).reshape(bshape)
        dx *= scale.astype(dy.dtype).reshape(bshape)
        return dx

    def decays(self, key: str, shape: tuple[int, ...]) -> bool:
        return False  # a scale and a shift: no weight decay

    def describe(self) -> str:
        return f"{type(self).__name__}(momentum={self.momentum}, eps={self.eps})"


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for samples of shape (F,) or (C, L)."""

    def _check_shape(self, in_shape: tuple[int, ...]) -> None:
        if len(in_shape) not in (1, 2):
            raise ValueError(f"BatchNorm1d takes samples of shape (F,) or (C, L), got {in_shape}: "
                             "use BatchNorm2d for images")


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for image samples of shape (C, H, W)."""

    def _check_shape(self, in_shape: tuple[int, ...]) -> None:
        if len(in_shape) != 3:
            raise ValueError(f"BatchNorm2d takes samples of shape (C, H, W), got {in_shape}: "
                             "use BatchNorm1d for flat samples")


class LayerNorm(Layer):
    """Layer normalization, over each whole sample or over the last axis.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, mean and biased variance over the D values of
    one row, in x's dtype (row sums as matrix-vector products; the variance from the deviations, not
    from E[x^2] - mean^2, so an offset large against the spread costs no precision); the same in
    training and evaluation; no collective.

    * ``over="sample"`` (default): a row is a whole sample (torch's LayerNorm(normalized_shape=the
      sample's shape)); weight (init 1) and bias (init 0) have the sample's shape.
    * ``over="last"``: a row is the feature vector of one position: on (batch, T, D) sequences, each of
      the batch * T positions is normalized over its D features (torch's LayerNorm(D)); weight and bias
      are (D,), and their gradients add up over the positions.

    On flat samples (D,) both are the same. Computed on x as (rows, D): (batch, sample size) or
    (batch * T, D).
    """

    syncs_batch_statistics = False

    def __init__(self, eps: float = 1e-5, over: str = "sample") -> None:
        super().__init__()
        if not float(eps) > 0.0:
            raise ValueError(f"LayerNorm needs eps > 0, got {eps}")
        if over not in LAYERNORM_OVER:
            raise ValueError(f"LayerNorm: over must be 'sample' or 'last', got {over!r}")
        self.eps = float(eps)
        self.over = over
        self._xhat: np.ndarray | None = None  # (rows, D)
        self._invstd: np.ndarray | None = None  # (rows,)
        self._ones_by_size: dict[tuple[int, str], np.ndarray] = {}

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        shape = tuple(in_shape) if self.over == "sample" else tuple(in_shape[-1:])
        return {"weight": shape, "bias": shape}

    def init_params(self, rng: np.random.Generator) -> None:
        self.params["weight"][...] = 1.0
        self.params["bias"][...] = 0.0

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (batch, *sample_shape) -> y of the same shape and dtype."""
        if self.over == "sample":
            n, d = len(x), math.prod(x.shape[1:])
        else:
            n, d = math.prod(x.shape[:-1]), x.shape[-1]
        x2 = x.reshape(n, d)
        xhat = self.workspace("xhat", (n, d), x.dtype)
        y = self.workspace("y", (n, d), x.dtype)
        mean = self.workspace("mean", (n,), x.dtype)
        invstd = self.workspace("invstd", (n,), x.dtype)
        np.matmul(x2, self._ones(d, x.dtype), out=mean)  # row sums: one matrix-vector product
        mean *= 1.0 / d
        np.subtract(x2, mean[:, None], out=xhat)
        np.multiply(xhat, xhat, out=y)  # y as scratch for the squared deviations
        np.matmul(y, self._ones(d, x.dtype), out=invstd)
        invstd *= 1.0 / d
        invstd += self.eps
        np.sqrt(invstd, out=invstd)
        np.reciprocal(invstd, out=invstd)
        xhat *= invstd[:, None]
        np.multiply(xhat, self.params["weight"].reshape(d), out=y)
        y += self.params["bias"].reshape(d)
        self._xhat, self._invstd = xhat, invstd
        return y.reshape(x.shape)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dy : (batch, *sample_shape) -> dx of the same shape; writes dweight and dbias."""
        xhat, invstd = self._xhat, self._invstd
        n, d = xhat.shape
        dy2 = dy.reshape(n, d)
        dx = self.workspace("dx", (n, d), dy.dtype)
        sums = self.workspace("dsums", (2, d), F64)  # column sums: [dbias, dweight]
        channel_sums(dy2, sums[0])
        np.multiply(dy2, xhat, out=dx)  # dx as scratch
        channel_sums(dx, sums[1])
        self.grads["bias"].reshape(d)[...] = sums[0]
        self.grads["weight"].reshape(d)[...] = sums[1]
        if not input_grad:
            return None
        g = self.workspace("g", (n, d), dy.dtype)  # the gradient with respect to xhat
        np.multiply(dy2, self.params["weight"].reshape(d), out=g)
        ones = self._ones(d, dy.dtype)
        mean_g = np.matmul(g, ones, out=self.workspace("mean_g", (n,), dy.dtype))
        mean_g *= 1.0 / d
        np.multiply(g, xhat, out=dx)
        mean_g_xhat = np.matmul(dx, ones, out=self.workspace("mean_g_xhat", (n,), dy.dtype))
        mean_g_xhat *= 1.0 / d
        # dx = invstd * (g - mean(g) - xhat * mean(g * xhat)), means over the normalized values
        np.multiply(xhat, mean_g_xhat[:, None], out=dx)
        np.subtract(g, dx, out=dx)
        dx -= mean_g[:, None]
        dx *= invstd[:, None]
        return dx.reshape(dy.shape)

    def _ones(self, d: int, dtype) -> np.ndarray:
        """(d,) ones, made once per (d, dtype): row sums as one matrix-vector product (BLAS), 3x faster
        than a float64 reduction over rows of 128."""
        key = (d, np.dtype(dtype).char)
        ones = self._ones_by_size.get(key)
        if ones is None:
            ones = self._ones_by_size[key] = np.ones(d, dtype=dtype)
        return ones

    def decays(self, key: str, shape: tuple[int, ...]) -> bool:
        return False  # a scale and a shift, whatever the sample's shape: no weight decay

    def describe(self) -> str:
        return f"LayerNorm(eps={self.eps}{', over=last' if self.over == 'last' else ''})"
