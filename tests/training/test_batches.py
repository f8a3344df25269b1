"""Each step's batch through the data hook with its epoch (augmentation)."""

from __future__ import annotations

import threading

import numpy as np

from dptrain import SGD, CheckpointPolicy, Dense, Sequential, SoftmaxCrossEntropy, Tanh, Trainer
from dptrain.data import make_synthetic

N, BATCH = 100, 16  # 7 steps per epoch, the last one of 4 samples
SPE = 7


def flip_odd(x, rows, epoch):
    """A pure augmentation: reverse the features of the samples whose (row + epoch) is odd."""
    odd = (rows + epoch) % 2 == 1
    return np.where(odd[:, None, None, None], x[..., ::-1], x)


def dataset(augment=flip_odd):
    data = make_synthetic(N, 6, 3, seed=0).astype(np.float64)
    data.sample_shape = (1, 2, 3)
    data.augment = augment
    return data


def trainer(data=None, out_dir=None, **kwargs):
    data = dataset() if data is None else data
    model = Sequential([Dense(8, init="xavier"), Tanh(), Dense(3, init="xavier")], 6, dtype=np.float64)
    model.init_params(np.random.default_rng(0))
    opt = SGD(model.param_buffer, model.grad_buffer, lr=0.1, momentum=0.9)
    kwargs.setdefault("epochs", 3)
    kwargs.setdefault("checkpoint", CheckpointPolicy(every_steps=0, every_epochs=0, keep=100))
    return Trainer(model, SoftmaxCrossEntropy(), opt, data, data.subset(np.arange(30)), batch_size=BATCH,
                   out_dir=out_dir, log=None, **kwargs)


class Recorded:
    """An augmentation that records (thread, epoch, rows) of each call, then applies flip_odd."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, rows, epoch):
        self.calls.append((threading.current_thread().name, epoch, rows.copy()))
        return flip_odd(x, rows, epoch)


# --- the epoch reaches the augmentation ---------------------------------------------------------

def test_each_step_augments_its_rows_as_in_its_epoch_and_evaluation_never():
    augment = Recorded()
    t = trainer(dataset(augment), steps=17)  # crosses two epoch boundaries
    t.fit()
    assert len(augment.calls) == 17  # one call per step (and none by the three evaluations)
    for step, (_, epoch, rows) in enumerate(augment.calls):
        assert epoch == step // SPE
        np.testing.assert_array_equal(rows, t.batch_indices(step))  # the data's rows are its file's


def test_with_accumulation_the_local_batch_is_taken_once_and_split():
    augment = Recorded()
    t = trainer(dataset(augment), epochs=1, accumulate=3)
    t.fit()
    assert [len(rows) for _, _, rows in augment.calls] == [16] * 6 + [4]


def test_augmentation_changes_the_weights_and_evaluation_is_not_augmented():
    plain, augmented = trainer(dataset(None)), trainer(dataset())
    plain.fit()
    augmented.fit()
    assert not np.array_equal(plain.model.param_buffer, augmented.model.param_buffer)
    # evaluation reads the rows as they are: the same metrics as on the same rows without an augment
    assert augmented.val_data.augment is flip_odd
    assert augmented.evaluate(augmented.val_data) == augmented.evaluate(dataset(None).subset(np.arange(30)))


def test_the_epoch_matters():
    """flip_odd depends on the epoch: with the epoch left out (always 0), the weights differ."""
    t, frozen = trainer(), trainer(dataset(lambda x, rows, epoch: flip_odd(x, rows, 0)))
    t.fit()
    frozen.fit()
    assert not np.array_equal(t.model.param_buffer, frozen.model.param_buffer)
