"""The CLI's commands about the environment, configs and batch jobs: ``dptrain info``,
``dptrain config show|validate`` and the ``--scheduler`` mode of ``dptrain launch``.

    dptrain info [--json]                       # versions, MPI, BLAS and threads, the machine
    mpiexec -n 4 dptrain info                   # ... and the job: ranks, nodes, ranks per node
    dptrain config show --config configs/digits_cnn.toml --set train.epochs=5 > run.toml
    dptrain config validate --config run.toml
    dptrain launch --scheduler slurm --nodes 2 --ranks-per-node 4 --time 01:00:00 --print --config run.toml

The logic lives in :mod:`dptrain.sysinfo` and :mod:`dptrain.jobscript`; registered on ``main`` at
the end of :mod:`dptrain.cli`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .bench import describe_model, kernel_layers
from .build import build_parts, build_schedule
from .checkpoint import step_dirs
from .cli import CONTEXT, _agreed_setup, _check_train_args, _common_options, _reports_errors, train
from .comm import make_comm
from .config import load_config
from .data import steps_per_epoch
from .errors import UserError
from .jobscript import (
    BatchJob,
    check_job_name,
    check_scheduler,
    default_script_path,
    find_submitter,
    find_template,
    parse_count,
    parse_time,
    render,
    submit_script,
    write_script,
)
from .sysinfo import collect, format_text

# ---------------------------------------------------------------------------------------------
# dptrain info


@click.command("info", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@_common_options
@_reports_errors
def info_command(as_json, comm_kind="auto", debug=False):
    """Versions (dptrain, Python, NumPy, mpi4py), the MPI library and job (ranks, nodes, ranks per
    node), the BLAS libraries and the threads per rank dptrain runs them with, the CPU and its cores.

    Under mpirun/mpiexec/srun every rank takes part (to count the nodes) and rank 0 prints.
    """
    comm = make_comm(comm_kind)
    with comm.fail_fast():
        report = collect(comm)
        if comm.rank == 0:
            click.echo(json.dumps(report) if as_json else format_text(report))


# ---------------------------------------------------------------------------------------------
# dptrain config show | validate


@click.group("config", context_settings=CONTEXT)
def config_group() -> None:
    """Show or check a config, with --set overrides applied."""


def _config_options(fn):
    fn = _common_options(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config key, e.g. --set train.epochs=5 (repeatable).")(fn)
    fn = click.option("--config", "config_path", type=click.Path(), default=None,
                      help="TOML config file [default: the built-in digits MLP].")(fn)
    return fn


def _echo_once(work, comm_kind: str, debug: bool) -> None:
    """``work(comm) -> text`` on every rank (each checks its own input, as training does); rank 0
    prints the text, and a UserError is printed once (by rank 0, or by the rank it differs on)."""
    comm = make_comm(comm_kind, limit_threads=False)
    with comm.fail_fast():
        text = _agreed_setup(comm, debug, lambda: work(comm))
        if comm.rank == 0:
            click.echo(text, nl=False)


@config_group.command("show", context_settings=CONTEXT)
@_config_options
@_reports_errors
def config_show(config_path, overrides, comm_kind="auto", debug=False):
    """Print the resolved config (every key, defaults filled in, --set applied) as TOML.

    What it prints loads back to the same config: dptrain config show ... > run.toml, then
    dptrain train --config run.toml. Checks the keys and values, not the data (see validate).
    """
    _echo_once(lambda comm: load_config(config_path, overrides).to_toml(), comm_kind, debug)


@config_group.command("validate", context_settings=CONTEXT)
@_config_options
@click.option("-n", "--ranks", "world_size", default=None, metavar="N",
              help="Check for a job of N ranks: at least one training sample per rank [default: 1, or the size "
              "of the MPI job it runs in].")
@_reports_errors
def config_validate(config_path, overrides, world_size, comm_kind="auto", debug=False):
    """Check a config as `dptrain train` does before its first step, without training or writing.

    Checks every key and value (types, ranges, layer tables), then loads the data (a memory-mapped
    file is scanned, not read whole) and checks it (NaN, labels, the dtype's range, enough training
    samples for N ranks), the loss against the targets, the model's layer shapes against data.shape,
    the parameter count, BatchNorm against the batch size, the optimizer and the lr schedule. It
    does not check the run folder (--out). Prints `config OK: <summary>`, or one line naming the bad
    key or value with exit status 2.
    """
    _echo_once(lambda comm: _validate(config_path, overrides, world_size, comm), comm_kind, debug)


def _validate(config_path, overrides, world_size: str | None, comm) -> str:
    ranks = parse_count("--ranks", world_size) if world_size is not None else comm.size
    config = load_config(config_path, overrides)
    parts = build_parts(config, ranks)
    steps = steps_per_epoch(len(parts.train_set), config.train.batch_size)
    build_schedule(config, steps)  # UserError naming the optim keys
    t, o, model = config.train, config.optim, parts.model
    shape = "x".join(str(d) for d in model.in_shape)
    if kernel_layers(model) is not None:  # a Dense/activation stack: "MLP 64-32-10 relu"
        model_text = describe_model(model)
    else:  # the whole chain is what `dptrain model summary` is for
        model_text = f"{len(model.layers)} layers from {shape} to {parts.dataset.n_outputs} outputs"
    return (f"config OK: data {parts.dataset.source}: {len(parts.train_set)} training / {len(parts.val_set)} "
            f"validation samples; {model_text}, {model.n_params:,} parameters; "
            f"{t.loss}, {o.name} lr {o.lr:g}, {t.epochs} epochs of {steps} steps (global batch {t.batch_size}"
            f"{f', {ranks} ranks' if ranks > 1 else ''}), {t.dtype}\n")


# ---------------------------------------------------------------------------------------------
# dptrain launch --scheduler slurm|pbs


def launch_batch_job(n_ranks, mpirun, dry_run, train_args, *, scheduler, nodes, ranks_per_node, time_limit,
                     job_name, print_script, script_out, submit, template) -> None:
    """``dptrain launch --scheduler ...``: check everything, then print, write and/or submit the script.

    Also reached when ``-n`` is missing, or given with a batch-job option: it then says which mode to use.
    """
    given = {"--nodes": nodes, "--ranks-per-node": ranks_per_node, "--time": time_limit, "--job-name": job_name,
             "--print": print_script, "--script-out": script_out, "--submit": submit, "--template": template}
    if scheduler is None:
        if n_ranks is None:
            raise UserError("launch: give -n N (N ranks here, with mpiexec) or --scheduler slurm|pbs (a batch job)")
        option = next(k for k, v in given.items() if v)
        raise UserError(f"{option}: only with --scheduler (a batch job), not with -n (ranks started here)")
    if n_ranks is not None:
        raise UserError(f"-n {n_ranks} and --scheduler {scheduler}: choose one (-n starts ranks here, --scheduler "
                        f"makes a batch job: give it --nodes and --ranks-per-node)")
    for option, value in (("--mpirun", mpirun), ("--dry-run", dry_run)):
        if value:
            raise UserError(f"{option}: only with -n; with --scheduler, --print shows the batch script")
    scheduler = check_scheduler(scheduler)
    for option, value in (("--nodes", nodes), ("--ranks-per-node", ranks_per_node), ("--time", time_limit)):
        if value is None:
            raise UserError(f"--scheduler {scheduler}: {option} is required")
    if print_script and submit:
        raise UserError("--print and --submit: choose one (--script-out FILE --submit keeps the script as FILE)")
    n_nodes, per_node = parse_count("--nodes", nodes), parse_count("--ranks-per-node", ranks_per_node)
    parse_time(time_limit)
    job_name = check_job_name(job_name if job_name is not None else "dptrain")
    template_path = find_template(scheduler, template)
    try:
        template_text = template_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"template {template_path}: cannot be read ({exc})") from None

    params = _check_train_args(train_args)
    if params["overwrite"]:
        raise UserError("--overwrite: not with --scheduler: the job always runs with --resume auto, so that a "
                        "requeued job continues its run (choose a new --out instead)")
    if params["resume"] not in (None, "auto"):
        raise UserError(f"--resume {params['resume']}: not with --scheduler: the job always runs with --resume auto "
                        f"(continuing the newest checkpoint of --out)")
    args = _other_train_args(params, skip=("config_path", "out", "resume", "overwrite"))
    submitter = find_submitter(scheduler) if submit else None  # before anything is written

    path = Path(script_out) if script_out is not None else default_script_path(scheduler, job_name) if submit else None
    job = BatchJob(scheduler, n_nodes, per_node, time_limit, job_name, config=params["config_path"],
                   out=params["out"], train_args=tuple(args), python=sys.executable,
                   script_path=str(path.resolve()) if path is not None else None)
    text = render(template_text, job, template_path.name)

    if params["out"] is not None and step_dirs(Path(params["out"]) / "checkpoints"):
        click.echo(f"note: --out {params['out']} holds checkpoints: the job continues that run (--resume auto)",
                   err=True)
    if path is not None:
        write_script(path, text)
        click.echo(f"wrote {path}", err=True)
    if print_script or path is None:
        click.echo(text, nl=False)
        if scheduler == "pbs" and path is None:
            click.echo("note: after a checkpoint the job resubmits $DPTRAIN_PBS_SCRIPT [launch/pbs.sh]; "
                       "give --script-out FILE so that it resubmits this script", err=True)
    if submit:
        job_id = submit_script(scheduler, submitter, path)
        click.echo(f"submitted {scheduler} job {job_id} ({path})")


def _other_train_args(params: dict, skip: tuple[str, ...]) -> list[str]:
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
