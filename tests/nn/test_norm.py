"""BatchNorm (synchronized over ranks) and LayerNorm: gradients, definitions, running statistics.

Backward passes are checked against central finite differences (float64). The synchronized
statistics are checked without MPI: R layers run in R threads of one process, their
``allreduce_sum`` bound to a fake that sums across the threads in lock-step, and the shards of a
batch (one of them empty) must reproduce the single-process result on the whole batch.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dptrain.nn import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    Dense,
    LayerNorm,
    Sequential,
    SoftmaxCrossEntropy,
    Tanh,
)

from gradcheck import TOL, numeric_grad, rel_error

BN_SHAPES = [pytest.param((4,), id="1d"), pytest.param((3, 5), id="1d-length"),
             pytest.param((2, 3, 3), id="2d")]


def _bn_model(in_shape, rng=None, dtype=np.float64, **kwargs):
    layer = BatchNorm(**kwargs)
    model = Sequential([layer], in_shape, dtype=dtype)
    model.init_params(rng or np.random.default_rng(0))
    if rng is not None:  # init gives weight 1, bias 0; exercise both
        layer.params["weight"][...] = 0.5 + rng.random(layer.params["weight"].shape)
        layer.params["bias"][...] = rng.standard_normal(layer.params["bias"].shape)
    return model, layer


def _axes(x):
    return (0, *range(2, x.ndim))


def _bshape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _reference_bn(x, weight, bias, eps=1e-5):
    """The definition: per channel, mean and biased variance over batch and spatial axes."""
    mean = x.mean(axis=_axes(x), keepdims=True)
    var = x.var(axis=_axes(x), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight.reshape(_bshape(x)) + bias.reshape(_bshape(x))


# ---------------------------------------------------------------------------------------------
# BatchNorm in one process


@pytest.mark.parametrize("in_shape", BN_SHAPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_gradients(in_shape, train):
    rng = np.random.default_rng(1)
    model, layer = _bn_model(in_shape, rng)
    if not train:  # running statistics away from their initial values
        layer.buffers["running_mean"][...] = rng.standard_normal(in_shape[0])
        layer.buffers["running_var"][...] = 0.5 + rng.random(in_shape[0])
    x = 1.5 * rng.standard_normal((5, *in_shape)) + 0.3
    r = rng.standard_normal((5, *in_shape))  # loss = sum(y * r): no trivially zero gradient

    y = model.forward(x, train)
    dx = model.backward(r).copy()
    dw, db = layer.grads["weight"].copy(), layer.grads["bias"].copy()
    assert y.shape == x.shape and dx.shape == x.shape

    def objective():
        return np.sum(layer.forward(x, train) * r)

    assert rel_error(dx, numeric_grad(objective, x)) < TOL
    assert rel_error(dw, numeric_grad(objective, layer.params["weight"])) < TOL
    assert rel_error(db, numeric_grad(objective, layer.params["bias"])) < TOL
    assert np.abs(dx).max() > 1e-3 and np.abs(dw).max() > 1e-3


@pytest.mark.parametrize("in_shape", BN_SHAPES)
def test_batchnorm_forward_matches_definition(in_shape):
    rng = np.random.default_rng(2)
    model, layer = _bn_model(in_shape, rng)
    x = 3 * rng.standard_normal((6, *in_shape)) - 1
    w, b = layer.params["weight"], layer.params["bias"]

    y = model.forward(x, train=True)
    np.testing.assert_allclose(y, _reference_bn(x, w, b), rtol=1e-12, atol=1e-12)
    # eval uses the running statistics instead
    rm, rv = layer.buffers["running_mean"], layer.buffers["running_var"]
    expected = (x - rm.reshape(_bshape(x))) / np.sqrt(rv.reshape(_bshape(x)) + 1e-5) * w.reshape(_bshape(x))
    np.testing.assert_allclose(model.forward(x, train=False), expected + b.reshape(_bshape(x)), rtol=1e-12)


def test_batchnorm_by_hand():
    model, layer = _bn_model((1,))
    y = model.forward(np.array([[1.0], [3.0]]), train=True)
    # mean 2, biased variance 1: xhat = -+1 / sqrt(1 + eps)
    np.testing.assert_allclose(y, [[-1 / np.sqrt(1.00001)], [1 / np.sqrt(1.00001)]], rtol=1e-15)
    # running: 0.9 * 0 + 0.1 * 2; 0.9 * 1 + 0.1 * 2 (the unbiased variance)
    np.testing.assert_allclose(layer.buffers["running_mean"], [0.2], rtol=1e-15)
    np.testing.assert_allclose(layer.buffers["running_var"], [1.1], rtol=1e-15)
    # eval: (5 - 0.2) / sqrt(1.1 + eps)
    y_eval = model.forward(np.array([[5.0]]), train=False)
    np.testing.assert_allclose(y_eval, [[4.8 / np.sqrt(1.10001)]], rtol=1e-15)


@pytest.mark.parametrize("in_shape", BN_SHAPES)
def test_running_statistics_update_rule(in_shape):
    rng = np.random.default_rng(3)
    momentum = 0.3
    model, layer = _bn_model(in_shape, rng, momentum=momentum)
    rm, rv = np.zeros(in_shape[0]), np.ones(in_shape[0])
    for step in range(3):
        x = rng.standard_normal((4 + step, *in_shape)) * (step + 1) + step
        model.forward(x, train=True)
        mean = x.mean(axis=_axes(x))
        unbiased = x.var(axis=_axes(x), ddof=1)
        rm = (1 - momentum) * rm + momentum * mean
        rv = (1 - momentum) * rv + momentum * unbiased
        np.testing.assert_allclose(layer.buffers["running_mean"], rm, rtol=1e-12)
        np.testing.assert_allclose(layer.buffers["running_var"], rv, rtol=1e-12)
    model.forward(x, train=False)  # eval leaves them alone
    np.testing.assert_allclose(layer.buffers["running_mean"], rm, rtol=1e-12)
    assert set(model.named_buffers()) == {"layers.0.running_mean", "layers.0.running_var"}


def test_batchnorm_float32_statistics_are_accurate():
    """float32 activations far from zero: float64 two-pass statistics lose nothing to cancellation."""
    rng = np.random.default_rng(4)
    x = (1000 + rng.standard_normal((4096, 3))).astype(np.float32)
    model, layer = _bn_model((3,), dtype=np.float32)
    y = model.forward(x, train=True)
    assert y.dtype == np.float32
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y, _reference_bn(x64, np.ones(3), np.zeros(3)), atol=2e-3)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.1 * x64.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.9 + 0.1 * x64.var(axis=0, ddof=1), rtol=1e-6)
    dx = model.backward(rng.standard_normal(x.shape).astype(np.float32))
    assert dx.dtype == np.float32 and layer.grads["weight"].dtype == np.float32


@pytest.mark.parametrize("in_shape", [(4,), (2, 3, 3)])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_empty_batch(in_shape, train):
    model, layer = _bn_model(in_shape)
    model.grad_buffer[...] = 7.0  # stale values must be overwritten
    x = np.zeros((0, *in_shape))
    with np.errstate(all="raise"):
        y = model.forward(x, train)
        dx = model.backward(np.zeros_like(y))
    assert y.shape == x.shape and dx.shape == x.shape
    assert np.all(model.grad_buffer == 0)
    # a global batch of 0 samples does not poison the running statistics
    np.testing.assert_array_equal(layer.buffers["running_mean"], 0.0)
    np.testing.assert_array_equal(layer.buffers["running_var"], 1.0)


def test_batchnorm_refuses_one_value_per_channel_in_training():
    model, _ = _bn_model((3,))
    with pytest.raises(ValueError, match="more than one value per channel"):
        model.forward(np.ones((1, 3)), train=True)
    model.forward(np.ones((1, 3)), train=False)  # eval is fine
    model2d, _ = _bn_model((3, 2, 1))
    model2d.forward(np.ones((1, 3, 2, 1)), train=True)  # one sample, two values per channel


def test_batchnorm_inside_a_model():
    rng = np.random.default_rng(5)
    model = Sequential([Dense(6), BatchNorm(), Tanh(), Dense(3, init="xavier")], 4, dtype=np.float64)
    model.init_params(rng)
    x, labels = rng.standard_normal((7, 4)), rng.integers(0, 3, size=7)
    loss = SoftmaxCrossEntropy()
    _, dz = loss.value_and_grad(model.forward(x), labels)
    model.backward(dz, input_grad=False)
    analytic = model.grad_buffer.copy()
    num = numeric_grad(lambda: loss.value(model.forward(x), labels), model.param_buffer)
    assert rel_error(analytic, num) < TOL
    assert "layers.1.running_var" in model.state_arrays()
    assert model.summary()[1] == ("1", "BatchNorm(momentum=0.1, eps=1e-05)", (6,), 12)


def test_batchnorm_api():
    assert BatchNorm().describe() == "BatchNorm(momentum=0.1, eps=1e-05)"
    assert BatchNorm2d(momentum=0.01, eps=1e-3).describe() == "BatchNorm2d(momentum=0.01, eps=0.001)"
    assert LayerNorm().describe() == "LayerNorm(eps=1e-05)"
    assert BatchNorm.syncs_batch_statistics and BatchNorm1d.syncs_batch_statistics
    assert BatchNorm2d.syncs_batch_statistics and not LayerNorm.syncs_batch_statistics
    with pytest.raises(ValueError, match="BatchNorm2d"):
        Sequential([BatchNorm2d()], 5)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        Sequential([BatchNorm1d()], (2, 3, 3))
    Sequential([BatchNorm1d()], (2, 3))
    for bad in ({"momentum": -0.1}, {"momentum": 1.5}, {"eps": 0.0}):
        with pytest.raises(ValueError):
            BatchNorm(**bad)
    with pytest.raises(ValueError):
        LayerNorm(eps=-1.0)


# ---------------------------------------------------------------------------------------------
# Synchronized statistics: R ranks in R threads


class FakeWorld:
    """R ranks in R threads; ``allreduce_sum`` sums across them in lock-step, in rank order (so
    every rank gets the same bits), and records the shape and dtype of every call per rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)
        self.slots: list[np.ndarray | None] = [None] * size
        self.calls: list[list[tuple]] = [[] for _ in range(size)]

    def allreduce_for(self, rank: int):
        def allreduce_sum(array: np.ndarray) -> None:
            assert array.flags.c_contiguous  # what MPI's buffer interface needs
            self.calls[rank].append((array.shape, array.dtype))
            self.slots[rank] = array
            self.barrier.wait()  # every rank has deposited its array
            total = np.zeros_like(array)
            for a in self.slots:
                total += a
            self.barrier.wait()  # every rank has read every array: now overwrite in place
            array[...] = total
        return allreduce_sum

    def run(self, fn):
        """fn(rank) in one thread per rank -> [result of rank 0, ...]; re-raises a rank's error."""
        results, errors = [None] * self.size, []

        def target(rank):
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _close(a, b, tol=1e-12):
    assert rel_error(a, b) < tol, rel_error(a, b)


