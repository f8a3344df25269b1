"""``dptrain info``: versions, the MPI library and job, BLAS and threads per rank, the CPU.

    dptrain info [--json]
    mpiexec -n 4 dptrain info      # ... and the job: ranks, nodes, ranks per node
"""

from __future__ import annotations

import json

import click

from dptrain.parallel.comm import make_comm, mpi4py_library
from dptrain.runtime.sysinfo import collect, format_text

from .options import CONTEXT, common_options, reports_errors


@click.command("info", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@common_options
@reports_errors
def info_command(as_json, comm_kind="auto", debug=False):
    """Versions (dptrain, Python, NumPy, mpi4py), the MPI library and job (ranks, nodes, ranks per
    node), the BLAS libraries and the threads per rank dptrain runs them with, the CPU and its cores.

    Under mpirun/mpiexec/srun every rank takes part (to count the nodes) and rank 0 prints; in a
    single process it names the MPI library mpi4py is built against, so you can check before a job
    that it is your site's MPI.
    """
    comm = make_comm(comm_kind)
    with comm.fail_fast():
        report = collect(comm)
        if not comm.is_mpi:  # the MPI library a job would use: the site's, or the one from PyPI?
            report["mpi"]["mpi4py_library"] = mpi4py_library()
        if comm.rank == 0:
            click.echo(json.dumps(report) if as_json else format_text(report))
