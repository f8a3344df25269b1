"""Optimizers over one flat parameter buffer, learning-rate schedules, and ZeRO-1 sharding of their
state. Never imports mpi4py, :mod:`dptrain.parallel` or :mod:`dptrain.nn`: an optimizer sees flat arrays."""

from .optimizers import OPTIMIZERS, SGD, Adam, AdamW, RMSprop, hyperparameter_names
from .schedules import SCHEDULES, Schedule, make_schedule, scaled_lr
from .zero import ShardedUpdate

__all__ = ["OPTIMIZERS", "SCHEDULES", "SGD", "Adam", "AdamW", "RMSprop", "Schedule", "ShardedUpdate",
           "hyperparameter_names", "make_schedule", "scaled_lr"]
