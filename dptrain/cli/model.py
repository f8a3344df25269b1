"""``dptrain model summary``: the layers of the model a config describes.

    dptrain model summary --config configs/digits_cnn.toml
"""

from __future__ import annotations

import click

from dptrain.app.describe import model_summary

from .options import CONTEXT, config_options, debug_option, echo_once, reports_errors


@click.group("model", context_settings=CONTEXT)
def model_group() -> None:
    """Inspect the model a config describes."""


@model_group.command("summary", context_settings=CONTEXT)
@config_options
@debug_option
@reports_errors
def model_summary_command(config_path, overrides, debug=False):
    """Print each layer, the shape of one sample after it, its parameter count, and the totals.

    The input shape comes from the data (data.shape), the output width from the data and loss.
    """
    echo_once(lambda comm: model_summary(config_path, overrides), "auto", debug)
