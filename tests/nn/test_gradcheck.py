"""Hand-written backward passes checked against central finite differences (float64).

Every layer and loss is compared with a numeric gradient; the model's flat buffers, the loss
contract (SUM over samples, empty batches) and the initialisers are checked as well.
"""

from __future__ import annotations

import numpy as np
import pytest

from dptrain.nn.layers import Dense, ReLU, Sigmoid, Tanh
from dptrain.nn.losses import MeanSquaredError, SoftmaxCrossEntropy
from dptrain.nn.model import Sequential

from gradcheck import TOL, numeric_grad, random_away_from_zero, rel_error  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Layers


@pytest.mark.parametrize("layer_cls", [ReLU, Tanh, Sigmoid])
def test_activation_dx(layer_cls):
    rng = np.random.default_rng(1)
    layer = layer_cls()
    model = Sequential([layer], 6, dtype=np.float64)
    assert model.n_params == 0
    x = random_away_from_zero(rng, (5, 6)) * 1.5
    r = rng.standard_normal((5, 6))

    y = model.forward(x)
    assert y.shape == x.shape and y.dtype == np.float64
    dx = model.backward(r.copy())

    def objective():
        return np.sum(layer.forward(x) * r)

    num = numeric_grad(objective, x)
    assert rel_error(dx, num) < TOL


@pytest.mark.parametrize("init", ["he", "xavier"])
def test_dense_gradients(init):
    rng = np.random.default_rng(2)
    layer = Dense(4, init=init)
    model = Sequential([layer], 5, dtype=np.float64)
    model.init_params(rng)
    layer.params["bias"][...] = rng.standard_normal(4)  # init gives zeros; exercise the bias
    x = rng.standard_normal((7, 5))
    r = rng.standard_normal((7, 4))

    y = model.forward(x)
    np.testing.assert_allclose(y, x @ layer.params["weight"] + layer.params["bias"], rtol=1e-12)
    dx = model.backward(r)
    dw = layer.grads["weight"].copy()
    db = layer.grads["bias"].copy()

    def objective():
        return np.sum(model.forward(x) * r)

    # dx by perturbing the input
    assert rel_error(dx, numeric_grad(objective, x)) < TOL
    # dweight and dbias by perturbing the flat parameter buffer through the layer's views
    assert rel_error(dw, numeric_grad(objective, layer.params["weight"])) < TOL
    assert rel_error(db, numeric_grad(objective, layer.params["bias"])) < TOL
    # and directly on param_buffer: the flat gradient is the concatenation of the two
    num_flat = numeric_grad(objective, model.param_buffer)
    assert rel_error(model.grad_buffer, num_flat) < TOL


# ---------------------------------------------------------------------------------------------
# Losses


def _classification_batch(rng, n=6, k=5):
    z = rng.standard_normal((n, k)) * 2
    y = rng.integers(0, k, size=n)
    return z, y


def _regression_batch(rng, n=6, k=3):
    return rng.standard_normal((n, k)), rng.standard_normal((n, k))


LOSS_CASES = [
    pytest.param(SoftmaxCrossEntropy, _classification_batch, id="cross_entropy"),
    pytest.param(MeanSquaredError, _regression_batch, id="mse"),
]


@pytest.mark.parametrize("loss_cls, make_batch", LOSS_CASES)
def test_loss_gradient(loss_cls, make_batch):
    rng = np.random.default_rng(3)
    loss = loss_cls()
    z, y = make_batch(rng)
    value, dz = loss.value_and_grad(z, y)
    assert dz.shape == z.shape
    assert value == pytest.approx(loss.value(z, y), rel=1e-12)
    num = numeric_grad(lambda: loss.value(z, y), z)
    assert rel_error(dz, num) < TOL