@pytest.mark.parametrize("in_shape", [(4,), (2, 3, 3)])
def test_sharded_batchnorm_equals_the_whole_batch(in_shape):
    rng = np.random.default_rng(6)
    sizes = [4, 0, 2, 3]  # uneven, one rank empty
    bounds = np.cumsum([0, *sizes])
    steps = [(rng.standard_normal((9, *in_shape)) * 2 + 1, rng.standard_normal((9, *in_shape)))
             for _ in range(2)]

    whole, whole_layer = _bn_model(in_shape, np.random.default_rng(7))
    expected = []
    for x, r in steps:
        y = whole.forward(x, train=True).copy()
        dx = whole.backward(r).copy()
        expected.append((y, dx, whole.grad_buffer.copy()))

    world = FakeWorld(len(sizes))

    def rank_run(rank):
        model, _ = _bn_model(in_shape, np.random.default_rng(7))  # the same parameters on every rank
        model.bind_allreduce(world.allreduce_for(rank))
        s = slice(bounds[rank], bounds[rank + 1])
        out = []
        for x, r in steps:
            y = model.forward(x[s], train=True).copy()
            dx = model.backward(r[s]).copy()
            out.append((y, dx, model.grad_buffer.copy()))
        return out, model.state_buffer.copy()

    results = world.run(rank_run)

    for i, (y, dx, grads) in enumerate(expected):
        _close(np.concatenate([res[0][i][0] for res in results]), y)
        _close(np.concatenate([res[0][i][1] for res in results]), dx)
        _close(sum(res[0][i][2] for res in results), grads)  # what the gradient exchange adds up
    for _, state in results:
        _close(state, whole.state_buffer)
    assert not np.allclose(whole_layer.buffers["running_var"], 1.0)  # the statistics did move
    # the same collectives on every rank, the empty one included: per step 2 in forward, 1 in backward
    c = in_shape[0]
    per_step = [((c + 1,), np.float64), ((c,), np.float64), ((2, c), np.float64)]
    assert all(calls == per_step * len(steps) for calls in world.calls)


