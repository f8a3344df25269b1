"""Central finite differences: the independent truth every backward pass is checked against."""

from __future__ import annotations

import numpy as np

TOL = 1e-6
TINY = 1e-30


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of the scalar ``f()`` with respect to the array ``x``.

    ``x`` is perturbed in place, one element at a time, and restored afterwards, so it may be a
    view into a larger buffer (e.g. a model's ``param_buffer``) that ``f`` reads.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    for _ in it:
        idx = it.multi_index
        orig = x[idx].copy()
        x[idx] = orig + eps
        f_plus = float(f())
        x[idx] = orig - eps
        f_minus = float(f())
        x[idx] = orig
        grad[idx] = (f_plus - f_minus) / (2 * eps)
    return grad


def rel_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    analytic, numeric = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    assert analytic.shape == numeric.shape
    if analytic.size == 0:
        return 0.0
    scale = max(np.abs(analytic).max(), np.abs(numeric).max(), TINY)
    return float(np.abs(analytic - numeric).max() / scale)


def random_away_from_zero(rng: np.random.Generator, shape, low: float = 0.1) -> np.ndarray:
    """Random values with |x| in [low, low + 2): no element near a kink at 0."""
    return rng.choice([-1.0, 1.0], size=shape) * (low + 2 * rng.random(shape))


def check_gradients(model, x: np.ndarray, r: np.ndarray) -> None:
    """dx and every parameter gradient of sum(model(x) * r) against central differences (float64)."""
    model.forward(x)
    dx = model.backward(r).copy()
    analytic = model.grad_buffer.copy()

    def objective():
        return np.sum(model.forward(x) * r)

    assert rel_error(dx, numeric_grad(objective, x)) < TOL
    if model.n_params:
        assert rel_error(analytic, numeric_grad(objective, model.param_buffer)) < TOL


def check_parameter_gradients_without_input_grad(model, x: np.ndarray, r: np.ndarray) -> None:
    """``backward(r, input_grad=False)`` returns None and writes every parameter gradient exactly as the
    full backward does (over a buffer filled with 7s first, so nothing is left unwritten)."""
    model.forward(x)
    model.backward(r)
    full = model.grad_buffer.copy()
    model.grad_buffer[...] = 7.0
    model.forward(x)
    assert model.backward(r, input_grad=False) is None
    np.testing.assert_array_equal(model.grad_buffer, full)


def model_with_random_biases(layer, in_shape, rng: np.random.Generator, dtype=np.float64):
    """(layer, a Sequential of it alone) initialised from ``rng``, its bias random (init gives zeros)."""
    from dptrain.nn import Sequential

    model = Sequential([layer], in_shape, dtype=dtype)
    model.init_params(rng)
    layer.params["bias"][...] = rng.standard_normal(layer.params["bias"].shape)
    return layer, model
