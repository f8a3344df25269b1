"""The mpiexec argv that ``dptrain launch`` and ``dptrain bench -n`` run.

The command is an argv list handed to ``subprocess`` without a shell, so a path or a config value
with spaces or shell metacharacters reaches dptrain verbatim.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from dptrain.errors import UserError


def find_mpiexec(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``--mpirun``, else ``DPTRAIN_MPIRUN``, else mpiexec/mpirun next to this Python, else on PATH."""
    env = os.environ if environ is None else environ
    chosen = explicit or env.get("DPTRAIN_MPIRUN")
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise UserError(f"--mpirun {chosen}: not found or not executable")
        return found
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        if os.access(here / name, os.X_OK):
            return str(here / name)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name, path=env.get("PATH"))
        if found:
            return found
    raise UserError("no mpiexec or mpirun found: install dptrain[mpi], load your site's MPI module, "
                    "or pass --mpirun PATH")


def build_command(mpiexec: str, n_ranks: int, train_args: list[str] | tuple[str, ...],
                  python: str | None = None, subcommand: str = "train") -> list[str]:
    """The argv that runs ``dptrain SUBCOMMAND TRAIN_ARGS`` (``dptrain train`` by default) on ``n_ranks`` ranks."""
    if n_ranks < 1:
        raise UserError(f"-n {n_ranks}: the number of ranks must be >= 1")
    return [mpiexec, "-n", str(n_ranks), python or sys.executable, "-m", "dptrain", subcommand, *train_args]
