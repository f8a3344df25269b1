"""The Dataset view, the checks on its values, the train/validation split and the step count.

A :class:`Dataset` is a view of two arrays, which may be memory-mapped files: which of their rows
it holds and which dtypes it returns them in. ``subset`` and ``astype`` make new views without
copying, and ``take`` reads only the rows asked for, so a rank of a job on a memory-mapped file
reads only the rows of its own shards and the ranks of a node share the file's pages.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from dptrain.errors import UserError

MAX_CLASSES = 2**20  # more would be a mistake in the labels, not a classification task
CHUNK_BYTES = 32 * 2**20  # checks that scan every value read this much of the data at a time

# Stream tags keep the random streams of one seed independent of each other.
# seed streams: 1 the train/validation split, 2 the epoch order (dptrain.parallel.sampler), 3 synthetic data,
# 4 the evaluation subset. Augmentation (dptrain.data.augment) and Dropout draw from none of them: they hash
# (seed, ...) from key chains of their own
_SPLIT_STREAM, _SYNTHETIC_STREAM, _EVALUATION_STREAM = 1, 3, 4


class Dataset:
    """x : (N, D) features; y : (N,) integer labels (classification) or (N, K) floats (regression).

    ``Dataset(x, y, n_classes, source)`` holds the arrays as given (they may be ``np.memmap``s).
    ``subset`` and ``astype`` return views that share them: a view records the rows it holds
    and the chain of dtype conversions its values go through, and applies both when rows are
    read (``take``), so no view copies the data. ``x`` and ``y`` are the arrays the view stands
    for: the arrays themselves when the view is all rows unconverted, else a :class:`RowView`
    with their shape and dtype that reads on indexing.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int | None, source: str = "") -> None:
        self.base_x, self.base_y = x, y  # the whole arrays, in the dtypes they are stored in
        self.n_classes = n_classes  # None for regression targets
        self.source = source
        self.rows: np.ndarray | None = None  # rows of base_x/base_y in this view; None: all of them
        self._x_casts: tuple[np.dtype, ...] = ()  # conversions applied in turn to rows of base_x
        self._y_casts: tuple[np.dtype, ...] = ()
        self._finite = False  # every value of base_x (and of float base_y) is known to be finite
        self.vocab: str | None = None  # text: the characters the class ids stand for
        #: the data's own (training rows, validation rows), used instead of the seeded random split:
        #: a text's contiguous parts, MNIST-1D's standard split; None for the others (whole datasets only)
        self.split: tuple[np.ndarray, np.ndarray] | None = None
        self.classes: tuple[str, ...] | None = None  # images: the class names the class ids stand for
        self.sample_shape: tuple[int, ...] | None = None  # images: one sample's (C, H, W); None: data.shape's
        #: training only: ``augment(x (n, C, H, W), file rows (n,), epoch) -> (n, C, H, W)`` applied by
        #: ``take(..., epoch=e)`` to converted rows before ``x_transform``; a pure function of its arguments
        self.augment: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None
        #: applied in place to every (n, D) block of converted features read (images: pixels to [0, 1], normalised)
        self.x_transform: Callable[[np.ndarray], np.ndarray] | None = None

    def _copy_attributes(self, other: Dataset) -> Dataset:
        """``other`` with this dataset's descriptive attributes (vocabulary, classes, shape, transforms)."""
        other.vocab, other.classes, other.sample_shape = self.vocab, self.classes, self.sample_shape
        other.augment, other.x_transform = self.augment, self.x_transform
        return other

    def meta(self) -> dict:
        """What a checkpoint records of the data, for predict and eval to read new inputs as training
        did: a text's ``vocab``; images' ``classes``, ``sample_shape`` and ``normalize`` (the x_transform)."""
        found = {"vocab": self.vocab, "classes": list(self.classes) if self.classes else None,
                 "sample_shape": list(self.sample_shape) if self.sample_shape else None,
                 "normalize": getattr(self.x_transform, "to_meta", lambda: None)()}
        return {k: v for k, v in found.items() if v is not None}

    def _view(self, rows: np.ndarray | None, x_casts: tuple[np.dtype, ...],
              y_casts: tuple[np.dtype, ...]) -> Dataset:
        view = Dataset(self.base_x, self.base_y, self.n_classes, self.source)
        view.rows, view._x_casts, view._y_casts, view._finite = rows, x_casts, y_casts, self._finite
        return self._copy_attributes(view)

    def __len__(self) -> int:
        return len(self.base_x) if self.rows is None else len(self.rows)

    def __repr__(self) -> str:
        return (f"Dataset({self.source or 'arrays'}: {len(self)} rows of {self.n_features} features as "
                f"{self.dtype}, {self.task}{'' if self.n_classes is None else f' ({self.n_classes} classes)'})")

    @property
    def reads_on_demand(self) -> bool:
        """The arrays stay where they are (a memory-mapped file, windows over a text): rows are
        read and converted when taken, never all at once."""
        return any(isinstance(a, np.memmap) or getattr(a, "reads_on_demand", False) for a in (self.base_x, self.base_y))

    @property
    def n_features(self) -> int:
        return self.base_x.shape[1]

    @property
    def task(self) -> str:
        return "classification" if self.n_classes is not None else "regression"

    @property
    def n_outputs(self) -> int:
        return self.n_classes if self.n_classes is not None else self.base_y.shape[1]

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the features ``take`` returns."""
        return self._x_casts[-1] if self._x_casts else self.base_x.dtype

    @property
    def y_dtype(self) -> np.dtype:
        return self._y_casts[-1] if self._y_casts else self.base_y.dtype

    @property
    def x(self) -> np.ndarray | RowView:
        """The features this dataset stands for: base_x itself, or a RowView reading it on demand."""
        plain = self.rows is None and not self._x_casts and self.x_transform is None
        return self.base_x if plain else RowView(self, "x")

    @property
    def y(self) -> np.ndarray | RowView:
        return self.base_y if self.rows is None and not self._y_casts else RowView(self, "y")

    def take(self, indices, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``indices`` as (x of shape (n, D), y): what a rank reads for its shard of a batch.

        Reads only those rows of the arrays (of the file, when memory-mapped), then converts them.
        With ``epoch`` (training) and an ``augment``, the samples are augmented as in that epoch;
        without (evaluation, prediction) they never are.
        """
        file_rows = indices if self.rows is None else self.rows[indices]
        x = _convert(self.base_x[file_rows], self._x_casts)
        if epoch is not None and self.augment is not None:
            n = len(x)
            x = self.augment(x.reshape(n, *self.sample_shape), np.asarray(file_rows), epoch).reshape(n, -1)
        if self.x_transform is not None:
            x = self.x_transform(x)
        return x, self._read("y", file_rows)

    def _read(self, which: str, file_rows) -> np.ndarray:
        base, casts = (self.base_x, self._x_casts) if which == "x" else (self.base_y, self._y_casts)
        values = _convert(base[file_rows], casts)
        if which == "x" and self.x_transform is not None:
            values = self.x_transform(values)
        return values

    def subset(self, indices) -> Dataset:
        """Rows ``indices`` of this dataset (anything that indexes an array of len(self) rows), without copying."""
        if self.rows is not None:
            rows = self.rows[indices]
        elif isinstance(indices, slice):
            rows = np.arange(*indices.indices(len(self)))
        else:
            rows = _row_numbers(indices, len(self))
        return self._view(np.atleast_1d(rows), self._x_casts, self._y_casts)

    def with_transform(self, x_transform: Callable[[np.ndarray], np.ndarray] | None) -> Dataset:
        """The same rows, their features read through ``x_transform`` (see the attribute), without copying."""
        view = self._view(self.rows, self._x_casts, self._y_casts)
        view.x_transform = x_transform
        return view

    def astype(self, dtype) -> Dataset:
        """The same data in ``dtype``; refuses values that do not fit it (e.g. 1e300 in float32).

        Nothing is converted here: the view records the dtype and ``take`` converts the rows it
        reads. The check reads the rows a chunk at a time; it is skipped when every value is
        known to be finite and every conversion is exact.
        """
        view = self._cast(dtype)
        if self._needs_scan(view) and not view._all_finite():
            raise self._range_error(view.dtype)
        return view

    def converted(self, dtype) -> Dataset:
        """``astype(dtype).in_memory()`` with each value converted once: an in-memory dataset is
        converted into new arrays, then those are checked (the same values and errors as astype);
        a memory-mapped one is checked by chunks and stays a view on disk."""
        if self.reads_on_demand:
            return self.astype(dtype)
        view = self._cast(dtype)
        done = view.in_memory()
        if self._needs_scan(view) and not done._all_finite():
            raise self._range_error(view.dtype)
        done._finite = True  # every value is finite: known, or checked just now
        return done

    def _cast(self, dtype) -> Dataset:
        """The view in ``dtype``, unchecked (labels keep their dtype)."""
        dtype = np.dtype(dtype)
        x_casts = _then(self._x_casts, self.base_x.dtype, dtype)
        y_casts = self._y_casts if self.n_classes is not None else _then(self._y_casts, self.base_y.dtype, dtype)
        return self._view(self.rows, x_casts, y_casts)

    def _needs_scan(self, view: Dataset) -> bool:
        """Whether ``view`` (this data in another dtype) may hold a value that is not finite: not
        when every value here is known to be finite and every conversion is exact."""
        exact = _exact_chain(self.base_x.dtype, view._x_casts) and (
            self.n_classes is not None or _exact_chain(self.base_y.dtype, view._y_casts))
        return not (self._finite and exact)

    def _range_error(self, dtype: np.dtype) -> UserError:
        return UserError(f"data {self.source}: values exceed the range of {dtype} "
                         f"(scale the data or set train.dtype = \"float64\")")

    def in_memory(self) -> Dataset:
        """An in-memory dataset with its conversions done once (x and y read into new arrays), so
        ``take`` only gathers rows; a memory-mapped one is returned as it is (it stays on disk)."""
        if self.reads_on_demand:
            return self
        if self.rows is None and not self._x_casts and not self._y_casts:
            return self
        x_rows = slice(None) if self.rows is None else self.rows  # converted, not yet transformed
        done = Dataset(np.ascontiguousarray(_convert(self.base_x[x_rows], self._x_casts)),
                       np.ascontiguousarray(self.y), self.n_classes, self.source)
        done._finite = self._finite
        return self._copy_attributes(done)

    def _all_finite(self) -> bool:
        """Whether every value of x (and of float targets y) this view returns is finite; by chunks."""
        arrays = [self.x] if self.n_classes is not None else [self.x, self.y]
        return all(first_non_finite_row(a) is None for a in arrays)


