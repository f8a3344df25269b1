"""The flight recorder: each rank's last collectives, kept to name a hang or a desynchronised job.

Every collective of :class:`~dptrain.parallel.comm.MPIComm` is numbered in the order this rank
called it and recorded with its operation, its size in bytes, the training step it belongs to
and its start and end times. The last ``size`` calls are kept (a ring), with a running checksum
of the whole sequence of (operation, bytes), so two ranks can compare their sequences in one
number. The watchdog prints them when a collective times out, and a DesyncError prints every
rank's, as ``TORCH_DISTRIBUTED_DEBUG`` and Horovod's stall inspector name the call a rank is missing.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass

import numpy as np

from dptrain.runtime.units import format_bytes

#: the operations a communicator records, in the order of their codes
OPERATIONS = ("allreduce_sum", "allreduce_max", "iallreduce_sum", "broadcast", "allgather", "alltoall",
              "reduce_scatter_sum", "allgatherv", "gatherv", "barrier")
RECORD_FIELDS = 6  # seq, operation code, bytes, step, start (ms since the recorder began), duration (us; -1: open)


@dataclass
class Call:
    """One collective call of this rank."""

    seq: int  # 1 for the first collective of the process
    op: str
    nbytes: int
    step: int  # the training step in progress (0 before the first)
    started: float  # time.monotonic()
    ended: float | None = None  # None while it has not completed

    def describe(self, now: float | None = None) -> str:
        """e.g. "#57 allreduce_sum 8 B, step 12, 0.1 ms" or "..., waiting for 3.0 s"."""
        if self.ended is not None:
            took = f"{(self.ended - self.started) * 1e3:.1f} ms"
        else:
            took = f"not complete after {((now or time.monotonic()) - self.started):.1f} s"
        return f"#{self.seq} {self.op} {format_bytes(self.nbytes)}, step {self.step}, {took}"


class FlightRecorder:
    """The last ``size`` collectives of this rank and a checksum of all of them.

    ``step`` is set by the training step (the step in progress); ``waiting`` is the call this rank
    is blocked in, and ``waiting_since`` when it began to wait (read by the watchdog's thread).
    """

    def __init__(self, size: int = 16) -> None:
        self.calls: deque[Call] = deque(maxlen=size)
        self.count = 0
        self.signature = 0  # crc32 of every (operation, bytes) so far, in order
        self.step = 0
        self.waiting: Call | None = None
        self.waiting_since = 0.0
        self.origin = time.monotonic()

    def begin(self, op: str, nbytes: int) -> Call:
        """Record the start of a collective."""
        self.count += 1
        self.signature = zlib.crc32(f"{op}:{nbytes};".encode(), self.signature)
        call = Call(self.count, op, int(nbytes), self.step, time.monotonic())
        self.calls.append(call)
        return call

    def end(self, call: Call) -> None:
        call.ended = time.monotonic()

    def lines(self, now: float | None = None) -> list[str]:
        """One line per kept call, oldest first."""
        return [call.describe(now) for call in self.calls]

    def as_array(self) -> np.ndarray:
        """(size, RECORD_FIELDS) int64, the kept calls oldest first, unused rows all -1: to allgather."""
        table = np.full((self.calls.maxlen, RECORD_FIELDS), -1, dtype=np.int64)
        for i, c in enumerate(self.calls):
            duration = -1 if c.ended is None else round((c.ended - c.started) * 1e6)
            table[i] = (c.seq, OPERATIONS.index(c.op), c.nbytes, c.step, round((c.started - self.origin) * 1e3),
                        duration)
        return table


def lines_from_array(table: np.ndarray) -> list[str]:
    """The lines of :meth:`FlightRecorder.lines` from a row of :meth:`FlightRecorder.as_array`."""
    lines = []
    for seq, op, nbytes, step, _start, duration in table.tolist():
        if seq < 0:
            continue
        took = "not complete" if duration < 0 else f"{duration / 1e3:.1f} ms"
        lines.append(f"#{seq} {OPERATIONS[op]} {format_bytes(nbytes)}, step {step}, {took}")
    return lines
