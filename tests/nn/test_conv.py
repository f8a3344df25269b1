"""Image layers (Conv2D, MaxPool2D, AvgPool2D, Flatten) checked against central finite differences
(float64) and against naive loop implementations, plus empty batches, float32 and shape errors."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain.nn import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy

from gradcheck import (  # noqa: E402
    TOL,
    check_gradients,
    check_parameter_gradients_without_input_grad,
    model_with_random_biases,
    numeric_grad,
    rel_error,
)


def naive_conv(x, w, b, stride, padding):
    """Direct definition: y[n, f, i, j] = sum(xpad[n, :, i*sh : i*sh+kh, j*sw : j*sw+kw] * w[f]) + b[f]."""
    (sh, sw), (ph, pw) = stride, padding
    N, _, H, W = x.shape
    F, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    y = np.empty((N, F, Ho, Wo))
    for n in range(N):
        for f in range(F):
            for i in range(Ho):
                for j in range(Wo):
                    y[n, f, i, j] = np.sum(xp[n, :, i * sh:i * sh + kh, j * sw:j * sw + kw] * w[f]) + b[f]
    return y


def naive_pool(x, pool, stride, reduce):
    (ph, pw), (sh, sw) = pool, stride
    N, C, H, W = x.shape
    Ho, Wo = (H - ph) // sh + 1, (W - pw) // sw + 1
    y = np.empty((N, C, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            y[:, :, i, j] = reduce(x[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw], axis=(2, 3))
    return y


def conv_model(rng, in_shape, dtype=np.float64, **kwargs):
    return model_with_random_biases(Conv2D(**kwargs), in_shape, rng, dtype)


# (filters, kernel, stride, padding, sample shape (C, H, W))
CONV_CASES = [
    pytest.param(3, 3, 1, 0, (2, 5, 5), id="3x3"),
    pytest.param(3, 3, 1, 1, (2, 4, 5), id="3x3-same-nonsquare-image"),
    pytest.param(2, 3, 2, 1, (2, 5, 6), id="stride2-pad1"),
    pytest.param(2, (2, 3), 1, (1, 0), (1, 4, 5), id="nonsquare-kernel"),
    pytest.param(2, (3, 2), (2, 1), (0, 2), (3, 6, 3), id="pairs-everywhere"),
    pytest.param(3, 1, 1, 0, (2, 3, 3), id="1x1"),
    pytest.param(2, 2, 3, 1, (2, 5, 5), id="stride-gt-kernel"),
    pytest.param(2, 1, 1, 1, (2, 3, 4), id="padding-gt-kernel-minus-1"),
]


@pytest.mark.parametrize("filters, kernel, stride, padding, in_shape", CONV_CASES)
def test_conv_forward_matches_naive_loops(filters, kernel, stride, padding, in_shape):
    rng = np.random.default_rng(1)
    layer, model = conv_model(rng, in_shape, filters=filters, kernel=kernel, stride=stride, padding=padding)
    x = rng.standard_normal((3, *in_shape))
    y = model.forward(x)
    expected = naive_conv(x, layer.params["weight"], layer.params["bias"], layer.stride, layer.padding)
    assert y.shape == (3, *model.out_shape) == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("filters, kernel, stride, padding, in_shape", CONV_CASES)
def test_conv_gradients(filters, kernel, stride, padding, in_shape):
    rng = np.random.default_rng(2)
    _, model = conv_model(rng, in_shape, filters=filters, kernel=kernel, stride=stride, padding=padding)
    x = rng.standard_normal((2, *in_shape))
    r = rng.standard_normal((2, *model.out_shape))
    check_gradients(model, x, r)


def test_conv_without_input_grad_gives_the_same_parameter_gradients():
    rng = np.random.default_rng(3)
    _, model = conv_model(rng, (2, 5, 4), filters=3, kernel=3, stride=2, padding=1)
    x = rng.standard_normal((4, 2, 5, 4))
    r = rng.standard_normal((4, *model.out_shape))
    check_parameter_gradients_without_input_grad(model, x, r)


def test_conv_reuses_its_workspaces():
    rng = np.random.default_rng(4)
    _, model = conv_model(rng, (1, 4, 4), filters=2, kernel=3, padding=1)
    x = rng.standard_normal((3, 1, 4, 4))
    r = rng.standard_normal((3, 2, 4, 4))
    y1, dx1 = model.forward(x), model.backward(r)
    y2, dx2 = model.forward(x), model.backward(r)
    assert y1.ctypes.data == y2.ctypes.data and dx1.ctypes.data == dx2.ctypes.data
    # a smaller batch reuses the same memory too: one buffer per workspace, not one per batch shape
    y3, dx3 = model.forward(x[:2]), model.backward(r[:2])
    assert y3.ctypes.data == y1.ctypes.data and dx3.ctypes.data == dx1.ctypes.data
    # channels-last in memory, as the layer documents: (N, H, W, C) views are C-contiguous
    assert y3.transpose(0, 2, 3, 1).flags.c_contiguous and dx3.transpose(0, 2, 3, 1).flags.c_contiguous


def naive_conv_dx(dz, w, stride, padding, in_shape):
    """dx of a convolution by its definition: each output's gradient times the weight, added where it read."""
    (sh, sw), (ph, pw), (C, H, W) = stride, padding, in_shape
    N, F, Ho, Wo = dz.shape
    kh, kw = w.shape[2:]
    dxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    for a in range(kh):
        for b in range(kw):
            dxp[:, :, a:a + sh * (Ho - 1) + 1:sh, b:b + sw * (Wo - 1) + 1:sw] += np.einsum("nfij,fc->ncij", dz, w[:, :, a, b])
    return dxp[:, :, ph:ph + H, pw:pw + W]


