"""From a :class:`Config` to the objects the trainer takes: data, model, loss, optimizer.

A user who outgrows configs can skip this module and build the same objects by hand
(see README, "Python API").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dptrain import data as data_mod
from dptrain.config import Config
from dptrain.config.layers import make_layer
from dptrain.data import Dataset, steps_per_epoch
from dptrain.data.normalize import Normalize
from dptrain.errors import UserError
from dptrain.nn import ACTIVATIONS, LOSSES, Dense, Embedding, Flatten, Loss, Sequential
from dptrain.optim import OPTIMIZERS, hyperparameter_names
from dptrain.optim.schedules import Schedule, make_schedule, scaled_lr
from dptrain.training.early_stopping import EarlyStopping
from dptrain.training.trainer import CheckpointPolicy, Trainer

from .image_cache import ImageData, image_dataset, prepare_images

_MODEL_INIT_STREAM = 10
MAX_PARAMS = 2**31  # the flat buffers are indexed with int32 offsets by many BLAS builds


def load_dataset(config: Config, images: tuple[ImageData, np.ndarray] | None = None) -> Dataset:
    """The whole dataset named by ``config.data`` (float64 features), before the split.

    An uncompressed .npz or a folder of .npy files stays memory-mapped: nothing is read here but
    the checks, which scan it a chunk at a time. Images come from their cache (``images``: what
    :func:`prepare_images` returned, which a job of several ranks calls first; alone, it is called here).
    """
    d = config.data
    if d.name == "images":
        return image_dataset(*(images if images is not None else prepare_images(config)))
    if d.name == "digits":
        return data_mod.load_digits()
    if d.name == "synthetic":
        return data_mod.make_synthetic(d.n_samples, d.n_features, d.n_classes, config.seed)
    if d.name == "diabetes":
        return data_mod.load_diabetes()
    if d.name == "csv":
        return data_mod.load_csv(d.path, d.target, labels=config.train.loss == "cross_entropy")
    if d.name == "text":
        return data_mod.load_text(d.path, d.block_size, d.val_fraction)
    if d.name == "mnist1d":
        return data_mod.load_mnist1d()
    return data_mod.load_npz(d.path)


def train_val_split(config: Config, dataset: Dataset) -> tuple[Dataset, Dataset]:
    """The deterministic split of ``dataset``, cast to the run's dtype.

    Both are views of the dataset (row numbers and a dtype), not copies. A memory-mapped dataset
    stays on disk: a rank reads and converts only the rows it takes; one in memory is converted
    once. Values that do not fit the dtype are refused here.
    """
    if dataset.split is not None:  # the data's own: a text's contiguous parts, MNIST-1D's test set
        train_idx, val_idx = dataset.split
    else:
        train_idx, val_idx = data_mod.split_train_val(len(dataset), config.data.val_fraction, config.seed)
    if len(train_idx) == 0:
        raise UserError(f"data {dataset.source}: no training samples left after data.val_fraction = "
                        f"{config.data.val_fraction}")
    dataset = with_normalization(config, dataset, train_idx)
    dataset = dataset.converted(config.train.dtype)  # in memory: converted once, not at every step
    train_set, val_set = dataset.subset(train_idx), dataset.subset(val_idx)
    a = config.data.augment
    if a.crop_padding or a.hflip:  # training rows only: evaluation and predict never augment
        train_set.augment = data_mod.Augment(config.seed, crop_padding=a.crop_padding, hflip=a.hflip)
        train_set.sample_shape = train_set.sample_shape or tuple(config.data.shape)
    return train_set, val_set


def with_normalization(config: Config, dataset: Dataset, train_rows: np.ndarray) -> Dataset:
    """``dataset`` whose features are scaled as the run reads them: images' pixels to [0, 1], and
    with ``data.augment.normalize`` each channel by the mean and std of the training rows."""
    shape = dataset.sample_shape or tuple(config.data.shape)
    scale = 1 / 255 if dataset.sample_shape is not None else 1.0
    if config.data.augment.normalize:
        mean, std = data_mod.channel_stats(dataset.base_x, shape, rows=train_rows, scale=scale)
    elif scale == 1:
        return dataset
    else:
        mean, std = (), ()
    return dataset.with_transform(Normalize.from_stats(scale, mean, std, int(np.prod(shape[1:]))))


def build_loss(config: Config, dataset: Dataset) -> Loss:
    """The loss of ``train.loss``; UserError if the data's targets do not suit it."""
    loss = LOSSES[config.train.loss]()
    if loss.task == "multilabel":  # float targets, each in [0, 1]
        if dataset.task != "regression":
            raise UserError(f"train.loss = {config.train.loss!r} needs float targets in [0, 1] (one column per "
                            f"label), but data {dataset.source} has integer class labels")
        y = np.asarray(dataset.base_y)
        if y.size and not (np.all(y >= 0) and np.all(y <= 1)):
            raise UserError(f"train.loss = {config.train.loss!r} needs targets in [0, 1], but data "
                            f"{dataset.source} has targets from {y.min():g} to {y.max():g}")
        return loss
    if loss.task != dataset.task:
        kind = "integer class labels" if loss.task == "classification" else "float regression targets"
        raise UserError(f"train.loss = {config.train.loss!r} needs {kind}, but data {dataset.source} has "
                        f"{'class labels' if dataset.task == 'classification' else 'float targets'}")
    return loss


