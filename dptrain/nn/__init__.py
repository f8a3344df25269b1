"""The NumPy engine: layers, losses and the Sequential model. Never imports mpi4py."""

from .attention import MultiHeadSelfAttention
from .conv import Conv1D, Conv2D, Flatten
from .dropout import Dropout
from .embedding import Embedding, PositionEmbedding
from .layers import ACTIVATIONS, GELU, BatchInfo, Dense, Layer, LeakyReLU, ReLU, Sigmoid, Tanh
from .losses import LOSSES, BCEWithLogits, Loss, MeanSquaredError, SoftmaxCrossEntropy
from .model import Sequential
from .norm import BatchNorm, BatchNorm1d, BatchNorm2d, LayerNorm
from .pooling import AvgPool1D, AvgPool2D, GlobalAvgPool, MaxPool1D, MaxPool2D
from .recurrent import GRU
from .residual import Residual

__all__ = [
    "ACTIVATIONS", "AvgPool2D", "BCEWithLogits", "BatchInfo", "BatchNorm", "BatchNorm1d", "BatchNorm2d",
    "Conv2D", "Dense", "Dropout", "Flatten", "GELU", "GlobalAvgPool", "LOSSES", "Layer", "LayerNorm", "LeakyReLU", "Loss",
    "MaxPool2D", "MeanSquaredError", "ReLU", "Residual", "Sequential", "Sigmoid", "SoftmaxCrossEntropy", "Tanh",
    "AvgPool1D", "Conv1D", "Embedding", "MaxPool1D", "PositionEmbedding",
    "GRU", "MultiHeadSelfAttention",
]
