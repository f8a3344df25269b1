"""Typed configuration: frozen dataclasses loaded from TOML, with ``--set key=value`` overrides.

Unknown keys, wrong types and out-of-range values are refused with a :class:`UserError` that
names the file and the key. The defaults are the built-in job (an MLP on scikit-learn's digits),
the same as ``configs/digits_mlp.toml``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import numpy as np

from .errors import UserError
from .evaluation import VALIDATION_KEYS, validation_metrics
from .nn import ACTIVATIONS, LOSSES
from .optim import OPTIMIZERS, hyperparameter_names
from .schedules import SCHEDULES, scaled_lr

DATASETS = ("digits", "synthetic", "npz", "csv", "diabetes")
ACTIVATION_NAMES = tuple(ACTIVATIONS)  # the choices of model.activation, train.loss and optim.name
LOSS_NAMES = tuple(LOSSES)
OPTIMIZER_NAMES = tuple(OPTIMIZERS)
MONITORED_METRICS = VALIDATION_KEYS
DTYPES = ("float32", "float64")
COMPRESSIONS = ("none", "fp16")
MAX_WIDTH = 2**20  # layer widths, features and classes: beyond this a typo, not a model
MAX_SYNTHETIC_VALUES = 2**28  # 2 GiB of float64 synthetic features


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | synthetic | npz | csv | diabetes
    path: str = ""  # the .npz file, for name = "npz"; the .csv file, for name = "csv"
    target: str = ""  # csv: the name of the label column (every other column is a feature)
    val_fraction: float = 0.2  # share of samples held out for validation, in [0, 1)
    shuffle: bool = True  # a new global order each epoch
    n_samples: int = 2000  # synthetic only
    n_features: int = 20  # synthetic only
    n_classes: int = 4  # synthetic only
    shape: tuple[int, ...] = ()  # one sample's shape, e.g. [1, 8, 8] for images (C, H, W); () = flat


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = (128,)  # widths of the hidden Dense layers
    activation: str = "relu"  # relu | tanh | sigmoid | leaky_relu | gelu
    # an explicit list of layer tables, e.g. [{type = "conv2d", filters = 16, kernel = 3}], instead
    # of hidden + activation; the output layer is added (see dptrain.layer_specs)
    layers: tuple[dict, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64  # the GLOBAL batch, across all ranks
    dtype: str = "float32"  # float32 | float64, for the whole run
    loss: str = "cross_entropy"  # cross_entropy (integer labels) | mse (float targets) | bce_with_logits (0/1 targets)
    on_nan: str = "error"  # error: stop at a NaN/inf loss or gradient | skip: skip that update
    check_sync_every: int = 0  # compare the ranks' parameters every N steps; 0 = each epoch
    accumulate: int = 1  # micro-batches per optimizer step (gradients exchanged once per step)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw | rmsprop
    lr: float = 0.05
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0  # L2 added to the gradient (sgd, adam, rmsprop); decoupled for adamw
    betas: tuple[float, ...] = (0.9, 0.999)  # adam, adamw
    eps: float = 1e-8  # adam, adamw, rmsprop
    alpha: float = 0.99  # rmsprop: smoothing of the squared gradient
    shard: bool = False  # ZeRO stage 1: each rank keeps and updates 1/world of the optimizer state
    schedule: str = "constant"  # constant | step | cosine, after the warmup
    warmup_epochs: float = 0.0  # linear warmup to lr over this many epochs (Goyal et al., 2017)
    step_epochs: int = 10  # schedule "step": multiply lr by gamma every step_epochs epochs
    gamma: float = 0.1  # schedule "step"
    min_lr: float = 0.0  # schedule "cosine": the lr it decays to by the end of training
    lr_reference_batch: int = 0  # linear scaling rule: lr x global batch / this; 0 = off
    clip_norm: float = 0.0  # clip the averaged gradient to this global L2 norm; 0 = off


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int = 0  # stop after this many epochs without improvement; 0 = off
    metric: str = "val_loss"  # val_loss (lower is better) | val_accuracy | val_rmse
    min_delta: float = 0.0  # an improvement must beat the best by more than this


@dataclass(frozen=True)
class CommConfig:
    bucket_mb: float = 4.0  # gradient buckets exchanged while backward goes on; 0 = one exchange after backward
    compression: str = "none"  # none | fp16 (half the bytes; sums accumulate in the training dtype)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # 0 = off
    every_epochs: int = 10  # 0 = off; a checkpoint is always written at the end
    keep: int = 3  # newest checkpoints kept; older ones are pruned


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 50  # a metrics row (and, off a terminal, a progress line) every N steps; 0 = per epoch only


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def to_toml(tree: dict[str, Any]) -> str:
    """Write a two-level config tree (scalars, lists and tables of those) as TOML."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
              for k, v in tree.items() if isinstance(v, dict)]
    return "\n".join(scalars) + "\n" + "\n".join(tables) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON escapes quotes, backslashes and control characters as TOML does; DEL needs adding
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table, e.g. one of model.layers
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


