"""Seeing a run: progress lines and bar, --quiet, metrics.jsonl/metrics.csv, summary.json, resume."""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import time

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain import SGD, CheckpointPolicy, Dense, MeanSquaredError, Sequential, SoftmaxCrossEntropy, Tanh, Trainer
from dptrain.cli import main
from dptrain.data import Dataset, make_synthetic
from dptrain.runtime.signals import StopOnSignal
from dptrain.training.callbacks.metrics import MetricsLogger, metric_columns, read_rows
from dptrain.training.callbacks.progress import ProgressBar
from dptrain.training.trainer import Callback

from helpers import dptrain, invoke, needs_mpiexec

# 186 training samples, global batch 23: 9 steps per epoch, the last one of 2 samples.
CONFIG = """
seed = 11
[data]
name = "synthetic"
n_samples = 233
n_features = 12
n_classes = 5
[model]
hidden = [16]
[train]
epochs = 3
batch_size = 23
dtype = "float64"
[checkpoint]
every_steps = 0
every_epochs = 1
keep = 100
[log]
every_steps = 4
"""
STEPS_PER_EPOCH = 9
CLASSIFICATION_COLUMNS = ["kind", "step", "epoch", "train_loss", "val_loss", "val_accuracy", "lr", "samples_per_s",
                          "data_ms", "forward_ms", "backward_ms", "exchange_ms", "optimizer_ms"]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG)
    return path


def read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


class Recorder(Callback):
    """The independent truth: every step's loss sum and every epoch's metrics, as the trainer reports them."""

    def __init__(self):
        self.steps, self.epochs = {}, []

    def on_step_end(self, trainer, step, loss_sum):
        self.steps[step] = loss_sum

    def on_epoch_end(self, trainer, epoch, metrics):
        self.epochs.append(dict(metrics))


def api_trainer(out_dir, callbacks, *, epochs=2, n=100, batch=16, regression=False, val=True, log=None, **options):
    """100 samples, batch 16: 7 steps per epoch, the last one of 4 samples."""
    if regression:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, 5))
        data = Dataset(x, x @ rng.normal(size=(5, 2)), None)
        loss, n_out = MeanSquaredError(), 2
    else:
        data, loss, n_out = make_synthetic(n, 5, 3, seed=0).astype(np.float64), SoftmaxCrossEntropy(), 3
    model = Sequential([Dense(8, init="xavier"), Tanh(), Dense(n_out, init="xavier")], 5, dtype=np.float64)
    model.init_params(np.random.default_rng(0))
    opt = SGD(model.param_buffer, model.grad_buffer, lr=0.1, momentum=0.9)
    return Trainer(model, loss, opt, data, data if val else None, batch_size=batch, epochs=epochs, out_dir=out_dir,
                   checkpoint=CheckpointPolicy(every_epochs=0), callbacks=callbacks, log=log, **options)


# -- metrics files --------------------------------------------------------------------------------

def test_metrics_files_hold_step_and_epoch_rows_with_the_same_columns(tmp_path, config_file):
    out = tmp_path / "run"
    result = invoke("train", "--config", str(config_file), "--out", str(out))
    assert result.exit_code == 0, result.output
    header, rows = read_csv(out / "metrics.csv")
    assert header == CLASSIFICATION_COLUMNS
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [list(r) for r in jsonl] == [CLASSIFICATION_COLUMNS] * len(jsonl)
    assert [(r["kind"], r["step"], r["epoch"]) for r in jsonl] == [
        ("step", 4, 1), ("step", 8, 1), ("epoch", 9, 1), ("step", 12, 2), ("step", 16, 2), ("epoch", 18, 2),
        ("step", 20, 3), ("step", 24, 3), ("epoch", 27, 3)]
    # the CSV holds the same values: empty where the JSON has null
    for c, j in zip(rows, jsonl):
        for key in CLASSIFICATION_COLUMNS:
            if j[key] is None:
                assert c[key] == ""
            elif isinstance(j[key], float):
                assert float(c[key]) == j[key]
            else:
                assert c[key] == str(j[key])
    for r in jsonl:
        assert r["lr"] == 0.05 and r["samples_per_s"] > 0
        assert all(r[f"{p}_ms"] >= 0 for p in ("forward", "backward", "exchange", "optimizer"))
        if r["kind"] == "step":
            assert r["val_loss"] is None and r["val_accuracy"] is None
        else:
            assert 0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0
    # the epoch rows repeat the epoch lines and the checkpoint's metrics
    meta = json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())
    assert jsonl[-1]["val_loss"] == meta["metrics"]["val_loss"]
    assert jsonl[-1]["train_loss"] == meta["metrics"]["train_loss"]
    assert f"train_loss {jsonl[-1]['train_loss']:.4f}  val_loss {jsonl[-1]['val_loss']:.4f}" in result.output


