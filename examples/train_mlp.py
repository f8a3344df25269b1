"""Train an MLP on scikit-learn's digits with the Python API, alone or on N ranks.

    python examples/train_mlp.py
    mpirun -n 2 python examples/train_mlp.py

The same weights come out at any number of ranks (up to float rounding): every rank takes its share
of each global batch of 64 and the gradients are averaged over the whole batch.
"""

import numpy as np

from dptrain import SGD, Dense, ReLU, Sequential, SoftmaxCrossEntropy, Trainer, make_comm
from dptrain.data import load_digits, split_train_val

comm = make_comm()  # MPI under mpirun/mpiexec/srun, a single process otherwise
data = load_digits()
train_idx, val_idx = split_train_val(len(data), val_fraction=0.2, seed=0)
train, val = data.subset(train_idx).astype(np.float32), data.subset(val_idx).astype(np.float32)

model = Sequential([Dense(256), ReLU(), Dense(10, init="xavier")], in_shape=64)
model.init_params(np.random.default_rng(0))
optimizer = SGD(model.param_buffer, model.grad_buffer, lr=0.05, momentum=0.9)
trainer = Trainer(model, SoftmaxCrossEntropy(), optimizer, train, val,
                  batch_size=64, epochs=10, comm=comm, out_dir="runs/api")
history = trainer.fit()  # one metrics dict per epoch, the same on every rank
if comm.rank == 0:
    print(f"val_accuracy {history[-1]['val_accuracy']:.4f}")
