"""Layers with hand-written forward and backward passes.

Every layer follows one contract (the local chain rule):

* ``forward(x, train)`` computes the output and caches exactly what ``backward`` needs
  (one cache per call, overwritten by the next call);
* ``backward(dy)`` takes the gradient of the loss with respect to the output, writes the
  gradients of the layer's parameters into ``self.grads`` (in place: they are views into the
  model's flat gradient buffer) and returns the gradient with respect to the input.

Shapes: ``x`` is ``(batch, *in_shape)`` and ``y`` is ``(batch, *out_shape)``, where the shapes of
one sample come from ``output_shape`` (``(features,)`` for dense layers, ``(channels, height,
width)`` for images, NCHW). A batch may be empty (a rank with no sample in a step); every layer
handles ``batch == 0``.

Besides parameters, a layer may keep buffers: state that is not trained by the optimizer but is
checkpointed (BatchNorm's running statistics). A layer whose forward or backward needs sums over
the GLOBAL batch (synchronized BatchNorm) calls ``self.allreduce_sum(array)``, which the trainer
binds to the communicator (the identity in a single process); it must call it the same number of
times on every rank, also for an empty batch.

No allocation in the steady state: outputs and input gradients are written into workspaces
(:class:`Workspaces`): one flat buffer per name and dtype, grown to the biggest batch seen and then
reused for every batch shape. So an array returned by ``forward`` or ``backward`` is valid until the
next call of the same method, whatever shape that call has (copy it to keep it); and what a forward
caches for its backward is overwritten by the next forward, so a training forward and its backward
must not be interleaved with another forward of the same layer (an evaluation, say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .special import normal_cdf


@dataclass(frozen=True)
class BatchInfo:
    """Which training samples a forward pass sees, for layers whose randomness must not depend on
    the world size (Dropout draws its mask from (seed, step, sample index)).

    step : the global optimizer step (0-based); sample_index : (batch,) int64, each sample's row
    number in the training set, the same whichever rank holds it.
    """

    step: int
    sample_index: np.ndarray


class Workspaces:
    """Scratch arrays kept between calls, for layers and losses: no allocation in the steady state.

    Each (name, dtype) has one flat buffer, grown (never shrunk) to the biggest size asked for: the
    memory held is that of the biggest batch seen, not one set of arrays per batch shape.
    """

    _workspaces: dict[tuple[str, str], np.ndarray]

    def workspace(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A C-contiguous scratch array of this shape and dtype for ``name``: the front of that name's
        buffer. Valid until the next request for the same name and dtype, whatever its shape."""
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        pool = self.__dict__.get("_workspaces")
        if pool is None:  # a subclass whose __init__ does not call ours
            pool = self._workspaces = {}
        key = (name, dtype.char)
        flat = pool.get(key)
        if flat is None or flat.size < size:
            pool.pop(key, None)  # let the smaller buffer go before allocating the bigger one
            flat = pool[key] = np.empty(size, dtype=dtype)
        return flat[:size].reshape(shape)

    def workspace_like(self, name: str, like: np.ndarray, dtype=None, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A scratch array of ``shape`` (default: ``like``'s) and ``dtype`` (default: ``like``'s) whose
        memory order follows ``like``'s: a channels-last input gives a channels-last output, so an
        elementwise pass over both streams through memory instead of transposing. Otherwise as
        :meth:`workspace` (a view of that name's buffer)."""
        shape = like.shape if shape is None else shape
        dtype = like.dtype if dtype is None else dtype
        if like.flags.c_contiguous:  # the common case, kept cheap: small steps call this many times
            return self.workspace(name, shape, dtype)
        strides = like.strides
        order = sorted(range(like.ndim), key=lambda axis: -strides[axis])  # outermost first
        inverse = [0] * like.ndim
        for position, axis in enumerate(order):
            inverse[axis] = position
        return self.workspace(name, tuple(shape[axis] for axis in order), dtype).transpose(inverse)

    def workspace_nbytes(self) -> int:
        """The bytes held by this object's workspaces."""
        return sum(flat.nbytes for flat in self.__dict__.get("_workspaces", {}).values())


INITS = ("he", "xavier")


def check_init(init: str) -> str:
    """``init`` if it names a weight initialisation of :func:`init_weight`, else ValueError."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: expected 'he' or 'xavier'")
    return init


def init_weight(w: np.ndarray, fan_in: int, fan_out: int, init: str, rng: np.random.Generator) -> None:
    """Fill ``w`` in place with normal values: std sqrt(2 / fan_in) for ``"he"`` (He et al., 2015,
    for ReLU-like activations), sqrt(2 / (fan_in + fan_out)) for ``"xavier"`` (Glorot & Bengio, 2010)."""
    std = math.sqrt(2.0 / fan_in) if init == "he" else math.sqrt(2.0 / (fan_in + fan_out))
    w[...] = rng.standard_normal(w.shape) * std


def positive_int(value, what: str) -> int:
    """``value`` as an int if it is an integer >= 1 (not a bool, not a float); else ValueError
    ``"{what} must be an integer >= 1, got ..."``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


class Layer(Workspaces):
    """Base class. A layer without parameters only overrides ``forward`` and ``backward``.

    Arrays are defined by their shape, not their memory layout: after a Conv2D, a (batch, C, H, W)
    array is channels-last in memory, and the layers here allocate their outputs in their input's
    memory order (:meth:`workspace_like`) so that it stays so.
    """

    #: the forward pass depends on the whole global batch (synchronized BatchNorm): gradient
    #: accumulation would change it, and a global batch of one value cannot be normalised
    syncs_batch_statistics = False
    #: activations: the initialisation of the layers with weights before them ("he" after ReLU-like
    #: activations, "xavier" otherwise); None for the other layers
    preferred_init: str | None = None

    #: name -> array; filled by :class:`dptrain.nn.model.Sequential` with views into its flat buffers
    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    #: set by Sequential.begin_batch before a training forward: which samples and step (or None)
    batch_info: BatchInfo | None = None

    def __init__(self) -> None:
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self._workspaces = {}

    @staticmethod
    def allreduce_sum(array: np.ndarray) -> None:
        """Sum ``array`` in place over the ranks (collective); bound by the trainer, identity alone."""

    # -- what a model calls to wire a layer in (a block passes each call on to its sublayers) --------

    def bind_param(self, key: str, param: np.ndarray, grad: np.ndarray) -> None:
        """Give the layer its parameter ``key`` and that parameter's gradient: views of the model's
        flat buffers, written in place."""
        self.params[key], self.grads[key] = param, grad

    def bind_buffer(self, key: str, buffer: np.ndarray) -> None:
        """Give the layer its buffer ``key`` (non-trained state): a view of the model's state buffer."""
        self.buffers[key] = buffer

    def bind_allreduce(self, allreduce_sum) -> None:
        """Give the layer the communicator's in-place sum over the ranks (see :meth:`allreduce_sum`)."""
        self.allreduce_sum = allreduce_sum

    def begin_batch(self, info: BatchInfo | None) -> None:
        """Which training samples the next forward sees (:class:`BatchInfo`), or None."""
        self.batch_info = info

    def decays(self, key: str, shape: tuple[int, ...]) -> bool:
        """Whether weight decay applies to parameter ``key`` of ``shape`` when only the matrices decay
        (``optim.decay = "matrices"``): weight matrices and kernels (2 or more axes), not biases; a
        layer whose tables are not such weights (norms, embeddings) says no for them."""
        return len(shape) >= 2

    def summary_rows(self, in_shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...], int]]:
        """Rows (relative path, description, output shape of one sample, parameters) below this layer's
        own row in ``dptrain model summary``: none, but for a block."""
        return []

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters this layer needs for samples of shape ``in_shape``."""
        return {}

    def buffer_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of the non-trained state (checkpointed, not optimized) for samples of ``in_shape``."""
        return {}

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one output sample for one input sample of ``in_shape``; ValueError if the
        layer cannot take that shape."""
        return in_shape

    def init_buffers(self) -> None:
        """Fill ``self.buffers`` in place with their starting values."""

    def init_params(self, rng: np.random.Generator) -> None:
        """Fill ``self.params`` in place from ``rng``."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """``input_grad=False``: the caller needs no dx (the first layer of a model); may return None."""
        raise NotImplementedError

    def matmuls(self, in_shape: tuple[int, ...], batch: int, input_grad: bool = True) -> list[tuple[int, int, int]]:
        """The matrix products (m, k, n), i.e. (m, k) @ (k, n), of one training forward and backward
        of ``batch`` samples of ``in_shape`` (without the dx product when ``input_grad`` is False):
        the bare kernel that ``dptrain bench`` times against the layer. None by default."""
        return []

    def describe(self) -> str:
        return type(self).__name__


class Dense(Layer):
    """Fully connected layer ``y = x @ weight + bias``, on the last axis (as torch.nn.Linear).

    Flat samples: x : (batch, in_features) -> y : (batch, out_features). Sequences: x : (batch, T,
    in_features) -> y : (batch, T, out_features), each position alike, computed as ONE product of the
    batch * T rows (a view of x when it is C-contiguous, else a copy into a workspace).
    weight : (in_features, out_features); bias : (out_features,).
    ``init`` is ``"he"`` (normal, std sqrt(2 / fan_in), for ReLU) or ``"xavier"``
    (normal, std sqrt(2 / (fan_in + fan_out)), for tanh, sigmoid and the output layer).
    ``bias=False`` leaves the bias out (before a BatchNorm, which would cancel it).
    """

    def __init__(self, out_features: int, init: str = "he", bias: bool = True) -> None:
        super().__init__()
        self.out_features = positive_int(out_features, "Dense: out_features")
        self.init = check_init(init)
        self.bias = bool(bias)
        self._x: np.ndarray | None = None

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        self.output_shape(in_shape)  # checks that samples are flat or sequences
        shapes = {"weight": (in_shape[-1], self.out_features)}
        return {**shapes, "bias": (self.out_features,)} if self.bias else shapes

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) not in (1, 2):
            raise ValueError(f"Dense takes flat samples (features,) or sequences (time, features), got shape "
                             f"{in_shape}: add a Flatten layer before it")
        return (*in_shape[:-1], self.out_features)

    def init_params(self, rng: np.random.Generator) -> None:
        w = self.params["weight"]
        init_weight(w, *w.shape, self.init, rng)  # fan_in, fan_out
        if self.bias:
            self.params["bias"][...] = 0.0

    def _rows(self, a: np.ndarray, name: str) -> np.ndarray:
        """A batch of sequences (batch, T, D) as (batch * T, D) rows: a view when ``a`` is C-contiguous,
        else a copy into the workspace ``name``."""
        shape = (a.shape[0] * a.shape[1], a.shape[2])
        if a.flags.c_contiguous:
            return a.reshape(shape)
        rows = self.workspace(name, shape, a.dtype)
        np.copyto(rows.reshape(a.shape), a)
        return rows

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (batch, D) or (batch, T, D) -> y : (batch, out) or (batch, T, out)."""
        rows = x if x.ndim == 2 else self._rows(x, "x_rows")  # sequences: the batch * T positions as rows
        self._x = rows
        y = self.workspace("y", (len(rows), self.out_features), x.dtype)
        np.matmul(rows, self.params["weight"], out=y)
        if self.bias:
            y += self.params["bias"]
        return y if x.ndim == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dy : (batch, out) or (batch, T, out) -> dx of the input's shape; writes dW = x.T @ dy and
        db = the sum of dy's rows (over the batch and the positions)."""
        x = self._x  # (rows, D)
        rows = dy if dy.ndim == 2 else self._rows(dy, "dy_rows")
        np.matmul(x.T, rows, out=self.grads["weight"])
        if self.bias:
            np.sum(rows, axis=0, out=self.grads["bias"])
        if not input_grad:
            return None  # the first layer: dx would cost a third of this layer's backward for nothing
        dx = np.matmul(rows, self.params["weight"].T, out=self.workspace("dx", x.shape, dy.dtype))
        return dx if dy.ndim == 2 else dx.reshape(*dy.shape[:-1], x.shape[1])

    def matmuls(self, in_shape: tuple[int, ...], batch: int, input_grad: bool = True) -> list[tuple[int, int, int]]:
        """y = x @ W; dW = x.T @ dy; dx = dy @ W.T, with x as (m, D) rows: m = batch, or batch * T for
        sequences (T, D)."""
        m, d, o = batch * math.prod(in_shape[:-1]), in_shape[-1], self.out_features
        return [(m, d, o), (d, m, o)] + ([(m, o, d)] if input_grad else [])

    def describe(self) -> str:
        return f"Dense({self.out_features}, init={self.init}{'' if self.bias else ', bias=False'})"


