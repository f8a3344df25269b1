"""dptrain: data-parallel neural-network training with hand-written NumPy backprop over MPI.

Python API (the CLI is a thin face over it)::

    from dptrain import Sequential, Dense, ReLU, SoftmaxCrossEntropy, SGD, Trainer, make_comm
    from dptrain.data import load_digits, split_train_val

Run a script that uses it alone, or with ``mpirun -n 4 python script.py``.
"""

__version__ = "0.1.0"

from .comm import make_comm  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .nn import (  # noqa: E402
    Dense,
    MeanSquaredError,
    ReLU,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
    Tanh,
)
from .optim import SGD  # noqa: E402
from .trainer import Callback, CheckpointPolicy, Trainer  # noqa: E402

__all__ = [
    "SGD", "Callback", "CheckpointPolicy", "Config", "Dense", "MeanSquaredError", "ReLU", "Sequential",
    "Sigmoid", "SoftmaxCrossEntropy", "Tanh", "Trainer", "load_config", "make_comm", "__version__",
]