# ---------------------------------------------------------------------------------------------
# Building from plain data, with errors that name the key

def _describe_type(tp: Any) -> str:
    if get_origin(tp) is tuple:
        return f"a list of {_describe_type(get_args(tp)[0])}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    bad = UserError(f"{where}: {key} must be {_describe_type(tp)}, got {value!r}")
    if get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_type, _) = get_args(tp)
        return tuple(_coerce(v, item_type, f"{key}[{i}]", where) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            return float(value)
        except OverflowError:
            raise bad from None
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is dict:  # a layer table: checked key by key in layer_specs
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise TypeError(tp)  # pragma: no cover - a dataclass field of an unsupported type


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'config'} must be a table, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise UserError(f"{where}: unknown key {prefix}{unknown[0]} (known keys: "
                        f"{', '.join(prefix + k for k in sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", where)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.1"`` -> (["train", "lr"], 0.1). The value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer literal too long to convert
        value = raw.strip()
    return key.split("."), value


def load_config(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """The default config, updated by the TOML file at ``path``, then by ``--set`` overrides."""
    tree: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = f"config {path}"
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError:
            raise UserError(f"config {path}: not found") from None
        except OSError as exc:
            raise UserError(f"config {path}: cannot be read ({exc.strerror})") from None
        except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError is a ValueError
            raise UserError(f"config {path}: not valid TOML ({exc})") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {text}: {k} is not a table")
        node[keys[-1]] = value
    config = _build(Config, tree, "", where if not overrides else f"{where} (with --set)")
    validate(config, where)
    return config


def config_from_dict(tree: dict[str, Any], where: str = "config") -> Config:
    """Rebuild a config from ``Config.to_dict()`` output (e.g. a checkpoint's meta.json)."""
    config = _build(Config, tree, "", where)
    validate(config, where)
    return config


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
    for i, width in enumerate(m.hidden):
        if not 1 <= width <= MAX_WIDTH:
            fail(f"model.hidden[{i}]", f"must be in [1, {MAX_WIDTH}], got {width}")
    choose("model.activation", m.activation, ACTIVATION_NAMES)
    _validate_layers(m.layers, config, where)
    if t.epochs < 1:
        fail("train.epochs", f"must be >= 1, got {t.epochs}")
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
    choose("optim.schedule", o.schedule, SCHEDULES)
    if not (0 <= o.warmup_epochs < t.epochs):
        fail("optim.warmup_epochs", f"must be in [0, train.epochs = {t.epochs}), got {o.warmup_epochs}")
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
    if c.every_steps < 0:
        fail("checkpoint.every_steps", f"must be >= 0, got {c.every_steps}")
    if c.every_epochs < 0:
        fail("checkpoint.every_epochs", f"must be >= 0, got {c.every_epochs}")
    if c.keep < 1:
        fail("checkpoint.keep", f"must be >= 1, got {c.keep}")
    if config.log.every_steps < 0:
        fail("log.every_steps", f"must be >= 0 (0 = per epoch only), got {config.log.every_steps}")


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
    from .layer_specs import make_layer

    for i, table in enumerate(tables):
        try:
            layer = make_layer(table, i, config.seed)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if layer.syncs_batch_statistics and config.train.accumulate > 1:
            raise UserError(f"{where}: train.accumulate = {config.train.accumulate} cannot be used with "
                            f"model.layers[{i}] ({table['type']}): its statistics need the whole global batch")


def replace(config: Config, **sections: Any) -> Config:
    """``dataclasses.replace`` for nested sections: replace(cfg, train={"epochs": 2})."""
    changes = {k: dataclasses.replace(getattr(config, k), **v) if isinstance(v, dict) else v
               for k, v in sections.items()}
    return dataclasses.replace(config, **changes)
