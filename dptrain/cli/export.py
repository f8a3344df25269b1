"""``dptrain export``: a checkpoint's model as an ONNX graph or a safetensors file.

    dptrain export --checkpoint runs/d1 --format onnx --output model.onnx
    dptrain export --checkpoint runs/d1 --format safetensors --layout torch --output model.safetensors
"""

from __future__ import annotations

import click

from dptrain.app.export import FORMATS, LAYOUTS, export_checkpoint
from dptrain.parallel.comm import refuse_under_mpi

from .options import CONTEXT, reports_errors


@click.command("export", context_settings=CONTEXT)
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(),
              help="A checkpoint folder (e.g. runs/d1/checkpoints/latest), or a run folder (its newest valid one).")
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS),
              help="onnx: the model in evaluation mode as an ONNX graph (input x, output y, float32); "
              "safetensors: its weights and buffers.")
@click.option("--output", "-o", "output_path", required=True, type=click.Path(), help="The file to write.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="dptrain", show_default=True,
              help="safetensors names and shapes: dptrain's (what --init-from loads), or those of the "
              "equivalent torch.nn.Sequential (Linear weights as (out, in)).")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@reports_errors
def export_command(checkpoint_path, fmt, output_path, layout, overwrite, debug=False):
    """Export a checkpoint's model out of dptrain: ONNX (onnxruntime and other runtimes) or safetensors
    (loadable with safetensors.numpy, and with --layout torch by torch's load_state_dict).

    Needs the export extra: pip install "dptrain[export]". Exit status 2 for bad input (a layer that
    cannot be exported is named), 74 if the file cannot be written.
    """
    refuse_under_mpi("export: run it in one process, without mpirun/mpiexec/srun")
    click.echo(export_checkpoint(checkpoint_path, output_path, fmt, layout, overwrite))
