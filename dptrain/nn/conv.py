"""Layers for images in NCHW layout: 2-D convolution and Flatten (pooling: :mod:`.pooling`); and the
1-D convolution of sequences (batch, C, L), a 2-D one on (batch, C, 1, L).

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
from .windows import length_output, show_pair, sized_int, sized_pair, window_output

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
        self.kernel = sized_pair(kernel, "kernel", 1)
        self.stride = sized_pair(stride, "stride", 1)
        self.padding = sized_pair(padding, "padding", 0)
        self.init = check_init(init)
        self.bias = bool(bias)
        self._x: np.ndarray | None = None  # the input of the last forward (read again by backward)

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        self.output_shape(in_shape)
        shapes = {"weight": (self.filters, in_shape[0], *self.kernel)}
        return {**shapes, "bias": (self.filters,)} if self.bias else shapes

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.filters, *window_output(self, in_shape, self.kernel, self.stride, self.padding))

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
        return (f"Conv2D({self.filters}, kernel={show_pair(self.kernel)}, stride={show_pair(self.stride)}, "
                f"padding={show_pair(self.padding)}{init}{bias})")


class Conv1D(Layer):
    """1-D convolution (cross-correlation) of sequences, zero padding along the length.

    weight : (filters, C, kernel), torch's Conv1d layout; bias : (filters,), left out with ``bias=False``.
    x : (batch, C, L) -> y : (batch, filters, Lo), Lo = (L + 2 * padding - kernel) // stride + 1.
    ``kernel``, ``stride`` and ``padding`` are ints; ``init`` as for :class:`Conv2D` (fan_in = C * kernel,
    fan_out = filters * kernel).

    A thin wrapper: x is seen as (batch, C, 1, L) (a view) and goes through a :class:`Conv2D` with a
    (1, kernel) kernel, stride (1, stride) and padding (0, padding), whose weight (filters, C, 1, kernel)
    is a view of this layer's weight (the same memory). So init, forward, backward and ``matmuls`` are
    Conv2D's, and y and dx are channels-last in memory as Conv2D's are (``y.transpose(0, 2, 1)``, of
    shape (batch, Lo, filters), is C-contiguous).
    """

    def __init__(self, filters: int, kernel: int, stride: int = 1, padding: int = 0, init: str = "he",
                 bias: bool = True) -> None:
        super().__init__()
        self.filters = positive_int(filters, "Conv1D: filters")
        self.kernel = sized_int(kernel, "kernel", 1)
        self.stride = sized_int(stride, "stride", 1)
        self.padding = sized_int(padding, "padding", 0)
        self.conv = Conv2D(self.filters, (1, self.kernel), (1, self.stride), (0, self.padding), init, bias)
        self.init, self.bias = self.conv.init, self.conv.bias

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        self.output_shape(in_shape)
        shapes = {"weight": (self.filters, in_shape[0], self.kernel)}
        return {**shapes, "bias": (self.filters,)} if self.bias else shapes

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.filters, length_output(self, in_shape, self.kernel, self.stride, self.padding))

    def bind_param(self, key: str, param: np.ndarray, grad: np.ndarray) -> None:
        super().bind_param(key, param, grad)
        if key == "weight":  # (F, C, k) -> (F, C, 1, k): views, so the Conv2D reads and writes ours
            param, grad = param[:, :, None, :], grad[:, :, None, :]
        self.conv.bind_param(key, param, grad)

    def init_params(self, rng: np.random.Generator) -> None:
        self.conv.init_params(rng)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (N, C, L) -> y : (N, F, Lo), channels-last in memory."""
        if x.ndim != 3:
            raise ValueError(f"{self.describe()} takes a batch of shape (batch, C, L), got {x.shape}")
        return self.conv.forward(x[:, :, None, :], train)[:, :, 0, :]

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dy : (N, F, Lo) -> dx : (N, C, L), channels-last in memory; writes dW (F, C, k) and db (F,)."""
        dx = self.conv.backward(dy[:, :, None, :], input_grad)
        return None if dx is None else dx[:, :, 0, :]

    def matmuls(self, in_shape: tuple[int, ...], batch: int, input_grad: bool = True) -> list[tuple[int, int, int]]:
        """The wrapped Conv2D's products for samples of shape (C, 1, L)."""
        C, L = in_shape
        return self.conv.matmuls((C, 1, L), batch, input_grad)

    def workspace_nbytes(self) -> int:
        return super().workspace_nbytes() + self.conv.workspace_nbytes()

    def describe(self) -> str:
        init = "" if self.init == "he" else f", init={self.init}"
        bias = "" if self.bias else ", bias=False"
        return f"Conv1D({self.filters}, kernel={self.kernel}, stride={self.stride}, padding={self.padding}{init}{bias})"


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
