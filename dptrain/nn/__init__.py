"""The NumPy engine: layers, losses and the Sequential model. Never imports mpi4py."""

from .conv import AvgPool2D, Conv2D, Flatten, MaxPool2D
from .dropout import Dropout
from .layers import ACTIVATIONS, GELU, BatchInfo, Dense, Layer, LeakyReLU, ReLU, Sigmoid, Tanh
from .losses import LOSSES, BCEWithLogits, Loss, MeanSquaredError, SoftmaxCrossEntropy
from .model import Sequential
from .norm import BatchNorm, BatchNorm1d, BatchNorm2d, LayerNorm

__all__ = [
    "ACTIVATIONS", "AvgPool2D", "BCEWithLogits", "BatchInfo", "BatchNorm", "BatchNorm1d", "BatchNorm2d",
    "Conv2D", "Dense", "Dropout", "Flatten", "GELU", "LOSSES", "Layer", "LayerNorm", "LeakyReLU", "Loss",
    "MaxPool2D", "MeanSquaredError", "ReLU", "Sequential", "Sigmoid", "SoftmaxCrossEntropy", "Tanh",
]
