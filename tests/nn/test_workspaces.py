"""Workspaces of layers and losses: one grow-only buffer per (name, dtype), whatever the batch shape;
and the losses' target checks."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain.nn import (
    GELU,
    LOSSES,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    LayerNorm,
    LeakyReLU,
    MaxPool2D,
    MeanSquaredError,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)
from dptrain.nn.layers import Workspaces


def test_workspace_grows_and_is_reused():
    ws = Workspaces()
    a = ws.workspace("y", (4, 3), np.float32)
    assert a.shape == (4, 3) and a.dtype == np.float32 and a.flags.c_contiguous
    b = ws.workspace("y", (2, 5), np.float32)  # smaller: the same memory
    assert b.shape == (2, 5) and b.ctypes.data == a.ctypes.data and b.flags.c_contiguous
    assert ws.workspace_nbytes() == 12 * 4
    c = ws.workspace("y", (5, 5), np.float32)  # bigger: grown once, then kept
    assert c.shape == (5, 5) and ws.workspace_nbytes() == 25 * 4
    assert ws.workspace("y", (3, 2), np.float32).ctypes.data == c.ctypes.data
    d = ws.workspace("y", (5, 5), np.float64)  # another dtype: another buffer
    assert d.dtype == np.float64 and not np.shares_memory(c, d)
    assert ws.workspace("y", (0, 7), np.float32).shape == (0, 7)
    assert ws.workspace_nbytes() == 25 * 4 + 25 * 8


def _model():
    layers = [Conv2D(4, 3, padding=1, bias=False), BatchNorm(), ReLU(), MaxPool2D(2), Conv2D(3, 2, stride=1),
              LayerNorm(), LeakyReLU(), AvgPool2D(2, stride=1), Flatten(), Dense(16), GELU(), Dropout(0.3),
              Dense(8, init="xavier"), Tanh(), Dense(6), Sigmoid(), Dense(3, init="xavier")]
    model = Sequential(layers, (1, 8, 8), dtype=np.float32)
    model.init_params(np.random.default_rng(0))
    return model


def _nbytes(model, loss) -> int:
    return sum(layer.workspace_nbytes() for layer in model.layers) + loss.workspace_nbytes()


def _buffer_sizes(model, loss) -> dict:
    return {(i, key): flat.size for i, obj in enumerate([*model.layers, loss])
            for key, flat in obj.__dict__.get("_workspaces", {}).items()}


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse", "bce_with_logits"])
def test_memory_does_not_grow_across_batch_shapes(loss_name):
    """A training step, then an evaluation at a bigger batch, then more of both at other batch
    sizes: the workspaces hold the biggest set of arrays seen, not one set per batch shape."""
    rng = np.random.default_rng(1)
    model, loss = _model(), LOSSES[loss_name]()
    x = rng.standard_normal((300, 64)).astype(np.float32)
    if loss_name == "cross_entropy":
        y = rng.integers(0, 3, 300)
    else:
        y = rng.random((300, 3)).astype(np.float32)

    def step(n):
        z = model.forward(x[:n], train=True)
        _, dz = loss.value_and_grad(z, y[:n])
        model.backward(dz, input_grad=False)

    def evaluate(n):
        loss.value(model.forward(x[:n], train=False), y[:n])

    step(64)
    after_step = _nbytes(model, loss)
    evaluate(300)
    held = _nbytes(model, loss)
    assert held > after_step
    sizes = _buffer_sizes(model, loss)
    for n in (50, 7, 64, 1, 0, 33):
        step(n)
        evaluate(n)
        evaluate(299)
    assert _nbytes(model, loss) == held
    assert _buffer_sizes(model, loss) == sizes
    step(300)  # a bigger training batch grows the buffers once, to that batch's set
    held = _nbytes(model, loss)
    for n in (64, 300, 5):
        step(n)
        evaluate(n)
    assert _nbytes(model, loss) == held


def test_results_do_not_depend_on_earlier_batch_shapes():
    """Reusing one buffer for every shape changes no value: a step after an evaluation at a bigger
    batch gives bitwise the gradients of the same step in a fresh model."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 64)).astype(np.float32)
    y = rng.integers(0, 3, 200)
    grads = []
    for warm_up in (False, True):
        model, loss = _model(), LOSSES["cross_entropy"]()
        if warm_up:
            loss.value(model.forward(x, train=False), y)
        z = model.forward(x[:37], train=True)
        value, dz = loss.value_and_grad(z, y[:37])
        model.backward(dz)
        grads.append((value, model.grad_buffer.copy()))
    assert grads[0][0] == grads[1][0]
    np.testing.assert_array_equal(grads[0][1], grads[1][1])


def test_mse_refuses_targets_of_another_shape():
    """(4, 1) outputs with (4,) targets are one column (14), not a (4, 4) broadcast (56)."""
    z = np.arange(4.0).reshape(4, 1)
    loss = MeanSquaredError()
    value, dz = loss.value_and_grad(z, np.zeros(4))
    assert value == 14.0 and loss.value(z, np.zeros(4)) == 14.0
    np.testing.assert_array_equal(dz, 2.0 * z)
    for bad in (np.zeros((4, 2)), np.zeros((1, 4)), np.zeros(3), np.zeros((4, 1, 1))):
        with pytest.raises(ValueError, match="shape"):
            loss.value_and_grad(z, bad)
        with pytest.raises(ValueError, match="shape"):
            loss.value(z, bad)


