"""A layer of your own, inside a residual block: a learned per-channel scale on the block's body
(LayerScale, as in CaiT and ConvNeXt), in a small ResNet on the digits, alone or on N ranks.

    python examples/custom_layer.py
    mpirun -n 2 python examples/custom_layer.py

A layer says which parameters it needs for a sample shape (``param_shapes``), fills them
(``init_params``), and implements ``forward(x, train)`` and ``backward(dy)``: backward writes the
gradient of the loss SUM over this rank's samples into ``self.grads`` (the trainer adds the ranks'
sums and divides by the global batch) and returns dx. Its parameters are views of the model's flat
buffers, named by their path (here ``layers.3.body.5.gamma``), so they are exchanged, updated,
checkpointed and resumed like every other parameter.
"""

import numpy as np

from dptrain import (
    Adam,
    BatchNorm,
    Conv2D,
    Dense,
    GlobalAvgPool,
    Layer,
    ReLU,
    Residual,
    Sequential,
    SoftmaxCrossEntropy,
    Trainer,
    make_comm,
)
from dptrain.data import load_digits, split_train_val


class LayerScale(Layer):
    """y = x * gamma per channel. x : (batch, C, H, W); gamma : (C,), starting at ``init``."""

    def __init__(self, init: float = 0.1) -> None:
        super().__init__()
        self.init = init

    def param_shapes(self, in_shape):
        return {"gamma": (in_shape[0],)}

    def init_params(self, rng):
        self.params["gamma"][...] = self.init

    def forward(self, x, train=True):
        self._x = x
        return x * self.params["gamma"][:, None, None]

    def backward(self, dy):
        self.grads["gamma"][...] = np.sum(dy * self._x, axis=(0, 2, 3))  # summed over this rank's samples
        return dy * self.params["gamma"][:, None, None]


comm = make_comm()
data = load_digits()
train_idx, val_idx = split_train_val(len(data), val_fraction=0.2, seed=0)
train, val = data.subset(train_idx).astype(np.float32), data.subset(val_idx).astype(np.float32)

model = Sequential([
    Conv2D(16, kernel=3, padding=1, bias=False), BatchNorm(), ReLU(),
    Residual([Conv2D(16, kernel=3, padding=1, bias=False), BatchNorm(), ReLU(),
              Conv2D(16, kernel=3, padding=1, bias=False), BatchNorm(), LayerScale()]),
    ReLU(), GlobalAvgPool(), Dense(10, init="xavier"),
], in_shape=(1, 8, 8), dtype=np.float32)
model.init_params(np.random.default_rng(0))
optimizer = Adam(model.param_buffer, model.grad_buffer, lr=0.003)
trainer = Trainer(model, SoftmaxCrossEntropy(), optimizer, train, val, batch_size=64, epochs=10, comm=comm, log=None)
history = trainer.fit()
if comm.rank == 0:
    gamma = model.named_params()["layers.3.body.5.gamma"]
    print(f"gamma mean {gamma.mean():.3f}; val_accuracy {history[-1]['val_accuracy']:.4f}")
