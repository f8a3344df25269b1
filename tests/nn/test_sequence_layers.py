"""Layers and the loss on (batch, time, features): Dense and LayerNorm over the last axis, and the softmax
cross-entropy of sequences, against per-position definitions and central finite differences (float64),
plus empty batches, float32 and shape errors."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain.nn import Dense, LayerNorm, Sequential, SoftmaxCrossEntropy

from gradcheck import TOL, check_gradients, check_parameter_gradients_without_input_grad, numeric_grad, rel_error


def model_of(layers, in_shape, dtype=np.float64, seed=0):
    model = Sequential(layers, in_shape, dtype=dtype)
    model.init_params(np.random.default_rng(seed))
    return model


def with_random_affine(model, rng):
    """Non-trivial biases (and LayerNorm scales): init gives zeros and ones."""
    for layer in model.layers:
        for key, value in layer.params.items():
            if key == "bias":
                value[...] = rng.standard_normal(value.shape)
            elif isinstance(layer, LayerNorm):
                value[...] = rng.uniform(0.5, 1.5, value.shape)
    return model


# ---------------------------------------------------------------------------------------------
# Dense over the last axis


def test_dense_acts_on_each_position():
    rng = np.random.default_rng(1)
    model = with_random_affine(model_of([Dense(3)], (4, 5)), rng)
    layer = model.layers[0]
    assert model.out_shape == (4, 3) and model.state_shapes() == {"layers.0.weight": (5, 3), "layers.0.bias": (3,)}
    x = rng.standard_normal((2, 4, 5))
    y = model.forward(x)
    for t in range(4):  # the definition, one position at a time
        np.testing.assert_allclose(y[:, t], x[:, t] @ layer.params["weight"] + layer.params["bias"], rtol=1e-13)
    check_gradients(model, x, rng.standard_normal((2, 4, 3)))


def test_dense_on_a_non_contiguous_sequence_batch():
    """A transposed view (as after a Conv1D, channels-last) gives what its contiguous copy gives."""
    rng = np.random.default_rng(2)
    model = model_of([Dense(3)], (4, 5))
    x = rng.standard_normal((2, 5, 4)).transpose(0, 2, 1)  # (2, 4, 5), not C-contiguous
    r = rng.standard_normal((2, 4, 3)).transpose(2, 0, 1).copy().transpose(1, 2, 0)
    y, dx = model.forward(x).copy(), model.backward(r).copy()
    grads = model.grad_buffer.copy()
    np.testing.assert_array_equal(model.forward(np.ascontiguousarray(x)), y)
    np.testing.assert_array_equal(model.backward(np.ascontiguousarray(r)), dx)
    np.testing.assert_array_equal(model.grad_buffer, grads)


def test_dense_matmuls_count_every_position():
    model = model_of([Dense(16), Dense(8)], (10, 32))
    assert model.matmuls(4) == [[(40, 32, 16), (32, 40, 16)], [(40, 16, 8), (16, 40, 8), (40, 8, 16)]]


def test_dense_sequence_without_input_grad_gives_the_same_parameter_gradients():
    rng = np.random.default_rng(3)
    model = model_of([Dense(3), Dense(2)], (4, 5))
    x, r = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 2))
    check_parameter_gradients_without_input_grad(model, x, r)


def test_dense_still_refuses_images():
    with pytest.raises(ValueError, match=r"Dense takes flat samples \(features,\) or sequences \(time, features\), "
                                         r"got shape \(1, 8, 8\): add a Flatten layer before it"):
        Sequential([Dense(4)], (1, 8, 8))


# ---------------------------------------------------------------------------------------------
# LayerNorm over the last axis


def layer_norm_rows(x, weight, bias, eps):
    """torch's LayerNorm(D) by its definition: each position over its D features, in float64."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def test_layernorm_last_normalizes_each_position():
    rng = np.random.default_rng(4)
    model = with_random_affine(model_of([LayerNorm(eps=1e-3, over="last")], (3, 4)), rng)
    layer = model.layers[0]
    assert model.state_shapes() == {"layers.0.weight": (4,), "layers.0.bias": (4,)}
    x = 2.0 + 3.0 * rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(model.forward(x), layer_norm_rows(x, layer.params["weight"], layer.params["bias"], 1e-3),
                               rtol=1e-12, atol=1e-12)
    check_gradients(model, x, rng.standard_normal((2, 3, 4)))


def test_layernorm_last_inside_a_model_against_finite_differences():
    rng = np.random.default_rng(5)
    model = with_random_affine(model_of([Dense(4), LayerNorm(over="last"), Dense(3)], (3, 2)), rng)
    check_gradients(model, rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 3, 3)))