def test_step_rows_average_the_loss_over_their_samples(tmp_path):
    recorder = Recorder()
    logger = MetricsLogger(every_steps=3)
    trainer = api_trainer(tmp_path, [recorder, logger], epochs=2)  # 7 steps per epoch: 16 x 6 + 4
    trainer.fit()
    rows = read_rows(tmp_path)
    samples = {s: 4 if s % 7 == 0 else 16 for s in range(1, 15)}
    previous = 0
    for row in (r for r in rows if r["kind"] == "step"):
        steps = range(previous + 1, row["step"] + 1)
        expected = sum(recorder.steps[s] for s in steps) / sum(samples[s] for s in steps)
        assert row["train_loss"] == pytest.approx(expected, rel=1e-12)
        assert row["epoch"] == (row["step"] - 1) // 7 + 1
        previous = row["step"]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [3, 6, 9, 12]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["train_loss"] for r in epochs] == [m["train_loss"] for m in recorder.epochs]
    assert [r["val_loss"] for r in epochs] == [m["val_loss"] for m in recorder.epochs]
    assert [r["samples_per_s"] for r in epochs] == [m["samples_per_s"] for m in recorder.epochs]


def test_phase_columns_add_up_to_the_trainers_phase_seconds(tmp_path):
    logger = MetricsLogger(every_steps=7)  # step rows cover every step exactly once
    trainer = api_trainer(tmp_path, [logger], epochs=2)
    trainer.fit()
    step_rows = [r for r in read_rows(tmp_path) if r["kind"] == "step"]
    assert [r["step"] for r in step_rows] == [7, 14]
    for i, phase in enumerate(("data", "forward", "backward", "exchange", "optimizer")):
        total_ms = sum(r[f"{phase}_ms"] * 7 for r in step_rows)
        assert total_ms == pytest.approx(trainer.phase_seconds[i] * 1e3, rel=1e-9, abs=1e-9)
    epoch_rows = [r for r in read_rows(tmp_path) if r["kind"] == "epoch"]
    assert sum(r["forward_ms"] * 7 for r in epoch_rows) == pytest.approx(trainer.phase_seconds[1] * 1e3, rel=1e-9)
    assert sum(r["data_ms"] * 7 for r in epoch_rows) == pytest.approx(trainer.phase_seconds[0] * 1e3, rel=1e-9)
    assert all(r["data_ms"] > 0 for r in step_rows + epoch_rows)  # taking the batch is timed


def test_step_rows_and_epochs_exclude_checkpoint_time(tmp_path, monkeypatch):
    """A checkpoint (here one that takes 0.1 s) is not a step's time: neither the step rows'
    samples_per_s nor the epochs' time include it, also for the first row after an epoch's checkpoint."""
    from dptrain.training import trainer as trainer_module

    write = trainer_module.Trainer.save_checkpoint
    pause = 0.1

    def slow_save_checkpoint(self):
        time.sleep(pause)
        return write(self)

    monkeypatch.setattr(trainer_module.Trainer, "save_checkpoint", slow_save_checkpoint)
    recorder = Recorder()
    trainer = api_trainer(tmp_path, [recorder, MetricsLogger(every_steps=3)], epochs=3)  # 7 steps per epoch
    trainer.checkpoint_policy = CheckpointPolicy(every_steps=2, every_epochs=1, keep=100)
    trainer.fit()
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) >= 12  # the pauses happened
    step_rows = [r for r in read_rows(tmp_path) if r["kind"] == "step"]
    assert [r["step"] for r in step_rows] == [3, 6, 9, 12, 15, 18, 21]  # 9 and 15: the first rows after an epoch
    samples = {s: 4 if s % 7 == 0 else 16 for s in range(1, 22)}
    previous = 0
    for row in step_rows:
        seconds = sum(samples[s] for s in range(previous + 1, row["step"] + 1)) / row["samples_per_s"]
        assert seconds < pause, row
        previous = row["step"]
    for metrics in recorder.epochs:
        assert metrics["epoch_time_s"] < pause and metrics["samples_per_s"] == 100 / metrics["epoch_time_s"]
    assert trainer.totals.steps == 21 and trainer.totals.samples == 300 and trainer.totals.seconds < 3 * pause


