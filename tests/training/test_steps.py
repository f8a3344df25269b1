"""Runs measured in steps (train.steps), evaluation every K steps (eval.every_steps) on a fixed
subset (eval.batches): the same updates as epochs, exact reports, resume in the middle of an interval."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain import SGD, Callback, CheckpointPolicy, Dense, EarlyStopping, Sequential, SoftmaxCrossEntropy, Tanh, Trainer
from dptrain.cli import main
from dptrain.data import evaluation_rows, make_synthetic
from dptrain.storage.checkpoint import load_checkpoint

N, BATCH = 100, 16  # 7 steps per epoch, the last one of 4 samples


class StepLosses(Callback):
    """Each step's loss summed over the global batch, by step number."""

    def __init__(self):
        self.losses = {}

    def on_step_end(self, trainer, step, loss_sum):
        self.losses[step] = loss_sum


def _trainer(tmp_path=None, **kwargs):
    data = make_synthetic(N, 5, 3, seed=0).astype(np.float64)
    model = Sequential([Dense(8, init="xavier"), Tanh(), Dense(3, init="xavier")], 5, dtype=np.float64)
    model.init_params(np.random.default_rng(0))
    opt = SGD(model.param_buffer, model.grad_buffer, lr=0.1, momentum=0.9)
    kwargs.setdefault("checkpoint", CheckpointPolicy(every_steps=0, every_epochs=0, keep=100))
    return Trainer(model, SoftmaxCrossEntropy(), opt, data, data.subset(np.arange(30)), batch_size=BATCH,
                   out_dir=tmp_path, log=None, **kwargs)


def test_steps_equal_to_whole_epochs_give_the_epochs_updates():
    by_epochs, by_steps = _trainer(epochs=3), _trainer(steps=21)
    by_epochs.fit()
    by_steps.fit()
    np.testing.assert_array_equal(by_steps.model.param_buffer, by_epochs.model.param_buffer)
    assert by_steps.step == 21 and by_steps.epoch == 3


def test_reports_every_k_steps_across_epochs_with_exact_train_loss():
    trainer = _trainer(steps=17, eval_every_steps=5)
    recorder = StepLosses()
    trainer.callbacks.append(recorder)
    history = trainer.fit()
    assert [m["step"] for m in history] == [5, 10, 15, 17]
    assert trainer.step == 17 and trainer.epoch == 2  # stopped 3 steps into the third epoch
    # samples of steps 1-5, 6-10 (step 7 ends epoch 1 with 4 samples), 11-15 (step 14: 4 samples), 16-17
    samples = [5 * 16, 4 * 16 + 4, 3 * 16 + 4 + 16, 2 * 16]
    bounds = [0, 5, 10, 15, 17]
    for m, n, a, b in zip(history, samples, bounds, bounds[1:]):
        assert m["train_loss"] == pytest.approx(sum(recorder.losses[s] for s in range(a + 1, b + 1)) / n, rel=1e-12)
        assert "val_loss" in m and m["epoch"] == pytest.approx(m["step"] / 7, abs=1e-4)


def test_resume_inside_an_interval_ends_where_an_unbroken_run_ends(tmp_path):
    every_step = CheckpointPolicy(every_steps=1, every_epochs=0, keep=100)
    whole = _trainer(tmp_path / "whole", steps=17, eval_every_steps=5, checkpoint=every_step)
    whole_history = whole.fit()
    resumed = _trainer(tmp_path / "cut", steps=17, eval_every_steps=5)
    assert resumed.resume(load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-00000012"))  # 2 steps into one
    history = resumed.fit()
    np.testing.assert_array_equal(resumed.model.param_buffer, whole.model.param_buffer)
    assert [m["step"] for m in history] == [15, 17]
    assert [m["train_loss"] for m in history] == [m["train_loss"] for m in whole_history[2:]]


def test_extending_a_finished_run_reports_the_steps_since_its_last_report(tmp_path):
    first = _trainer(tmp_path, steps=12, eval_every_steps=5)  # its last report is at step 12, off the grid
    first.fit()
    longer = _trainer(tmp_path, steps=17, eval_every_steps=5)
    assert longer.resume(load_checkpoint(tmp_path / "checkpoints" / "latest"))
    recorder = StepLosses()
    longer.callbacks.append(recorder)
    history = longer.fit()
    assert [m["step"] for m in history] == [15, 17]
    assert history[0]["train_loss"] == pytest.approx(sum(recorder.losses[s] for s in (13, 14, 15)) / (16 + 4 + 16), rel=1e-12)


def test_evaluation_rows_are_a_fixed_seeded_subset():
    rows = evaluation_rows(1000, 48, seed=3)
    assert len(rows) == 48 and len(set(rows)) == 48 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, evaluation_rows(1000, 48, seed=3))
    assert not np.array_equal(rows, evaluation_rows(1000, 48, seed=4))
    np.testing.assert_array_equal(evaluation_rows(10, 48, seed=3), np.arange(10))


def test_cli_steps_eval_every_and_batches(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--quiet", "--set", "train.steps=30",
                                       "--set", "eval.every_steps=12", "--set", "eval.batches=2",
                                       "--set", "train.batch_size=32"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reports = [r for r in rows if r["kind"] == "epoch"]
    assert [r["step"] for r in reports] == [12, 24, 30]
    assert load_checkpoint(out / "checkpoints" / "latest").meta["step"] == 30


@pytest.mark.parametrize("key, value", [("train.steps", -1), ("eval.every_steps", -2), ("eval.batches", -1)])
def test_negative_counts_are_refused_naming_the_key(tmp_path, key, value):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x"), "--set", f"{key}={value}"])
    assert result.exit_code == 2 and key in result.output
    assert not (tmp_path / "x").exists()


def test_early_stopping_counts_evaluations_every_k_steps():
    lines = []
    trainer = _trainer(steps=200, eval_every_steps=3, early_stopping=EarlyStopping(2, "val_loss", min_delta=10.0))
    trainer._log = lines.append
    history = trainer.fit()
    assert [m["step"] for m in history] == [3, 6, 9] and trainer.stopped_early and trainer.step == 9
    assert lines[-1] == ("early stopping after step 9: val_loss has not improved for 2 evaluations "
                         f"(best {history[0]['val_loss']:.4f} at step 3)")
