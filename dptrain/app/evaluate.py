"""``dptrain eval``: a checkpoint's model on its config's validation split, or on every row of a file."""

from __future__ import annotations

from typing import Any

from dptrain.errors import UserError
from dptrain.parallel.agreement import agreed
from dptrain.storage.checkpoint import load_checkpoint, restore_model
from dptrain.training.evaluation import evaluate

from .build import build_loss, build_model, load_dataset, train_val_split
from .predict import checkpoint_config, evaluation_inputs, print_warning, warn_on_rank0


def evaluate_checkpoint(comm, checkpoint_path, data_path=None, debug: bool = False) -> dict[str, Any]:
    """Exact distributed evaluation (collective): loss, accuracy or rmse/r2, n_samples, checkpoint, step.
    A run folder: its newest valid checkpoint, each damaged newer one named on stderr (by rank 0)."""
    warn = warn_on_rank0(comm.rank)
    ckpt, model, loss, dataset = agreed(comm, debug, lambda: evaluation_setup(checkpoint_path, data_path, warn))
    result = evaluate(model, loss, dataset, comm)
    result.update(checkpoint=str(ckpt.path), step=ckpt.meta.get("step"))
    if data_path is not None:
        result["data"] = str(data_path)
    return result


def evaluation_setup(checkpoint_path, data_path, warn=print_warning):
    """(checkpoint, model with its weights, loss, data) to evaluate: every row of ``data_path``, or
    (None) the validation split of the checkpoint's config."""
    ckpt = load_checkpoint(checkpoint_path, optimizer=False, warn=warn)
    if data_path is not None:  # the model from the checkpoint alone; the config's data is not needed
        return ckpt, *evaluation_inputs(ckpt, data_path)
    config = checkpoint_config(ckpt)
    dataset = load_dataset(config)
    _, val_set = train_val_split(config, dataset)
    if len(val_set) == 0:
        raise UserError(f"checkpoint {ckpt.path}: its config has data.val_fraction = 0, no validation split")
    loss = build_loss(config, dataset)
    model = build_model(config, dataset.n_features, dataset.n_outputs, init=False, data_shape=dataset.sample_shape)
    return ckpt, restore_model(ckpt, model), loss, val_set


def result_line(result: dict[str, Any]) -> str:
    """``loss 0.0712  accuracy 0.9833  n_samples 360  (checkpoint ..., step 690)``."""
    metric = (f"accuracy {result['accuracy']:.4f}" if "accuracy" in result
              else f"rmse {result['rmse']:.4f}  r2 {result['r2']:.4f}")
    return (f"loss {result['loss']:.4f}  {metric}  n_samples {result['n_samples']}  "
            f"(checkpoint {result['checkpoint']}, step {result['step']})")
