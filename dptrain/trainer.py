"""The data-parallel training loop.

One step, on every rank::

    indices = shard(global_batch(order, k, B), rank, world)   # this rank's part of global batch k
    z = model.forward(x[indices])                              # (n_local, n_outputs)
    loss_sum, dz = loss.value_and_grad(z, y[indices])          # SUM over the local samples
    control = [loss_sum, stop_requested]; Iallreduce(control)  # small, overlapped with backward
    model.backward(dz)                                         # grad_buffer = d(local sum)/dparams
    comm.allreduce_sum(grad_buffer)                            # one Allreduce over one flat buffer
    grad_buffer /= len(global batch)                           # the mean over the global batch
    optimizer.step()                                           # the same update on every rank

Step counts, evaluation, checkpoints, stopping and every check derive from (epoch, step) and from
values summed over all ranks, so every rank makes the same collective calls in the same order and
takes the same decisions. Only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import zlib
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .checkpoint import Checkpoint, save_checkpoint
from .comm import SingleProcessComm
from .data import Dataset, epoch_order, global_batch, shard, steps_per_epoch
from .early_stopping import EarlyStopping
from .errors import DesyncError, DivergenceError, MismatchError
from .evaluation import VALIDATION_KEYS, evaluate
from .exchange import GradientExchange, ShardedUpdate, first_non_finite
from .nn import BatchInfo, Loss, Sequential
from .signals import StopOnSignal

_FINGERPRINT_ROWS = 4096  # rows of each dataset hashed in the pre-flight agreement check


@dataclass(frozen=True)
class CheckpointPolicy:
    """When rank 0 writes checkpoints. A checkpoint is always written at the end of training."""

    every_steps: int = 0  # 0 = off
    every_epochs: int = 1  # 0 = off
    keep: int = 3


PHASES = ("forward", "backward", "exchange", "optimizer")  # the order of Trainer.phase_seconds


@dataclass
class RunningTotals:
    """What the steps of :meth:`Trainer.fit` add up to, updated once per step.

    A callback keeps a :meth:`copy` as a mark and subtracts it later: ``trainer.totals - mark``
    holds the steps, samples, loss and training seconds since the mark. The loss is summed exactly
    (a Fraction; NaN and infinite step losses are counted aside), so the mean loss of a window is
    the same whatever came before it, in a resumed run too.
    """

    steps: int = 0
    samples: int = 0
    loss: Fraction = Fraction(0)  # exact sum of the finite step losses (each summed over its global batch)
    non_finite: int = 0  # steps whose loss was NaN or infinite (on_nan = "skip")
    seconds: float = 0.0  # wall time of the steps; evaluation, checkpoints and sync checks excluded

    def add(self, samples: int, loss_sum: float, seconds: float) -> None:
        """One step of ``samples`` samples whose loss summed to ``loss_sum``, taking ``seconds``."""
        self.steps += 1
        self.samples += samples
        if math.isfinite(loss_sum):
            self.loss += Fraction(loss_sum)
        else:
            self.non_finite += 1
        self.seconds += seconds

    def copy(self) -> RunningTotals:
        return replace(self)

    def __sub__(self, mark: RunningTotals) -> RunningTotals:
        return RunningTotals(self.steps - mark.steps, self.samples - mark.samples, self.loss - mark.loss,
                             self.non_finite - mark.non_finite, self.seconds - mark.seconds)

    @property
    def train_loss(self) -> float:
        """Mean loss per sample (NaN without samples or after a non-finite step loss)."""
        return float(self.loss) / self.samples if self.samples and not self.non_finite else math.nan

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


class Callback:
    """Hooks called on every rank, in the same order. Override what you need."""

    def on_train_begin(self, trainer: "Trainer") -> None:
        """At the start of fit(), after the parameters are broadcast, before the first step."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """When fit() returns normally (done, stopped early or by a signal), after the last checkpoint."""

    def on_step_end(self, trainer: "Trainer", step: int, loss_sum: float) -> None:
        """After optimizer step ``step``; loss_sum is summed over the whole global batch."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict[str, Any]) -> None:
        """After epoch ``epoch`` (1-based) and its evaluation."""


