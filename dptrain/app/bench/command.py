"""``dptrain bench`` without click: in place, or one mpiexec child per world size."""

from __future__ import annotations

import sys
from collections.abc import Callable

from dptrain.errors import CollectiveError, ExitQuietly, UserError
from dptrain.launch.mpiexec import find_mpiexec
from dptrain.parallel.comm import make_comm, refuse_under_mpi

from .children import parse_ranks, run_children
from .report import format_layers, format_table, to_json
from .request import BenchRequest
from .run import run_bench


def _echo(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def bench_command(request: BenchRequest, ranks: str | None = None, as_json: bool = False, mpirun: str | None = None,
                  comm_kind: str = "auto", echo: Callable[..., None] | None = None) -> None:
    """What ``dptrain bench`` does: in place (single process or the current MPI world), or with
    ``ranks`` one mpiexec child per world size. Prints the table, or the JSON report, on rank 0."""

    echo = echo or _echo
    if ranks is not None:
        refuse_under_mpi("-n starts its own mpiexec runs; under mpirun, run `dptrain bench` without -n "
                         "(it benchmarks the job's world size)", comm_kind)
        world_sizes = parse_ranks(ranks)
        mpiexec = find_mpiexec(mpirun)
        report = run_children(world_sizes, mpiexec, request, progress=lambda line: echo(f"running: {line}", err=True))
        echo(to_json(report) if as_json else _text(report))
        return
    if mpirun is not None:
        raise UserError("--mpirun is used with -n only")
    comm = make_comm(comm_kind)
    with comm.fail_fast():
        try:
            report = run_bench(comm, request)
        except CollectiveError as exc:  # e.g. the workload diverged: raised by every rank at the same step
            if request.debug:
                raise
            if comm.rank == 0:
                echo(f"error: {exc}", err=True)
            raise ExitQuietly(exc.exit_code) from None
        if comm.rank == 0:
            echo(to_json(report) if as_json else _text(report))


def _text(report) -> str:
    """The table, and each run's per-layer table when it has one (--layers)."""
    return "\n\n".join([format_table(report), *(format_layers(run) for run in report["runs"] if "layers" in run)])
