"""The checks on a config's values beyond their types: ranges, choices, and keys that go together.
Each refusal is a :class:`UserError` naming the key."""

from __future__ import annotations

import math

import numpy as np

from dptrain.errors import UserError
from dptrain.nn import LOSSES
from dptrain.optim import OPTIMIZERS, SCHEDULES, hyperparameter_names, scaled_lr
from dptrain.training.evaluation import validation_metrics

from .schema import (
    ACTIVATION_NAMES,
    COMPRESSIONS,
    DATASETS,
    DECAYS,
    DTYPES,
    LOSS_NAMES,
    MAX_IMAGE_SIDE,
    MAX_PREFETCH,
    MAX_SYNTHETIC_VALUES,
    MAX_WIDTH,
    MONITORED_METRICS,
    OPTIMIZER_NAMES,
    Config,
    OptimConfig,
)


def validate(config: Config, where: str = "config") -> None:
    """Refuse out-of-range values, naming the key."""

    def fail(key: str, message: str) -> None:
        raise UserError(f"{where}: {key} {message}")

    def choose(key: str, value: str, choices: tuple[str, ...]) -> None:
        if value not in choices:
            fail(key, f"is {value!r}; expected one of {', '.join(choices)}")

    d, m, t, o, c = config.data, config.model, config.train, config.optim, config.checkpoint
    if config.seed < 0:
        fail("seed", f"must be >= 0, got {config.seed}")
    choose("data.name", d.name, DATASETS)
    if d.name == "npz" and not d.path:
        fail("data.path", "must name an .npz file or a folder with x.npy and y.npy when data.name = \"npz\"")
    if d.name == "text" and not d.path:
        fail("data.path", "must name a UTF-8 text file when data.name = \"text\"")
    if d.name == "text" and not 1 <= d.block_size <= MAX_WIDTH:
        fail("data.block_size", f"must be in [1, {MAX_WIDTH}], got {d.block_size}")
    if d.name == "text" and t.loss != "cross_entropy":
        fail("train.loss", f"is {t.loss!r}; text data predicts the next character: use \"cross_entropy\"")
    if d.name == "csv" and not d.path:
        fail("data.path", "must name a .csv file when data.name = \"csv\"")
    if d.name == "csv" and not d.target:
        fail("data.target", "must name the label column of the CSV file when data.name = \"csv\"")
    if not 0 <= d.val_fraction < 1:
        fail("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    if d.name == "synthetic":
        if d.n_samples < 2:
            fail("data.n_samples", f"must be >= 2, got {d.n_samples}")
        if not 1 <= d.n_features <= MAX_WIDTH:
            fail("data.n_features", f"must be in [1, {MAX_WIDTH}], got {d.n_features}")
        if not 2 <= d.n_classes <= MAX_WIDTH:
            fail("data.n_classes", f"must be in [2, {MAX_WIDTH}], got {d.n_classes}")
        if d.n_samples * d.n_features > MAX_SYNTHETIC_VALUES:
            fail("data.n_samples", f"times data.n_features must be <= {MAX_SYNTHETIC_VALUES:,} "
                 f"(got {d.n_samples} x {d.n_features})")
    for i, size in enumerate(d.shape):
        if not 1 <= size <= MAX_WIDTH:
            fail(f"data.shape[{i}]", f"must be in [1, {MAX_WIDTH}], got {size}")
    _validate_images(config, fail)
    for i, width in enumerate(m.hidden):
        if not 1 <= width <= MAX_WIDTH:
            fail(f"model.hidden[{i}]", f"must be in [1, {MAX_WIDTH}], got {width}")
    choose("model.activation", m.activation, ACTIVATION_NAMES)
    _validate_layers(m.layers, config, where)
    if t.epochs < 1:
        fail("train.epochs", f"must be >= 1, got {t.epochs}")
    if t.steps < 0:
        fail("train.steps", f"must be >= 0 (0 = train.epochs), got {t.steps}")
    if config.eval.every_steps < 0:
        fail("eval.every_steps", f"must be >= 0 (0 = each epoch), got {config.eval.every_steps}")
    if config.eval.batches < 0:
        fail("eval.batches", f"must be >= 0 (0 = all the validation data), got {config.eval.batches}")
    if t.batch_size < 1:
        fail("train.batch_size", f"must be >= 1, got {t.batch_size}")
    choose("train.dtype", t.dtype, DTYPES)
    choose("train.loss", t.loss, LOSS_NAMES)
    choose("train.on_nan", t.on_nan, ("error", "skip"))
    if t.check_sync_every < 0:
        fail("train.check_sync_every", f"must be >= 0, got {t.check_sync_every}")
    choose("optim.name", o.name, OPTIMIZER_NAMES)
    if o.nesterov and (o.momentum == 0 or o.name != "sgd"):
        fail("optim.nesterov", "needs optim.name = \"sgd\" and optim.momentum > 0")
    _validate_optimizer_keys(o, where)
    choose("optim.decay", o.decay, DECAYS)
    choose("optim.schedule", o.schedule, SCHEDULES)
    if t.steps == 0 and not (0 <= o.warmup_epochs < t.epochs):
        fail("optim.warmup_epochs", f"must be in [0, train.epochs = {t.epochs}), got {o.warmup_epochs}")
    if o.warmup_epochs < 0:
        fail("optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}")
    if o.step_epochs < 1:
        fail("optim.step_epochs", f"must be >= 1, got {o.step_epochs}")
    if not 0 < o.gamma <= 1:
        fail("optim.gamma", f"must be in (0, 1], got {o.gamma}")
    if o.lr_reference_batch < 0:
        fail("optim.lr_reference_batch", f"must be >= 0 (0 = off), got {o.lr_reference_batch}")
    # the schedule decays to min_lr from the lr after the linear scaling rule (see build.build_schedule)
    base_lr = scaled_lr(o.lr, t.batch_size, o.lr_reference_batch)
    if not 0 <= o.min_lr < base_lr:
        scaled = "" if base_lr == o.lr else f" x train.batch_size / optim.lr_reference_batch = {base_lr:g}"
        fail("optim.min_lr", f"must be in [0, optim.lr{scaled}), got {o.min_lr}")
    if not (o.clip_norm >= 0 and math.isfinite(o.clip_norm)):
        fail("optim.clip_norm", f"must be >= 0 (0 = off), got {o.clip_norm}")
    e = config.early_stopping
    if e.patience < 0:
        fail("early_stopping.patience", f"must be >= 0 (0 = off), got {e.patience}")
    choose("early_stopping.metric", e.metric, MONITORED_METRICS)
    if not (e.min_delta >= 0 and math.isfinite(e.min_delta)):
        fail("early_stopping.min_delta", f"must be >= 0, got {e.min_delta}")
    if e.patience and d.val_fraction == 0:
        fail("early_stopping.patience", "needs validation data: set data.val_fraction > 0")
    reported = validation_metrics(LOSSES[t.loss].task)
    if e.patience and e.metric not in reported:
        fail("early_stopping.metric", f"{e.metric!r} is not reported with train.loss = {t.loss!r} (it reports "
             f"{', '.join(reported)})")
    if t.accumulate < 1:
        fail("train.accumulate", f"must be >= 1, got {t.accumulate}")
    if not (config.comm.bucket_mb >= 0 and math.isfinite(config.comm.bucket_mb)):
        fail("comm.bucket_mb", f"must be >= 0, got {config.comm.bucket_mb}")
    choose("comm.compression", config.comm.compression, COMPRESSIONS)
    if not (config.comm.timeout_s >= 0 and math.isfinite(config.comm.timeout_s)):
        fail("comm.timeout_s", f"must be >= 0 seconds (0 = no bound), got {config.comm.timeout_s}")
    if c.every_steps < 0:
        fail("checkpoint.every_steps", f"must be >= 0, got {c.every_steps}")
    if c.every_epochs < 0:
        fail("checkpoint.every_epochs", f"must be >= 0, got {c.every_epochs}")
    if c.keep < 1:
        fail("checkpoint.keep", f"must be >= 1, got {c.keep}")
    if config.log.every_steps < 0:
        fail("log.every_steps", f"must be >= 0 (0 = per epoch only), got {config.log.every_steps}")


def _validate_images(config: Config, fail) -> None:
    """data.name = "images" and its keys; augmentation needs samples of shape (C, H, W)."""
    d, a = config.data, config.data.augment
    if d.name == "images" and not d.path:
        fail("data.path", "must name a folder with one subfolder per class, or a CSV of path,label rows, "
             "when data.name = \"images\"")
    if d.name == "images" and config.train.loss != "cross_entropy":
        fail("train.loss", f"is {config.train.loss!r}; images are classified: use \"cross_entropy\"")
    for key, value in (("data.val_path", d.val_path), ("data.image_size", d.image_size), ("data.cache", d.cache)):
        if value and d.name != "images":
            fail(key, f"applies to data.name = \"images\" only (data.name is {d.name!r})")
    if d.image_size and (len(d.image_size) != 2 or not all(1 <= s <= MAX_IMAGE_SIDE for s in d.image_size)):
        fail("data.image_size", f"must be [H, W] with each in [1, {MAX_IMAGE_SIDE}], got {list(d.image_size)}")
    if d.name == "images" and d.shape:
        fail("data.shape", "is set by the images (channels, height, width): leave it out for data.name = \"images\"")
    if not 0 <= a.crop_padding <= MAX_IMAGE_SIDE:
        fail("data.augment.crop_padding", f"must be in [0, {MAX_IMAGE_SIDE}], got {a.crop_padding}")
    if (a.crop_padding or a.hflip or a.normalize) and d.name != "images" and len(d.shape) != 3:
        fail("data.augment", "needs samples of shape (C, H, W): data.name = \"images\", or a data.shape of "
             f"three values (data.shape is {list(d.shape)})")
    if not 0 <= d.prefetch <= MAX_PREFETCH:
        fail("data.prefetch", f"must be in [0, {MAX_PREFETCH}] (0 = off), got {d.prefetch}")


def _validate_optimizer_keys(o: OptimConfig, where: str) -> None:
    """The optimizers' own checks of their hyperparameters, with errors that name the key.

    Every optimizer is built over empty buffers from the config's values, so each key is checked
    whichever optimizer is chosen (``optim.eps`` also with sgd). Their ValueError messages begin
    with the argument's name, which is the key's name in [optim].
    """
    empty = np.empty(0)
    for name, cls in OPTIMIZERS.items():
        kwargs = {k: getattr(o, k) for k in hyperparameter_names(name)}
        if "betas" in kwargs:
            kwargs["betas"] = list(kwargs["betas"])  # as TOML wrote it, in the message
        try:
            cls(empty, empty, **kwargs)
        except ValueError as exc:
            message = str(exc)
            key = message.split(" ", 1)[0]
            if key not in kwargs:  # pragma: no cover - every message names its argument first
                raise UserError(f"{where}: optim (checked as for optim.name = {name!r}): {message}") from None
            raise UserError(f"{where}: optim.{message}") from None


def _validate_layers(tables: tuple[dict, ...], config: Config, where: str) -> None:
    """Each of model.layers must make a layer; BatchNorm needs whole global batches."""
    from .layers import make_layer

    for i, table in enumerate(tables):
        try:
            layer = make_layer(table, i, config.seed)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if layer.syncs_batch_statistics and config.train.accumulate > 1:
            raise UserError(f"{where}: train.accumulate = {config.train.accumulate} cannot be used with "
                            f"model.layers[{i}] ({table['type']}): its statistics need the whole global batch")
