"""``dptrain launch``: start N ranks here with mpiexec, or make (and submit) a Slurm or PBS batch job.

    dptrain launch -n 2 --config configs/digits_mlp.toml --out runs/d1
    dptrain launch --scheduler slurm --nodes 2 --ranks-per-node 4 --time 01:00:00 --print --config digits_cnn
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import click

from dptrain.errors import UserError
from dptrain.launch.jobscript import (
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
from dptrain.launch.mpiexec import build_command, find_mpiexec
from dptrain.parallel.comm import refuse_under_mpi
from dptrain.runtime.threads import thread_environment
from dptrain.storage.checkpoint import step_dirs

from .options import CONTEXT, debug_option, reports_errors
from .train import check_train_args, train_args_again


@click.command(context_settings=dict(CONTEXT, ignore_unknown_options=True))
@click.option("-n", "--ranks", "n_ranks", type=int, default=None, help="Number of MPI ranks, started here.")
@click.option("--mpirun", default=None, metavar="PATH",
              help="mpiexec/mpirun to use [default: $DPTRAIN_MPIRUN, the one next to this Python, or PATH].")
@click.option("--dry-run", is_flag=True, help="Print the command instead of running it.")
@click.option("--scheduler", default=None, metavar="slurm|pbs",
              help="Instead of -n: make a batch job from the slurm.sbatch or pbs.sh template (launch/).")
@click.option("--nodes", default=None, metavar="N", help="With --scheduler: nodes.")
@click.option("--ranks-per-node", default=None, metavar="K", help="With --scheduler: MPI ranks per node.")
@click.option("--time", "time_limit", default=None, metavar="HH:MM:SS", help="With --scheduler: the time limit.")
@click.option("--job-name", default=None, help="With --scheduler: the job's name [default: dptrain].")
@click.option("--print", "print_script", is_flag=True,
              help="With --scheduler: print the batch script (the default without --submit/--script-out).")
@click.option("--script-out", default=None, metavar="FILE", help="With --scheduler: write the batch script to FILE.")
@click.option("--submit", is_flag=True,
              help="With --scheduler: write the script (to --script-out, else runs/jobs/) and submit it with "
              "sbatch or qsub; prints the job id.")
@click.option("--template", default=None, metavar="FILE",
              help="With --scheduler: the template [default: the slurm.sbatch or pbs.sh shipped with dptrain].")
@debug_option
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
@reports_errors
def launch(n_ranks, mpirun, dry_run, train_args, debug=False, **job):
    """Run `dptrain train TRAIN_ARGS` on N ranks with mpiexec (no shell involved), or make a Slurm or
    PBS batch job that runs it (--scheduler).

    Sets BLAS/OpenMP threads per rank to max(1, cores / N) unless you set OMP_NUM_THREADS or
    similar. Example: dptrain launch -n 2 --config configs/digits_mlp.toml --out runs/d1

    Batch job: dptrain launch --scheduler slurm --nodes 2 --ranks-per-node 4 --time 01:00:00 --submit
    --config configs/digits_mlp.toml --out runs/big. The job always trains with --resume auto, so that
    a requeued or continued job carries on from its newest checkpoint.
    """
    # under mpirun every rank would start its own mpiexec (or job): refuse, in one line from rank 0
    refuse_under_mpi("launch: run it outside mpirun/mpiexec/srun: it starts or submits the ranks itself")
    if n_ranks is None or any(job.values()):  # a batch job (or a mix of the two modes)
        return launch_batch_job(n_ranks, mpirun, dry_run, list(train_args), **job)
    check_train_args(train_args)  # before starting N processes

    argv = build_command(find_mpiexec(mpirun), n_ranks, list(train_args))
    extra_env = thread_environment(n_ranks)
    if dry_run:
        click.echo(" ".join([*(f"{k}={v}" for k, v in extra_env.items()), shlex.join(argv)]))
        return
    proc = subprocess.Popen(argv, env={**os.environ, **extra_env})

    def forward(signum, _frame):  # pass preemption signals on to mpiexec, which relays them to the ranks
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # mpiexec got the same SIGINT from the terminal
        code = proc.wait()
    sys.exit(code if code >= 0 else 128 - code)


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

    params = check_train_args(train_args)
    if params["overwrite"]:
        raise UserError("--overwrite: not with --scheduler: the job always runs with --resume auto, so that a "
                        "requeued job continues its run (choose a new --out instead)")
    if params["resume"] not in (None, "auto"):
        raise UserError(f"--resume {params['resume']}: not with --scheduler: the job always runs with --resume auto "
                        f"(continuing the newest checkpoint of --out)")
    args = train_args_again(params, skip=("config_path", "out", "resume", "overwrite"))
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
            click.echo("note: after a checkpoint the job resubmits $DPTRAIN_PBS_SCRIPT [the pbs.sh template]; "
                       "give --script-out FILE so that it resubmits this script", err=True)
    if submit:
        job_id = submit_script(scheduler, submitter, path)
        click.echo(f"submitted {scheduler} job {job_id} ({path})")
