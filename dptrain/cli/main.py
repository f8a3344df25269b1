"""The ``dptrain`` command group: one module per command, registered here. No training logic in cli/.

    dptrain                                   # train the built-in default, single process
    mpirun -n 4 dptrain                       # the same job on 4 ranks
    dptrain launch -n 2 --config configs/digits_mlp.toml --out runs/d1
    dptrain eval --checkpoint runs/d1/checkpoints/latest --json
"""

from __future__ import annotations

import click

from dptrain._version import __version__

from .bench import bench
from .config import config_group
from .data import data_group
from .doctor import doctor_command
from .evaluate import eval_command
from .export import export_command
from .info import info_command
from .launch import launch
from .model import model_group
from .options import CONTEXT
from .plot import plot_command
from .predict import predict_command
from .sample import sample_command
from .train import train


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="dptrain")
@click.pass_context
def main(ctx: click.Context) -> None:
    """dptrain: data-parallel neural-network training with NumPy over MPI.

    With no command, trains the built-in default (an MLP on the digits data), like `dptrain train`.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(train)


for command in (train, eval_command, predict_command, sample_command, export_command, launch, bench, model_group, plot_command,
                info_command, doctor_command, config_group, data_group):
    main.add_command(command)