class RowView:
    """The (N, ...) array a :class:`Dataset` view stands for, read on demand.

    Has the shape and dtype of that array; indexing reads only the rows asked for (``view[idx]``
    is ``dataset.take(idx)``'s part), and ``np.asarray(view)`` reads all of them.
    """

    def __init__(self, dataset: Dataset, which: str) -> None:
        self._dataset, self._which = dataset, which

    @property
    def _base(self) -> np.ndarray:
        return self._dataset.base_x if self._which == "x" else self._dataset.base_y

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._dataset), *self._base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._dataset.dtype if self._which == "x" else self._dataset.y_dtype

    @property
    def ndim(self) -> int:
        return self._base.ndim

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):  # more than rows: read all rows, then index as NumPy does
            return np.asarray(self)[key]
        rows = self._dataset.rows
        return self._dataset._read(self._which, key if rows is None else rows[key])

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a RowView reads rows on demand: it cannot be an array without a copy")
        values = self[:]
        return values if dtype is None else values.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"RowView({self._which} of {self._dataset!r}: shape {self.shape}, dtype {self.dtype})"


def _row_numbers(indices, n: int) -> np.ndarray:
    """Integer row numbers in [0, n) for an integer or boolean index into n rows (as NumPy indexes)."""
    idx = np.asarray(indices)
    if idx.size == 0 and idx.dtype != bool:
        return np.zeros(0, dtype=np.intp)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean index of shape {idx.shape} does not match {n} rows")
        return np.flatnonzero(idx)
    if idx.dtype.kind not in "iu":
        raise IndexError(f"rows must be integers or booleans, got {idx.dtype}")
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return np.where(idx < 0, idx + n, idx).astype(np.intp, copy=False)


