"""The standard normal CDF Phi(x), for GELU: exact in float64, a fast vectorized form in float32.

SciPy's ``erf`` on float32 arrays costs about 15 ns per element here (it converts each value and calls
a scalar routine): 6 ms for one GELU of a (768, 512) activation, a quarter of a small GPT's step. In
float32, Phi is computed instead from the complementary error function of Numerical Recipes (Press et
al., 2007, section 6.2.2, ``erfccheb``'s Chebyshev fit in its rational form): with z = |x| / sqrt(2) and
t = 1 / (1 + z / 2),

    erfc(z) = t * exp(-z^2 - 1.26551223 + t * (1.00002368 + t * (0.37409196 + ... + t * 0.17087277)))

whose fractional error is below 1.2e-7 for every z >= 0, then Phi(x) = erfc(z) / 2 for x < 0 and
1 - erfc(z) / 2 otherwise: about 30 elementwise passes, 1.5 ms for the same array, within 2.1e-7 of
the exact value everywhere, and to a small relative error in the left tail too.
"""

from __future__ import annotations

import math

import numpy as np

_SQRT_HALF = math.sqrt(0.5)
#: the polynomial in t of the exponent, highest degree first (Numerical Recipes' erfcc)
_ERFC_POLY = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
              0.37409196, 1.00002368, -1.26551223)


def normal_cdf(x: np.ndarray, out: np.ndarray, scratch: np.ndarray, scratch2: np.ndarray) -> np.ndarray:
    """Phi(x) = (1 + erf(x / sqrt(2))) / 2 into ``out``; ``scratch`` and ``scratch2`` are two more arrays
    of x's shape and dtype. float64: SciPy's erf (exact to rounding); float32: the rational form above,
    with no allocation."""
    if x.dtype != np.float32:
        from scipy.special import erf  # here, not at the top: scipy.special takes 0.2 s to import

        np.multiply(x, _SQRT_HALF, out=out)
        erf(out, out=out)
        out += 1
        out *= 0.5
        return out
    f = np.float32
    z = np.abs(x, out=scratch)
    z *= f(_SQRT_HALF)
    t = np.multiply(z, f(0.5), out=scratch2)
    t += 1
    np.reciprocal(t, out=t)
    np.multiply(z, z, out=z)  # z^2
    p = np.multiply(t, f(_ERFC_POLY[0]), out=out)
    p += f(_ERFC_POLY[1])
    for c in _ERFC_POLY[2:]:  # Horner
        p *= t
        p += f(c)
    p -= z
    np.exp(p, out=p)
    p *= t  # erfc(|x| / sqrt(2)) = 2 Phi(-|x|)
    p *= f(0.5)  # h = Phi(-|x|)
    # Phi(x) = h for x < 0 (its small values kept to full relative precision), 1 - h otherwise:
    # h + [x >= 0] (1 - 2h), with no mask array (a NaN stays NaN)
    step = np.greater_equal(x, 0, out=scratch, casting="unsafe")
    flip = np.multiply(p, f(-2), out=scratch2)
    flip += 1
    flip *= step
    p += flip
    return p
