"""MultiHeadSelfAttention: finite differences (float64) for dx and every parameter, causal and not, inside a
residual block; a plain softmax reference; causality exact; float32 close to float64; empty batch; shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptrain.nn import MultiHeadSelfAttention, Residual, Sequential

from gradcheck import check_gradients, check_parameter_gradients_without_input_grad

B, T, D, HEADS = 2, 4, 6, 2


def model_of(layers, in_shape, seed=0, dtype=np.float64):
    model = Sequential(layers, in_shape, dtype=dtype)
    model.init_params(np.random.default_rng(seed))
    return model


def with_random_biases(model, seed=1):
    """Biases start at zero: give them values, so that their gradients are checked where they matter."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_params().items():
        if name.endswith("bias"):
            p[...] = 0.3 * rng.standard_normal(p.shape)
    return model


def reference(x, params, heads, causal):
    """The plain formula, one head and one sample at a time: softmax(Q K^T / sqrt(dh)) V, projected."""
    b, t, d = x.shape
    dh = d // heads
    qkv = x @ params["qkv_weight"] + params["qkv_bias"]
    o = np.zeros((b, t, d))
    for n in range(b):
        for h in range(heads):
            q, k, v = (qkv[n, :, j * d + h * dh:j * d + (h + 1) * dh] for j in range(3))
            s = q @ k.T / math.sqrt(dh)
            if causal:
                s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            w = np.exp(s - s.max(axis=1, keepdims=True))
            o[n, :, h * dh:(h + 1) * dh] = (w / w.sum(axis=1, keepdims=True)) @ v
    return o @ params["proj_weight"] + params["proj_bias"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradients(causal):
    rng = np.random.default_rng(2)
    model = with_random_biases(model_of([MultiHeadSelfAttention(HEADS, causal=causal, init=0.5)], (T, D)))
    check_gradients(model, rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D)))


def test_gradients_without_biases_inside_a_residual_block_before_another_attention():
    rng = np.random.default_rng(3)
    model = model_of([Residual([MultiHeadSelfAttention(3, causal=True, init=0.5, bias=False)]),
                      MultiHeadSelfAttention(1, init=0.5)], (3, D))
    with_random_biases(model)
    assert list(model.named_params()) == ["layers.0.body.0.qkv_weight", "layers.0.body.0.proj_weight",
                                                 "layers.1.qkv_weight", "layers.1.qkv_bias", "layers.1.proj_weight",
                                                 "layers.1.proj_bias"]
    check_gradients(model, rng.standard_normal((2, 3, D)), rng.standard_normal((2, 3, D)))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_is_the_plain_formula(causal):
    rng = np.random.default_rng(4)
    layer = MultiHeadSelfAttention(HEADS, causal=causal, init=0.5)
    model = with_random_biases(model_of([layer], (5, D)))
    x = rng.standard_normal((3, 5, D))
    np.testing.assert_allclose(model.forward(x), reference(x, layer.params, HEADS, causal), rtol=1e-12, atol=1e-12)


def test_without_input_gradient_the_parameter_gradients_are_the_same():
    rng = np.random.default_rng(5)
    model = with_random_biases(model_of([MultiHeadSelfAttention(HEADS, causal=True)], (T, D)))
    x, r = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    check_parameter_gradients_without_input_grad(model, x, r)


def test_causal_output_does_not_depend_on_later_positions():
    rng = np.random.default_rng(6)
    model = with_random_biases(model_of([MultiHeadSelfAttention(HEADS, causal=True, init=0.5)], (6, D)))
    x = rng.standard_normal((3, 6, D))
    y = model.forward(x).copy()
    for t in range(6):
        x2 = x.copy()
        x2[:, t:] += 10 * rng.standard_normal((3, 6 - t, D))
        y2 = model.forward(x2)
        np.testing.assert_array_equal(y2[:, :t], y[:, :t])  # exactly: the masked weights are exactly zero
        assert np.all(y2[:, t] != y[:, t])


