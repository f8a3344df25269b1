"""The NumPy engine: layers, losses and the Sequential model. Never imports mpi4py."""

from .layers import ACTIVATIONS, BatchInfo, Dense, Layer, ReLU, Sigmoid, Tanh
from .losses import LOSSES, Loss, MeanSquaredError, SoftmaxCrossEntropy
from .model import Sequential

__all__ = [
    "ACTIVATIONS", "BatchInfo", "LOSSES", "Dense", "Layer", "Loss", "MeanSquaredError", "ReLU",
    "Sequential", "Sigmoid", "SoftmaxCrossEntropy", "Tanh",
]
