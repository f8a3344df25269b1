"""The built-in datasets: scikit-learn's digits and diabetes, MNIST-1D, and synthetic classification data."""

from __future__ import annotations

import numpy as np

from dptrain.errors import UserError

from .dataset import _SYNTHETIC_STREAM, Dataset


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits: 1797 samples, 64 pixels scaled to [0, 1], 10 classes."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return Dataset(bunch.data.astype(np.float64) / 16.0, bunch.target.astype(np.int64), 10, "digits")


def make_synthetic(n_samples: int, n_features: int, n_classes: int, seed: int) -> Dataset:
    """Seeded Gaussian blobs: class c centred at a random point, unit noise."""
    if n_samples < 1 or n_features < 1 or n_classes < 2:
        raise UserError(
            f"synthetic data needs n_samples >= 1, n_features >= 1, n_classes >= 2; "
            f"got {n_samples}, {n_features}, {n_classes}")
    rng = np.random.default_rng([seed, _SYNTHETIC_STREAM])
    centres = rng.standard_normal((n_classes, n_features)) * 2.0
    y = rng.integers(0, n_classes, size=n_samples)
    x = centres[y] + rng.standard_normal((n_samples, n_features))
    return Dataset(x, y.astype(np.int64), n_classes, "synthetic")


def load_diabetes() -> Dataset:
    """scikit-learn's bundled diabetes data: 442 samples, 10 features (already centred and scaled
    by scikit-learn), one float target (disease progression after a year, 25..346), kept in its units."""
    from sklearn.datasets import load_diabetes as sk_load_diabetes

    bunch = sk_load_diabetes()
    dataset = Dataset(bunch.data.astype(np.float64), bunch.target.astype(np.float64).reshape(-1, 1), None, "diabetes")
    dataset._finite = True
    return dataset


def load_mnist1d() -> Dataset:
    """MNIST-1D (Greydanus, "Scaling down deep learning", 2020), generated offline by the ``mnist1d``
    package with its standard arguments (``make_dataset(get_dataset_args())``, data seed 42): 4000
    training and 1000 test sequences of 40 floats, 10 classes. ``split`` keeps that split: the test
    sequences are the validation data. UserError if the package is not installed."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise UserError('data.name = "mnist1d" needs the mnist1d package: pip install "dptrain[mnist1d]"') from None
    data = make_dataset(get_dataset_args())
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float64)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    dataset = Dataset(x, y, 10, "mnist1d")
    n_train = len(data["x"])
    dataset.split = (np.arange(n_train), np.arange(n_train, len(x)))
    dataset._finite = bool(np.isfinite(x).all())
    return dataset
