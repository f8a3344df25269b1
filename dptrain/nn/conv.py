"""Layers for images in NCHW layout: 2-D convolution, max and average pooling, and Flatten.

Shapes: ``x`` is ``(batch, C, H, W)``; one sample is ``(C, H, W)`` as in ``output_shape``. Sizes
(``kernel``, ``stride``, ``padding``, ``pool``) are an int or a pair ``(along H, along W)``. The
output height is ``(H + 2 * padding - kh) // stride + 1`` (no padding for pooling), the width
likewise; a layer raises ValueError when that would be empty.

The convolution is an im2col: the windows of the zero-padded input are copied once into a column
matrix and the whole batch is one matrix multiply; its backward is two more matrix multiplies
and a col2im that adds the column gradients back, one kernel offset at a time. Pooling loops over
the few offsets of its window, each step vectorized over the batch. As in ``layers.py``, every
array a forward or backward returns lives in a workspace reused by the next call of the same
method (whatever its shape), and an empty batch is fine.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .layers import Layer, check_init, init_weight, positive_int


def as_pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints -> (along H, along W); ValueError naming ``name`` for anything else."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an integer or a pair of integers, got {value!r}")
    return int(pair[0]), int(pair[1])


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """:func:`as_pair`, and ValueError if any is below ``minimum``."""
    pair = as_pair(value, name)
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _show(pair: tuple[int, int]) -> str:
    """(3, 3) -> "3", (3, 1) -> "(3, 1)", for describe()."""
    return str(pair[0]) if pair[0] == pair[1] else f"({pair[0]}, {pair[1]})"


def _window_out(layer: Layer, in_shape: tuple[int, ...], window: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(Ho, Wo) for samples of ``in_shape`` = (C, H, W); ValueError naming the layer otherwise."""
    if len(in_shape) != 3:
        raise ValueError(f"{layer.describe()} takes images of shape (channels, height, width), "
                         f"got sample shape {tuple(in_shape)}")
    _, H, W = in_shape
    if min(in_shape) < 1:
        raise ValueError(f"{layer.describe()} takes non-empty images, got sample shape {tuple(in_shape)}")
    Hp, Wp = H + 2 * padding[0], W + 2 * padding[1]
    if Hp < window[0] or Wp < window[1]:
        padded = f" (padded to {Hp}x{Wp})" if padding != (0, 0) else ""
        raise ValueError(f"{layer.describe()}: the output would be empty: input {H}x{W}{padded} is smaller "
                         f"than the {window[0]}x{window[1]} window (sample shape {tuple(in_shape)})")
    return (Hp - window[0]) // stride[0] + 1, (Wp - window[1]) // stride[1] + 1


