"""Datasets, the train/validation split and the sampler. Never imports mpi4py.

The sampler is a set of pure functions of (seed, epoch, step, rank, world size): every rank
derives the same global batches and the same step counts, so no rank can skip a collective, and
global step k takes the same samples whatever the world size.

A :class:`Dataset` is a view of two arrays, which may be memory-mapped files: which of their rows
it holds and which dtypes it returns them in. ``subset`` and ``astype`` make new views without
copying, and ``take`` reads only the rows asked for, so a rank of a job on a memory-mapped file
reads only the rows of its own shards and the ranks of a node share the file's pages.
"""

from __future__ import annotations

import csv
import math
import os
import struct
import warnings
import zipfile
import zlib
from array import array as packed_array
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib import format as npy_format

from .errors import UserError

MAX_CLASSES = 2**20  # more would be a mistake in the labels, not a classification task
CHUNK_BYTES = 32 * 2**20  # checks that scan every value read this much of the data at a time

# Stream tags keep the random streams of one seed independent of each other.
_SPLIT_STREAM, _EPOCH_STREAM, _SYNTHETIC_STREAM = 1, 2, 3


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

    def _view(self, rows: np.ndarray | None, x_casts: tuple[np.dtype, ...],
              y_casts: tuple[np.dtype, ...]) -> Dataset:
        view = Dataset(self.base_x, self.base_y, self.n_classes, self.source)
        view.rows, view._x_casts, view._y_casts, view._finite = rows, x_casts, y_casts, self._finite
        return view

    def __len__(self) -> int:
        return len(self.base_x) if self.rows is None else len(self.rows)

    def __repr__(self) -> str:
        return (f"Dataset({self.source or 'arrays'}: {len(self)} rows of {self.n_features} features as "
                f"{self.dtype}, {self.task}{'' if self.n_classes is None else f' ({self.n_classes} classes)'})")

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
        return self.base_x if self.rows is None and not self._x_casts else RowView(self, "x")

    @property
    def y(self) -> np.ndarray | RowView:
        return self.base_y if self.rows is None and not self._y_casts else RowView(self, "y")

    def take(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``indices`` as (x of shape (n, D), y): what a rank reads for its shard of a batch.

        Reads only those rows of the arrays (of the file, when memory-mapped), then converts them.
        """
        file_rows = indices if self.rows is None else self.rows[indices]
        return self._read("x", file_rows), self._read("y", file_rows)

    def _read(self, which: str, file_rows) -> np.ndarray:
        base, casts = (self.base_x, self._x_casts) if which == "x" else (self.base_y, self._y_casts)
        return _convert(base[file_rows], casts)

    def subset(self, indices) -> Dataset:
        """Rows ``indices`` of this dataset (anything that indexes an array of len(self) rows), without copying."""
        if self.rows is not None:
            rows = self.rows[indices]
        elif isinstance(indices, slice):
            rows = np.arange(*indices.indices(len(self)))
        else:
            rows = _row_numbers(indices, len(self))
        return self._view(np.atleast_1d(rows), self._x_casts, self._y_casts)

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
        if isinstance(self.base_x, np.memmap) or isinstance(self.base_y, np.memmap):
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
        if isinstance(self.base_x, np.memmap) or isinstance(self.base_y, np.memmap):
            return self
        if self.rows is None and not self._x_casts and not self._y_casts:
            return self
        done = Dataset(np.ascontiguousarray(self.x), np.ascontiguousarray(self.y), self.n_classes, self.source)
        done._finite = self._finite
        return done

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


def load_csv(path: str, target: str, labels: bool | None = None, n_classes: int | None = None) -> Dataset:
    """The CSV file at ``path``: a header row naming the columns, then one sample per row.

    The column named ``target`` holds the labels; every other column is a numeric feature, in
    file order. ``labels=True``: the targets are class labels, whole numbers >= 0 (n_classes =
    max + 1); ``labels=False``: float regression targets (N, 1), even if all are whole numbers;
    ``labels=None``: class labels if every target value is a whole number ("3" or "3.0").
    ``n_classes``: class labels must lie in [0, n_classes) (the first one beyond is named by row).
    Blank lines are skipped; a row number in an error is the line of the file (the header is
    row 1). The file is read into memory, with a fast NumPy parser; when that fails, a second
    pass with the csv module finds the first bad row or cell for the error message.

    Returns float64 features and int64 labels or float64 targets.
    """
    if not target:
        raise UserError(f"data file {path}: no target column given (set data.target to the name of the label column)")
    if os.path.isdir(path):
        raise UserError(f"data file {path}: is a folder, not a CSV file")
    if not os.path.isfile(path):
        raise UserError(f"data file {path}: not found")
    where = f"data file {path}"
    names, values, lines = read_csv(path, where, lambda names: _check_target(names, target, where))
    col = names.index(target)
    y = values[:, col]
    x = np.ascontiguousarray(np.delete(values, col, axis=1))
    if labels is None:
        labels = bool(np.array_equal(y, np.floor(y)))
    if labels:
        fraction = np.flatnonzero(y != np.floor(y))
        if fraction.size:
            raise UserError(f"data file {path}: row {_row_number(path, lines, fraction[0])}, column {target!r}: "
                            f"{y[fraction[0]]:.15g} is not a class label (a whole number); a loss for float "
                            f"targets (train.loss = \"mse\") reads them as regression targets")
        bad = np.flatnonzero(y < 0)
        if bad.size:
            raise UserError(f"data file {path}: row {_row_number(path, lines, bad[0])}, column {target!r}: class "
                            f"label {y[bad[0]]:.15g} is negative (whole-number targets are class labels 0..K-1)")
        if n_classes is not None and y.max() >= n_classes:
            i = int(np.flatnonzero(y >= n_classes)[0])
            raise UserError(f"data file {path}: row {_row_number(path, lines, i)}, column {target!r}: class label "
                            f"{y[i]:.15g} is out of range: labels must lie in [0, {n_classes})")
        if y.max() >= MAX_CLASSES:
            i = int(np.argmax(y))
            raise UserError(f"data file {path}: row {_row_number(path, lines, i)}, column {target!r}: class label "
                            f"{y[i]:.15g} implies more than {MAX_CLASSES:,} classes (whole-number targets are class "
                            f"labels 0..K-1)")
        k = int(y.max()) + 1 if n_classes is None else n_classes
        dataset = Dataset(x, y.astype(np.int64), max(k, 2), path)
    else:
        dataset = Dataset(x, np.ascontiguousarray(y.reshape(-1, 1)), None, path)
    dataset._finite = True
    return dataset


def read_csv(path: str | Path, where: str,
             check_header: Callable[[list[str]], None] = lambda names: None) -> tuple[list[str], np.ndarray, list[int] | None]:
    """(column names, values (N, columns) float64, file line of each row or None if not tracked)
    of a CSV file with a header row; ``where`` starts every error message (e.g. "data file x.csv").

    A first row made of numbers is refused (it is data: the header is missing), then
    ``check_header(names)`` may refuse the header (UserError). Blank lines are skipped. A clean
    file is read by NumPy's fast parser; otherwise a second pass with the csv module finds the
    first bad row (the line of the file, the header being row 1) or cell and says so: a short or
    long row, a cell that is not a finite number, no data rows. A file that cannot be read, or is
    not UTF-8 text, is a UserError too.
    """
    try:
        return _read_csv(path, where, check_header)
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot be read ({exc.strerror or exc})") from None


def _read_csv(path: str | Path, where: str,
              check_header: Callable[[list[str]], None]) -> tuple[list[str], np.ndarray, list[int] | None]:
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is not part of a name
        reader = csv.reader(fh, skipinitialspace=True)
        try:
            header = next((row for row in reader if row), None)
        except csv.Error as exc:
            raise UserError(f"{where}: row {reader.line_num}: not valid CSV ({exc})") from None
        if header is None:
            raise UserError(f"{where}: is empty (expected a header row naming the columns, then data rows)")
        names = [name.strip() for name in header]
        _check_not_numbers(names, where)
        check_header(names)
        try:
            with warnings.catch_warnings():  # loadtxt warns on no data: the scan below reports it
                warnings.simplefilter("ignore")
                values = np.loadtxt(fh, dtype=np.float64, delimiter=",", quotechar='"', comments=None, ndmin=2)
        except ValueError:
            values = None
    if values is not None and len(values) and values.shape[1] == len(names) and np.isfinite(values).all():
        return names, values, None
    return (names, *_scan_csv(path, where, names))  # finds what is wrong and says so (or reads what loadtxt could not)


def _check_not_numbers(names: list[str], where: str) -> None:
    """A header row made of numbers is data: the header is missing."""
    if all(is_number(name) for name in names):
        raise UserError(f"{where}: the first row ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) "
                        f"is numbers; expected a header row naming the columns")


def _check_target(names: list[str], target: str, where: str) -> None:
    """The header must hold ``target`` once, and a feature besides it."""
    count = names.count(target)
    if count == 0:
        shown = ", ".join(repr(n) for n in names[:20]) + (f", ... ({len(names)} columns)" if len(names) > 20 else "")
        raise UserError(f"{where}: no column named {target!r} (data.target) in the header row; "
                        f"the columns are {shown}")
    if count > 1:
        raise UserError(f"{where}: {count} columns are named {target!r} (data.target) in the header row")
    if len(names) < 2:
        raise UserError(f"{where}: no feature column besides the target {target!r}")


def _scan_csv(path: str | Path, where: str, names: list[str]) -> tuple[np.ndarray, list[int]]:
    """The data rows of a CSV file read row by row with the csv module: slower than loadtxt, but
    it names the first bad row (the line of the file) and column. Returns (values, file lines)."""
    values, lines = packed_array("d"), []  # 8 bytes a value, not a Python float's 32
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        try:
            next(row for row in reader if row)  # the header, checked already
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(names):
                    raise UserError(f"{where}: row {reader.line_num} has {len(row)} "
                                    f"cell{'s' if len(row) != 1 else ''}, but the header has {len(names)} columns")
                try:
                    numbers = [float(cell) for cell in row]
                except ValueError:
                    j = next(j for j, cell in enumerate(row) if not is_number(cell))
                    what = "an empty cell" if not row[j].strip() else f"{row[j]!r} is not a number"
                    raise UserError(f"{where}: row {reader.line_num}, column {names[j]!r}: {what}") from None
                if not all(map(math.isfinite, numbers)):
                    j = next(j for j, v in enumerate(numbers) if not math.isfinite(v))
                    raise UserError(f"{where}: row {reader.line_num}, column {names[j]!r}: {row[j].strip()!r} "
                                    f"is not a finite number")
                values.extend(numbers)
                lines.append(reader.line_num)
        except csv.Error as exc:
            raise UserError(f"{where}: row {reader.line_num}: not valid CSV ({exc})") from None
    if not lines:
        raise UserError(f"{where}: has a header row but no data rows")
    return np.frombuffer(values, dtype=np.float64).reshape(len(lines), len(names)), lines


def is_number(cell: str) -> bool:
    """Whether ``float(cell)`` reads it."""
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _row_number(path: str, lines: list[int] | None, i: int) -> int:
    """The file line of data row ``i`` (0-based), rescanning the file if the fast parser read it."""
    return (lines if lines is not None else _data_lines(path))[i]


def _data_lines(path: str) -> list[int]:
    """The file line of each data row (non-blank records after the header)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        next(row for row in reader if row)
        return [reader.line_num for row in reader if row]


def load_npz(path: str, n_classes: int | None = None) -> Dataset:
    """The data at ``path``: an .npz with arrays ``x`` (N, D) and ``y`` (N,) integer labels or
    (N, K) float targets, or a folder holding ``x.npy`` and ``y.npy``.

    Arrays stored uncompressed (np.savez, np.save) are memory-mapped, not read: the checks scan
    them a chunk at a time and training reads only the rows it takes, so the ranks of a node
    share one copy (the page cache). A compressed .npz (np.savez_compressed) is read into memory.
    Nothing is ever unpickled. Features are returned as float64, labels as int64.

    Labels are checked to lie in [0, n_classes); if n_classes is not given it is max(y) + 1.
    """
    if os.path.isdir(path):
        x, y = _load_npy_folder(path)
    elif not os.path.isfile(path):
        raise UserError(f"data file {path}: not found")
    else:
        x, y = load_npz_arrays(path, f"data file {path}", npy_hint=" (or a folder with x.npy and y.npy)")
    return _checked_arrays(x, y, n_classes, path)


def load_npz_arrays(path: str | Path, where: str, keys: tuple[str, ...] = ("x", "y"),
                    npy_hint: str = "") -> tuple[np.ndarray, ...]:
    """The arrays ``keys`` of the .npz at ``path``, memory-mapped if stored uncompressed (see
    :func:`load_npz`); ``where`` starts every error message. A lone .npy array is refused by its
    content, whatever its suffix, with ``npy_hint`` after the message."""
    try:
        with open(path, "rb") as fh:  # closed even if np.load fails; the memory maps outlive it
            if fh.read(len(npy_format.MAGIC_PREFIX)) == npy_format.MAGIC_PREFIX:
                raise UserError(f"{where}: is one .npy array, not an .npz with {' and '.join(keys)}{npy_hint}")
            fh.seek(0)
            with np.load(fh, allow_pickle=False) as archive:
                missing = [k for k in keys if k not in archive.files]
                if missing:
                    raise UserError(f"{where}: no array named {' or '.join(repr(k) for k in missing)} "
                                    f"(it holds {list_names(archive.files) or 'nothing'})")
                arrays = tuple(_npz_member(archive, fh, key) for key in keys)
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{where}: cannot be read as .npz ({exc})") from exc
    for key, array in zip(keys, arrays):
        if not isinstance(array, np.ndarray):
            raise UserError(f"{where}: {key!r} is not a NumPy array")
    return arrays


def _npz_member(archive, fh, key: str):
    """archive[key], memory-mapped if it is stored uncompressed (its CRC-32 checked by chunks)."""
    names = archive.zip.namelist()
    members = {name.removesuffix(".npy"): name for name in names}
    members.update(zip(names, names))  # the names np.load would read for key
    info = archive.zip.getinfo(members[key])
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:  # stored, not encrypted
        start = _member_data_start(fh, info)
        array = _map_npy(fh, start, info.file_size)
        if array is not None:
            _check_crc(fh, start, info)
            return array
    return archive[key]  # compressed, empty or unusual: read into memory


def _member_data_start(fh, info: zipfile.ZipInfo) -> int:
    """Offset in the file of the first byte of a zip member's data (after its local header)."""
    fh.seek(info.header_offset)
    header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("Bad magic number for file header")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _map_npy(fh, start: int, length: int) -> np.ndarray | None:
    """The .npy stored in bytes [start, start + length) of ``fh``, memory-mapped read-only; None
    if it is better read normally (no .npy magic, an empty or 0-d array, header version 3)."""
    fh.seek(start)
    if fh.read(len(npy_format.MAGIC_PREFIX)) != npy_format.MAGIC_PREFIX:
        return None
    fh.seek(start)
    version = npy_format.read_magic(fh)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(fh)
    else:
        return None
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    offset, nbytes = fh.tell(), math.prod(shape) * dtype.itemsize
    if not shape or nbytes == 0:
        return None
    if offset + nbytes > start + length:
        raise ValueError(f"EOF: array data of {nbytes} bytes expected, {start + length - offset} stored")
    return np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def _check_crc(fh, start: int, info: zipfile.ZipInfo) -> None:
    """The zip member's CRC-32, as reading it with zipfile would check, by chunks of the file's pages."""
    raw = np.memmap(fh, dtype=np.uint8, mode="r", offset=start, shape=(info.file_size,))
    crc = 0
    for begin in range(0, info.file_size, CHUNK_BYTES):
        crc = zlib.crc32(raw[begin:begin + CHUNK_BYTES], crc)
    del raw
    if crc != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")


def _load_npy_folder(path: str) -> tuple[np.ndarray, np.ndarray]:
    files = {key: os.path.join(path, f"{key}.npy") for key in ("x", "y")}
    missing = [key for key, file in files.items() if not os.path.isfile(file)]
    if len(missing) == 2:
        raise UserError(f"data file {path}: is a folder without x.npy and y.npy, not an .npz file")
    if missing:
        raise UserError(f"data file {path}: no array named {missing[0]!r} (no {missing[0]}.npy in the folder)")
    x, y = (load_npy(file, f"data file {file}") for file in files.values())
    return x, y


def load_npy(path: str | Path, where: str) -> np.ndarray:
    """The one array of the .npy file at ``path``, memory-mapped read-only; ``where`` starts every
    error message. An .npz archive is refused by its content, whatever its suffix."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{where}: cannot be read as .npy ({exc})") from exc
    if not isinstance(array, np.ndarray):  # np.load opened a zip archive (an NpzFile)
        array.close()
        raise UserError(f"{where}: is an .npz archive, not one .npy array")
    return array


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