def _exact(src: np.dtype, dst: np.dtype) -> bool:
    """Whether converting src to dst keeps every value (int64 -> float64 does not)."""
    if not np.can_cast(src, dst, "safe"):
        return False
    if src.kind in "iu" and dst.kind in "fc":
        return np.iinfo(src).bits - (src.kind == "i") <= np.finfo(dst).nmant + 1
    return True


def _exact_chain(base: np.dtype, casts: tuple[np.dtype, ...]) -> bool:
    for dst in casts:
        if not _exact(base, dst):
            return False
        base = dst
    return True


def _then(casts: tuple[np.dtype, ...], base: np.dtype, dtype: np.dtype) -> tuple[np.dtype, ...]:
    """``casts`` followed by a conversion to ``dtype``, without steps that cannot change a value.

    A step reached exactly from the one before can be dropped: converting v exactly and then to
    dtype rounds the same value as converting v to dtype directly. So the values are those of
    converting the whole array in turn, as an eager astype would, bit for bit.
    """
    steps = list(casts)
    if (steps[-1] if steps else base) == dtype:
        return casts
    while steps and _exact(steps[-2] if len(steps) > 1 else base, steps[-1]):
        steps.pop()
    if (steps[-1] if steps else base) != dtype:
        steps.append(dtype)
    return tuple(steps)


