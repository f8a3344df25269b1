"""What a checkpoint and the resume broadcast carry besides the arrays: the position of a run.

Rank 0 reads it from a checkpoint's meta.json and broadcasts it as one float64 vector (every field
is an integer below 2**53 or a float, so the round trip is exact); every rank then continues from
the same step, epoch, loss so far and early-stopping count.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields
from typing import Any

import numpy as np


@dataclass
class TrainingState:
    """The position of a run after ``step`` optimizer steps (the arrays are saved beside it)."""

    step: int = 0  # global optimizer steps done (skipped ones included)
    epoch: int = 0  # epochs completed
    epoch_loss_sum: float = 0.0  # the loss summed over all ranks and the steps done since the last report
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient (on_nan = "skip")
    optimizer_steps: int = 0  # updates applied: Adam's bias correction counts these
    best: float = math.nan  # early stopping: the best value of its metric so far (NaN: none yet)
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    report_step: int = 0  # the step of the last report (epoch_loss_sum counts the steps since)

    _INTS = ("step", "epoch", "skipped_steps", "optimizer_steps", "best_epoch", "bad_epochs", "report_step")

    def to_array(self) -> np.ndarray:
        """The fields as a float64 vector of len(fields) values, for one broadcast."""
        return np.array(astuple(self), dtype=np.float64)

    @classmethod
    def from_array(cls, values: np.ndarray) -> TrainingState:
        state = cls(*(float(v) for v in values))
        for name in cls._INTS:
            setattr(state, name, int(getattr(state, name)))
        state.stopped_early = bool(state.stopped_early)
        return state

    @classmethod
    def size(cls) -> int:
        return len(fields(cls))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainingState:
        """From a checkpoint's meta.json (older checkpoints may lack the later keys)."""
        early = meta.get("early_stopping", {})
        best = early.get("best")
        return cls(step=int(meta["step"]), epoch=int(meta["epoch"]),
                   epoch_loss_sum=float(meta.get("epoch_loss_sum", 0.0)),
                   skipped_steps=int(meta.get("skipped_steps", 0)),
                   optimizer_steps=int(meta.get("optimizer_steps", meta["step"] - meta.get("skipped_steps", 0))),
                   best=math.nan if best is None else float(best), best_epoch=int(early.get("best_epoch", 0)),
                   bad_epochs=int(early.get("bad_epochs", 0)), stopped_early=bool(early.get("stopped", False)),
                   report_step=int(meta.get("report_step", meta["step"] - meta.get("step_in_epoch", 0))))

    def early_stopping_state(self) -> dict[str, Any]:
        """The part that :meth:`dptrain.training.EarlyStopping.load_state` takes."""
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped_early}


def checkpoint_meta(state: TrainingState, *, steps_per_epoch: int, lr: float, early_stopping: dict[str, Any],
                    world_size: int, dtype: str, config: dict[str, Any], metrics: dict[str, Any],
                    params: dict[str, tuple[int, ...]], version: str) -> dict[str, Any]:
    """meta.json of a checkpoint at ``state`` (the checkpoint writer adds step, format and checksums).
    Nothing in it decides the run but the position: the world size is recorded for the reader only."""
    return {
        "dptrain_version": version,
        "epoch": state.epoch,
        "step_in_epoch": state.step - state.epoch * steps_per_epoch,
        "epoch_loss_sum": state.epoch_loss_sum,
        "report_step": state.report_step,
        "skipped_steps": state.skipped_steps,
        "optimizer_steps": state.optimizer_steps,
        "lr": lr,
        "early_stopping": early_stopping,
        "world_size": world_size,
        "dtype": dtype,
        "config": config,
        "metrics": metrics,
        "params": {name: list(shape) for name, shape in params.items()},
    }


def broadcast_checkpoint(comm, checkpoint, model, optimizer, sharded=None) -> TrainingState | None:
    """Collective: rank 0 loads ``checkpoint`` (needed there only; None: start fresh) into the model
    and the optimizer and broadcasts the parameters, the layer buffers, the optimizer state and the
    position; every rank returns the same TrainingState (None when there was no checkpoint).
    ``sharded``: the ZeRO-1 update, which takes its block of the optimizer state."""
    header = np.zeros(1 + TrainingState.size(), dtype=np.float64)  # [present, *TrainingState]
    if comm.rank == 0 and checkpoint is not None:
        header[0], header[1:] = 1, TrainingState.from_meta(checkpoint.meta).to_array()
        model.load_params(checkpoint.model)
        optimizer.load_state_dict(checkpoint.optimizer)
    comm.broadcast(header)
    if header[0] == 0:
        return None
    comm.broadcast(model.param_buffer)
    comm.broadcast(model.state_buffer)
    optimizer_state = optimizer.state_dict()  # the full state: rank 0's holds the checkpoint's
    for array in optimizer_state.values():
        comm.broadcast(array)
    state = TrainingState.from_array(header[1:])
    optimizer.steps = state.optimizer_steps
    if sharded is not None:
        sharded.load_state(optimizer_state)
        sharded.optimizer.steps = state.optimizer_steps
    return state