@pytest.mark.parametrize("filters, kernel, stride, padding, in_shape", CONV_CASES)
def test_conv_dx_matches_its_definition(filters, kernel, stride, padding, in_shape):
    """dx, as a convolution with the flipped kernel (stride 1) or by col2im (else), against the
    definition in float64 to 1e-12."""
    rng = np.random.default_rng(7)
    layer, model = conv_model(rng, in_shape, filters=filters, kernel=kernel, stride=stride, padding=padding)
    x = rng.standard_normal((3, *in_shape))
    dz = rng.standard_normal((3, *model.out_shape))
    model.forward(x)
    expected = naive_conv_dx(dz, layer.params["weight"], layer.stride, layer.padding, in_shape)
    np.testing.assert_allclose(model.backward(dz), expected, rtol=1e-12, atol=1e-12)


def test_the_two_input_gradients_agree():
    """At stride 1 both ways of computing dx exist: they agree in float64 to 1e-12."""
    rng = np.random.default_rng(8)
    layer, model = conv_model(rng, (3, 6, 5), filters=4, kernel=3, stride=1, padding=1)
    x = rng.standard_normal((2, 3, 6, 5))
    dz = np.ascontiguousarray(rng.standard_normal((2, 4, 6, 5)).transpose(0, 2, 3, 1))
    model.forward(x)
    by_convolution, by_col2im = np.empty((2, 6, 5, 3)), np.empty((2, 6, 5, 3))
    layer._input_gradient_as_convolution(dz, by_convolution)
    layer._input_gradient_by_col2im(dz, by_col2im)
    np.testing.assert_allclose(by_convolution, by_col2im, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("filters, kernel, stride, padding, in_shape", CONV_CASES)
def test_conv_in_chunks_equals_the_whole_batch(monkeypatch, filters, kernel, stride, padding, in_shape):
    """A column matrix bigger than COLUMN_BYTES is made in chunks of samples (and again in backward):
    the same output and gradients, in float64 to rounding, and the layer takes any input layout."""
    from dptrain.nn import conv

    rng = np.random.default_rng(6)
    _, model = conv_model(rng, in_shape, filters=filters, kernel=kernel, stride=stride, padding=padding)
    x = rng.standard_normal((5, *in_shape))
    r = rng.standard_normal((5, *model.out_shape))
    y, dx = model.forward(x).copy(), model.backward(r).copy()
    grads = model.grad_buffer.copy()
    monkeypatch.setattr(conv, "COLUMN_BYTES", 1)  # one sample per chunk
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(model.forward(channels_last), y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(model.backward(np.ascontiguousarray(r)), dx, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(model.grad_buffer, grads, rtol=1e-13, atol=1e-13)


# std = sqrt(1 / fan): He uses fan_in / 2 = C*kh*kw / 2, Xavier (fan_in + fan_out) / 2
@pytest.mark.parametrize("init, fan", [("he", 16 * 9 / 2), ("xavier", (16 * 9 + 64 * 9) / 2)])
def test_conv_init_std_and_zero_bias(init, fan):
    layer = Conv2D(64, 3, init=init)
    model = Sequential([layer], (16, 5, 5), dtype=np.float64)
    model.param_buffer[...] = 1.0
    model.init_params(np.random.default_rng(5))
    expected_std = np.sqrt(1.0 / fan)
    w = layer.params["weight"]
    assert w.shape == (64, 16, 3, 3)
    assert abs(w.std() - expected_std) < 0.05 * expected_std
    assert np.all(layer.params["bias"] == 0)


# ---------------------------------------------------------------------------------------------
# Pooling and Flatten

# (pool, stride, sample shape)
POOL_CASES = [
    pytest.param(2, None, (2, 4, 6), id="2x2"),
    pytest.param(2, None, (1, 5, 5), id="remainder-rows-ignored"),
    pytest.param(3, 1, (2, 4, 5), id="overlapping"),
    pytest.param((2, 3), (1, 2), (2, 5, 7), id="nonsquare"),
]


@pytest.mark.parametrize("pool, stride, in_shape", POOL_CASES)
@pytest.mark.parametrize("layer_cls, reduce", [(MaxPool2D, np.max), (AvgPool2D, np.mean)])
def test_pool_forward_and_dx(layer_cls, reduce, pool, stride, in_shape):
    rng = np.random.default_rng(6)
    layer = layer_cls(pool, stride)
    model = Sequential([layer], in_shape, dtype=np.float64)
    x = rng.standard_normal((3, *in_shape))
    r = rng.standard_normal((3, *model.out_shape))
    expected = naive_pool(x, layer.pool, layer.stride, reduce)
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-12, atol=1e-15)
    check_gradients(model, x, r)


def test_maxpool_ties_go_to_the_first_element_only():
    layer = MaxPool2D(2)
    Sequential([layer], (1, 4, 4), dtype=np.float64)
    layer.forward(np.ones((1, 1, 4, 4)))  # every window is one 4-way tie
    dx = layer.backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    expected = np.array([[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]], dtype=np.float64)
    np.testing.assert_array_equal(dx[0, 0], expected)

    # overlapping windows: each picks its first maximum in row-major order, and the picks add up
    layer = MaxPool2D(2, stride=1)
    Sequential([layer], (1, 3, 3), dtype=np.float64)
    x = np.ones((1, 1, 3, 3))
    x[0, 0, 1, 1] = 0.0
    layer.forward(x)
    dx = layer.backward(np.ones((1, 1, 2, 2)))
    # windows at (0, 0), (0, 1), (1, 0) pick their top-left 1; the one at (1, 1) starts at the 0
    # and picks the 1 to its right
    expected = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=np.float64)
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_flatten():
    rng = np.random.default_rng(7)
    layer = Flatten()
    model = Sequential([layer], (2, 3, 4), dtype=np.float64)
    assert model.out_shape == (24,)
    x = rng.standard_normal((5, 2, 3, 4))
    y = model.forward(x)
    assert y.shape == (5, 24) and np.shares_memory(y, x)
    np.testing.assert_array_equal(y, x.reshape(5, 24))
    r = rng.standard_normal((5, 24))
    dx = model.backward(r)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dx, r.reshape(x.shape))
    assert layer.forward(np.zeros((0, 2, 3, 4))).shape == (0, 24)


