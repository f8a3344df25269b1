"""Python warnings in an MPI job: each rank shows a warning once, and ranks other than 0 say who they are.

Without this, a warning that every rank meets (a NumPy RuntimeWarning, a DeprecationWarning) is
printed N times, indistinguishably. :func:`install` (called by :class:`dptrain.parallel.comm.MPIComm`)
replaces :func:`warnings.showwarning` in this process: a (category, message, file, line) already
shown is not shown again, whatever the warnings filters say; rank 0 shows it as Python does, rank
r > 0 with every line prefixed ``[rank r] ``::

    script.py:7: UserWarning: learning rate looks large
      warnings.warn("learning rate looks large")
    [rank 1] script.py:7: UserWarning: learning rate looks large
    [rank 1]   warnings.warn("learning rate looks large")

Recording warnings (``warnings.catch_warnings(record=True)``, pytest) is not affected.
"""

from __future__ import annotations

import sys
import warnings


class RankWarnings:
    """A :func:`warnings.showwarning` replacement for one rank."""

    def __init__(self, rank: int, previous) -> None:
        self.rank = rank
        self.previous = previous  # the showwarning this one replaced: rank 0 shows through it
        self.seen: set[tuple] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        key = (category, str(message), filename, lineno)
        if key in self.seen:
            return
        self.seen.add(key)
        if self.rank == 0:
            self.previous(message, category, filename, lineno, file, line)
            return
        text = warnings.formatwarning(message, category, filename, lineno, line)
        text = "".join(f"[rank {self.rank}] {part}" for part in text.splitlines(True))
        stream = sys.stderr if file is None else file
        if stream is None:  # pythonw: no stderr
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the warning is lost, as in Python's own
            pass


def install(rank: int) -> RankWarnings:
    """Show this process's warnings once each, prefixed with ``[rank r] `` on rank r > 0. Idempotent."""
    current = warnings.showwarning
    if isinstance(current, RankWarnings):
        current.rank = rank
        return current
    hook = RankWarnings(rank, current)
    warnings.showwarning = hook
    return hook
