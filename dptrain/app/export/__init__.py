"""Export a trained model out of dptrain: ONNX (:mod:`.onnx_model`) and safetensors (:mod:`.safetensors_file`).

    export_checkpoint("runs/d1", "model.onnx", "onnx")
    export_checkpoint("runs/d1", "model.safetensors", "safetensors", layout="torch")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dptrain.errors import UserError
from dptrain.storage.atomic import check_output_path
from dptrain.storage.checkpoint import load_checkpoint

from ..predict import model_from_checkpoint, print_warning
from .safetensors_file import LAYOUTS, load_safetensors, save_safetensors

FORMATS = ("onnx", "safetensors")
__all__ = ["FORMATS", "LAYOUTS", "export_checkpoint", "load_safetensors", "save_safetensors"]


def export_checkpoint(checkpoint_path: str | Path, output: str | Path, fmt: str, layout: str = "dptrain",
                      overwrite: bool = False, warn: Callable[[str], None] = print_warning) -> str:
    """Write the model of a checkpoint (a checkpoint folder, or a run folder: its newest valid one) to
    ``output`` in ``fmt``; returns the line to print. UserError for bad input (exit 2)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    if fmt == "onnx" and layout != "dptrain":
        raise UserError("--layout applies to --format safetensors only")
    ckpt = load_checkpoint(checkpoint_path, optimizer=False, warn=warn)
    _, model = model_from_checkpoint(ckpt)
    out = check_output_path(output, overwrite, example=f"model.{fmt}")
    step = int(ckpt.meta.get("step", 0))
    if fmt == "onnx":
        save_onnx = _optional("onnx", "onnx_model").save_onnx
        save_onnx(model, out)
        return f"{ckpt.path} (step {step}) written to {out} as ONNX"
    _optional("safetensors", "safetensors_file")
    save_safetensors(model, out, layout, config=ckpt.meta.get("config"), step=step)
    return f"{ckpt.path} (step {step}) written to {out} as safetensors ({layout} layout)"


def _optional(package: str, module: str):
    """Our module that needs ``package`` (an optional extra): UserError naming the extra if it is missing."""
    import importlib

    try:
        importlib.import_module(package)
    except ImportError:
        raise UserError(f"--format {package} needs the {package} package: pip install \"dptrain[export]\"") from None
    return importlib.import_module(f"{__name__}.{module}")
