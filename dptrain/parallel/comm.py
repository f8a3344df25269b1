"""Communicators: the only module that imports mpi4py.

Two implementations share one small interface:

* :class:`SingleProcessComm` (rank 0 of 1) never imports mpi4py, so dptrain runs on a laptop
  or in tests with no MPI installed;
* :class:`MPIComm` wraps ``MPI.COMM_WORLD`` with the buffer (uppercase) API: no pickling.

:func:`make_comm` chooses: MPI when the process was started by mpirun/mpiexec/srun, single-process
otherwise, unless forced with ``kind="mpi"`` or ``kind="single"`` (or ``DPTRAIN_COMM``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator

import numpy as np

from dptrain.errors import EXIT_ENVIRONMENT, CollectiveError, ExitQuietly, UserError, environment_message
from dptrain.runtime import rank_warnings
from dptrain.runtime.sysinfo import HOSTNAME_BYTES

from .flight import Call, FlightRecorder
from .watchdog import Watchdog

SPIN_S = 1.0  # a collective waits at full speed this long (a step's waits are far shorter), then naps
NAP_S = 0.01  # between two tests of a long wait: ~0 CPU, and a wait ends at most this much later

# Variables that process managers set in every rank they start.
_LAUNCHER_VARIABLES = (
    "PMI_RANK", "PMI_SIZE", "PMIX_RANK",  # MPICH (Hydra), Intel MPI, PMIx-based launchers
    "OMPI_COMM_WORLD_SIZE",  # Open MPI
    "MV2_COMM_WORLD_SIZE",  # MVAPICH
)


def launched_by_mpi(environ: dict[str, str] | None = None) -> bool:
    """True if an MPI process manager (mpirun, mpiexec, srun) started this process."""
    env = os.environ if environ is None else environ
    if any(v in env for v in _LAUNCHER_VARIABLES):
        return True
    # srun sets a numeric step id in each task; the batch script itself has no step id.
    return env.get("SLURM_STEP_ID", "").isdigit() and "SLURM_PROCID" in env


class _Done:
    """A request that is already complete (the single-process Iallreduce)."""

    def wait(self) -> None:
        pass

    def test(self) -> bool:
        return True


_DONE = _Done()


class _Pending:
    """An MPI request, completed by ``wait()`` (bounded by the watchdog, like every collective)."""

    def __init__(self, comm: MPIComm, request, call: Call) -> None:
        self._comm, self._request, self._call = comm, request, call

    def wait(self) -> None:
        self._comm._complete(self._request, self._call)

    def test(self) -> bool:
        """Drive MPI's progress engine (nothing else does without an async progress thread)."""
        done = self._request.Test()
        if done and self._call.ended is None:
            self._comm.flight.end(self._call)
        return done


