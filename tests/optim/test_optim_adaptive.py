"""Adam, AdamW and RMSprop on the flat buffer against independent references of torch.optim's rules,
plus what every optimizer shares: ``steps``, ``lr``, slicing (ZeRO-1) and the checkpointed state."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest

from dptrain.optim import OPTIMIZERS, SGD, Adam, AdamW, RMSprop, hyperparameter_names

RTOL = 1e-12


# -- independent references, element by element in plain Python floats ---------------------------

def reference_adam(p0, grads, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False, scale=1.0):
    """torch.optim.Adam (decoupled=False) / AdamW (decoupled=True), amsgrad and maximize off.

    for t = 1, 2, ...:  grad = scale * grads[t - 1]
                        if decoupled: p = p * (1 - lr * weight_decay)
                        else:         grad = grad + weight_decay * p
                        m = beta1 * m + (1 - beta1) * grad
                        v = beta2 * v + (1 - beta2) * grad**2
                        m_hat = m / (1 - beta1**t)
                        p = p - lr * m_hat / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    Returns the parameter vectors after each step.
    """
    beta1, beta2 = betas
    p = [float(x) for x in p0]
    m, v = [0.0] * len(p), [0.0] * len(p)
    history = []
    for t, (grad, lr) in enumerate(zip(grads, lrs), start=1):
        for i in range(len(p)):
            g = scale * float(grad[i])
            if decoupled:
                p[i] = p[i] * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t)
            p[i] = p[i] - lr * m_hat / (math.sqrt(v[i]) / math.sqrt(1 - beta2**t) + eps)
        history.append(np.array(p))
    return history


def reference_rmsprop(p0, grads, lrs, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0, scale=1.0):
    """torch.optim.RMSprop, centered and maximize off.

    for each step:  g = scale * grad + weight_decay * p
                    s = alpha * s + (1 - alpha) * g**2
                    if momentum: buf = momentum * buf + g / (sqrt(s) + eps);  p = p - lr * buf
                    else:        p = p - lr * g / (sqrt(s) + eps)
    """
    p = [float(x) for x in p0]
    s, buf = [0.0] * len(p), [0.0] * len(p)
    history = []
    for grad, lr in zip(grads, lrs):
        for i in range(len(p)):
            g = scale * float(grad[i]) + weight_decay * p[i]
            s[i] = alpha * s[i] + (1 - alpha) * g * g
            step = g / (math.sqrt(s[i]) + eps)
            if momentum:
                buf[i] = momentum * buf[i] + step
                step = buf[i]
            p[i] = p[i] - lr * step
        history.append(np.array(p))
    return history


def problem(seed=0, n=37, steps=6):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n), [rng.standard_normal(n) for _ in range(steps)]


def run(opt_cls, p0, grads, lrs=None, scale=1.0, **kwargs):
    """Step a fresh optimizer over ``grads`` (written into one gradient buffer, as the trainer does);
    returns (optimizer, parameter vectors after each step)."""
    params, grad_buffer = np.array(p0, dtype=np.float64), np.zeros(len(p0))
    opt = opt_cls(params, grad_buffer, **kwargs)
    history = []
    for k, g in enumerate(grads):
        if lrs is not None:
            opt.lr = lrs[k]
        grad_buffer[...] = g
        opt.step(scale)
        history.append(params.copy())
    np.testing.assert_array_equal(grad_buffer, grads[-1])  # read, never written
    return opt, history


def assert_history(got, want):
    for k, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=0, err_msg=f"after step {k + 1}")


# -- against the references --------------------------------------------------------------------

@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
@pytest.mark.parametrize("lr", [1e-3, 0.1])
def test_adam_matches_reference(lr, betas, weight_decay):
    p0, grads = problem()
    opt, got = run(Adam, p0, grads, lr=lr, betas=betas, weight_decay=weight_decay)
    assert_history(got, reference_adam(p0, grads, [lr] * len(grads), betas, weight_decay=weight_decay))
    assert opt.steps == len(grads)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("lr", [1e-3, 0.1])
def test_adamw_matches_reference(lr, weight_decay):
    p0, grads = problem(1)
    opt, got = run(AdamW, p0, grads, lr=lr, weight_decay=weight_decay)
    assert_history(got, reference_adam(p0, grads, [lr] * len(grads), weight_decay=weight_decay, decoupled=True))
    assert opt.steps == len(grads)


def test_adamw_defaults_to_decay_and_differs_from_adam_l2():
    p0, grads = problem(2)
    _, adamw = run(AdamW, p0, grads, lr=0.05)
    assert_history(adamw, reference_adam(p0, grads, [0.05] * len(grads), weight_decay=0.01, decoupled=True))
    _, adam = run(Adam, p0, grads, lr=0.05, weight_decay=0.01)
    assert not np.allclose(adamw[-1], adam[-1], rtol=1e-9, atol=0)


@pytest.mark.parametrize("momentum, weight_decay", list(itertools.product([0.0, 0.9], [0.0, 0.01])))
@pytest.mark.parametrize("alpha", [0.99, 0.5])
def test_rmsprop_matches_reference(alpha, momentum, weight_decay):
    p0, grads = problem(3)
    opt, got = run(RMSprop, p0, grads, lr=0.01, alpha=alpha, momentum=momentum, weight_decay=weight_decay)
    want = reference_rmsprop(p0, grads, [0.01] * len(grads), alpha, momentum=momentum, weight_decay=weight_decay)
    assert_history(got, want)
    assert opt.steps == len(grads)


CASES = {  # name: (class, keyword arguments, reference returning the history)
    "adam": (Adam, dict(lr=0.02, weight_decay=0.05),
             lambda p0, g, lrs, scale: reference_adam(p0, g, lrs, weight_decay=0.05, scale=scale)),
    "adamw": (AdamW, dict(lr=0.02, weight_decay=0.05),
              lambda p0, g, lrs, scale: reference_adam(p0, g, lrs, weight_decay=0.05, decoupled=True, scale=scale)),
    "rmsprop": (RMSprop, dict(lr=0.02, momentum=0.9, weight_decay=0.05),
                lambda p0, g, lrs, scale: reference_rmsprop(p0, g, lrs, momentum=0.9, weight_decay=0.05, scale=scale)),
}


@pytest.mark.parametrize("name", CASES)
def test_the_gradient_is_grad_scale_times_grads(name):
    """The trainer leaves the sum over the batch in grads and passes 1 / batch size."""
    cls, kwargs, reference = CASES[name]
    p0, grads = problem(4)
    summed = [g * 24.0 for g in grads]
    _, got = run(cls, p0, summed, scale=1 / 24, **kwargs)
    assert_history(got, reference(p0, summed, [kwargs["lr"]] * len(grads), 1 / 24))
    # and is the mean: the same as stepping on the averaged gradient (up to rounding of the scale)
    _, mean = run(cls, p0, grads, **kwargs)
    np.testing.assert_allclose(got[-1], mean[-1], rtol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_lr_is_read_at_every_step(name):
    cls, kwargs, reference = CASES[name]
    p0, grads = problem(5)
    lrs = [0.001, 0.01, 0.05, 0.02, 0.004, 0.0]  # a schedule may end at 0
    _, got = run(cls, p0, grads, lrs=lrs, **kwargs)
    assert_history(got, reference(p0, grads, lrs, 1.0))
    np.testing.assert_array_equal(got[-1], got[-2])  # lr = 0: no change (AdamW's decay factor is 1)


# Computed once with torch 2.13 (float64) from p0 = TORCH_P0 and the gradients TORCH_GRADS, three
# optimizer.step() calls; the final parameters, pasted here.
TORCH_P0 = [0.5, -1.25, 2.0, 0.0]
TORCH_GRADS = [[0.1, -0.2, 0.3, -0.4], [-0.5, 0.25, 0.125, 1.0], [0.3, 0.3, -0.7, 0.05]]
TORCH_RESULTS = [
    # torch.optim.Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    (Adam, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
     [0.494242581482429, -1.2368777310364438, 1.9787328074041457, 0.0018583342048560719]),
    # torch.optim.AdamW(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    (AdamW, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1),
     [0.4954030434079074, -1.244489743388246, 1.978935526378987, 0.0011200230455396844]),
    # torch.optim.RMSprop(lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5, weight_decay=0.1)
    (RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5, weight_decay=0.1),
     [0.47057707942403704, -1.2283936369346833, 1.9395812412823885, 0.009366481042256796]),
    # torch.optim.RMSprop(lr=0.01), all else default
    (RMSprop, dict(lr=0.01),
     [0.4471711059248313, -1.2968698254246376, 1.9522231040430253, 0.00242430453259163]),
]


@pytest.mark.parametrize("cls, kwargs, expected", TORCH_RESULTS)
def test_known_values_from_torch(cls, kwargs, expected):
    grads = [np.array(g) * 4.0 for g in TORCH_GRADS]  # summed over a "batch" of 4: scale 0.25 is exact
    _, got = run(cls, TORCH_P0, grads, scale=0.25, **kwargs)
    np.testing.assert_allclose(got[-1], expected, rtol=RTOL, atol=1e-15)


def test_defaults_are_torchs():
    p, g = np.zeros(3), np.zeros(3)
    assert Adam(p, g).hyperparameters() == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert AdamW(p, g).hyperparameters() == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    assert RMSprop(p, g).hyperparameters() == dict(lr=0.01, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0)


# -- what every optimizer shares ----------------------------------------------------------------

ALL = {  # name: (class, keyword arguments exercising every state array)
    "sgd": (SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (Adam, dict(lr=0.01, weight_decay=0.01)),
    "adamw": (AdamW, dict(lr=0.01, betas=(0.8, 0.95))),
    "rmsprop": (RMSprop, dict(lr=0.01, momentum=0.5, weight_decay=0.01)),
    "rmsprop_plain": (RMSprop, dict(lr=0.01)),
}
STATE_NAMES = {"sgd": {"momentum_buffer"}, "adam": {"exp_avg", "exp_avg_sq"}, "adamw": {"exp_avg", "exp_avg_sq"},
               "rmsprop": {"square_avg", "momentum_buffer"}, "rmsprop_plain": {"square_avg"}}


def test_registry():
    assert OPTIMIZERS == {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}
    for name, cls in OPTIMIZERS.items():
        assert cls.name == name
    assert hyperparameter_names("sgd") == {"lr", "momentum", "nesterov", "weight_decay"}
    assert hyperparameter_names("adam") == hyperparameter_names("adamw") == {"lr", "betas", "eps", "weight_decay"}
    assert hyperparameter_names("rmsprop") == {"lr", "alpha", "eps", "momentum", "weight_decay"}
    with pytest.raises(ValueError, match="lamb"):
        hyperparameter_names("lamb")


@pytest.mark.parametrize("name", ALL)
def test_steps_counts_updates_and_the_update_is_in_place(name):
    cls, kwargs = ALL[name]
    p0, grads = problem(6)
    params, grad_buffer = p0.copy(), np.zeros_like(p0)
    opt = cls(params, grad_buffer, **kwargs)
    assert opt.steps == 0 and isinstance(opt.steps, int)
    for k, g in enumerate(grads, start=1):
        grad_buffer[...] = g
        opt.step(0.5)
        assert opt.steps == k
    assert opt.params is params and opt.grads is grad_buffer
    assert not np.array_equal(params, p0)


@pytest.mark.parametrize("name", ALL)
def test_sharding_two_slices_equals_the_whole(name):
    """ZeRO-1: each rank steps its slice with with_buffers over its block of the state; identical."""
    cls, kwargs = ALL[name]
    p0, grads = problem(7, n=101, steps=7)
    _, whole = run(cls, p0, grads, scale=0.125, **kwargs)

    params, grad_buffer = p0.copy(), np.zeros_like(p0)
    full = cls(params, grad_buffer, **kwargs)
    grad_buffer[...] = grads[0]
    full.step(0.125)  # steps and state from before the split carry over
    cut = 42
    halves = []
    for lo, hi in ((0, cut), (cut, len(p0))):
        part = full.with_buffers(params[lo:hi], grad_buffer[lo:hi])
        assert type(part) is cls and part.hyperparameters() == full.hyperparameters()
        assert part.steps == full.steps == 1
        assert set(part.state_dict()) == STATE_NAMES[name]
        assert all(not np.any(v) for v in part.state_dict().values())  # fresh state, to be loaded
        part.load_state_dict({k: v[lo:hi] for k, v in full.state_dict().items()})
        halves.append(part)
    for g in grads[1:]:
        grad_buffer[...] = g
        for part in halves:
            part.step(0.125)
    if cls is SGD:  # BLAS axpy: whether an element falls in the FMA kernel or the tail depends on the slice
        np.testing.assert_allclose(params, whole[-1], rtol=1e-15, atol=1e-15)
    else:  # NumPy ufuncs round every element the same way wherever the slice starts: exact
        np.testing.assert_array_equal(params, whole[-1])
    assert [part.steps for part in halves] == [len(grads)] * 2


def test_with_buffers_copies_lr_and_steps_as_set_by_the_trainer():
    opt = AdamW(np.zeros(6), np.zeros(6), lr=0.1, betas=(0.5, 0.6), eps=1e-6, weight_decay=0.2)
    opt.lr, opt.steps = 0.0, 17  # a schedule may set an lr the constructor refuses
    part = opt.with_buffers(np.zeros(3), np.zeros(3))
    assert (part.lr, part.steps) == (0.0, 17)
    assert (part.betas, part.eps, part.weight_decay) == ((0.5, 0.6), 1e-6, 0.2)
    assert part.params.shape == (3,) and part.exp_avg.shape == (3,)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_resumes_identically(name):
    cls, kwargs = ALL[name]
    p0, grads = problem(8, steps=8)
    _, whole = run(cls, p0, grads, **kwargs)

    params, grad_buffer = p0.copy(), np.zeros_like(p0)
    a = cls(params, grad_buffer, **kwargs)
    for g in grads[:3]:
        grad_buffer[...] = g
        a.step()
    live = a.state_dict()
    assert set(live) == STATE_NAMES[name]
    for key, array in live.items():  # the optimizer's own arrays (the trainer broadcasts into them)
        assert array is getattr(a, key) and array.shape == p0.shape
    state = {k: np.array(v, copy=True) for k, v in live.items()}  # "written to disk"
    saved_steps = a.steps

    def resumed(steps):
        p, gb = params.copy(), np.zeros_like(p0)
        b = cls(p, gb, **kwargs)
        b.load_state_dict(state)
        b.steps = steps  # the trainer restores it from the checkpoint's meta
        for key, array in state.items():
            assert not np.shares_memory(getattr(b, key), array)
        for g in grads[3:]:
            gb[...] = g
            b.step()
        return p

    np.testing.assert_array_equal(resumed(saved_steps), whole[-1])
    if name.startswith("adam"):  # the bias correction needs steps: forgetting it changes the result
        assert not np.array_equal(resumed(0), whole[-1])


@pytest.mark.parametrize("name", ALL)
def test_load_state_dict_refuses_a_bad_state_and_changes_nothing(name):
    cls, kwargs = ALL[name]
    opt = cls(np.ones(5), np.ones(5), **kwargs)
    opt.step()
    before = {k: v.copy() for k, v in opt.state_dict().items()}
    good = {k: np.full(5, 0.5) for k in STATE_NAMES[name]}
    for key in sorted(STATE_NAMES[name]):
        with pytest.raises(ValueError, match=f"{key}.*shape"):
            opt.load_state_dict({**good, key: np.zeros(6)})
        with pytest.raises(ValueError, match=f"{key}.*missing"):
            opt.load_state_dict({k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="unexpected.*velocity"):
        opt.load_state_dict({**good, "velocity": np.zeros(5)})
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_loading_another_optimizers_state_is_refused():
    adam = Adam(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="exp_avg"):
        adam.load_state_dict(SGD(np.zeros(4), np.zeros(4)).state_dict())
    rms = RMSprop(np.zeros(4), np.zeros(4), momentum=0.9)
    with pytest.raises(ValueError, match="momentum_buffer"):
        rms.load_state_dict(RMSprop(np.zeros(4), np.zeros(4)).state_dict())


@pytest.mark.parametrize("name", ALL)
def test_float32_stays_float32(name):
    cls, kwargs = ALL[name]
    p0, grads = problem(9)
    params, grad_buffer = p0.astype(np.float32), np.zeros(len(p0), dtype=np.float32)
    opt = cls(params, grad_buffer, **kwargs)
    for g in grads:
        grad_buffer[...] = g
        opt.step(0.5)
    assert params.dtype == np.float32
    assert all(v.dtype == np.float32 for v in opt.state_dict().values())
    _, want = run(cls, p0, grads, scale=0.5, **kwargs)
    np.testing.assert_allclose(params, want[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_steady_state_steps_allocate_nothing(name):
    """No array is allocated per step (NumPy reports its data allocations to tracemalloc)."""
    cls, kwargs = ALL[name]
    n = 200_000
    rng = np.random.default_rng(10)
    params, grad_buffer = rng.standard_normal(n), rng.standard_normal(n)
    opt = cls(params, grad_buffer, **kwargs)
    opt.step(0.5)
    tracemalloc.start()
    try:
        for _ in range(3):
            opt.step(0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * 8 // 20, f"{peak} bytes allocated during steps (a float64 temporary is {n * 8})"


@pytest.mark.parametrize(
    "cls, kwargs, word",
    [
        (Adam, dict(lr=0.0), "lr"),
        (Adam, dict(lr=-1e-3), "lr"),
        (Adam, dict(lr=float("nan")), "lr"),
        (Adam, dict(lr=float("inf")), "lr"),
        (Adam, dict(betas=(1.0, 0.999)), "betas"),
        (Adam, dict(betas=(0.9, -0.1)), "betas"),
        (Adam, dict(betas=(0.9,)), "betas"),
        (Adam, dict(betas=0.9), "betas"),
        (Adam, dict(betas=(0.9, float("nan"))), "betas"),
        (Adam, dict(eps=0.0), "eps"),
        (Adam, dict(eps=-1e-8), "eps"),
        (Adam, dict(weight_decay=-0.01), "weight_decay"),
        (Adam, dict(weight_decay=float("nan")), "weight_decay"),
        (AdamW, dict(lr=0.0), "lr"),
        (AdamW, dict(betas=(0.9, 1.0)), "betas"),
        (AdamW, dict(weight_decay=-0.01), "weight_decay"),
        (RMSprop, dict(lr=-0.01), "lr"),
        (RMSprop, dict(alpha=1.0), "alpha"),
        (RMSprop, dict(alpha=-0.1), "alpha"),
        (RMSprop, dict(eps=0.0), "eps"),
        (RMSprop, dict(momentum=1.0), "momentum"),
        (RMSprop, dict(momentum=-0.5), "momentum"),
        (RMSprop, dict(weight_decay=-1.0), "weight_decay"),
        (SGD, dict(lr=float("inf")), "lr"),
    ],
)
def test_invalid_hyperparameters(cls, kwargs, word):
    with pytest.raises(ValueError, match=word):
        cls(np.zeros(3), np.zeros(3), **kwargs)


def test_buffers_must_match():
    with pytest.raises(ValueError, match="same shape"):
        Adam(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="1-d"):
        RMSprop(np.zeros((2, 3)), np.zeros((2, 3)))


@pytest.mark.parametrize("cls", [Adam, AdamW, RMSprop])
@pytest.mark.parametrize("eps", [1.0, 1.5, float("inf"), float("nan")])
def test_eps_must_be_below_one(cls, eps):
    """The same rule as the config's optim.eps: in (0, 1)."""
    with pytest.raises(ValueError, match="eps"):
        cls(np.zeros(3), np.zeros(3), eps=eps)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_hyperparameters_are_the_constructor_arguments(name):
    """hyperparameters() holds exactly the keyword arguments that rebuild the optimizer."""
    from dptrain.optim import OPTIMIZERS, hyperparameter_names

    cls, kwargs = {"sgd": ALL["sgd"], "adam": ALL["adam"], "adamw": ALL["adamw"], "rmsprop": ALL["rmsprop"]}[name]
    opt = cls(np.zeros(3), np.zeros(3), **kwargs)
    hyper = opt.hyperparameters()
    assert set(hyper) == hyperparameter_names(name)
    assert OPTIMIZERS[name](np.zeros(3), np.zeros(3), **hyper).hyperparameters() == hyper
    for key, value in kwargs.items():
        assert hyper[key] == value


