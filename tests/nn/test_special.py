"""The normal CDF behind GELU: the fast float32 form against SciPy's exact one in float64."""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from dptrain.nn import GELU
from dptrain.nn.special import normal_cdf


def _cdf(x):
    gauss = np.empty_like(x)
    cdf = normal_cdf(x, np.empty_like(x), gauss, np.empty_like(x))
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(gauss, np.exp(-np.square(x.astype(np.float64)) / 2), rtol=5e-5, atol=1e-30)
    return cdf


def test_float32_cdf_is_within_3e_7_of_the_exact_value():
    x = np.concatenate([np.linspace(-30, 30, 200_001), np.random.default_rng(0).standard_normal(50_000) * 3])
    got = _cdf(x.astype(np.float32)).astype(np.float64)
    exact = ndtr(x.astype(np.float32).astype(np.float64))
    assert np.abs(got - exact).max() < 3e-7
    special = _cdf(np.array([np.nan, -np.inf, np.inf, 0.0, -0.0], np.float32))
    assert np.isnan(special[0]) and list(special[1:]) == [0.0, 1.0, 0.5, 0.5]


def test_float64_cdf_is_scipys():
    x = np.linspace(-8, 8, 1001)
    np.testing.assert_allclose(_cdf(x), ndtr(x), rtol=1e-15, atol=1e-16)


def test_gelu_in_float32_is_gelu_in_float64_rounded():
    x = np.random.default_rng(1).standard_normal((64, 50)) * 4
    layer32, layer64 = GELU(), GELU()
    y32, y64 = layer32.forward(x.astype(np.float32)), layer64.forward(x)
    np.testing.assert_allclose(y32, y64, rtol=1e-6, atol=1e-6)
    dy = np.ones_like(x)
    np.testing.assert_allclose(layer32.backward(dy.astype(np.float32)), layer64.backward(dy), rtol=1e-5, atol=1e-6)
