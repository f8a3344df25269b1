"""Each training step's local batch (x, y): read on the step's path, or prepared ahead by one thread.

    loader = BatchLoader(train_data, steps_per_epoch, prefetch=K, plan=trainer.local_indices)
    with loader.running(first_step, stop_step):    # K > 0: a thread prepares the steps in order, K ahead
        x, y = loader.get(step, local)             # = train_data.take(local, epoch=step // steps_per_epoch)

A step's batch is ``data.take(local, epoch)``: the rows of the step's global batch that this rank
holds, read, converted and augmented as in the step's epoch (augmentation is a pure function of seed,
epoch and row). Which rows a future step takes is known exactly in advance, because the order of the
samples is a pure function of (seed, epoch) (:mod:`dptrain.parallel.sampler`): ``plan(step)`` gives
them. So with ``prefetch = K > 0`` one background thread prepares the batches of the next K steps
while the current step computes, and the step's ``data`` phase is only the wait for what is not ready.
It never changes a result: the same rows, the same epoch, the same function, so the same arrays.

Why a thread and not a process: the work is NumPy gathering rows (from a memory-mapped file too),
converting dtypes and element-wise augmentation, which release the GIL, so it runs beside the main
thread's BLAS calls, and the arrays arrive without pickling or a copy through shared memory. Its limits:

* Its Python code (the glue around NumPy calls, NumPy calls on small arrays, a per-sample loop in an
  ``augment``) holds the GIL, which the main thread's Python between BLAS calls then waits for: on a
  step of a fraction of a millisecond the hand-overs double the step's time.
* It needs a core. :mod:`dptrain.runtime.threads` gives each rank cores / ranks BLAS threads and does
  not count this one, so when every core is busy with BLAS the thread takes its time from them: it pays
  off when reading waits (a file, page faults of a memory-mapped array, a slow augmentation), not for
  small data already in memory, where it costs time (docs/performance.md, "Prefetching the batches").
* K batches more in memory.

The thread makes no MPI call (only the main thread communicates) and no BLAS call (gathering,
conversions and element-wise operations only; an ``augment`` should not multiply matrices either), so
it needs no MPI thread level beyond what a second thread needs, and the BLAS pool keeps the threads
:mod:`dptrain.runtime.threads` gave it. An error while preparing a batch is raised again, the same
exception, in the main thread at the step that batch is for.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from dptrain.data import Dataset

Batch = tuple[np.ndarray, np.ndarray]
_POLL_S = 0.5  # while waiting for a batch, check this often that the thread is still there


class BatchLoader:
    """The local (x, y) of each training step of ``data``.

    Parameters
    ----------
    data : the training Dataset; a step's batch is ``data.take(local, epoch=step // steps_per_epoch)``.
    steps_per_epoch : optimizer steps per epoch (the epoch of a step, for augmentation).
    prefetch : batches prepared ahead by a background thread while :meth:`running`; 0: none, every
        batch is read on the step's path.
    plan : ``plan(step)`` -> the local indices this rank takes at optimizer step ``step`` (a pure
        function, called from the thread); needed when ``prefetch`` > 0.
    """

    def __init__(self, data: Dataset, steps_per_epoch: int, prefetch: int = 0,
                 plan: Callable[[int], np.ndarray] | None = None) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if prefetch and plan is None:
            raise ValueError("prefetch > 0 needs a plan: the local indices of each step")
        self.data, self.steps_per_epoch, self.prefetch, self.plan = data, steps_per_epoch, prefetch, plan
        #: requests that were not what the thread had prepared, read on the step's path instead (0 in a
        #: run: the trainer asks for the steps of the plan, in order)
        self.mismatches = 0
        self._ahead: _Ahead | None = None

    def read(self, step: int, local: np.ndarray) -> Batch:
        """The batch of ``step`` read now: rows ``local`` augmented as in the step's epoch."""
        return self.data.take(local, epoch=step // self.steps_per_epoch)

    def get(self, step: int, local: np.ndarray) -> Batch:
        """The batch of optimizer step ``step``, whose local indices are ``local``: the one the thread
        prepared (waiting for it if needed; an error it met is raised here), else read now."""
        ahead = self._ahead
        if ahead is None:
            return self.read(step, local)
        item = ahead.next()
        if item is not None and item.step == step:
            if item.error is not None:  # met preparing this step's batch (or asking the plan for its rows)
                raise item.error
            if np.array_equal(item.local, local):
                return item.batch
        self.mismatches += 1  # not the plan's step: stop prefetching rather than return other rows
        self.close()
        return self.read(step, local)

    def start(self, first: int, stop: int) -> None:
        """Prepare steps ``first`` .. ``stop - 1`` in order in a thread (prefetch > 0), ending any earlier one."""
        self.close()
        if self.prefetch and first < stop:
            self._ahead = _Ahead(self.plan, self.read, first, stop, self.prefetch)

    def close(self) -> None:
        """End the thread (its pending batches are dropped) and wait for it; nothing if none runs."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()

    @contextlib.contextmanager
    def running(self, first: int, stop: int) -> Iterator[BatchLoader]:
        """:meth:`start`, then :meth:`close` however the block ends (a stop, an error)."""
        self.start(first, stop)
        try:
            yield self
        finally:
            self.close()

    @property
    def prefetching(self) -> bool:
        """Whether a thread is preparing batches now."""
        return self._ahead is not None and self._ahead.alive


class _Prepared(NamedTuple):
    step: int
    local: np.ndarray | None
    batch: Batch | None
    error: BaseException | None


class _Ahead:
    """One thread preparing the batches of steps ``first`` .. ``stop - 1`` in order, at most
    ``depth`` ahead of the steps taken; it ends after the last, after an error, or when closed."""

    def __init__(self, plan: Callable[[int], np.ndarray], read: Callable[[int, np.ndarray], Batch],
                 first: int, stop: int, depth: int) -> None:
        self._queue: queue.Queue[_Prepared] = queue.Queue(maxsize=depth)
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(plan, read, first, stop),
                                        name="dptrain-batches", daemon=True)
        self._thread.start()

    def _run(self, plan, read, first: int, stop: int) -> None:
        for step in range(first, stop):
            if self._cancel.is_set():
                return
            local = None
            try:
                local = plan(step)
                item = _Prepared(step, local, read(step, local), None)
            except BaseException as exc:  # raised again in the main thread, at this step
                item = _Prepared(step, local, None, exc)
            self._queue.put(item)  # waits while ``depth`` batches are ready
            if item.error is not None:
                return

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def next(self) -> _Prepared | None:
        """The next prepared batch, waiting for it; None if the thread ended without one."""
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return None

    def close(self) -> None:
        self._cancel.set()
        self._drain()  # makes room for a put the thread may be waiting in; it then sees the cancel
        self._thread.join()
        self._drain()

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
