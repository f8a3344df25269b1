"""Inverted dropout whose mask does not depend on the world size.

A data-parallel run must give the same weights on 1 rank or on 8, so the mask of a sample cannot
come from a random stream that each rank advances over its own shard. Instead every mask element
is a pure function of (seed, salt, step, sample index, element position), computed by a
counter-based hash (splitmix64, uint64 arithmetic wrapping modulo 2**64):

    mix(v)   = the splitmix64 finalizer: v ^= v >> 30; v *= 0xBF58476D1CE4E5B9;
               v ^= v >> 27; v *= 0x94D049BB133111EB; v ^= v >> 31
    key      = mix(mix(mix(KEY0 ^ seed) ^ salt) ^ step)               one per layer and step
    s_i      = mix(key ^ sample_index_i)                               one per sample
    h_ij     = mix(s_i + (j + 1) * 0x9E3779B97F4A7C15)                 one per element j (C order)
    u_ij     = (h_ij >> 11) / 2**53                                    uniform in [0, 1)
    keep_ij  = u_ij >= rate

so the elements of one sample are the splitmix64 stream seeded by s_i. ``keep`` is evaluated as
the equivalent integer test ``h_ij >= ceil(rate * 2**53) << 11`` (exact: rate * 2**53 is exact in
float64). Kept values are scaled by 1 / (1 - rate), so the expectation of the output is the input.
The hash is :mod:`dptrain.runtime.hashing`'s (key = ``chain(KEY0, seed, salt, step)``).
"""

from __future__ import annotations

import math

import numpy as np

from dptrain.runtime.hashing import chain, counters, mix_inplace

from .layers import Layer

_KEY0 = 0x6A09E667F3BCC908  # start of the key chain: fractional bits of sqrt(2), so seed 0 is no fixed point


def layer_key(seed: int, salt: int, step: int) -> int:
    """The per-layer, per-step key of the mask hash (see the module docstring)."""
    return chain(_KEY0, seed, salt, step)


class Dropout(Layer):
    """Inverted dropout: in training, each element is zeroed with probability ``rate`` and the
    kept ones are scaled by 1 / (1 - rate); the identity when ``train=False`` or ``rate == 0``.

    Parameters
    ----------
    rate : probability of dropping an element, in [0, 1).
    seed : the run's seed (the mask is a pure function of seed, salt, step, sample and element).
    salt : distinguishes the Dropout layers of one model, which would otherwise draw the same
        mask for the same sample; set it to the layer's index in the model when building it (it is
        a plain attribute, so it may also be set after construction, before training).

    x : (batch, *shape) -> y of the same shape. The step and sample indices come from
    ``self.batch_info`` (set by the trainer before a training forward). Without it (a direct
    call), the step is a counter of such calls on this layer and the samples are
    ``arange(batch)``. The mask of a sample depends only on (seed, salt, step, its global sample
    index, element position): not on the batch it sits in, its position there, or the rank.
    """

    def __init__(self, rate: float, seed: int = 0, salt: int = 0) -> None:
        super().__init__()
        rate = float(rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.seed = int(seed)
        self.salt = int(salt)
        self.calls = 0  # the step used when no batch_info is set
        # keep iff hash >= threshold: the integer form of (hash >> 11) / 2**53 >= rate
        self._threshold = np.uint64(math.ceil(rate * 2.0**53) << 11)
        self._streams: dict[int, np.ndarray] = {}  # n elements -> (n,) uint64 counters (j + 1) * GAMMA
        self._scale: np.ndarray | None = None  # (batch, *shape): 0 or 1 / (1 - rate); None: identity

    def _stream(self, n: int) -> np.ndarray:
        stream = self._streams.get(n)
        if stream is None:
            stream = self._streams[n] = counters(n)
        return stream

    def keep_mask(self, step: int, sample_index: np.ndarray, sample_shape: tuple[int, ...]) -> np.ndarray:
        """The (batch, *sample_shape) bool mask of kept elements for these samples at this step.

        Returned in a workspace (valid until the next call, whatever its batch size).
        """
        batch, n = len(sample_index), math.prod(sample_shape)
        s = self.workspace("s", (batch,), np.uint64)
        np.copyto(s, sample_index, casting="unsafe")  # negative indices wrap, as in C
        np.bitwise_xor(s, np.uint64(layer_key(self.seed, self.salt, step)), out=s)
        mix_inplace(s, self.workspace("s_tmp", (batch,), np.uint64))
        h = self.workspace("h", (batch, n), np.uint64)
        with np.errstate(over="ignore"):
            np.add(s[:, None], self._stream(n), out=h)
        mix_inplace(h, self.workspace("h_tmp", (batch, n), np.uint64))
        keep = np.greater_equal(h, self._threshold, out=self.workspace("keep", (batch, n), np.bool_))
        return keep.reshape((batch, *sample_shape))

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        if not train or self.rate == 0.0:
            self._scale = None
            return x
        info = self.batch_info
        if info is None:
            step, sample_index = self.calls, np.arange(len(x))
            self.calls += 1
        else:
            step, sample_index = info.step, np.asarray(info.sample_index)
            if sample_index.shape != (len(x),):
                raise ValueError(f"batch_info has {sample_index.shape} sample indices for a batch of {len(x)}")
        keep = self.keep_mask(step, sample_index, x.shape[1:])
        scale = self.workspace_like("scale", x)
        np.multiply(keep, 1.0 / (1.0 - self.rate), out=scale, dtype=x.dtype)
        self._scale = scale
        return np.multiply(x, scale, out=self.workspace_like("y", x))

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray:
        if self._scale is None:
            return dy
        return np.multiply(dy, self._scale, out=self.workspace_like("dx", dy))

    def describe(self) -> str:
        return f"Dropout({self.rate:g})"
