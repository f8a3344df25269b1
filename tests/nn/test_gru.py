"""GRU: finite differences (float64) for dx and every parameter, both directions and both outputs, inside a
model before a Dense and stacked; the equations by a plain loop; float32 close to float64; empty batch; shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptrain.nn import GRU, Dense, Residual, Sequential

from gradcheck import check_gradients, check_parameter_gradients_without_input_grad

B, T, D, H = 2, 4, 3, 3
KINDS = [(False, "sequence"), (False, "last"), (True, "sequence"), (True, "last")]
IDS = ["sequence", "last", "bidirectional-sequence", "bidirectional-last"]


def model_of(layers, in_shape, seed=0, dtype=np.float64):
    model = Sequential(layers, in_shape, dtype=dtype)
    model.init_params(np.random.default_rng(seed))
    return model


def reference_states(x, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.GRU's equations, one step at a time: the states (batch, T, H)."""
    hidden = w_hh.shape[1]
    h = np.zeros((len(x), hidden))
    states = []
    for t in range(x.shape[1]):
        gi, gh = x[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        r = 1 / (1 + np.exp(-(gi[:, :hidden] + gh[:, :hidden])))
        z = 1 / (1 + np.exp(-(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])))
        n = np.tanh(gi[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
        h = (1 - z) * n + z * h
        states.append(h)
    return np.stack(states, axis=1)


@pytest.mark.parametrize("bidirectional, output", KINDS, ids=IDS)
def test_gradients(bidirectional, output):
    rng = np.random.default_rng(1)
    model = model_of([GRU(H, bidirectional=bidirectional, output=output)], (T, D))
    y_shape = (B, T, H * (1 + bidirectional)) if output == "sequence" else (B, H * (1 + bidirectional))
    check_gradients(model, rng.standard_normal((B, T, D)), rng.standard_normal(y_shape))


def test_gradients_stacked_inside_a_model_before_a_dense():
    rng = np.random.default_rng(2)
    model = model_of([GRU(2, bidirectional=True), Residual([GRU(4)]), GRU(2, output="last"), Dense(2)], (3, D))
    check_gradients(model, rng.standard_normal((B, 3, D)), rng.standard_normal((B, 2)))


@pytest.mark.parametrize("bidirectional, output", KINDS, ids=IDS)
def test_forward_is_the_plain_loop(bidirectional, output):
    rng = np.random.default_rng(3)
    layer = GRU(H, bidirectional=bidirectional, output=output)
    model = model_of([layer], (5, D))
    x = rng.standard_normal((3, 5, D))
    p = layer.params
    fwd = reference_states(x, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
    parts = [fwd]
    if bidirectional:  # the reversed sequence, its states put back in the positions they read
        parts.append(reference_states(x[:, ::-1], p["weight_ih_reverse"], p["weight_hh_reverse"],
                                      p["bias_ih_reverse"], p["bias_hh_reverse"])[:, ::-1])
    expected = np.concatenate(parts, axis=2)
    if output == "last":  # torch's h_n: the forward state after x_{T-1}, the backward one after x_0
        expected = np.concatenate([fwd[:, -1]] + ([parts[1][:, 0]] if bidirectional else []), axis=1)
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-13, atol=1e-14)


def test_parameters_are_torchs():
    layer = GRU(5, bidirectional=True)
    shapes = layer.param_shapes((7, 4))
    assert shapes == {"weight_ih": (15, 4), "weight_hh": (15, 5), "bias_ih": (15,), "bias_hh": (15,),
                      "weight_ih_reverse": (15, 4), "weight_hh_reverse": (15, 5), "bias_ih_reverse": (15,),
                      "bias_hh_reverse": (15,)}
    model = model_of([layer], (7, 4), seed=4)
    values = model.param_buffer
    bound = 1 / math.sqrt(5)
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound  # uniform(-1/sqrt(H), 1/sqrt(H))
    np.testing.assert_array_equal(model_of([GRU(5, bidirectional=True)], (7, 4), seed=4).param_buffer, values)
    assert layer.describe() == "GRU(5, bidirectional, output=sequence)"
    assert GRU(64, output="last").describe() == "GRU(64, output=last)"


def test_without_input_gradient_the_parameter_gradients_are_the_same():
    rng = np.random.default_rng(5)
    model = model_of([GRU(H, bidirectional=True, output="last"), Dense(2)], (T, D))
    x, r = rng.standard_normal((B, T, D)), rng.standard_normal((B, 2))
    check_parameter_gradients_without_input_grad(model, x, r)


def test_float32_is_close_to_float64():
    rng = np.random.default_rng(6)
    m64 = model_of([GRU(H, bidirectional=True)], (T, D))
    m32 = Sequential([GRU(H, bidirectional=True)], (T, D), dtype=np.float32)
    m32.param_buffer[...] = m64.param_buffer
    x, r = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, 2 * H))
    np.testing.assert_allclose(m32.forward(x.astype(np.float32)), m64.forward(x), rtol=1e-5, atol=1e-6)
    dx32, dx64 = m32.backward(r.astype(np.float32)), m64.backward(r)
    assert dx32.dtype == np.float32
    np.testing.assert_allclose(dx32, dx64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m32.grad_buffer, m64.grad_buffer, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(m32.forward(1e4 * x.astype(np.float32))))  # saturated gates, nothing overflows


@pytest.mark.parametrize("bidirectional, output", KINDS, ids=IDS)
def test_empty_batch(bidirectional, output):
    rng = np.random.default_rng(7)
    model = model_of([GRU(H, bidirectional=bidirectional, output=output)], (T, D))
    x = rng.standard_normal((3, T, D))
    y3 = model.forward(x).copy()
    y = model.forward(np.zeros((0, T, D)))
    assert y.shape == (0, *model.out_shape)
    dx = model.backward(np.zeros(y.shape))
    assert dx.shape == (0, T, D) and not model.grad_buffer.any()
    np.testing.assert_allclose(model.forward(x[1:]), y3[1:], rtol=1e-13, atol=1e-14)


def test_shapes_and_arguments_are_checked():
    for shape in (6, (2, 3, 4)):
        with pytest.raises(ValueError, match=r"GRU takes sequence samples of shape \(T, D\)"):
            Sequential([GRU(2)], shape)
    with pytest.raises(ValueError, match="hidden must be an integer >= 1"):
        GRU(0)
    with pytest.raises(ValueError, match="output must be 'sequence' or 'last'"):
        GRU(2, output="all")
    model = model_of([GRU(2)], (T, D))
    assert model.out_shape == (T, 2) and model_of([GRU(2, True, "last")], (T, D)).out_shape == (4,)
    with pytest.raises(ValueError, match=r"GRU built for samples \(T, 3\)"):
        model.layers[0].forward(np.zeros((2, T, 5)))


def test_matmuls():
    products = GRU(4, bidirectional=True).matmuls((3, 5), 2)
    per_direction = [(6, 5, 12)] + [(2, 4, 12)] * 3 + [(2, 12, 4)] * 3 + [(12, 6, 4), (12, 6, 5), (6, 12, 5)]
    assert products == per_direction * 2
    assert len(GRU(4).matmuls((3, 5), 2, input_grad=False)) == len(per_direction) - 1
