"""``dptrain eval``: evaluate a checkpoint.

    dptrain eval --checkpoint runs/d1 --json
    mpirun -n 4 dptrain eval --checkpoint runs/d1/checkpoints/latest --data test.csv
"""

from __future__ import annotations

import json

import click

from dptrain.app.evaluate import evaluate_checkpoint, result_line
from dptrain.parallel.comm import make_comm

from .options import CONTEXT, common_options, reports_errors


@click.command("eval", context_settings=CONTEXT)
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(),
              help="A checkpoint folder (e.g. runs/d1/checkpoints/latest), or a run folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a line of text.")
@click.option("--data", "data_path", default=None, type=click.Path(),
              help="Evaluate on every row of this file instead: an .npz with x and y (or a folder with x.npy and "
              "y.npy), or a .csv with the config's data.target column.")
@common_options
@reports_errors
def eval_command(checkpoint_path, as_json, data_path=None, comm_kind="auto", debug=False):
    """Evaluate a checkpoint's model on its config's validation split, or on every row of --data."""
    comm = make_comm(comm_kind)
    comm.debug = debug  # an environment failure under MPI: its traceback, not one line
    with comm.fail_fast():
        result = evaluate_checkpoint(comm, checkpoint_path, data_path, debug)
        if comm.rank == 0:
            click.echo(json.dumps(result) if as_json else result_line(result))
