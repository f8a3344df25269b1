"""Each step's batch through the data hook with its epoch (augmentation), and data.prefetch: batches
prepared ahead by a thread give the same weights, resume exactly, end cleanly, and raise where they must."""

from __future__ import annotations

import json
import signal
import threading
import time

import numpy as np
import pytest

from dptrain import SGD, Callback, CheckpointPolicy, Dense, EarlyStopping, Sequential, SoftmaxCrossEntropy, Tanh, Trainer
from dptrain.data import make_synthetic
from dptrain.errors import UserError
from dptrain.runtime.signals import StopOnSignal
from dptrain.storage.checkpoint import load_checkpoint
from dptrain.training.batches import BatchLoader
from dptrain.training.callbacks.metrics import MetricsLogger, read_rows
from dptrain.training.callbacks.timeline import Timeline

from helpers import dptrain, load_arrays, needs_mpiexec

N, BATCH = 100, 16  # 7 steps per epoch, the last one of 4 samples
SPE = 7
THREAD = "dptrain-batches"


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


def loader_threads():
    return [t for t in threading.enumerate() if t.name == THREAD]


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


# --- prefetch gives the same weights --------------------------------------------------------------

@pytest.mark.parametrize("accumulate", [1, 3])
def test_prefetch_gives_bitwise_the_same_weights(accumulate):
    results = {}
    for prefetch in (0, 2, 5):
        augment = Recorded()
        t = trainer(dataset(augment), steps=17, accumulate=accumulate, prefetch=prefetch, eval_every_steps=5)
        history = t.fit()
        results[prefetch] = (t.model.param_buffer.copy(), t.optimizer.momentum_buffer.copy(),
                             [m["train_loss"] for m in history], [m["val_loss"] for m in history])
        assert t.batches.mismatches == 0 and not loader_threads()
        threads = {name for name, _, _ in augment.calls}
        assert threads == ({THREAD} if prefetch else {"MainThread"})  # the thread prepared every batch
    for prefetch in (2, 5):
        for got, expected in zip(results[prefetch], results[0]):
            np.testing.assert_array_equal(got, expected)


def test_the_thread_never_prepares_past_the_last_step():
    t = trainer(steps=10, prefetch=5)
    asked = []
    read = t.batches.read
    t.batches.read = lambda step, local: (asked.append(step), read(step, local))[1]
    t.fit()
    assert asked == list(range(10))
    assert t.step == 10 and not loader_threads()


def test_resume_mid_epoch_with_prefetch_is_bitwise_exact(tmp_path):
    every_step = CheckpointPolicy(every_steps=1, every_epochs=0, keep=100)
    whole = trainer(out_dir=tmp_path / "whole", checkpoint=every_step)
    whole.fit()
    for step in (4, 9):  # mid-epoch, in the first and in the second epoch
        resumed = trainer(out_dir=tmp_path / f"resumed-{step}", prefetch=3)
        assert resumed.resume(load_checkpoint(tmp_path / "whole" / "checkpoints" / f"step-{step:08d}"))
        asked = []
        read = resumed.batches.read
        resumed.batches.read = lambda s, local: (asked.append(s), read(s, local))[1]  # noqa: B023
        resumed.fit()
        assert asked == list(range(step, 3 * SPE))  # from the resumed step, not from the epoch's start
        np.testing.assert_array_equal(resumed.model.param_buffer, whole.model.param_buffer)
        np.testing.assert_array_equal(resumed.optimizer.momentum_buffer, whole.optimizer.momentum_buffer)
        assert resumed.batches.mismatches == 0


# --- the thread ends, and errors surface ----------------------------------------------------------

def test_an_error_in_the_thread_is_raised_at_its_step_unchanged():
    raised = []

    def unreadable_in_epoch_1(x, rows, epoch):
        if epoch == 1:
            error = UserError(f"data file images/{rows[0]}.png: cannot be read (truncated)")
            raised.append((threading.current_thread().name, error))
            raise error
        return x

    t = trainer(dataset(unreadable_in_epoch_1), prefetch=3)
    with pytest.raises(UserError, match="cannot be read") as caught:
        t.fit()
    assert [name for name, _ in raised] == [THREAD]
    assert caught.value is raised[0][1]  # the same exception, in the main thread
    assert t.step == SPE  # every step of epoch 0 done, none of epoch 1
    assert not loader_threads()


def test_an_error_in_the_plan_is_raised_at_its_step_too():
    t = trainer(prefetch=2)
    plan = t.batches.plan

    def failing(step):
        if step == 3:
            raise IndexError("no such step")
        return plan(step)

    t.batches.plan = failing
    with pytest.raises(IndexError, match="no such step"):
        t.fit()
    assert t.step == 3 and not loader_threads()


class StopAt(Callback):
    def __init__(self, step, signals):
        self.step, self.signals = step, signals

    def on_step_end(self, trainer, step, loss_sum):
        if step == self.step:
            self.signals.received = int(signal.SIGTERM)  # as a delivered SIGTERM leaves it


