"""Layers for images in NCHW layout: 2-D convolution, max and average pooling, and Flatten.

Shapes: ``x`` is ``(batch, C, H, W)``; one sample is ``(C, H, W)`` as in ``output_shape``. Sizes
(``kernel``, ``stride``, ``padding``, ``pool``) are an int or a pair ``(along H, along W)``. The
output height is ``(H + 2 * padding - kh) // stride + 1`` (no padding for pooling), the width
likewise; a layer raises ValueError when that would be empty.

The convolution is an im2col, channels-last: the windows of the zero-padded input are copied into
a column matrix (in chunks of samples for a big batch) and each chunk is one matrix multiply; its
backward is two more matrix multiplies and a col2im that adds the column gradients back, one kernel
offset at a time. Its output and dx are channels-last in memory (see :class:`Conv2D`). Pooling loops over
the few offsets of its window, each step vectorized over the batch. As in ``layers.py``, every
array a forward or backward returns lives in a workspace reused by the next call of the same
method (whatever its shape), and an empty batch is fine.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .layers import Layer, Workspaces, check_init, init_weight, positive_int


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


#: the most bytes a column matrix holds: a bigger batch is processed in chunks of samples
COLUMN_BYTES = 64 * 2**20

#: scratch that no layer keeps between calls (the padded input, the column matrix), shared by every
#: Conv2D of the process: its memory is that of the biggest convolution, not the sum of all of them
_SCRATCH = Workspaces()


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as in every framework) with zero padding.

    weight : (filters, C, kh, kw); bias : (filters,), left out with ``bias=False`` (before a
    BatchNorm, which subtracts any bias again: its gradient would be zero and its value noise).
    x : (batch, C, H, W) -> y : (batch, filters, Ho, Wo), Ho = (H + 2 * ph - kh) // sh + 1.
    ``init`` is ``"he"`` (normal, std sqrt(2 / fan_in)) or ``"xavier"`` (std sqrt(2 / (fan_in +
    fan_out))), with fan_in = C * kh * kw and fan_out = filters * kh * kw; the bias starts at zero.

    Computed channels-last, where the matrix products are fastest (measured with OpenBLAS: 1.3-1.8x
    the GFLOP/s of the channels-first shapes): the input is copied into a zero-padded (batch, Hp, Wp,
    C) array, its columns are (batch * Ho * Wo, kh * kw * C), and with Wk the weight as (F, kh*kw*C)::

        z = cols @ Wk.T   (M, F)          dWk = dz.T @ cols   (F, K)

    The input gradient of a stride-1 convolution is itself a convolution, of dz padded by
    (kh - 1 - ph, kw - 1 - pw) with the flipped, transposed kernel: one more product of the same
    shape, no col2im. Other strides scatter the column gradients back (col2im).

    The output is z seen as (batch, F, Ho, Wo): its memory is channels-last (``y.transpose(0, 2, 3,
    1)`` is C-contiguous), which the elementwise layers after it keep; dx is returned the same way.
    Memory: the padded input and the columns are scratch shared by every Conv2D (the columns are
    made again in backward), and a column matrix holds at most COLUMN_BYTES: beyond, the batch goes
    in chunks of samples.
    """

    def __init__(self, filters: int, kernel, stride=1, padding=0, init: str = "he", bias: bool = True) -> None:
        super().__init__()
        self.filters = positive_int(filters, "Conv2D: filters")
        self.kernel = _pair(kernel, "kernel", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.init = check_init(init)
        self.bias = bool(bias)
        self._x: np.ndarray | None = None  # the input of the last forward (read again by backward)

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

    @staticmethod
    def _padded(x_nhwc: np.ndarray, ph: int, pw: int) -> np.ndarray:
        """``x_nhwc`` (N, H, W, C) copied into the middle of a zeroed (N, H + 2ph, W + 2pw, C) scratch."""
        N, H, W, C = x_nhwc.shape
        xp = _SCRATCH.workspace("xp", (N, H + 2 * ph, W + 2 * pw, C), x_nhwc.dtype)
        if ph or pw:  # only the border needs zeroing, the interior is overwritten
            xp[:, :ph] = 0
            xp[:, ph + H:] = 0
            xp[:, :, :pw] = 0
            xp[:, :, pw + W:] = 0
        np.copyto(xp[:, ph:ph + H, pw:pw + W], x_nhwc)
        return xp

    @staticmethod
    def _columns(xp: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], Ho: int, Wo: int) -> np.ndarray:
        """The columns of padded channels-last samples ``xp`` (n, Hp, Wp, C): (n*Ho*Wo, kh*kw*C), scratch."""
        (kh, kw), (sh, sw) = kernel, stride
        n, C = xp.shape[0], xp.shape[3]
        cols = _SCRATCH.workspace("cols", (n, Ho, Wo, kh, kw, C), xp.dtype)
        win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # (n, Ho, Wo, C, kh, kw), a view
        np.copyto(cols, win.transpose(0, 1, 2, 4, 5, 3))
        return cols.reshape(n * Ho * Wo, kh * kw * C)

    @staticmethod
    def _chunk(rows_per_sample: int, K: int, itemsize: int) -> int:
        """Samples per chunk: as many as keep a column matrix within COLUMN_BYTES (at least one)."""
        return max(1, COLUMN_BYTES // max(1, rows_per_sample * K * itemsize))

    def _weight_matrix(self, name: str, axes: tuple[int, ...], flip: bool = False) -> np.ndarray:
        """The weight (F, C, kh, kw) transposed to ``axes`` (flipped in space with ``flip``) and
        flattened to (first axis, the rest)."""
        w = self.params["weight"]
        if flip:
            w = w[:, :, ::-1, ::-1]
        t = w.transpose(axes)
        m = self.workspace(name, t.shape, w.dtype)
        np.copyto(m, t)
        return m.reshape(t.shape[0], -1)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (N, C, H, W) -> y : (N, F, Ho, Wo), channels-last in memory."""
        if x.ndim != 4:
            raise ValueError(f"{self.describe()} takes a batch of shape (batch, C, H, W), got {x.shape}")
        N, C, H, W = x.shape
        F, (kh, kw), (ph, pw) = self.filters, self.kernel, self.padding
        _, Ho, Wo = self.output_shape((C, H, W))
        xp = self._padded(x.transpose(0, 2, 3, 1), ph, pw)
        wk = self._weight_matrix("wk", (0, 2, 3, 1))  # (F, kh*kw*C)
        z = self.workspace("z", (N, Ho, Wo, F), x.dtype)
        chunk = self._chunk(Ho * Wo, C * kh * kw, x.dtype.itemsize)
        for n0 in range(0, N, chunk):
            cols = self._columns(xp[n0:n0 + chunk], self.kernel, self.stride, Ho, Wo)
            np.matmul(cols, wk.T, out=z[n0:n0 + chunk].reshape(-1, F))
        if self.bias:
            z += self.params["bias"]
        self._x = x
        return z.transpose(0, 3, 1, 2)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dy : (N, F, Ho, Wo) -> dx : (N, C, H, W), channels-last in memory; writes dW (F, C, kh, kw)
        and db (F,)."""
        x = self._x
        N, C, H, W = x.shape
        F, (kh, kw), (ph, pw) = self.filters, self.kernel, self.padding
        Ho, Wo = dy.shape[2:]
        dz = dy.transpose(0, 2, 3, 1)  # (N, Ho, Wo, F): a view when dy is channels-last, as ours are
        if not dz.flags.c_contiguous:
            copy = self.workspace("dz", dz.shape, dy.dtype)
            np.copyto(copy, dz)
            dz = copy
        self._weight_gradient(x, dz)
        if self.bias:
            np.sum(dz.reshape(-1, F), axis=0, out=self.grads["bias"])
        if not input_grad:
            return None
        dx = self.workspace("dx", (N, H, W, C), dy.dtype)
        if self.stride == (1, 1) and ph <= kh - 1 and pw <= kw - 1:
            self._input_gradient_as_convolution(dz, dx)
        else:
            self._input_gradient_by_col2im(dz, dx)
        return dx.transpose(0, 3, 1, 2)

    def _weight_gradient(self, x: np.ndarray, dz: np.ndarray) -> None:
        """dW from the input's columns (made again, chunk by chunk) and dz (N, Ho, Wo, F)."""
        N, C, H, W = x.shape
        F, (kh, kw), (ph, pw) = self.filters, self.kernel, self.padding
        Ho, Wo = dz.shape[1:3]
        K = C * kh * kw
        dwk = self.workspace("dwk", (F, kh, kw, C), dz.dtype)
        dwk.fill(0)
        part = self.workspace("dwk_part", (F, K), dz.dtype)
        xp = self._padded(x.transpose(0, 2, 3, 1), ph, pw)
        dz2 = dz.reshape(N * Ho * Wo, F)
        chunk = self._chunk(Ho * Wo, K, dz.dtype.itemsize)
        for n0 in range(0, N, chunk):
            n1 = min(N, n0 + chunk)
            cols = self._columns(xp[n0:n1], self.kernel, self.stride, Ho, Wo)
            np.matmul(dz2[n0 * Ho * Wo:n1 * Ho * Wo].T, cols, out=part)
            dwk.reshape(F, K)[...] += part
        np.copyto(self.grads["weight"], dwk.transpose(0, 3, 1, 2))

    def _input_gradient_as_convolution(self, dz: np.ndarray, dx: np.ndarray) -> None:
        """Stride 1: dx (N, H, W, C) = the convolution of dz padded by (kh-1-ph, kw-1-pw) with the
        kernel flipped in space and its channels swapped."""
        N, H, W, C = dx.shape
        F, (kh, kw), (ph, pw) = self.filters, self.kernel, self.padding
        wf = self._weight_matrix("wflip", (1, 2, 3, 0), flip=True)  # (C, kh*kw*F)
        dzp = self._padded(dz, kh - 1 - ph, kw - 1 - pw)
        chunk = self._chunk(H * W, kh * kw * F, dz.dtype.itemsize)
        for n0 in range(0, N, chunk):
            cols = self._columns(dzp[n0:n0 + chunk], self.kernel, (1, 1), H, W)
            np.matmul(cols, wf.T, out=dx[n0:n0 + chunk].reshape(-1, C))

    def _input_gradient_by_col2im(self, dz: np.ndarray, dx: np.ndarray) -> None:
        """Any stride: the column gradients dz @ Wk added back where each kernel offset read."""
        N, H, W, C = dx.shape
        F, (kh, kw), (sh, sw), (ph, pw) = self.filters, self.kernel, self.stride, self.padding
        Ho, Wo = dz.shape[1:3]
        K = C * kh * kw
        wk = self._weight_matrix("wk", (0, 2, 3, 1))
        dxp = _SCRATCH.workspace("xp", (N, H + 2 * ph, W + 2 * pw, C), dz.dtype)
        dxp.fill(0)
        dz2 = dz.reshape(N * Ho * Wo, F)
        chunk = self._chunk(Ho * Wo, K, dz.dtype.itemsize)
        for n0 in range(0, N, chunk):
            n1 = min(N, n0 + chunk)
            dcols = _SCRATCH.workspace("cols", (n1 - n0, Ho, Wo, kh, kw, C), dz.dtype)
            np.matmul(dz2[n0 * Ho * Wo:n1 * Ho * Wo], wk, out=dcols.reshape(-1, K))
            target = dxp[n0:n1]
            for a in range(kh):
                for b in range(kw):
                    target[:, a:a + sh * (Ho - 1) + 1:sh, b:b + sw * (Wo - 1) + 1:sw] += dcols[:, :, :, a, b]
        np.copyto(dx, dxp[:, ph:ph + H, pw:pw + W])

    def matmuls(self, in_shape: tuple[int, ...], batch: int, input_grad: bool = True) -> list[tuple[int, int, int]]:
        """z = cols (M, K) @ Wk.T (K, F); dWk = dz.T (F, M) @ cols (M, K); and for dx, at stride 1 the
        columns of dz (batch*H*W, kh*kw*F) @ the flipped kernel (kh*kw*F, C), else dcols = dz (M, F) @
        Wk (F, K); K = C*kh*kw, M = batch*Ho*Wo."""
        C, H, W = in_shape
        F, Ho, Wo = self.output_shape(in_shape)
        (kh, kw), (ph, pw) = self.kernel, self.padding
        K, M = C * kh * kw, batch * Ho * Wo
        products = [(M, K, F), (F, M, K)]
        if input_grad and self.stride == (1, 1) and ph <= kh - 1 and pw <= kw - 1:
            products.append((batch * H * W, kh * kw * F, C))
        elif input_grad:
            products.append((M, F, K))
        return products

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
        slices = _offset_slices(Ho, Wo, self.pool, self.stride)
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
        slices = _offset_slices(Ho, Wo, self.pool, self.stride)
        g = self.workspace_like("g", dy, shape=(N, C, Ho, Wo))
        np.multiply(dy.reshape(N, C, Ho, Wo), 1.0 / len(slices), out=g)
        dx = self.workspace_like("dx", g, shape=self._x_shape)
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
