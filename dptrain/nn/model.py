"""Sequential model over two flat contiguous buffers.

All parameters are views into ``model.param_buffer`` and all gradients are views into
``model.grad_buffer`` (both of shape ``(n_params,)``), in layer order. The gradient exchange is
therefore one call over one array, and the optimizer updates one array in place. Layer buffers
(non-trained state such as BatchNorm's running statistics) are views into ``model.state_buffer``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from .layers import BatchInfo, Layer


@dataclass(frozen=True)
class ParamSpec:
    """Where one parameter lives in the flat buffers."""

    name: str  # e.g. "layers.0.weight"
    layer_index: int
    key: str  # the layer's own name for it, e.g. "weight"
    shape: tuple[int, ...]
    offset: int
    size: int


class Sequential:
    """A stack of layers applied in order.

    Parameters
    ----------
    layers : the layers, applied first to last.
    in_shape : the shape of one input sample: an int D for flat samples, or a tuple such as
        (channels, height, width). Inputs are arrays of shape (batch, *in_shape), or (batch, prod)
        flat rows, which forward reshapes (a view) to (batch, *in_shape).
    dtype : float32 or float64; parameters, gradients, buffers and activations all use it.

    ValueError if a layer cannot take the shape its predecessor gives.
    """

    def __init__(self, layers: list[Layer], in_shape: int | tuple[int, ...], dtype=np.float32) -> None:
        self.layers = list(layers)
        self.in_shape = (int(in_shape),) if np.isscalar(in_shape) else tuple(int(d) for d in in_shape)
        self.in_features = int(np.prod(self.in_shape))  # the width of a flat input row
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")

        specs: list[tuple[str, int, str, tuple[int, ...]]] = []
        buffer_specs: list[tuple[str, int, str, tuple[int, ...]]] = []
        self.shapes = [self.in_shape]  # shapes[i]: one sample's shape entering layer i; [-1]: the output
        for i, layer in enumerate(self.layers):
            shape = self.shapes[-1]
            for key, pshape in layer.param_shapes(shape).items():
                specs.append((f"layers.{i}.{key}", i, key, tuple(int(s) for s in pshape)))
            for key, bshape in layer.buffer_shapes(shape).items():
                buffer_specs.append((f"layers.{i}.{key}", i, key, tuple(int(s) for s in bshape)))
            self.shapes.append(tuple(int(d) for d in layer.output_shape(shape)))
        self.out_shape = self.shapes[-1]
        self.out_features = int(np.prod(self.out_shape))

        self.param_specs = _layout(specs)
        self.n_params = sum(s.size for s in self.param_specs)
        self.param_buffer = np.zeros(self.n_params, dtype=self.dtype)
        self.grad_buffer = np.zeros(self.n_params, dtype=self.dtype)
        self.buffer_specs = _layout(buffer_specs)
        self.state_buffer = np.zeros(sum(s.size for s in self.buffer_specs), dtype=self.dtype)
        self._first_param_layer = self.param_specs[0].layer_index if self.param_specs else len(self.layers)
        #: names of the frozen parameters (:meth:`freeze`): no update, a gradient of 0
        self.frozen: set[str] = set()
        self._frozen_by_layer: dict[int, list[tuple[int, int]]] = {}
        self._can_skip_dx = ["input_grad" in inspect.signature(layer.backward).parameters for layer in self.layers]
        for spec in self.param_specs:
            self.layers[spec.layer_index].bind_param(spec.key, self._view(self.param_buffer, spec),
                                                     self._view(self.grad_buffer, spec))
        for spec in self.buffer_specs:
            self.layers[spec.layer_index].bind_buffer(spec.key, self._view(self.state_buffer, spec))
        for layer in self.layers:
            layer.init_buffers()
        #: (n_layers, 2) seconds of each layer's forward and backward, added up while not None
        #: (``dptrain bench --layers`` sets it); None: nothing timed
        self.layer_seconds: np.ndarray | None = None

    def freeze(self, prefixes) -> list[str]:
        """Freeze the parameters whose name is one of ``prefixes`` or lies under one (``"layers.0"``
        freezes layers.0.weight and layers.0.bias; ``"layers.3.body.0"`` a layer inside a block):
        their gradient is always 0 (backward does not run below the first layer that trains, and
        zeroes the frozen gradients of the layers it runs), so an optimizer with a fresh state never
        moves them; :class:`~dptrain.training.step.TrainingStep` also takes them out of weight decay
        and the gradient exchange. Returns the frozen names; ValueError for a prefix that matches nothing."""
        names = []
        for prefix in prefixes:
            matched = [s.name for s in self.param_specs if s.name == prefix or s.name.startswith(prefix + ".")]
            if not matched:
                raise ValueError(f"{prefix}: no parameter of the model has this name or prefix "
                                 f"(the names: {', '.join(s.name for s in self.param_specs[:6])}, ...)")
            names += [n for n in matched if n not in names]
        self.frozen = set(names)
        self._frozen_by_layer = {}
        for s in self.param_specs:
            if s.name in self.frozen:
                self._frozen_by_layer.setdefault(s.layer_index, []).append((s.offset, s.offset + s.size))
                self.grad_buffer[s.offset : s.offset + s.size] = 0.0
        trained = [s.layer_index for s in self.param_specs if s.name not in self.frozen]
        self._first_param_layer = min(trained) if trained else len(self.layers)
        return [s.name for s in self.param_specs if s.name in self.frozen]

    @property
    def frozen_spans(self) -> list[tuple[int, int]]:
        """The (lo, hi) spans of the flat buffers holding frozen parameters, in order."""
        return sorted(span for spans in self._frozen_by_layer.values() for span in spans)

    def decay_ranges(self) -> list[tuple[int, int]]:
        """The (lo, hi) spans of ``param_buffer`` holding weight matrices and kernels (what
        ``optim.decay = "matrices"`` decays): the parameters whose layer's ``decays`` says so."""
        return [(s.offset, s.offset + s.size) for s in self.param_specs
                if self.layers[s.layer_index].decays(s.key, s.shape)]

    @staticmethod
    def _view(buffer: np.ndarray, spec: ParamSpec) -> np.ndarray:
        return buffer[spec.offset : spec.offset + spec.size].reshape(spec.shape)

    def init_params(self, rng: np.random.Generator) -> None:
        """Initialise every layer's parameters in place, in layer order, from ``rng``."""
        for layer in self.layers:
            layer.init_params(rng)

    def bind_allreduce(self, allreduce_sum: Callable[[np.ndarray], None]) -> None:
        """Give the layers that need global-batch sums (synchronized BatchNorm) the communicator's
        in-place sum; the trainer calls it with ``comm.allreduce_sum``."""
        for layer in self.layers:
            layer.bind_allreduce(allreduce_sum)

    def begin_batch(self, info: BatchInfo | None) -> None:
        """Tell the layers which training samples the next forward pass sees (None: unknown)."""
        for layer in self.layers:
            layer.begin_batch(info)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (batch, *in_shape) or flat (batch, in_features) -> output (batch, *out_shape)."""
        if x.shape[1:] != self.in_shape:
            x = x.reshape((len(x), *self.in_shape))
        seconds = self.layer_seconds
        for i, layer in enumerate(self.layers):
            if seconds is None:
                x = layer.forward(x, train)
            else:
                start = time.perf_counter()
                x = layer.forward(x, train)
                seconds[i, 0] += time.perf_counter() - start
        return x

    def backward(self, dy: np.ndarray, input_grad: bool = True,
                 after_layer: Callable[[int], None] | None = None) -> np.ndarray | None:
        """dy : (batch, out_features), the gradient of the loss SUM; overwrites grad_buffer.

        Returns dx of shape (batch, in_features); ``input_grad=False`` (training) skips the work
        that only dx needs: the layers before the first one with parameters, and that layer's dx.
        ``after_layer(i)`` is called once layer i's gradients are final (to start exchanging them).
        With frozen parameters (:meth:`freeze`), the first layer with parameters is the first with
        one that trains, and the gradients of the frozen ones are set to 0.
        """
        first = 0 if input_grad else self._first_param_layer
        seconds = self.layer_seconds
        for i in range(len(self.layers) - 1, first - 1, -1):
            start = time.perf_counter() if seconds is not None else 0.0
            if i == first and not input_grad and self._can_skip_dx[i]:
                self.layers[i].backward(dy, input_grad=False)
            else:  # a user's layer may implement backward(dy) only
                dy = self.layers[i].backward(dy)
            for lo, hi in self._frozen_by_layer.get(i, ()):
                self.grad_buffer[lo:hi] = 0.0
            if seconds is not None:
                seconds[i, 1] += time.perf_counter() - start
            if after_layer is not None:
                after_layer(i)
        return dy if input_grad else None

    def named_params(self) -> dict[str, np.ndarray]:
        """name -> view of the parameter, e.g. {"layers.0.weight": (in, out) array, ...}."""
        return {s.name: self._view(self.param_buffer, s) for s in self.param_specs}

    def named_grads(self) -> dict[str, np.ndarray]:
        return {s.name: self._view(self.grad_buffer, s) for s in self.param_specs}

    def named_buffers(self) -> dict[str, np.ndarray]:
        """name -> view of a layer buffer, e.g. {"layers.1.running_mean": (C,) array, ...}."""
        return {s.name: self._view(self.state_buffer, s) for s in self.buffer_specs}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything a checkpoint holds of the model: parameters and buffers, by name."""
        return {**self.named_params(), **self.named_buffers()}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {s.name: s.shape for s in (*self.param_specs, *self.buffer_specs)}

    def load_params(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy arrays into the parameters and buffers; names and shapes must match exactly."""
        given = {k: tuple(v.shape) for k, v in arrays.items()}
        problems = describe_mismatch(self.state_shapes(), given)
        if problems:
            raise ValueError("parameters differ from the model (given vs model): " + "; ".join(problems))
        for name, view in self.state_arrays().items():
            view[...] = arrays[name]

    def matmuls(self, batch: int) -> list[list[tuple[int, int, int]]]:
        """Per layer, the matrix products (m, k, n) of one training step on ``batch`` samples
        (:meth:`Layer.matmuls`; the first layer with parameters computes no input gradient)."""
        return [layer.matmuls(self.shapes[i], batch, input_grad=i > self._first_param_layer or
                              not self._can_skip_dx[i])
                for i, layer in enumerate(self.layers)]

    def summary(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """One (path, description, output shape of one sample, parameter count) per layer, and below a
        block one per layer inside it (path "3.body.0": layer 3's body, its first layer)."""
        rows = []
        for i, layer in enumerate(self.layers):
            rows.append((str(i), layer.describe(), self.shapes[i + 1],
                         sum(s.size for s in self.param_specs if s.layer_index == i)))
            rows += [(f"{i}.{path}", desc, shape, count) for path, desc, shape, count in layer.summary_rows(self.shapes[i])]
        return rows


def describe_mismatch(expected: dict[str, tuple], given: dict[str, tuple]) -> list[str]:
    """How two {name: shape} maps differ, one phrase per difference (given vs expected)."""
    problems = []
    missing = [n for n in expected if n not in given]
    extra = [n for n in given if n not in expected]
    if missing:
        problems.append("missing " + ", ".join(missing))
    if extra:
        problems.append("unexpected " + ", ".join(extra))
    problems += [f"{n} shape {given[n]} vs {expected[n]}" for n in expected
                 if n in given and tuple(given[n]) != tuple(expected[n])]
    return problems


def _layout(specs: list[tuple[str, int, str, tuple[int, ...]]]) -> list[ParamSpec]:
    """Consecutive places in one flat buffer for (name, layer index, key, shape) entries, in order."""
    sizes = [int(np.prod(shape)) for *_, shape in specs]
    offsets = [0, *accumulate(sizes)]
    return [ParamSpec(name, i, key, shape, off, size)
            for (name, i, key, shape), off, size in zip(specs, offsets, sizes)]
