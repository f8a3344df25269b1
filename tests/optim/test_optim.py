"""SGD on the flat buffer against an independent reference of torch.optim.SGD's documented rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dptrain.nn.layers import Dense, ReLU
from dptrain.nn.model import Sequential
from dptrain.optim import SGD


def reference_sgd(p0, grad_steps, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD (dampening 0, maximize False), written element by element in plain Python.

    for each step:  g = grad + weight_decay * p
                    if momentum: buf = momentum * buf + g   (buf starts at 0)
                                 g = g + momentum * buf if nesterov else buf
                    p = p - lr * g
    Returns the list of parameter vectors after each step.
    """
    p = [float(v) for v in p0]
    buf = [0.0] * len(p)
    history = []
    for grad in grad_steps:
        for i in range(len(p)):
            g = float(grad[i]) + weight_decay * p[i]
            if momentum != 0:
                buf[i] = momentum * buf[i] + g
                g = g + momentum * buf[i] if nesterov else buf[i]
            p[i] = p[i] - lr * g
        history.append(np.array(p))
    return history


CASES = [
    (momentum, nesterov, wd)
    for momentum, nesterov, wd in itertools.product([0.0, 0.9], [False, True], [0.0, 0.01])
    if not (nesterov and momentum == 0)
]


@pytest.mark.parametrize("momentum, nesterov, weight_decay", CASES)
@pytest.mark.parametrize("lr", [0.1, 0.003])
def test_sgd_matches_reference(lr, momentum, nesterov, weight_decay):
    rng = np.random.default_rng(0)
    n = 37
    p0 = rng.standard_normal(n)
    grad_steps = [rng.standard_normal(n) for _ in range(5)]
    expected = reference_sgd(p0, grad_steps, lr, momentum, nesterov, weight_decay)

    params = p0.copy()
    grads = np.zeros(n)
    opt = SGD(params, grads, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for g, want in zip(grad_steps, expected):
        grads[...] = g  # the trainer writes the averaged gradient into the same buffer every step
        opt.step()
        np.testing.assert_allclose(params, want, rtol=0, atol=1e-12)
    # the gradient buffer is read, never written
    np.testing.assert_array_equal(grads, grad_steps[-1])


@pytest.mark.parametrize("momentum, nesterov, weight_decay", CASES)
def test_sgd_updates_the_model_buffer_in_place(momentum, nesterov, weight_decay):
    rng = np.random.default_rng(1)
    model = Sequential([Dense(6), ReLU(), Dense(3, init="xavier")], 4, dtype=np.float64)
    model.init_params(rng)
    params_before = model.param_buffer
    copy_before = params_before.copy()
    weight_view = model.layers[0].params["weight"]
    opt = SGD(model.param_buffer, model.grad_buffer, lr=0.1, momentum=momentum, nesterov=nesterov,
              weight_decay=weight_decay)
    for _ in range(3):
        model.grad_buffer[...] = rng.standard_normal(model.n_params)
        opt.step()
    # the very same array object, memory and dtype
    assert model.param_buffer is params_before
    assert opt.params is params_before and opt.grads is model.grad_buffer
    assert np.shares_memory(weight_view, model.param_buffer)
    assert model.param_buffer.dtype == np.float64
    # and the update is visible through the layers' views
    assert not np.array_equal(model.param_buffer, copy_before)
    np.testing.assert_array_equal(weight_view.ravel(), model.param_buffer[: weight_view.size])


def test_sgd_keeps_float32():
    params = np.ones(8, dtype=np.float32)
    grads = np.full(8, 0.5, dtype=np.float32)
    opt = SGD(params, grads, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    opt.step()
    assert params.dtype == np.float32 and opt.momentum_buffer.dtype == np.float32
    expected = reference_sgd(np.ones(8), [np.full(8, 0.5)], 0.1, 0.9, True, 0.01)[0]
    np.testing.assert_allclose(params, expected, rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_state_dict_round_trip(nesterov):
    rng = np.random.default_rng(2)
    n = 20
    p0 = rng.standard_normal(n)
    grad_steps = [rng.standard_normal(n) for _ in range(6)]
    kwargs = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01)

    # uninterrupted run
    p_full, g_full = p0.copy(), np.zeros(n)
    full = SGD(p_full, g_full, **kwargs)
    for g in grad_steps:
        g_full[...] = g
        full.step()

    # three steps, "checkpoint" (copies, as if written to disk), resume in a fresh optimizer
    p_a, g_a = p0.copy(), np.zeros(n)
    a = SGD(p_a, g_a, **kwargs)
    for g in grad_steps[:3]:
        g_a[...] = g
        a.step()
    state = {k: np.array(v, copy=True) for k, v in a.state_dict().items()}
    assert set(state) == {"momentum_buffer"}
    assert np.any(state["momentum_buffer"] != 0)

    p_b, g_b = p_a.copy(), np.zeros(n)
    b = SGD(p_b, g_b, **kwargs)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.state_dict()["momentum_buffer"], state["momentum_buffer"])
    # loading copies: the optimizer does not alias the caller's array
    assert not np.shares_memory(b.momentum_buffer, state["momentum_buffer"])
    state["momentum_buffer"][...] = 0.0
    assert np.any(b.momentum_buffer != 0)

    for g in grad_steps[3:]:
        g_b[...] = g
        b.step()
    np.testing.assert_array_equal(p_b, p_full)


def test_load_state_dict_refuses_a_wrong_shape_or_missing_buffer():
    opt = SGD(np.zeros(5), np.zeros(5), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.load_state_dict({"momentum_buffer": np.zeros(6)})
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.load_state_dict({})
    np.testing.assert_array_equal(opt.momentum_buffer, np.zeros(5))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.0),
        dict(lr=-0.1),
        dict(lr=float("nan")),
        dict(lr=0.1, weight_decay=-0.01),
        dict(lr=0.1, nesterov=True),
        dict(lr=0.1, momentum=0.0, nesterov=True),
        dict(lr=0.1, momentum=-0.5),
        dict(lr=0.1, momentum=1.0),
    ],
)
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        SGD(np.zeros(3), np.zeros(3), **kwargs)
