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
allocated once per batch shape and reused, so an array returned by ``forward`` or ``backward`` is
valid until the next call of the same method with the same shape (copy it to keep it).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np
from scipy.special import erf


@dataclass(frozen=True)
class BatchInfo:
    """Which training samples a forward pass sees, for layers whose randomness must not depend on
    the world size (Dropout draws its mask from (seed, step, sample index)).

    step : the global optimizer step (0-based); sample_index : (batch,) int64, each sample's row
    number in the training set, the same whichever rank holds it.
    """

    step: int
    sample_index: np.ndarray


class Layer:
    """Base class. A layer without parameters only overrides ``forward`` and ``backward``."""

    #: name -> array; filled by :class:`dptrain.nn.model.Sequential` with views into its flat buffers
    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    #: set by Sequential.begin_batch before a training forward: which samples and step (or None)
    batch_info: "BatchInfo | None" = None

    def __init__(self) -> None:
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self._workspaces: dict[tuple, np.ndarray] = {}

    @staticmethod
    def allreduce_sum(array: np.ndarray) -> None:
        """Sum ``array`` in place over the ranks (collective); bound by the trainer, identity alone."""

    def workspace(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A scratch array for ``name`` of this shape and dtype, allocated on first use, then reused."""
        key = (name, shape, np.dtype(dtype).char)
        array = self._workspaces.get(key)
        if array is None:
            array = self._workspaces[key] = np.empty(shape, dtype=dtype)
        return array

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

    def describe(self) -> str:
        return type(self).__name__


class Dense(Layer):
    """Fully connected layer ``y = x @ weight + bias``.

    weight : (in_features, out_features); bias : (out_features,).
    ``init`` is ``"he"`` (normal, std sqrt(2 / fan_in), for ReLU) or ``"xavier"``
    (normal, std sqrt(2 / (fan_in + fan_out)), for tanh, sigmoid and the output layer).
    ``bias=False`` leaves the bias out (before a BatchNorm, which would cancel it).
    """

    def __init__(self, out_features: int, init: str = "he", bias: bool = True) -> None:
        super().__init__()
        if int(out_features) < 1:
            raise ValueError(f"Dense needs out_features >= 1, got {out_features}")
        if init not in ("he", "xavier"):
            raise ValueError(f"unknown init {init!r}: expected 'he' or 'xavier'")
        self.out_features = int(out_features)
        self.init = init
        self.bias = bool(bias)
        self._x: np.ndarray | None = None

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        self.output_shape(in_shape)  # checks that samples are flat
        shapes = {"weight": (in_shape[0], self.out_features)}
        return {**shapes, "bias": (self.out_features,)} if self.bias else shapes

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) != 1:
            raise ValueError(f"Dense takes flat samples, got shape {in_shape}: add a Flatten layer before it")
        return (self.out_features,)

    def init_params(self, rng: np.random.Generator) -> None:
        w = self.params["weight"]
        fan_in, fan_out = w.shape
        std = math.sqrt(2.0 / fan_in) if self.init == "he" else math.sqrt(2.0 / (fan_in + fan_out))
        w[...] = rng.standard_normal(w.shape) * std
        if self.bias:
            self.params["bias"][...] = 0.0

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._x = x
        y = self.workspace("y", (len(x), self.out_features), x.dtype)
        np.matmul(x, self.params["weight"], out=y)
        if self.bias:
            y += self.params["bias"]
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        x = self._x
        np.matmul(x.T, dy, out=self.grads["weight"])
        if self.bias:
            np.sum(dy, axis=0, out=self.grads["bias"])
        if not input_grad:
            return None  # the first layer: dx would cost a third of this layer's backward for nothing
        return np.matmul(dy, self.params["weight"].T, out=self.workspace("dx", x.shape, dy.dtype))

    def describe(self) -> str:
        return f"Dense({self.out_features}, init={self.init}{'' if self.bias else ', bias=False'})"


class ReLU(Layer):
    """Elementwise max(x, 0)."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._y = np.maximum(x, 0, out=self.workspace("y", x.shape, x.dtype))
        return self._y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        mask = np.greater(self._y, 0, out=self.workspace("mask", dy.shape, np.bool_))
        return np.multiply(dy, mask, out=self.workspace("dx", dy.shape, dy.dtype))


class Tanh(Layer):
    """Elementwise tanh; backward uses the cached output: dx = dy * (1 - y**2)."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._y = np.tanh(x, out=self.workspace("y", x.shape, x.dtype))
        return self._y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        dx = np.multiply(self._y, self._y, out=self.workspace("dx", dy.shape, dy.dtype))
        np.subtract(1, dx, out=dx)
        dx *= dy
        return dx


class Sigmoid(Layer):
    """Elementwise logistic function; dx = dy * y * (1 - y)."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        # sigmoid(x) = (1 + tanh(x / 2)) / 2: no exp, so nothing overflows at any x.
        y = np.multiply(x, 0.5, out=self.workspace("y", x.shape, x.dtype))
        np.tanh(y, out=y)
        y += 1
        y *= 0.5
        self._y = y
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        dx = np.subtract(1, self._y, out=self.workspace("dx", dy.shape, dy.dtype))
        dx *= self._y
        dx *= dy
        return dx


class LeakyReLU(Layer):
    """Elementwise x if x > 0 else negative_slope * x; dx = dy where x > 0, negative_slope * dy elsewhere."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        if not math.isfinite(negative_slope):
            raise ValueError(f"LeakyReLU needs a finite negative_slope, got {negative_slope}")
        self.negative_slope = float(negative_slope)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        # the local slope, exactly 1 or negative_slope, cached for backward: y = x * slope and
        # dx = dy * slope (ufuncs ~10x faster than copyto(..., where=x > 0) on unpredictable signs)
        positive = np.greater(x, 0, out=self.workspace("positive", x.shape, np.bool_))
        other = np.logical_not(positive, out=self.workspace("other", x.shape, np.bool_))
        slope = np.multiply(other, self.negative_slope, out=self.workspace("slope", x.shape, x.dtype), dtype=x.dtype)
        np.add(slope, positive, out=slope, dtype=x.dtype)
        self._slope = slope
        return np.multiply(x, slope, out=self.workspace("y", x.shape, x.dtype))

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        return np.multiply(dy, self._slope, out=self.workspace("dx", dy.shape, dy.dtype))

    def describe(self) -> str:
        return f"LeakyReLU({self.negative_slope:g})"


class GELU(Layer):
    """Elementwise x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))), the exact (erf) form.

    Phi and phi are the standard normal CDF and density; dx = dy * (Phi(x) + x * phi(x)).
    Forward caches x and Phi(x).
    """

    _SQRT_HALF = math.sqrt(0.5)
    _INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        cdf = np.multiply(x, self._SQRT_HALF, out=self.workspace("cdf", x.shape, x.dtype))
        erf(cdf, out=cdf)
        cdf += 1
        cdf *= 0.5
        self._x, self._cdf = x, cdf
        return np.multiply(x, cdf, out=self.workspace("y", x.shape, x.dtype))

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        x = self._x
        dx = np.multiply(x, x, out=self.workspace("dx", dy.shape, dy.dtype))
        dx *= -0.5
        np.exp(dx, out=dx)
        dx *= self._INV_SQRT_2PI  # phi(x)
        dx *= x
        dx += self._cdf
        dx *= dy
        return dx


ACTIVATIONS: dict[str, type[Layer]] = {
    "relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "leaky_relu": LeakyReLU, "gelu": GELU,
}
