"""dptrain: data-parallel neural-network training with hand-written NumPy backprop over MPI.

Python API (the CLI is a thin face over it)::

    from dptrain import Sequential, Dense, ReLU, SoftmaxCrossEntropy, SGD, Trainer, make_comm
    from dptrain import Conv2D, BatchNorm, Dropout, Flatten, Adam, make_schedule, EarlyStopping
    from dptrain.data import load_digits, split_train_val

Run a script that uses it alone, or with ``mpirun -n 4 python script.py``.
"""

__version__ = "0.1.0"

from .comm import make_comm  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .early_stopping import EarlyStopping  # noqa: E402
from .nn import *  # noqa: E402,F401,F403  (every layer and loss)
from .nn import __all__ as _nn_names  # noqa: E402
from .optim import SGD, Adam, AdamW, RMSprop  # noqa: E402
from .progress import ProgressBar  # noqa: E402
from .schedules import make_schedule, scaled_lr  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .metrics import MetricsLogger  # noqa: E402
from .timeline import Timeline  # noqa: E402
from .trainer import Callback, CheckpointPolicy, Trainer  # noqa: E402

__all__ = [
    *_nn_names, "SGD", "Adam", "AdamW", "RMSprop", "Callback", "CheckpointPolicy", "Config", "EarlyStopping",
    "MetricsLogger", "ProgressBar", "Timeline", "Trainer", "evaluate", "load_config", "make_comm", "make_schedule", "scaled_lr", "__version__",
]
