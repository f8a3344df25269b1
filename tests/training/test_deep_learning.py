"""CNNs, synchronized BatchNorm, Dropout, adaptive optimizers, schedules, clipping and early
stopping, end to end: the same weights at any world size, exact resume, and the config and CLI."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain import load_config
from dptrain.app.build import build_parts, build_schedule, build_trainer
from dptrain.cli import main
from dptrain.storage.checkpoint import load_checkpoint
from dptrain.training.early_stopping import EarlyStopping

from helpers import REPO, assert_arrays_close, dptrain, load_arrays, needs_mpiexec

CNN_CONFIG = str(REPO / "configs" / "digits_cnn.toml")
# float64, 2 epochs, a global batch of 50 (1438 training samples: 28 full steps and one of 38;
# 50 splits unevenly over 3 or 4 ranks), warmup over one epoch, a clip that is active.
CNN_EXACT = ["train.dtype=\"float64\"", "train.epochs=2", "train.batch_size=50", "optim.warmup_epochs=1",
             "optim.clip_norm=0.5", "checkpoint.every_epochs=0"]

# An MLP with the other pieces: BatchNorm1d, LayerNorm, GELU, LeakyReLU, Dropout, RMSprop with a
# step schedule and the linear scaling rule.
MLP_CONFIG = """
seed = 5
[data]
name = "synthetic"
n_samples = 265
n_features = 12
n_classes = 4
[model]
layers = [
  {type = "dense", units = 24, bias = false},
  {type = "batchnorm"},
  {type = "gelu"},
  {type = "dropout", rate = 0.2},
  {type = "dense", units = 16},
  {type = "layernorm"},
  {type = "leaky_relu", negative_slope = 0.1},
  {type = "dropout", rate = 0.1},
]
[train]
epochs = 3
batch_size = 23
dtype = "float64"
[optim]
name = "{optimizer}"
lr = 0.01
momentum = 0.5
weight_decay = 0.001
schedule = "step"
step_epochs = 1
gamma = 0.5
warmup_epochs = 0.5
lr_reference_batch = 16
clip_norm = 1.0
[checkpoint]
every_epochs = 0
"""


def _final(run_dir):
    ckpt = run_dir / "checkpoints" / "latest"
    return load_arrays(ckpt / "model.npz"), load_arrays(ckpt / "optimizer.npz")


@pytest.fixture(scope="module")
def cnn_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "run"
    sets = [a for s in CNN_EXACT for a in ("--set", s)]
    result = dptrain("train", "--config", CNN_CONFIG, *sets, "--out", str(out), "--comm", "single")
    assert result.returncode == 0, result.stderr
    return _final(out)


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_cnn_with_batchnorm_dropout_adam_cosine_clip_same_weights_at_any_world_size(ranks, cnn_single, tmp_path):
    sets = [a for s in CNN_EXACT for a in ("--set", s)]
    result = dptrain("train", "--config", CNN_CONFIG, *sets, "--out", str(tmp_path / "run"), ranks=ranks)
    assert result.returncode == 0, result.stderr
    model, optimizer = _final(tmp_path / "run")
    expected_model, expected_optimizer = cnn_single
    assert any(k.endswith("running_var") for k in model)  # BatchNorm's running statistics are compared too
    assert_arrays_close(model, expected_model, rtol=1e-9)
    assert_arrays_close(optimizer, expected_optimizer, rtol=1e-9)


@needs_mpiexec
def test_cnn_with_sharded_adam_state_and_clipping_same_weights_on_2_ranks(cnn_single, tmp_path):
    """ZeRO-1: each rank updates its block with its block of Adam's state; the clipping norm sums the
    blocks' squares over the ranks."""
    sets = [a for s in [*CNN_EXACT, "optim.shard=true"] for a in ("--set", s)]
    result = dptrain("train", "--config", CNN_CONFIG, *sets, "--out", str(tmp_path / "run"), ranks=2)
    assert result.returncode == 0, result.stderr
    model, optimizer = _final(tmp_path / "run")
    assert_arrays_close(model, cnn_single[0], rtol=1e-9)
    assert_arrays_close(optimizer, cnn_single[1], rtol=1e-9)


@needs_mpiexec
@pytest.mark.parametrize("optimizer", ["rmsprop", "adamw"])
def test_mlp_with_norms_and_dropout_same_weights_on_3_ranks(optimizer, tmp_path):
    config = tmp_path / "mlp.toml"
    config.write_text(MLP_CONFIG.replace("{optimizer}", optimizer))
    single = dptrain("train", "--config", str(config), "--out", str(tmp_path / "single"), "--comm", "single")
    assert single.returncode == 0, single.stderr
    multi = dptrain("train", "--config", str(config), "--out", str(tmp_path / "multi"), ranks=3)
    assert multi.returncode == 0, multi.stderr
    (m1, o1), (m3, o3) = _final(tmp_path / "single"), _final(tmp_path / "multi")
    assert_arrays_close(m3, m1, rtol=1e-9)
    assert_arrays_close(o3, o1, rtol=1e-9)