class Trainer:
    """Train ``model`` on ``train_data`` with data parallelism over ``comm``.

    Parameters
    ----------
    batch_size : the GLOBAL batch size, split across ranks; the last batch of an epoch may be partial.
    epochs : number of passes over ``train_data``.
    seed, shuffle : the epoch order is a pure function of (seed, epoch).
    comm : a communicator from :mod:`dptrain.comm` (default: single process).
    out_dir : run folder; rank 0 writes ``out_dir/checkpoints``. None: no checkpoints.
    config : the resolved config as a plain dict, recorded in each checkpoint's meta.json and
        compared across ranks before step 0.
    on_nan : "error" stops at a NaN/inf loss or gradient (DivergenceError); "skip" skips that update.
    check_sync_every : compare a checksum of the parameters across ranks every N steps; 0: each epoch.
    accumulate : micro-batches per optimizer step: each rank's share of a global batch is processed in
        ``accumulate`` parts whose gradients are summed, then exchanged once (less memory per pass).
    bucket_mb, compression : how gradients are exchanged (see :mod:`dptrain.exchange`).
    shard_optimizer : ZeRO stage 1, each rank holds 1/world of the optimizer state
        (:class:`dptrain.exchange.ShardedUpdate`); checkpoints still hold the whole state.
    lr_schedule : ``lr_schedule(step)`` gives the learning rate of optimizer step ``step`` (0-based),
        set on the optimizer before each update (see :mod:`dptrain.schedules`); None: keep its lr.
    clip_norm : scale the averaged gradient down to this global L2 norm when it is larger
        (computed after the exchange, so the same on every rank); 0: no clipping.
    early_stopping : an :class:`EarlyStopping` checked after each epoch's evaluation; None: off.
    stop_on_signals : stop at the next step boundary on SIGTERM, SIGUSR1 or SIGINT (main thread only);
        pass a :class:`StopOnSignal` already entered to also catch signals that arrive before fit().
    log : called with one line per epoch, on rank 0 only.
    """

    def __init__(self, model: Sequential, loss: Loss, optimizer, train_data: Dataset,
                 val_data: Dataset | None = None, *, batch_size: int, epochs: int, seed: int = 0,
                 shuffle: bool = True, comm=None, out_dir: str | Path | None = None,
                 checkpoint: CheckpointPolicy = CheckpointPolicy(), config: dict | None = None,
                 on_nan: str = "error", check_sync_every: int = 0, accumulate: int = 1,
                 bucket_mb: float = 4.0, compression: str = "none", shard_optimizer: bool = False,
                 lr_schedule: Callable[[int], float] | None = None, clip_norm: float = 0.0,
                 early_stopping: EarlyStopping | None = None, stop_on_signals: bool | StopOnSignal = True,
                 callbacks: Sequence[Callback] = (), log: Callable[[str], None] | None = print) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if on_nan not in ("error", "skip"):
            raise ValueError(f"on_nan must be 'error' or 'skip', got {on_nan!r}")
        if check_sync_every < 0:
            raise ValueError(f"check_sync_every must be >= 0, got {check_sync_every}")
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        if not clip_norm >= 0:
            raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
        if accumulate > 1 and any(layer.syncs_batch_statistics for layer in model.layers):
            raise ValueError("accumulate > 1 cannot be used with BatchNorm: its statistics need the whole global batch")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.train_data, self.val_data = train_data, val_data if val_data is not None and len(val_data) else None
        self.batch_size, self.epochs, self.seed, self.shuffle = batch_size, epochs, seed, shuffle
        self.comm = comm if comm is not None else SingleProcessComm()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_policy = checkpoint
        self.config = config or {}
        self.on_nan, self.check_sync_every, self.accumulate = on_nan, check_sync_every, accumulate
        model.bind_allreduce(self.comm.allreduce_sum)  # synchronized BatchNorm sums over the global batch
        self.exchange = GradientExchange(self.comm, model, int(bucket_mb * 2**20), compression)
        self.sharded = ShardedUpdate(self.comm, model, optimizer) if shard_optimizer else None
        self._grad_sum = np.zeros_like(model.grad_buffer) if accumulate > 1 else None
        self.lr_schedule, self.clip_norm, self.early_stopping = lr_schedule, float(clip_norm), early_stopping
        self._norm_sq = np.zeros(1, dtype=np.float64)
        self._set_lr(0)
        self.stop_on_signals = stop_on_signals
        self.callbacks = list(callbacks)
        self._log = log if self.comm.rank == 0 else None
        self.steps_per_epoch = steps_per_epoch(len(train_data), batch_size)
        self.step = 0  # global optimizer steps done
        self.epoch = 0  # epochs completed
        self.epoch_loss_sum = 0.0  # loss summed over all ranks and the steps done in this epoch
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient (on_nan = "skip")
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None
        self.stopped = False  # fit() returned early because a stop signal reached some rank
        self.last_grad_norm = math.nan  # the global gradient norm of the last update, when clipping
        self.stop_requests = 0  # how many ranks had received a stop signal when it stopped
        self._signals = stop_on_signals if isinstance(stop_on_signals, StopOnSignal) else StopOnSignal()
        self._control = np.zeros(2, dtype=np.float64)  # [loss sum, stop requests], summed per step
        self._agreed = False  # check_agreement() has passed
        #: seconds spent in (forward + loss, backward, gradient exchange, optimizer) since the last reset
        self.phase_seconds = np.zeros(4)
        #: when set (by :class:`dptrain.timeline.Timeline`), records the spans of each step's phases,
        #: of evaluations and of checkpoints; None: nothing recorded
        self.timeline = None
        #: running totals of the steps trained by fit() in this process (see :class:`RunningTotals`)
        self.totals = RunningTotals()
        self._clock_mark = 0.0  # perf_counter reading up to which totals.seconds counts

    # -- one step ---------------------------------------------------------------------------

    def train_step(self, batch_indices: np.ndarray) -> tuple[float, int]:
        """One optimizer step on a global batch.

        Returns (loss summed over the whole global batch, number of ranks asking to stop), the
        same on every rank. A non-finite loss or gradient raises DivergenceError on every rank
        (or skips the update with on_nan = "skip").
        """
        clock = time.perf_counter
        local = shard(batch_indices, self.comm.rank, self.comm.size)
        overlap = self.sharded is None and self.exchange.overlap  # buckets start during backward
        if self.accumulate == 1:
            t0 = clock()
            x, y = self.train_data.take(local)
            self.model.begin_batch(BatchInfo(self.step, local))
            z = self.model.forward(x, train=True)
            loss_sum, dz = self.loss.value_and_grad(z, y)
            pending = self._post_control(loss_sum)
            t1 = clock()
            self.model.backward(dz, input_grad=False, after_layer=self.exchange.layer_done if overlap else None)
            t2 = clock()
        else:
            t0, loss_sum, forward_s = clock(), 0.0, 0.0
            last = self.accumulate - 1
            for k, part in enumerate(np.array_split(local, self.accumulate)):
                tf = clock()
                x, y = self.train_data.take(part)
                self.model.begin_batch(BatchInfo(self.step, part))
                z = self.model.forward(x, train=True)
                part_loss, dz = self.loss.value_and_grad(z, y)
                loss_sum += part_loss
                forward_s += clock() - tf
                self.model.backward(dz, input_grad=False)  # overwrites grad_buffer with this part's
                if k == 0:
                    self._grad_sum[...] = self.model.grad_buffer
                elif k < last:
                    self._grad_sum += self.model.grad_buffer
                else:  # the same sum as adding it to _grad_sum (IEEE addition commutes), one pass less
                    self.model.grad_buffer += self._grad_sum
            pending = self._post_control(loss_sum)
            t2 = clock()
            t1 = t0 + forward_s
        # grad_buffer holds the gradient SUMMED over the global batch; grad_scale makes it the mean
        grad_scale = 1.0 / len(batch_indices)
        if self.sharded is None:
            self.exchange.finish(len(batch_indices))
        else:
            self.sharded.reduce(len(batch_indices))
        if self.timeline is not None:
            # blocked in wait() from here: on the buckets started during backward, then on the loss/stop sum
            tw = t2 if overlap else clock()
        pending.wait()
        t3 = clock()
        control = self._control
        global_loss, stop = float(control[0]), int(control[1])
        problem = self._non_finite(global_loss)
        if problem is None:
            self._set_lr(self.step)
            if self.clip_norm:
                grad_scale *= self._clip_factor(grad_scale)
            (self.optimizer if self.sharded is None else self.sharded).step(grad_scale)
        t4 = clock()
        phase = self.phase_seconds  # in place: no temporary array
        phase[0] += t1 - t0
        phase[1] += t2 - t1
        phase[2] += t3 - t2
        phase[3] += t4 - t3
        if self.timeline is not None:
            self.timeline.record_step(self.step + 1, t0, t1, t2, tw, t3, t4)
        if problem is not None and self.on_nan == "skip":
            self.skipped_steps += 1
        elif problem is not None:
            raise DivergenceError(f"{problem} at step {self.step + 1} (epoch {self.epoch + 1}); "
                                  f"no checkpoint written for it (set train.on_nan = \"skip\" to skip such steps)")
        return global_loss, int(stop)

    @property
    def lr(self) -> float:
        """The learning rate of the last update (or of the next one, before any)."""
        return float(self._stepping_optimizer().lr)

    def _stepping_optimizer(self):
        return self.optimizer if self.sharded is None else self.sharded.optimizer

    def _set_lr(self, step: int) -> None:
        if self.lr_schedule is not None:
            lr = float(self.lr_schedule(step))
            self.optimizer.lr = lr
            if self.sharded is not None:
                self.sharded.optimizer.lr = lr

    def _clip_factor(self, grad_scale: float) -> float:
        """min(1, clip_norm / global norm of the averaged gradient), the same on every rank (from the
        squared norm that :meth:`_non_finite` left in ``_norm_sq``)."""
        norm = math.sqrt(self._norm_sq[0]) * grad_scale
        self.last_grad_norm = norm
        return min(1.0, self.clip_norm / (norm + 1e-6))  # torch's clip_grad_norm_ coefficient

    def _post_control(self, local_loss_sum: float):
        """Start summing [this rank's loss sum, its stop request] over the ranks (small, non-blocking)."""
        control = self._control
        control[0], control[1] = local_loss_sum, float(self._signals.requested)  # [1] sums to the ranks asking
        return self.comm.iallreduce_sum(control)

    def _non_finite(self, global_loss: float) -> str | None:
        """None if the loss and the summed gradient are finite, else what is not (same on all ranks).

        Collective in a sharded run. After a finite loss, leaves the squared L2 norm of the whole
        summed gradient in ``_norm_sq``: one dot product (a sharded run sums its blocks' in one
        small allreduce). NaN and inf propagate through it, so a finite value means a finite
        gradient; otherwise an exact elementwise search finds the first bad element, or none when
        only the dot overflowed (|values| ~ 1e19 in float32).
        """
        if not math.isfinite(global_loss):
            return f"non-finite loss ({global_loss})"
        g = self.model.grad_buffer if self.sharded is None else self.sharded.grad_block
        self._norm_sq[0] = float(np.dot(g, g))
        if self.sharded is not None:
            self.comm.allreduce_sum(self._norm_sq)
        if math.isfinite(self._norm_sq[0]):
            return None
        if self.sharded is not None:  # each rank holds a block of the gradient: agree on the first bad index
            index = self.sharded.first_non_finite()
        else:
            index = first_non_finite(self.model.grad_buffer)
        if index is None:
            return None
        spec = next(s for s in self.model.param_specs if s.offset <= index < s.offset + s.size)
        return f"non-finite gradient in {spec.name} ({self.model.layers[spec.layer_index].describe()})"

    @property
    def stopped_early(self) -> bool:
        """Early stopping ended the run (also after resuming a run that had stopped early)."""
        return self.early_stopping is not None and self.early_stopping.stopped

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, dataset: Dataset) -> dict[str, Any]:
        """Exact distributed evaluation of the model on ``dataset`` (collective)."""
        return evaluate(self.model, self.loss, dataset, self.comm)

    # -- agreement checks -------------------------------------------------------------------

    def check_agreement(self) -> None:
        """Before step 0: every rank must hold the same config, data and model shapes (collective).

        Called by resume() and fit() (once): before any collective whose size depends on them.
        """
        if self._agreed:
            return
        items = {
            "config": json.dumps(self.config, sort_keys=True).encode(),
            "training data": _data_fingerprint(self.train_data),
            "validation data": _data_fingerprint(self.val_data),
            "model": json.dumps([(s.name, s.shape) for s in self.model.param_specs] + [str(self.model.dtype)]).encode(),
        }
        mine = np.array([zlib.crc32(v) for v in items.values()], dtype=np.int64)
        table = self.comm.allgather(mine)
        problems = []
        for j, what in enumerate(items):
            differ = [r for r in range(self.comm.size) if table[r, j] != table[0, j]]
            if differ:
                problems.append(f"{what} (rank{'s' if len(differ) > 1 else ''} "
                                f"{', '.join(map(str, differ))} differ{'' if len(differ) > 1 else 's'} from rank 0)")
        if problems:
            raise MismatchError("ranks disagree before step 0 on: " + "; ".join(problems) +
                                " -- every rank must see the same config and data files")
        self._agreed = True

    def check_sync(self) -> None:
        """Compare a checksum of every rank's parameters; DesyncError names the ranks that differ."""
        crc = zlib.crc32(self.model.param_buffer.view(np.uint8))
        mine = np.array([zlib.crc32(self.model.state_buffer.view(np.uint8), crc)], dtype=np.int64)
        table = self.comm.allgather(mine)[:, 0]
        differ = [r for r in range(self.comm.size) if table[r] != table[0]]
        if differ:
            raise DesyncError(f"parameters out of sync at step {self.step}: rank{'s' if len(differ) > 1 else ''} "
                              f"{', '.join(map(str, differ))} differ{'' if len(differ) > 1 else 's'} from rank 0")

    # -- resume -----------------------------------------------------------------------------

    def resume(self, checkpoint: Checkpoint | None) -> bool:
        """Continue from ``checkpoint`` (needed on rank 0 only; collective). Returns False for None.

        Rank 0 restores the parameters, the optimizer state and the position (step, epoch, the
        loss so far in the epoch) and broadcasts them, so other ranks need not see the file.
        """
        self.check_agreement()
        # [present, step, epoch, epoch loss sum, skipped, optimizer steps,
        #  early stopping: best, best epoch, bad epochs, stopped]
        header = np.zeros(10, dtype=np.float64)
        if self.comm.rank == 0 and checkpoint is not None:
            meta = checkpoint.meta
            early = meta.get("early_stopping", {})
            header[:] = [1, meta["step"], meta["epoch"], meta.get("epoch_loss_sum", 0.0), meta.get("skipped_steps", 0),
                         meta.get("optimizer_steps", meta["step"] - meta.get("skipped_steps", 0)),
                         _nan_if_none(early.get("best")), early.get("best_epoch", 0), early.get("bad_epochs", 0),
                         early.get("stopped", False)]
            self.model.load_params(checkpoint.model)
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.last_metrics = dict(meta.get("metrics", {}))
        self.comm.broadcast(header)
        if header[0] == 0:
            return False
        self.comm.broadcast(self.model.param_buffer)
        self.comm.broadcast(self.model.state_buffer)
        state = self.optimizer.state_dict()  # the full state: rank 0's holds the checkpoint's
        for array in state.values():
            self.comm.broadcast(array)
        if self.sharded is not None:
            self.sharded.load_state(state)
        self.step, self.epoch = int(header[1]), int(header[2])
        self.epoch_loss_sum, self.skipped_steps = float(header[3]), int(header[4])
        self.optimizer.steps = int(header[5])
        if self.sharded is not None:
            self.sharded.optimizer.steps = int(header[5])
        if self.early_stopping is not None:
            self.early_stopping.load_state({"best": header[6], "best_epoch": header[7], "bad_epochs": header[8],
                                            "stopped": bool(header[9])})
        self._set_lr(max(self.step - 1, 0))  # the lr of the last update, as reported before the stop
        if self.out_dir is not None:
            self.last_checkpoint = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        return True

    # -- the loop ---------------------------------------------------------------------------

    def broadcast_parameters(self) -> None:
        """Make every rank start from rank 0's parameters and layer buffers."""
        self.comm.broadcast(self.model.param_buffer, root=0)
        self.comm.broadcast(self.model.state_buffer, root=0)

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are done or a signal asks to stop.

        Returns one metrics dict per epoch completed in this call (the same on every rank). After
        a stop signal, a checkpoint is written and ``stopped`` is True.
        """
        self.check_agreement()
        self.broadcast_parameters()
        history = []
        policy = self.checkpoint_policy
        for cb in self.callbacks:
            cb.on_train_begin(self)
        # NaN and overflow are detected per step (_non_finite) and reported once, not as NumPy warnings
        with self._signals if self.stop_on_signals else _nothing(), np.errstate(all="ignore"):
            self._clock_mark = time.perf_counter()
            while self.epoch < self.epochs and not self.stopped and not self.stopped_early:
                epoch = self.epoch
                order = epoch_order(len(self.train_data), self.seed, epoch, self.shuffle)
                epoch_mark = self.totals.copy()
                for k in range(self.step - epoch * self.steps_per_epoch, self.steps_per_epoch):
                    batch = global_batch(order, k, self.batch_size)
                    step_loss, stop = self.train_step(batch)
                    self.step += 1
                    self.epoch_loss_sum += step_loss
                    self._count_step(len(batch), step_loss)
                    for cb in self.callbacks:
                        cb.on_step_end(self, self.step, step_loss)
                    if self.check_sync_every and self.step % self.check_sync_every == 0:
                        with self._clock_stopped():
                            self.check_sync()
                    if stop:
                        self.stopped, self.stop_requests = True, stop
                        break
                    # a step checkpoint at the end of an epoch waits for the epoch's metrics (below)
                    if self._due(policy.every_steps, self.step) and k < self.steps_per_epoch - 1:
                        with self._clock_stopped():
                            self.save_checkpoint()
                if self.stopped and self.step < (epoch + 1) * self.steps_per_epoch:
                    break  # stopped mid-epoch: the epoch resumes from here
                with self._clock_stopped():  # evaluation, the epoch's callbacks and checkpoint
                    history.append(self._end_epoch(self.totals - epoch_mark))
                    if self.check_sync_every == 0:
                        self.check_sync()
                    if self._due(policy.every_epochs, self.epoch) or self._due(policy.every_steps, self.step):
                        self.save_checkpoint()
            if not self._saved_at_this_step():
                self.save_checkpoint()
        if self.stopped and self._log is not None:
            self._log(f"stop signal received by {self.stop_requests} of {self.comm.size} rank(s): stopped after "
                      f"step {self.step}; checkpoint {self.last_checkpoint}")
        for cb in self.callbacks:
            cb.on_train_end(self)
        return history

    def _count_step(self, samples: int, loss_sum: float) -> None:
        """Add the step just done to :attr:`totals`, with the time since the last step's."""
        now = time.perf_counter()
        self.totals.add(samples, loss_sum, now - self._clock_mark)
        self._clock_mark = now

    @contextlib.contextmanager
    def _clock_stopped(self):
        """The training clock (``totals.seconds``) does not run over the body."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._clock_mark += time.perf_counter() - start

    def _end_epoch(self, done: RunningTotals) -> dict[str, Any]:
        """The epoch's metrics (``done``: its steps in this process), evaluation, early stopping, hooks."""
        self.epoch += 1
        train_time = done.seconds
        metrics: dict[str, Any] = {"epoch": self.epoch, "step": self.step,
                                   "train_loss": self.epoch_loss_sum / len(self.train_data),
                                   "samples_per_s": done.samples / train_time if train_time > 0 else math.inf,
                                   "epoch_time_s": train_time, "skipped_steps": self.skipped_steps}
        self.epoch_loss_sum = 0.0
        if self.val_data is not None:
            start = time.perf_counter()
            val = self.evaluate(self.val_data)
            if self.timeline is not None:
                self.timeline.record("evaluation", self.step, start, time.perf_counter())
            metrics.update({f"val_{k}": v for k, v in val.items() if k != "n_samples"})
        metrics["lr"] = self.lr
        if self.early_stopping is not None and self.early_stopping.update(self.epoch, metrics):
            metrics["early_stop"] = True
        self.last_metrics = metrics
        self._log_epoch(metrics)
        if metrics.get("early_stop") and self._log is not None:
            e = self.early_stopping
            self._log(f"early stopping after epoch {self.epoch}: {e.metric} has not improved for {e.patience} "
                      f"epoch{'s' if e.patience > 1 else ''} (best {e.best:.4f} at epoch {e.best_epoch})")
        for cb in self.callbacks:
            cb.on_epoch_end(self, self.epoch, metrics)
        return metrics

    @staticmethod
    def _due(every: int, count: int) -> bool:
        return every > 0 and count % every == 0

    def _saved_at_this_step(self) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{self.step:08d}"

    def _log_epoch(self, m: dict[str, Any]) -> None:
        if self._log is None:
            return
        width = len(str(self.epochs))
        parts = [f"epoch {m['epoch']:>{width}}/{self.epochs}", f"step {m['step']}", f"train_loss {m['train_loss']:.4f}"]
        for key in VALIDATION_KEYS:
            if key in m:
                parts.append(f"{key} {m[key]:.4f}")
        parts.append(f"samples/s {m['samples_per_s']:,.0f}")
        if m["skipped_steps"]:
            parts.append(f"skipped_steps {m['skipped_steps']}")
        self._log("  ".join(parts))

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes a checkpoint of the current step (other ranks only record the name).

        Nothing in it depends on the world size, so it resumes on any number of ranks.
        """
        if self.out_dir is None:
            return None
        start = time.perf_counter()
        path = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        state = self.optimizer.state_dict() if self.sharded is None else self.sharded.gather_state()  # collective
        if self.comm.rank == 0:
            meta = {
                "dptrain_version": __version__,
                "epoch": self.epoch,
                "step_in_epoch": self.step - self.epoch * self.steps_per_epoch,
                "epoch_loss_sum": self.epoch_loss_sum,
                "skipped_steps": self.skipped_steps,
                "optimizer_steps": int(self._stepping_optimizer().steps),
                "lr": self.lr,
                "early_stopping": self.early_stopping.state() if self.early_stopping is not None else {},
                "world_size": self.comm.size,  # for the record only
                "dtype": str(self.model.dtype),
                "config": self.config,
                "metrics": {k: v for k, v in self.last_metrics.items() if k == "train_loss" or k in VALIDATION_KEYS},
                "params": {name: list(shape) for name, shape in self.model.state_shapes().items()},
            }
            path = save_checkpoint(self.out_dir / "checkpoints", self.step, self.model.state_arrays(),
                                   state, meta, self.checkpoint_policy.keep)
        self.last_checkpoint = path
        if self.timeline is not None:
            self.timeline.record("checkpoint", self.step, start, time.perf_counter())
        return path


def _nan_if_none(value) -> float:
    return math.nan if value is None else float(value)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _data_fingerprint(dataset: Dataset | None) -> bytes:
    """Size, shapes, dtypes and up to 4096 evenly spaced rows of a dataset, as bytes to hash."""
    if dataset is None:
        return b"none"
    n = len(dataset)
    rows = np.unique(np.linspace(0, n - 1, num=min(n, _FINGERPRINT_ROWS)).astype(np.int64)) if n else np.arange(0)
    head = f"{n} {dataset.x.shape} {dataset.x.dtype} {dataset.y.shape} {dataset.y.dtype} {dataset.n_classes}"
    x, y = dataset.take(rows)
    return head.encode() + x.tobytes() + y.tobytes()
