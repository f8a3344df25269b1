"""Predictions of a checkpoint's model on a file of features, and labelled data for ``eval --data``.

    dptrain predict --checkpoint runs/d1 --input new.npz --output predictions.csv
    mpirun -n 4 dptrain predict --checkpoint runs/d1 --input new.csv --output predictions.csv
    dptrain eval --checkpoint runs/d1 --data test.npz

The model is rebuilt from the checkpoint alone (its config and the shapes of its arrays), so the
training data need not exist any more. The rows are cut into blocks of ``PREDICT_CHUNK`` rows
counted from row 0, and each rank predicts a contiguous run of whole blocks with one BLAS thread:
every block goes through the same forward pass, computed the same way, whatever the world size
(a multi-threaded matrix multiply may round differently), so the output is the same bit for bit
on 1 or N ranks. Rank 0 gathers the outputs in row order and writes the file.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from pathlib import Path

import numpy as np

from dptrain import data as data_mod
from dptrain.config import Config, config_from_dict
from dptrain.data import Dataset, check_features, list_names
from dptrain.data.images import ImageFormat, decode_to_format, list_image_paths, list_images, pixel_dataset
from dptrain.data.normalize import Normalize
from dptrain.errors import UserError
from dptrain.nn import LOSSES, Sequential
from dptrain.parallel.comm import SingleProcessComm
from dptrain.storage.atomic import check_output_path, write_atomically
from dptrain.storage.checkpoint import Checkpoint, load_checkpoint, restore_model

from .build import build_loss, build_model

PREDICT_CHUNK = 1024  # rows per forward pass; also the unit in which rows are shared out to the ranks
FLOAT_FORMAT = "%.8g"  # probabilities and predicted values: 8 significant digits
_PARAM_NAME = re.compile(r"^layers\.(\d+)\.(\w+)$")


def print_warning(line: str) -> None:
    """A warning line on stderr (damaged checkpoints skipped, for example)."""
    print(line, file=sys.stderr, flush=True)


def warn_on_rank0(rank: int):
    """:func:`print_warning` on rank 0, nothing elsewhere: every rank checks, one reports."""
    return print_warning if rank == 0 else (lambda line: None)


def checkpoint_config(ckpt: Checkpoint) -> Config:
    """The config the checkpoint was trained with (its meta.json), checked."""
    return config_from_dict(ckpt.meta.get("config", {}), f"checkpoint {ckpt.path / 'meta.json'}")


def model_from_checkpoint(ckpt: Checkpoint) -> tuple[Config, Sequential]:
    """The checkpoint's config and model, with its weights; needs nothing but the checkpoint.

    The input width comes from ``data.shape`` (or, for flat samples, from the first layer's
    ``weight``: Dense (D, units), BatchNorm and LayerNorm (D,)), the output width from the last
    layer's ``weight`` (the output Dense, (in, K)). UserError if the arrays do not fit the config.
    """
    config = checkpoint_config(ckpt)
    weights = sorted((int(m.group(1)), v.shape) for k, v in ckpt.model.items()
                     if (m := _PARAM_NAME.match(k)) and m.group(2) == "weight" and v.ndim >= 1)
    if not weights or len(weights[-1][1]) != 2:
        raise UserError(f"checkpoint {ckpt.path}: model.npz has no output layer weight (layers.N.weight of "
                        f"shape (in, K))")
    data_shape = tuple(ckpt.meta.get("sample_shape") or ()) or None  # images: (C, H, W)
    if config.data.name == "text":  # a window of block_size character ids
        n_features = config.data.block_size
    elif data_shape:
        n_features = int(np.prod(data_shape))
    else:
        n_features = int(np.prod(config.data.shape)) if config.data.shape else int(weights[0][1][0])
    model = build_model(config, n_features, int(weights[-1][1][1]), init=False, data_shape=data_shape)
    return config, restore_model(ckpt, model)


# ---------------------------------------------------------------------------------------------
# Reading the input


def read_features(path: str | Path, n_features: int, dtype=np.float64, drop_column: str = "") -> np.ndarray:
    """The feature rows of ``path``, checked against a model taking ``n_features`` values per row
    in ``dtype``.

    path : an .npz holding ``x`` (``y`` and other arrays are ignored), an .npy of shape (N, D),
    both memory-mapped when stored uncompressed, or a .csv with a header row and numeric columns
    (``drop_column``, the config's ``data.target``, is left out if the file has it). Returns an
    (N, D) array of integers or floats, as stored; UserError naming the file (and row and
    column) for anything else, including NaN or infinity and values beyond the range of ``dtype``.
    """
    path = Path(path)
    where = f"input file {path}"
    if path.is_dir():
        raise UserError(f"{where}: is a folder, not a file")
    if not path.is_file():
        raise UserError(f"{where}: not found")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        (x,) = data_mod.load_npz_arrays(path, where, keys=("x",), npy_hint=" (give it the suffix .npy)")
    elif suffix == ".npy":
        x = data_mod.load_npy(path, where)
    elif suffix == ".csv":
        x = _read_csv_features(path, where, n_features, drop_column)
    else:
        raise UserError(f"{where}: unknown kind {path.suffix or '(no suffix)'!r}; expected .npz (array x), "
                        f".npy (an (N, D) array) or .csv (a header row, then numeric columns)")
    check_features(x, where, n_features, dtype)
    return x


def _read_csv_features(path: Path, where: str, n_features: int, drop_column: str) -> np.ndarray:
    """The feature columns of a CSV file: every column but ``drop_column``; UserError naming the
    columns if they are not ``n_features``."""
    all_columns, x = read_csv_columns(path, where)
    columns = all_columns
    if drop_column and drop_column in columns:
        keep = [j for j, name in enumerate(columns) if name != drop_column]
        columns, x = [columns[j] for j in keep], np.ascontiguousarray(x[:, keep])
    if x.shape[1] != n_features:
        left_out = (f"data.target {drop_column!r} left out" if drop_column in all_columns
                    else f"no data.target column {drop_column!r}" if drop_column
                    else "the checkpoint's config names no data.target column to leave out")
        raise UserError(f"{where}: {x.shape[1]} feature column{'s' if x.shape[1] != 1 else ''} "
                        f"({list_names(columns)}; {left_out}), but the model takes {n_features} features per row")
    return x


def read_csv_columns(path: str | Path, where: str) -> tuple[list[str], np.ndarray]:
    """(column names, values of shape (N, columns) as float64) of a CSV file with a header row,
    read as for ``data.name = "csv"`` (:func:`dptrain.data.read_csv`). A first row made of numbers
    is refused: it is data, so the header is missing; so is a column name given twice."""
    names, values, _ = data_mod.read_csv(path, where, lambda names: _check_header(names, where))
    return names, values


def _check_header(names: list[str], where: str) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"{where}: column {duplicates[0]!r} appears more than once in the header row")


# ---------------------------------------------------------------------------------------------
# Predicting


def row_range(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [start, stop) that ``rank`` predicts: a contiguous run of whole PREDICT_CHUNK blocks."""
    blocks = math.ceil(n_rows / PREDICT_CHUNK)
    first, last = rank * blocks // world_size, (rank + 1) * blocks // world_size
    return min(first * PREDICT_CHUNK, n_rows), min(last * PREDICT_CHUNK, n_rows)


def predict_outputs(model: Sequential, x: np.ndarray, comm=None) -> np.ndarray | None:
    """The model's outputs (logits, or values for regression) for every row of x, in eval mode.

    x : (N, D) on every rank (the same rows). Each rank runs its ``row_range`` with one BLAS
    thread; returns the (N, K) float64 outputs in row order on rank 0, None on the others: the
    same bits at any world size. Collective: every rank must call it, and makes one gatherv.
    """
    from threadpoolctl import threadpool_limits

    comm = comm if comm is not None else SingleProcessComm()
    n, k = len(x), model.out_features
    start, stop = row_range(n, comm.rank, comm.size)
    mine = np.empty((stop - start, k), dtype=np.float64)
    with threadpool_limits(limits=1, user_api="blas"):
        for i in range(start, stop, PREDICT_CHUNK):
            rows = slice(i, min(i + PREDICT_CHUNK, stop))
            with np.errstate(over="ignore", invalid="ignore"):
                xb = np.asarray(x[rows]).astype(model.dtype)
            mine[rows.start - start : rows.stop - start] = model.forward(xb, train=False).reshape(len(xb), k)
    counts = [(b - a) * k for a, b in (row_range(n, r, comm.size) for r in range(comm.size))]
    everything = np.empty((n, k), dtype=np.float64) if comm.rank == 0 else None
    comm.gatherv(mine.ravel(), everything.ravel() if everything is not None else None, counts, root=0)
    return everything


def prediction_table(outputs: np.ndarray, loss_name: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(column names, (N, columns) float64 table, printf formats) of the predictions CSV.

    outputs : (N, K) model outputs. By ``train.loss``: cross_entropy -> row, class (the argmax of
    the logits), p_0..p_{K-1} (softmax); mse -> row, prediction (K = 1) or y_0..y_{K-1};
    bce_with_logits -> row, p_0..p_{K-1} (sigmoid), label_0..label_{K-1} (1 where the logit > 0).
    """
    n, k = outputs.shape
    row = np.arange(n, dtype=np.float64)[:, None]
    task = LOSSES[loss_name].task
    if task == "classification":
        e = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        names = ["row", "class", *(f"p_{j}" for j in range(k))]
        table = np.hstack([row, outputs.argmax(axis=1)[:, None].astype(np.float64), p])
        return names, table, ["%d", "%d", *[FLOAT_FORMAT] * k]
    if task == "multilabel":
        p = 0.5 * (1.0 + np.tanh(0.5 * outputs))  # sigmoid, without overflow
        names = ["row", *(f"p_{j}" for j in range(k)), *(f"label_{j}" for j in range(k))]
        table = np.hstack([row, p, (outputs > 0).astype(np.float64)])
        return names, table, ["%d", *[FLOAT_FORMAT] * k, *["%d"] * k]
    names = ["row", "prediction"] if k == 1 else ["row", *(f"y_{j}" for j in range(k))]
    return names, np.hstack([row, outputs]), ["%d", *[FLOAT_FORMAT] * k]


def write_table_csv(path: str | Path, names: list[str], table: np.ndarray, formats: list[str],
                    text_columns: dict[str, list[str]] | None = None) -> Path:
    """Write a CSV atomically (:func:`dptrain.storage.atomic.write_atomically`): never seen half-written.
    ``text_columns`` (name: one string per row) follow the numeric ones, quoted where CSV needs it."""

    def write(fh) -> None:
        fh.write(",".join([*names, *(text_columns or {})]) + "\n")
        if not text_columns:
            np.savetxt(fh, table, fmt=formats, delimiter=",")
            return
        line = ",".join(formats)
        out = csv.writer(fh, lineterminator="\n")
        for i, row in enumerate(table):
            fh.write(line % tuple(row) + ",")
            out.writerow([column[i] for column in text_columns.values()])

    return write_atomically(path, write, mode="w")


def predict(checkpoint: str | Path | Checkpoint, x: np.ndarray, comm=None) -> tuple[list[str], np.ndarray] | None:
    """The predictions of a checkpoint (a path or a loaded :class:`Checkpoint`) for the rows x.

    Returns (column names, table) as ``prediction_table`` gives them on rank 0, None on the
    other ranks. Collective under MPI: every rank calls it with the same rows. x is checked as
    the rows of an input file are (:func:`dptrain.data.check_features`): UserError otherwise.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, optimizer=False)
    config, model = model_from_checkpoint(ckpt)
    x = np.asarray(x)
    check_features(x, f"x of shape {x.shape}", model.in_features, model.dtype)
    outputs = predict_outputs(model, x, comm)
    if outputs is None:
        return None
    names, table, _ = prediction_table(outputs, config.train.loss)
    return names, table


# ---------------------------------------------------------------------------------------------
# Labelled data for `dptrain eval --data`


def load_labelled_data(path: str | Path, config: Config, model: Sequential) -> tuple[Dataset, object]:
    """(every row of a labelled data file, the loss): the data checked against the model and the
    loss, and converted to the model's dtype.

    path : an .npz with ``x`` and ``y`` (or a folder with x.npy and y.npy), as for
    ``data.name = "npz"``; or a .csv with the column ``data.target`` of the checkpoint's config
    (whole-number targets are class labels with ``cross_entropy``, float targets otherwise).
    Class labels must lie in [0, K) for the model's K outputs.
    """
    path = str(path)
    where = f"data file {path}"
    k = model.out_features
    n_classes = k if LOSSES[config.train.loss].task == "classification" else None
    if path.lower().endswith(".csv"):
        target = getattr(config.data, "target", "")
        if not target:
            raise UserError(f"{where}: a .csv needs the name of its label column, but the checkpoint's config has "
                            f"no data.target (use an .npz with x and y)")
        dataset = data_mod.load_csv(path, target, labels=n_classes is not None, n_classes=n_classes)
    else:
        dataset = data_mod.load_npz(path, n_classes=n_classes)
    if dataset.n_features != model.in_features:
        raise UserError(f"{where}: {dataset.n_features} features per row, but the model takes {model.in_features}")
    if dataset.task == "regression" and dataset.n_outputs != k:
        raise UserError(f"{where}: y has {dataset.n_outputs} target column{'s' if dataset.n_outputs != 1 else ''}, "
                        f"but the model has {k} outputs")
    loss = build_loss(config, dataset)  # the targets suit the loss
    return dataset.converted(model.dtype), loss


def evaluation_inputs(ckpt: Checkpoint, data_path: str | Path) -> tuple[Sequential, object, Dataset]:
    """(model with the checkpoint's weights, loss, labelled data) to evaluate on another data file,
    or, for a model trained on images, on another folder (or CSV) of the same classes."""
    config, model = model_from_checkpoint(ckpt)
    if config.data.name == "images":
        dataset = labelled_images(ckpt, str(data_path))
        return model, build_loss(config, dataset), dataset.converted(model.dtype)
    dataset, loss = load_labelled_data(data_path, config, model)
    return model, loss, dataset


# ---------------------------------------------------------------------------------------------
# Images: read as training read them (the checkpoint's classes, sample shape and normalisation)


def _image_format(ckpt: Checkpoint) -> ImageFormat:
    shape = ckpt.meta.get("sample_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and isinstance(ckpt.meta.get("normalize"), dict)):
        raise UserError(f"checkpoint {ckpt.path}: meta.json lacks the sample_shape and normalize of its images")
    return ImageFormat(*(int(v) for v in shape))


def _image_rows(ckpt: Checkpoint, files) -> Dataset:
    """The images of ``files`` as a dataset read like the training images (float64, normalised)."""
    images = decode_to_format(files, _image_format(ckpt))
    dataset = pixel_dataset(images, files.labels, tuple(ckpt.meta.get("classes") or ()), files.source)
    return dataset.with_transform(Normalize.from_meta(ckpt.meta["normalize"]))


def labelled_images(ckpt: Checkpoint, path: str) -> Dataset:
    """A folder of class folders (or a path,label CSV) of the checkpoint's classes, for ``eval --data``."""
    return _image_rows(ckpt, list_images(path, classes=tuple(ckpt.meta.get("classes") or ())))


def read_inputs(ckpt: Checkpoint, config: Config, model: Sequential, input_path) -> tuple[np.ndarray, list[str]]:
    """(the rows to predict on, (N, D); the image paths, or [] for a file of features)."""
    if config.data.name != "images":
        return read_features(input_path, model.in_features, model.dtype, getattr(config.data, "target", "")), []
    files = list_image_paths(str(input_path))
    return np.asarray(_image_rows(ckpt, files).x), list(files.paths)


def class_columns(ckpt: Checkpoint, names: list[str], table: np.ndarray, paths: list[str]) -> dict[str, list[str]]:
    """The text columns of image predictions: each row's class name (the checkpoint's classes) and path."""
    classes = ckpt.meta.get("classes") or []
    columns: dict[str, list[str]] = {}
    if classes and "class" in names:
        columns["class_name"] = [classes[int(c)] for c in table[:, names.index("class")]]
    if paths:
        columns["path"] = paths
    return columns


def prediction_setup(rank: int, checkpoint_path, input_path, output_path, overwrite: bool):
    """(checkpoint, its config, its model, the checked input rows, the output file on rank 0 or None,
    the image paths: [] for features)."""
    ckpt = load_checkpoint(checkpoint_path, optimizer=False, warn=warn_on_rank0(rank))
    config, model = model_from_checkpoint(ckpt)
    x, paths = read_inputs(ckpt, config, model, input_path)
    output = check_output_path(output_path, overwrite, input_path) if rank == 0 else None
    return ckpt, config, model, x, output, paths
