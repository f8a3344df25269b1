"""``dptrain plot``: the training curves of one or more runs in one image.

    dptrain plot runs/d1 runs/d2 -o curves.png
"""

from __future__ import annotations

import click

from dptrain.app.plot import plot_runs

from .options import CONTEXT, debug_option, reports_errors


@click.command("plot", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "output_path", required=True, type=click.Path(),
              help="The image to write; its suffix chooses the kind (.png, .pdf, .svg, ...). Replaced if it exists.")
@click.option("--title", default=None, help="A title above the panels.")
@debug_option
@reports_errors
def plot_command(runs, output_path, title, debug=False):
    """Draw the training curves of one or more RUN folders (their metrics.jsonl) into one image.

    Panels: training and validation loss, validation accuracy (or RMSE), throughput (samples/s),
    each against the step, with the runs overlaid and labelled by folder name; and the median
    step time split into forward, backward, gradient exchange and optimizer. Needs matplotlib
    (pip install "dptrain[plot]"). Example: dptrain plot runs/d1 runs/d2 -o curves.png
    """
    output = plot_runs(list(runs), output_path, title=title)
    click.echo(f"{len(runs)} run{'s' if len(runs) != 1 else ''} plotted to {output}")
