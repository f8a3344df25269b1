"""`log.tensorboard = true`: event files that TensorBoard's own reader reads, the same numbers as the
metrics files, one point per step across a resume (the interrupted run's extra points purged), and
only rank 0 writing."""

from __future__ import annotations

import shutil

import pytest

from dptrain.training.callbacks.metrics import read_rows

from helpers import dptrain, invoke, needs_mpiexec

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

RUN = ["--set", "log.tensorboard=true", "--set", "log.every_steps=10", "--set", "train.epochs=3",
       "--set", "checkpoint.every_epochs=1", "--quiet"]


def _scalars(folder):
    accumulator = event_accumulator.EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_the_scalars_are_those_of_the_metrics_files(tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--out", out, *RUN).exit_code == 0
    scalars = _scalars(out / "tensorboard")
    assert {"train/loss", "lr", "samples_per_s", "step_ms/forward", "step_ms/backward", "step_ms/exchange",
            "step_ms/optimizer", "epoch/train_loss", "val/loss", "val/accuracy"} <= set(scalars)
    assert [step for step, _ in scalars["train/loss"]] == list(range(10, 70, 10))
    epochs = [r for r in read_rows(out) if r["kind"] == "epoch"]
    assert [step for step, _ in scalars["val/loss"]] == [r["step"] for r in epochs]
    for (_, value), row in zip(scalars["val/accuracy"], epochs):
        assert value == pytest.approx(row["val_accuracy"], rel=1e-6)  # stored as float32


def test_a_resume_continues_the_same_curves_with_each_step_once(tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--out", out, *RUN).exit_code == 0
    before = _scalars(out / "tensorboard")
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    shutil.rmtree(last)  # as if the job died after its last points and before its last checkpoint
    result = invoke("train", "--out", out, "--resume", "auto", *RUN)
    assert result.exit_code == 0, result.output
    after = _scalars(out / "tensorboard")
    assert len(list((out / "tensorboard").iterdir())) == 2  # the same folder, a file per start
    for tag in ("train/loss", "val/loss", "epoch/train_loss"):
        steps = [step for step, _ in after[tag]]
        assert steps == sorted(set(steps)) == [step for step, _ in before[tag]], tag  # once each, going up
    assert after["val/loss"] == before["val/loss"]  # the resumed run is exact


@needs_mpiexec
def test_only_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    result = dptrain("train", "--out", str(out), *RUN, ranks=2)
    assert result.returncode == 0, result.stderr
    assert len(list((out / "tensorboard").iterdir())) == 1
    epoch_steps = [r["step"] for r in read_rows(out) if r["kind"] == "epoch"]
    assert [step for step, _ in _scalars(out / "tensorboard")["val/loss"]] == epoch_steps
