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
        self._direction = np.empty_like(params) if self.nesterov else None
        self._blas = _in_place_blas(params)

    def step(self, grad_scale: float = 1.0) -> None:
        """Update ``params`` in place with the gradient ``grad_scale * grads``.

        (The trainer passes 1 / global batch size and leaves the summed gradient unscaled, which
        saves a pass over the buffer.) Vector updates go through BLAS axpy/scal: one pass each.
        """
        axpy, scal = self._blas
        g, a = self.grads, grad_scale
        if self.weight_decay:  # g = grad_scale * grads + weight_decay * params
            g = np.multiply(self.params, self.weight_decay, out=self._decayed)
            axpy(self.grads, g, a=grad_scale)
            a = 1.0
        if not self.momentum:
            axpy(g, self.params, a=-self.lr * a)
            return
        buf = self.momentum_buffer
        scal(self.momentum, buf)
        axpy(g, buf, a=a)  # buf = momentum * buf + g
        if self.nesterov:  # direction = g + momentum * buf
            d = np.multiply(buf, self.momentum, out=self._direction)
            axpy(g, d, a=a)
            axpy(d, self.params, a=-self.lr)
        else:
            axpy(buf, self.params, a=-self.lr)

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


def _single_thread_private_blas() -> None:
    """One thread for a BLAS that SciPy bundles for itself (pip wheels), not the one NumPy uses.

    Two OpenBLAS thread pools in one process spin against each other: measured here with 2 threads,
    a training step took 41 ms instead of 11. axpy and scal are bound by memory bandwidth, so one
    thread loses nothing. (Where SciPy shares NumPy's BLAS, as with conda, nothing is changed.)
    """
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().lib_controllers:
        parts = lib.filepath.replace("\\", "/").split("/")
        if "scipy.libs" in parts or ("scipy" in parts and ".dylibs" in parts):  # Linux / macOS wheels
            lib.set_num_threads(1)


def _in_place_blas(like: np.ndarray):
    """(axpy, scal) for the dtype of ``like``, updating their y / x argument in place.

    axpy(x, y, a) does y += a * x; scal(a, x) does x *= a. Both need contiguous 1-d arrays (the flat
    buffers and their slices are).
    """
    from scipy.linalg import blas

    _single_thread_private_blas()
    axpy_f, scal_f = blas.get_blas_funcs(("axpy", "scal"), (like,))

    def axpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
        out = axpy_f(x, y, a=a)
        assert out is y or np.shares_memory(out, y)

    def scal(a: float, x: np.ndarray) -> None:
        out = scal_f(a, x)
        assert out is x or np.shares_memory(out, x)

    return axpy, scal


OPTIMIZERS = {"sgd": SGD}
