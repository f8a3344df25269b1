"""Several world sizes: one ``mpiexec -n N dptrain bench --json`` child each, their reports merged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from dptrain.errors import ExitQuietly, UserError
from dptrain.launch.mpiexec import build_command
from dptrain.runtime.threads import thread_setup

from .report import make_report
from .request import BenchRequest


def parse_ranks(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (sorted, without repeats)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"-n {text}: expected a comma-separated list of rank counts >= 1, e.g. 1,2,4")
    return sorted(set(values))


def child_command(mpiexec: str, n_ranks: int, request: BenchRequest) -> list[str]:
    """The argv of the child that benchmarks ``n_ranks`` ranks in place and prints its report as JSON."""
    r = request
    argv = build_command(mpiexec, n_ranks, ["--json", "--steps", str(r.steps), "--warmup", str(r.warmup)],
                         subcommand="bench")
    if r.config_path is not None:
        argv += ["--config", r.config_path]
    for text in r.overrides:
        argv += ["--set", text]
    if r.per_rank_batch is not None:
        argv += ["--per-rank-batch", str(r.per_rank_batch)]
    argv += ["--layers"] if r.layers else []
    argv += ["--debug"] if r.debug else []
    return argv


def run_children(ranks: list[int], mpiexec: str, request: BenchRequest,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one mpiexec child per world size in ``ranks``, one after the other, and merge their reports."""
    for n in ranks:  # refuse a bad config here, before starting any process
        request.config(n)
    workload, runs = None, []
    for n in ranks:
        argv = child_command(mpiexec, n, request)
        extra, threads_set_by = thread_setup(n)
        if progress is not None:
            progress(" ".join([*(f"{k}={v}" for k, v in extra.items() if k == "OMP_NUM_THREADS"), *argv[:3],
                               "dptrain bench ..."]))
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False, env={**os.environ, **extra})
        except KeyboardInterrupt:
            raise ExitQuietly(130) from None
        if proc.returncode != 0:
            sys.stdout.write(proc.stdout)
            if proc.returncode == 2:
                raise ExitQuietly(2)  # the child printed its one-line error
            raise UserError(f"the benchmark at {n} rank{'s' if n > 1 else ''} failed (exit status "
                            f"{proc.returncode}); its messages are above")
        report = _last_json(proc.stdout)
        if report is None:
            raise UserError(f"the benchmark at {n} ranks printed no report: {proc.stdout.strip()[-300:]!r}")
        run = report["runs"][0]
        run["threads_set_by"] = threads_set_by  # the child takes the variables set here for the user's
        runs.append(run)
        workload = workload or report["workload"]
    return make_report(workload, runs)


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None
