"""Residual blocks: ``y = shortcut(x) + body(x)``, the skip connection of every ResNet.

A block holds two short chains of layers. Its parameters and buffers live in the model's flat buffers
like any layer's, named by their path: ``layers.3.body.0.weight``, ``layers.3.shortcut.0.weight``;
blocks nest (``layers.2.body.1.body.0.weight``). Every call a model makes on a layer (binding views,
initialisation, the allreduce of synchronized BatchNorm, the batch's sample indices for Dropout) is
passed on to the layers inside, in order: body first, then shortcut.
"""

from __future__ import annotations

import inspect

import numpy as np

from .layers import BatchInfo, Layer

BRANCHES = ("body", "shortcut")


class Residual(Layer):
    """``y = x + body(x)``, or ``y = shortcut(x) + body(x)`` where the body changes the shape.

    body : the layers of the main path, applied in order (at least one).
    shortcut : the layers that map x to the body's output shape (e.g. a 1x1 Conv2D with stride 2 and a
        BatchNorm, or a Dense); empty (the identity) when the body keeps the shape.
    x : (batch, *in_shape) -> y : (batch, *out_shape); ValueError when the two paths' shapes differ.
    """

    def __init__(self, body: list[Layer], shortcut: list[Layer] | None = None) -> None:
        super().__init__()
        self.body, self.shortcut = list(body), list(shortcut or [])
        if not self.body:
            raise ValueError("Residual needs at least one layer in its body")
        for layer in (*self.body, *self.shortcut):
            if not isinstance(layer, Layer):
                raise ValueError(f"Residual takes layers, got {layer!r}")
        # which layers take backward(dy, input_grad=...): a layer of one's own may implement backward(dy)
        self._can_skip_dx = [["input_grad" in inspect.signature(layer.backward).parameters for layer in branch]
                             for branch in (self.body, self.shortcut)]

    # -- shapes and the flat buffers -------------------------------------------------------------

    def _branches(self):
        return zip(BRANCHES, (self.body, self.shortcut))

    def _shapes(self, in_shape: tuple[int, ...], layers: list[Layer]) -> list[tuple[int, ...]]:
        """The sample shape entering each layer of ``layers``, and last the one leaving it."""
        shapes = [tuple(in_shape)]
        for layer in layers:
            shapes.append(tuple(int(d) for d in layer.output_shape(shapes[-1])))
        return shapes

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        out = self._shapes(in_shape, self.body)[-1]
        skip = self._shapes(in_shape, self.shortcut)[-1]
        if out != skip:
            how = "the shortcut gives" if self.shortcut else "the input is (no shortcut: give one that maps it)"
            raise ValueError(f"Residual: the body gives samples of shape {out} but {how} {skip}")
        return out

    def _keyed(self, in_shape: tuple[int, ...], shapes_of) -> dict[str, tuple[int, ...]]:
        """``{"body.0.weight": shape, ...}`` from ``shapes_of(layer, in_shape)`` of each inner layer."""
        self.output_shape(in_shape)
        keyed = {}
        for name, layers in self._branches():
            for j, (layer, shape) in enumerate(zip(layers, self._shapes(in_shape, layers))):
                keyed.update({f"{name}.{j}.{key}": s for key, s in shapes_of(layer, shape).items()})
        return keyed

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return self._keyed(in_shape, lambda layer, shape: layer.param_shapes(shape))

    def buffer_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return self._keyed(in_shape, lambda layer, shape: layer.buffer_shapes(shape))

    def _inner(self, key: str) -> tuple[Layer, str]:
        """``"body.0.weight"`` -> (the body's first layer, ``"weight"``)."""
        branch, index, rest = key.split(".", 2)
        return (self.body if branch == "body" else self.shortcut)[int(index)], rest

    def bind_param(self, key: str, param: np.ndarray, grad: np.ndarray) -> None:
        super().bind_param(key, param, grad)
        layer, rest = self._inner(key)
        layer.bind_param(rest, param, grad)

    def decays(self, key: str, shape: tuple[int, ...]) -> bool:
        layer, rest = self._inner(key)
        return layer.decays(rest, shape)

    def bind_buffer(self, key: str, buffer: np.ndarray) -> None:
        super().bind_buffer(key, buffer)
        layer, rest = self._inner(key)
        layer.bind_buffer(rest, buffer)

    def bind_allreduce(self, allreduce_sum) -> None:
        super().bind_allreduce(allreduce_sum)
        for layer in (*self.body, *self.shortcut):
            layer.bind_allreduce(allreduce_sum)

    def begin_batch(self, info: BatchInfo | None) -> None:
        super().begin_batch(info)
        for layer in (*self.body, *self.shortcut):
            layer.begin_batch(info)

    def init_params(self, rng: np.random.Generator) -> None:
        for layer in (*self.body, *self.shortcut):
            layer.init_params(rng)

    def init_buffers(self) -> None:
        for layer in (*self.body, *self.shortcut):
            layer.init_buffers()

    @property
    def syncs_batch_statistics(self) -> bool:  # type: ignore[override]
        return any(layer.syncs_batch_statistics for layer in (*self.body, *self.shortcut))

    # -- the math --------------------------------------------------------------------------------

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x : (batch, *in_shape) -> shortcut(x) + body(x)."""
        h = x
        for layer in self.body:
            h = layer.forward(h, train)
        s = x
        for layer in self.shortcut:
            s = layer.forward(s, train)
        return np.add(h, s, out=self.workspace_like("y", h))

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dy : (batch, *out_shape) -> dx = d body + d shortcut (None with ``input_grad=False``)."""
        d_body = self._chain_backward(self.body, self._can_skip_dx[0], dy, input_grad)
        d_skip = self._chain_backward(self.shortcut, self._can_skip_dx[1], dy, input_grad)
        if not input_grad:
            return None
        return np.add(d_body, d_skip, out=self.workspace_like("dx", d_body))

    @staticmethod
    def _chain_backward(layers: list[Layer], can_skip: list[bool], dy: np.ndarray, input_grad: bool):
        """Backward through ``layers`` (last to first); the first skips its dx when none is wanted."""
        for j in range(len(layers) - 1, -1, -1):
            if j == 0 and not input_grad and can_skip[j]:
                layers[j].backward(dy, input_grad=False)
                return None
            dy = layers[j].backward(dy)
        return dy

    # -- what the tools show -----------------------------------------------------------------------

    def matmuls(self, in_shape: tuple[int, ...], batch: int, input_grad: bool = True) -> list[tuple[int, int, int]]:
        products = []
        for _, layers in self._branches():
            for j, (layer, shape) in enumerate(zip(layers, self._shapes(in_shape, layers))):
                products += layer.matmuls(shape, batch, input_grad or j > 0)
        return products

    def summary_rows(self, in_shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...], int]]:
        rows = []
        for name, layers in self._branches():
            shapes = self._shapes(in_shape, layers)
            for j, layer in enumerate(layers):
                count = sum(int(np.prod(s)) for s in layer.param_shapes(shapes[j]).values())
                rows.append((f"{name}.{j}", layer.describe(), shapes[j + 1], count))
                rows += [(f"{name}.{j}.{path}", desc, shape, c) for path, desc, shape, c in layer.summary_rows(shapes[j])]
        return rows

    def describe(self) -> str:
        shortcut = f", shortcut of {len(self.shortcut)}" if self.shortcut else ""
        return f"Residual(body of {len(self.body)}{shortcut})"