# ---------------------------------------------------------------------------------------------
# A small CNN, end to end


def small_cnn(rng, dtype=np.float64):
    model = Sequential([Conv2D(3, 3, padding=1), ReLU(), MaxPool2D(2), Flatten(), Dense(4, init="xavier")],
                       (2, 6, 5), dtype=dtype)
    model.init_params(rng)
    for layer in model.layers:
        if "bias" in layer.params:
            layer.params["bias"][...] = 0.1 * rng.standard_normal(layer.params["bias"].shape)
    return model


def test_cnn_end_to_end():
    rng = np.random.default_rng(8)
    model = small_cnn(rng)
    assert model.shapes == [(2, 6, 5), (3, 6, 5), (3, 6, 5), (3, 3, 2), (18,), (4,)]
    x = rng.standard_normal((3, 2, 6, 5))
    y = rng.integers(0, 4, size=3)
    loss = SoftmaxCrossEntropy()
    # keep the check meaningful: no pre-ReLU activation sits at the kink
    assert np.abs(model.layers[0].forward(x)).min() > 1e-4

    _, dz = loss.value_and_grad(model.forward(x), y)
    dx = model.backward(dz).copy()
    analytic = model.grad_buffer.copy()

    def objective():
        return loss.value(model.forward(x), y)

    assert rel_error(analytic, numeric_grad(objective, model.param_buffer)) < TOL
    assert rel_error(dx, numeric_grad(objective, x)) < TOL
    # flat rows are accepted too, as for any Sequential
    np.testing.assert_array_equal(model.forward(x.reshape(3, -1)), model.forward(x))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cnn_empty_batch(dtype):
    model = small_cnn(np.random.default_rng(9), dtype=dtype)
    model.grad_buffer[...] = 7.0  # stale values from a previous step must be overwritten
    z = model.forward(np.zeros((0, 2, 6, 5), dtype=dtype))
    assert z.shape == (0, 4) and z.dtype == dtype
    dx = model.backward(np.zeros((0, 4), dtype=dtype))
    assert dx.shape == (0, 2, 6, 5)
    assert np.all(model.grad_buffer == 0)
    model.grad_buffer[...] = 7.0
    model.forward(np.zeros((0, 60), dtype=dtype))
    assert model.backward(np.zeros((0, 4), dtype=dtype), input_grad=False) is None
    assert np.all(model.grad_buffer == 0)


