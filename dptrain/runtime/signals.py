"""Preemption: turn SIGTERM, SIGUSR1 and SIGINT into a request to stop at the next step boundary.

Every signal only sets a flag; the trainer sums the flags of all ranks with each step's loss, so
every rank stops after the same step, rank 0 writes a checkpoint, and the job exits with status 75
(requeue).

Signals are idempotent: schedulers and launchers often deliver one event twice or more (Slurm
signals the batch shell and every job step, PBS the whole session, mpiexec relays what it gets,
the batch templates relay too), at any gaps, so any number of them is one request. With
``keep_ignoring()`` they stay ignored after the stop until the process exits, so a late repeat cannot
turn exit 75 into death by signal (143). A job whose stop does not come (a rank stuck in a step)
is ended by the watchdog ``comm.timeout_s`` after the first signal (see
:meth:`dptrain.parallel.watchdog.Watchdog.watch_stop`); SIGKILL or SIGQUIT end a process at once.

Each delivery is seen by a watcher thread through ``signal.set_wakeup_fd`` (the C-level handler
writes the signal number to a pipe), not by a Python handler in the main thread, which runs only
between bytecodes: the time of the first signal is known even while the main thread is stuck in
C code (a matrix multiply, a blocked read), so the watchdog can bound the stop.
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopOnSignal:
    """Context manager: while active, the first stop signal sets ``received`` to its number and
    ``received_at`` to its time; repeats are ignored.

    then_ignore : on exit, leave the stop signals ignored rather than restoring the previous handlers;
        set it (``keep_ignoring()``) when the process ends after a stop, which another rank may have asked.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, then_ignore: bool = False) -> None:
        self.signals = tuple(signals)
        self.then_ignore = then_ignore
        self.received: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.repeats = 0  # signals after the first, ignored
        self._numbers = {int(s) for s in self.signals}
        self._previous: dict[int, object] = {}
        self._depth = 0
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup_fd = -1

    @property
    def requested(self) -> bool:
        return self.received is not None

    def keep_ignoring(self) -> None:
        """The process ends after this stop: leave the stop signals ignored on exit, so a late repeat
        cannot kill it (exit 75 would become death by signal, 143)."""
        self.then_ignore = True

    @property
    def active(self) -> bool:
        """Inside the context (the signals are caught)."""
        return self._depth > 0

    def _watch(self, read_fd: int) -> None:
        """Watcher thread: one byte per delivered signal, even while the main thread is in C code."""
        try:
            while data := os.read(read_fd, 64):  # b"" once __exit__ closes the write end
                for signum in data:
                    if signum not in self._numbers:
                        continue
                    if self.received is None:
                        self.received, self.received_at = signum, time.monotonic()
                    else:
                        self.repeats += 1
        finally:
            os.close(read_fd)

    def __enter__(self) -> StopOnSignal:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._pipe = (read_fd, write_fd)
            for sig in self.signals:  # a Python handler must be installed for the wakeup byte to be written
                self._previous[sig] = signal.signal(sig, lambda signum, frame: None)
            self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            threading.Thread(target=self._watch, args=(read_fd,), name="dptrain-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth > 0 or self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.then_ignore else handler)
        self._previous.clear()
        os.close(self._pipe[1])  # the watcher reads end-of-file, closes the read end and exits
        self._pipe = None
