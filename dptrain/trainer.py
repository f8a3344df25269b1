"""The data-parallel training loop.

One step, on every rank::

    indices = shard(global_batch(order, k, B), rank, world)   # this rank's part of global batch k
    z = model.forward(x[indices])                              # (n_local, n_outputs)
    loss_sum, dz = loss.value_and_grad(z, y[indices])          # SUM over the local samples
    model.backward(dz)                                         # grad_buffer = d(local sum)/dparams
    comm.allreduce_sum(grad_buffer)                            # one Allreduce over one flat buffer
    grad_buffer /= len(global batch)                           # the mean over the global batch
    optimizer.step()                                           # the same update on every rank

Step counts, evaluation and checkpoints derive from (epoch, step) alone, identical on every rank,
so every rank makes the same collective calls in the same order. Only rank 0 logs and writes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .checkpoint import save_checkpoint
from .comm import SingleProcessComm
from .data import Dataset, epoch_order, global_batch, shard, steps_per_epoch
from .nn import Loss, Sequential

EVAL_CHUNK = 4096  # samples per forward pass in evaluation, to bound memory


@dataclass(frozen=True)
class CheckpointPolicy:
    """When rank 0 writes checkpoints. A checkpoint is always written at the end of training."""

    every_steps: int = 0  # 0 = off
    every_epochs: int = 1  # 0 = off
    keep: int = 3


class Callback:
    """Hooks called on every rank, in the same order. Override what you need."""

    def on_step_end(self, trainer: "Trainer", step: int, local_loss_sum: float) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict[str, Any]) -> None: ...


def evaluate(model: Sequential, loss: Loss, dataset: Dataset, comm=None) -> dict[str, Any]:
    """Exact distributed evaluation: each rank takes a strided share; the sums are allreduced.

    Every sample counts once whatever the world size. Returns {"loss": mean loss, "n_samples": N}
    plus "accuracy" (classification) or "rmse" (regression). Collective: every rank must call it.
    """
    comm = comm if comm is not None else SingleProcessComm()
    mine = shard(np.arange(len(dataset)), comm.rank, comm.size)
    sums = np.zeros(3, dtype=np.float64)  # loss sum, correct count, sample count
    for start in range(0, len(mine), EVAL_CHUNK):
        idx = mine[start : start + EVAL_CHUNK]
        z = model.forward(dataset.x[idx], train=False)
        y = dataset.y[idx]
        sums[0] += loss.value(z, y)
        if loss.task == "classification":
            sums[1] += np.count_nonzero(z.argmax(axis=1) == y)
        sums[2] += len(idx)
    comm.allreduce_sum(sums)
    n = int(sums[2])
    mean_loss = sums[0] / n if n else math.nan
    result: dict[str, Any] = {"loss": mean_loss, "n_samples": n}
    if loss.task == "classification":
        result["accuracy"] = sums[1] / n if n else math.nan
    else:
        result["rmse"] = math.sqrt(mean_loss) if n else math.nan
    return result


class Trainer:
    """Train ``model`` on ``train_data`` with data parallelism over ``comm``.

    Parameters
    ----------
    batch_size : the GLOBAL batch size, split across ranks; the last batch of an epoch may be partial.
    epochs : number of passes over ``train_data``.
    seed, shuffle : the epoch order is a pure function of (seed, epoch).
    comm : a communicator from :mod:`dptrain.comm` (default: single process).
    out_dir : run folder; rank 0 writes ``out_dir/checkpoints``. None: no checkpoints.
    config : the resolved config as a plain dict, recorded in each checkpoint's meta.json.
    log : called with one line per epoch, on rank 0 only.
    """

    def __init__(self, model: Sequential, loss: Loss, optimizer, train_data: Dataset,
                 val_data: Dataset | None = None, *, batch_size: int, epochs: int, seed: int = 0,
                 shuffle: bool = True, comm=None, out_dir: str | Path | None = None,
                 checkpoint: CheckpointPolicy = CheckpointPolicy(), config: dict | None = None,
                 callbacks: Sequence[Callback] = (), log: Callable[[str], None] | None = print) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.train_data, self.val_data = train_data, val_data if val_data is not None and len(val_data) else None
        self.batch_size, self.epochs, self.seed, self.shuffle = batch_size, epochs, seed, shuffle
        self.comm = comm if comm is not None else SingleProcessComm()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_policy = checkpoint
        self.config = config or {}
        self.callbacks = list(callbacks)
        self._log = log if self.comm.rank == 0 else None
        self.steps_per_epoch = steps_per_epoch(len(train_data), batch_size)
        self.step = 0  # global optimizer steps done
        self.epoch = 0  # epochs completed
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None

    # -- one step ---------------------------------------------------------------------------

    def train_step(self, batch_indices: np.ndarray) -> float:
        """One optimizer step on a global batch; returns this rank's loss SUM over its shard."""
        local = shard(batch_indices, self.comm.rank, self.comm.size)
        x, y = self.train_data.x[local], self.train_data.y[local]
        z = self.model.forward(x, train=True)
        loss_sum, dz = self.loss.value_and_grad(z, y)
        self.model.backward(dz)
        grads = self.comm.allreduce_sum(self.model.grad_buffer)
        grads /= len(batch_indices)
        self.optimizer.step()
        return loss_sum

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, dataset: Dataset) -> dict[str, Any]:
        """Exact distributed evaluation of the model on ``dataset`` (collective)."""
        return evaluate(self.model, self.loss, dataset, self.comm)

    # -- the loop ---------------------------------------------------------------------------

    def broadcast_parameters(self) -> None:
        """Make every rank start from rank 0's parameters."""
        self.comm.broadcast(self.model.param_buffer, root=0)

    def fit(self) -> list[dict[str, Any]]:
        """Train for ``epochs`` epochs; returns one metrics dict per epoch (the same on every rank)."""
        self.broadcast_parameters()
        history = []
        n_train = len(self.train_data)
        while self.epoch < self.epochs:
            epoch = self.epoch
            order = epoch_order(n_train, self.seed, epoch, self.shuffle)
            local_loss = 0.0
            t0 = time.perf_counter()
            for k in range(self.step - epoch * self.steps_per_epoch, self.steps_per_epoch):
                local_loss += self.train_step(global_batch(order, k, self.batch_size))
                self.step += 1
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step, local_loss)
                # a step checkpoint at the end of an epoch waits for the epoch's metrics (below)
                if self._due(self.checkpoint_policy.every_steps, self.step) and k < self.steps_per_epoch - 1:
                    self.save_checkpoint()
            train_time = time.perf_counter() - t0
            self.epoch += 1
            totals = self.comm.allreduce_sum(np.array([local_loss], dtype=np.float64))
            metrics: dict[str, Any] = {"epoch": self.epoch, "step": self.step,
                                       "train_loss": float(totals[0]) / n_train,
                                       "samples_per_s": n_train / train_time if train_time > 0 else math.inf,
                                       "epoch_time_s": train_time}
            if self.val_data is not None:
                val = self.evaluate(self.val_data)
                metrics.update({f"val_{k}": v for k, v in val.items() if k != "n_samples"})
            self.last_metrics = metrics
            history.append(metrics)
            self._log_epoch(metrics)
            for cb in self.callbacks:
                cb.on_epoch_end(self, self.epoch, metrics)
            policy = self.checkpoint_policy
            if self._due(policy.every_epochs, self.epoch) or self._due(policy.every_steps, self.step):
                self.save_checkpoint()
        if not self._saved_at_this_step():
            self.save_checkpoint()
        return history

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
        if "val_loss" in m:
            parts.append(f"val_loss {m['val_loss']:.4f}")
        if "val_accuracy" in m:
            parts.append(f"val_accuracy {m['val_accuracy']:.4f}")
        if "val_rmse" in m:
            parts.append(f"val_rmse {m['val_rmse']:.4f}")
        parts.append(f"samples/s {m['samples_per_s']:,.0f}")
        self._log("  ".join(parts))

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes a checkpoint of the current step (other ranks only record the name)."""
        if self.out_dir is None:
            return None
        path = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        if self.comm.rank == 0:
            meta = {
                "dptrain_version": __version__,
                "epoch": self.epoch,
                "step_in_epoch": self.step - self.epoch * self.steps_per_epoch,
                "world_size": self.comm.size,
                "dtype": str(self.model.dtype),
                "config": self.config,
                "metrics": {k: v for k, v in self.last_metrics.items() if k in
                            ("train_loss", "val_loss", "val_accuracy", "val_rmse")},
                "params": {s.name: list(s.shape) for s in self.model.param_specs},
            }
            path = save_checkpoint(self.out_dir / "checkpoints", self.step, self.model.named_params(),
                                   self.optimizer.state_dict(), meta, self.checkpoint_policy.keep)
        self.last_checkpoint = path
        return path