@pytest.mark.parametrize("loss_cls, make_batch", LOSS_CASES)
def test_loss_is_sum_over_samples(loss_cls, make_batch):
    rng = np.random.default_rng(4)
    loss = loss_cls()
    z, y = make_batch(rng, n=9)
    total, dz = loss.value_and_grad(z, y)
    # a returned gradient lives in a workspace reused by the next call, whatever its shape: copy it
    dz = dz.copy()
    rows = [(v, g.copy()) for v, g in (loss.value_and_grad(z[i : i + 1], y[i : i + 1]) for i in range(len(z)))]
    assert total == pytest.approx(sum(v for v, _ in rows), rel=1e-12)
    # the gradient of a sum is the per-row gradients stacked
    np.testing.assert_allclose(dz, np.concatenate([g for _, g in rows]), rtol=1e-12, atol=1e-15)
    # and splitting the batch in two parts adds up too (what the ranks do)
    a, _ = loss.value_and_grad(z[:4], y[:4])
    b, _ = loss.value_and_grad(z[4:], y[4:])
    assert total == pytest.approx(a + b, rel=1e-12)


def test_mse_matches_definition():
    rng = np.random.default_rng(5)
    z, y = _regression_batch(rng, n=4, k=3)
    value = MeanSquaredError().value(z, y)
    assert value == pytest.approx(float(np.mean((z - y) ** 2, axis=1).sum()), rel=1e-12)


def test_cross_entropy_matches_definition():
    rng = np.random.default_rng(6)
    z, y = _classification_batch(rng, n=4, k=3)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    expected = -np.log(p[np.arange(4), y]).sum()
    assert SoftmaxCrossEntropy().value(z, y) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# A whole model, end to end


def _mlp(rng, in_features=5, n_classes=3, dtype=np.float64):
    model = Sequential(
        [Dense(8, init="xavier"), Tanh(), Dense(7, init="he"), ReLU(), Dense(n_classes, init="xavier")],
        in_features,
        dtype=dtype,
    )
    model.init_params(rng)
    for layer in model.layers:  # non-zero biases so their gradients matter
        if "bias" in layer.params:
            layer.params["bias"][...] = 0.1 * rng.standard_normal(layer.params["bias"].shape)
    return model


def test_sequential_end_to_end():
    rng = np.random.default_rng(7)
    model = _mlp(rng)
    x = rng.standard_normal((6, 5))
    y = rng.integers(0, 3, size=6)
    loss = SoftmaxCrossEntropy()

    # keep the check meaningful: no pre-ReLU activation sits at the kink
    pre_relu = model.layers[2].forward(model.layers[1].forward(model.layers[0].forward(x)))
    assert np.abs(pre_relu).min() > 1e-4

    z = model.forward(x)
    _, dz = loss.value_and_grad(z, y)
    dx = model.backward(dz)
    analytic = model.grad_buffer.copy()

    def objective():
        return loss.value(model.forward(x), y)

    assert rel_error(analytic, numeric_grad(objective, model.param_buffer)) < TOL
    assert rel_error(dx, numeric_grad(objective, x)) < TOL
    # the named views agree with the flat buffer
    for spec in model.param_specs:
        np.testing.assert_array_equal(
            model.named_grads()[spec.name].ravel(), analytic[spec.offset : spec.offset + spec.size]
        )


@pytest.mark.parametrize("loss_cls", [SoftmaxCrossEntropy, MeanSquaredError])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_empty_batch(loss_cls, dtype):
    rng = np.random.default_rng(8)
    model = Sequential(
        [Dense(8), Tanh(), Dense(7), ReLU(), Dense(6), Sigmoid(), Dense(3, init="xavier")], 5, dtype=dtype
    )
    model.init_params(rng)
    x = np.zeros((0, 5), dtype=dtype)
    y = np.zeros(0, dtype=np.int64) if loss_cls is SoftmaxCrossEntropy else np.zeros((0, 3), dtype=dtype)
    model.grad_buffer[...] = 7.0  # stale values from a previous step must be overwritten

    z = model.forward(x)
    assert z.shape == (0, 3)
    value, dz = loss_cls().value_and_grad(z, y)
    assert value == 0.0
    assert loss_cls().value(z, y) == 0.0
    assert dz.shape == (0, 3)
    dx = model.backward(dz)
    assert dx.shape == (0, 5)
    assert np.all(model.grad_buffer == 0)


