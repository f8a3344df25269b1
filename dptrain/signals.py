"""Preemption: turn SIGTERM, SIGUSR1 and SIGINT into a request to stop at the next step boundary.

The first signal only sets a flag; the trainer sums the flags of all ranks with each step's
gradients, so every rank stops after the same step, rank 0 writes a checkpoint, and the job exits
with status 75 (requeue). The handlers are then reset to the default action, so a second signal
ends the process at once, even inside a blocked MPI call.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopOnSignal:
    """Context manager: while active, the first stop signal sets ``received`` to its number."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, _frame) -> None:
        self.received = signum
        for sig in self.signals:  # a second signal takes the default action: terminate now
            signal.signal(sig, signal.SIG_DFL)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
