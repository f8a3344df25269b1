"""The bare kernel: the matrix products of a step, in the layers' shapes, and the allreduce alone."""

from __future__ import annotations

import time

import numpy as np

from dptrain.nn import Dense, ReLU, Sigmoid, Tanh

_ACTIVATION_KINDS = ((ReLU, "relu"), (Tanh, "tanh"), (Sigmoid, "sigmoid"))


def mlp_layers(model) -> list[tuple[str, np.ndarray | None]] | None:
    """[("dense", weight) | ("relu"|"tanh"|"sigmoid", None), ...] for a Dense + activation stack
    (described as "MLP 784-1024-10 relu"); None for a model with any other layer."""
    out: list[tuple[str, np.ndarray | None]] = []
    for layer in model.layers:
        if isinstance(layer, Dense):
            out.append(("dense", layer.params["weight"]))
            continue
        kind = next((name for cls, name in _ACTIVATION_KINDS if type(layer) is cls), None)
        if kind is None:
            return None
        out.append((kind, None))
    if not any(kind == "dense" for kind, _ in out):
        return None
    return out


class BareKernel:
    """The step's math alone: every matrix product of a training step's forward and backward in the
    shapes the layers use (:meth:`dptrain.nn.Sequential.matmuls`: Dense and Conv2D; a layer that
    declares none adds nothing), on preallocated arrays, then one in-place Allreduce of a flat
    buffer of the model's parameter count. No loss, im2col, normalisation, activation, pooling,
    optimizer update or data reading: what a step cannot do without.

    The operands are views of three shared buffers (the values do not matter, only the shapes), so
    the kernel holds the largest operand of each kind once, not one copy per product.
    """

    def __init__(self, model, local_batch: int, comm, seed: int = 0) -> None:
        dtype = model.dtype
        self.comm = comm
        self.flat = np.zeros(model.n_params, dtype=dtype)  # the gradient exchanged, as the trainer's
        self.shapes = model.matmuls(local_batch)  # per layer: [(m, k, n), ...]
        sizes = [(m * k, k * n, m * n) for layer in self.shapes for m, k, n in layer] or [(0, 0, 0)]
        rng = np.random.default_rng(seed)
        a, b = (rng.standard_normal(max(s[j] for s in sizes)).astype(dtype) for j in (0, 1))
        c = np.empty(max(s[2] for s in sizes), dtype=dtype)
        self.products = [[(a[: m * k].reshape(m, k), b[: k * n].reshape(k, n), c[: m * n].reshape(m, n))
                          for m, k, n in layer] for layer in self.shapes]
        #: seconds of each layer's products over the steps so far
        self.layer_seconds = np.zeros(len(self.shapes))

    def step(self) -> None:
        clock, seconds = time.perf_counter, self.layer_seconds
        for i, products in enumerate(self.products):
            if products:
                start = clock()
                for x, w, out in products:
                    np.matmul(x, w, out=out)
                seconds[i] += clock() - start
        self.comm.allreduce_sum(self.flat)
