"""Learning-rate schedules: values at key steps, warmup, decay shapes, the linear scaling rule, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptrain.optim.schedules import SCHEDULES, Schedule, make_schedule, scaled_lr


def values(schedule, n):
    return np.array([schedule(s) for s in range(n)])


def test_constant():
    lr_at = make_schedule("constant", 0.1, total_steps=50)
    assert isinstance(lr_at, Schedule)
    assert all(lr_at(s) == 0.1 for s in (0, 1, 49, 50, 10_000))
    assert isinstance(lr_at(3), float)


@pytest.mark.parametrize("name", SCHEDULES)
def test_linear_warmup_goyal(name):
    """lr(s) = base_lr * (s + 1) / warmup_steps for s < warmup_steps, then the schedule from base_lr."""
    lr_at = make_schedule(name, 0.4, total_steps=100, warmup_steps=5, step_size=10)
    assert [lr_at(s) for s in range(5)] == [0.4 * (s + 1) / 5 for s in range(5)]
    assert lr_at(0) == pytest.approx(0.08, rel=1e-15)
    assert lr_at(4) == 0.4  # the warmup ends at the full lr
    assert lr_at(5) == 0.4  # the schedule starts from the full lr
    assert np.all(np.diff(values(lr_at, 5)) > 0)


def test_warmup_over_the_whole_run():
    lr_at = make_schedule("constant", 1.0, total_steps=4, warmup_steps=4)
    assert [lr_at(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_step_decay():
    lr_at = make_schedule("step", 0.1, total_steps=100, step_size=30, gamma=0.5)
    assert lr_at(0) == lr_at(29) == 0.1
    assert lr_at(30) == lr_at(59) == 0.05
    assert lr_at(60) == 0.025
    assert lr_at(90) == lr_at(99) == 0.0125


def test_step_decay_counts_from_the_end_of_the_warmup():
    lr_at = make_schedule("step", 1.0, total_steps=100, warmup_steps=10, step_size=20)  # gamma 0.1
    assert lr_at(9) == 1.0 and lr_at(10) == 1.0 and lr_at(29) == 1.0
    assert lr_at(30) == pytest.approx(0.1, rel=1e-15)
    assert lr_at(50) == pytest.approx(0.01, rel=1e-15)


def test_cosine_formula_and_end_points():
    base, low, total = 0.2, 0.002, 40
    lr_at = make_schedule("cosine", base, total_steps=total, min_lr=low)
    assert lr_at(0) == base
    assert lr_at(20) == pytest.approx((base + low) / 2, rel=1e-15)  # half way: the mean
    assert lr_at(total) == pytest.approx(low, rel=1e-15)
    assert lr_at(total + 7) == lr_at(total)  # no restart: it stays at min_lr
    for s in range(total):  # torch.optim.lr_scheduler.CosineAnnealingLR's closed form, T_max = total
        want = low + (base - low) * (1 + math.cos(math.pi * s / total)) / 2
        assert lr_at(s) == pytest.approx(want, rel=1e-15)
    assert lr_at(total - 1) > low


def test_cosine_after_warmup_is_monotone_down_to_min_lr():
    lr_at = make_schedule("cosine", 0.5, total_steps=200, warmup_steps=20)
    lrs = values(lr_at, 201)
    assert np.all(np.diff(lrs[:20]) > 0)  # warmup up
    assert lrs[19] == lrs[20] == 0.5
    assert np.all(np.diff(lrs[20:]) < 0)  # then strictly down
    assert lrs[110] == pytest.approx(0.25, rel=1e-15)  # half way through the 180 decaying steps
    assert lrs[200] == pytest.approx(0.0, abs=1e-18)
    assert np.all(lrs[:200] > 0)  # every step taken has a positive lr


def test_one_step_runs():
    assert make_schedule("cosine", 0.1, total_steps=1)(0) == 0.1
    assert make_schedule("constant", 0.1, total_steps=1, warmup_steps=1)(0) == 0.1


def test_a_schedule_is_a_pure_function_of_the_step():
    a = make_schedule("cosine", 0.1, total_steps=30, warmup_steps=3)
    b = make_schedule("cosine", 0.1, total_steps=30, warmup_steps=3)
    forward = [a(s) for s in range(30)]
    backward = [b(s) for s in reversed(range(30))][::-1]
    assert forward == backward and a == b


def test_unused_arguments_are_ignored():
    """A trainer may pass every schedule field whatever the name; only the used ones are checked."""
    assert make_schedule("constant", 0.1, 10, step_size=None, gamma=5.0, min_lr=1.0)(3) == 0.1
    assert make_schedule("cosine", 0.1, 10, step_size=0)(0) == 0.1


def test_scaled_lr():
    assert scaled_lr(0.1, 1024, 256) == pytest.approx(0.4, rel=1e-15)
    assert scaled_lr(0.1, 64, 256) == pytest.approx(0.025, rel=1e-15)
    assert scaled_lr(0.1, 256, 256) == 0.1
    assert scaled_lr(0.1, 1024, 0) == 0.1  # off
    assert scaled_lr(0.1, 1024, None) == 0.1  # off
    assert scaled_lr(0.1, np.int64(512), np.int64(256)) == pytest.approx(0.2, rel=1e-15)


@pytest.mark.parametrize(
    "args, kwargs, word",
    [
        (("linear", 0.1, 10), {}, "schedule"),
        (("constant", 0.0, 10), {}, "base_lr"),
        (("constant", -0.1, 10), {}, "base_lr"),
        (("constant", float("nan"), 10), {}, "base_lr"),
        (("constant", float("inf"), 10), {}, "base_lr"),
        (("constant", 0.1, 0), {}, "total_steps"),
        (("constant", 0.1, 10.0), {}, "total_steps"),
        (("constant", 0.1, 10), dict(warmup_steps=-1), "warmup_steps"),
        (("constant", 0.1, 10), dict(warmup_steps=11), "warmup_steps"),
        (("constant", 0.1, 10), dict(warmup_steps=2.5), "warmup_steps"),
        (("step", 0.1, 10), {}, "step_size"),
        (("step", 0.1, 10), dict(step_size=0), "step_size"),
        (("step", 0.1, 10), dict(step_size=3, gamma=0.0), "gamma"),
        (("step", 0.1, 10), dict(step_size=3, gamma=1.5), "gamma"),
        (("cosine", 0.1, 10), dict(warmup_steps=10), "warmup_steps"),
        (("cosine", 0.1, 10), dict(min_lr=-0.01), "min_lr"),
        (("cosine", 0.1, 10), dict(min_lr=0.2), "min_lr"),
        (("cosine", 0.1, 10), dict(min_lr=float("nan")), "min_lr"),
    ],
)
def test_make_schedule_refuses_bad_arguments(args, kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_schedule(*args, **kwargs)


@pytest.mark.parametrize("step", [-1, 1.5, True, None])
def test_a_step_must_be_a_non_negative_integer(step):
    with pytest.raises(ValueError, match="step"):
        make_schedule("constant", 0.1, 10)(step)


@pytest.mark.parametrize(
    "args, word",
    [
        ((0.0, 256, 256), "lr"),
        ((float("nan"), 256, 256), "lr"),
        ((0.1, 0, 256), "global_batch"),
        ((0.1, 2.5, 256), "global_batch"),
        ((0.1, 256, -256), "reference_batch"),
        ((0.1, 256, 25.6), "reference_batch"),
    ],
)
def test_scaled_lr_refuses_bad_arguments(args, word):
    with pytest.raises(ValueError, match=word):
        scaled_lr(*args)
