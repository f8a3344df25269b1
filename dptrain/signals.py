"""Preemption: turn SIGTERM, SIGUSR1 and SIGINT into a request to stop at the next step boundary.

The first signal only sets a flag; the trainer sums the flags of all ranks with each step's
loss, so every rank stops after the same step, rank 0 writes a checkpoint, and the job exits
with status 75 (requeue).

Schedulers and launchers often deliver one event twice within milliseconds (Slurm signals every
job step, PBS the whole session, mpiexec relays what it gets), so repeats within
``grace_seconds`` of the first signal are ignored. A signal after that ends the process at once:
the handler re-raises it with the default action, and :meth:`StopOnSignal.arm_default` (called at
each step boundary) installs the default action itself once the grace has passed, so even a rank
blocked inside an MPI call dies on the next signal.
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopOnSignal:
    """Context manager: while active, the first stop signal sets ``received`` to its number."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, grace_seconds: float = 0.5) -> None:
        self.signals = signals
        self.grace_seconds = grace_seconds
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._depth = 0

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, _frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signum, now
        elif now - self._first_at >= self.grace_seconds:  # a second, deliberate signal: die now
            self._restore_default()
            os.kill(os.getpid(), signum)

    def _restore_default(self) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_DFL)

    def arm_default(self) -> None:
        """After the grace period of a first signal, let the next one take the default action."""
        if self.received is not None and time.monotonic() - self._first_at >= self.grace_seconds:
            if threading.current_thread() is threading.main_thread() and self._previous:
                self._restore_default()

    def __enter__(self) -> "StopOnSignal":
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()
