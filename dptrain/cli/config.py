"""``dptrain config show|validate|list|reference``: configs without training.

    dptrain config list
    dptrain config show --config digits_cnn --set train.epochs=5 > run.toml
    dptrain config validate --config run.toml
    dptrain config reference > docs/config-reference.md
"""

from __future__ import annotations

import click

from dptrain.app.describe import validation_report
from dptrain.config import builtin_configs, load_config
from dptrain.config.reference import reference_markdown

from .options import CONTEXT, common_options, config_options, debug_option, echo_once, reports_errors


@click.group("config", context_settings=CONTEXT)
def config_group() -> None:
    """List the built-in configs, show or check a config (with --set overrides), print the reference."""


@config_group.command("show", context_settings=CONTEXT)
@config_options
@common_options
@reports_errors
def config_show(config_path, overrides, comm_kind="auto", debug=False):
    """Print the resolved config (every key, defaults filled in, --set applied) as TOML.

    What it prints loads back to the same config: dptrain config show ... > run.toml, then
    dptrain train --config run.toml. Checks the keys and values, not the data (see validate).
    """
    echo_once(lambda comm: load_config(config_path, overrides).to_toml(), comm_kind, debug)


@config_group.command("validate", context_settings=CONTEXT)
@config_options
@common_options
@click.option("-n", "--ranks", "world_size", default=None, metavar="N",
              help="Check for a job of N ranks: at least one training sample per rank [default: 1, or the size "
              "of the MPI job it runs in].")
@reports_errors
def config_validate(config_path, overrides, world_size, comm_kind="auto", debug=False):
    """Check a config as `dptrain train` does before its first step, without training or writing.

    Checks every key and value (types, ranges, layer tables), then loads the data (a memory-mapped
    file is scanned, not read whole) and checks it (NaN, labels, the dtype's range, enough training
    samples for N ranks), the loss against the targets, the model's layer shapes against data.shape,
    the parameter count, BatchNorm against the batch size, the optimizer and the lr schedule. It
    does not check the run folder (--out). Prints `config OK: <summary>`, or one line naming the bad
    key or value with exit status 2.
    """
    echo_once(lambda comm: validation_report(config_path, overrides, world_size, comm), comm_kind, debug)


@config_group.command("list", context_settings=CONTEXT)
def config_list():
    """List the built-in configs: each name works as --config NAME (the files are the repository's configs/)."""
    configs = builtin_configs()
    width = max(map(len, configs))
    for name, description in configs.items():
        click.echo(f"{name:<{width}}  {description}".rstrip())


@config_group.command("reference", context_settings=CONTEXT)
@debug_option
@reports_errors
def config_reference(debug=False):
    """Print the configuration reference (every table and key, its type, default and meaning) as
    Markdown: what docs/config-reference.md holds, generated from the config schema."""
    click.echo(reference_markdown(), nl=False)