def test_sigmoid_is_finite_for_large_inputs():
    layer = Sigmoid()
    Sequential([layer], 5, dtype=np.float64)
    x = np.array([[-1000.0, 1000.0, 0.0, -40.0, 40.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = layer.forward(x)
        dx = layer.backward(np.ones_like(x))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert y[0, 0] == 0.0 and y[0, 1] == 1.0 and y[0, 2] == 0.5
    assert np.all((y >= 0) & (y <= 1))
    np.testing.assert_allclose(y[0, 3] + y[0, 4], 1.0, rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_is_finite_for_large_logits(dtype):
    z = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 1e4], [1e4, 1e4, 1e4]], dtype=dtype)
    y = np.array([0, 2, 1])
    loss = SoftmaxCrossEntropy()
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value, dz = loss.value_and_grad(z, y)
    assert np.isfinite(value) and np.all(np.isfinite(dz))
    assert value == pytest.approx(np.log(2) + np.log(3), rel=1e-6)
    np.testing.assert_allclose(dz.sum(axis=1), 0.0, atol=1e-6)
    z_neg = -z
    assert np.isfinite(loss.value(z_neg, y))


# ---------------------------------------------------------------------------------------------
# Flat buffers and initialisation


def test_params_and_grads_are_views_of_the_flat_buffers():
    rng = np.random.default_rng(9)
    model = _mlp(rng)
    dense_layers = [layer for layer in model.layers if isinstance(layer, Dense)]
    assert model.n_params == 5 * 8 + 8 + 8 * 7 + 7 + 7 * 3 + 3
    for layer in dense_layers:
        for key in ("weight", "bias"):
            assert np.shares_memory(layer.params[key], model.param_buffer)
            assert np.shares_memory(layer.grads[key], model.grad_buffer)

    # writing the flat buffer is seen by the layers and vice versa
    model.param_buffer[0] = 123.0
    assert dense_layers[0].params["weight"][0, 0] == 123.0
    dense_layers[-1].params["bias"][-1] = -5.0
    assert model.param_buffer[-1] == -5.0

    x = rng.standard_normal((4, 5))
    y = rng.integers(0, 3, size=4)
    _, dz = SoftmaxCrossEntropy().value_and_grad(model.forward(x), y)
    model.backward(dz)
    assert np.any(model.grad_buffer != 0)
    for layer in dense_layers:
        for key in ("weight", "bias"):
            assert np.shares_memory(layer.grads[key], model.grad_buffer)
            assert np.shares_memory(layer.params[key], model.param_buffer)
    for spec in model.param_specs:
        layer = model.layers[spec.layer_index]
        np.testing.assert_array_equal(
            layer.grads[spec.key].ravel(), model.grad_buffer[spec.offset : spec.offset + spec.size]
        )
        np.testing.assert_array_equal(
            layer.params[spec.key].ravel(), model.param_buffer[spec.offset : spec.offset + spec.size]
        )


@pytest.mark.parametrize("init, expected_std", [("he", np.sqrt(2 / 400)), ("xavier", np.sqrt(2 / 800))])
def test_init_std_and_zero_bias(init, expected_std):
    layer = Dense(400, init=init)
    model = Sequential([layer], 400, dtype=np.float64)
    model.param_buffer[...] = 1.0  # init must overwrite everything, biases included
    model.init_params(np.random.default_rng(10))
    w = layer.params["weight"]
    assert abs(w.std() - expected_std) < 0.1 * expected_std
    assert abs(w.mean()) < 0.1 * expected_std
    assert np.all(layer.params["bias"] == 0)


def test_init_is_reproducible_from_the_seed():
    def build(seed):
        model = Sequential([Dense(30), ReLU(), Dense(20, init="xavier"), Tanh(), Dense(4)], 10)
        model.init_params(np.random.default_rng(seed))
        return model.param_buffer.copy()

    a, b, c = build(42), build(42), build(43)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32
