"""Texts about a config without training: ``dptrain model summary`` and ``dptrain config validate``."""

from __future__ import annotations

from dptrain.config import load_config
from dptrain.data import steps_per_epoch
from dptrain.launch.jobscript import parse_count
from dptrain.nn.summary import summary_table

from .bench import describe_model, mlp_layers
from .build import build_model, build_parts, build_schedule, load_dataset


def model_summary(config_path, overrides) -> str:
    """The layer table of the config's model, and a totals line with the data."""
    config = load_config(config_path, overrides)
    dataset = load_dataset(config)
    model = build_model(config, dataset.n_features, dataset.n_outputs, init=False, data_shape=dataset.sample_shape)
    lines = summary_table(model)
    lines[-1] += f"; data {dataset.source}: {len(dataset)} samples, {dataset.n_outputs} outputs"
    return "\n".join(lines) + "\n"


def validation_report(config_path, overrides, world_size: str | None, comm) -> str:
    """``config OK: ...`` after every check that ``dptrain train`` makes before its first step (for a
    job of ``world_size`` ranks, else of comm's size), or a UserError naming the bad key or value."""
    ranks = parse_count("--ranks", world_size) if world_size is not None else comm.size
    config = load_config(config_path, overrides)
    parts = build_parts(config, ranks)
    steps = steps_per_epoch(len(parts.train_set), config.train.batch_size)
    build_schedule(config, steps)  # UserError naming the optim keys
    t, o, model = config.train, config.optim, parts.model
    shape = "x".join(str(d) for d in model.in_shape)
    if mlp_layers(model) is not None:  # a Dense/activation stack: "MLP 64-32-10 relu"
        model_text = describe_model(model)
    else:  # the whole chain is what `dptrain model summary` is for
        model_text = f"{len(model.layers)} layers from {shape} to {parts.dataset.n_outputs} outputs"
    return (f"config OK: data {parts.dataset.source}: {len(parts.train_set)} training / {len(parts.val_set)} "
            f"validation samples; {model_text}, {model.n_params:,} parameters; "
            f"{t.loss}, {o.name} lr {o.lr:g}, {t.epochs} epochs of {steps} steps (global batch {t.batch_size}"
            f"{f', {ranks} ranks' if ranks > 1 else ''}), {t.dtype}\n")