def test_float32_is_close_to_float64_and_stable_at_huge_scores():
    rng = np.random.default_rng(7)
    m64 = with_random_biases(model_of([MultiHeadSelfAttention(HEADS, causal=True)], (T, D)))
    m32 = Sequential([MultiHeadSelfAttention(HEADS, causal=True)], (T, D), dtype=np.float32)
    m32.param_buffer[...] = m64.param_buffer
    x, r = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    np.testing.assert_allclose(m32.forward(x.astype(np.float32)), m64.forward(x), rtol=1e-4, atol=1e-5)
    dx32 = m32.backward(r.astype(np.float32))
    dx64 = m64.backward(r)
    assert dx32.dtype == np.float32
    np.testing.assert_allclose(dx32, dx64, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(m32.grad_buffer, m64.grad_buffer, rtol=1e-3, atol=1e-4)
    # scores of order 1e6: exp would overflow without the max subtracted, and the softmax saturates
    y = m32.forward(1e3 * x.astype(np.float32))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(m32.backward(r.astype(np.float32))))


def test_empty_batch_and_a_smaller_batch_after_a_bigger_one():
    rng = np.random.default_rng(8)
    model = with_random_biases(model_of([MultiHeadSelfAttention(HEADS, causal=True)], (T, D)))
    x, r = rng.standard_normal((3, T, D)), rng.standard_normal((3, T, D))
    y3 = model.forward(x).copy()
    model.backward(r)
    grads3 = model.grad_buffer.copy()
    held = model.layers[0].workspace_nbytes()
    y = model.forward(np.zeros((0, T, D)))
    assert y.shape == (0, T, D)
    dx = model.backward(np.zeros((0, T, D)))
    assert dx.shape == (0, T, D) and not model.grad_buffer.any()
    np.testing.assert_allclose(model.forward(x[:1]), y3[:1], rtol=1e-13, atol=1e-14)  # the batch's samples are independent
    model.backward(r[:1])
    model.forward(x)
    model.backward(r)
    np.testing.assert_allclose(model.grad_buffer, grads3, rtol=1e-13, atol=1e-14)
    assert model.layers[0].workspace_nbytes() == held  # nothing new allocated


def test_shapes_and_arguments_are_checked():
    with pytest.raises(ValueError, match=r"4 heads do not divide the 6 features"):
        Sequential([MultiHeadSelfAttention(4)], (T, D))
    for shape in (6, (2, 3, 4)):
        with pytest.raises(ValueError, match=r"takes sequence samples of shape \(T, D\)"):
            Sequential([MultiHeadSelfAttention(2)], shape)
    with pytest.raises(ValueError, match="heads must be an integer >= 1"):
        MultiHeadSelfAttention(0)
    for init in ("normal", -0.02, 0, True, float("nan")):
        with pytest.raises(ValueError, match="init"):
            MultiHeadSelfAttention(2, init=init)
    model = model_of([MultiHeadSelfAttention(2)], (T, D))
    with pytest.raises(ValueError, match=r"built for samples \(T, 6\)"):
        model.layers[0].forward(np.zeros((2, T, 4)))


def test_init_describe_and_matmuls():
    default = model_of([MultiHeadSelfAttention(4)], (8, 64), seed=1)
    gpt = model_of([MultiHeadSelfAttention(4, causal=True, init=0.02, bias=False)], (8, 64), seed=1)
    w = default.layers[0].params
    assert abs(w["qkv_weight"].std() - math.sqrt(2 / (64 + 192))) < 0.005  # Xavier over the (D, 3D) matrix
    assert abs(w["proj_weight"].std() - math.sqrt(2 / 128)) < 0.01
    assert not w["qkv_bias"].any() and not w["proj_bias"].any()
    assert abs(gpt.layers[0].params["qkv_weight"].std() - 0.02) < 0.001
    again = model_of([MultiHeadSelfAttention(4)], (8, 64), seed=1)
    np.testing.assert_array_equal(again.param_buffer, default.param_buffer)  # the generator alone decides
    assert default.layers[0].describe() == "MultiHeadSelfAttention(heads=4)"
    assert gpt.layers[0].describe() == "MultiHeadSelfAttention(heads=4, causal, init=0.02, bias=False)"
    products = MultiHeadSelfAttention(4).matmuls((8, 64), 3)
    n, m = 3 * 8, 3 * 4 * 8
    assert products[:4] == [(n, 64, 192), (m, 16, 8), (m, 8, 16), (n, 64, 64)]  # the forward pass
    assert len(products) == 12 and len(MultiHeadSelfAttention(4).matmuls((8, 64), 3, input_grad=False)) == 11
    # the flops of the products, as the layer makes them
    flops = sum(a * b * c for a, b, c in products)
    per_head = 3 * 4 * (8 * 8 * 16)
    assert flops == 3 * n * 64 * 192 + 3 * n * 64 * 64 + 6 * per_head
