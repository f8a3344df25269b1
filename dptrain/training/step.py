"""THE training step: one optimizer update on one global batch, on every rank::

    local = shard(batch, rank, world)                          # this rank's part of the global batch
    x, y = batches.get(step, local)                            # its rows, augmented as in the step's epoch
    z = model.forward(x)                                       # (n_local, n_outputs)
    loss_sum, dz = loss.value_and_grad(z, y)                   # SUM over the local samples
    control = [loss_sum, stop_requested]; Iallreduce(control)  # small, overlapped with backward
    model.backward(dz)                                         # grad_buffer = d(local sum)/dparams
    comm.allreduce_sum(grad_buffer)                            # one Allreduce over one flat buffer
    grad_scale = 1 / len(batch)                                # makes the sum the mean over the global batch
    if loss and gradient are finite:                           # decided from sums: the same on every rank
        optimizer.lr = lr_schedule(step)
        grad_scale *= clip factor (global norm)
        optimizer.step(grad_scale)                             # the same update on every rank

Variants, each giving the same update: the local batch prepared ahead by a background thread
(``data.prefetch``, :mod:`dptrain.training.batches`); ``accumulate`` micro-batches per rank summed before one
exchange; the exchange in buckets that start during backward, or in fp16 (:mod:`dptrain.parallel.exchange`);
ZeRO-1, where each rank updates one block of the parameters (:class:`dptrain.optim.ShardedUpdate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from dptrain.nn import BatchInfo
from dptrain.optim.zero import ShardedUpdate
from dptrain.parallel.exchange import GradientExchange
from dptrain.parallel.sampler import shard

from .batches import BatchLoader
from .guards import GradientGuard

PHASES = ("data", "forward", "backward", "exchange", "optimizer")  # the order of TrainingStep.phase_seconds


def without(spans, holes) -> list[tuple[int, int]]:
    """The (lo, hi) ``spans`` with the (lo, hi) ``holes`` cut out."""
    result = []
    for lo, hi in spans:
        for h_lo, h_hi in sorted(holes):
            if h_hi <= lo or h_lo >= hi:
                continue
            if h_lo > lo:
                result.append((lo, h_lo))
            lo = max(lo, h_hi)
        if lo < hi:
            result.append((lo, hi))
    return result


class StepTimes(NamedTuple):
    """perf_counter marks of one step: data [t0, td] (until the local batch is in hand: read, or
    waited for when prefetched), forward + loss [td, t1], backward [t1, t2], gradient exchange
    [t2, t3] of which [tw, t3] blocked in wait(), optimizer (checks and update) [t3, t4]."""

    t0: float
    td: float
    t1: float
    t2: float
    tw: float
    t3: float
    t4: float


class StepResult(NamedTuple):
    """What a step leaves, the same on every rank."""

    loss_sum: float  # the loss summed over the whole global batch
    stop_requests: int  # how many ranks have received a stop signal
    problem: str | None  # a non-finite loss or gradient (the update was not applied), else None


class TrainingStep:
    """One optimizer step on a global batch of the training data, callable as ``step(k, batch_indices)``.

    Parameters
    ----------
    model, loss, optimizer, comm : as for :class:`~dptrain.training.trainer.Trainer`.
    batches : a :class:`~dptrain.training.batches.BatchLoader` of the training data: gives each step's
        local (x, y), read on the step's path or prepared ahead.
    accumulate : micro-batches per optimizer step: each rank's share of a global batch is taken once,
        then processed in ``accumulate`` parts (those of ``np.array_split``) whose gradients are summed,
        then exchanged once (less memory per pass).
    bucket_mb, compression : how gradients are exchanged (see :mod:`dptrain.parallel.exchange`).
    shard_optimizer : ZeRO stage 1, each rank holds 1/world of the optimizer state
        (:class:`dptrain.optim.ShardedUpdate`); checkpoints still hold the whole state.
    lr_schedule : ``lr_schedule(step)`` gives the learning rate of optimizer step ``step`` (0-based),
        set on the optimizer before each update (see :mod:`dptrain.optim.schedules`); None: keep its lr.
    clip_norm : scale the averaged gradient down to this global L2 norm when it is larger
        (computed after the exchange, so the same on every rank); 0: no clipping.
    stop_requested : tells whether this rank has received a stop signal (summed over the ranks each step).
    """

    def __init__(self, model, loss, optimizer, batches: BatchLoader, comm, *, accumulate: int = 1, bucket_mb: float = 4.0,
                 compression: str = "none", shard_optimizer: bool = False,
                 lr_schedule: Callable[[int], float] | None = None, clip_norm: float = 0.0,
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        if accumulate > 1 and any(layer.syncs_batch_statistics for layer in model.layers):
            raise ValueError("accumulate > 1 cannot be used with BatchNorm: its statistics need the whole global batch")
        self.model, self.loss, self.optimizer, self.batches, self.comm = model, loss, optimizer, batches, comm
        self.accumulate, self.lr_schedule, self.stop_requested = accumulate, lr_schedule, stop_requested
        model.bind_allreduce(comm.allreduce_sum)  # synchronized BatchNorm sums over the global batch
        if model.frozen:  # frozen parameters: no weight decay either (their gradient is 0, their state too)
            optimizer.decay_only(without(optimizer.decay_ranges or [(0, model.n_params)], model.frozen_spans))
        self.exchange = GradientExchange(comm, model, int(bucket_mb * 2**20), compression)
        self.sharded = ShardedUpdate(comm, model, optimizer) if shard_optimizer else None
        self.guard = GradientGuard(comm, model, self.sharded, clip_norm)
        self._grad_sum = np.zeros_like(model.grad_buffer) if accumulate > 1 else None
        self._control = np.zeros(2, dtype=np.float64)  # [loss sum, stop requests], summed per step
        #: seconds spent in each of PHASES over every step so far (never reset: subtract a copy)
        self.phase_seconds = np.zeros(len(PHASES))
        self.last_times: StepTimes | None = None
        self.set_lr(0)

    def __call__(self, step: int, batch: np.ndarray) -> StepResult:
        """Optimizer step ``step`` (0-based) on the global batch ``batch`` (sample indices)."""
        clock = time.perf_counter
        self.comm.flight.step = step + 1  # the watchdog's report and the flight recorder name it
        local = shard(batch, self.comm.rank, self.comm.size)
        overlap = self.sharded is None and self.exchange.overlap  # buckets start during backward
        t0 = clock()
        x, y = self.batches.get(step, local)
        td = clock()
        if self.accumulate == 1:
            loss_sum = self._forward(step, local, x, y)
            pending = self._post_control(loss_sum)
            t1 = clock()
            self.model.backward(self._dz, input_grad=False, after_layer=self.exchange.layer_done if overlap else None)
            t2 = clock()
        else:
            loss_sum, forward_s = self._accumulate(step, local, x, y)
            pending = self._post_control(loss_sum)
            t2 = clock()
            t1 = td + forward_s
        # grad_buffer holds the gradient SUMMED over the global batch; grad_scale makes it the mean
        grad_scale = 1.0 / len(batch)
        if self.sharded is None:
            self.exchange.finish(len(batch))
        else:
            self.sharded.reduce(len(batch))
        tw = t2 if overlap else clock()  # blocked in wait() from here
        pending.wait()
        t3 = clock()
        global_loss, stop = float(self._control[0]), int(self._control[1])
        problem = self.guard.problem(global_loss)
        if problem is None:
            self.set_lr(step)
            grad_scale *= self.guard.clip_factor(grad_scale)
            (self.optimizer if self.sharded is None else self.sharded).step(grad_scale)
        t4 = clock()
        phase = self.phase_seconds  # in place: no temporary array
        phase[0] += td - t0
        phase[1] += t1 - td
        phase[2] += t2 - t1
        phase[3] += t3 - t2
        phase[4] += t4 - t3
        self.last_times = StepTimes(t0, td, t1, t2, tw, t3, t4)
        return StepResult(global_loss, stop, problem)

    def _forward(self, step: int, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        """Forward and loss on the samples ``indices``, whose rows are ``x`` (n, D) and ``y``; leaves
        d(loss sum)/d(outputs) in ``_dz``."""
        self.model.begin_batch(BatchInfo(step, indices))
        z = self.model.forward(x, train=True)
        loss_sum, self._dz = self.loss.value_and_grad(z, y)
        return loss_sum

    def _accumulate(self, step: int, local: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Forward and backward on ``accumulate`` parts of ``local`` (rows ``x``, ``y``), their
        gradients summed into grad_buffer. Returns (the loss sum, the seconds spent in forward)."""
        clock = time.perf_counter
        loss_sum, forward_s, last = 0.0, 0.0, self.accumulate - 1
        size, larger = divmod(len(local), self.accumulate)  # the parts of np.array_split, as views
        stop = 0
        for k in range(self.accumulate):
            start, stop = stop, stop + size + (k < larger)
            tf = clock()
            loss_sum += self._forward(step, local[start:stop], x[start:stop], y[start:stop])
            forward_s += clock() - tf
            self.model.backward(self._dz, input_grad=False)  # overwrites grad_buffer with this part's
            if k == 0:
                self._grad_sum[...] = self.model.grad_buffer
            elif k < last:
                self._grad_sum += self.model.grad_buffer
            else:  # the same sum as adding it to _grad_sum (IEEE addition commutes), one pass less
                self.model.grad_buffer += self._grad_sum
        return loss_sum, forward_s

    def _post_control(self, local_loss_sum: float):
        """Start summing [this rank's loss sum, its stop request] over the ranks (small, non-blocking)."""
        control = self._control
        control[0], control[1] = local_loss_sum, float(self.stop_requested())  # [1] sums to the ranks asking
        return self.comm.iallreduce_sum(control)

    @property
    def stepping_optimizer(self):
        """The optimizer that applies the update: the one given, or its block in a ZeRO-1 run."""
        return self.optimizer if self.sharded is None else self.sharded.optimizer

    @property
    def lr(self) -> float:
        """The learning rate of the last update (or of the next one, before any)."""
        return float(self.stepping_optimizer.lr)

    def set_lr(self, step: int) -> None:
        """Set the learning rate of optimizer step ``step`` from the schedule (no schedule: keep it)."""
        if self.lr_schedule is not None:
            lr = float(self.lr_schedule(step))
            self.optimizer.lr = lr
            if self.sharded is not None:
                self.sharded.optimizer.lr = lr