class ReLU(Layer):
    """Elementwise max(x, 0)."""

    preferred_init = "he"

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._y = np.maximum(x, 0, out=self.workspace_like("y", x))
        return self._y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        mask = np.greater(self._y, 0, out=self.workspace_like("mask", dy, np.bool_))
        return np.multiply(dy, mask, out=self.workspace_like("dx", dy))


class Tanh(Layer):
    """Elementwise tanh; backward uses the cached output: dx = dy * (1 - y**2)."""

    preferred_init = "xavier"

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._y = np.tanh(x, out=self.workspace_like("y", x))
        return self._y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        dx = np.multiply(self._y, self._y, out=self.workspace_like("dx", dy))
        np.subtract(1, dx, out=dx)
        dx *= dy
        return dx


class Sigmoid(Layer):
    """Elementwise logistic function; dx = dy * y * (1 - y)."""

    preferred_init = "xavier"

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        # sigmoid(x) = (1 + tanh(x / 2)) / 2: no exp, so nothing overflows at any x.
        y = np.multiply(x, 0.5, out=self.workspace_like("y", x))
        np.tanh(y, out=y)
        y += 1
        y *= 0.5
        self._y = y
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        dx = np.subtract(1, self._y, out=self.workspace_like("dx", dy))
        dx *= self._y
        dx *= dy
        return dx