@needs_mpiexec
def test_digits_cnn_reaches_0985_on_2_ranks_in_under_60_s(tmp_path):
    t0 = time.perf_counter()
    result = dptrain("train", "--config", CNN_CONFIG, "--out", str(tmp_path / "run"), ranks=2)
    elapsed = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["metrics"]["val_accuracy"] >= 0.985, result.stdout
    assert elapsed < 60


# ---------------------------------------------------------------------------------------------
# In-process: resume, clipping, schedules, early stopping

def _parts_and_trainer(tmp_path, sets, out="run", **options):
    config = load_config(CNN_CONFIG, sets)
    parts = build_parts(config)
    trainer = build_trainer(config, parts.model, parts.loss, parts.optimizer, parts.train_set, parts.val_set,
                            None, out_dir=tmp_path / out, log=None, stop_on_signals=False, **options)
    return config, trainer


def test_resume_with_adam_batchnorm_dropout_and_schedule_is_bitwise_exact(tmp_path):
    sets = ["train.epochs=2", "train.batch_size=128", "checkpoint.every_steps=1", "checkpoint.keep=100",
            "optim.warmup_epochs=0.5"]
    _, full = _parts_and_trainer(tmp_path, sets, "full")
    full.fit()
    expected_model = {k: v.copy() for k, v in full.model.state_arrays().items()}
    expected_state = {k: v.copy() for k, v in full.optimizer.state_dict().items()}
    steps_per_epoch = full.steps_per_epoch
    for step in (1, steps_per_epoch - 1, steps_per_epoch, steps_per_epoch + 3):
        _, resumed = _parts_and_trainer(tmp_path, sets, f"resumed-{step}")
        assert resumed.resume(load_checkpoint(tmp_path / "full" / "checkpoints" / f"step-{step:08d}"))
        assert resumed.optimizer.steps == step
        resumed.fit()
        for name, value in resumed.model.state_arrays().items():
            assert np.array_equal(value, expected_model[name]), f"resume at step {step}: {name} differs"
        for name, value in resumed.optimizer.state_dict().items():
            assert np.array_equal(value, expected_state[name]), f"resume at step {step}: {name} differs"
        assert resumed.lr == full.lr


def test_clipping_scales_the_averaged_gradient_to_the_global_norm(tmp_path):
    sets = ["optim.name=\"sgd\"", "optim.momentum=0.0", "optim.lr=1.0", "optim.schedule=\"constant\"",
            "optim.warmup_epochs=0", "optim.clip_norm=0.001", "train.dtype=\"float64\"", "model.layers=[]"]
    _, trainer = _parts_and_trainer(tmp_path, sets)
    trainer.broadcast_parameters()
    before = trainer.model.param_buffer.copy()
    trainer.train_step(np.arange(64))
    moved = np.linalg.norm(trainer.model.param_buffer - before)
    assert trainer.last_grad_norm > 0.1  # so the clip was active
    assert moved == pytest.approx(0.001 * trainer.last_grad_norm / (trainer.last_grad_norm + 1e-6), rel=1e-9)


def test_schedule_warmup_then_cosine_and_the_linear_scaling_rule(tmp_path):
    sets = ["optim.lr=0.01", "optim.lr_reference_batch=32", "optim.warmup_epochs=1", "optim.min_lr=0.0001",
            "train.epochs=4"]
    config, trainer = _parts_and_trainer(tmp_path, sets)
    schedule = build_schedule(config, trainer.steps_per_epoch)
    peak = 0.01 * 64 / 32
    assert schedule(0) == pytest.approx(peak / trainer.steps_per_epoch)
    assert schedule(trainer.steps_per_epoch - 1) == pytest.approx(peak)
    assert schedule(4 * trainer.steps_per_epoch) == pytest.approx(0.0001)  # reached at the end of training
    assert 0.0001 < schedule(4 * trainer.steps_per_epoch - 1) < 0.00012
    history = trainer.fit()
    assert history[-1]["lr"] == pytest.approx(schedule(trainer.step - 1))
    lrs = [m["lr"] for m in history]
    assert lrs[1] > lrs[2] > lrs[3]


def test_early_stopping_rule():
    stop = EarlyStopping(patience=2, metric="val_accuracy", min_delta=0.01)
    decisions = [stop.update(e, {"val_accuracy": a}) for e, a in enumerate([0.5, 0.7, 0.705, 0.706], 1)]
    assert decisions == [False, False, False, True] and stop.best_epoch == 2 and stop.best == 0.7
    stop = EarlyStopping(patience=1, metric="val_loss")
    assert not stop.update(1, {"val_loss": 1.0}) and not stop.update(2, {"val_loss": 0.5})
    assert stop.update(3, {"val_loss": 0.5}) and stop.best_epoch == 2
    with pytest.raises(KeyError, match="val_rmse"):
        EarlyStopping(patience=1, metric="val_rmse").update(1, {"val_loss": 1.0})


