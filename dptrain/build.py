"""From a :class:`Config` to the objects the trainer takes: data, model, loss, optimizer.

A user who outgrows configs can skip this module and build the same objects by hand
(see README, "Python API").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import data as data_mod
from .config import Config
from .data import Dataset
from .errors import UserError
from .nn import ACTIVATIONS, LOSSES, Dense, Loss, Sequential
from .optim import OPTIMIZERS
from .trainer import CheckpointPolicy, Trainer

_MODEL_INIT_STREAM = 10
MAX_PARAMS = 2**31  # the flat buffers are indexed with int32 offsets by many BLAS builds


def load_dataset(config: Config, path: str | None = None) -> Dataset:
    """The whole dataset named by ``config.data`` (float64 features), before the split.

    An uncompressed .npz or a folder of .npy files stays memory-mapped: nothing is read here but
    the checks, which scan it a chunk at a time.
    """
    d = config.data
    if d.name == "digits":
        return data_mod.load_digits()
    if d.name == "synthetic":
        return data_mod.make_synthetic(d.n_samples, d.n_features, d.n_classes, config.seed)
    return data_mod.load_npz(path or d.path)


def train_val_split(config: Config, dataset: Dataset) -> tuple[Dataset, Dataset]:
    """The deterministic split of ``dataset``, cast to the run's dtype.

    Both are views of ``dataset`` (row numbers and a dtype), not copies: a rank reads and converts
    only the rows it takes. Values that do not fit the dtype are refused here.
    """
    train_idx, val_idx = data_mod.split_train_val(len(dataset), config.data.val_fraction, config.seed)
    if len(train_idx) == 0:
        raise UserError(f"data {dataset.source}: no training samples left after data.val_fraction = "
                        f"{config.data.val_fraction}")
    dtype = np.dtype(config.train.dtype)
    return dataset.subset(train_idx).astype(dtype), dataset.subset(val_idx).astype(dtype)


def build_loss(config: Config, dataset: Dataset) -> Loss:
    loss = LOSSES[config.train.loss]()
    if loss.task != dataset.task:
        kind = "integer class labels" if loss.task == "classification" else "float regression targets"
        raise UserError(f"train.loss = {config.train.loss!r} needs {kind}, but data {dataset.source} has "
                        f"{'class labels' if dataset.task == 'classification' else 'float targets'}")
    return loss


def build_model(config: Config, n_features: int, n_outputs: int, init: bool = True) -> Sequential:
    """MLP: Dense(h) + activation for each width in model.hidden, then Dense(n_outputs).

    Hidden layers use He initialisation after ReLU and Xavier otherwise; the output layer Xavier.
    Parameters are drawn from a Generator seeded by ``config.seed`` (the trainer still broadcasts
    rank 0's so every rank starts from the same weights whatever its NumPy).
    """
    widths = [n_features, *config.model.hidden, n_outputs]
    n_params = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    if n_params > MAX_PARAMS:
        raise UserError(f"model.hidden = {list(config.model.hidden)} gives {n_params:,} parameters for "
                        f"{n_features} inputs; more than {MAX_PARAMS:,} is not supported")
    activation = ACTIVATIONS[config.model.activation]
    init_name = "he" if config.model.activation == "relu" else "xavier"
    layers = []
    for width in config.model.hidden:
        layers += [Dense(width, init=init_name), activation()]
    layers.append(Dense(n_outputs, init="xavier"))
    model = Sequential(layers, n_features, dtype=np.dtype(config.train.dtype))
    if init:
        model.init_params(np.random.default_rng([config.seed, _MODEL_INIT_STREAM]))
    return model


def build_optimizer(config: Config, model: Sequential):
    o = config.optim
    cls = OPTIMIZERS[o.name]
    return cls(model.param_buffer, model.grad_buffer, lr=o.lr, momentum=o.momentum,
               nesterov=o.nesterov, weight_decay=o.weight_decay)


def build_trainer(config: Config, model: Sequential, loss: Loss, optimizer, train_set: Dataset,
                  val_set: Dataset | None, comm, **options) -> Trainer:
    """A Trainer with every training setting of ``config``; ``options`` go to Trainer as they are
    (out_dir, stop_on_signals, callbacks, log)."""
    c, t = config.checkpoint, config.train
    return Trainer(model, loss, optimizer, train_set, val_set, batch_size=t.batch_size, epochs=t.epochs,
                   seed=config.seed, shuffle=config.data.shuffle, comm=comm,
                   checkpoint=CheckpointPolicy(c.every_steps, c.every_epochs, c.keep), config=config.to_dict(),
                   on_nan=t.on_nan, check_sync_every=t.check_sync_every, accumulate=t.accumulate,
                   bucket_mb=config.comm.bucket_mb, compression=config.comm.compression,
                   shard_optimizer=config.optim.shard, **options)


@dataclass
class RunParts:
    """What a training run is made of, before the Trainer."""

    dataset: Dataset
    train_set: Dataset
    val_set: Dataset
    loss: Loss
    model: Sequential
    optimizer: object


def build_parts(config: Config, world_size: int = 1) -> RunParts:
    """Data, split, loss, model and optimizer of ``config``; UserError for anything that cannot run
    (including too few training samples for ``world_size`` ranks, or not enough memory)."""
    try:
        dataset = load_dataset(config)
        train_set, val_set = train_val_split(config, dataset)
        if len(train_set) < world_size:
            raise UserError(f"data {dataset.source}: {len(train_set)} training samples for {world_size} ranks; "
                            f"need at least one per rank")
        loss = build_loss(config, dataset)
        model = build_model(config, dataset.n_features, dataset.n_outputs)
        return RunParts(dataset, train_set, val_set, loss, model, build_optimizer(config, model))
    except MemoryError as exc:
        raise UserError(f"not enough memory for the data and model of this config ({exc or 'MemoryError'})") from None
