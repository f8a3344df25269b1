"""``dptrain doctor``: is this allocation ready for a long job? One line per check.

    dptrain doctor --out runs/big --config digits_cnn
    srun dptrain doctor --out runs/big          # under the launcher the job will use
"""

from __future__ import annotations

import sys

import click

from dptrain.app.doctor import run_checks
from dptrain.parallel.comm import make_comm

from .options import CONTEXT, common_options, config_options, reports_errors


@click.command("doctor", context_settings=CONTEXT)
@click.option("--out", default="runs", show_default=True, type=click.Path(),
              help="The run folder (or its parent) the job will write: checked writable, shared, with room.")
@config_options
@common_options
@reports_errors
def doctor_command(out, config_path=None, overrides=(), comm_kind="auto", debug=False):
    """Check MPI (every rank answers), the hosts and ranks per node, the scheduler's view (Slurm, PBS)
    against what started, BLAS threads per rank against the cores, allreduce latency and bus bandwidth,
    the run folder (writable and the same folder on every node) and its free space against the config's
    checkpoints. One line per check, OK or the problem and the fix; exit status 1 if any fails.

    Run it as the job will run: alone, or under mpirun/mpiexec/srun on the allocation.
    """
    comm = make_comm(comm_kind)
    comm.debug = debug
    with comm.fail_fast():
        lines, ok = run_checks(comm, out, config_path, tuple(overrides))
        if comm.rank == 0:
            click.echo("\n".join(lines))
    if not ok:
        sys.exit(1)
