"""A CNN on the digits as 1x8x8 images: synchronized BatchNorm, Dropout, Adam, a cosine schedule after a
warmup, gradient clipping and early stopping, with the Python API.

    python examples/train_cnn.py
    mpirun -n 2 python examples/train_cnn.py

``Sequential(layers, in_shape, dtype)`` takes the shape of one sample and checks that each layer can take
what the one before gives; the output Dense is yours to add. Each Dropout layer needs the run's seed and
a ``salt`` of its own, so that no two share a mask; its masks depend on the global sample index, not on
the rank, so the run is the same at any number of ranks.
"""

import numpy as np

from dptrain import (
    Adam,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    EarlyStopping,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
    Trainer,
    make_comm,
    make_schedule,
)
from dptrain.data import load_digits, split_train_val, steps_per_epoch

comm = make_comm()
data = load_digits()
train_idx, val_idx = split_train_val(len(data), val_fraction=0.2, seed=0)
train, val = data.subset(train_idx).astype(np.float32), data.subset(val_idx).astype(np.float32)

model = Sequential([
    Conv2D(16, kernel=3, padding=1, bias=False), BatchNorm(), ReLU(),  # BatchNorm supplies the bias
    MaxPool2D(2), Flatten(),                                           # (16, 8, 8) -> (16, 4, 4) -> (256,)
    Dense(64), ReLU(), Dropout(0.3, seed=0, salt=6),
    Dense(10, init="xavier"),
], in_shape=(1, 8, 8), dtype=np.float32)
model.init_params(np.random.default_rng(0))
optimizer = Adam(model.param_buffer, model.grad_buffer, lr=0.003)
epochs, batch_size = 15, 64
total = epochs * steps_per_epoch(len(train), batch_size)
schedule = make_schedule("cosine", 0.003, total_steps=total, warmup_steps=2 * total // epochs)
trainer = Trainer(model, SoftmaxCrossEntropy(), optimizer, train, val, batch_size=batch_size, epochs=epochs,
                  comm=comm, out_dir="runs/api-cnn", lr_schedule=schedule, clip_norm=5.0,
                  early_stopping=EarlyStopping(patience=3, metric="val_loss", min_delta=1e-4))
history = trainer.fit()  # ends early if val_loss stops improving
if comm.rank == 0:
    print(f"{len(history)} epochs, val_accuracy {history[-1]['val_accuracy']:.4f}")
