"""CSV datasets: a header row, numeric columns, one of them the target. Errors name the row and column."""

from __future__ import annotations

import csv
import math
import os
import warnings
from array import array as packed_array
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dptrain.errors import UserError

from .dataset import MAX_CLASSES, Dataset


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