def sample_shape(config: Config, n_features: int, data_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """One sample's shape: ``data_shape`` (the data's own: images' (C, H, W)), else ``data.shape``
    if given (its product must be the number of features)."""
    shape = tuple(data_shape or config.data.shape)
    if not shape:
        return (n_features,)
    if int(np.prod(shape)) != n_features:
        raise UserError(f"data.shape = {list(shape)} holds {int(np.prod(shape))} values, but the data has "
                        f"{n_features} features per sample")
    return shape


def predicts_sequences(config: Config) -> bool:
    """Whether the model predicts a class at each position of a sequence (text: the next
    character), its output (T, classes), rather than one per sample."""
    return config.data.name == "text"


def build_layers(config: Config, in_shape: tuple[int, ...], n_outputs: int) -> list:
    """The layers of ``model.layers`` (or of ``model.hidden`` + ``model.activation``), then the
    output layer: a Dense(n_outputs) with Xavier initialisation, after a Flatten if needed; for
    a model that predicts sequences, a Dense over the last axis of its (T, features) output.
    An Embedding without ``vocab`` gets the data's class count.

    Hidden Dense layers of ``model.hidden`` use the activation's ``preferred_init``: He
    initialisation before ReLU-like activations and Xavier otherwise (after a Flatten if
    ``data.shape`` has several dimensions).
    """
    m = config.model
    if m.layers:
        layers = [make_layer(table, i, config.seed) for i, table in enumerate(m.layers)]
        for layer in layers:
            if isinstance(layer, Embedding) and layer.vocab is None:
                layer.vocab = n_outputs
    else:
        activation = ACTIVATIONS[m.activation]
        layers = [Flatten()] if len(in_shape) > 1 else []  # data.shape given for an MLP
        for width in m.hidden:
            layers += [Dense(width, init=activation.preferred_init), activation()]
    shape = in_shape
    for i, layer in enumerate(layers):
        try:
            shape = layer.output_shape(shape)
        except ValueError as exc:
            raise UserError(f"model.layers[{i}] ({layer.describe()}) cannot take samples of shape "
                            f"{list(shape)}: {exc}") from None
    if predicts_sequences(config):
        if len(shape) != 2 or shape[0] != in_shape[0]:
            raise UserError(f"model.layers end with samples of shape {list(shape)}, but a model of "
                            f"data.name = {config.data.name!r} predicts each of the {in_shape[0]} positions: "
                            f"it needs (positions, features), e.g. after an embedding")
    elif len(shape) != 1:
        layers.append(Flatten())
    layers.append(Dense(n_outputs, init="xavier"))
    return layers


def build_model(config: Config, n_features: int, n_outputs: int, init: bool = True,
                data_shape: tuple[int, ...] | None = None) -> Sequential:
    """The model of ``config`` for samples of ``n_features`` values (shaped by ``data_shape``, the
    data's own, else by ``data.shape``).

    Parameters are drawn from a Generator seeded by ``config.seed`` (the trainer still broadcasts
    rank 0's so every rank starts from the same weights whatever its NumPy).
    """
    in_shape = sample_shape(config, n_features, data_shape)
    layers = build_layers(config, in_shape, n_outputs)
    n_params, shape = 0, in_shape  # counted before anything is allocated
    for layer in layers:
        n_params += sum(int(np.prod(s, dtype=object)) for s in layer.param_shapes(shape).values())
        shape = layer.output_shape(shape)
    if n_params > MAX_PARAMS:
        what = f"model.hidden = {list(config.model.hidden)}" if not config.model.layers else "model.layers"
        raise UserError(f"{what} gives {n_params:,} parameters for {n_features} inputs; "
                        f"more than {MAX_PARAMS:,} is not supported")
    model = Sequential(layers, in_shape, dtype=np.dtype(config.train.dtype))
    if init:
        model.init_params(np.random.default_rng([config.seed, _MODEL_INIT_STREAM]))
    return model


def build_optimizer(config: Config, model: Sequential):
    """The optimizer of ``optim.name`` over the model's flat buffers, with the config's values for
    the hyperparameters it takes (its lr is then set by the schedule before each step); weight decay
    on the weight matrices only with ``optim.decay = "matrices"``."""
    o = config.optim
    kwargs = {k: getattr(o, k) for k in hyperparameter_names(o.name)}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    optimizer = OPTIMIZERS[o.name](model.param_buffer, model.grad_buffer, **kwargs)
    if o.decay == "matrices":
        optimizer.decay_only(model.decay_ranges())
    return optimizer


def build_schedule(config: Config, steps_per_epoch: int) -> Schedule:
    """The learning rate per optimizer step: ``optim.schedule`` after ``optim.warmup_epochs`` of
    linear warmup, from optim.lr (times global batch / ``optim.lr_reference_batch`` if set)."""
    o, total = config.optim, config.train.steps or config.train.epochs * steps_per_epoch
    try:
        base = scaled_lr(o.lr, config.train.batch_size, o.lr_reference_batch)
        warmup = min(round(o.warmup_epochs * steps_per_epoch), total - 1)
        return make_schedule(o.schedule, base, total, warmup_steps=warmup,
                             step_size=o.step_epochs * steps_per_epoch, gamma=o.gamma, min_lr=o.min_lr)
    except ValueError as exc:  # config.validate refuses these first; this names the keys all the same
        argument = str(exc).split(" ", 1)[0]
        key = _SCHEDULE_KEYS.get(argument, "optim.schedule")
        raise UserError(f"{key} = {_config_value(config, key)!r} gives no valid learning-rate schedule: {exc}") from None


#: make_schedule's and scaled_lr's arguments -> the config keys they come from
_SCHEDULE_KEYS = {"base_lr": "optim.lr", "lr": "optim.lr", "total_steps": "train.epochs",
                  "warmup_steps": "optim.warmup_epochs", "step_size": "optim.step_epochs", "gamma": "optim.gamma",
                  "min_lr": "optim.min_lr", "global_batch": "train.batch_size",
                  "reference_batch": "optim.lr_reference_batch"}


def _config_value(config: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def build_trainer(config: Config, model: Sequential, loss: Loss, optimizer, train_set: Dataset,
                  val_set: Dataset | None, comm, **options) -> Trainer:
    """A Trainer with every training setting of ``config``; ``options`` go to Trainer as they are
    (out_dir, stop_on_signals, callbacks, log)."""
    c, t, e = config.checkpoint, config.train, config.early_stopping
    early = EarlyStopping(e.patience, e.metric, e.min_delta) if e.patience else None
    return Trainer(model, loss, optimizer, train_set, val_set, batch_size=t.batch_size, epochs=t.epochs,
                   steps=t.steps, eval_every_steps=config.eval.every_steps, seed=config.seed,
                   shuffle=config.data.shuffle, comm=comm,
                   checkpoint=CheckpointPolicy(c.every_steps, c.every_epochs, c.keep), config=config.to_dict(),
                   on_nan=t.on_nan, check_sync_every=t.check_sync_every, accumulate=t.accumulate,
                   bucket_mb=config.comm.bucket_mb, compression=config.comm.compression,
                   shard_optimizer=config.optim.shard,
                   lr_schedule=build_schedule(config, steps_per_epoch(len(train_set), t.batch_size)),
                   clip_norm=config.optim.clip_norm, prefetch=config.data.prefetch, early_stopping=early,
                   **options)


def _check_batch_statistics(config: Config, model: Sequential, n_train: int) -> None:
    """BatchNorm over flat features cannot normalise a global batch of one sample: refuse a batch
    size that leaves one (UserError) rather than fail at the end of the first epoch."""
    batch = config.train.batch_size
    last = n_train % batch or batch
    for i, layer in enumerate(model.layers):
        if layer.syncs_batch_statistics and int(np.prod(model.shapes[i][1:])) == 1 and last == 1:
            where = f"model.layers[{i}]" if config.model.layers else f"layer {i}"
            raise UserError(f"train.batch_size = {batch} leaves a global batch of 1 sample ({n_train} training "
                            f"samples), which {layer.describe()} at {where} cannot normalise: choose another batch size")


@dataclass
class RunParts:
    """What a training run is made of, before the Trainer."""

    dataset: Dataset
    train_set: Dataset
    val_set: Dataset
    loss: Loss
    model: Sequential
    optimizer: object


def build_parts(config: Config, world_size: int = 1, images: tuple[ImageData, np.ndarray] | None = None) -> RunParts:
    """Data, split, loss, model and optimizer of ``config``; UserError for anything that cannot run
    (including too few training samples for ``world_size`` ranks, or not enough memory). ``images``:
    see :func:`load_dataset`."""
    try:
        dataset = load_dataset(config, images)
        train_set, val_set = train_val_split(config, dataset)
        if config.eval.batches:  # the fixed subset evaluated during training (dptrain eval takes all of it)
            size = config.eval.batches * config.train.batch_size
            val_set = val_set.subset(data_mod.evaluation_rows(len(val_set), size, config.seed))
        if len(train_set) < world_size:
            raise UserError(f"data {dataset.source}: {len(train_set)} training samples for {world_size} ranks; "
                            f"need at least one per rank")
        loss = build_loss(config, dataset)
        model = build_model(config, dataset.n_features, dataset.n_outputs, data_shape=dataset.sample_shape)
        _check_batch_statistics(config, model, len(train_set))
        try:
            model.freeze(config.model.freeze)
        except ValueError as exc:
            raise UserError(f"config: model.freeze: {exc}") from None
        return RunParts(dataset, train_set, val_set, loss, model, build_optimizer(config, model))
    except MemoryError as exc:
        raise UserError(f"not enough memory for the data and model of this config ({exc or 'MemoryError'})") from None