def test_columns_follow_the_task(tmp_path):
    assert metric_columns("regression")[4:7] == ("val_loss", "val_rmse", "val_r2")
    assert metric_columns("multilabel")[4:6] == ("val_loss", "val_accuracy")
    recorder = Recorder()
    api_trainer(tmp_path / "reg", [recorder, MetricsLogger(every_steps=0)], regression=True).fit()
    header, rows = read_csv(tmp_path / "reg" / "metrics.csv")
    assert header == ["kind", "step", "epoch", "train_loss", "val_loss", "val_rmse", "val_r2", "lr", "samples_per_s",
                      "data_ms", "forward_ms", "backward_ms", "exchange_ms", "optimizer_ms"]
    assert [r["kind"] for r in rows] == ["epoch", "epoch"]  # every_steps = 0: epoch rows only
    for row, metrics in zip(read_rows(tmp_path / "reg"), recorder.epochs):
        assert row["val_rmse"] == metrics["val_rmse"]
        assert row["val_r2"] == metrics.get("val_r2")  # empty where the evaluation does not report it
    api_trainer(tmp_path / "noval", [MetricsLogger(every_steps=0)], val=False).fit()
    header, _ = read_csv(tmp_path / "noval" / "metrics.csv")
    assert not [c for c in header if c.startswith("val_")]


# -- summary ----------------------------------------------------------------------------------------

