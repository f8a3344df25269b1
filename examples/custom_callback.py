"""A callback of your own: after each epoch, rank 0 prints where the step time went (taking the batch,
forward, backward, gradient exchange, optimizer) and how long evaluation took, from the trainer's public
attributes.

    python examples/custom_callback.py
    mpirun -n 2 python examples/custom_callback.py

A callback's hooks run on every rank at the same point of the loop (a collective in a hook is allowed);
it reads the trainer (``step``, ``epoch``, ``lr``, ``totals``, ``phase_seconds``, ``last_step_times``)
and never sets it. ``phase_seconds`` and ``totals`` only grow: keep a copy as a mark and subtract.
"""

import numpy as np

from dptrain import SGD, Callback, Dense, ReLU, Sequential, SoftmaxCrossEntropy, Trainer, make_comm
from dptrain.data import load_digits, split_train_val
from dptrain.training import PHASES


class StepTimeReport(Callback):
    """Per epoch: mean milliseconds per step of each phase, and the evaluation's time."""

    def on_train_begin(self, trainer):
        self.phase_mark, self.steps_mark, self.evaluation_s = trainer.phase_seconds.copy(), trainer.totals.steps, 0.0

    def on_span(self, trainer, kind, step, start, end):
        if kind == "evaluation":
            self.evaluation_s = end - start

    def on_epoch_end(self, trainer, epoch, metrics):
        steps = trainer.totals.steps - self.steps_mark
        per_step_ms = (trainer.phase_seconds - self.phase_mark) * 1e3 / steps
        if trainer.comm.rank == 0:
            split = ", ".join(f"{name} {ms:.2f}" for name, ms in zip(PHASES, per_step_ms))
            print(f"epoch {epoch}: {steps} steps, ms per step: {split}; evaluation {self.evaluation_s * 1e3:.1f} ms; "
                  f"lr {trainer.lr:g}, val_accuracy {metrics['val_accuracy']:.4f}")
        self.phase_mark, self.steps_mark = trainer.phase_seconds.copy(), trainer.totals.steps


comm = make_comm()
data = load_digits()
train_idx, val_idx = split_train_val(len(data), val_fraction=0.2, seed=0)
train, val = data.subset(train_idx).astype(np.float32), data.subset(val_idx).astype(np.float32)

model = Sequential([Dense(128), ReLU(), Dense(10, init="xavier")], in_shape=64)
model.init_params(np.random.default_rng(0))
optimizer = SGD(model.param_buffer, model.grad_buffer, lr=0.05, momentum=0.9)
trainer = Trainer(model, SoftmaxCrossEntropy(), optimizer, train, val, batch_size=64, epochs=5, comm=comm,
                  callbacks=[StepTimeReport()], log=None)  # log=None: only the callback prints
trainer.fit()
