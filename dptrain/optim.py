"""Optimizers over the model's flat parameter buffer. They know nothing about MPI.

The gradient they see is already averaged over the global batch (by the trainer), so every rank
applies the same update and the weights stay identical.
"""

from __future__ import annotations

import numpy as np


class SGD:
    """Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay.

    Same semantics as ``torch.optim.SGD`` (dampening 0)::

        g = grad + weight_decay * p
        buf = momentum * buf + g                 (buf starts at 0)
        g = g + momentum * buf   if nesterov else buf
        p -= lr * g

    params, grads : the flat buffers, shape (n_params,); updated in place.
    """

    name = "sgd"

    def __init__(self, params: np.ndarray, grads: np.ndarray, lr: float = 0.01, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        self.params, self.grads = params, grads
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.nesterov = bool(nesterov)
        self.momentum_buffer = np.zeros_like(params)
        self._decayed = np.empty_like(params) if self.weight_decay else None
        self._direction = np.empty_like(params)

    def step(self) -> None:
        g = self.grads
        if self.weight_decay:
            g = np.multiply(self.params, self.weight_decay, out=self._decayed)
            g += self.grads
        d = g
        if self.momentum:
            buf = self.momentum_buffer
            buf *= self.momentum
            buf += g
            d = buf
            if self.nesterov:
                d = np.multiply(buf, self.momentum, out=self._direction)
                d += g
        np.multiply(d, self.lr, out=self._direction)
        self.params -= self._direction

    def with_buffers(self, params: np.ndarray, grads: np.ndarray) -> "SGD":
        """The same optimizer over other arrays, e.g. one rank's slice of the flat buffers (ZeRO-1)."""
        return SGD(params, grads, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                   weight_decay=self.weight_decay)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint (independent of the world size), each of the shape of ``params``.

        (np.zeros memory is committed on first touch: an optimizer that is never stepped, as the
        full one in sharded mode, costs no resident memory.)"""
        return {"momentum_buffer": self.momentum_buffer}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        buf = state.get("momentum_buffer")
        if buf is None or buf.shape != self.momentum_buffer.shape:
            got = None if buf is None else buf.shape
            raise ValueError(f"optimizer state momentum_buffer has shape {got}, expected {self.momentum_buffer.shape}")
        self.momentum_buffer[...] = buf


OPTIMIZERS = {"sgd": SGD}
