"""Training: the step (:mod:`.step`, read it first), the loop and callback dispatch (:mod:`.trainer`),
the checks between exchange and update (:mod:`.guards`), what a checkpoint carries (:mod:`.state`),
exact distributed evaluation, early stopping, and the callbacks that watch a run."""

from .callback import Callback
from .checkpoint_policy import CheckpointPolicy
from .early_stopping import EarlyStopping
from .evaluation import evaluate
from .step import PHASES, TrainingStep
from .totals import RunningTotals
from .trainer import Trainer

__all__ = ["PHASES", "Callback", "CheckpointPolicy", "EarlyStopping", "RunningTotals", "Trainer", "TrainingStep",
           "evaluate"]