def test_mse_keeps_the_promoted_dtype():
    z = np.ones((3, 2), dtype=np.float32)
    value, dz = MeanSquaredError().value_and_grad(z, np.zeros((3, 2), dtype=np.float64))
    assert dz.dtype == np.float64 and value == 3.0
    _, dz = MeanSquaredError().value_and_grad(z, np.zeros((3, 2), dtype=np.float32))
    assert dz.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Shared layer checks and registries


@pytest.mark.parametrize("bad", [2.5, True, 0, -3, "4", None])
def test_dense_and_conv_refuse_a_width_that_is_not_a_positive_integer(bad):
    """Dense(2.5) used to build 2 units and Dense(True) one; both are refused like Conv2D's filters."""
    with pytest.raises(ValueError, match="out_features"):
        Dense(bad)
    with pytest.raises(ValueError, match="filters"):
        Conv2D(bad, 3)


def test_dense_and_conv_accept_numpy_integers():
    assert Dense(np.int64(3)).out_features == 3 and Conv2D(np.int32(2), 3).filters == 2


@pytest.mark.parametrize("init", ["he", "xavier"])
def test_init_weight_is_the_same_draw_for_dense_and_conv(init):
    """Both layers draw rng.standard_normal(shape) * std, std from their fans."""
    import math

    dense = Sequential([Dense(7, init=init)], 5, dtype=np.float64)
    dense.init_params(np.random.default_rng(9))
    std = math.sqrt(2.0 / 5) if init == "he" else math.sqrt(2.0 / 12)
    np.testing.assert_array_equal(dense.layers[0].params["weight"],
                                  np.random.default_rng(9).standard_normal((5, 7)) * std)
    conv = Sequential([Conv2D(4, 3, init=init)], (2, 5, 5), dtype=np.float64)
    conv.init_params(np.random.default_rng(9))
    std = math.sqrt(2.0 / 18) if init == "he" else math.sqrt(2.0 / (18 + 36))
    np.testing.assert_array_equal(conv.layers[0].params["weight"],
                                  np.random.default_rng(9).standard_normal((4, 2, 3, 3)) * std)


def test_registries_are_the_single_source_of_names():
    """config's choices and the layer tables' activations come from the registries."""
    import inspect

    from dptrain import optim
    from dptrain.config import schema, validation
    from dptrain.config.layers import layer_tables
    from dptrain.nn import ACTIVATIONS
    from dptrain.optim import schedules

    assert schema.ACTIVATION_NAMES == tuple(ACTIVATIONS)
    assert schema.LOSS_NAMES == tuple(LOSSES)
    assert schema.OPTIMIZER_NAMES == tuple(optim.OPTIMIZERS)
    assert validation.SCHEDULES == schedules.SCHEDULES
    types = layer_tables()
    for name, cls in ACTIVATIONS.items():
        factory, keys = types[name]
        assert factory is cls
        assert set(keys) == set(inspect.signature(cls).parameters)  # every argument has a key
        assert cls.preferred_init in ("he", "xavier")


def test_syncs_batch_statistics_is_defined_on_every_layer():
    from dptrain.nn import Layer

    assert Layer.syncs_batch_statistics is False and BatchNorm.syncs_batch_statistics is True
    assert not Dense(2).syncs_batch_statistics and not Dropout(0.5).syncs_batch_statistics


@pytest.mark.parametrize("table, words", [
    ({"type": "conv2d", "filters": 2, "kernel": "3"}, ["model.layers[0].kernel", "pair of integers"]),
    ({"type": "conv2d", "filters": 2, "kernel": [3, 3, 3]}, ["model.layers[0].kernel", "pair of integers"]),
    ({"type": "conv2d", "filters": 2, "kernel": [3, True]}, ["model.layers[0].kernel", "pair of integers"]),
    ({"type": "conv2d", "filters": 2, "kernel": 0}, ["model.layers[0]", "kernel must be >= 1"]),
    ({"type": "conv2d", "filters": 2, "kernel": 3, "padding": -1}, ["model.layers[0]", "padding must be >= 0"]),
    ({"type": "maxpool2d", "pool": 2.0}, ["model.layers[0].pool", "pair of integers"]),
    ({"type": "avgpool2d", "pool": 2, "stride": [0, 1]}, ["model.layers[0]", "stride must be >= 1"]),
    ({"type": "dense", "units": 0}, ["model.layers[0]", "out_features"]),
])
def test_layer_table_sizes_name_the_key(table, words):
    from dptrain.config.layers import make_layer
    from dptrain.errors import UserError

    with pytest.raises(UserError) as info:
        make_layer(table, 0)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_layer_table_sizes_accept_ints_and_pairs():
    from dptrain.config.layers import make_layer

    layer = make_layer({"type": "conv2d", "filters": 2, "kernel": [3, 1], "stride": 2, "padding": [1, 0]}, 0)
    assert (layer.kernel, layer.stride, layer.padding) == ((3, 1), (2, 2), (1, 0))