def test_sharded_batchnorm_global_batch_empty_and_eval():
    world = FakeWorld(3)

    def rank_run(rank):
        model, _ = _bn_model((2, 2, 2))
        model.bind_allreduce(world.allreduce_for(rank))
        with np.errstate(all="raise"):
            y = model.forward(np.zeros((0, 2, 2, 2)), train=True)
            dx = model.backward(y)
        n_train_calls = len(world.calls[rank])
        x = np.full((rank, 2, 2, 2), 3.0)
        y_eval = model.forward(x, train=False).copy()
        model.backward(np.ones_like(x))
        return dx.shape, n_train_calls, len(world.calls[rank]), model.state_buffer.copy(), y_eval

    for rank, (shape, n_train, n_all, state, y_eval) in enumerate(world.run(rank_run)):
        assert shape == (0, 2, 2, 2)
        assert n_train == n_all == 3  # eval forward and backward: no collective
        np.testing.assert_array_equal(state, [0, 0, 1, 1])  # running stats untouched
        np.testing.assert_allclose(y_eval, np.full((rank, 2, 2, 2), 3 / np.sqrt(1 + 1e-5)), rtol=1e-15)


def test_sharded_one_value_per_channel_raises_on_every_rank():
    world = FakeWorld(2)

    def rank_run(rank):
        model, _ = _bn_model((3,))
        model.bind_allreduce(world.allreduce_for(rank))
        try:
            model.forward(np.ones((rank, 3)), train=True)  # 0 + 1 samples globally
        except ValueError:
            return len(world.calls[rank])
        return None

    assert world.run(rank_run) == [1, 1]  # both raise after the same collective


