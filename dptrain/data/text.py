"""Character-level text: a UTF-8 file as a dataset of windows, read on demand.

The vocabulary is the file's sorted distinct characters; each character becomes its index. Sample
``i`` is the window of ``block_size + 1`` characters starting at character ``i``: its input is the
first ``block_size`` ids, its targets the ``block_size`` ids one further on (the next character at
each position). The text is split in two: the first ``1 - val_fraction`` of its characters for
training, the rest for validation, and a window never crosses the cut. No window is copied: a
:class:`Windows` array gathers the rows asked for from the one array of ids.
"""

from __future__ import annotations

import math
import os

import numpy as np

from dptrain.errors import UserError

from .dataset import Dataset


class Windows:
    """A read-only (N, block_size) array of windows over ``ids``: row i is ids[i + shift : i + shift + block_size].

    Indexing with an int, a slice or an integer array gathers those rows (a new array); nothing else
    is stored. ``reads_on_demand`` tells :class:`Dataset` to keep it as it is, as a memory-mapped file.
    """

    reads_on_demand = True

    def __init__(self, ids: np.ndarray, block_size: int, shift: int) -> None:
        self.ids, self.block_size, self.shift = ids, block_size, shift
        self.shape = (len(ids) - block_size, block_size)  # every start with a next character after the window
        self.dtype = ids.dtype
        self.ndim = 2
        self._offsets = np.arange(block_size)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            raise IndexError("Windows takes rows only")
        starts = np.arange(len(self))[key]
        return self.ids[np.add.outer(starts + self.shift, self._offsets)]

    def __array__(self, dtype=None, copy=None):
        values = self[:]
        return values if dtype is None else values.astype(dtype, copy=False)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype for ids below ``vocab_size`` (uint8, uint16 are exact in float32)."""
    return np.dtype(np.uint8 if vocab_size <= 2**8 else np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode(text: str, vocab: str) -> np.ndarray:
    """The ids of ``text``'s characters in ``vocab`` (a string of distinct characters); ValueError
    naming the first character that is not in it."""
    index = {c: i for i, c in enumerate(vocab)}
    try:
        return np.fromiter((index[c] for c in text), dtype=id_dtype(len(vocab)), count=len(text))
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary of {len(vocab)} characters") from None


def decode(ids, vocab: str) -> str:
    """The characters of ``ids`` (integers in [0, len(vocab)))."""
    return "".join(vocab[int(i)] for i in ids)


def read_text(path: str) -> str:
    """The UTF-8 text of ``path``; UserError naming the file when it cannot be read or decoded."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"data file {path}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    except OSError as exc:
        raise UserError(f"data file {path}: cannot read it ({exc.strerror or exc})") from None


def load_text(path: str, block_size: int, val_fraction: float) -> Dataset:
    """:func:`text_dataset` of the UTF-8 file at ``path``; UserError naming the file when it cannot be
    read, or leaves fewer training characters than one window."""
    try:
        return text_dataset(read_text(path), block_size, val_fraction, os.path.basename(path))
    except ValueError as exc:
        raise UserError(f"data file {path}: {exc}") from None


def text_dataset(text: str, block_size: int, val_fraction: float, source: str = "text") -> Dataset:
    """The windows of ``text``: x and y are (N, block_size) :class:`Windows` of ids (the targets
    shifted by one), ``n_classes`` the vocabulary size, ``vocab`` the vocabulary (the sorted distinct
    characters) and ``split`` the contiguous training and validation rows (:func:`split_text`).
    ValueError for a text whose training part is shorter than one window."""
    cut = _cut(len(text), val_fraction)
    if cut < block_size + 1:
        raise ValueError(f"{len(text):,} characters leave {cut:,} for training, fewer than one window of "
                         f"data.block_size + 1 = {block_size + 1}")
    vocab = "".join(sorted(set(text)))
    ids = encode(text, vocab)
    dataset = Dataset(Windows(ids, block_size, 0), Windows(ids, block_size, 1), max(len(vocab), 2), source)
    dataset.vocab = vocab
    dataset._finite = True  # ids: integers, exact in the float dtypes
    dataset.split = split_text(dataset, val_fraction)
    return dataset


def _cut(n_chars: int, val_fraction: float) -> int:
    return math.floor((1.0 - val_fraction) * n_chars)


def split_text(dataset: Dataset, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of a text's windows: the first ``floor((1 - val_fraction) *
    characters)`` characters hold the training windows, the rest the validation ones (none crosses)."""
    windows = dataset.base_x
    n_chars, block = len(windows.ids), windows.block_size
    cut = _cut(n_chars, val_fraction)
    return np.arange(max(cut - block, 0)), np.arange(cut, max(n_chars - block, cut))