@pytest.mark.parametrize("cls, kwargs", [ALL["adam"], ALL["adamw"], ALL["rmsprop"], ALL["rmsprop_plain"]],
                         ids=["adam", "adamw", "rmsprop", "rmsprop_plain"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_give_bitwise_the_whole_buffer_update(cls, kwargs, dtype, monkeypatch):
    """The update runs over blocks of BLOCK elements: any block size gives bitwise the same
    parameters and state as one block over the whole buffer (elementwise ufuncs only)."""
    n = 1000
    rng = np.random.default_rng(3)
    p0, grads = rng.standard_normal(n).astype(dtype), [rng.standard_normal(n).astype(dtype) for _ in range(4)]
    results = []
    for block in (n, 64, 7, 1):
        monkeypatch.setattr(cls, "BLOCK", block)
        p, g = p0.copy(), np.empty_like(p0)
        opt = cls(p, g, **kwargs)
        assert len(opt._scratch) == min(n, block)
        for k, grad in enumerate(grads):
            g[...] = grad
            opt.step(0.25 if k % 2 else 1.0)
        results.append((p, opt.state_dict()))
    for p, state in results[1:]:
        np.testing.assert_array_equal(p, results[0][0])
        for key, value in state.items():
            np.testing.assert_array_equal(value, results[0][1][key])
