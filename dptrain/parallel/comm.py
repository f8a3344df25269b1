"""Communicators: the only module that imports mpi4py.

Two implementations share one small interface:

* :class:`SingleProcessComm` (rank 0 of 1) never imports mpi4py, so dptrain runs on a laptop
  or in tests with no MPI installed;
* :class:`MPIComm` wraps ``MPI.COMM_WORLD`` with the buffer (uppercase) API: no pickling.

:func:`make_comm` chooses: MPI when the process was started by mpirun/mpiexec/srun, single-process
otherwise, unless forced with ``kind="mpi"`` or ``kind="single"`` (or ``DPTRAIN_COMM``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

import numpy as np

from dptrain.errors import EXIT_ENVIRONMENT, CollectiveError, ExitQuietly, UserError, environment_message
from dptrain.runtime import rank_warnings

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
    """An MPI request, completed by ``wait()``."""

    def __init__(self, request) -> None:
        self._request = request

    def wait(self) -> None:
        self._request.Wait()

    def test(self) -> bool:
        """Drive MPI's progress engine (nothing else does without an async progress thread)."""
        return self._request.Test()


class SingleProcessComm:
    """Rank 0 of a world of 1. Every collective is the identity."""

    rank = 0
    size = 1
    local_size = 1
    is_mpi = False
    library = "none (single process)"
    thread_limit = None  # a single process keeps the BLAS's default threads

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
        # A script that uses the API without fail_fast() still must not hang its peers: an exception
        # that reaches the top level aborts the job (what `python -m mpi4py` does, for a console script).
        sys.excepthook = self._abort_on_uncaught
        # A warning every rank meets is shown once per rank, "[rank r] "-prefixed on r > 0: not N times alike.
        rank_warnings.install(self.rank)

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return buf

    def allreduce_max(self, buf: np.ndarray) -> np.ndarray:
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MAX)
        return buf

    def iallreduce_sum(self, buf: np.ndarray):
        request = self.comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return _Pending(request)

    def broadcast(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        self.comm.Bcast(buf, root=root)
        return buf

    def allgather(self, values: np.ndarray) -> np.ndarray:
        out = np.empty((self.size, values.size), dtype=values.dtype)
        self.comm.Allgather(np.ascontiguousarray(values), out)
        return out

    def alltoall(self, send: np.ndarray, recv: np.ndarray) -> np.ndarray:
        self.comm.Alltoall(send, recv)
        return recv

    def reduce_scatter_sum(self, send: np.ndarray, recv: np.ndarray, counts: list[int]) -> np.ndarray:
        self.comm.Reduce_scatter(send, recv, recvcounts=counts, op=self._MPI.SUM)
        return recv

    def allgatherv(self, buf: np.ndarray, counts: list[int]) -> np.ndarray:
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        self.comm.Allgatherv(self._MPI.IN_PLACE, [buf, (counts, displs)])
        return buf

    def gatherv(self, send: np.ndarray, recv: np.ndarray | None, counts: list[int], root: int = 0) -> None:
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        self.comm.Gatherv(send, [recv, (counts, displs)] if self.rank == root else None, root=root)

    def broadcast_text(self, text: str, root: int = 0) -> str:
        data = np.frombuffer(text.encode(), dtype=np.uint8) if self.rank == root else None
        n = np.array([0 if data is None else data.size], dtype=np.int64)
        self.comm.Bcast(n, root=root)
        buf = data.copy() if data is not None else np.empty(int(n[0]), dtype=np.uint8)
        self.comm.Bcast(buf, root=root)
        return buf.tobytes().decode()

    def barrier(self) -> None:
        self.comm.Barrier()

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


def refuse_under_mpi(message: str, kind: str | None = None) -> None:
    """For a command that must run outside mpirun/mpiexec/srun: under one, every rank exits with
    status 2 (ExitQuietly) after rank 0 printed ``error: MESSAGE`` once; otherwise return."""
    if launched_by_mpi():
        make_comm(kind, limit_threads=False).raise_if_any_failed(UserError(message))