def test_summary_json_has_the_best_metric_final_metrics_and_the_run(tmp_path, config_file):
    out = tmp_path / "run"
    result = invoke("train", "--config", str(config_file), "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    epochs = [r for r in read_rows(out) if r["kind"] == "epoch"]
    best = min(epochs, key=lambda r: r["val_loss"])
    assert summary["best"] == {"metric": "val_loss", "value": best["val_loss"], "epoch": best["epoch"], "step": best["step"]}
    best_accuracy = max(epochs, key=lambda r: r["val_accuracy"])
    assert summary["best_by_metric"]["val_accuracy"]["value"] == best_accuracy["val_accuracy"]
    final = summary["final_metrics"]
    assert final["epoch"] == 3 and final["step"] == 27
    assert final["val_loss"] == epochs[-1]["val_loss"] and final["val_accuracy"] == epochs[-1]["val_accuracy"]
    assert summary["status"] == "finished" and not summary["preempted"] and not summary["stopped_early"]
    assert summary["steps"] == 27 and summary["epochs"] == 3 and summary["world_size"] == 1
    assert summary["resumed_from_step"] == 0
    assert summary["wall_time_s"] > 0 and summary["samples_per_s"] > 0
    assert summary["checkpoint"] == str(out / "checkpoints" / "step-00000027")
    # the final line sums it up
    done = result.output.strip().splitlines()[-1]
    assert done.startswith("done in ") and "27 steps" in done and "1 rank" in done
    assert f"best val_loss {best['val_loss']:.4f} at epoch {best['epoch']}" in done
    assert done.endswith(f"checkpoint {out / 'checkpoints' / 'step-00000027'}")


def test_summary_records_early_stopping_and_preemption(tmp_path):
    from dptrain import EarlyStopping

    early = EarlyStopping(patience=1, metric="val_accuracy", min_delta=10.0)
    trainer = api_trainer(tmp_path / "early", [MetricsLogger()], epochs=5, early_stopping=early)
    trainer.fit()
    summary = json.loads((tmp_path / "early" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["status"] == "stopped_early" and summary["epochs"] == 2
    rows = [r for r in read_rows(tmp_path / "early") if r["kind"] == "epoch"]
    # the best as early stopping counts it (no improvement by more than min_delta after epoch 1) ...
    assert summary["best"] == {"metric": "val_accuracy", "value": early.best, "epoch": early.best_epoch, "step": None}
    assert (early.best, early.best_epoch) == (rows[0]["val_accuracy"], 1)
    # ... while best_by_metric holds each metric's extreme (here higher in epoch 2)
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert rows[1]["val_accuracy"] > rows[0]["val_accuracy"]
    assert summary["best_by_metric"]["val_accuracy"] == {"value": best["val_accuracy"], "epoch": best["epoch"],
                                                         "step": best["step"]}

    stop = StopOnSignal()

    class SignalAtStep3(Callback):
        def on_step_end(self, trainer, step, loss_sum):
            if step == 3:
                stop.received = signal.SIGUSR1  # as the signal watcher does

    trainer = api_trainer(tmp_path / "stop", [SignalAtStep3(), MetricsLogger(every_steps=2)], epochs=5,
                          stop_on_signals=stop)
    trainer.fit()
    assert trainer.stopped and trainer.step == 4
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert summary["preempted"] and summary["status"] == "preempted" and summary["steps"] == 4
    assert summary["checkpoint"].endswith("step-00000004") and summary["best"] is None  # no epoch finished
    assert [r["step"] for r in read_rows(tmp_path / "stop")] == [2, 4]


def test_monitor_and_early_stopping_take_their_metrics_from_the_evaluation_table():
    from dptrain import EarlyStopping
    from dptrain.training.evaluation import LOWER_IS_BETTER, VALIDATION_KEYS, VALIDATION_METRICS

    assert set(VALIDATION_KEYS) == {k for keys in VALIDATION_METRICS.values() for k in keys} == set(LOWER_IS_BETTER)
    EarlyStopping(patience=1, metric="val_r2")  # every validation metric can be monitored
    with pytest.raises(ValueError, match="val_loss, val_accuracy, val_rmse, val_r2"):
        EarlyStopping(patience=1, metric="val_recall")
    with pytest.raises(ValueError, match="monitor must be one of"):
        MetricsLogger(monitor="val_recall")


def test_an_api_run_without_a_run_folder_writes_nothing_but_has_a_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = MetricsLogger()
    api_trainer(None, [logger]).fit()
    assert logger.summary["steps"] == 14 and logger.summary["checkpoint"] is None
    assert list(tmp_path.iterdir()) == []


# -- resume -----------------------------------------------------------------------------------------

def _values(rows):
    """The rows without their timings."""
    return [{k: v for k, v in r.items() if k != "samples_per_s" and not k.endswith("_ms")} for r in rows]


def test_resume_appends_and_drops_rows_after_the_resumed_step(tmp_path, config_file):
    out, direct = tmp_path / "run", tmp_path / "direct"
    args = ["--config", str(config_file), "--set", "checkpoint.every_steps=4"]
    assert invoke("train", "--out", str(direct), *args).exit_code == 0
    assert invoke("train", "--out", str(out), *args).exit_code == 0
    # as if the job had been killed after step 26: the checkpoints after step 20 never written
    for step in (24, 27):
        for path in (out / "checkpoints" / f"step-{step:08d}").iterdir():
            path.unlink()
        (out / "checkpoints" / f"step-{step:08d}").rmdir()
    result = invoke("train", "--out", str(out), "--resume", "auto", *args)
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "(step 20," in result.output
    rows = read_rows(out)
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in read_rows(direct)]
    assert _values(rows) == _values(read_rows(direct))  # exact resume: the same numbers, each row once
    header, csv_rows = read_csv(out / "metrics.csv")
    assert header == CLASSIFICATION_COLUMNS and [int(r["step"]) for r in csv_rows] == [r["step"] for r in rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 20 and summary["steps"] == 27
    assert summary["best"] == json.loads((direct / "summary.json").read_text())["best"]  # over the whole run


def test_overwrite_starts_the_metrics_files_afresh(tmp_path, config_file):
    out = tmp_path / "run"
    assert invoke("train", "--config", str(config_file), "--out", str(out)).exit_code == 0
    result = invoke("train", "--config", str(config_file), "--out", str(out), "--overwrite",
                    "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_rows(out)] == [4, 8, 9]


# -- progress on the console --------------------------------------------------------------------------

def test_plain_progress_lines_every_n_steps_off_a_terminal(tmp_path, config_file):
    result = invoke("train", "--config", str(config_file), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["4/27", "8/27", "12/27", "16/27", "20/27", "24/27"]
    assert step_lines[0].startswith("step 4/27  epoch 1  train_loss ")
    assert "samples/s " in step_lines[0] and step_lines[0].endswith("lr 0.05")
    rows = {r["step"]: r for r in read_rows(tmp_path / "run") if r["kind"] == "step"}
    assert f"train_loss {rows[4]['train_loss']:.4f}" in step_lines[0]  # the same mean as the metrics row
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/3", "2/3", "3/3"]
    # in order: the step lines of an epoch come before its epoch line
    assert lines.index(step_lines[1]) < lines.index(epoch_lines[0]) < lines.index(step_lines[2])

    result = invoke("train", "--config", str(config_file), "--out", str(tmp_path / "run0"),
                    "--set", "log.every_steps=0")
    assert not [line for line in result.output.splitlines() if line.startswith("step ")]
    assert result.output.count("epoch 3/3") == 1


def test_quiet_prints_only_the_summary_line(tmp_path, config_file):
    out = tmp_path / "run"
    result = invoke("train", "--config", str(config_file), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("done in ") and "checkpoint " in lines[0]
    assert (out / "metrics.csv").is_file() and (out / "summary.json").is_file()  # still written
    result = invoke("train", "--config", str(config_file), "--out", str(out), "--quiet", "--resume", "auto")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 0 and len(lines) == 1 and lines[0].startswith("done in ")
    # errors still get through
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "bad"), "--quiet", "--set", "optim.lr=-1"])
    assert result.exit_code == 2 and "optim.lr must be > 0" in result.output


def test_bad_log_every_steps_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--set", "log.every_steps=-1"])
    assert result.exit_code == 2 and "log.every_steps" in result.output
    assert not (tmp_path / "r").exists()


def test_progress_bar_on_a_terminal_shows_epoch_loss_and_samples_per_second(tmp_path):
    screen = io.StringIO()
    bar = ProgressBar(every_steps=2, tty=True, file=screen)
    trainer = api_trainer(tmp_path, [bar], epochs=2, log=bar.write)  # the epoch lines go above the bar
    trainer.fit()
    text = screen.getvalue()
    assert "epoch 1/2" in text and "14/14" in text and "samples/s" in text and "loss " in text
    assert "epoch 2/2  step 14  train_loss" in text  # an epoch line, printed above the bar
    assert "step 2/14" not in text  # no plain lines with a bar


def test_progress_bar_formats_its_postfix_only_to_draw_it(tmp_path, monkeypatch):
    from tqdm import tqdm

    screen = io.StringIO()
    bar = ProgressBar(tty=True, file=screen)
    postfixes = []
    set_postfix_str = tqdm.set_postfix_str

    def counted(self, s="", refresh=True):
        postfixes.append(s)
        return set_postfix_str(self, s, refresh)

    monkeypatch.setattr(tqdm, "set_postfix_str", counted)

    class NoRedraws(Callback):  # after the bar's on_train_begin: no redraw for an hour
        def on_train_begin(self, trainer):
            bar._bar.mininterval = 3600

    api_trainer(tmp_path, [bar, NoRedraws()], epochs=2, log=bar.write).fit()
    assert len(postfixes) == 2  # once per epoch: its totals, shown when the bar is closed
    assert postfixes[-1].startswith("loss ") and postfixes[-1].endswith(" samples/s")
    assert postfixes[-1] in screen.getvalue()


def test_progress_and_metrics_stay_off_other_ranks(tmp_path):
    class Rank1:
        rank, size = 1, 2

    bar, logger = ProgressBar(tty=True), MetricsLogger()

    class Fake:
        comm = Rank1()

    bar.on_train_begin(Fake())
    logger.on_train_begin(Fake())
    bar.on_step_end(Fake(), 1, 0.0)
    logger.on_step_end(Fake(), 1, 0.0)
    bar.on_train_end(Fake())
    logger.on_train_end(Fake())
    assert bar._bar is None and logger.summary is None and not list(tmp_path.iterdir())


# -- on 2 ranks -------------------------------------------------------------------------------------------

@needs_mpiexec
def test_two_ranks_write_the_same_metrics_once(tmp_path, config_file):
    one, two = tmp_path / "one", tmp_path / "two"
    assert invoke("train", "--config", str(config_file), "--out", str(one)).exit_code == 0
    result = dptrain("train", "--config", str(config_file), "--out", str(two), ranks=2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("step 4/27 ") == 1 and result.stdout.count("done in ") == 1  # rank 0 only
    rows_one, rows_two = read_rows(one), read_rows(two)
    assert [(r["kind"], r["step"]) for r in rows_two] == [(r["kind"], r["step"]) for r in rows_one]
    for a, b in zip(_values(rows_two), _values(rows_one)):
        for key, value in b.items():
            if isinstance(value, float):
                assert math.isclose(a[key], value, rel_tol=1e-9), key
            else:
                assert a[key] == value, key
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 27
    assert summary["best"]["epoch"] == json.loads((one / "summary.json").read_text())["best"]["epoch"]
    header, _ = read_csv(two / "metrics.csv")
    assert header == CLASSIFICATION_COLUMNS
