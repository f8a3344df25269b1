"""``dptrain data summary``: a config's data, checked and described before a long job.

    dptrain data summary --config configs/digits_images.toml
"""

from __future__ import annotations

import click

from dptrain.app.data_summary import data_summary

from .options import CONTEXT, common_options, config_options, echo_once, reports_errors


@click.group("data", context_settings=CONTEXT)
def data_group() -> None:
    """Check and describe a config's data."""


@data_group.command("summary", context_settings=CONTEXT)
@config_options
@common_options
@reports_errors
def data_summary_command(config_path, overrides, comm_kind="auto", debug=False):
    """The classes and their counts in the training and validation splits, one sample's shape, the
    cache of an image folder (decoded now if it is missing: every image is read once), the
    normalisation statistics and the augmentation. One line naming the file or key for bad input
    (exit status 2), as `dptrain train` would stop on it."""
    echo_once(lambda comm: data_summary(config_path, overrides, info=lambda line: click.echo(line, err=True))
              if comm.rank == 0 else "", comm_kind, debug)
