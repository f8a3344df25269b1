"""Augmentation and channel statistics: the crop and flip against a plain per-sample loop, the
choices of a sample as a pure function of (seed, epoch, row) whatever batch or shard holds it, the
documented formula, their frequencies; the statistics exact on pixels, whatever the chunks."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from dptrain.data import Augment, Dataset, channel_stats

# ---------------------------------------------------------------------------------------------
# Independent truths: a loop over samples, the hash written out with Python ints


def reference_augment(x, dy, dx, flip, p):
    """np.pad, a slice, and [..., ::-1], one sample at a time."""
    _, _, height, width = x.shape
    out = np.empty_like(x)
    for i in range(len(x)):
        window = np.pad(x[i], ((0, 0), (p, p), (p, p)))[:, dy[i]:dy[i] + height, dx[i]:dx[i] + width]
        out[i] = window[..., ::-1] if flip[i] else window
    return out


def _mix(v):
    m = (1 << 64) - 1
    v &= m
    v ^= v >> 30
    v = (v * 0xBF58476D1CE4E5B9) & m
    v ^= v >> 27
    v = (v * 0x94D049BB133111EB) & m
    return v ^ (v >> 31)


def reference_choice(seed, epoch, row, p, hflip):
    """(dy, dx, flip) of one sample as the module docstring writes them."""
    key = _mix(_mix(0xBB67AE8584CAA73B ^ seed) ^ epoch)
    s = _mix(key ^ row)
    h = [_mix(s + (k + 1) * 0x9E3779B97F4A7C15) for k in range(3)]
    return ((h[0] >> 32) * (2 * p + 1)) >> 32, ((h[1] >> 32) * (2 * p + 1)) >> 32, bool(h[2] >> 63) and hflip


def images(n=16, c=3, h=7, w=9, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(dtype)


# ---------------------------------------------------------------------------------------------
# The crop and the flip


@pytest.mark.parametrize("p, hflip, shape, dtype", [
    (4, True, (3, 7, 9), np.float32),
    (2, False, (1, 5, 5), np.float64),
    (0, True, (3, 4, 6), np.float32),
    (5, True, (2, 3, 2), np.float64),  # padding beyond the image: some windows hold no pixel of it
    (1, True, (3, 1, 1), np.float32),
])
def test_augment_is_the_per_sample_loop(p, hflip, shape, dtype):
    x = images(40, *shape, dtype=dtype)
    rows = np.arange(100, 140)
    augment = Augment(seed=7, crop_padding=p, hflip=hflip)
    y = augment(x, rows, epoch=3)
    dy, dx, flip = augment.choices(rows, 3)
    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(y, reference_augment(x, dy, dx, flip, p))
    if hflip:
        assert 0 < flip.sum() < len(flip)
    if p:
        assert len(set(dy)) > 1 and len(set(dx)) > 1


def test_choices_are_the_documented_function():
    rows = np.array([0, 1, 17, 123456789012, 2**40 + 3])
    for seed, epoch, p in [(0, 0, 4), (5, 9, 1), (2**63 + 11, 2, 16), (3, 1, 0)]:
        dy, dx, flip = Augment(seed, crop_padding=p, hflip=True).choices(rows, epoch)
        expected = [reference_choice(seed, epoch, int(r), p, True) for r in rows]
        assert [(int(a), int(b), bool(f)) for a, b, f in zip(dy, dx, flip)] == expected
        assert dy.dtype == dx.dtype == np.intp and flip.dtype == np.bool_


def test_a_sample_gets_the_same_choices_in_any_batch_or_shard():
    augment = Augment(seed=3, crop_padding=4, hflip=True)
    rows = np.random.default_rng(1).choice(10_000, 64, replace=False)
    x = images(64, 3, 8, 8)
    whole = augment(x, rows, epoch=5)
    dy, dx, flip = augment.choices(rows, 5)
    order = np.random.default_rng(2).permutation(64)
    shuffled = augment(x[order], rows[order], epoch=5)
    np.testing.assert_array_equal(shuffled, whole[order])
    for ranks in (2, 4):
        for shard in np.array_split(order, ranks):  # the rows a rank would hold of this batch
            np.testing.assert_array_equal(augment(x[shard], rows[shard], epoch=5), whole[shard])
            got = augment.choices(rows[shard], 5)
            for a, b in zip(got, (dy[shard], dx[shard], flip[shard])):
                np.testing.assert_array_equal(a, b)


def test_epochs_and_seeds_change_the_choices():
    rows = np.arange(200)

    def stacked(seed, epoch):
        return np.stack(Augment(seed, crop_padding=4, hflip=True).choices(rows, epoch))

    base = stacked(0, 0)
    for other in (stacked(0, 1), stacked(1, 0), stacked(0, 2), stacked(2, 1)):
        assert np.mean(np.any(other != base, axis=0)) > 0.8  # most samples get other choices
    np.testing.assert_array_equal(stacked(0, 0), base)  # and the same ones again


def test_hflip_leaves_the_offsets_as_they_were():
    rows = np.arange(500)
    dy, dx, flip = Augment(4, crop_padding=3).choices(rows, 2)
    dy2, dx2, flip2 = Augment(4, crop_padding=3, hflip=True).choices(rows, 2)
    np.testing.assert_array_equal(dy, dy2)
    np.testing.assert_array_equal(dx, dx2)
    assert not flip.any() and flip2.any()


def test_flips_are_fair_and_offsets_uniform():
    n, p = 40_000, 4
    dy, dx, flip = Augment(seed=11, crop_padding=p, hflip=True).choices(np.arange(n), 6)
    assert abs(flip.sum() - n / 2) < 5 * math.sqrt(n / 4)  # 5 standard deviations
    m = 2 * p + 1
    for offsets in (dy, dx):
        counts = np.bincount(offsets, minlength=m)
        assert len(counts) == m and counts.min() > 0
        chi2 = np.sum((counts - n / m) ** 2 / (n / m))
        assert chi2 < 30  # 8 degrees of freedom: P(chi2 > 30) is 2e-4
    joint = np.bincount(dy * m + dx, minlength=m * m)  # dy and dx independent
    assert np.sum((joint - n / m**2) ** 2 / (n / m**2)) < 140  # 80 degrees of freedom: P(> 140) < 1e-4
    assert abs(np.mean(flip[dx < p]) - 0.5) < 0.03  # the flip does not follow the offset


def test_nothing_to_do_is_the_identity_on_a_new_array():
    x = images()
    augment = Augment(seed=1)
    assert not augment.active and augment.describe() == "none"
    y = augment(x, np.arange(len(x)), epoch=0)
    np.testing.assert_array_equal(y, x)
    assert not np.shares_memory(y, x)
    dy, dx, flip = augment.choices(np.arange(5), 0)
    assert not dy.any() and not dx.any() and not flip.any()


def test_input_is_never_written():
    x = images(dtype=np.float64)
    before = x.copy()
    x.setflags(write=False)  # any write would raise
    for augment in (Augment(2, crop_padding=3, hflip=True), Augment(2, hflip=True), Augment(2)):
        y = augment(x, np.arange(len(x)), epoch=1)
        assert not np.shares_memory(y, x)
    np.testing.assert_array_equal(x, before)


def test_describe_and_active():
    assert Augment(0, crop_padding=4, hflip=True).describe() == "crop (padding 4), horizontal flip"
    assert Augment(0, crop_padding=2).describe() == "crop (padding 2)"
    assert Augment(0, hflip=True).describe() == "horizontal flip"
    assert Augment(0, crop_padding=1).active and Augment(0, hflip=True).active


@pytest.mark.parametrize("kwargs", [dict(seed=0, crop_padding=-1), dict(seed=0, crop_padding=2.0),
                                    dict(seed=True), dict(seed=0, hflip=1), dict(seed=0, crop_padding=2**31)])
def test_bad_arguments_are_refused_up_front(kwargs):
    with pytest.raises(ValueError):
        Augment(**kwargs)


def test_bad_shapes_are_refused():
    augment = Augment(0, crop_padding=1)
    with pytest.raises(ValueError, match="shape"):
        augment(np.zeros((4, 3, 5)), np.arange(4), 0)
    with pytest.raises(ValueError, match="rows"):
        augment(np.zeros((4, 1, 3, 5)), np.arange(3), 0)
    with pytest.raises(ValueError, match="integers"):
        augment.choices(np.array([0.5, 1.5]), 0)


def test_dataset_take_augments_training_rows_by_file_row():
    x = images(30, 2, 5, 5).reshape(30, -1)
    data = Dataset(x, np.arange(30) % 3, 3, "images")
    data.sample_shape = (2, 5, 5)
    data.augment = Augment(seed=9, crop_padding=2, hflip=True)
    view = data.subset(np.arange(29, -1, -1))  # view row i is file row 29 - i
    got, _ = view.take(np.array([0, 4, 7]), epoch=2)
    rows = np.array([29, 25, 22])
    expected = data.augment(x[rows].reshape(3, 2, 5, 5), rows, 2).reshape(3, -1)
    np.testing.assert_array_equal(got, expected)
    alone, _ = data.take(np.array([25]), epoch=2)  # the same sample in another batch, another view
    np.testing.assert_array_equal(alone[0], got[1])
    plain, _ = view.take(np.array([0, 4, 7]))  # no epoch: evaluation never augments
    np.testing.assert_array_equal(plain, x[rows])


# ---------------------------------------------------------------------------------------------
# Channel statistics


def pixels(n=50, shape=(3, 4, 5), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, math.prod(shape)), dtype=np.uint8)


def exact_stats(x, shape):
    """The correctly rounded mean and std per channel, by Fractions."""
    v = x.reshape(len(x), shape[0], -1).astype(np.int64)
    means, stds = [], []
    for ch in range(shape[0]):
        values = [int(a) for a in v[:, ch].ravel()]
        mean = Fraction(sum(values), len(values))
        var = sum((a - mean) ** 2 for a in values) / len(values)
        means.append(float(mean))
        stds.append(math.sqrt(float(var)))
    return np.array(means), np.array(stds)


def test_pixel_stats_are_exact():
    shape = (3, 4, 5)
    x = pixels(shape=shape)
    mean, std = channel_stats(x, shape)
    assert mean.dtype == std.dtype == np.float64 and mean.shape == std.shape == (3,)
    emean, estd = exact_stats(x, shape)
    np.testing.assert_array_equal(mean, emean)
    np.testing.assert_array_equal(std, estd)
    v = x.reshape(len(x), 3, -1).astype(np.float64)
    np.testing.assert_array_equal(mean, v.mean(axis=(0, 2)))  # integer sums are exact in float64 here
    np.testing.assert_allclose(std, v.std(axis=(0, 2)), rtol=1e-14)


def test_pixel_stats_do_not_depend_on_chunks_or_row_order():
    shape = (3, 4, 5)
    x = pixels(n=97, shape=shape, seed=3)
    rows = np.random.default_rng(4).choice(97, 60, replace=False)
    first = channel_stats(x, shape, rows=rows)
    for chunk_rows in (1, 7, 60, 1000):
        for order in (rows, np.sort(rows), rows[::-1]):
            got = channel_stats(x, shape, rows=order, chunk_rows=chunk_rows)
            for a, b in zip(got, first):
                np.testing.assert_array_equal(a, b)
    for a, b in zip(first, exact_stats(x[rows], shape)):
        np.testing.assert_array_equal(a, b)


def test_scale_gives_the_stats_of_scaled_pixels():
    shape = (3, 2, 2)
    x = pixels(shape=shape)
    mean, std = channel_stats(x, shape)
    smean, sstd = channel_stats(x, shape, scale=1 / 255)
    np.testing.assert_array_equal(smean, mean * (1 / 255))
    np.testing.assert_array_equal(sstd, std * (1 / 255))
    v = (x / 255).reshape(len(x), 3, -1)
    np.testing.assert_allclose(smean, v.mean(axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(sstd, v.std(axis=(0, 2)), rtol=1e-13)


def test_stats_of_a_memory_mapped_file(tmp_path):
    shape = (3, 4, 4)
    x = pixels(n=40, shape=shape, seed=5)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    rows = np.arange(0, 40, 3)
    for a, b in zip(channel_stats(mapped, shape, rows=rows, chunk_rows=4), channel_stats(x[rows], shape)):
        np.testing.assert_array_equal(a, b)


def test_float_stats_match_numpy_and_repeat_bitwise():
    shape = (2, 3, 3)
    x = np.random.default_rng(6).standard_normal((70, 18)) * 5 + 100
    v = x.reshape(70, 2, -1)
    for chunk_rows in (None, 1, 9):
        mean, std = channel_stats(x, shape, chunk_rows=chunk_rows)
        np.testing.assert_allclose(mean, v.mean(axis=(0, 2)), rtol=1e-14)
        np.testing.assert_allclose(std, v.std(axis=(0, 2)), rtol=1e-12)
        again = channel_stats(x, shape, chunk_rows=chunk_rows)
        np.testing.assert_array_equal(again[0], mean)
        np.testing.assert_array_equal(again[1], std)
    mean32, std32 = channel_stats(x.astype(np.float32), shape, chunk_rows=9)
    np.testing.assert_allclose(mean32, mean, rtol=1e-6)
    np.testing.assert_allclose(std32, std, rtol=1e-5)


def test_a_constant_channel_has_std_zero():
    shape = (2, 2, 2)
    x = pixels(n=10, shape=shape)
    x[:, :4] = 17  # channel 0 holds one value
    for data in (x, x.astype(np.float64)):
        mean, std = channel_stats(data, shape, chunk_rows=3)
        assert mean[0] == 17 and std[0] == 0 and std[1] > 0


def test_channel_stats_refuses_what_it_cannot_count():
    with pytest.raises(ValueError, match="shape"):
        channel_stats(pixels(shape=(3, 2, 2)), (3, 2, 3))
    with pytest.raises(ValueError, match="no rows"):
        channel_stats(pixels(shape=(3, 2, 2)), (3, 2, 2), rows=np.array([], dtype=int))
    with pytest.raises(ValueError, match="chunk_rows"):
        channel_stats(pixels(shape=(3, 2, 2)), (3, 2, 2), chunk_rows=0)
