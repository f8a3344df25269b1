"""LeakyReLU, GELU, Dropout and BCEWithLogits: finite-difference checks (float64) and properties.

Dropout's mask must be a pure function of (seed, salt, step, sample index, element position), so
that a data-parallel run gives the same weights at every world size: checked here by comparing
masks across batches that hold the same samples in other company, order or shards.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptrain.nn import ACTIVATIONS, LOSSES, BatchInfo, Dense, Sequential
from dptrain.nn.dropout import Dropout
from dptrain.nn.layers import GELU, LeakyReLU
from dptrain.nn.losses import BCEWithLogits

from gradcheck import TOL, numeric_grad, random_away_from_zero, rel_error  # noqa: E402

# ---------------------------------------------------------------------------------------------
# LeakyReLU and GELU


def _check_dx(layer, x, rng):
    model = Sequential([layer], x.shape[1:], dtype=np.float64)
    r = rng.standard_normal(x.shape)
    y = model.forward(x)
    assert y.shape == x.shape and y.dtype == np.float64
    dx = model.backward(r.copy())
    num = numeric_grad(lambda: np.sum(layer.forward(x) * r), x)
    assert rel_error(dx, num) < TOL


@pytest.mark.parametrize("slope", [0.01, 0.2, -0.5, 1.5])
def test_leaky_relu_dx(slope):
    rng = np.random.default_rng(11)
    _check_dx(LeakyReLU(slope), random_away_from_zero(rng, (5, 6)) * 1.5, rng)


def test_gelu_dx():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 6)) * 2.5  # GELU is smooth: no need to avoid 0
    x[0, :3] = [0.0, 1e-9, -1e-9]
    _check_dx(GELU(), x, rng)


def test_gelu_dx_on_image_samples():
    rng = np.random.default_rng(13)
    _check_dx(GELU(), rng.standard_normal((2, 2, 3, 3)), rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("slope", [0.1, 0.01, 0.0, -2.718281828, 1.5, 1e-30])
def test_leaky_relu_matches_definition_exactly(slope, dtype):
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 3.0], [-1e30, -1e-30, 1e-30, 1e30, 7.0]], dtype=dtype)
    dy = np.random.default_rng(15).standard_normal(x.shape).astype(dtype)
    layer = LeakyReLU(slope)
    Sequential([layer], 5, dtype=dtype)
    a = dtype(slope)
    np.testing.assert_array_equal(layer.forward(x), np.where(x > 0, x, a * x))
    np.testing.assert_array_equal(layer.backward(dy), np.where(x > 0, dy, a * dy))


def test_leaky_relu_defaults():
    assert LeakyReLU().negative_slope == 0.01
    assert LeakyReLU().describe() == "LeakyReLU(0.01)"
    with pytest.raises(ValueError):
        LeakyReLU(float("nan"))


def test_gelu_matches_definition():
    x = np.linspace(-6, 6, 49).reshape(7, 7)
    layer = GELU()
    Sequential([layer], 7, dtype=np.float64)
    expected = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(x)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-14, atol=1e-300)
    dphi = np.vectorize(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))
                        + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi))(x)
    np.testing.assert_allclose(layer.backward(np.ones_like(x)), dphi, rtol=1e-13, atol=1e-300)
    # known values: GELU(1) = Phi(1), GELU(0) = 0, and it tends to x and to 0 in the tails
    y = layer.forward(np.array([[1.0, 0.0, 10.0, -10.0]]))
    assert y[0, 0] == pytest.approx(0.8413447460685429, rel=1e-14)
    assert y[0, 1] == 0.0 and y[0, 2] == pytest.approx(10.0) and abs(y[0, 3]) < 1e-20


@pytest.mark.parametrize("layer_cls", [LeakyReLU, GELU])
def test_new_activations_large_inputs_float32_and_empty(layer_cls):
    layer = layer_cls()
    Sequential([layer], 4, dtype=np.float64)
    x = np.array([[-1000.0, 1000.0, -40.0, 40.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, dx = layer.forward(x).copy(), layer.backward(np.ones_like(x))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert y[0, 1] == 1000.0 and dx[0, 1] == 1.0

    x32 = np.random.default_rng(14).standard_normal((3, 4)).astype(np.float32)
    y32 = layer.forward(x32)
    assert y32.dtype == np.float32
    # GELU's float32 CDF is within 3e-7 of the exact one (dptrain.nn.special): y within 3e-7 |x|
    np.testing.assert_allclose(y32, layer_cls().forward(x32.astype(np.float64)), rtol=1e-6, atol=1e-6)
    assert layer.backward(np.ones_like(x32)).dtype == np.float32

    empty = np.zeros((0, 4))
    assert layer.forward(empty).shape == (0, 4) and layer.backward(empty).shape == (0, 4)


def test_activation_registry():
    assert ACTIVATIONS["leaky_relu"] is LeakyReLU and ACTIVATIONS["gelu"] is GELU
    assert isinstance(ACTIVATIONS["leaky_relu"](), LeakyReLU)  # the builder calls it without arguments


# ---------------------------------------------------------------------------------------------
# Dropout


def _dropout(rate=0.5, seed=7, salt=0, shape=(10,), dtype=np.float64):
    layer = Dropout(rate, seed=seed, salt=salt)
    Sequential([layer], shape, dtype=dtype)
    return layer


def _mask(layer, step, index, shape=(10,)):
    """The output of a training forward on ones, with this batch_info: 0 or 1 / (1 - rate)."""
    layer.batch_info = BatchInfo(step, np.asarray(index, dtype=np.int64))
    return layer.forward(np.ones((len(index), *shape))).copy()


def _reference_keep(seed, salt, step, sample, j, rate):
    """The documented mask formula, element by element on Python ints."""
    m64 = (1 << 64) - 1

    def mix(v):
        v &= m64
        v ^= v >> 30
        v = (v * 0xBF58476D1CE4E5B9) & m64
        v ^= v >> 27
        v = (v * 0x94D049BB133111EB) & m64
        return v ^ (v >> 31)

    key = mix(mix(mix(0x6A09E667F3BCC908 ^ seed) ^ salt) ^ step)
    h = mix(mix(key ^ sample) + (j + 1) * 0x9E3779B97F4A7C15)
    return (h >> 11) / 2.0**53 >= rate


def test_dropout_mask_is_the_documented_function():
    layer = _dropout(rate=0.3, seed=5, salt=2, shape=(2, 3))
    index = [0, 17, 123456789012]
    keep = layer.keep_mask(9, np.array(index), (2, 3))
    assert keep.shape == (3, 2, 3) and keep.dtype == np.bool_
    expected = [[_reference_keep(5, 2, 9, s, j, 0.3) for j in range(6)] for s in index]
    np.testing.assert_array_equal(keep.reshape(3, 6), expected)


def test_dropout_gradient():
    rng = np.random.default_rng(20)
    layer = _dropout(rate=0.4, shape=(3, 4))
    x = rng.standard_normal((5, 3, 4))
    r = rng.standard_normal(x.shape)
    layer.batch_info = BatchInfo(3, np.array([4, 8, 15, 16, 23]))  # fixed: the mask is fixed
    y = layer.forward(x).copy()
    dropped = y == 0
    assert 0 < dropped.sum() < y.size
    np.testing.assert_allclose(y, np.where(dropped, 0.0, x / 0.6), rtol=1e-15)
    dx = layer.backward(r)
    num = numeric_grad(lambda: np.sum(layer.forward(x) * r), x)
    assert rel_error(dx, num) < TOL


def test_dropout_mask_does_not_depend_on_the_batch():
    layer = _dropout(rate=0.5, shape=(6, 5))
    index = np.array([3, 1, 4, 159, 26, 5, 35, 8, 97, 93])
    full = _mask(layer, 2, index, (6, 5))
    perm = np.random.default_rng(21).permutation(len(index))
    np.testing.assert_array_equal(_mask(layer, 2, index[perm], (6, 5)), full[perm])
    np.testing.assert_array_equal(_mask(layer, 2, index[7:], (6, 5)), full[7:])
    np.testing.assert_array_equal(_mask(layer, 2, index[[5]], (6, 5)), full[[5]])
    # the shards of any world size see the same masks as one process
    for world in (2, 3, 4):
        shards = [_mask(layer, 2, index[rank::world], (6, 5)) for rank in range(world)]
        for rank in range(world):
            np.testing.assert_array_equal(shards[rank], full[rank::world])


def test_dropout_mask_does_not_depend_on_dtype():
    a, b = _dropout(dtype=np.float64), _dropout(dtype=np.float32)
    b.batch_info = BatchInfo(1, np.arange(8))
    y32 = b.forward(np.ones((8, 10), dtype=np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_array_equal(y32 != 0, _mask(a, 1, np.arange(8)) != 0)


def test_dropout_mask_changes_with_step_salt_and_seed():
    index = np.arange(64)
    base = _mask(_dropout(rate=0.5), 0, index)
    others = [_mask(_dropout(rate=0.5), 1, index), _mask(_dropout(rate=0.5, salt=1), 0, index),
              _mask(_dropout(rate=0.5, seed=8), 0, index), _mask(_dropout(rate=0.5), 0, index + 64)]
    for other in others:
        agree = np.mean((other != 0) == (base != 0))
        assert 0.4 < agree < 0.6  # independent masks agree on half of the elements
    np.testing.assert_array_equal(_mask(_dropout(rate=0.5), 0, index), base)  # and it is reproducible
    layer = _dropout(rate=0.5)
    layer.salt = 3  # the builder may set the salt after construction
    assert not np.array_equal(_mask(layer, 0, index), base)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_and_expectation(rate):
    n, d = 400, 1000
    layer = _dropout(rate=rate, seed=3, shape=(d,))
    y = _mask(layer, 11, np.arange(n) * 7919, (d,))
    keep = y != 0
    sd = math.sqrt(rate * (1 - rate) / keep.size)
    assert abs(keep.mean() - (1 - rate)) < 5 * sd
    # no structure along samples or along element positions
    per_position = keep.mean(axis=0)
    per_sample = keep.mean(axis=1)
    assert abs(per_position.std() - math.sqrt(rate * (1 - rate) / n)) < 0.15 * math.sqrt(rate * (1 - rate) / n)
    assert abs(per_sample.std() - math.sqrt(rate * (1 - rate) / d)) < 0.15 * math.sqrt(rate * (1 - rate) / d)
    # neighbouring samples and neighbouring elements are independent
    p = 1 - rate
    assert abs(np.mean(keep[1:] == keep[:-1]) - (p * p + rate * rate)) < 0.01
    assert abs(np.mean(keep[:, 1:] == keep[:, :-1]) - (p * p + rate * rate)) < 0.01
    # inverted dropout keeps the expectation: kept values are scaled by 1 / (1 - rate)
    np.testing.assert_allclose(y[keep], 1 / (1 - rate), rtol=1e-15)
    x = np.random.default_rng(22).random((n, d)) + 1.0
    layer.batch_info = BatchInfo(12, np.arange(n))
    out = layer.forward(x)
    assert abs(out.mean() - x.mean()) < 5 * math.sqrt(rate / (1 - rate)) * x.std() / math.sqrt(x.size) + 0.01


def test_dropout_eval_and_rate_zero_are_identity():
    rng = np.random.default_rng(23)
    x = rng.standard_normal((4, 10))
    dy = rng.standard_normal((4, 10))
    layer = _dropout(rate=0.5)
    layer.batch_info = BatchInfo(0, np.arange(4))
    np.testing.assert_array_equal(layer.forward(x, train=False), x)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    zero = _dropout(rate=0.0)
    zero.batch_info = BatchInfo(0, np.arange(4))
    np.testing.assert_array_equal(zero.forward(x, train=True), x)
    np.testing.assert_array_equal(zero.backward(dy), dy)
    # a training forward after an evaluation one masks again, and backward follows the last forward
    y = layer.forward(x, train=True)
    assert np.any(y == 0)
    np.testing.assert_array_equal(layer.backward(dy) == 0, y == 0)


def test_dropout_empty_batch():
    layer = _dropout(rate=0.5)
    layer.batch_info = BatchInfo(5, np.zeros(0, dtype=np.int64))
    y = layer.forward(np.zeros((0, 10)))
    assert y.shape == (0, 10)
    assert layer.backward(np.zeros((0, 10))).shape == (0, 10)
    layer.batch_info = None
    assert layer.forward(np.zeros((0, 10))).shape == (0, 10)


def test_dropout_without_batch_info_counts_calls():
    layer = _dropout(rate=0.5)
    x = np.ones((6, 10))
    first = layer.forward(x).copy()
    second = layer.forward(x).copy()
    assert not np.array_equal(first, second)
    # the fallback is step = number of previous direct calls, samples = arange(batch)
    np.testing.assert_array_equal(first, _mask(_dropout(rate=0.5), 0, np.arange(6)))
    np.testing.assert_array_equal(second, _mask(_dropout(rate=0.5), 1, np.arange(6)))


def test_dropout_in_a_model_uses_begin_batch():
    rng = np.random.default_rng(24)
    model = Sequential([Dense(12), Dropout(0.5, seed=1, salt=1), Dense(3), Dropout(0.5, seed=1, salt=3)], 5,
                       dtype=np.float64)
    model.init_params(rng)
    x = rng.standard_normal((8, 5))
    index = np.arange(100, 108)
    model.begin_batch(BatchInfo(4, index))
    full = model.forward(x).copy()
    for part in (slice(0, 3), slice(3, 8)):
        model.begin_batch(BatchInfo(4, index[part]))
        np.testing.assert_allclose(model.forward(x[part]), full[part], rtol=1e-14)
    np.testing.assert_array_equal(model.forward(x, train=False), model.forward(x, train=False))


def test_dropout_checks_its_arguments():
    for rate in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError):
            Dropout(rate)
    layer = _dropout(rate=0.5)
    layer.batch_info = BatchInfo(0, np.arange(3))
    with pytest.raises(ValueError):
        layer.forward(np.ones((4, 10)))
    assert Dropout(0.5).describe() == "Dropout(0.5)"
    assert Dropout(0.25).describe() == "Dropout(0.25)"


# ---------------------------------------------------------------------------------------------
# BCEWithLogits


def _bce_reference(z, y):
    p = 1 / (1 + np.exp(-z))
    return float(np.sum(np.mean(-y * np.log(p) - (1 - y) * np.log(1 - p), axis=1)))


def _bce_batch(rng, n=6, k=4, soft=False):
    z = rng.standard_normal((n, k)) * 2
    y = rng.random((n, k)) if soft else rng.integers(0, 2, size=(n, k)).astype(np.float64)
    return z, y


@pytest.mark.parametrize("soft", [False, True])
def test_bce_matches_definition_and_gradient(soft):
    rng = np.random.default_rng(30)
    z, y = _bce_batch(rng, soft=soft)
    loss = BCEWithLogits()
    value, dz = loss.value_and_grad(z, y)
    assert value == pytest.approx(_bce_reference(z, y), rel=1e-12)
    assert value == pytest.approx(loss.value(z, y), rel=1e-14)
    assert dz.shape == z.shape
    np.testing.assert_allclose(dz, (1 / (1 + np.exp(-z)) - y) / z.shape[1], rtol=1e-12, atol=1e-15)
    num = numeric_grad(lambda: loss.value(z, y), z)
    assert rel_error(dz, num) < TOL


def test_bce_is_sum_over_samples():
    rng = np.random.default_rng(31)
    z, y = _bce_batch(rng, n=9)
    loss = BCEWithLogits()
    total, dz = loss.value_and_grad(z, y)
    dz = dz.copy()  # valid until the next value_and_grad, whatever its shape
    rows = [(v, g.copy()) for v, g in (loss.value_and_grad(z[i : i + 1], y[i : i + 1]) for i in range(len(z)))]
    assert total == pytest.approx(sum(v for v, _ in rows), rel=1e-12)
    np.testing.assert_allclose(dz, np.concatenate([g for _, g in rows]), rtol=1e-12, atol=1e-15)
    a, b = loss.value(z[:4], y[:4]), loss.value(z[4:], y[4:])
    assert total == pytest.approx(a + b, rel=1e-12)
    # the global mean is the per-element mean (PyTorch's BCEWithLogitsLoss with reduction="mean")
    assert total / len(z) == pytest.approx(_bce_reference(z, y) / len(z), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bce_is_finite_and_exact_for_extreme_logits(dtype):
    z = np.array([[1000.0, -1000.0, 1000.0, -1000.0], [-30.0, 30.0, 0.0, -745.0]], dtype=dtype)
    y = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]], dtype=dtype)
    loss = BCEWithLogits()
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value, dz = loss.value_and_grad(z, y)
    assert np.isfinite(value) and np.all(np.isfinite(dz))
    assert value == pytest.approx((1000 + 1000) / 4 + (2 * math.log1p(math.exp(-30)) + math.log(2)) / 4, rel=1e-6)
    expected = np.array([[0.0, 0.0, 1.0, -1.0], [1 / (1 + math.exp(30)), -1 / (1 + math.exp(30)), -0.5, 0.0]]) / 4
    np.testing.assert_allclose(dz, expected, rtol=1e-6, atol=0)  # tiny sigmoids keep their precision


def test_bce_binary_targets_shapes_and_empty_batch():
    rng = np.random.default_rng(32)
    z = rng.standard_normal((5, 1))
    y = rng.integers(0, 2, size=(5, 1)).astype(np.float64)
    loss = BCEWithLogits()
    value, dz = loss.value_and_grad(z, y)
    dz = dz.copy()
    assert value == pytest.approx(_bce_reference(z, y), rel=1e-12)
    value_flat, dz_flat = loss.value_and_grad(z, y.ravel())  # (batch,) accepted when k == 1
    assert value_flat == pytest.approx(value, rel=1e-15)
    np.testing.assert_array_equal(dz_flat, dz)
    with pytest.raises(ValueError):
        loss.value_and_grad(rng.standard_normal((5, 3)), np.zeros((5, 1)))
    with pytest.raises(ValueError):
        loss.value(rng.standard_normal((5, 3)), np.zeros(5))
    value, dz = loss.value_and_grad(np.zeros((0, 3)), np.zeros((0, 3)))
    assert value == 0.0 and dz.shape == (0, 3)
    assert loss.value(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


def test_bce_float32_and_registry():
    rng = np.random.default_rng(33)
    z, y = _bce_batch(rng, n=20, k=3)
    v64, g64 = BCEWithLogits().value_and_grad(z, y)
    v32, g32 = BCEWithLogits().value_and_grad(z.astype(np.float32), y.astype(np.float32))
    assert g32.dtype == np.float32
    assert v32 == pytest.approx(v64, rel=1e-5)
    np.testing.assert_allclose(g32, g64, rtol=1e-5, atol=1e-7)
    assert LOSSES["bce_with_logits"] is BCEWithLogits
    assert BCEWithLogits.task == "multilabel"