def _convert(values: np.ndarray, casts: tuple[np.dtype, ...]) -> np.ndarray:
    values = np.asarray(values)  # a plain ndarray, not an np.memmap
    with np.errstate(over="ignore", invalid="ignore"):
        for dtype in casts:
            values = values.astype(dtype)
    return values


def _chunk_rows(a) -> int:
    """Rows of ``a`` (an array or a RowView) in about CHUNK_BYTES."""
    row_bytes = max(1, a.dtype.itemsize * math.prod(a.shape[1:]))
    return max(1, CHUNK_BYTES // row_bytes)


def first_non_finite_row(a, dtype=None) -> int | None:
    """The first row of ``a`` (N, ...) holding NaN or infinity once converted to ``dtype`` (if
    given: a value beyond its range becomes infinite); None if there is none.

    a : an array (perhaps memory-mapped) or a RowView, read a chunk at a time (no full-size
    temporary). Integers are not scanned: they are finite, and within float32's range.
    """
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if a.dtype.kind not in "fc" and (dtype.kind not in "fc" or dtype.itemsize >= 4):
        return None
    step = _chunk_rows(a)
    for start in range(0, len(a), step):
        with np.errstate(over="ignore", invalid="ignore"):
            block = np.asarray(a[start:start + step]).astype(dtype, copy=False)
        ok = np.isfinite(block).all(axis=tuple(range(1, block.ndim)))
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


def check_features(x, where: str, n_features: int | None = None, dtype=None) -> None:
    """UserError (starting with ``where``) unless ``x`` is a real-valued (N, D) array with N, D >= 1
    (and D = ``n_features`` if given) whose values are finite (and fit ``dtype`` if given).

    x : an array, perhaps memory-mapped: the values are scanned a chunk at a time.
    """
    real = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    if x.ndim != 2 or not real or x.shape[1] < 1:
        raise UserError(f"{where}: the features must be a real-valued array of shape (N, D) with D >= 1, "
                        f"got {x.dtype} {x.shape}")
    if len(x) == 0:
        raise UserError(f"{where}: no rows")
    if n_features is not None and x.shape[1] != n_features:
        raise UserError(f"{where}: {x.shape[1]} feature column{'s' if x.shape[1] != 1 else ''}, but the model "
                        f"takes {n_features} features per row")
    bad = first_non_finite_row(x, dtype)
    if bad is None:
        return
    if dtype is None or first_non_finite_row(x[bad:bad + 1]) is not None:
        raise UserError(f"{where}: row {bad} (counting from 0) contains NaN or infinity")
    raise UserError(f"{where}: row {bad} (counting from 0) holds a value beyond the range of {np.dtype(dtype)}, "
                    f"the model's dtype")


def list_names(names: list[str], most: int = 8) -> str:
    """'a', 'b', 'c', or for many names the first and last few: 'f0', 'f1', 'f2', ..., 'f63', 'label'."""
    if len(names) <= most:
        return ", ".join(repr(n) for n in names)
    half = most // 2
    return ", ".join([*(repr(n) for n in names[:half]), "...", *(repr(n) for n in names[-half:])])


def _checked_arrays(x: np.ndarray, y: np.ndarray, n_classes: int | None, source: str) -> Dataset:
    if x.ndim == 2 and y.ndim in (1, 2) and len(x) != len(y):
        raise UserError(f"data file {source}: x has {len(x)} rows but y has {len(y)}")
    check_features(x, f"data file {source}")
    if y.ndim not in (1, 2):
        raise UserError(f"data file {source}: y must be (N,) integer labels or (N, K) float targets, "
                        f"got {y.dtype} {y.shape}")
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        lowest, highest = y.min(), y.max()
        k = int(highest) + 1 if n_classes is None else n_classes
        if highest >= MAX_CLASSES:
            raise UserError(f"data file {source}: label {highest} implies more than {MAX_CLASSES:,} classes")
        if lowest < 0 or highest >= k:
            raise UserError(f"data file {source}: labels must lie in [0, {k}), found {lowest}..{highest}")
        return _checked_dataset(x, y, max(k, 2), source, np.int64)
    if y.ndim == 2 and np.issubdtype(y.dtype, np.floating):
        if y.shape[1] < 1:
            raise UserError(f"data file {source}: regression targets y of shape {y.shape} have no column")
        if first_non_finite_row(y) is not None:
            raise UserError(f"data file {source}: y contains NaN or infinity")
        return _checked_dataset(x, y, None, source, np.float64)
    raise UserError(f"data file {source}: y must be (N,) integer labels or (N, K) float targets, "
                    f"got {y.dtype} {y.shape}")


def _checked_dataset(x: np.ndarray, y: np.ndarray, n_classes: int | None, source: str, y_dtype) -> Dataset:
    """A dataset of checked arrays, returning float64 features and ``y_dtype`` labels or targets."""
    dataset = Dataset(x, y, n_classes, source)
    dataset._x_casts = _then((), x.dtype, np.dtype(np.float64))
    dataset._y_casts = _then((), y.dtype, np.dtype(y_dtype))
    dataset._finite = True
    return dataset


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of range(n) from the seed: (train indices, validation indices), sorted."""
    n_val = int(round(n * val_fraction))
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def evaluation_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A fixed, seeded choice of ``size`` of ``n`` validation rows (all of them if size >= n), sorted:
    eval.batches evaluates on these at every evaluation, on any number of ranks."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, _EVALUATION_STREAM]).choice(n, size, replace=False))


def steps_per_epoch(n_samples: int, global_batch_size: int) -> int:
    """Number of global batches in one epoch; the last one may be partial."""
    return math.ceil(n_samples / global_batch_size)
