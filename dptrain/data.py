"""Datasets, the train/validation split and the sampler. Never imports mpi4py.

The sampler is a set of pure functions of (seed, epoch, step, rank, world size): every rank
derives the same global batches and the same step counts, so no rank can skip a collective, and
global step k takes the same samples whatever the world size.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import UserError

MAX_CLASSES = 2**20  # more would be a mistake in the labels, not a classification task

# Stream tags keep the random streams of one seed independent of each other.
_SPLIT_STREAM, _EPOCH_STREAM, _SYNTHETIC_STREAM = 1, 2, 3


@dataclass
class Dataset:
    """x : (N, D) features; y : (N,) int64 labels (classification) or (N, K) floats (regression)."""

    x: np.ndarray
    y: np.ndarray
    n_classes: int | None  # None for regression targets
    source: str = ""

    def __len__(self) -> int:
        return len(self.x)

    @property
    def n_features(self) -> int:
        return self.x.shape[1]

    @property
    def task(self) -> str:
        return "classification" if self.n_classes is not None else "regression"

    @property
    def n_outputs(self) -> int:
        return self.n_classes if self.n_classes is not None else self.y.shape[1]

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``indices`` as (x of shape (n, D), y): what a rank reads for its shard of a batch."""
        return self.x[indices], self.y[indices]

    def subset(self, indices: np.ndarray) -> "Dataset":
        return Dataset(self.x[indices], self.y[indices], self.n_classes, self.source)

    def astype(self, dtype) -> "Dataset":
        """The same data in ``dtype``; refuses values that do not fit it (e.g. 1e300 in float32)."""
        with np.errstate(over="ignore"):
            x = self.x.astype(dtype, copy=False)
            y = self.y if self.n_classes is not None else self.y.astype(dtype, copy=False)
        if not (np.isfinite(x).all() and (self.n_classes is not None or np.isfinite(y).all())):
            raise UserError(f"data {self.source}: values exceed the range of {np.dtype(dtype)} "
                            f"(scale the data or set train.dtype = \"float64\")")
        return Dataset(x, y, self.n_classes, self.source)


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


def load_npz(path: str, n_classes: int | None = None) -> Dataset:
    """An .npz with ``x`` (N, D) and ``y`` (N,) integer labels or (N, K) float targets.

    Labels are checked to lie in [0, n_classes); if n_classes is not given it is max(y) + 1.
    """
    if os.path.isdir(path):
        raise UserError(f"data file {path}: is a folder, not an .npz file")
    if not os.path.isfile(path):
        raise UserError(f"data file {path}: not found")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as archive:  # fh: closed even if np.load fails
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise UserError(f"data file {path}: no array named {' or '.join(repr(k) for k in missing)} "
                                f"(found {', '.join(archive.files) or 'none'})")
            x, y = archive["x"], archive["y"]
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"data file {path}: cannot be read as .npz ({exc})") from exc
    return _checked_arrays(x, y, n_classes, path)


def _checked_arrays(x: np.ndarray, y: np.ndarray, n_classes: int | None, source: str) -> Dataset:
    real = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    if x.ndim != 2 or not real or x.shape[1] < 1:
        raise UserError(f"data file {source}: x must be a real-valued array of shape (N, D) with D >= 1, "
                        f"got {x.dtype} {x.shape}")
    if y.ndim not in (1, 2):
        raise UserError(f"data file {source}: y must be (N,) integer labels or (N, K) float targets, "
                        f"got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise UserError(f"data file {source}: x has {len(x)} rows but y has {len(y)}")
    if len(x) == 0:
        raise UserError(f"data file {source}: no samples")
    if not np.isfinite(x).all():
        raise UserError(f"data file {source}: x contains NaN or infinity")
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        k = int(y.max()) + 1 if n_classes is None else n_classes
        if y.max() >= MAX_CLASSES:
            raise UserError(f"data file {source}: label {y.max()} implies more than {MAX_CLASSES:,} classes")
        if y.min() < 0 or y.max() >= k:
            raise UserError(f"data file {source}: labels must lie in [0, {k}), found {y.min()}..{y.max()}")
        return Dataset(x.astype(np.float64), y.astype(np.int64), max(k, 2), source)
    if y.ndim == 2 and np.issubdtype(y.dtype, np.floating):
        if y.shape[1] < 1:
            raise UserError(f"data file {source}: regression targets y of shape {y.shape} have no column")
        if not np.isfinite(y).all():
            raise UserError(f"data file {source}: y contains NaN or infinity")
        return Dataset(x.astype(np.float64), y.astype(np.float64), None, source)
    raise UserError(f"data file {source}: y must be (N,) integer labels or (N, K) float targets, "
                    f"got {y.dtype} {y.shape}")


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of range(n) from the seed: (train indices, validation indices), sorted."""
    n_val = int(round(n * val_fraction))
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def steps_per_epoch(n_samples: int, global_batch_size: int) -> int:
    """Number of global batches in one epoch; the last one may be partial."""
    return math.ceil(n_samples / global_batch_size)


def epoch_order(n_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The one global permutation of sample indices for ``epoch`` (identical on every rank)."""
    if not shuffle:
        return np.arange(n_samples)
    return np.random.default_rng([seed, _EPOCH_STREAM, epoch]).permutation(n_samples)


def global_batch(order: np.ndarray, step_in_epoch: int, global_batch_size: int) -> np.ndarray:
    """Indices of global batch ``step_in_epoch`` of an epoch whose order is ``order``."""
    return order[step_in_epoch * global_batch_size : (step_in_epoch + 1) * global_batch_size]


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's strided part of a global batch; may be empty when world_size > len(indices)."""
    return indices[rank::world_size]
