"""``dptrain predict``: a checkpoint's model on the rows of a file, written as a CSV.

    dptrain predict --checkpoint runs/d1 --input new.csv --output predictions.csv
    mpirun -n 4 dptrain predict --checkpoint runs/d1 --input new.npz --output predictions.csv
"""

from __future__ import annotations

import click

from dptrain.app.predict import class_columns, predict_outputs, prediction_setup, prediction_table, write_table_csv
from dptrain.parallel.agreement import agreed
from dptrain.parallel.comm import make_comm

from .options import CONTEXT, common_options, reports_errors


@click.command("predict", context_settings=CONTEXT)
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(),
              help="A checkpoint folder (e.g. runs/d1/checkpoints/latest), or a run folder.")
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="The features: an .npz with array x (y is ignored), an .npy of shape (N, D), or a .csv with a "
              "header row and numeric columns (the config's data.target column, if present, is left out). For a "
              "model trained on images: an image, a folder of images (class folders or not) or a CSV of paths.")
@click.option("--output", "output_path", required=True, type=click.Path(),
              help="The CSV file to write: one line per input row, in input order.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@common_options
@reports_errors
def predict_command(checkpoint_path, input_path, output_path, overwrite, comm_kind="auto", debug=False):
    """Predict with a checkpoint's model (in evaluation mode) on the rows of a file; write a CSV.

    Columns by the checkpoint's train.loss: cross_entropy -> row, class, p_0..p_{K-1} (softmax);
    mse -> row, prediction (one output) or y_0..y_{K-1}; bce_with_logits -> row, p_0..p_{K-1}
    (sigmoid), label_0..label_{K-1} (0/1). A model trained on images adds class_name (the training
    folder's name of the class) and path. Runs distributed too (mpirun -n 4 dptrain predict ...):
    each rank predicts a share of the rows, rank 0 writes the file, the same at any world size.
    """
    comm = make_comm(comm_kind)
    comm.debug = debug  # an environment failure under MPI: its traceback, not one line
    with comm.fail_fast():
        ckpt, config, model, x, output, paths = agreed(
            comm, debug, lambda: prediction_setup(comm.rank, checkpoint_path, input_path, output_path, overwrite))
        outputs = predict_outputs(model, x, comm)
        if comm.rank == 0:
            names, table, formats = prediction_table(outputs, config.train.loss)
            write_table_csv(output, names, table, formats, class_columns(ckpt, names, table, paths))
            click.echo(f"{len(table)} predictions ({config.train.loss}: {', '.join(names[1:4])}"
                       f"{', ...' if len(names) > 4 else ''}) written to {output} "
                       f"(checkpoint {ckpt.path}, step {ckpt.meta.get('step')})")
