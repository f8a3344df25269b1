"""Exact resume: interrupted at any step and resumed, a run ends with the uninterrupted weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain import CheckpointPolicy, Trainer, load_config
from dptrain.app.build import build_loss, build_model, build_optimizer, load_dataset, train_val_split
from dptrain.cli import main
from dptrain.storage.checkpoint import load_checkpoint, meta_checksum, step_dirs

from helpers import assert_arrays_close, dptrain, load_arrays, needs_mpiexec

# 186 training samples, global batch 23: 9 steps per epoch, the last one of 2 samples.
CONFIG = """
seed = 11
[data]
name = "synthetic"
n_samples = 233
n_features = 12
n_classes = 5
[model]
hidden = [24, 16]
[train]
epochs = 3
batch_size = 23
dtype = "{dtype}"
[optim]
lr = 0.05
momentum = 0.9
nesterov = true
weight_decay = 0.0001
[checkpoint]
every_steps = {every_steps}
every_epochs = 0
keep = 1000
"""


def _trainer(config, out_dir):
    dataset = load_dataset(config)
    train, val = train_val_split(config, dataset)
    model = build_model(config, dataset.n_features, dataset.n_outputs)
    c = config.checkpoint
    return Trainer(model, build_loss(config, dataset), build_optimizer(config, model), train, val,
                   batch_size=config.train.batch_size, epochs=config.train.epochs, seed=config.seed,
                   out_dir=out_dir, checkpoint=CheckpointPolicy(c.every_steps, c.every_epochs, c.keep),
                   config=config.to_dict(), log=None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_from_every_step_is_bitwise_exact(tmp_path, dtype):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(dtype=dtype, every_steps=1))
    config = load_config(str(path))
    full = _trainer(config, tmp_path / "full")
    full.fit()
    expected = load_arrays(tmp_path / "full" / "checkpoints" / "latest" / "model.npz")
    expected_momentum = full.optimizer.momentum_buffer.copy()
    steps = [int(p.name.split("-")[1]) for p in step_dirs(tmp_path / "full" / "checkpoints")]
    assert steps == list(range(1, 28))
    for step in (1, 4, 8, 9, 10, 17, 26):  # start, mid-epoch, last step of an epoch, one before the end
        resumed = _trainer(config, tmp_path / f"resumed-{step}")
        assert resumed.resume(load_checkpoint(tmp_path / "full" / "checkpoints" / f"step-{step:08d}"))
        assert resumed.step == step and resumed.epoch == step // 9
        history = resumed.fit()
        got = resumed.model.named_params()
        for name in expected:
            assert np.array_equal(got[name], expected[name]), f"resume at step {step}: {name} differs"
        assert np.array_equal(resumed.optimizer.momentum_buffer, expected_momentum)
        # the epoch's train loss counts the steps done before the interruption too
        assert history[-1]["train_loss"] == full.last_metrics["train_loss"]


def test_cli_resume_auto_continues_and_extends(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(dtype="float64", every_steps=0))
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--config", str(path), "--out", str(out), "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["train", "--config", str(path), "--out", str(out), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "train.epochs 2 -> 3" in result.output
    assert "epoch 1/3" not in result.output and "epoch 3/3" in result.output
    direct = tmp_path / "direct"
    assert runner.invoke(main, ["train", "--config", str(path), "--out", str(direct)]).exit_code == 0
    a, b = load_arrays(out / "checkpoints" / "latest" / "model.npz"), load_arrays(direct / "checkpoints" / "latest" / "model.npz")
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--resume", "auto",
                                       "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "starting fresh" in result.output


def test_resume_auto_skips_a_damaged_checkpoint(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(dtype="float64", every_steps=5))
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(main, ["train", "--config", str(path), "--out", str(out), "--set", "train.epochs=2"]).exit_code == 0
    newest = step_dirs(out / "checkpoints")[-1]
    data = (newest / "model.npz").read_bytes()
    (newest / "model.npz").write_bytes(data[: len(data) // 3])  # truncated
    result = runner.invoke(main, ["train", "--config", str(path), "--out", str(out), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert f"skipping damaged checkpoint {newest}" in result.output and "model.npz" in result.output
    assert "resuming from" in result.output and "step 15" in result.output
    direct = tmp_path / "direct"
    assert runner.invoke(main, ["train", "--config", str(path), "--out", str(direct)]).exit_code == 0
    a, b = load_arrays(out / "checkpoints" / "latest" / "model.npz"), load_arrays(direct / "checkpoints" / "latest" / "model.npz")
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_explicit_damaged_checkpoint_is_an_error_naming_the_file(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--out", str(out), "--set", "train.epochs=1"]).exit_code == 0
    meta = out / "checkpoints" / "latest" / "meta.json"
    edited = json.loads(meta.read_text())
    edited["files"]["optimizer.npz"] = "0" * 64
    edited["meta_sha256"] = meta_checksum(edited)  # meta.json itself consistent: the array file is named
    meta.write_text(json.dumps(edited))
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "new"), "--resume", str(out / "checkpoints" / "latest")])
    assert result.exit_code == 2
    assert "optimizer.npz" in result.output and "SHA-256" in result.output


@pytest.mark.parametrize("change, message", [
    ("model.hidden=[64]", "layers.0.weight shape (64, 128) vs (64, 64)"),
    ("model.hidden=[128, 32]", "2 layers with parameters vs 3"),
    ("train.dtype=float64", "dtype float32 vs float64"),
])
def test_checkpoint_that_does_not_fit_the_config_is_refused(tmp_path, change, message):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--out", str(out), "--set", "train.epochs=1"]).exit_code == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--resume", "auto", "--set", change,
                                       "--set", "train.epochs=1"])
    assert result.exit_code == 2
    assert "does not match the model" in result.output and message in result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_resume_and_overwrite_rules(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--resume", "auto"])
    assert result.exit_code == 2 and "--resume auto needs --out" in result.output
    result = runner.invoke(main, ["train", "--out", str(tmp_path), "--resume", "auto", "--overwrite"])
    assert result.exit_code == 2 and "contradict" in result.output


def test_a_crashed_save_leaves_temporaries_that_the_next_run_cleans(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--out", str(out), "--set", "train.epochs=1"]).exit_code == 0
    latest = (out / "checkpoints" / "latest").resolve()
    shutil.copytree(latest, out / "checkpoints" / ".tmp-step-00000099-123")  # as a SIGKILL mid-save leaves
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--resume", "auto", "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    assert f"resuming from {latest}" in result.output
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# --- under MPI ------------------------------------------------------------------------------

MPI_CONFIG = CONFIG.format(dtype="float64", every_steps=4)


@needs_mpiexec
def test_resume_at_the_same_world_size_is_bitwise_exact(tmp_path):
    (tmp_path / "c.toml").write_text(MPI_CONFIG)
    full = dptrain("train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "full"), ranks=2)
    assert full.returncode == 0, full.stderr
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000012", part / "checkpoints" / "step-00000012")
    resumed = dptrain("train", "--config", str(tmp_path / "c.toml"), "--out", str(part), "--resume", "auto", ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step 12, epoch 1" in resumed.stdout
    a = load_arrays(part / "checkpoints" / "latest" / "model.npz")
    b = load_arrays(tmp_path / "full" / "checkpoints" / "latest" / "model.npz")
    assert all(np.array_equal(a[k], b[k]) for k in b)


@needs_mpiexec
def test_elastic_restart_4_to_2_to_3_matches_the_single_process_run(tmp_path):
    """A checkpoint from 4 ranks resumes on 2, then on 3: the same global batches, the same weights."""
    config = tmp_path / "c.toml"
    config.write_text(MPI_CONFIG)
    single = dptrain("train", "--config", str(config), "--out", str(tmp_path / "single"), "--comm", "single")
    assert single.returncode == 0, single.stderr
    out = tmp_path / "elastic"
    for ranks, epochs in ((4, 1), (2, 2), (3, 3)):
        result = dptrain("train", "--config", str(config), "--out", str(out), "--resume", "auto",
                         "--set", f"train.epochs={epochs}", ranks=ranks)
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())["world_size"] == ranks
    # also a mid-epoch hand-over: the single-process checkpoint of step 4 resumed on 3 ranks
    mid = tmp_path / "mid"
    shutil.copytree(tmp_path / "single" / "checkpoints" / "step-00000004", mid / "checkpoints" / "step-00000004")
    result = dptrain("train", "--config", str(config), "--out", str(mid), "--resume", "auto", ranks=3)
    assert result.returncode == 0, result.stderr
    expected = load_arrays(tmp_path / "single" / "checkpoints" / "latest" / "model.npz")
    assert_arrays_close(load_arrays(out / "checkpoints" / "latest" / "model.npz"), expected, rtol=1e-9)
    assert_arrays_close(load_arrays(mid / "checkpoints" / "latest" / "model.npz"), expected, rtol=1e-9)


@pytest.mark.parametrize("resume", ["auto", "path"])
def test_resuming_with_another_optimizer_is_refused_naming_it(tmp_path, resume):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--out", str(out), "--set", "train.epochs=1"]).exit_code == 0
    where = ["--out", str(out), "--resume", "auto"] if resume == "auto" else \
        ["--out", str(tmp_path / "new"), "--resume", str(out / "checkpoints" / "latest")]
    result = CliRunner().invoke(main, ["train", *where, "--set", "optim.name=adam", "--set", "train.epochs=2"])
    assert result.exit_code == 2, result.output
    assert "optimizer" in result.output and "momentum_buffer" in result.output and "exp_avg" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "new").exists()
