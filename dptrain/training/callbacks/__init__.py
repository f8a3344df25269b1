"""Callbacks that watch a run: the progress bar, the metrics files, TensorBoard, MLflow and the Chrome-trace
timeline."""

from dptrain.training.callback import Callback

from .metrics import MetricsLogger
from .mlflow_logger import MLflowLogger
from .progress import ProgressBar
from .tensorboard import TensorBoardLogger
from .timeline import Timeline

__all__ = ["Callback", "MLflowLogger", "MetricsLogger", "ProgressBar", "TensorBoardLogger", "Timeline"]
