"""``dptrain train`` (and plain ``dptrain``): train a model, single process or on every rank of an MPI job.

    dptrain train --config configs/digits_cnn.toml --out runs/cnn
    mpirun -n 4 dptrain train --config digits_cnn --out runs/cnn --resume auto
"""

from __future__ import annotations

import click

from dptrain.app.train import TrainRequest, run_training
from dptrain.config import load_config
from dptrain.errors import CollectiveError, ExitQuietly, UserError
from dptrain.parallel.comm import make_comm
from dptrain.runtime.signals import StopOnSignal

from .options import CONTEXT, common_options, config_options, reports_errors


def train_options(fn):
    """The options of `dptrain train` that `dptrain launch` passes on."""
    fn = click.option("--timeline", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                      help="Write a Chrome trace of every rank's steps (forward, backward, exchange, optimizer), "
                      "evaluations and checkpoints to FILE (open it in Perfetto or chrome://tracing).")(fn)
    fn = click.option("--quiet", is_flag=True,
                      help="Print only errors, warnings and the final summary line (metrics files are still "
                      "written).")(fn)
    fn = click.option("--init-from", "init_from", default=None, metavar="PATH",
                      help="Start a new run from the weights of a checkpoint, a run folder or a .safetensors "
                      "export (fine-tuning): step 0, a fresh optimizer, this config and data. Skipped when "
                      "--resume finds a checkpoint to continue.")(fn)
    fn = click.option("--resume", default=None, metavar="auto|PATH",
                      help="Continue from the newest valid checkpoint of --out (auto; starts fresh if there is "
                      "none) or from the checkpoint at PATH.")(fn)
    fn = click.option("--overwrite", is_flag=True,
                      help="Train into an --out folder that already holds checkpoints (they are deleted).")(fn)
    fn = click.option("--out", type=click.Path(), default=None,
                      help="Run folder for checkpoints and the resolved config [default: runs/<date-time>].")(fn)
    return config_options(fn)


@click.command(context_settings=CONTEXT)
@train_options
@common_options
@reports_errors
def train(config_path, overrides, out, overwrite, resume, init_from=None, quiet=False, timeline=None, comm_kind="auto",
          debug=False):
    """Train a model, on one process or on every rank of an MPI job.

    Exit status: 0 done; 1 crashed; 2 bad input; 3 diverged (NaN/inf) or ranks out of sync;
    74 the environment failed (disk, permissions); 75 stopped by SIGTERM/SIGUSR1/SIGINT after writing a
    checkpoint (requeue with --resume auto); 124 a rank stopped making progress (comm.timeout_s).
    """
    # from the start: a signal in set-up stops after step 1; repeats, even after the stop, are ignored
    with StopOnSignal() as stop_signals:
        comm = make_comm(comm_kind)
        comm.debug = debug  # an environment failure under MPI: its traceback, not one line
        comm.watchdog.watch_stop(stop_signals)  # a stop that cannot come ends the job after comm.timeout_s
        request = TrainRequest(config_path, tuple(overrides), out, overwrite, resume, quiet, timeline, debug,
                               init_from)
        with comm.fail_fast():
            try:
                run_training(comm, request, stop_signals, echo=click.echo)
            except CollectiveError as exc:  # raised by every rank at the same step
                if debug:
                    raise
                if comm.rank == 0:
                    if getattr(exc, "details", ""):  # a DesyncError: every rank's last collectives
                        click.echo(exc.details, err=True)
                    click.echo(f"error: {exc}", err=True)
                raise ExitQuietly(exc.exit_code) from None


def check_train_args(train_args) -> dict:
    """`dptrain train TRAIN_ARGS` parsed and its config loaded, so bad input stops a launch before it starts."""
    try:
        sub = train.make_context("train", list(train_args))
    except click.UsageError as exc:
        raise UserError(f"train options: {exc.format_message()}") from None
    load_config(sub.params["config_path"], sub.params["overrides"])
    return sub.params


def train_args_again(params: dict, skip: tuple[str, ...]) -> list[str]:
    """The `dptrain train` options in ``params`` (parsed) as arguments again, leaving out ``skip`` and
    options left at their defaults: e.g. ["--set", "train.epochs=5", "--comm", "mpi"]."""
    defaults = train.make_context("train", []).params
    args: list[str] = []
    for option in train.params:
        if not isinstance(option, click.Option) or option.name in skip or option.name not in params:
            continue  # (--help is not a parameter)
        value = params[option.name]
        if value == defaults.get(option.name):
            continue
        if option.is_flag:
            args.append(option.opts[0] if value else option.secondary_opts[0])
        elif option.multiple:
            args += [item for v in value for item in (option.opts[0], str(v))]
        else:
            args += [option.opts[0], str(value)]
    return args