@needs_mpiexec
def test_early_stopping_stops_every_rank_at_the_same_epoch_and_stays_stopped(tmp_path):
    out = str(tmp_path / "run")
    sets = ["--set", "early_stopping.patience=2", "--set", "early_stopping.min_delta=100", "--set", "train.epochs=20"]
    result = dptrain("train", "--config", CNN_CONFIG, *sets, "--out", out, ranks=2)
    assert result.returncode == 0, result.stderr
    assert "early stopping after epoch 3: val_loss has not improved for 2 epochs (best" in result.stdout
    assert "epoch  4/20" not in result.stdout
    meta = json.loads((tmp_path / "run" / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["epoch"] == 3 and meta["early_stopping"]["stopped"] is True
    again = dptrain("train", "--config", CNN_CONFIG, *sets, "--out", out, "--resume", "auto", ranks=2)
    assert again.returncode == 0, again.stderr
    assert "epoch  4/20" not in again.stdout
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest" / "meta.json").read_text())["step"] == meta["step"]


# ---------------------------------------------------------------------------------------------
# Multi-label targets with BCE

def test_bce_with_logits_trains_multilabel_targets(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6))
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] < -0.5], axis=1).astype(np.float64)
    np.savez(tmp_path / "ml.npz", x=x, y=y)
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--set", "data.name=npz",
                                       "--set", f"data.path={tmp_path / 'ml.npz'}", "--set", "train.loss=bce_with_logits",
                                       "--set", "train.epochs=40", "--set", "optim.lr=0.1"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "run" / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["metrics"]["val_accuracy"] > 0.9  # the share of the 3 labels predicted right


def test_bce_refuses_targets_outside_0_1(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((20, 3)), y=np.full((20, 2), 2.0))
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--set", "data.name=npz",
                                       "--set", f"data.path={tmp_path / 'bad.npz'}", "--set", "train.loss=bce_with_logits"])
    assert result.exit_code == 2
    assert "targets in [0, 1]" in result.output and "bad.npz" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Config and CLI

@pytest.mark.parametrize("sets, names", [
    (["model.layers=[{type = \"conv3d\"}]"], ["model.layers[0].type", "conv3d"]),
    (["model.layers=[{type = \"dense\", units = 4, filters = 3}]"], ["model.layers[0]", "'filters'"]),
    (["model.layers=[{type = \"dense\"}]"], ["model.layers[0]", "'units'"]),
    (["model.layers=[{type = \"dropout\", rate = 1.5}]"], ["model.layers[0]", "rate"]),
    (["model.layers=[{type = \"conv2d\", filters = 4, kernel = \"3\"}]"], ["model.layers[0].kernel"]),
    (["model.layers=[{type = \"conv2d\", filters = 4, kernel = 3}]"], ["model.layers[0]", "Conv2D"]),
    (["data.shape=[1, 8, 9]"], ["data.shape", "64 features"]),
    (["model.layers=[{type = \"batchnorm\"}]", "train.accumulate=2"], ["train.accumulate", "model.layers[0]"]),
    (["optim.warmup_epochs=30"], ["optim.warmup_epochs"]),
    (["early_stopping.patience=2", "early_stopping.metric=val_rmse"], ["early_stopping.metric"]),
    (["early_stopping.patience=2", "data.val_fraction=0"], ["early_stopping.patience", "val_fraction"]),
    (["optim.betas=[0.9]"], ["optim.betas"]),
    (["data.name=synthetic", "data.n_samples=201", "model.layers=[{type = \"batchnorm\"}]", "train.batch_size=32"],
     ["train.batch_size = 32", "global batch of 1 sample", "model.layers[0]"]),
])
def test_bad_model_and_optim_config_is_one_line_exit_2(tmp_path, sets, names):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for name in names:
        assert name in lines[0]
    assert not out.exists()


def test_model_summary_shows_layers_shapes_and_parameter_counts():
    result = CliRunner().invoke(main, ["model", "summary", "--config", CNN_CONFIG])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["input", "(1,", "8,", "8)"]
    assert "Conv2D(16, kernel=3, stride=1, padding=1, bias=False)  (16, 8, 8)" in result.output
    assert any(line.split()[-1] == "144" for line in lines if "Conv2D(16" in line)  # 16 x 1 x 3 x 3, no bias
    assert "MaxPool2D(2, stride=2)" in result.output and "(32, 4, 4)" in result.output
    assert lines[-2].split()[1:] == ["Dense(10,", "init=xavier)", "(10)", "650"]  # output layer: from the data
    total = sum(int(line.split()[-1].replace(",", "")) for line in lines[2:-1] if line.split()[-1][0].isdigit())
    assert lines[-1].startswith(f"total: {total:,} parameters")
    assert math.isclose(total, 144 + 32 + 4608 + 64 + 512 * 64 + 64 + 650)


def test_early_stopping_on_val_loss_goes_with_every_loss():
    for loss in ("mse", "cross_entropy", "bce_with_logits"):
        assert load_config(None, [f"train.loss={loss}", "early_stopping.patience=2"]).early_stopping.metric == "val_loss"
