"""The counter-based hash behind every random choice that must not depend on the number of ranks.

splitmix64 (uint64 arithmetic wrapping modulo 2**64): a random value is a pure function of
(seed, what it is for, where it is), never a draw from a stream a rank advances, so a sample gets
the same Dropout mask or augmentation on whichever rank and in whichever batch it lands.

    mix(v)              = v ^= v >> 30; v *= 0xBF58476D1CE4E5B9; v ^= v >> 27;
                          v *= 0x94D049BB133111EB; v ^= v >> 31        (the splitmix64 finalizer)
    chain(k, w1..wm)    = mix(...mix(mix(k ^ w1) ^ w2)... ^ wm)           a key from a start and words
    counters(n)[j]      = (j + 1) * 0x9E3779B97F4A7C15                   j = 0..n-1

``mix(s + counters(n))`` is the splitmix64 stream seeded by ``s``. Each user starts its key chain
from its own constant, so the streams of one seed are independent of each other. Imports NumPy only.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # the golden-ratio increment of splitmix64
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def mix(v: int) -> int:
    """The splitmix64 finalizer on a Python int, modulo 2**64 (a bijection of uint64)."""
    v &= MASK64
    v ^= v >> 30
    v = (v * _M1) & MASK64
    v ^= v >> 27
    v = (v * _M2) & MASK64
    return v ^ (v >> 31)


def mix_inplace(v: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on a uint64 array, in place; ``tmp`` is scratch of the same shape."""
    with np.errstate(over="ignore"):
        np.bitwise_xor(v, np.right_shift(v, np.uint64(30), out=tmp), out=v)
        np.multiply(v, np.uint64(_M1), out=v)
        np.bitwise_xor(v, np.right_shift(v, np.uint64(27), out=tmp), out=v)
        np.multiply(v, np.uint64(_M2), out=v)
        np.bitwise_xor(v, np.right_shift(v, np.uint64(31), out=tmp), out=v)
    return v


def chain(start: int, *words: int) -> int:
    """``mix(...mix(mix(start ^ w1) ^ w2)... ^ wm)``, each word taken modulo 2**64 (-1 is 2**64 - 1)."""
    v = start & MASK64
    for w in words:
        v = mix(v ^ (w & MASK64))
    return v


def counters(n: int) -> np.ndarray:
    """(n,) uint64: (j + 1) * GAMMA modulo 2**64, the splitmix64 increments of elements 0..n-1."""
    with np.errstate(over="ignore"):
        return np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GAMMA)