def test_backward_without_input_grad_skips_the_collective():
    world = FakeWorld(1)
    model, layer = _bn_model((3,), np.random.default_rng(8))
    model.bind_allreduce(world.allreduce_for(0))
    x, r = np.random.default_rng(9).standard_normal((2, 5, 3))
    model.forward(x, train=True)
    assert model.backward(r, input_grad=False) is None  # BatchNorm is the first layer with parameters
    assert len(world.calls[0]) == 2
    _close(layer.grads["bias"], r.sum(axis=0))
    _close(layer.grads["weight"], (r * _reference_bn(x, np.ones(3), np.zeros(3))).sum(axis=0))


# ---------------------------------------------------------------------------------------------
# LayerNorm


@pytest.mark.parametrize("in_shape", [(6,), (2, 3, 4)], ids=["1d", "3d"])
def test_layernorm_gradients_and_definition(in_shape):
    rng = np.random.default_rng(10)
    layer = LayerNorm()
    model = Sequential([layer], in_shape, dtype=np.float64)
    model.init_params(rng)
    assert layer.params["weight"].shape == in_shape and np.all(layer.params["weight"] == 1)
    layer.params["weight"][...] = 0.5 + rng.random(in_shape)
    layer.params["bias"][...] = rng.standard_normal(in_shape)
    x = 2 * rng.standard_normal((4, *in_shape)) + 0.5
    r = rng.standard_normal((4, *in_shape))

    y = model.forward(x)
    axes = tuple(range(1, x.ndim))
    xhat = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    expected = xhat * layer.params["weight"] + layer.params["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(model.forward(x, train=False), y)
    dx = model.backward(r).copy()
    dw, db = layer.grads["weight"].copy(), layer.grads["bias"].copy()

    def objective():
        return np.sum(layer.forward(x) * r)

    assert rel_error(dx, numeric_grad(objective, x)) < TOL
    assert rel_error(dw, numeric_grad(objective, layer.params["weight"])) < TOL
    assert rel_error(db, numeric_grad(objective, layer.params["bias"])) < TOL


def test_layernorm_by_hand_and_empty_batch():
    layer = LayerNorm()
    model = Sequential([layer], 4, dtype=np.float64)
    model.init_params(np.random.default_rng(0))
    y = model.forward(np.array([[1.0, 2.0, 3.0, 4.0]]))  # mean 2.5, variance 1.25
    np.testing.assert_allclose(y, [[-1.5, -0.5, 0.5, 1.5] / np.sqrt(1.25001)], rtol=1e-15)

    model.grad_buffer[...] = 7.0
    with np.errstate(all="raise"):
        y = model.forward(np.zeros((0, 4)))
        dx = model.backward(np.zeros((0, 4)))
    assert y.shape == dx.shape == (0, 4)
    assert np.all(model.grad_buffer == 0)


def test_layernorm_float32():
    rng = np.random.default_rng(11)
    model = Sequential([LayerNorm()], (3, 8), dtype=np.float32)
    model.init_params(rng)
    x = (500 + rng.standard_normal((5, 3, 8))).astype(np.float32)
    y = model.forward(x)
    assert y.dtype == np.float32
    x64 = x.astype(np.float64).reshape(5, -1)
    expected = (x64 - x64.mean(axis=1, keepdims=True)) / np.sqrt(x64.var(axis=1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y.reshape(5, -1), expected, atol=2e-3)
    assert model.backward(np.ones_like(y)).dtype == np.float32
