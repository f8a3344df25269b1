"""Pooling over images (batch, C, H, W): max and average over windows, and the global average; and
max and average pooling along sequences (batch, C, L), as the 2-D ones on (batch, C, 1, L).

Pooling loops over the few offsets of its window, each step vectorized over the batch; outputs keep
the input's memory order (channels-last after a Conv2D). An empty batch is fine.
"""

from __future__ import annotations

import numpy as np

from .layers import Layer
from .windows import length_output, offset_slices, show_pair, sized_int, sized_pair, window_output


class _Pool2D(Layer):
    """Shared set-up of the pooling layers: a ``pool`` window moved by ``stride`` (default: the
    pool, so windows tile the image), no padding; rows and columns past the last window are ignored."""

    def __init__(self, pool, stride=None) -> None:
        super().__init__()
        self.pool = sized_pair(pool, "pool", 1)
        self.stride = self.pool if stride is None else sized_pair(stride, "stride", 1)
        self._x_shape: tuple[int, ...] | None = None

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        Ho, Wo = window_output(self, in_shape, self.pool, self.stride)
        return (in_shape[0], Ho, Wo)

    def _start(self, x: np.ndarray) -> tuple[int, int, list]:
        """Check x : (N, C, H, W); return (Ho, Wo) and the input slices of each window offset."""
        if x.ndim != 4:
            raise ValueError(f"{self.describe()} takes a batch of shape (batch, C, H, W), got {x.shape}")
        _, Ho, Wo = self.output_shape(x.shape[1:])
        self._x_shape = x.shape
        return Ho, Wo, offset_slices(Ho, Wo, self.pool, self.stride)

    def describe(self) -> str:
        return f"{type(self).__name__}({show_pair(self.pool)}, stride={show_pair(self.stride)})"


class MaxPool2D(_Pool2D):
    """Maximum over each window. x : (N, C, H, W) -> y : (N, C, Ho, Wo), Ho = (H - ph) // sh + 1.

    Backward routes each output's gradient to the argmax of its window; on ties, to the first
    maximal element in row-major order within the window (only that one). Overlapping windows
    (stride < pool) add up their gradients. A NaN in a window makes its maximum NaN.

    Forward is a running np.maximum over the window's offsets (no argmax kept); backward finds, per
    offset in order, the elements equal to the maximum that no earlier offset took. The output
    keeps the input's memory order (channels-last after a Conv2D).
    """

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        Ho, Wo, slices = self._start(x)
        y = self.workspace_like("y", x, shape=(len(x), x.shape[1], Ho, Wo))
        np.copyto(y, x[:, :, slices[0][0], slices[0][1]])
        for rows, cols in slices[1:]:
            np.maximum(y, x[:, :, rows, cols], out=y)
        self._x, self._y = x, y
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        """dy : (N, C, Ho, Wo) -> dx : (N, C, H, W)."""
        x, y = self._x, self._y
        dy = dy.reshape(y.shape)
        N, C, H, W = x.shape
        Ho, Wo = y.shape[2:]
        slices = offset_slices(Ho, Wo, self.pool, self.stride)
        # windows that tile the image exactly: each input element is in one window, written once
        tiled = self.stride == self.pool and H == Ho * self.pool[0] and W == Wo * self.pool[1]
        dx = self.workspace_like("dx", x, dy.dtype)
        if not tiled:
            dx.fill(0)
        mask = self.workspace_like("mask", y, np.bool_)
        taken = self.workspace_like("taken", y, np.bool_)
        t = None if tiled else self.workspace_like("t", y, dy.dtype)
        for k, (rows, cols) in enumerate(slices):
            np.equal(x[:, :, rows, cols], y, out=mask)
            if k:
                np.greater(mask, taken, out=mask)  # mask and not taken: a tie goes to the first offset
            if k < len(slices) - 1:
                np.logical_or(taken, mask, out=taken) if k else np.copyto(taken, mask)
            if tiled:
                np.multiply(dy, mask, out=dx[:, :, rows, cols])
            else:
                np.multiply(dy, mask, out=t)
                dx[:, :, rows, cols] += t
        return dx


