"""Residual blocks and global average pooling: finite differences (float64), names by path, nesting,
a layer of one's own inside a block, shape errors."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain.nn import (
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    GlobalAvgPool,
    Layer,
    ReLU,
    Residual,
    Sequential,
    Tanh,
)
from dptrain.nn.layers import BatchInfo

from gradcheck import TOL, check_gradients, numeric_grad, rel_error


class Scale(Layer):
    """A layer of one's own, with a parameter and a backward(dy) that knows nothing of input_grad."""

    def param_shapes(self, in_shape):
        return {"alpha": (1,)}

    def init_params(self, rng):
        self.params["alpha"][...] = 1.5

    def forward(self, x, train=True):
        self._x = x
        return x * self.params["alpha"][0]

    def backward(self, dy):
        self.grads["alpha"][...] = np.sum(dy * self._x)
        return dy * self.params["alpha"][0]


def model_of(layers, in_shape, seed=0):
    model = Sequential(layers, in_shape, dtype=np.float64)
    model.init_params(np.random.default_rng(seed))
    return model


def test_identity_shortcut_mlp_block_gradients():
    rng = np.random.default_rng(1)
    model = model_of([Dense(6), Residual([Dense(6), Tanh(), Dense(6)]), Tanh(), Dense(3)], 5)
    check_gradients(model, rng.standard_normal((4, 5)), rng.standard_normal((4, 3)))


def test_conv_block_with_a_strided_shortcut_and_batchnorm_gradients():
    rng = np.random.default_rng(2)
    block = Residual([Conv2D(4, 3, stride=2, padding=1, bias=False), BatchNorm(), ReLU(),
                      Conv2D(4, 3, padding=1, bias=False), BatchNorm()],
                     shortcut=[Conv2D(4, 1, stride=2, bias=False), BatchNorm()])
    model = model_of([Conv2D(3, 3, padding=1), block, ReLU(), GlobalAvgPool(), Dense(2)], (2, 6, 6))
    for layer in block.body + block.shortcut:  # non-trivial BatchNorm affine parameters
        if isinstance(layer, BatchNorm):
            layer.params["weight"][...] = rng.uniform(0.5, 1.5, layer.params["weight"].shape)
            layer.params["bias"][...] = rng.standard_normal(layer.params["bias"].shape)
    check_gradients(model, rng.standard_normal((3, 2, 6, 6)), rng.standard_normal((3, 2)))


def test_nested_blocks_and_a_layer_of_ones_own_inside():
    rng = np.random.default_rng(3)
    inner = Residual([Scale(), Dense(5)])
    model = model_of([Residual([Dense(5), inner, Tanh()], shortcut=[Dense(5)]), Dense(2)], 4)
    check_gradients(model, rng.standard_normal((3, 4)), rng.standard_normal((3, 2)))
    names = list(model.named_params())
    assert names == ["layers.0.body.0.weight", "layers.0.body.0.bias", "layers.0.body.1.body.0.alpha",
                     "layers.0.body.1.body.1.weight", "layers.0.body.1.body.1.bias", "layers.0.shortcut.0.weight",
                     "layers.0.shortcut.0.bias", "layers.1.weight", "layers.1.bias"]
    # the inner layers' parameters are views of the model's flat buffer
    assert np.shares_memory(inner.body[0].params["alpha"], model.param_buffer)
    assert np.shares_memory(inner.body[1].grads["weight"], model.grad_buffer)


def test_without_input_gradient_the_parameter_gradients_are_the_same():
    rng = np.random.default_rng(4)
    model = model_of([Residual([Dense(3), Tanh(), Dense(3)], shortcut=[Dense(3)]), Dense(2)], 4)
    x, r = rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    model.forward(x)
    model.backward(r)
    full = model.grad_buffer.copy()
    model.grad_buffer[...] = 9.0
    model.forward(x)
    assert model.backward(r, input_grad=False) is None
    np.testing.assert_array_equal(model.grad_buffer, full)


def test_buffers_allreduce_and_batch_info_reach_the_inner_layers():
    bn, drop = BatchNorm(), Dropout(0.5, seed=1, salt=7)
    model = model_of([Residual([Dense(4), bn, drop])], 4)
    assert list(model.named_buffers()) == ["layers.0.body.1.running_mean", "layers.0.body.1.running_var"]
    assert np.all(bn.buffers["running_var"] == 1)  # initialised through the block
    calls = []
    model.bind_allreduce(lambda a: calls.append(a.shape))
    info = BatchInfo(3, np.arange(6))
    model.begin_batch(info)
    assert drop.batch_info is info
    model.forward(np.ones((6, 4)))
    assert calls  # synchronized BatchNorm summed through the bound allreduce
    assert model.layers[0].syncs_batch_statistics


def test_shapes_must_meet():
    with pytest.raises(ValueError, match=r"the body gives samples of shape \(3,\) but the input is"):
        Sequential([Residual([Dense(3)])], 4)
    with pytest.raises(ValueError, match=r"the body gives samples of shape \(3,\) but the shortcut gives \(2,\)"):
        Sequential([Residual([Dense(3)], shortcut=[Dense(2)])], 4)
    with pytest.raises(ValueError, match="at least one layer"):
        Residual([])


def test_summary_shows_the_nesting():
    model = model_of([Residual([Dense(4), ReLU()], shortcut=[Dense(4)]), Dense(2)], 3)
    assert model.summary() == [("0", "Residual(body of 2, shortcut of 1)", (4,), 32),
                               ("0.body.0", "Dense(4, init=he)", (4,), 16), ("0.body.1", "ReLU", (4,), 0),
                               ("0.shortcut.0", "Dense(4, init=he)", (4,), 16), ("1", "Dense(2, init=he)", (2,), 10)]


@pytest.mark.parametrize("in_shape", [(3, 5), (3, 4, 5)], ids=["1d", "2d"])
def test_global_average_pool(in_shape):
    rng = np.random.default_rng(5)
    model = model_of([GlobalAvgPool()], in_shape)
    x = rng.standard_normal((2, *in_shape))
    np.testing.assert_allclose(model.forward(x), x.reshape(2, 3, -1).mean(axis=2), rtol=1e-14)
    r = rng.standard_normal((2, 3))
    model.forward(x)
    dx = model.backward(r)
    assert rel_error(dx, numeric_grad(lambda: np.sum(model.forward(x) * r), x)) < TOL
    with pytest.raises(ValueError, match="GlobalAvgPool takes samples of shape"):
        Sequential([GlobalAvgPool()], 5)
