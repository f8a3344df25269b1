"""The data-parallel training loop: epochs of steps, evaluation, checkpoints, callbacks.

The step itself, on every rank, is :class:`dptrain.training.step.TrainingStep` (read it first).
Step counts, evaluation, checkpoints, stopping and every check derive from (epoch, step) and from
values summed over all ranks, so every rank makes the same collective calls in the same order and
takes the same decisions. Only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dptrain._version import __version__
from dptrain.data import Dataset, steps_per_epoch
from dptrain.errors import DivergenceError
from dptrain.nn import Loss, Sequential
from dptrain.parallel.agreement import check_agreement, check_sync
from dptrain.parallel.comm import SingleProcessComm
from dptrain.parallel.sampler import epoch_order, global_batch, shard
from dptrain.runtime.signals import StopOnSignal
from dptrain.storage.checkpoint import Checkpoint, save_checkpoint

from .batches import BatchLoader
from .callback import Callback
from .checkpoint_policy import CheckpointPolicy
from .early_stopping import EarlyStopping
from .evaluation import VALIDATION_KEYS, evaluate
from .state import TrainingState, broadcast_checkpoint, checkpoint_meta
from .step import PHASES, StepTimes, TrainingStep
from .totals import RunningTotals, Stopwatch

__all__ = ["PHASES", "Callback", "CheckpointPolicy", "RunningTotals", "Trainer"]


class Trainer:
    """Train ``model`` on ``train_data`` with data parallelism over ``comm``.

    Parameters
    ----------
    batch_size : the GLOBAL batch size, split across ranks; the last batch of an epoch may be partial.
    epochs : number of passes over ``train_data``.
    steps : train this many optimizer steps instead (0: ``epochs`` epochs), for data whose epoch is
        enormous (every window of a text); the run crosses epoch boundaries as they come.
    eval_every_steps : evaluate and report (the metrics, ``on_epoch_end``, early stopping) every N steps
        and after the last one, instead of after each epoch; 0: after each epoch.
    seed, shuffle : the epoch order is a pure function of (seed, epoch).
    comm : a communicator from :mod:`dptrain.parallel.comm` (default: single process).
    out_dir : run folder; rank 0 writes ``out_dir/checkpoints``. None: no checkpoints.
    config : the resolved config as a plain dict, recorded in each checkpoint's meta.json and
        compared across ranks before step 0.
    on_nan : "error" stops at a NaN/inf loss or gradient (DivergenceError); "skip" skips that update.
    check_sync_every : compare a checksum of the parameters across ranks every N steps; 0: each epoch.
    accumulate, bucket_mb, compression, shard_optimizer, lr_schedule, clip_norm : how each step runs
        (micro-batches, the gradient exchange, ZeRO-1, the lr of each step, clipping): see
        :class:`~dptrain.training.step.TrainingStep`.
    prefetch : during fit(), a background thread prepares the local batches of this many steps ahead
        (rows read, converted, augmented) while the current step computes; 0: each step reads its
        batch itself. Never changes a result (see :mod:`dptrain.training.batches`).
    early_stopping : an :class:`EarlyStopping` checked after each epoch's evaluation; None: off.
    stop_on_signals : stop at the next step boundary on SIGTERM, SIGUSR1 or SIGINT (main thread only);
        pass a :class:`StopOnSignal` already entered to also catch signals that arrive before fit().
    log : called with one line per epoch, on rank 0 only.
    """

    def __init__(self, model: Sequential, loss: Loss, optimizer, train_data: Dataset,
                 val_data: Dataset | None = None, *, batch_size: int, epochs: int = 1, steps: int = 0,
                 eval_every_steps: int = 0, seed: int = 0,
                 shuffle: bool = True, comm=None, out_dir: str | Path | None = None,
                 checkpoint: CheckpointPolicy = CheckpointPolicy(), config: dict | None = None,
                 on_nan: str = "error", check_sync_every: int = 0, accumulate: int = 1,
                 bucket_mb: float = 4.0, compression: str = "none", shard_optimizer: bool = False,
                 lr_schedule: Callable[[int], float] | None = None, clip_norm: float = 0.0, prefetch: int = 0,
                 early_stopping: EarlyStopping | None = None, stop_on_signals: bool | StopOnSignal = True,
                 callbacks: Sequence[Callback] = (), log: Callable[[str], None] | None = print) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if steps < 0 or eval_every_steps < 0:
            raise ValueError(f"steps and eval_every_steps must be >= 0, got {steps} and {eval_every_steps}")
        if on_nan not in ("error", "skip"):
            raise ValueError(f"on_nan must be 'error' or 'skip', got {on_nan!r}")
        if check_sync_every < 0:
            raise ValueError(f"check_sync_every must be >= 0, got {check_sync_every}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.train_data, self.val_data = train_data, val_data if val_data is not None and len(val_data) else None
        self.batch_size, self.epochs, self.seed, self.shuffle = batch_size, epochs, seed, shuffle
        self.comm = comm if comm is not None else SingleProcessComm()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_policy = checkpoint
        self.config = config or {}
        self.on_nan, self.check_sync_every, self.early_stopping = on_nan, check_sync_every, early_stopping
        self.stop_on_signals = stop_on_signals
        self._signals = stop_on_signals if isinstance(stop_on_signals, StopOnSignal) else StopOnSignal()
        self.steps_per_epoch = steps_per_epoch(len(train_data), batch_size)
        self._orders: dict[int, np.ndarray] = {}  # epoch -> its order (batch_indices); two at most
        self._orders_lock = threading.Lock()
        #: each step's local (x, y); with prefetch > 0, prepared ahead by a thread during fit()
        self.batches = BatchLoader(train_data, self.steps_per_epoch, prefetch, plan=self.local_indices)
        self.step_fn = TrainingStep(model, loss, optimizer, self.batches, self.comm, accumulate=accumulate,
                                    bucket_mb=bucket_mb, compression=compression, shard_optimizer=shard_optimizer,
                                    lr_schedule=lr_schedule, clip_norm=clip_norm,
                                    stop_requested=lambda: self._signals.requested)
        self.callbacks = list(callbacks)
        self._log = log if self.comm.rank == 0 else None
        #: the optimizer steps of the whole run
        self.total_steps = steps if steps else epochs * self.steps_per_epoch
        self.by_steps = bool(steps)  # the run is measured in steps (train.steps), not epochs
        self.eval_every_steps = eval_every_steps
        self.step = 0  # global optimizer steps done
        self.epoch = 0  # epochs completed
        #: loss summed over all ranks and the steps done since the last report (in this epoch, by default)
        self.epoch_loss_sum = 0.0
        self.report_step = 0  # the step of the last report
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient (on_nan = "skip")
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None
        self.stopped = False  # fit() returned early because a stop signal reached some rank
        self.stop_requests = 0  # how many ranks had received a stop signal when it stopped
        self._agreed = False  # check_agreement() has passed
        #: running totals of the steps trained by fit() in this process (see :class:`RunningTotals`)
        self.totals = RunningTotals()
        self._clock = Stopwatch()  # times the steps: evaluation, checkpoints and sync checks are paused out

    # -- what callbacks read ----------------------------------------------------------------

    @property
    def phase_seconds(self) -> np.ndarray:
        """Seconds spent in each of PHASES over every step so far (never reset: subtract a copy)."""
        return self.step_fn.phase_seconds

    @property
    def last_step_times(self) -> StepTimes | None:
        """The perf_counter marks of the last step's phases."""
        return self.step_fn.last_times

    @property
    def lr(self) -> float:
        """The learning rate of the last update (or of the next one, before any)."""
        return self.step_fn.lr

    @property
    def last_grad_norm(self) -> float:
        """The global norm of the last averaged gradient, when clipping (NaN otherwise)."""
        return self.step_fn.guard.last_grad_norm

    @property
    def stopped_early(self) -> bool:
        """Early stopping ended the run (also after resuming a run that had stopped early)."""
        return self.early_stopping is not None and self.early_stopping.stopped

    # -- which samples, one step, evaluation, agreement -----------------------------------------

    def batch_indices(self, step: int) -> np.ndarray:
        """The global batch of optimizer step ``step`` (0-based; sample indices), a pure function of
        (seed, step): batch ``step % steps_per_epoch`` of the order of epoch ``step // steps_per_epoch``.

        The orders of the last two epochs asked for are kept (the loader's thread may be in the next
        epoch while the steps finish this one); safe to call from that thread.
        """
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_order(len(self.train_data), self.seed, epoch, self.shuffle)
            order.flags.writeable = False  # shared by the threads
            with self._orders_lock:
                self._orders[epoch] = order
                while len(self._orders) > 2:
                    del self._orders[next(iter(self._orders))]  # the one cached first
        return global_batch(order, k, self.batch_size)

    def local_indices(self, step: int) -> np.ndarray:
        """The part of step ``step``'s global batch that this rank takes (the loader's plan)."""
        return shard(self.batch_indices(step), self.comm.rank, self.comm.size)

    def train_step(self, batch_indices: np.ndarray) -> tuple[float, int]:
        """One optimizer step on a global batch (:class:`TrainingStep`); does not advance ``step``.

        Returns (loss summed over the whole global batch, number of ranks asking to stop), the
        same on every rank. A non-finite loss or gradient raises DivergenceError on every rank
        (or skips the update with on_nan = "skip").
        """
        loss_sum, stop, problem = self.step_fn(self.step, batch_indices)
        if problem is not None and self.on_nan == "skip":
            self.skipped_steps += 1
        elif problem is not None:
            raise DivergenceError(f"{problem} at step {self.step + 1} (epoch {self.epoch + 1}); "
                                  f"no checkpoint written for it (set train.on_nan = \"skip\" to skip such steps)")
        return loss_sum, stop

    def evaluate(self, dataset: Dataset) -> dict[str, Any]:
        """Exact distributed evaluation of the model on ``dataset`` (collective)."""
        return evaluate(self.model, self.loss, dataset, self.comm)

    def check_agreement(self) -> None:
        """Before step 0: every rank must hold the same config, data and model shapes (collective).

        Called by resume() and fit() (once): before any collective whose size depends on them.
        """
        if not self._agreed:
            check_agreement(self.comm, self.config, self.train_data, self.val_data, self.model)
            self._agreed = True

    def check_sync(self) -> None:
        """Compare a checksum of every rank's parameters; DesyncError names the ranks that differ."""
        check_sync(self.comm, self.model, self.step)

    def broadcast_parameters(self) -> None:
        """Make every rank start from rank 0's parameters and layer buffers."""
        self.comm.broadcast(self.model.param_buffer, root=0)
        self.comm.broadcast(self.model.state_buffer, root=0)

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``total_steps`` steps are done, early stopping ends the run or a signal asks to stop.

        Returns one metrics dict per report made in this call (each epoch, or every
        ``eval_every_steps`` steps), the same on every rank. After a stop signal, a checkpoint is
        written and ``stopped`` is True.
        """
        self.check_agreement()
        self.broadcast_parameters()
        history = []
        policy = self.checkpoint_policy
        self._dispatch("on_train_begin")
        # NaN and overflow are detected per step (GradientGuard) and reported once, not as NumPy warnings
        signals = self._signals if self.stop_on_signals else contextlib.nullcontext()
        if self.stop_on_signals:
            self.comm.watchdog.watch_stop(self._signals)  # a stop that cannot come is ended after comm.timeout_s
        with signals, np.errstate(all="ignore"):
            self._clock.start()
            report_mark = self.totals.copy()
            with self.batches.running(self.step, self.total_steps):  # prefetch's thread ends with the loop, however it ends
                while self.step < self.total_steps and not self.stopped and not self.stopped_early:
                    batch = self.batch_indices(self.step)
                    step_loss, stop = self.train_step(batch)
                    self.step += 1
                    self.epoch = self.step // self.steps_per_epoch
                    self.epoch_loss_sum += step_loss
                    self.totals.add(len(batch), step_loss, self._clock.lap())
                    self._dispatch("on_step_end", self.step, step_loss)
                    if stop:
                        self.stopped, self.stop_requests = True, stop
                    with self._clock.paused():  # sync checks, evaluation, the report's callbacks, checkpoints
                        if self.check_sync_every and self.step % self.check_sync_every == 0:
                            self.check_sync()
                        if self.report_due(self.step):
                            history.append(self._report(self.totals - report_mark))
                            report_mark = self.totals.copy()
                            if self.check_sync_every == 0:
                                self.check_sync()
                        epoch_end = self.step % self.steps_per_epoch == 0
                        if _due(policy.every_steps, self.step) or (epoch_end and _due(policy.every_epochs, self.epoch)):
                            self.save_checkpoint()
            if not self._saved_at_this_step():
                self.save_checkpoint()
        if self.stopped and self._log is not None:
            self._log(f"stop signal received by {self.stop_requests} of {self.comm.size} rank(s): stopped after "
                      f"step {self.step}; checkpoint {self.last_checkpoint}")
        self._dispatch("on_train_end")
        return history

    def report_due(self, step: int) -> bool:
        """Whether the run evaluates and reports after ``step`` steps: at the end of each epoch (or
        every ``eval_every_steps`` steps), and after the last step. A pure function of the step."""
        every = self.eval_every_steps or self.steps_per_epoch
        return step % every == 0 or step == self.total_steps

    def samples_between(self, first: int, last: int) -> int:
        """The training samples of global steps ``first`` .. ``last - 1`` (an epoch's last batch may be partial)."""
        n, spe, batch = len(self.train_data), self.steps_per_epoch, self.batch_size

        def before(step: int) -> int:  # the samples of steps 0 .. step - 1: k < spe steps into an epoch are full
            epochs, k = divmod(step, spe)
            return epochs * n + k * batch

        return before(last) - before(first)

    def _dispatch(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _report(self, done: RunningTotals) -> dict[str, Any]:
        """The metrics since the last report (``done``: those steps, in this process), evaluation,
        early stopping, the ``on_epoch_end`` hooks."""
        by_steps = bool(self.eval_every_steps) or self.step % self.steps_per_epoch != 0
        epoch = round(self.step / self.steps_per_epoch, 4) if by_steps else self.epoch
        train_time = done.seconds
        metrics: dict[str, Any] = {"epoch": epoch, "step": self.step,
                                   "train_loss": self.epoch_loss_sum / self.samples_between(self.report_step, self.step),
                                   "samples_per_s": done.samples / train_time if train_time > 0 else float("inf"),
                                   "epoch_time_s": train_time, "skipped_steps": self.skipped_steps}
        self.epoch_loss_sum, self.report_step = 0.0, self.step
        if self.val_data is not None:
            start = time.perf_counter()
            val = self.evaluate(self.val_data)
            self._dispatch("on_span", "evaluation", self.step, start, time.perf_counter())
            metrics.update({f"val_{k}": v for k, v in val.items() if k != "n_samples"})
        metrics["lr"] = self.lr
        count = self.step if self.eval_every_steps else self.epoch  # what early stopping counts in
        if self.early_stopping is not None and self.early_stopping.update(count, metrics):
            metrics["early_stop"] = True
        self.last_metrics = metrics
        if self._log is not None:
            self._log(report_line(metrics, self.total_steps) if self.eval_every_steps else epoch_line(metrics, self.epochs))
            if metrics.get("early_stop"):
                e, unit = self.early_stopping, "step" if self.eval_every_steps else "epoch"
                counted = "evaluation" if self.eval_every_steps else "epoch"
                self._log(f"early stopping after {unit} {count}: {e.metric} has not improved for {e.patience} "
                          f"{counted}{'s' if e.patience > 1 else ''} (best {e.best:.4f} at {unit} {e.best_epoch})")
        self._dispatch("on_epoch_end", epoch, metrics)
        return metrics

    # -- checkpoints and resume -------------------------------------------------------------

    def _saved_at_this_step(self) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{self.step:08d}"

    def state(self) -> TrainingState:
        """The position of the run now (what a checkpoint records besides the arrays)."""
        early = self.early_stopping
        state = TrainingState(self.step, self.epoch, self.epoch_loss_sum, self.skipped_steps,
                              int(self.step_fn.stepping_optimizer.steps), report_step=self.report_step)
        if early is not None:
            state.best, state.best_epoch, state.bad_epochs, state.stopped_early = (
                early.best, early.best_epoch, early.bad_epochs, early.stopped)
        return state

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes a checkpoint of the current step (other ranks only record the name).

        Nothing in it depends on the world size, so it resumes on any number of ranks.
        """
        if self.out_dir is None:
            return None
        start = time.perf_counter()
        path = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        sharded = self.step_fn.sharded
        state = self.optimizer.state_dict() if sharded is None else sharded.gather_state()  # collective
        if self.comm.rank == 0:
            meta = checkpoint_meta(
                self.state(), steps_per_epoch=self.steps_per_epoch, lr=self.lr,
                early_stopping=self.early_stopping.state() if self.early_stopping is not None else {},
                world_size=self.comm.size, dtype=str(self.model.dtype), config=self.config,
                metrics={k: v for k, v in self.last_metrics.items() if k == "train_loss" or k in VALIDATION_KEYS},
                params=self.model.state_shapes(), version=__version__)
            meta.update(self.train_data.meta())  # what the class ids stand for, how inputs are read
            path = save_checkpoint(self.out_dir / "checkpoints", self.step, self.model.state_arrays(),
                                   state, meta, self.checkpoint_policy.keep)
        self.last_checkpoint = path
        self._dispatch("on_span", "checkpoint", self.step, start, time.perf_counter())
        return path

    def resume(self, checkpoint: Checkpoint | None) -> bool:
        """Continue from ``checkpoint`` (needed on rank 0 only; collective). Returns False for None.

        Rank 0 restores the parameters, the optimizer state and the position (step, epoch, the
        loss so far in the epoch) and broadcasts them, so other ranks need not see the file.
        """
        self.check_agreement()
        state = broadcast_checkpoint(self.comm, checkpoint, self.model, self.optimizer, self.step_fn.sharded)
        if state is None:
            return False
        if self.comm.rank == 0:
            self.last_metrics = dict(checkpoint.meta.get("metrics", {}))
        self.step, self.epoch, self.epoch_loss_sum = state.step, state.epoch, state.epoch_loss_sum
        self.skipped_steps, self.report_step = state.skipped_steps, state.report_step
        if self.early_stopping is not None:
            self.early_stopping.load_state(state.early_stopping_state())
        self.step_fn.set_lr(max(self.step - 1, 0))  # the lr of the last update, as reported before the stop
        if self.out_dir is not None:
            self.last_checkpoint = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        return True


def _due(every: int, count: int) -> bool:
    return every > 0 and count % every == 0


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """The line logged after each epoch, e.g. "epoch  3/30  step 69  train_loss 0.3056  val_loss ..."."""
    width = len(str(epochs))
    return _line([f"epoch {m['epoch']:>{width}}/{epochs}", f"step {m['step']}"], m)


def report_line(m: dict[str, Any], total_steps: int) -> str:
    """The line logged every eval.every_steps steps, e.g. "step  500/2000  epoch 0.072  train_loss 1.9876  ..."."""
    width = len(str(total_steps))
    return _line([f"step {m['step']:>{width}}/{total_steps}", f"epoch {m['epoch']:g}"], m)


def _line(parts: list[str], m: dict[str, Any]) -> str:
    parts.append(f"train_loss {m['train_loss']:.4f}")
    for key in VALIDATION_KEYS:
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    parts.append(f"samples/s {m['samples_per_s']:,.0f}")
    if m["skipped_steps"]:
        parts.append(f"skipped_steps {m['skipped_steps']}")
    return "  ".join(parts)
