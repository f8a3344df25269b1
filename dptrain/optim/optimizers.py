"""Optimizers over the model's flat parameter buffer. They know nothing about MPI.

Every rank applies the same update to the same weights, so they stay identical. The gradient an
optimizer uses is ``grad_scale * grads``: the trainer leaves the SUM over the global batch in
``grads`` and passes ``grad_scale = 1 / global batch size`` to :meth:`step`.

Shared by all of them (torch.optim semantics; ``maximize``, ``amsgrad``, ``centered`` and the like
are not offered):

* ``lr`` is a plain attribute, read at every step: a schedule sets it before each step.
* ``steps`` counts the updates applied so far (Adam's bias correction uses ``t = steps + 1``). It is
  not in :meth:`state_dict`: the trainer saves and restores it (set the attribute).
* :meth:`state_dict` holds only arrays of the shape of ``params`` (the live arrays, not copies), so
  ZeRO-1 can shard and gather them blockwise; :meth:`load_state_dict` checks names and shapes.
* :meth:`with_buffers` gives the same optimizer (hyperparameters, ``lr`` and ``steps``) over other
  arrays, e.g. one rank's slice of the flat buffers; it starts with zero state.
* Updates are in place and allocation-free: scratch arrays are allocated once, in ``__init__``
  (``np.empty``/``np.zeros`` memory is committed on first touch, so an optimizer that never steps,
  as the full one in sharded mode, costs no resident memory).
* Adam, AdamW and RMSprop use NumPy ufuncs only, which round each element the same way wherever a
  slice starts: stepping slices gives bitwise the weights of stepping the whole. They run their
  ufuncs over cache-sized blocks with scratch arrays of one block (see ``_BlockwiseOptimizer``).
  SGD's BLAS axpy (one pass instead of two) may differ in the last bit near a slice's end (FMA
  kernel vs. tail loop).
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np

from .checks import require


class _FlatOptimizer:
    """The common part: the buffers, ``lr``, ``steps``, the checkpointable state and slicing.

    params, grads : the flat buffers, 1-d of the same shape; ``params`` is updated in place,
    ``grads`` only read. Subclasses set ``name`` and ``_state_names``, and store every argument of
    their ``__init__`` (besides the buffers) under its own name: :meth:`hyperparameters` reads them.
    The checks shared by the optimizers (``lr``, ``weight_decay``, ``momentum``) are made here.
    """

    name = ""
    _state_names: tuple[str, ...] = ()

    def __init__(self, params: np.ndarray, grads: np.ndarray, lr: float, weight_decay: float = 0.0,
                 momentum: float = 0.0) -> None:
        if params.ndim != 1 or grads.shape != params.shape:
            raise ValueError(f"params and grads must be 1-d of the same shape, got {params.shape} and {grads.shape}")
        require(math.isfinite(lr) and lr > 0, f"lr must be > 0, got {lr}")
        require(math.isfinite(weight_decay) and weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
        require(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
        self.params, self.grads = params, grads
        self.lr = float(lr)
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)
        self.steps = 0
        #: the (lo, hi) spans of ``params`` that weight decay applies to, sorted; None: all of it
        self.decay_ranges: tuple[tuple[int, int], ...] | None = None

    def decay_only(self, ranges) -> None:
        """Apply weight decay to these (lo, hi) spans of ``params`` only (e.g. the weight matrices:
        :meth:`dptrain.nn.Sequential.decay_ranges`); None: to every parameter."""
        if ranges is None:
            self.decay_ranges = None
            return
        spans = tuple(sorted((int(lo), int(hi)) for lo, hi in ranges))
        n = len(self.params)
        require(all(0 <= lo <= hi <= n for lo, hi in spans), f"decay ranges must lie in [0, {n}], got {spans}")
        self.decay_ranges = spans

    def _decayed_spans(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The spans of [lo, hi) that weight decay applies to, relative to lo."""
        if self.decay_ranges is None:
            return [(0, hi - lo)]
        return [(max(a, lo) - lo, min(b, hi) - lo) for a, b in self.decay_ranges if a < hi and b > lo]

    def hyperparameters(self) -> dict:
        """The keyword arguments that rebuild this optimizer (``lr`` is the current one)."""
        return {name: getattr(self, name) for name in _hyperparameter_names(type(self))}

    def step(self, grad_scale: float = 1.0) -> None:
        raise NotImplementedError

    def with_buffers(self, params: np.ndarray, grads: np.ndarray, start: int = 0):
        """The same optimizer over other arrays, e.g. one rank's slice of the flat buffers (ZeRO-1),
        which begins at element ``start`` of this optimizer's buffers.

        Hyperparameters, ``lr``, ``steps`` and the decay ranges are copied; the state starts at zero (load it)."""
        # lr is copied as an attribute: a schedule may have set a value __init__ refuses (0 at the end of a cosine)
        opt = type(self)(params, grads, **{**self.hyperparameters(), "lr": 1.0})
        opt.lr, opt.steps = self.lr, self.steps
        if self.decay_ranges is not None:
            opt.decay_only(self._decayed_spans(start, start + len(params)))
        return opt

    def state_dict(self) -> dict[str, np.ndarray]:
        """The arrays to checkpoint (independent of the world size), each of the shape of ``params``.

        These are the optimizer's own arrays, not copies (the trainer broadcasts into them)."""
        return {name: getattr(self, name) for name in self._state_names}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy ``state`` into the optimizer's arrays. Every array must be present with the shape of
        ``params`` and nothing else may be there; otherwise ValueError, and nothing is changed."""
        keeps = ", ".join(self._state_names)
        for name in self._state_names:
            expected = getattr(self, name).shape
            if name not in state:
                raise ValueError(f"optimizer state {name} is missing ({self.name} keeps {keeps})")
            if np.shape(state[name]) != expected:
                raise ValueError(f"optimizer state {name} has shape {np.shape(state[name])}, expected {expected}")
        unexpected = sorted(set(state) - set(self._state_names))
        if unexpected:
            raise ValueError(f"optimizer state has unexpected arrays {', '.join(map(str, unexpected))} "
                             f"({self.name} keeps {keeps})")
        for name in self._state_names:
            getattr(self, name)[...] = state[name]


class _BlockwiseOptimizer(_FlatOptimizer):
    """An optimizer whose update is a sequence of elementwise ufuncs (Adam, AdamW, RMSprop).

    The sequence runs over blocks of ``BLOCK`` elements, one block after the other, with scratch
    arrays of one block: each block's data stays in cache through the whole sequence instead of
    being streamed from memory once per ufunc. Elementwise ufuncs round each element the same way
    whatever the blocking, so the result is bitwise that of running each ufunc over the whole buffer.
    """

    #: elements per block: with its scratch arrays, a block of float64 fits in a core's L2 cache
    BLOCK = 65536

    def __init__(self, params: np.ndarray, grads: np.ndarray, lr: float, weight_decay: float = 0.0,
                 momentum: float = 0.0) -> None:
        super().__init__(params, grads, lr, weight_decay=weight_decay, momentum=momentum)
        size = min(len(params), self.BLOCK)
        self._grad = np.empty(size, dtype=params.dtype)  # the gradient of a block, when it is not grads itself
        self._scratch = np.empty(size, dtype=params.dtype)

    def _blocks(self):
        """(lo, hi) of each block, in order; none for empty buffers."""
        n = len(self.params)
        return ((lo, min(lo + self.BLOCK, n)) for lo in range(0, n, self.BLOCK))

    def _gradient(self, lo: int, hi: int, grad_scale: float, weight_decay: float) -> np.ndarray:
        """``grad_scale * grads + weight_decay * params`` on the block [lo, hi): a slice of ``grads``
        itself when that is all it is, else written into the scratch ``self._grad``."""
        grads = self.grads[lo:hi]
        if grad_scale == 1.0 and not weight_decay:
            return grads
        g = np.multiply(grads, grad_scale, out=self._grad[:hi - lo])
        if weight_decay:
            p, tmp = self.params[lo:hi], self._scratch
            for a, b in self._decayed_spans(lo, hi):
                np.add(g[a:b], np.multiply(p[a:b], weight_decay, out=tmp[a:b]), out=g[a:b])
        return g


class SGD(_FlatOptimizer):
    """Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay.

    Same semantics as ``torch.optim.SGD`` (dampening 0), with ``grad = grad_scale * grads``::

        g = grad + weight_decay * p
        buf = momentum * buf + g                 (buf starts at 0)
        g = g + momentum * buf   if nesterov else buf
        p -= lr * g

    params, grads : the flat buffers, shape (n_params,); params updated in place.
    State: ``momentum_buffer`` (kept, as zeros, even without momentum).
    """

    name = "sgd"
    _state_names = ("momentum_buffer",)

    def __init__(self, params: np.ndarray, grads: np.ndarray, lr: float = 0.01, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, grads, lr, weight_decay=weight_decay, momentum=momentum)
        require(not (nesterov and momentum == 0), "nesterov needs momentum > 0")
        self.nesterov = bool(nesterov)
        self.momentum_buffer = np.zeros_like(params)
        self._decayed = np.empty_like(params) if self.weight_decay else None  # the gradient with weight decay
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
            if self.decay_ranges is not None:  # zero outside the decayed spans
                kept = np.zeros(len(g), dtype=bool)
                for a, b in self.decay_ranges:
                    kept[a:b] = True
                g[~kept] = 0.0
            axpy(self.grads, g, a=grad_scale)
            a = 1.0
        if not self.momentum:
            axpy(g, self.params, a=-self.lr * a)
        else:
            buf = self.momentum_buffer
            scal(self.momentum, buf)
            axpy(g, buf, a=a)  # buf = momentum * buf + g
            if self.nesterov:  # direction = g + momentum * buf
                d = np.multiply(buf, self.momentum, out=self._direction)
                axpy(g, d, a=a)
                axpy(d, self.params, a=-self.lr)
            else:
                axpy(buf, self.params, a=-self.lr)
        self.steps += 1


class Adam(_BlockwiseOptimizer):
    """Adam (Kingma & Ba, 2015) with L2 weight decay added to the gradient: ``torch.optim.Adam``.

    With ``grad = grad_scale * grads`` and ``t = steps + 1`` (1 at the first step)::

        g = grad + weight_decay * p
        m = beta1 * m + (1 - beta1) * g          (exp_avg, starts at 0)
        v = beta2 * v + (1 - beta2) * g * g      (exp_avg_sq, starts at 0)
        p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    params, grads : the flat buffers, shape (n_params,); params updated in place.
    State: ``exp_avg``, ``exp_avg_sq``; plus two scratch arrays of one block (``BLOCK`` elements).
    """

    name = "adam"
    _state_names = ("exp_avg", "exp_avg_sq")
    _decoupled = False  # AdamW: weight decay multiplies p instead of joining the gradient

    def __init__(self, params: np.ndarray, grads: np.ndarray, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, grads, lr, weight_decay=weight_decay)
        self.betas = _betas(betas)
        self.eps = _eps(eps)
        self.exp_avg = np.zeros_like(params)
        self.exp_avg_sq = np.zeros_like(params)

    def step(self, grad_scale: float = 1.0) -> None:
        """Update ``params`` in place with the gradient ``grad_scale * grads`` (in the order of torch's
        single-tensor implementation), one block at a time."""
        beta1, beta2 = self.betas
        t = self.steps + 1
        bias_correction1 = 1.0 - beta1**t
        bias_correction2_sqrt = (1.0 - beta2**t) ** 0.5
        step_size = self.lr / bias_correction1
        shrink = 1.0 - self.lr * self.weight_decay if self._decoupled and self.weight_decay else None
        l2 = 0.0 if self._decoupled else self.weight_decay
        for lo, hi in self._blocks():
            p, m, v, tmp = self.params[lo:hi], self.exp_avg[lo:hi], self.exp_avg_sq[lo:hi], self._scratch[:hi - lo]
            if shrink is not None:
                for a, b in self._decayed_spans(lo, hi):
                    np.multiply(p[a:b], shrink, out=p[a:b])
            g = self._gradient(lo, hi, grad_scale, l2)
            np.add(m, np.multiply(np.subtract(g, m, out=tmp), 1.0 - beta1, out=tmp), out=m)  # torch's lerp
            np.multiply(v, beta2, out=v)
            np.add(v, np.multiply(np.multiply(g, g, out=tmp), 1.0 - beta2, out=tmp), out=v)
            denom = np.add(np.divide(np.sqrt(v, out=tmp), bias_correction2_sqrt, out=tmp), self.eps, out=tmp)
            update = np.divide(m, denom, out=tmp)
            np.subtract(p, np.multiply(update, step_size, out=tmp), out=p)
        self.steps = t


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019): ``torch.optim.AdamW``.

    As :class:`Adam` without the L2 term in the gradient, after shrinking the weights first::

        p *= 1 - lr * weight_decay
        g = grad
        (then m, v and p as in Adam)
    """

    name = "adamw"
    _decoupled = True

    def __init__(self, params: np.ndarray, grads: np.ndarray, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(params, grads, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class RMSprop(_BlockwiseOptimizer):
    """RMSprop (Hinton, 2012) as ``torch.optim.RMSprop`` with ``centered=False``.

    With ``grad = grad_scale * grads``::

        g = grad + weight_decay * p
        s = alpha * s + (1 - alpha) * g * g      (square_avg, starts at 0)
        if momentum: buf = momentum * buf + g / (sqrt(s) + eps)    (buf starts at 0)
                     p -= lr * buf
        else:        p -= lr * g / (sqrt(s) + eps)

    params, grads : the flat buffers, shape (n_params,); params updated in place.
    State: ``square_avg``, and ``momentum_buffer`` only when momentum > 0 (as torch); plus two
    scratch arrays of one block (``BLOCK`` elements).
    """

    name = "rmsprop"

    def __init__(self, params: np.ndarray, grads: np.ndarray, lr: float = 0.01, alpha: float = 0.99,
                 eps: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, grads, lr, weight_decay=weight_decay, momentum=momentum)
        require(0 <= alpha < 1, f"alpha must be in [0, 1), got {alpha}")
        self.eps = _eps(eps)
        self.alpha = float(alpha)
        self._state_names = ("square_avg", "momentum_buffer") if self.momentum else ("square_avg",)
        self.square_avg = np.zeros_like(params)
        self.momentum_buffer = np.zeros_like(params) if self.momentum else None

    def step(self, grad_scale: float = 1.0) -> None:
        """Update ``params`` in place with the gradient ``grad_scale * grads`` (in torch's order), one
        block at a time."""
        for lo, hi in self._blocks():
            p, s, tmp = self.params[lo:hi], self.square_avg[lo:hi], self._scratch[:hi - lo]
            g = self._gradient(lo, hi, grad_scale, self.weight_decay)
            np.multiply(s, self.alpha, out=s)
            np.add(s, np.multiply(np.multiply(g, g, out=tmp), 1.0 - self.alpha, out=tmp), out=s)
            update = np.divide(g, np.add(np.sqrt(s, out=tmp), self.eps, out=tmp), out=tmp)  # g / (sqrt(s) + eps)
            if self.momentum:
                buf = self.momentum_buffer[lo:hi]
                update = np.add(np.multiply(buf, self.momentum, out=buf), update, out=buf)
            np.subtract(p, np.multiply(update, self.lr, out=tmp), out=p)
        self.steps += 1



def _betas(betas) -> tuple[float, float]:
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}") from None
    require(0 <= beta1 < 1 and 0 <= beta2 < 1, f"betas must be two numbers in [0, 1), got {betas!r}")
    return beta1, beta2


def _eps(eps: float) -> float:
    require(0 < eps < 1, f"eps must be in (0, 1), got {eps}")
    return float(eps)


@functools.cache
def _single_thread_private_blas() -> None:
    """One thread for a BLAS that SciPy bundles for itself (pip wheels), not the one NumPy uses.

    Two OpenBLAS thread pools in one process spin against each other: measured here with 2 threads,
    a training step took 41 ms instead of 11. axpy and scal are bound by memory bandwidth, so one
    thread loses nothing. (Where SciPy shares NumPy's BLAS, as with conda, nothing is changed.)
    Done once per process (cached): building a ThreadpoolController scans the loaded libraries.
    """
    from dptrain.runtime.threads import single_thread_scipys_own_blas

    single_thread_scipys_own_blas()


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


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def hyperparameter_names(name: str) -> set[str]:
    """The keyword arguments ``OPTIMIZERS[name]`` accepts besides the buffers, e.g. to pass it only
    the config fields it knows: ``{"lr", "betas", "eps", "weight_decay"}`` for ``"adam"``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return set(_hyperparameter_names(OPTIMIZERS[name]))


@functools.cache
def _hyperparameter_names(cls: type) -> tuple[str, ...]:
    """The arguments of ``cls.__init__`` besides the buffers, in order."""
    return tuple(name for name in inspect.signature(cls).parameters if name not in ("params", "grads"))
