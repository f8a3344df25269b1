"""Layers with hand-written forward and backward passes.

Every layer follows one contract (the local chain rule):

* ``forward(x, train)`` computes the output and caches exactly what ``backward`` needs
  (one cache per call, overwritten by the next call);
* ``backward(dy)`` takes the gradient of the loss with respect to the output, writes the
  gradients of the layer's parameters into ``self.grads`` (in place: they are views into the
  model's flat gradient buffer) and returns the gradient with respect to the input.

Shapes: ``x`` is ``(batch, in_features)`` and ``y`` is ``(batch, out_features)``. A batch may be
empty (a rank with no sample in a step); every layer handles ``batch == 0``.
"""

from __future__ import annotations

import math

import numpy as np


class Layer:
    """Base class. A layer without parameters only overrides ``forward`` and ``backward``."""

    #: name -> array; filled by :class:`dptrain.nn.model.Sequential` with views into its flat buffers
    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]

    def __init__(self) -> None:
        self.params = {}
        self.grads = {}

    def param_shapes(self, in_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters this layer needs for an input of ``in_features`` columns."""
        return {}

    def output_features(self, in_features: int) -> int:
        return in_features

    def init_params(self, rng: np.random.Generator) -> None:
        """Fill ``self.params`` in place from ``rng``."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class Dense(Layer):
    """Fully connected layer ``y = x @ weight + bias``.

    weight : (in_features, out_features); bias : (out_features,).
    ``init`` is ``"he"`` (normal, std sqrt(2 / fan_in), for ReLU) or ``"xavier"``
    (normal, std sqrt(2 / (fan_in + fan_out)), for tanh, sigmoid and the output layer).
    """

    def __init__(self, out_features: int, init: str = "he") -> None:
        super().__init__()
        if int(out_features) < 1:
            raise ValueError(f"Dense needs out_features >= 1, got {out_features}")
        if init not in ("he", "xavier"):
            raise ValueError(f"unknown init {init!r}: expected 'he' or 'xavier'")
        self.out_features = int(out_features)
        self.init = init
        self._x: np.ndarray | None = None

    def param_shapes(self, in_features: int) -> dict[str, tuple[int, ...]]:
        return {"weight": (in_features, self.out_features), "bias": (self.out_features,)}

    def output_features(self, in_features: int) -> int:
        return self.out_features

    def init_params(self, rng: np.random.Generator) -> None:
        w = self.params["weight"]
        fan_in, fan_out = w.shape
        std = math.sqrt(2.0 / fan_in) if self.init == "he" else math.sqrt(2.0 / (fan_in + fan_out))
        w[...] = rng.standard_normal(w.shape) * std
        self.params["bias"][...] = 0.0

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._x = x
        y = x @ self.params["weight"]
        y += self.params["bias"]
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        x = self._x
        np.matmul(x.T, dy, out=self.grads["weight"])
        np.sum(dy, axis=0, out=self.grads["bias"])
        return dy @ self.params["weight"].T

    def describe(self) -> str:
        return f"Dense({self.out_features}, init={self.init})"


class ReLU(Layer):
    """Elementwise max(x, 0)."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._mask = x > 0
        return np.maximum(x, 0)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return dy * self._mask


class Tanh(Layer):
    """Elementwise tanh; backward uses the cached output: dx = dy * (1 - y**2)."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._y = np.tanh(x)
        return self._y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        y = self._y
        return dy * (1 - y * y)


class Sigmoid(Layer):
    """Elementwise logistic function; dx = dy * y * (1 - y)."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        # Split by sign so exp never overflows.
        y = np.empty_like(x)
        pos = x >= 0
        y[pos] = 1 / (1 + np.exp(-x[pos]))
        ex = np.exp(x[~pos])
        y[~pos] = ex / (1 + ex)
        self._y = y
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        y = self._y
        return dy * y * (1 - y)


ACTIVATIONS: dict[str, type[Layer]] = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}
