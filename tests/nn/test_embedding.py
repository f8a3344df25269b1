"""Embedding and PositionEmbedding: the lookup against indexing, the weight gradient against central
finite differences and np.add.at (float64), token ids given as floats, bad ids, an unset vocab, empty
batches and float32."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dptrain.nn import Dense, Embedding, LayerNorm, PositionEmbedding, Sequential, SoftmaxCrossEntropy, Tanh

from gradcheck import TOL, check_gradients, numeric_grad, rel_error


def model_of(layers, in_shape, dtype=np.float64, seed=0):
    model = Sequential(layers, in_shape, dtype=dtype)
    model.init_params(np.random.default_rng(seed))
    return model


@pytest.mark.parametrize("id_dtype", [np.int64, np.int32, np.float64, np.float32])
def test_lookup_is_indexing(id_dtype):
    rng = np.random.default_rng(1)
    layer = Embedding(4, vocab=9)
    model = model_of([layer], (5,))
    ids = rng.integers(0, 9, size=(3, 5))
    y = model.forward(ids.astype(id_dtype))
    assert y.shape == (3, 5, 4) and model.out_shape == (5, 4)
    np.testing.assert_array_equal(y, layer.params["weight"][ids])


def test_weight_gradient_against_finite_differences_and_add_at():
    """Ids repeat (vocab 4 for 12 positions) and one id is never used: its gradient row is zero."""
    rng = np.random.default_rng(2)
    layer = Embedding(3, vocab=5)
    model = model_of([layer], (4,))
    ids = np.array([[0, 1, 1, 3], [3, 3, 0, 2], [1, 0, 3, 3]])
    x = ids.astype(np.float64)  # as the data pipeline gives them
    r = rng.standard_normal((3, 4, 3))
    model.forward(x)
    assert model.backward(r, input_grad=False) is None
    analytic = model.grad_buffer.copy()
    numeric = numeric_grad(lambda: np.sum(model.forward(x) * r), model.param_buffer)
    assert rel_error(analytic, numeric) < TOL
    expected = np.zeros((5, 3))
    np.add.at(expected, ids.reshape(-1), r.reshape(-1, 3))
    np.testing.assert_allclose(layer.grads["weight"], expected, rtol=1e-12, atol=1e-14)
    assert np.all(layer.grads["weight"][4] == 0)


def test_dx_is_zeros_of_the_ids_shape():
    """The ids are not differentiable: dx is zeros (so a model's input gradient is defined)."""
    model = model_of([Embedding(3, vocab=5), Dense(2)], (4,))
    model.forward(np.array([[0.0, 1.0, 2.0, 4.0]]))
    dx = model.backward(np.ones((1, 4, 2)))
    assert dx.shape == (1, 4) and np.all(dx == 0)


def test_a_small_sequence_model_against_finite_differences():
    """Embedding -> PositionEmbedding -> LayerNorm(last) -> Dense -> Tanh -> Dense, with the sequence
    cross-entropy: every parameter's gradient against central differences of the loss."""
    rng = np.random.default_rng(3)
    model = model_of([Embedding(4, vocab=6, init_std=0.5), PositionEmbedding(init_std=0.5), LayerNorm(over="last"),
                      Dense(5), Tanh(), Dense(6, init="xavier")], (3,))
    x = rng.integers(0, 6, size=(2, 3)).astype(np.float64)
    y = rng.integers(0, 6, size=(2, 3))
    loss = SoftmaxCrossEntropy()
    _, dz = loss.value_and_grad(model.forward(x), y)
    model.backward(dz, input_grad=False)
    analytic = model.grad_buffer.copy()
    numeric = numeric_grad(lambda: loss.value(model.forward(x), y), model.param_buffer)
    assert rel_error(analytic, numeric) < TOL


@pytest.mark.parametrize("bad, shown", [
    (9.0, "9.0"), (-1.0, "-1.0"), (2.5, "2.5"), (np.nan, "nan"), (np.inf, "inf"), (1e30, "1e+30"),
])
def test_bad_float_ids_are_refused_by_value_and_position(bad, shown):
    model = model_of([Embedding(2, vocab=9)], (3,))
    x = np.array([[1.0, 2.0, 3.0], [4.0, bad, 5.0]])
    with pytest.raises(ValueError, match=re.escape(f"token ids must be whole numbers in [0, 9), got {shown} "
                                                   "at position (1, 1)")):
        model.forward(x)
    with pytest.raises(ValueError, match=re.escape(shown)):
        model.forward(x.astype(np.float32))


@pytest.mark.parametrize("bad", [9, -1])
def test_bad_integer_ids_are_refused(bad):
    model = model_of([Embedding(2, vocab=9)], (2,))
    with pytest.raises(ValueError, match=rf"got {bad} at position \(0, 1\)"):
        model.forward(np.array([[0, bad]]))


def test_vocab_may_be_set_later():
    layer = Embedding(8)
    assert layer.output_shape((16,)) == (16, 8)
    with pytest.raises(ValueError, match="Embedding: vocab is not set"):
        Sequential([layer], (16,))
    layer.vocab = 30  # as the model builder does, from the data's class count
    model = model_of([layer], (16,))
    assert model.state_shapes() == {"layers.0.weight": (30, 8)}
    assert layer.describe() == "Embedding(8, vocab=30)"


def test_init_is_normal_with_init_std():
    model = model_of([Embedding(8, vocab=10), PositionEmbedding(init_std=0.1)], (4,), seed=5)
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(model.layers[0].params["weight"], rng.standard_normal((10, 8)) * 0.02)
    np.testing.assert_array_equal(model.layers[1].params["weight"], rng.standard_normal((4, 8)) * 0.1)


def test_position_embedding_gradients():
    rng = np.random.default_rng(6)
    model = model_of([PositionEmbedding(), Dense(3)], (4, 2))
    assert model.state_shapes()["layers.0.weight"] == (4, 2)
    x = rng.standard_normal((3, 4, 2))
    np.testing.assert_array_equal(model.layers[0].forward(x), x + model.layers[0].params["weight"])
    check_gradients(model, x, rng.standard_normal((3, 4, 3)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_empty_batch(dtype):
    model = model_of([Embedding(3, vocab=5), PositionEmbedding(), Dense(2)], (4,), dtype=dtype)
    model.grad_buffer[...] = 7.0
    z = model.forward(np.zeros((0, 4), dtype=dtype))
    assert z.shape == (0, 4, 2) and z.dtype == dtype
    assert model.backward(np.zeros((0, 4, 2), dtype=dtype)).shape == (0, 4)
    assert np.all(model.grad_buffer == 0)
    model.grad_buffer[...] = 7.0
    model.forward(np.zeros((0, 4), dtype=dtype))
    assert model.backward(np.zeros((0, 4, 2), dtype=dtype), input_grad=False) is None
    assert np.all(model.grad_buffer == 0)


def test_float32_agrees_with_float64():
    rng = np.random.default_rng(7)
    layers = lambda: [Embedding(4, vocab=7, init_std=1.0), PositionEmbedding(init_std=1.0), Dense(3)]  # noqa: E731
    model64 = model_of(layers(), (5,))
    model32 = model_of(layers(), (5,), dtype=np.float32)
    model32.param_buffer[...] = model64.param_buffer
    x = rng.integers(0, 7, size=(4, 5))
    np.testing.assert_allclose(model32.forward(x.astype(np.float32)), model64.forward(x), rtol=1e-5, atol=1e-6)
    r = rng.standard_normal((4, 5, 3))
    model64.backward(r, input_grad=False)
    model32.backward(r.astype(np.float32), input_grad=False)
    np.testing.assert_allclose(model32.grad_buffer, model64.grad_buffer, rtol=1e-5, atol=1e-5)


def test_shape_and_argument_errors():
    with pytest.raises(ValueError, match=r"Embedding takes sequences of token ids of shape \(T,\)"):
        Sequential([Embedding(4, vocab=3)], (2, 5))
    with pytest.raises(ValueError, match=r"PositionEmbedding takes sequences of shape \(T, features\)"):
        Sequential([PositionEmbedding()], 5)
    layer = model_of([PositionEmbedding()], (4, 2)).layers[0]
    with pytest.raises(ValueError, match=r"PositionEmbedding takes a batch of shape \(batch, \*\(4, 2\)\)"):
        layer.forward(np.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match=r"Embedding takes a batch of token ids of shape \(batch, T\)"):
        model_of([Embedding(4, vocab=3)], (2,)).layers[0].forward(np.zeros((1, 2, 1)))
    for make in (lambda: Embedding(0), lambda: Embedding(4, vocab=0), lambda: Embedding(4, init_std=0),
                 lambda: PositionEmbedding(init_std=float("nan")), lambda: Embedding(2.0)):
        with pytest.raises(ValueError):
            make()
    assert Embedding(16, init_std=0.1).describe() == "Embedding(16, init_std=0.1)"
    assert PositionEmbedding().describe() == "PositionEmbedding"
