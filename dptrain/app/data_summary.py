"""``dptrain data summary``: what a config's data holds, checked before a long job.

The classes and their counts in each split, one sample's shape, the decoded cache of an image
folder (built now if missing, so every image has been decoded once and found readable), the
normalisation statistics and the augmentation the training split goes through.
"""

from __future__ import annotations

import numpy as np

from dptrain.config import load_config
from dptrain.data import Dataset
from dptrain.runtime.units import format_bytes

from .build import load_dataset, train_val_split
from .image_cache import prepare_images


def data_summary(config_path, overrides, info=lambda line: None) -> str:
    """The summary text of the data of the config at ``config_path`` (with ``--set`` overrides)."""
    config = load_config(config_path, overrides)
    images = prepare_images(config, info=info) if config.data.name == "images" else None
    dataset = load_dataset(config, images)
    train_set, val_set = train_val_split(config, dataset)
    d = config.data
    lines = [f"data {d.name}: {dataset.source}"]
    if d.val_path:
        lines.append(f"validation: {d.val_path}")
    elif dataset.split is not None:
        lines.append("validation: the data's own split (a text's last data.val_fraction of characters; "
                     "MNIST-1D's test set)")
    else:
        lines.append(f"validation: {d.val_fraction:g} of the samples, drawn from seed {config.seed}")
    shape = dataset.sample_shape or tuple(d.shape) or (dataset.n_features,)
    lines.append(f"samples: {' x '.join(map(str, shape))} values each"
                 + (" (channels x height x width)" if len(shape) == 3 else "")
                 + f", {len(train_set):,} training / {len(val_set):,} validation")
    if dataset.vocab is not None:  # text: a class per character, predicted at every position
        lines.append(f"vocabulary: {len(dataset.vocab)} characters")
    elif dataset.task == "classification":
        lines += _class_table(dataset, train_set, val_set)
    if images is not None:
        path = images[0].cache
        lines.append(f"cache: {path} ({format_bytes(path.stat().st_size)}, memory-mapped by every rank)")
    lines += _scaling(train_set)
    return "\n".join(lines) + "\n"


def _class_table(dataset: Dataset, train_set: Dataset, val_set: Dataset) -> list[str]:
    k = dataset.n_classes
    names = list(dataset.classes) if dataset.classes else [str(c) for c in range(k)]
    train = np.bincount(np.asarray(train_set.y[:]), minlength=k)
    val = np.bincount(np.asarray(val_set.y[:]), minlength=k) if len(val_set) else np.zeros(k, dtype=np.int64)
    width = max(5, *(len(n) for n in names))
    rows = [f"classes: {k}", f"  {'class':<{width}}  {'id':>4}  {'train':>7}  {'val':>7}"]
    rows += [f"  {name:<{width}}  {c:>4}  {train[c]:>7,}  {val[c]:>7,}" for c, name in enumerate(names)]
    rows.append(f"  {'total':<{width}}  {'':>4}  {train.sum():>7,}  {val.sum():>7,}")
    empty = [names[c] for c in range(k) if train[c] == 0]
    if empty:
        rows.append(f"warning: no training samples of class {', '.join(empty[:8])}")
    return rows


def _scaling(train_set: Dataset) -> list[str]:
    lines = []
    norm = train_set.x_transform
    if norm is not None and norm.mean:
        unit = " of pixels in [0, 1]" if norm.scale != 1 else ""
        lines.append(f"normalisation (training split{unit}): mean {_floats(norm.mean)}, std {_floats(norm.std)}")
    elif norm is not None:
        lines.append("scaling: pixels / 255, to [0, 1] (no normalisation: data.augment.normalize = false)")
    augment = train_set.augment
    lines.append(f"augmentation (training only): {augment.describe() if augment is not None else 'none'}")
    return lines


def _floats(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"