class AvgPool2D(_Pool2D):
    """Mean over each window. x : (N, C, H, W) -> y : (N, C, Ho, Wo), Ho = (H - ph) // sh + 1."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        Ho, Wo, slices = self._start(x)
        y = self.workspace_like("y", x, shape=(len(x), x.shape[1], Ho, Wo))
        np.copyto(y, x[:, :, slices[0][0], slices[0][1]])
        for rows, cols in slices[1:]:
            y += x[:, :, rows, cols]
        y *= 1.0 / len(slices)
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        """dy : (N, C, Ho, Wo) -> dx : (N, C, H, W): each input gets dy / (ph * pw) of every window
        it is in."""
        N, C, H, W = self._x_shape
        _, Ho, Wo = self.output_shape((C, H, W))
        slices = offset_slices(Ho, Wo, self.pool, self.stride)
        g = self.workspace_like("g", dy, shape=(N, C, Ho, Wo))
        np.multiply(dy.reshape(N, C, Ho, Wo), 1.0 / len(slices), out=g)
        dx = self.workspace_like("dx", g, shape=self._x_shape)
        dx.fill(0)
        for rows, cols in slices:
            dx[:, :, rows, cols] += g
        return dx


class _Pool1D(Layer):
    """Shared set-up of the 1-D pooling layers: a ``pool`` window moved by ``stride`` (default: the pool)
    along the length, no padding; positions past the last window are ignored. Both are ints.

    A thin wrapper: x (batch, C, L) is seen as (batch, C, 1, L) (a view) and goes through the 2-D layer
    with a (1, pool) window and stride (1, stride); the output keeps the input's memory order.
    """

    _POOL2D: type[_Pool2D]

    def __init__(self, pool: int, stride: int | None = None) -> None:
        super().__init__()
        self.pool = sized_int(pool, "pool", 1)
        self.stride = self.pool if stride is None else sized_int(stride, "stride", 1)
        self.pool2d = self._POOL2D((1, self.pool), (1, self.stride))

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (in_shape[0], length_output(self, in_shape, self.pool, self.stride))

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (N, C, L) -> y : (N, C, Lo), Lo = (L - pool) // stride + 1."""
        if x.ndim != 3:
            raise ValueError(f"{self.describe()} takes a batch of shape (batch, C, L), got {x.shape}")
        return self.pool2d.forward(x[:, :, None, :], train)[:, :, 0, :]

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        """dy : (N, C, Lo) -> dx : (N, C, L)."""
        return self.pool2d.backward(dy[:, :, None, :])[:, :, 0, :]

    def workspace_nbytes(self) -> int:
        return super().workspace_nbytes() + self.pool2d.workspace_nbytes()

    def describe(self) -> str:
        return f"{type(self).__name__}({self.pool}, stride={self.stride})"


class MaxPool1D(_Pool1D):
    """Maximum over each window of a sequence: (N, C, L) -> (N, C, Lo); the gradient goes to the first
    maximum of a window (as :class:`MaxPool2D`)."""

    _POOL2D = MaxPool2D


class AvgPool1D(_Pool1D):
    """Mean over each window of a sequence: (N, C, L) -> (N, C, Lo)."""

    _POOL2D = AvgPool2D


class GlobalAvgPool(Layer):
    """The mean over every spatial position: (batch, C, *spatial) -> (batch, C), e.g. (N, C, H, W) ->
    (N, C) or (N, C, L) -> (N, C), as a ResNet ends. Backward spreads dy / positions over them."""

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) < 2:
            raise ValueError(f"GlobalAvgPool takes samples of shape (C, *spatial), got {tuple(in_shape)}")
        return (in_shape[0],)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (N, C, *spatial) -> y : (N, C)."""
        self._x_shape = x.shape
        y = self.workspace("y", x.shape[:2], x.dtype)
        return np.mean(x, axis=tuple(range(2, x.ndim)), out=y)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        """dy : (N, C) -> dx : (N, C, *spatial), each position dy / positions."""
        positions = int(np.prod(self._x_shape[2:]))
        dx = self.workspace("dx", self._x_shape, dy.dtype)
        np.multiply(dy.reshape(dy.shape + (1,) * (len(self._x_shape) - 2)), 1.0 / positions, out=dx)
        return dx
