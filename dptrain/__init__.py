"""dptrain: data-parallel neural-network training with hand-written NumPy backprop over MPI.

Python API (the CLI is a thin face over it)::

    from dptrain import Sequential, Dense, ReLU, SoftmaxCrossEntropy, SGD, Trainer, make_comm
    from dptrain import Conv2D, BatchNorm, Dropout, Flatten, Adam, make_schedule, EarlyStopping
    from dptrain import Embedding, PositionEmbedding, Conv1D, MaxPool1D, AvgPool1D  # sequences
    from dptrain import MultiHeadSelfAttention, GRU  # attention and recurrence over sequences
    from dptrain import generate  # text from a character model
    from dptrain.data import load_digits, split_train_val

Run a script that uses it alone, or with ``mpirun -n 4 python script.py``.
"""

from ._version import __version__
from .app.sample import generate
from .config import Config, load_config
from .nn import *  # noqa: F401,F403  (every layer and loss)
from .nn import __all__ as _nn_names
from .optim import SGD, Adam, AdamW, RMSprop, make_schedule, scaled_lr
from .parallel.comm import make_comm
from .training import Callback, CheckpointPolicy, EarlyStopping, Trainer, evaluate
from .training.callbacks import MetricsLogger, MLflowLogger, ProgressBar, TensorBoardLogger, Timeline

__all__ = [
    *_nn_names, "SGD", "Adam", "AdamW", "RMSprop", "Callback", "CheckpointPolicy", "Config", "EarlyStopping",
    "MetricsLogger", "MLflowLogger", "generate", "ProgressBar", "TensorBoardLogger", "Timeline", "Trainer", "evaluate",
    "load_config", "make_comm", "make_schedule", "scaled_lr", "__version__",
]
