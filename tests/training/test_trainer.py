"""The training loop in one process: schedule of checkpoints, dtypes, regression, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain import SGD, CheckpointPolicy, Dense, MeanSquaredError, Sequential, SoftmaxCrossEntropy, Tanh, Trainer
from dptrain.cli import main
from dptrain.data import make_synthetic
from dptrain.storage.checkpoint import step_dirs

from helpers import load_arrays


def _trainer(tmp_path, policy, epochs=3, n=100, batch=16, dtype=np.float64):
    data = make_synthetic(n, 5, 3, seed=0).astype(dtype)
    model = Sequential([Dense(8, init="xavier"), Tanh(), Dense(3, init="xavier")], 5, dtype=dtype)
    model.init_params(np.random.default_rng(0))
    opt = SGD(model.param_buffer, model.grad_buffer, lr=0.1, momentum=0.9)
    return Trainer(model, SoftmaxCrossEntropy(), opt, data, data, batch_size=batch, epochs=epochs,
                   out_dir=tmp_path, checkpoint=policy, log=None)


@pytest.mark.parametrize("policy, steps", [
    (CheckpointPolicy(every_steps=0, every_epochs=0, keep=100), [21]),  # always at the end
    (CheckpointPolicy(every_steps=0, every_epochs=1, keep=100), [7, 14, 21]),
    (CheckpointPolicy(every_steps=5, every_epochs=0, keep=100), [5, 10, 15, 20, 21]),
    (CheckpointPolicy(every_steps=7, every_epochs=2, keep=100), [7, 14, 21]),
    (CheckpointPolicy(every_steps=5, every_epochs=1, keep=2), [20, 21]),
])
def test_checkpoint_schedule(tmp_path, policy, steps):
    trainer = _trainer(tmp_path, policy)  # 100 samples, batch 16 -> 7 steps per epoch
    trainer.fit()
    assert [int(p.name.split("-")[1]) for p in step_dirs(tmp_path / "checkpoints")] == steps
    meta = json.loads((tmp_path / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["step"] == 21 and meta["epoch"] == 3 and meta["world_size"] == 1
    assert set(meta["metrics"]) == {"train_loss", "val_loss", "val_accuracy"}


def test_training_reduces_the_loss_and_weights_land_in_the_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, CheckpointPolicy())
    history = trainer.fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    saved = load_arrays(tmp_path / "checkpoints" / "latest" / "model.npz")
    for name, value in trainer.model.named_params().items():
        np.testing.assert_array_equal(saved[name], value)
    momentum = load_arrays(tmp_path / "checkpoints" / "latest" / "optimizer.npz")["momentum_buffer"]
    np.testing.assert_array_equal(momentum, trainer.optimizer.momentum_buffer)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_dtype_for_the_whole_run(tmp_path, dtype):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path), "--set", "train.epochs=1",
                                       "--set", f"train.dtype={dtype}"])
    assert result.exit_code == 0, result.output
    arrays = load_arrays(tmp_path / "checkpoints" / "latest" / "model.npz")
    arrays.update(load_arrays(tmp_path / "checkpoints" / "latest" / "optimizer.npz"))
    assert {a.dtype for a in arrays.values()} == {np.dtype(dtype)}


def test_regression_from_npz_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4))
    y = np.stack([x @ [1.0, -2.0, 0.5, 0.0], np.sin(x[:, 0])], axis=1)
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    args = ["train", "--out", str(tmp_path / "run"), "--set", "data.name=npz", "--set",
            f"data.path={tmp_path / 'reg.npz'}", "--set", "train.loss=mse", "--set", "model.activation=tanh",
            "--set", "train.epochs=20", "--set", "optim.lr=0.02"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "val_rmse" in result.output
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "run"), "--json"])
    report = json.loads(result.output)
    assert report["n_samples"] == 60 and report["rmse"] < 0.5 * y.std()


def test_loss_must_fit_the_targets(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--set", "train.loss=mse"])
    assert result.exit_code == 2
    assert "train.loss = 'mse' needs float regression targets" in result.output


def test_mse_loss_is_mean_over_outputs_summed_over_samples():
    z, y = np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [1.0, 1.0]])
    loss, dz = MeanSquaredError().value_and_grad(z, y)
    assert loss == pytest.approx((1 + 4) / 2 + (1 + 1) / 2)
    np.testing.assert_allclose(dz, (z - y))  # 2 (z - y) / k with k = 2


def test_no_validation_split(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--set", "data.val_fraction=0",
                                       "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "epoch 1/1  step 29  train_loss" in result.output and "val_loss " not in result.output
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(out)])
    assert result.exit_code == 2 and "val_fraction = 0" in result.output