def _offset_slices(Ho: int, Wo: int, window: tuple[int, int], stride: tuple[int, int]):
    """For each offset (a, b) of a window, row-major: the (rows, cols) slices of the (padded)
    input that the (Ho, Wo) windows see at that offset."""
    sh, sw = stride
    return [(slice(i, i + sh * (Ho - 1) + 1, sh), slice(j, j + sw * (Wo - 1) + 1, sw))
            for i in range(window[0]) for j in range(window[1])]


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as in every framework) with zero padding.

    weight : (filters, C, kh, kw); bias : (filters,), left out with ``bias=False`` (before a
    BatchNorm, which subtracts any bias again: its gradient would be zero and its value noise).
    x : (batch, C, H, W) -> y : (batch, filters, Ho, Wo), Ho = (H + 2 * ph - kh) // sh + 1.
    ``init`` is ``"he"`` (normal, std sqrt(2 / fan_in)) or ``"xavier"`` (std sqrt(2 / (fan_in +
    fan_out))), with fan_in = C * kh * kw and fan_out = filters * kh * kw; the bias starts at zero.
    """

    def __init__(self, filters: int, kernel, stride=1, padding=0, init: str = "he", bias: bool = True) -> None:
        super().__init__()
        self.filters = positive_int(filters, "Conv2D: filters")
        self.kernel = _pair(kernel, "kernel", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.init = check_init(init)
        self.bias = bool(bias)
        self._x_shape: tuple[int, ...] | None = None
        self._cols: np.ndarray | None = None

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        self.output_shape(in_shape)
        shapes = {"weight": (self.filters, in_shape[0], *self.kernel)}
        return {**shapes, "bias": (self.filters,)} if self.bias else shapes

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.filters, *_window_out(self, in_shape, self.kernel, self.stride, self.padding))

    def init_params(self, rng: np.random.Generator) -> None:
        w = self.params["weight"]
        F, C, kh, kw = w.shape
        init_weight(w, C * kh * kw, F * kh * kw, self.init, rng)  # fan_in, fan_out
        if self.bias:
            self.params["bias"][...] = 0.0

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (N, C, H, W) -> y : (N, F, Ho, Wo). Caches the columns (C*kh*kw, N*Ho*Wo)."""
        if x.ndim != 4:
            raise ValueError(f"{self.describe()} takes a batch of shape (batch, C, H, W), got {x.shape}")
        N, C, H, W = x.shape
        F, (kh, kw), (sh, sw), (ph, pw) = self.filters, self.kernel, self.stride, self.padding
        _, Ho, Wo = self.output_shape((C, H, W))
        K, M = C * kh * kw, N * Ho * Wo
        if ph or pw:  # zero-padded copy; only the border needs zeroing, the interior is overwritten
            xp = self.workspace("xp", (N, C, H + 2 * ph, W + 2 * pw), x.dtype)
            xp[:, :, :ph] = 0
            xp[:, :, ph + H:] = 0
            xp[:, :, :, :pw] = 0
            xp[:, :, :, pw + W:] = 0
            xp[:, :, ph:ph + H, pw:pw + W] = x
        else:
            xp = x
        # windows (N, C, Ho, Wo, kh, kw), a view; the columns hold them as (C, kh, kw, N, Ho, Wo)
        win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        cols = self.workspace("cols", (C, kh, kw, N, Ho, Wo), x.dtype)
        np.copyto(cols, win.transpose(1, 4, 5, 0, 2, 3))
        z = self.workspace("z", (F, M), x.dtype)
        np.matmul(self.params["weight"].reshape(F, K), cols.reshape(K, M), out=z)
        y = self.workspace("y", (N, F, Ho, Wo), x.dtype)
        if self.bias:
            np.add(z.reshape(F, N, Ho, Wo).transpose(1, 0, 2, 3), self.params["bias"][:, None, None], out=y)
        else:
            np.copyto(y, z.reshape(F, N, Ho, Wo).transpose(1, 0, 2, 3))
        self._x_shape, self._cols = x.shape, cols
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dy : (N, F, Ho, Wo) -> dx : (N, C, H, W); writes dW (F, C, kh, kw) and db (F,)."""
        N, C, H, W = self._x_shape
        F, (kh, kw), (ph, pw) = self.filters, self.kernel, self.padding
        Ho, Wo = self._cols.shape[4:]
        K, M = C * kh * kw, N * Ho * Wo
        dz = self.workspace("dz", (F, N, Ho, Wo), dy.dtype)
        np.copyto(dz, dy.reshape(N, F, Ho, Wo).transpose(1, 0, 2, 3))
        dz = dz.reshape(F, M)
        np.matmul(dz, self._cols.reshape(K, M).T, out=self.grads["weight"].reshape(F, K))
        if self.bias:
            np.sum(dz, axis=1, out=self.grads["bias"])
        if not input_grad:
            return None
        dcols = self.workspace("dcols", (C, kh, kw, N, Ho, Wo), dy.dtype)
        np.matmul(self.params["weight"].reshape(F, K).T, dz, out=dcols.reshape(K, M))
        # col2im: add each kernel offset's gradients back where that offset read, in (C, N, ...)
        # layout so both sides of every += have the same memory order
        dxp = self.workspace("dxp", (C, N, H + 2 * ph, W + 2 * pw), dy.dtype)
        dxp.fill(0)
        for k, (rows, cols) in enumerate(_offset_slices(Ho, Wo, self.kernel, self.stride)):
            dxp[:, :, rows, cols] += dcols[:, k // kw, k % kw]
        dx = self.workspace("dx", (N, C, H, W), dy.dtype)
        np.copyto(dx, dxp[:, :, ph:ph + H, pw:pw + W].transpose(1, 0, 2, 3))
        return dx

    def matmuls(self, in_shape: tuple[int, ...], batch: int, input_grad: bool = True) -> list[tuple[int, int, int]]:
        """z = W (F, K) @ cols (K, M); dW = dz @ cols.T; dcols = W.T @ dz; K = C*kh*kw, M = batch*Ho*Wo."""
        F, Ho, Wo = self.output_shape(in_shape)
        K, M = in_shape[0] * self.kernel[0] * self.kernel[1], batch * Ho * Wo
        return [(F, K, M), (F, M, K)] + ([(K, F, M)] if input_grad else [])

    def describe(self) -> str:
        init = "" if self.init == "he" else f", init={self.init}"
        bias = "" if self.bias else ", bias=False"
        return (f"Conv2D({self.filters}, kernel={_show(self.kernel)}, stride={_show(self.stride)}, "
                f"padding={_show(self.padding)}{init}{bias})")


class _Pool2D(Layer):
    """Shared set-up of the pooling layers: a ``pool`` window moved by ``stride`` (default: the
    pool, so windows tile the image), no padding; rows and columns past the last window are ignored."""

    def __init__(self, pool, stride=None) -> None:
        super().__init__()
        self.pool = _pair(pool, "pool", 1)
        self.stride = self.pool if stride is None else _pair(stride, "stride", 1)
        self._x_shape: tuple[int, ...] | None = None

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        Ho, Wo = _window_out(self, in_shape, self.pool, self.stride)
        return (in_shape[0], Ho, Wo)

    def _start(self, x: np.ndarray) -> tuple[int, int, list]:
        """Check x : (N, C, H, W); return (Ho, Wo) and the input slices of each window offset."""
        if x.ndim != 4:
            raise ValueError(f"{self.describe()} takes a batch of shape (batch, C, H, W), got {x.shape}")
        _, Ho, Wo = self.output_shape(x.shape[1:])
        self._x_shape = x.shape
        return Ho, Wo, _offset_slices(Ho, Wo, self.pool, self.stride)

    def describe(self) -> str:
        return f"{type(self).__name__}({_show(self.pool)}, stride={_show(self.stride)})"


class MaxPool2D(_Pool2D):
    """Maximum over each window. x : (N, C, H, W) -> y : (N, C, Ho, Wo), Ho = (H - ph) // sh + 1.

    Backward routes each output's gradient to the argmax of its window; on ties, to the first
    maximal element in row-major order within the window (only that one). Overlapping windows
    (stride < pool) add up their gradients.
    """

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        Ho, Wo, slices = self._start(x)
        shape = (len(x), x.shape[1], Ho, Wo)
        y = self.workspace("y", shape, x.dtype)
        arg = self.workspace("arg", shape, np.int32)  # the winning offset of each window
        better = self.workspace("better", shape, np.bool_)
        np.copyto(y, x[:, :, slices[0][0], slices[0][1]])
        arg.fill(0)
        for k, (rows, cols) in enumerate(slices[1:], start=1):
            v = x[:, :, rows, cols]
            np.greater(v, y, out=better)  # strict: a tie keeps the earlier offset
            np.copyto(y, v, where=better)
            np.copyto(arg, k, where=better)
        self._arg = arg
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        """dy : (N, C, Ho, Wo) -> dx : (N, C, H, W)."""
        arg = self._arg
        dy = dy.reshape(arg.shape)
        dx = self.workspace("dx", self._x_shape, dy.dtype)
        dx.fill(0)
        mask = self.workspace("mask", arg.shape, np.bool_)
        t = self.workspace("t", arg.shape, dy.dtype)
        for k, (rows, cols) in enumerate(_offset_slices(*arg.shape[2:], self.pool, self.stride)):
            np.equal(arg, k, out=mask)
            np.multiply(dy, mask, out=t)
            dx[:, :, rows, cols] += t
        return dx


class AvgPool2D(_Pool2D):
    """Mean over each window. x : (N, C, H, W) -> y : (N, C, Ho, Wo), Ho = (H - ph) // sh + 1."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        Ho, Wo, slices = self._start(x)
        y = self.workspace("y", (len(x), x.shape[1], Ho, Wo), x.dtype)
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
        slices = _offset_slices(Ho, Wo, self.pool, self.stride)
        g = self.workspace("g", (N, C, Ho, Wo), dy.dtype)
        np.multiply(dy.reshape(N, C, Ho, Wo), 1.0 / len(slices), out=g)
        dx = self.workspace("dx", self._x_shape, dy.dtype)
        dx.fill(0)
        for rows, cols in slices:
            dx[:, :, rows, cols] += g
        return dx


class Flatten(Layer):
    """(batch, *shape) -> (batch, prod(shape)), e.g. (N, C, H, W) -> (N, C*H*W); a reshape
    (a view for a contiguous input), and backward reshapes the gradient back."""

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(np.prod(in_shape, dtype=np.int64)),)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._x_shape = x.shape
        return x.reshape(len(x), int(np.prod(x.shape[1:], dtype=np.int64)))  # not -1: batch 0

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        return dy.reshape(self._x_shape)