class LeakyReLU(Layer):
    """Elementwise x if x > 0 else negative_slope * x; dx = dy where x > 0, negative_slope * dy elsewhere."""

    preferred_init = "he"

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        if not math.isfinite(negative_slope):
            raise ValueError(f"LeakyReLU needs a finite negative_slope, got {negative_slope}")
        self.negative_slope = float(negative_slope)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        # the local slope, exactly 1 or negative_slope, cached for backward: y = x * slope and
        # dx = dy * slope (ufuncs ~10x faster than copyto(..., where=x > 0) on unpredictable signs)
        positive = np.greater(x, 0, out=self.workspace_like("positive", x, np.bool_))
        other = np.logical_not(positive, out=self.workspace_like("other", x, np.bool_))
        slope = np.multiply(other, self.negative_slope, out=self.workspace_like("slope", x), dtype=x.dtype)
        np.add(slope, positive, out=slope, dtype=x.dtype)
        self._slope = slope
        return np.multiply(x, slope, out=self.workspace_like("y", x))

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        return np.multiply(dy, self._slope, out=self.workspace_like("dx", dy))

    def describe(self) -> str:
        return f"LeakyReLU({self.negative_slope:g})"


class GELU(Layer):
    """Elementwise x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))), the exact (erf) form, as torch's
    default ``F.gelu`` (not its tanh approximation).

    Phi and phi are the standard normal CDF and density; dx = dy * (Phi(x) + x * phi(x)).
    Forward caches x, Phi(x) and exp(-x^2 / 2) (computed on the way to Phi in float32): Phi by SciPy's
    erf in float64, by a fast formula within 3e-7 of it in float32 (:mod:`dptrain.nn.special`).
    """

    preferred_init = "he"

    _INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        y = self.workspace_like("y", x)  # scratch for the CDF, then the output
        gauss = self.workspace_like("gauss", x)  # exp(-x^2 / 2), for backward
        cdf = normal_cdf(x, self.workspace_like("cdf", x), gauss, y)
        self._x, self._cdf, self._gauss = x, cdf, gauss
        return np.multiply(x, cdf, out=y)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        dx = np.multiply(self._x, self._gauss, out=self.workspace_like("dx", dy))
        dx *= self._INV_SQRT_2PI  # x * phi(x)
        dx += self._cdf
        dx *= dy
        return dx


ACTIVATIONS: dict[str, type[Layer]] = {
    "relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "leaky_relu": LeakyReLU, "gelu": GELU,
}
