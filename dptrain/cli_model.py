"""The ``dptrain predict`` and ``dptrain plot`` commands (registered on the group in cli.py).

    dptrain predict --checkpoint runs/d1 --input new.csv --output predictions.csv
    mpirun -n 4 dptrain predict --checkpoint runs/d1 --input new.npz --output predictions.csv
    dptrain plot runs/d1 runs/d2 -o curves.png
"""

from __future__ import annotations

import click

from .checkpoint import load_checkpoint
from .cli import CONTEXT, _agreed_setup, _common_options, _reports_errors
from .comm import make_comm
from .fileio import check_output_path
from .plot import plot_runs
from .predict import (
    model_from_checkpoint,
    predict_outputs,
    prediction_table,
    read_features,
    write_table_csv,
)


@click.command("predict", context_settings=CONTEXT)
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(),
              help="A checkpoint folder (e.g. runs/d1/checkpoints/latest), or a run folder.")
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="The features: an .npz with array x (y is ignored), an .npy of shape (N, D), or a .csv with a "
              "header row and numeric columns (the config's data.target column, if present, is left out).")
@click.option("--output", "output_path", required=True, type=click.Path(),
              help="The CSV file to write: one line per input row, in input order.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@_common_options
@_reports_errors
def predict_command(checkpoint_path, input_path, output_path, overwrite, comm_kind="auto", debug=False):
    """Predict with a checkpoint's model (in evaluation mode) on the rows of a file; write a CSV.

    Columns by the checkpoint's train.loss: cross_entropy -> row, class, p_0..p_{K-1} (softmax);
    mse -> row, prediction (one output) or y_0..y_{K-1}; bce_with_logits -> row, p_0..p_{K-1}
    (sigmoid), label_0..label_{K-1} (0/1). Runs distributed too (mpirun -n 4 dptrain predict ...):
    each rank predicts a share of the rows, rank 0 writes the file, the same at any world size.
    """
    comm = make_comm(comm_kind)
    with comm.fail_fast():
        ckpt, config, model, x, output = _agreed_setup(
            comm, debug, lambda: _prediction_setup(comm.rank, checkpoint_path, input_path, output_path, overwrite))
        outputs = predict_outputs(model, x, comm)
        if comm.rank == 0:
            names, table, formats = prediction_table(outputs, config.train.loss)
            write_table_csv(output, names, table, formats)
            click.echo(f"{len(table)} predictions ({config.train.loss}: {', '.join(names[1:4])}"
                       f"{', ...' if len(names) > 4 else ''}) written to {output} "
                       f"(checkpoint {ckpt.path}, step {ckpt.meta.get('step')})")


def _prediction_setup(rank: int, checkpoint_path, input_path, output_path, overwrite: bool):
    """(checkpoint, its config, its model, the checked input rows, the output file on rank 0 or None)."""
    ckpt = load_checkpoint(checkpoint_path, optimizer=False)
    config, model = model_from_checkpoint(ckpt)
    x = read_features(input_path, model.in_features, model.dtype, getattr(config.data, "target", ""))
    output = check_output_path(output_path, overwrite, input_path) if rank == 0 else None
    return ckpt, config, model, x, output


@click.command("plot", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "output_path", required=True, type=click.Path(),
              help="The image to write; its suffix chooses the kind (.png, .pdf, .svg, ...). Replaced if it exists.")
@click.option("--title", default=None, help="A title above the panels.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@_reports_errors
def plot_command(runs, output_path, title, debug=False):
    """Draw the training curves of one or more RUN folders (their metrics.jsonl) into one image.

    Panels: training and validation loss, validation accuracy (or RMSE), throughput (samples/s),
    each against the step, with the runs overlaid and labelled by folder name; and the median
    step time split into forward, backward, gradient exchange and optimizer. Needs matplotlib
    (pip install "dptrain[plot]"). Example: dptrain plot runs/d1 runs/d2 -o curves.png
    """
    output = plot_runs(list(runs), output_path, title=title)
    click.echo(f"{len(runs)} run{'s' if len(runs) != 1 else ''} plotted to {output}")