def test_layernorm_sample_and_last_agree_on_flat_samples():
    rng = np.random.default_rng(6)
    x, r = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
    results = []
    for over in ("sample", "last"):
        model = with_random_affine(model_of([LayerNorm(over=over)], 6), np.random.default_rng(7))
        results.append((model.forward(x).copy(), model.backward(r).copy(), model.grad_buffer.copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_layernorm_sample_keeps_normalizing_the_whole_sample():
    rng = np.random.default_rng(8)
    model = with_random_affine(model_of([LayerNorm()], (3, 4)), rng)
    assert model.state_shapes() == {"layers.0.weight": (3, 4), "layers.0.bias": (3, 4)}
    x = rng.standard_normal((2, 3, 4))
    layer = model.layers[0]
    expected = layer_norm_rows(x.reshape(2, 12), layer.params["weight"].reshape(12), layer.params["bias"].reshape(12),
                               1e-5).reshape(2, 3, 4)
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-12, atol=1e-12)


def test_layernorm_over_is_checked_and_described():
    with pytest.raises(ValueError, match="LayerNorm: over must be 'sample' or 'last', got 'first'"):
        LayerNorm(over="first")
    assert LayerNorm(over="last").describe() == "LayerNorm(eps=1e-05, over=last)"
    assert LayerNorm().describe() == "LayerNorm(eps=1e-05)"


# ---------------------------------------------------------------------------------------------
# Empty batches and float32, for both layers


def sequence_model(dtype=np.float64):
    rng = np.random.default_rng(9)
    return with_random_affine(model_of([Dense(6), LayerNorm(over="last"), Dense(3)], (5, 4), dtype=dtype), rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_empty_batch(dtype):
    model = sequence_model(dtype)
    model.grad_buffer[...] = 7.0
    z = model.forward(np.zeros((0, 5, 4), dtype=dtype))
    assert z.shape == (0, 5, 3) and z.dtype == dtype
    assert model.backward(np.zeros((0, 5, 3), dtype=dtype)).shape == (0, 5, 4)
    assert np.all(model.grad_buffer == 0)


def test_float32_agrees_with_float64():
    model64, model32 = sequence_model(), sequence_model(np.float32)
    model32.param_buffer[...] = model64.param_buffer
    rng = np.random.default_rng(10)
    x, r = rng.standard_normal((7, 5, 4)), rng.standard_normal((7, 5, 3))
    np.testing.assert_allclose(model32.forward(x.astype(np.float32)), model64.forward(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model32.backward(r.astype(np.float32)), model64.backward(r), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model32.grad_buffer, model64.grad_buffer, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy of sequences


def cross_entropy_by_positions(z, y):
    """The sum over samples of the mean over positions of -log softmax(z[n, t])[y[n, t]], with loops."""
    total = 0.0
    for n in range(z.shape[0]):
        per_position = []
        for t in range(z.shape[1]):
            logits = z[n, t]
            per_position.append(np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[y[n, t]])
        total += np.mean(per_position)
    return total


def test_sequence_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(11)
    z = 2.0 * rng.standard_normal((3, 4, 5))
    y = rng.integers(0, 5, size=(3, 4)).astype(np.int64)
    loss = SoftmaxCrossEntropy()
    value, dz = loss.value_and_grad(z, y)
    assert dz.shape == z.shape
    assert value == pytest.approx(cross_entropy_by_positions(z, y), rel=1e-13)
    assert loss.value(z, y) == pytest.approx(value, rel=1e-15)
    assert rel_error(dz, numeric_grad(lambda: loss.value(z, y), z)) < TOL
    # = the flat loss over the batch * T rows, divided by T
    flat_value, flat_dz = SoftmaxCrossEntropy().value_and_grad(z.reshape(12, 5), y.reshape(12))
    assert value == pytest.approx(flat_value / 4, rel=1e-14)
    np.testing.assert_allclose(dz.reshape(12, 5), flat_dz / 4, rtol=1e-14)


def test_sequence_cross_entropy_global_mean_is_the_mean_over_positions():
    """What the trainer computes (the sum over the batch / samples) is the mean over every position."""
    rng = np.random.default_rng(12)
    z, y = rng.standard_normal((6, 3, 4)), rng.integers(0, 4, size=(6, 3))
    shards = [SoftmaxCrossEntropy().value(z[a:b], y[a:b]) for a, b in ((0, 2), (2, 2), (2, 6))]
    positions = -np.log(np.exp(z) / np.exp(z).sum(axis=2, keepdims=True))[np.arange(6)[:, None], np.arange(3), y]
    assert sum(shards) / 6 == pytest.approx(positions.mean(), rel=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sequence_cross_entropy_empty_batch_and_float32(dtype):
    loss = SoftmaxCrossEntropy()
    value, dz = loss.value_and_grad(np.zeros((0, 4, 5), dtype=dtype), np.zeros((0, 4), dtype=np.int64))
    assert value == 0.0 and dz.shape == (0, 4, 5) and dz.dtype == dtype
    rng = np.random.default_rng(13)
    z, y = rng.standard_normal((2, 3, 5)), rng.integers(0, 5, size=(2, 3))
    value64, dz64 = SoftmaxCrossEntropy().value_and_grad(z, y)
    value32, dz32 = loss.value_and_grad(z.astype(dtype), y)
    assert value32 == pytest.approx(value64, rel=1e-6)
    np.testing.assert_allclose(dz32, dz64, rtol=1e-5, atol=1e-7)


def test_sequence_cross_entropy_refuses_mismatched_labels():
    loss = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"or \(batch, T, C\) with labels \(batch, T\); got logits \(2, 3, 4\) and "
                                         r"labels \(2,\)"):
        loss.value_and_grad(np.zeros((2, 3, 4)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="got logits"):
        loss.value(np.zeros((2, 3, 4)), np.zeros((3, 2), dtype=np.int64))
