"""The watchdog: no rank waits forever for another.

Every collective of :class:`~dptrain.parallel.comm.MPIComm` is bounded by ``timeout_s``
(``comm.timeout_s`` in the config; 0 = no bound). A thread of each rank checks, every
``poll_s``, whether this rank has waited longer than that in a collective, or whether a stop
signal has not been honoured within it. Then the rank sends a notice with its state to every
other rank on a side channel (a duplicate of the job's communicator, point-to-point); a rank
that gets a notice sends its own, so every rank that is alive, even one computing or stuck in a
step, answers. After ``grace_s``:

* every rank that answered writes the stacks of its threads (faulthandler) and its last
  collectives (the flight recorder) to stderr, each line prefixed with its rank;
* the lowest rank that answered prints one line naming the ranks that did not arrive (rank, host,
  pid: no answer, or busy in a step) and the collective of the step the others waited in, or that
  they waited in different collectives (their sequences of calls differ);
* that rank ends the job (MPI_Abort) with status :data:`~dptrain.errors.EXIT_TIMEOUT`, within
  ``timeout_s + poll_s + 2 * grace_s``.

Under an MPI library without MPI_THREAD_MULTIPLE there is no thread: the rank checks in its own
waits (:meth:`Watchdog.check`), so a rank stuck in a step does not answer but is still named.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time

import numpy as np

from dptrain.errors import EXIT_TIMEOUT
from dptrain.runtime.units import format_bytes

from .flight import OPERATIONS

DEFAULT_TIMEOUT_S = 600.0  # as NCCL's default: long enough for a slow checkpoint or a first data load
NOTICE, PRINTED = 7101, 7102  # side-channel tags
REASONS = ("joined", "timeout", "signal")
#: a rank's state in a notice: reason, in a collective (0/1), seq, operation, bytes, step, ms waited, signal
RECORD_LENGTH = 8
OUTPUT_DRAIN_S = 1.0  # seen under load: mpiexec dropped the report written just before MPI_Abort


class Watchdog:
    """Bounds this rank's waits and ends the job with a report when a bound is passed.

    comm : the communicator (its ``rank``, ``size``, ``peers`` [(host, pid)] and ``flight``)
    side : the side channel of an MPIComm, or None for a single process
    """

    def __init__(self, comm, side=None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.comm, self.side = comm, side
        self.timeout_s = timeout_s
        self.failing = False
        self._lock = threading.Lock()
        self._stop_signals = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def poll_s(self) -> float:
        return min(1.0, max(0.05, self.timeout_s / 20)) if self.timeout_s else 1.0

    @property
    def grace_s(self) -> float:
        """How long the ranks wait for each other's notices, and the reporter for their stacks."""
        return min(10.0, max(1.0, self.timeout_s / 4))

    # -- the thread ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (again, if it has ended)."""
        self._closed.clear()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="dptrain-watchdog", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread (before MPI is finalised: no MPI call may be under way then)."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_s + 5)

    def watch_stop(self, stop_signals) -> None:
        """Also bound the stop asked by ``stop_signals`` (a StopOnSignal): if it has not ended (the
        context exited) ``timeout_s`` after the first signal, end the job the same way."""
        self._stop_signals = stop_signals
        self.start()

    def _run(self) -> None:
        while not self._closed.wait(self.poll_s):
            self.check()
            stop = self._stop_signals
            if self.side is None and not (stop is not None and stop.active):
                return  # a single process: nothing left to watch (watch_stop starts it again)

    # -- the checks --------------------------------------------------------------------------------

    def check(self) -> None:
        """If a bound has passed or another rank sent a notice, end the job (does not return then)."""
        if not self.failing and (reason := self._due()) is not None:
            self.fail(reason)

    def _due(self) -> str | None:
        now, timeout, flight = time.monotonic(), self.timeout_s, self.comm.flight
        if timeout and flight.waiting is not None and now - flight.waiting_since > timeout:
            return "timeout"
        stop = self._stop_signals
        if timeout and stop is not None and stop.active and stop.received_at is not None \
                and now - stop.received_at > timeout:
            return "signal"
        if self.side is not None and self.side.arrived(NOTICE):
            return "joined"
        return None

    def _record(self, reason: str) -> np.ndarray:
        flight, now = self.comm.flight, time.monotonic()
        call = flight.waiting
        stop = self._stop_signals
        signum = stop.received if stop is not None and stop.received is not None else 0
        if call is None:
            return np.array([REASONS.index(reason), 0, flight.count, 0, 0, flight.step, 0, signum], dtype=np.int64)
        waited = round((now - flight.waiting_since) * 1e3)
        return np.array([REASONS.index(reason), 1, call.seq, OPERATIONS.index(call.op), call.nbytes, call.step,
                         waited, signum], dtype=np.int64)

    # -- ending the job ----------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Exchange notices, write this rank's stacks, report (the lowest live rank) and end the job."""
        with self._lock:
            if self.failing:
                return
            self.failing = True
        comm, side, grace = self.comm, self.side, self.grace_s
        records = {comm.rank: self._record(reason)}
        others = set(range(comm.size)) - {comm.rank}
        if side is not None:
            side.send_all(NOTICE, records[comm.rank])
            records.update(side.collect(NOTICE, RECORD_LENGTH, others, time.monotonic() + grace))
        reporter = min(records)
        _write(self._stacks())
        if comm.rank != reporter:
            side.send(reporter, PRINTED, np.zeros(1, dtype=np.int64))
            time.sleep(2 * grace + 5)  # the reporter ends the job; should it not, this rank does
            self._end()
        if side is not None:  # the stacks of the others first, so the report is the last line
            side.collect(PRINTED, 1, set(records) - {comm.rank}, time.monotonic() + grace)
        _write(f"error: {report(records, comm.size, comm.peers, self.timeout_s)}\n")
        time.sleep(OUTPUT_DRAIN_S)  # the launcher forwards what was written before MPI_Abort tears the job down
        self._end()

    def _end(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm.is_mpi:
            self.comm.abort(EXIT_TIMEOUT)
        os._exit(EXIT_TIMEOUT)

    def _stacks(self) -> str:
        """This rank's thread stacks and last collectives, each line "[rank r] "-prefixed."""
        with tempfile.TemporaryFile() as fh:  # faulthandler writes to a file descriptor
            faulthandler.dump_traceback(fh, all_threads=True)
            fh.seek(0)
            stacks = fh.read().decode(errors="replace")
        if threading.current_thread() is not threading.main_thread():  # leave out the watchdog's own
            blocks = stacks.split("\n\n")
            stacks = "\n\n".join(b for b in blocks if not b.startswith("Current thread"))
        flight = self.comm.flight
        lines = ["watchdog: the stack of each thread of this rank (most recent call first):",
                 *stacks.strip().splitlines(),
                 f"watchdog: the last {len(flight.calls)} of this rank's {flight.count} collectives (oldest first):",
                 *("  " + line for line in flight.lines())]
        return "".join(f"[rank {self.comm.rank}] {line}\n" for line in lines)


def report(records: dict[int, np.ndarray], size: int, peers: list[tuple[str, int]], timeout_s: float) -> str:
    """The one-line report of the lowest live rank, from the notices of the ranks that answered."""

    def who(r: int) -> str:
        host, pid = peers[r]
        return f"rank {r} ({host}, pid {pid})"

    signals = [int(rec[7]) for rec in records.values() if REASONS[rec[0]] == "signal" and rec[7]]
    if signals:
        headline = (f"stop signal {_signal_name(signals[0])} not honoured within comm.timeout_s = {timeout_s:g} s "
                    f"(no step boundary reached)")
    else:
        headline = f"a collective did not complete within comm.timeout_s = {timeout_s:g} s"
    if size == 1:
        return f"{headline}: busy in step {records[0][5]} (its stack is above); exit status {EXIT_TIMEOUT}"
    absent = [f"{who(r)}: no answer (stopped, ended, or hung outside Python)" for r in range(size) if r not in records]
    absent += [f"{who(r)}: busy in step {rec[5]}, in no collective" for r, rec in sorted(records.items())
               if not rec[1]]
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for r, rec in sorted(records.items()):
        if rec[1]:
            groups.setdefault((int(rec[2]), int(rec[3]), int(rec[4]), int(rec[5])), []).append(r)
    waits = [f"{_ranks(ranks)} waited in {OPERATIONS[op]} #{seq} ({format_bytes(nbytes)}) of step {step}"
             for (seq, op, nbytes, step), ranks in groups.items()]
    parts = []
    if absent:
        parts.append(f"{'not at a step boundary' if signals else 'did not arrive'}: {'; '.join(absent)}")
    if waits:
        parts.append("; ".join(waits))
    if len(groups) > 1 and not absent:  # (with a rank absent, the others may stand at different calls of one step)
        parts.append("the ranks waited in different collectives: their sequences of calls differ")
    elif groups and not absent:
        parts.append("every rank arrived, yet the collective did not complete (the network or the MPI library)")
    return f"{headline}: {'; '.join(parts)} -- stacks and last collectives above; exit status {EXIT_TIMEOUT}"


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _write(text: str) -> None:
    """To stderr's file descriptor in one call: not through Python's buffer, which the main thread may hold."""
    data = text.encode(errors="replace")
    while data:
        data = data[os.write(2, data):]