def test_a_stop_signal_ends_the_thread_and_drops_what_it_prepared(tmp_path):
    signals = StopOnSignal()
    t = trainer(out_dir=tmp_path, prefetch=4, stop_on_signals=signals, callbacks=[StopAt(3, signals)])
    t.fit()
    assert t.stopped and t.step == 4  # the step after the request carries it to every rank
    assert not loader_threads()


def test_early_stopping_ends_the_thread():
    t = trainer(epochs=6, prefetch=4, early_stopping=EarlyStopping(patience=1, metric="val_loss", min_delta=10.0))
    t.fit()
    assert t.stopped_early and t.step == 2 * SPE and not loader_threads()


def test_an_error_in_the_main_thread_ends_the_thread():
    class Boom(Callback):
        def on_step_end(self, trainer, step, loss_sum):
            if step == 2:
                raise RuntimeError("boom")

    t = trainer(prefetch=3, callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        t.fit()
    assert not loader_threads()


def test_a_request_the_thread_did_not_prepare_is_read_on_the_steps_path():
    data = dataset()
    loader = BatchLoader(data, SPE, prefetch=2, plan=lambda step: np.arange(step, step + 4))
    with loader.running(0, 5):
        x, y = loader.get(0, np.arange(0, 4))
        np.testing.assert_array_equal(x, data.take(np.arange(4), epoch=0)[0])
        other = np.array([9, 8, 7])
        x, y = loader.get(1, other)  # not what the plan says: read now, stop prefetching
        np.testing.assert_array_equal(x, data.take(other, epoch=0)[0])
        np.testing.assert_array_equal(y, data.take(other)[1])
        assert loader.mismatches == 1 and not loader.prefetching
        x, _ = loader.get(2 * SPE, np.arange(3))
        np.testing.assert_array_equal(x, data.take(np.arange(3), epoch=2)[0])
    assert not loader_threads()


def test_closing_a_thread_that_waits_for_room_does_not_hang():
    loader = BatchLoader(dataset(), SPE, prefetch=1, plan=lambda step: np.arange(4))
    loader.start(0, 1000)
    deadline = time.monotonic() + 5
    while loader._ahead._queue.qsize() < 1 and time.monotonic() < deadline:  # full: the thread waits in put
        time.sleep(0.001)
    start = time.monotonic()
    loader.close()
    assert time.monotonic() - start < 1 and not loader_threads()


def test_loader_arguments_are_checked():
    with pytest.raises(ValueError, match="prefetch"):
        BatchLoader(dataset(), SPE, prefetch=-1)
    with pytest.raises(ValueError, match="plan"):
        BatchLoader(dataset(), SPE, prefetch=2)
    with pytest.raises(ValueError, match="prefetch"):
        trainer(prefetch=-1)


# --- the data phase is seen -----------------------------------------------------------------------

def test_metrics_have_data_ms_and_the_timeline_data_spans_with_prefetch(tmp_path):
    t = trainer(out_dir=tmp_path, prefetch=2,
                callbacks=[MetricsLogger(every_steps=3), Timeline(tmp_path / "trace.json")])
    t.fit()
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("samples_per_s") + 1:] == ["data_ms", "forward_ms", "backward_ms", "exchange_ms",
                                                          "optimizer_ms"]
    assert all(row["data_ms"] >= 0 for row in read_rows(tmp_path))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    data = [e for e in events if e.get("name") == "data"]
    forward = {e["args"]["step"]: e for e in events if e.get("name") == "forward"}
    assert sorted(e["args"]["step"] for e in data) == list(range(1, 3 * SPE + 1))
    for e in data:  # the data span ends where the forward span starts
        assert e["ts"] + e["dur"] == pytest.approx(forward[e["args"]["step"]]["ts"], abs=1e-3)


# --- under MPI ------------------------------------------------------------------------------------

# float64 digits CNN, 2 epochs of global batches of 50 (1438 training samples: 29 steps per epoch)
CNN = ["--config", "digits_cnn", "--set", "train.dtype=\"float64\"", "--set", "train.epochs=2",
       "--set", "train.batch_size=50", "--set", "optim.warmup_epochs=1", "--set", "checkpoint.every_epochs=0"]


@needs_mpiexec
def test_two_ranks_with_prefetch_end_with_the_weights_of_one_rank_without(tmp_path):
    one = dptrain("train", *CNN, "--out", str(tmp_path / "one"), ranks=1)
    assert one.returncode == 0, one.stderr
    two = dptrain("train", *CNN, "--set", "data.prefetch=2", "--out", str(tmp_path / "two"), ranks=2)
    assert two.returncode == 0, two.stderr
    for name in ("model.npz", "optimizer.npz"):
        a = load_arrays(tmp_path / "one" / "checkpoints" / "latest" / name)
        b = load_arrays(tmp_path / "two" / "checkpoints" / "latest" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert np.abs(a[key] - b[key]).max() <= 1e-12 * max(1.0, np.abs(a[key]).max()), key
    meta = json.loads((tmp_path / "two" / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["data"]["prefetch"] == 2
