"""The config schema: frozen dataclasses, one per TOML table, with their defaults and choices.

The defaults are the built-in job (an MLP on scikit-learn's digits), the same as the built-in
config ``digits_mlp``. The comment after each field is its documentation: the configuration
reference (docs/config-reference.md) is generated from it by :mod:`dptrain.config.reference`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from dptrain.nn import ACTIVATIONS, LOSSES
from dptrain.optim import OPTIMIZERS
from dptrain.training.evaluation import VALIDATION_KEYS

DATASETS = ("digits", "synthetic", "npz", "csv", "diabetes", "text", "mnist1d", "images")
ACTIVATION_NAMES = tuple(ACTIVATIONS)  # the choices of model.activation, train.loss and optim.name
LOSS_NAMES = tuple(LOSSES)
OPTIMIZER_NAMES = tuple(OPTIMIZERS)
MONITORED_METRICS = VALIDATION_KEYS
DTYPES = ("float32", "float64")
COMPRESSIONS = ("none", "fp16")
DECAYS = ("all", "matrices")
MAX_WIDTH = 2**20  # layer widths, features and classes: beyond this a typo, not a model
MAX_SYNTHETIC_VALUES = 2**28  # 2 GiB of float64 synthetic features
MAX_IMAGE_SIDE = 2**14  # data.image_size: beyond this a typo, not an image
MAX_PREFETCH = 64  # data.prefetch: batches prepared ahead


@dataclass(frozen=True)
class AugmentConfig:
    """[data.augment]: what training samples of shape (C, H, W) go through; evaluation and predict never augment.

    Every random choice is a pure function of (seed, epoch, sample), so a run ends with the same weights on any
    number of ranks and resumes bitwise. Written as a table, e.g. `augment = {crop_padding = 4, hflip = true}`.
    """

    crop_padding: int = 0  # pad each side by this many zero pixels, then crop a random window of the original size; 0 = off
    hflip: bool = False  # flip half of the samples left to right
    # subtract each channel's mean and divide by its std, both of the training split (in the checkpoint; also at eval and predict)
    normalize: bool = False


@dataclass(frozen=True)
class DataConfig:
    """[data]: the dataset, its split into training and validation, its order."""

    name: str = "digits"  # digits | synthetic | npz | csv | diabetes | text | mnist1d | images
    # the .npz file, for name = "npz"; the .csv file, for name = "csv"; the UTF-8 file, for "text";
    # for "images", a folder with one subfolder of images per class, or a CSV of path,label rows
    path: str = ""
    target: str = ""  # csv: the name of the label column (every other column is a feature)
    # share of samples held out for validation, in [0, 1); text: the end of the file; mnist1d: its test set, always
    val_fraction: float = 0.2
    shuffle: bool = True  # a new global order each epoch
    n_samples: int = 2000  # synthetic only
    n_features: int = 20  # synthetic only
    n_classes: int = 4  # synthetic only
    shape: tuple[int, ...] = ()  # one sample's shape, e.g. [1, 8, 8] for images (C, H, W); [] = flat
    block_size: int = 64  # text: characters per sample (the targets are the next character at each)
    val_path: str = ""  # images: a separate validation folder (or CSV) instead of data.val_fraction
    image_size: tuple[int, ...] = ()  # images: resize each to [H, W]; [] = keep their size (all must share it)
    # images: the folder of the decoded cache; "" = .dptrain-cache beside data.path (if not writable: ~/.cache/dptrain)
    cache: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prefetch: int = 0  # prepare this many local batches ahead in a background thread; 0 = on the step's path


@dataclass(frozen=True)
class ModelConfig:
    """[model]: an MLP from hidden + activation, or any stack of layer tables; the output layer is added."""

    hidden: tuple[int, ...] = (128,)  # widths of the hidden Dense layers
    activation: str = "relu"  # relu | tanh | sigmoid | leaky_relu | gelu
    # an explicit list of layer tables, e.g. [{type = "conv2d", filters = 16, kernel = 3}], instead
    # of hidden + activation; the output layer is added (see the layer tables below)
    layers: tuple[dict, ...] = ()
    init_from_strict: bool = True  # --init-from: every parameter must be in the file with its shape; false = load those that are
    # parameters that do not train (fine-tuning): names or path prefixes, e.g. ["layers.0", "layers.1"]
    freeze: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    """[train]: how long, in what batches and precision, with what loss."""

    epochs: int = 30  # passes over the training data
    steps: int = 0  # train this many optimizer steps instead of train.epochs (for huge epochs, e.g. text); 0 = off
    batch_size: int = 64  # the GLOBAL batch, across all ranks
    dtype: str = "float32"  # float32 | float64, for the whole run
    loss: str = "cross_entropy"  # cross_entropy (integer labels) | mse (float targets) | bce_with_logits (0/1 targets)
    on_nan: str = "error"  # error: stop at a NaN/inf loss or gradient | skip: skip that update
    check_sync_every: int = 0  # compare the ranks' parameters every N steps; 0 = each epoch
    accumulate: int = 1  # micro-batches per optimizer step (gradients exchanged once per step)


@dataclass(frozen=True)
class OptimConfig:
    """[optim]: the optimizer, its learning-rate schedule and gradient clipping."""

    name: str = "sgd"  # sgd | adam | adamw | rmsprop
    lr: float = 0.05  # learning rate (of the global batch; see lr_reference_batch)
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0  # L2 added to the gradient (sgd, adam, rmsprop); decoupled for adamw
    # what weight_decay applies to: all | matrices (the weights of dense, conv, attention and gru layers;
    # not biases, norms or embeddings, as GPT training does)
    decay: str = "all"
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
    """[early_stopping]: stop when a validation metric stops improving."""

    patience: int = 0  # stop after this many evaluations (epochs, or eval.every_steps) without improvement; 0 = off
    metric: str = "val_loss"  # val_loss (lower is better) | val_accuracy | val_rmse
    min_delta: float = 0.0  # an improvement must beat the best by more than this


@dataclass(frozen=True)
class EvalConfig:
    """[eval]: when and on what the validation data is evaluated."""

    every_steps: int = 0  # evaluate, report and write a metrics row every N steps (and after the last); 0 = each epoch
    batches: int = 0  # evaluate on this many global batches of validation samples, a fixed subset drawn from the seed; 0 = all


@dataclass(frozen=True)
class CommConfig:
    """[comm]: how gradients cross the ranks."""

    bucket_mb: float = 4.0  # gradient buckets exchanged while backward goes on; 0 = one exchange after backward
    compression: str = "none"  # none | fp16 (half the bytes; sums accumulate in the training dtype)
    timeout_s: float = 600.0  # a wait in a collective (or for a stop) longer than this ends the job, exit 124; 0 = never


@dataclass(frozen=True)
class CheckpointConfig:
    """[checkpoint]: when rank 0 writes checkpoints, and how many it keeps."""

    every_steps: int = 0  # 0 = off
    every_epochs: int = 10  # 0 = off; a checkpoint is always written at the end
    keep: int = 3  # newest checkpoints kept; older ones are pruned


@dataclass(frozen=True)
class LogConfig:
    """[log]: how often progress lines and metrics rows are written."""

    every_steps: int = 50  # a metrics row (and, off a terminal, a progress line) every N steps; 0 = per epoch only
    tensorboard: bool = False  # TensorBoard event files in <out>/tensorboard (rank 0; needs dptrain[tensorboard])
    mlflow: bool = False  # params, metrics, final checkpoint to MLFLOW_TRACKING_URI, else <out>/mlruns (needs dptrain[mlflow])


@dataclass(frozen=True)
class Config:
    """The whole config: the top-level keys and one table per section."""

    seed: int = 0  # seeds the initial weights, the validation split, the epoch order and dropout masks
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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


def replace(config: Config, **sections: Any) -> Config:
    """``dataclasses.replace`` for nested sections: replace(cfg, train={"epochs": 2})."""
    changes = {k: dataclasses.replace(getattr(config, k), **v) if isinstance(v, dict) else v
               for k, v in sections.items()}
    return dataclasses.replace(config, **changes)
