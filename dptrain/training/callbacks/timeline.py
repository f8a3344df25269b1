"""A Chrome trace of the run, one track per rank, in the manner of Horovod's timeline.

    dptrain train --timeline trace.json ...      # or Trainer(..., callbacks=[Timeline("trace.json")])

Open the file in Perfetto (ui.perfetto.dev) or chrome://tracing. Each rank is a track (pid 0,
tid = rank, named "rank N") of complete events ("ph": "X", ts and dur in microseconds)::

    step N                        one optimizer step, holding:
      data                          until the local batch is in hand: read and augmented, or (with
                                    data.prefetch) the wait for the thread that prepares it
      forward                       forward pass and loss
      backward                      backward pass (gradient buckets start their exchange meanwhile)
      exchange                      from the end of backward until the summed gradient and loss are in
        exchange wait                 the part blocked in wait() on requests started earlier
      optimizer                     clipping and the update
    evaluation                    the evaluation after an epoch
    checkpoint                    writing a checkpoint (rank 0 writes; the others take part in gathers)

With ``train.accumulate`` > 1, forward and backward alternate per micro-batch; the trace shows their
summed durations one after the other. ``exchange wait`` covers all of ``exchange`` when gradient
buckets overlap backward (``comm.bucket_mb`` > 0 on several ranks): what is left after backward is
waiting; with one blocking Allreduce (or fp16) it is only the wait for the loss sum.

Clock: ``time.perf_counter`` on each rank, relative to a common start taken just after a barrier at
the start of fit(), so the tracks line up to within the barrier's skew. Each rank keeps only its last
``max_events`` spans (default 20000, about 2,850 steps: seven spans a step) in memory; at the end of
fit() every rank sends its spans to rank 0 (a Gather of the counts, then a Gatherv of one float64
array of rows (kind, step, start, duration); nothing pickled), which writes the one file.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dptrain._version import __version__
from dptrain.storage.atomic import write_atomically
from dptrain.training.callback import Callback

if TYPE_CHECKING:
    from dptrain.training.trainer import Trainer

KINDS = ("step", "data", "forward", "backward", "exchange", "exchange wait", "optimizer", "evaluation", "checkpoint")
_KIND = {name: i for i, name in enumerate(KINDS)}
MAX_EVENTS = 20000  # spans kept per rank (the last ones)


class Timeline(Callback):
    """Record each rank's spans during fit() and write them as one Chrome trace on rank 0.

    Its hooks record each step's phases (from ``trainer.last_step_times``) and each evaluation and
    checkpoint (:meth:`Callback.on_span`). Collective at the start
    (a barrier) and at the end (the gather) of fit(); the trace is written at the end of a run that
    finishes, stops early or is stopped by a signal (not after an error).
    """

    def __init__(self, path: str | Path, max_events: int = MAX_EVENTS) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.path, self.max_events = Path(path), max_events
        self._spans: collections.deque = collections.deque(maxlen=max_events)
        self._recorded = 0
        self._t0 = 0.0
        self.dropped: list[int] = []  # per rank, spans recorded but no longer kept (rank 0, after fit)

    # -- recording (hot path: appends to a bounded deque) --------------------------------------

    def record_step(self, step: int, t0: float, td: float, t1: float, t2: float, tw: float, t3: float,
                    t4: float) -> None:
        """One step's spans from its perf_counter marks (:class:`~dptrain.training.step.StepTimes`):
        data [t0, td], forward [td, t1], backward [t1, t2], exchange [t2, t3] with its wait [tw, t3],
        optimizer [t3, t4], all inside step [t0, t4]."""
        append = self._spans.append
        append((0, step, t0, t4 - t0))
        append((1, step, t0, td - t0))
        append((2, step, td, t1 - td))
        append((3, step, t1, t2 - t1))
        append((4, step, t2, t3 - t2))
        append((5, step, tw, t3 - tw))
        append((6, step, t3, t4 - t3))
        self._recorded += 7

    def record(self, kind: str, step: int, start: float, end: float) -> None:
        """A span of ``kind`` ("evaluation", "checkpoint", or any of KINDS) from perf_counter marks."""
        self._spans.append((_KIND[kind], step, start, end - start))
        self._recorded += 1

    # -- the hooks ------------------------------------------------------------------------------

    def on_train_begin(self, trainer: Trainer) -> None:
        trainer.comm.barrier()  # a common start, so the ranks' tracks line up
        self._t0 = time.perf_counter()
        self._spans.clear()
        self._recorded = 0

    def on_step_end(self, trainer: Trainer, step: int, loss_sum: float) -> None:
        self.record_step(step, *trainer.last_step_times)

    def on_span(self, trainer: Trainer, kind: str, step: int, start: float, end: float) -> None:
        self.record(kind, step, start, end)

    def on_train_end(self, trainer: Trainer) -> None:
        comm = trainer.comm
        mine = np.array(self._spans, dtype=np.float64).reshape(-1, 4)
        mine[:, 2] -= self._t0
        counts_table = comm.allgather(np.array([mine.size, self._recorded], dtype=np.int64))
        counts = [int(c) for c in counts_table[:, 0]]
        received = np.empty(sum(counts), dtype=np.float64) if comm.rank == 0 else None
        comm.gatherv(np.ascontiguousarray(mine.reshape(-1)), received, counts)
        if comm.rank != 0:
            return
        self.dropped = [int(r) - c // 4 for r, c in zip(counts_table[:, 1], counts)]
        per_rank = np.split(received.reshape(-1, 4), np.cumsum([c // 4 for c in counts])[:-1])
        trace = chrome_trace(per_rank, {"dptrain_version": __version__, "world_size": comm.size,
                                        "max_events_per_rank": self.max_events, "dropped_events": self.dropped})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(trace, separators=(",", ":")) + "\n"
        write_atomically(self.path, lambda fh: fh.write(text), mode="w")


def chrome_trace(per_rank: list[np.ndarray], other: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Chrome trace of each rank's spans: rows (kind, step, start s, duration s) -> trace events.

    Times are rounded to whole nanoseconds before converting to microseconds, so a span nested
    in another stays inside it in the file.
    """
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "dptrain"}}]
    for rank in range(len(per_rank)):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
    for rank, rows in enumerate(per_rank):
        start = np.rint(rows[:, 2] * 1e9).astype(np.int64)
        end = np.rint((rows[:, 2] + rows[:, 3]) * 1e9).astype(np.int64)
        order = np.lexsort((-(end - start), start))  # by start, the enclosing span first
        for i in order:
            kind, step = KINDS[int(rows[i, 0])], int(rows[i, 1])
            events.append({"name": f"step {step}" if kind == "step" else kind, "cat": "train", "ph": "X",
                           "ts": int(start[i]) / 1e3, "dur": int(end[i] - start[i]) / 1e3, "pid": 0, "tid": rank,
                           "args": {"step": step}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": dict(other or {})}