def test_cnn_float32_agrees_with_float64():
    model64 = small_cnn(np.random.default_rng(10))
    model32 = small_cnn(np.random.default_rng(10), dtype=np.float32)
    model32.param_buffer[...] = model64.param_buffer
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 2, 6, 5))
    dz = rng.standard_normal((4, 4))
    z64, z32 = model64.forward(x), model32.forward(x.astype(np.float32))
    assert z32.dtype == np.float32
    np.testing.assert_allclose(z32, z64, rtol=1e-4, atol=1e-5)
    dx64, dx32 = model64.backward(dz), model32.backward(dz.astype(np.float32))
    assert dx32.dtype == np.float32 and model32.grad_buffer.dtype == np.float32
    np.testing.assert_allclose(dx32, dx64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model32.grad_buffer, model64.grad_buffer, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Shapes, errors and descriptions


@pytest.mark.parametrize("layer, in_shape, match", [
    (Conv2D(4, 3), (16,), r"\(channels, height, width\)"),
    (Conv2D(4, 3), (1, 2, 5), "output would be empty"),
    (Conv2D(4, 5, padding=1), (1, 2, 8), r"padded to 4x10"),
    (Conv2D(4, (1, 3)), (1, 6, 2), "output would be empty"),
    (MaxPool2D(3), (2, 2, 6), "output would be empty"),
    (AvgPool2D(2), (4, 4), r"\(channels, height, width\)"),
])
def test_output_shape_errors(layer, in_shape, match):
    with pytest.raises(ValueError, match=match):
        Sequential([layer], in_shape)


def test_output_shapes():
    assert Conv2D(8, 3, stride=2, padding=1).output_shape((1, 8, 8)) == (8, 4, 4)
    assert Conv2D(8, (3, 1), padding=(1, 0)).output_shape((2, 5, 7)) == (8, 5, 7)
    assert Conv2D(8, 4, stride=3).output_shape((1, 11, 10)) == (8, 3, 3)
    assert MaxPool2D(2).output_shape((5, 7, 9)) == (5, 3, 4)
    assert AvgPool2D((2, 3), stride=1).output_shape((1, 4, 4)) == (1, 3, 2)
    assert Flatten().output_shape((3, 2, 2)) == (12,)


@pytest.mark.parametrize("make", [
    lambda: Conv2D(0, 3), lambda: Conv2D(4, 0), lambda: Conv2D(4, 3, stride=0),
    lambda: Conv2D(4, 3, padding=-1), lambda: Conv2D(4, (3, 3, 3)), lambda: Conv2D(4, 2.5),
    lambda: Conv2D(4, 3, init="uniform"), lambda: MaxPool2D(0), lambda: AvgPool2D(2, stride=(1, 0)),
])
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_describe():
    assert Conv2D(16, 3, padding=1).describe() == "Conv2D(16, kernel=3, stride=1, padding=1)"
    assert Conv2D(4, (3, 1), stride=2, init="xavier").describe() == \
        "Conv2D(4, kernel=(3, 1), stride=2, padding=0, init=xavier)"
    assert MaxPool2D(2).describe() == "MaxPool2D(2, stride=2)"
    assert AvgPool2D((2, 3), stride=1).describe() == "AvgPool2D((2, 3), stride=1)"
    assert Flatten().describe() == "Flatten"
