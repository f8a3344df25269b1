"""What the commands share: options declared once, and the error handling of every command."""

from __future__ import annotations

import functools
import sys

import click

from dptrain.errors import EXIT_ENVIRONMENT, ExitQuietly, UserError, environment_message
from dptrain.parallel.agreement import agreed
from dptrain.parallel.comm import make_comm

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

debug_option = click.option("--debug", is_flag=True, help="Show the full traceback of an error.")

comm_option = click.option("--comm", "comm_kind", type=click.Choice(["auto", "mpi", "single"]), default="auto",
                           show_default=True,
                           help="Communicator: MPI when started by mpirun/mpiexec/srun (auto), or forced.")

config_path_option = click.option("--config", "config_path", type=click.Path(), default=None,
                                  help="TOML config file, or a built-in config's name (dptrain config list) "
                                  "[default: the built-in digits MLP].")

overrides_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                                help="Override a config key, e.g. --set train.epochs=5 (repeatable).")


def common_options(fn):
    """--comm and --debug."""
    return comm_option(debug_option(fn))


def config_options(fn):
    """--config and --set."""
    return config_path_option(overrides_option(fn))


def reports_errors(fn):
    """Turn UserError into one line on stderr and exit status 2, and an OSError (the environment failing)
    into one line naming the path and exit status 74 (the traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if kwargs.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except ExitQuietly as exc:
            sys.exit(exc.code)
        except OSError as exc:  # the environment failed: disk full, read-only, permissions, a file for a folder
            if kwargs.get("debug"):
                raise
            click.echo(f"error: {environment_message(exc)}", err=True)
            sys.exit(EXIT_ENVIRONMENT)

    return wrapper


def echo_once(work, comm_kind: str, debug: bool) -> None:
    """``work(comm) -> text`` on every rank (each checks its own input, as training does); rank 0
    prints the text, and a UserError is printed once (by rank 0, or by the rank it differs on)."""
    comm = make_comm(comm_kind, limit_threads=False)
    with comm.fail_fast():
        text = agreed(comm, debug, lambda: work(comm))
        if comm.rank == 0:
            click.echo(text, nl=False)
