"""Preemption: turn SIGTERM, SIGUSR1 and SIGINT into a request to stop at the next step boundary.

The first signal only sets a flag; the trainer sums the flags of all ranks with each step's
loss, so every rank stops after the same step, rank 0 writes a checkpoint, and the job exits
with status 75 (requeue).

Schedulers and launchers often deliver one event twice within milliseconds (Slurm signals every
job step, PBS the whole session, mpiexec relays what it gets), so repeats within
``grace_seconds`` of the first signal are ignored; a signal after that ends the process at once.

Each delivery is seen by a watcher thread through ``signal.set_wakeup_fd`` (the C-level handler
writes the signal number to a pipe), not by a Python handler in the main thread: a Python handler
runs only between bytecodes, so two signals arriving during one long matrix multiply or a blocked
MPI call would merge into one, and the second could not end the process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _restore_default_action(signum: int) -> None:
    """SIG_DFL for ``signum``, from any thread (signal.signal works in the main thread only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.signal(signum, None)  # SIG_DFL is 0


class StopOnSignal:
    """Context manager: while active, the first stop signal sets ``received`` to its number."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, grace_seconds: float = 0.5) -> None:
        self.signals = tuple(signals)
        self.grace_seconds = grace_seconds
        self.received: int | None = None
        self.received_at: float | None = None
        self._numbers = {int(s) for s in self.signals}
        self._previous: dict[int, object] = {}
        self._depth = 0
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup_fd = -1

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _watch(self, read_fd: int) -> None:
        """Watcher thread: one byte per delivered signal, even while the main thread is in C code."""
        try:
            while data := os.read(read_fd, 64):  # b"" once __exit__ closes the write end
                for signum in data:
                    if signum not in self._numbers:
                        continue
                    now = time.monotonic()
                    if self.received is None:
                        self.received, self.received_at = signum, now
                    elif now - self.received_at >= self.grace_seconds:  # a second, deliberate signal
                        _restore_default_action(signum)
                        os.kill(os.getpid(), signum)  # ends the process as if never caught
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
            signal.signal(sig, handler)
        self._previous.clear()
        os.close(self._pipe[1])  # the watcher reads end-of-file, closes the read end and exits
        self._pipe = None
