"""Sequence layers on (batch, C, L): Conv1D, MaxPool1D and AvgPool1D, thin wrappers over the 2-D layers,
checked against direct loop definitions and central finite differences (float64), plus empty batches,
float32, the weight layout and shape errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptrain.nn import AvgPool1D, Conv1D, Conv2D, Dense, GlobalAvgPool, MaxPool1D, ReLU, Sequential

from gradcheck import check_gradients, check_parameter_gradients_without_input_grad, model_with_random_biases


def naive_conv1d(x, w, b, stride, padding):
    """y[n, f, i] = sum(xpad[n, :, i*s : i*s+k] * w[f]) + b[f], by its definition."""
    N, _, L = x.shape
    F, _, k = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding)))
    Lo = (L + 2 * padding - k) // stride + 1
    y = np.empty((N, F, Lo))
    for n in range(N):
        for f in range(F):
            for i in range(Lo):
                y[n, f, i] = np.sum(xp[n, :, i * stride:i * stride + k] * w[f]) + b[f]
    return y


def naive_pool1d(x, pool, stride, reduce):
    Lo = (x.shape[2] - pool) // stride + 1
    return np.stack([reduce(x[:, :, i * stride:i * stride + pool], axis=2) for i in range(Lo)], axis=2)


def conv1d_model(rng, in_shape, dtype=np.float64, **kwargs):
    return model_with_random_biases(Conv1D(**kwargs), in_shape, rng, dtype)


# (filters, kernel, stride, padding, sample shape (C, L))
CONV1D_CASES = [
    pytest.param(3, 3, 1, 0, (2, 6), id="k3"),
    pytest.param(2, 3, 1, 1, (2, 5), id="k3-same"),
    pytest.param(2, 3, 2, 1, (3, 7), id="stride2-pad1"),
    pytest.param(2, 1, 1, 0, (2, 4), id="k1"),
    pytest.param(2, 2, 3, 2, (1, 5), id="stride-gt-kernel-pad-gt-k-minus-1"),
]


@pytest.mark.parametrize("filters, kernel, stride, padding, in_shape", CONV1D_CASES)
def test_conv1d_forward_matches_the_loop_definition(filters, kernel, stride, padding, in_shape):
    rng = np.random.default_rng(1)
    layer, model = conv1d_model(rng, in_shape, filters=filters, kernel=kernel, stride=stride, padding=padding)
    x = rng.standard_normal((3, *in_shape))
    y = model.forward(x)
    expected = naive_conv1d(x, layer.params["weight"], layer.params["bias"], stride, padding)
    assert y.shape == (3, *model.out_shape) == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("filters, kernel, stride, padding, in_shape", CONV1D_CASES)
def test_conv1d_gradients(filters, kernel, stride, padding, in_shape):
    rng = np.random.default_rng(2)
    _, model = conv1d_model(rng, in_shape, filters=filters, kernel=kernel, stride=stride, padding=padding)
    check_gradients(model, rng.standard_normal((2, *in_shape)), rng.standard_normal((2, *model.out_shape)))


def test_conv1d_weight_is_torch_layout_and_shared_with_the_wrapped_conv2d():
    rng = np.random.default_rng(3)
    layer, model = conv1d_model(rng, (3, 8), filters=4, kernel=5, padding=2)
    assert model.state_shapes() == {"layers.0.weight": (4, 3, 5), "layers.0.bias": (4,)}
    assert layer.conv.params["weight"].shape == (4, 3, 1, 5)
    assert np.shares_memory(layer.conv.params["weight"], model.param_buffer)
    assert np.shares_memory(layer.conv.grads["weight"], model.grad_buffer)
    # He init with fan_in = C * kernel, drawn as Conv2D draws it
    expected = np.random.default_rng(3).standard_normal((4, 3, 5)) * math.sqrt(2.0 / 15)
    np.testing.assert_array_equal(layer.params["weight"], expected)
    # the products of the wrapped Conv2D, for dptrain bench
    assert model.matmuls(6) == [Conv2D(4, (1, 5), padding=(0, 2)).matmuls((3, 1, 8), 6, input_grad=False)]
    assert layer.matmuls((3, 8), 6) == [(48, 15, 4), (4, 48, 15), (48, 20, 3)]


def test_conv1d_without_input_grad_gives_the_same_parameter_gradients():
    rng = np.random.default_rng(4)
    _, model = conv1d_model(rng, (2, 9), filters=3, kernel=3, stride=2, padding=1)
    x, r = rng.standard_normal((4, 2, 9)), rng.standard_normal((4, 3, 5))
    check_parameter_gradients_without_input_grad(model, x, r)


POOL1D_CASES = [
    pytest.param(2, None, (2, 6), id="tiled"),
    pytest.param(2, None, (2, 7), id="remainder-ignored"),
    pytest.param(3, 1, (1, 6), id="overlapping"),
    pytest.param(2, 3, (2, 8), id="stride-gt-pool"),
]


@pytest.mark.parametrize("pool, stride, in_shape", POOL1D_CASES)
@pytest.mark.parametrize("layer_cls, reduce", [(MaxPool1D, np.max), (AvgPool1D, np.mean)])
def test_pool1d_matches_the_loop_definition_and_its_gradient(layer_cls, reduce, pool, stride, in_shape):
    rng = np.random.default_rng(5)
    layer = layer_cls(pool, stride)
    model = Sequential([layer], in_shape, dtype=np.float64)
    x = rng.standard_normal((3, *in_shape))
    expected = naive_pool1d(x, pool, layer.stride, reduce)
    assert model.out_shape == expected.shape[1:]
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-12, atol=1e-15)
    check_gradients(model, x, rng.standard_normal((3, *model.out_shape)))


def test_maxpool1d_ties_go_to_the_first_element():
    layer = MaxPool1D(2)
    Sequential([layer], (1, 4), dtype=np.float64)
    layer.forward(np.ones((1, 1, 4)))
    np.testing.assert_array_equal(layer.backward(np.array([[[1.0, 2.0]]])), [[[1.0, 0.0, 2.0, 0.0]]])


def small_sequence_cnn(rng, dtype=np.float64):
    model = Sequential([Conv1D(3, 3, padding=1), ReLU(), MaxPool1D(2), Conv1D(4, 2, stride=2), AvgPool1D(2, stride=1),
                        GlobalAvgPool(), Dense(2)], (2, 12), dtype=dtype)
    model.init_params(rng)
    for layer in model.layers:
        if "bias" in layer.params:
            layer.params["bias"][...] = 0.1 * rng.standard_normal(layer.params["bias"].shape)
    return model


def test_a_sequence_cnn_end_to_end():
    rng = np.random.default_rng(6)
    model = small_sequence_cnn(rng)
    assert model.shapes == [(2, 12), (3, 12), (3, 12), (3, 6), (4, 3), (4, 2), (4,), (2,)]
    x = rng.standard_normal((2, 2, 12))
    assert np.abs(model.layers[0].forward(x)).min() > 1e-4  # no pre-ReLU value at the kink
    check_gradients(model, x, rng.standard_normal((2, 2)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_empty_batch(dtype):
    model = small_sequence_cnn(np.random.default_rng(7), dtype=dtype)
    model.grad_buffer[...] = 7.0  # stale values must be overwritten
    z = model.forward(np.zeros((0, 2, 12), dtype=dtype))
    assert z.shape == (0, 2) and z.dtype == dtype
    assert model.backward(np.zeros((0, 2), dtype=dtype)).shape == (0, 2, 12)
    assert np.all(model.grad_buffer == 0)


def test_float32_agrees_with_float64():
    model64 = small_sequence_cnn(np.random.default_rng(8))
    model32 = small_sequence_cnn(np.random.default_rng(8), dtype=np.float32)
    model32.param_buffer[...] = model64.param_buffer
    x = np.random.default_rng(9).standard_normal((5, 2, 12))
    y64, y32 = model64.forward(x), model32.forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
    r = np.random.default_rng(10).standard_normal((5, 2))
    np.testing.assert_allclose(model32.backward(r.astype(np.float32)), model64.backward(r), rtol=1e-4, atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"Conv1D\(4, kernel=3, stride=1, padding=0\) takes sequences of shape "
                                         r"\(channels, length\), got sample shape \(2, 5, 5\)"):
        Sequential([Conv1D(4, 3)], (2, 5, 5))
    with pytest.raises(ValueError, match=r"the output would be empty: length 2 \(padded to 4\) is shorter than the "
                                         r"window of 5"):
        Sequential([Conv1D(4, 5, padding=1)], (1, 2))
    with pytest.raises(ValueError, match=r"MaxPool1D\(3, stride=3\) takes sequences"):
        Sequential([MaxPool1D(3)], 6)
    with pytest.raises(ValueError, match=r"AvgPool1D\(4, stride=4\): the output would be empty: length 3 is shorter"):
        Sequential([AvgPool1D(4)], (2, 3))
    with pytest.raises(ValueError, match=r"takes a batch of shape \(batch, C, L\)"):
        Conv1D(2, 1).forward(np.zeros((1, 2, 3, 4)))


@pytest.mark.parametrize("make, message", [
    (lambda: Conv1D(4, (3, 3)), "kernel must be an integer"),
    (lambda: Conv1D(4, 2.5), "kernel must be an integer"),
    (lambda: Conv1D(4, 0), "kernel must be >= 1"),
    (lambda: Conv1D(4, 3, padding=-1), "padding must be >= 0"),
    (lambda: Conv1D(4, 3, stride=True), "stride must be an integer"),
    (lambda: Conv1D(0, 3), "Conv1D: filters must be an integer >= 1"),
    (lambda: Conv1D(4, 3, init="uniform"), "unknown init"),
    (lambda: MaxPool1D(0), "pool must be >= 1"),
    (lambda: AvgPool1D(2, stride=(1, 1)), "stride must be an integer"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_describe():
    assert Conv1D(16, 5, padding=2).describe() == "Conv1D(16, kernel=5, stride=1, padding=2)"
    assert Conv1D(4, 3, stride=2, init="xavier", bias=False).describe() == \
        "Conv1D(4, kernel=3, stride=2, padding=0, init=xavier, bias=False)"
    assert MaxPool1D(2).describe() == "MaxPool1D(2, stride=2)"
    assert AvgPool1D(3, stride=1).describe() == "AvgPool1D(3, stride=1)"
