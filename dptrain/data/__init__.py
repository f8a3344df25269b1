"""Datasets and their readers: npz/npy (memory-mapped), CSV, and the built-in sets; image augmentation
and per-channel statistics. No sampler here: which samples each rank takes is
:mod:`dptrain.parallel.sampler`'s. Imports no other dptrain package but :mod:`dptrain.runtime` (the
hash of augmentation's choices) and :mod:`dptrain.errors`.

    from dptrain.data import load_digits, split_train_val, steps_per_epoch
"""

from .arrays import load_npy, load_npz, load_npz_arrays
from .augment import Augment, channel_stats
from .builtin import load_diabetes, load_digits, load_mnist1d, make_synthetic
from .csv_files import is_number, load_csv, read_csv
from .dataset import (
    MAX_CLASSES,
    Dataset,
    RowView,
    check_features,
    evaluation_rows,
    first_non_finite_row,
    list_names,
    split_train_val,
    steps_per_epoch,
)
from .text import Windows, decode, encode, load_text, split_text, text_dataset

__all__ = ["MAX_CLASSES", "Augment", "Dataset", "RowView", "Windows", "channel_stats", "check_features", "decode",
           "encode", "evaluation_rows", "first_non_finite_row", "is_number", "list_names", "load_csv", "load_diabetes",
           "load_digits", "load_mnist1d", "load_npy", "load_npz", "load_npz_arrays", "load_text", "make_synthetic",
           "read_csv", "split_text", "split_train_val", "steps_per_epoch", "text_dataset"]
