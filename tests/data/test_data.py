"""Datasets, the split and the sampler: pure functions, identical on every rank."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain.data import load_digits, load_npz, make_synthetic, split_train_val, steps_per_epoch
from dptrain.errors import UserError
from dptrain.parallel.sampler import epoch_order, global_batch, shard


def test_digits():
    d = load_digits()
    assert d.x.shape == (1797, 64) and d.y.shape == (1797,)
    assert d.x.min() == 0 and d.x.max() == 1 and d.n_classes == 10


def test_synthetic_is_seeded():
    a, b, c = make_synthetic(50, 4, 3, seed=1), make_synthetic(50, 4, 3, seed=1), make_synthetic(50, 4, 3, seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    assert a.y.min() >= 0 and a.y.max() < 3


def test_split_is_deterministic_and_disjoint():
    train, val = split_train_val(101, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 81
    assert not set(train) & set(val) and set(train) | set(val) == set(range(101))
    np.testing.assert_array_equal(split_train_val(101, 0.2, seed=3)[1], val)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_every_global_batch_is_covered_exactly_once_by_the_shards(world):
    n, batch = 53, 10
    order = epoch_order(n, seed=0, epoch=2)
    seen = []
    for k in range(steps_per_epoch(n, batch)):
        g = global_batch(order, k, batch)
        parts = [shard(g, r, world) for r in range(world)]
        assert sorted(np.concatenate(parts)) == sorted(g)
        seen.extend(g)
    assert sorted(seen) == list(range(n))


def test_epoch_orders_differ_by_epoch_not_by_call():
    np.testing.assert_array_equal(epoch_order(20, 0, 1), epoch_order(20, 0, 1))
    assert not np.array_equal(epoch_order(20, 0, 1), epoch_order(20, 0, 2))
    np.testing.assert_array_equal(epoch_order(20, 0, 5, shuffle=False), np.arange(20))


def test_npz_classification_and_regression(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, x=np.zeros((5, 3)), y=np.array([0, 1, 2, 1, 0]))
    d = load_npz(str(p))
    assert d.task == "classification" and d.n_classes == 3
    p = tmp_path / "r.npz"
    np.savez(p, x=np.zeros((5, 3)), y=np.ones((5, 2)))
    d = load_npz(str(p))
    assert d.task == "regression" and d.n_outputs == 2


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((4, 2))}, "no array named 'y'"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=int)}, "x has 4 rows but y has 3"),
    ({"x": np.full((2, 2), np.nan), "y": np.zeros(2, dtype=int)}, "NaN"),
    ({"x": np.zeros((2, 2)), "y": np.array([0, -1])}, "labels must lie in"),
    ({"x": np.zeros(4), "y": np.zeros(4, dtype=int)}, "shape (N, D)"),
])
def test_npz_errors_name_the_file(tmp_path, arrays, message):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(UserError, match="bad.npz") as info:
        load_npz(str(p))
    assert message in str(info.value)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, dtype=int))
    with pytest.raises(UserError, match="evil.npz"):
        load_npz(str(p))