class SingleProcessComm:
    """Rank 0 of a world of 1. Every collective is the identity."""

    rank = 0
    size = 1
    local_size = 1
    is_mpi = False
    library = "none (single process)"
    thread_limit = None  # a single process keeps the BLAS's default threads

    def __init__(self) -> None:
        self.peers = [(socket.gethostname(), os.getpid())]
        self.flight = FlightRecorder()  # records nothing: a single process has no collective to wait in
        self.watchdog = Watchdog(self)  # bounds a stop signal (Watchdog.watch_stop), started on demand

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` over all ranks, in place; returns buf."""
        return buf

    def allreduce_max(self, buf: np.ndarray) -> np.ndarray:
        """Elementwise maximum of ``buf`` over all ranks, in place; returns buf."""
        return buf

    def iallreduce_sum(self, buf: np.ndarray) -> _Done:
        """Start summing ``buf`` in place over all ranks; ``.wait()`` on the result completes it."""
        return _DONE

    def broadcast(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """Overwrite ``buf`` on every rank with root's, in place; returns buf."""
        return buf

    def allgather(self, values: np.ndarray) -> np.ndarray:
        """values : (k,) on each rank -> (size, k), row r holding rank r's values."""
        return values.reshape(1, -1).copy()

    def alltoall(self, send: np.ndarray, recv: np.ndarray) -> np.ndarray:
        """send, recv : (size * k,); block j of send goes to rank j, block i of recv came from rank i."""
        recv[...] = send
        return recv

    def reduce_scatter_sum(self, send: np.ndarray, recv: np.ndarray, counts: list[int]) -> np.ndarray:
        """Sum ``send`` over ranks; rank r receives block r (``counts[r]`` items, in rank order)."""
        recv[...] = send[: counts[0]]
        return recv

    def allgatherv(self, buf: np.ndarray, counts: list[int]) -> np.ndarray:
        """In place: rank r contributes block r of ``buf`` (``counts[r]`` items); all get every block."""
        return buf

    def gatherv(self, send: np.ndarray, recv: np.ndarray | None, counts: list[int], root: int = 0) -> None:
        """Block r of ``recv`` on root = rank r's ``send``."""
        recv[...] = send

    def broadcast_text(self, text: str, root: int = 0) -> str:
        return text

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        raise SystemExit(code)

    def raise_if_any_failed(self, error: BaseException | None) -> None:
        _raise_if_any_failed(self, error)

    @contextlib.contextmanager
    def fail_fast(self) -> Iterator[None]:
        yield


class MPIComm:
    """MPI.COMM_WORLD through the buffer API."""

    is_mpi = True
    #: show the traceback of an environment failure (an OSError) too, not one line (``--debug``)
    debug = False
    #: The BLAS/OpenMP threads :func:`make_comm` capped this rank at, or None (not capped).
    thread_limit: int | None = None

    def __init__(self) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()
        node.Free()
        self.library = MPI.Get_library_version().splitlines()[0].strip()
        self.peers = self._gather_peers()
        self.flight = FlightRecorder()
        self.watchdog = Watchdog(self, _SideChannel(self.comm, MPI))
        self._watched_by_thread = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        if self._watched_by_thread:
            self.watchdog.start()
            atexit.register(self.watchdog.close)  # runs before mpi4py finalises MPI (registered later)
        # A script that uses the API without fail_fast() still must not hang its peers: an exception
        # that reaches the top level aborts the job (what `python -m mpi4py` does, for a console script).
        sys.excepthook = self._abort_on_uncaught
        # A warning every rank meets is shown once per rank, "[rank r] "-prefixed on r > 0: not N times alike.
        rank_warnings.install(self.rank)

    def _gather_peers(self) -> list[tuple[str, int]]:
        """(host, pid) of every rank (``peers``: the watchdog's report, the hosts of info and doctor),
        gathered once at start-up, while all are alive; fixed-size bytes, no pickling."""
        width = HOSTNAME_BYTES + 8
        mine = np.zeros(width, dtype=np.uint8)
        host = socket.gethostname().encode()[:HOSTNAME_BYTES]
        mine[: len(host)] = np.frombuffer(host, dtype=np.uint8)
        mine[HOSTNAME_BYTES:] = np.array([os.getpid()], dtype=np.int64).view(np.uint8)
        table = np.empty((self.size, width), dtype=np.uint8)
        self.comm.Allgather(mine, table)
        return [(bytes(row[:HOSTNAME_BYTES]).rstrip(b"\0").decode(errors="replace"),
                 int(row[HOSTNAME_BYTES:].view(np.int64)[0])) for row in table]

    def _run(self, op: str, buf: np.ndarray, start) -> None:
        """Start a non-blocking collective (``start()`` returns its request) and complete it, bounded."""
        call = self.flight.begin(op, buf.nbytes)
        self._complete(start(), call)

    def _complete(self, request, call: Call) -> None:
        """Wait for ``request``: testing it at full speed (yielding the core between tests) for SPIN_S,
        then every NAP_S, so a long wait does not burn a core; the watchdog ends the job if it lasts
        longer than ``timeout_s``."""
        if not request.Test():
            flight = self.flight
            flight.waiting_since = started = time.monotonic()
            flight.waiting = call
            while not request.Test():
                if time.monotonic() - started > SPIN_S:
                    time.sleep(NAP_S)
                    if not self._watched_by_thread:
                        self.watchdog.check()
                else:  # on a node with more ranks than cores, the rank waited for gets the core
                    os.sched_yield()
            flight.waiting = None
        self.flight.end(call)

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        self._run("allreduce_sum", buf, lambda: self.comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM))
        return buf

    def allreduce_max(self, buf: np.ndarray) -> np.ndarray:
        self._run("allreduce_max", buf, lambda: self.comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MAX))
        return buf

    def iallreduce_sum(self, buf: np.ndarray):
        call = self.flight.begin("iallreduce_sum", buf.nbytes)
        return _Pending(self, self.comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM), call)

    def broadcast(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        self._run("broadcast", buf, lambda: self.comm.Ibcast(buf, root=root))
        return buf

    def allgather(self, values: np.ndarray) -> np.ndarray:
        out = np.empty((self.size, values.size), dtype=values.dtype)
        values = np.ascontiguousarray(values)
        self._run("allgather", values, lambda: self.comm.Iallgather(values, out))
        return out

    def alltoall(self, send: np.ndarray, recv: np.ndarray) -> np.ndarray:
        self._run("alltoall", send, lambda: self.comm.Ialltoall(send, recv))
        return recv

    def reduce_scatter_sum(self, send: np.ndarray, recv: np.ndarray, counts: list[int]) -> np.ndarray:
        self._run("reduce_scatter_sum", send,
                  lambda: self.comm.Ireduce_scatter(send, recv, recvcounts=counts, op=self._MPI.SUM))
        return recv

    def allgatherv(self, buf: np.ndarray, counts: list[int]) -> np.ndarray:
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        self._run("allgatherv", buf, lambda: self.comm.Iallgatherv(self._MPI.IN_PLACE, [buf, (counts, displs)]))
        return buf

    def gatherv(self, send: np.ndarray, recv: np.ndarray | None, counts: list[int], root: int = 0) -> None:
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        target = [recv, (counts, displs)] if self.rank == root else None
        self._run("gatherv", send, lambda: self.comm.Igatherv(send, target, root=root))

    def broadcast_text(self, text: str, root: int = 0) -> str:
        data = np.frombuffer(text.encode(), dtype=np.uint8) if self.rank == root else None
        n = np.array([0 if data is None else data.size], dtype=np.int64)
        self.broadcast(n, root=root)
        buf = data.copy() if data is not None else np.empty(int(n[0]), dtype=np.uint8)
        return self.broadcast(buf, root=root).tobytes().decode()

    def barrier(self) -> None:
        self._run("barrier", np.empty(0), self.comm.Ibarrier)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def raise_if_any_failed(self, error: BaseException | None) -> None:
        _raise_if_any_failed(self, error)

    @contextlib.contextmanager
    def fail_fast(self) -> Iterator[None]:
        """End the whole job (MPI_Abort) if this rank raises, so no other rank waits forever.

        The failing rank's traceback goes to stderr first, prefixed with its rank. ``ExitQuietly``
        and ``SystemExit`` pass through: they are raised in step by every rank.
        """
        try:
            yield
        except (ExitQuietly, CollectiveError, SystemExit):
            raise  # raised in step by every rank: nobody is left waiting
        except BaseException as exc:  # noqa: BLE001 - any escape would hang the other ranks
            self._abort_on_uncaught(type(exc), exc, exc.__traceback__)

    def _abort_on_uncaught(self, exc_type, exc, tb) -> None:
        """Print this rank's traceback (one line for a UserError), then MPI_Abort the whole job."""
        if isinstance(exc, UserError):
            lines, code = [f"error: {exc}\n"], exc.exit_code
        elif isinstance(exc, OSError) and not self.debug:  # the environment failed: one line
            lines, code = [f"error: {environment_message(exc)}\n"], EXIT_ENVIRONMENT
        else:
            lines, code = traceback.format_exception(exc_type, exc, tb), 1
        text = "".join(f"[rank {self.rank}] {line}" for line in "".join(lines).splitlines(True))
        sys.stderr.write(text)
        sys.stderr.write(f"[rank {self.rank}] aborting all {self.size} ranks\n")
        self.abort(code)


class _SideChannel:
    """Point-to-point messages beside the job's collectives, on a duplicate of COMM_WORLD: the
    watchdog's notices, which must get through while the job's own collectives are stuck."""

    def __init__(self, comm, MPI) -> None:
        self._comm, self._MPI = comm.Dup(), MPI
        self._sends: list = []  # kept until the job ends: a buffer must outlive its Isend

    def arrived(self, tag: int) -> bool:
        """Whether a message with ``tag`` from any rank waits to be received."""
        return self._comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=tag)

    def send(self, dest: int, tag: int, values: np.ndarray) -> None:
        self._sends.append((values, self._comm.Isend(values, dest=dest, tag=tag)))

    def send_all(self, tag: int, values: np.ndarray) -> None:
        for dest in range(self._comm.Get_size()):
            if dest != self._comm.Get_rank():
                self.send(dest, tag, values)

    def collect(self, tag: int, length: int, sources: set[int], deadline: float) -> dict[int, np.ndarray]:
        """{source: its int64 message of ``length``} of those of ``sources`` that sent ``tag`` by ``deadline``."""
        got: dict[int, np.ndarray] = {}
        status = self._MPI.Status()
        while sources - got.keys() and time.monotonic() < deadline:
            if self._comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=tag, status=status):
                buf = np.empty(length, dtype=np.int64)
                self._comm.Recv(buf, source=status.Get_source(), tag=tag)
                got[status.Get_source()] = buf
            else:
                time.sleep(0.01)
        return got


def _raise_if_any_failed(comm, error: BaseException | None) -> None:
    """Collective: every rank calls it with its own error (or None) after a set-up phase.

    If no rank failed, return. Otherwise every rank exits with status 2: rank 0 prints its
    message; another failing rank prints its own only if it differs from rank 0's, so one bad
    config gives one line, and a bad file on one node names that rank.
    """
    failed = comm.allreduce_sum(np.array([0 if error is None else 1], dtype=np.int64))
    if failed[0] == 0:
        return
    root_message = comm.broadcast_text(str(error) if (comm.rank == 0 and error is not None) else "")
    if error is not None and (comm.rank == 0 or str(error) != root_message):
        prefix = f"error (rank {comm.rank}): " if comm.size > 1 and comm.rank != 0 else "error: "
        print(prefix + str(error), file=sys.stderr, flush=True)
    raise ExitQuietly(2)


def make_comm(kind: str | None = None, limit_threads: bool = True):
    """Return a communicator. kind: "auto" (default), "mpi" or "single"; "auto" or None defers to
    ``DPTRAIN_COMM`` if it is set.

    Under MPI, ``limit_threads`` caps this rank's BLAS/OpenMP threads at cores / ranks per node
    (unless OMP_NUM_THREADS or similar is set), so ranks sharing a node do not oversubscribe it;
    the cap is kept as ``comm.thread_limit`` (None if none was applied).
    """
    from_environment = kind in (None, "auto") and bool(os.environ.get("DPTRAIN_COMM"))
    kind = os.environ["DPTRAIN_COMM"] if from_environment else kind or "auto"
    if kind not in ("auto", "mpi", "single"):
        where = f"DPTRAIN_COMM={kind}: unknown communicator" if from_environment else f"unknown communicator {kind!r}"
        raise UserError(f"{where}: expected auto, mpi or single")
    if kind == "single" or (kind == "auto" and not launched_by_mpi()):
        return SingleProcessComm()
    try:
        comm = MPIComm()
    except ImportError as exc:
        raise UserError(f"MPI requested but mpi4py cannot be loaded ({exc}); "
                        f"install dptrain[mpi] or build mpi4py against your site's MPI") from exc
    if limit_threads:
        from dptrain.runtime.threads import limit_threads_in_process

        comm.thread_limit = limit_threads_in_process(comm.local_size)
    return comm


def mpi4py_library() -> str | None:
    """The MPI library mpi4py is built against (its first line), read without starting MPI (in a
    child process: this one may start MPI later); None if mpi4py cannot be loaded."""
    probe = ("import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False; from mpi4py import MPI; "
             "print(MPI.Get_library_version().splitlines()[0])")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def refuse_under_mpi(message: str, kind: str | None = None) -> None:
    """For a command that must run outside mpirun/mpiexec/srun: under one, every rank exits with
    status 2 (ExitQuietly) after rank 0 printed ``error: MESSAGE`` once; otherwise return."""
    if launched_by_mpi():
        make_comm(kind, limit_threads=False).raise_if_any_failed(UserError(message))
