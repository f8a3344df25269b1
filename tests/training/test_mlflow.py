"""`log.mlflow = true`: the resolved config as params, the metrics of the metrics files, the final
checkpoint as an artifact, and one MLflow run across a resume with each step once."""

from __future__ import annotations

import shutil

import pytest

from dptrain.training.callbacks.metrics import read_rows

from helpers import invoke

mlflow_tracking = pytest.importorskip("mlflow.tracking")

RUN = ["--set", "log.mlflow=true", "--set", "log.every_steps=10", "--set", "train.epochs=3",
       "--set", "checkpoint.every_epochs=1", "--quiet"]


def _client(store):
    return mlflow_tracking.MlflowClient(store.resolve().as_uri())


def _history(client, run_id):
    metrics = client.get_run(run_id).data.metrics
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in metrics}


def test_params_metrics_and_the_final_checkpoint_are_logged_in_the_run_folder(tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--out", out, *RUN).exit_code == 0
    run_id = (out / "mlflow_run_id").read_text().strip()
    client = _client(out / "mlruns")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["train.epochs"] == "3"
    history = _history(client, run_id)
    assert [step for step, _ in history["train_loss"]] == list(range(10, 70, 10))
    epochs = [r for r in read_rows(out) if r["kind"] == "epoch"]
    assert history["val_loss"] == [(r["step"], pytest.approx(r["val_loss"])) for r in epochs]
    artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
    assert "checkpoint/model.npz" in artifacts and "checkpoint/meta.json" in artifacts


def test_a_resume_logs_into_the_same_run_with_each_step_once(tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--out", out, *RUN).exit_code == 0
    run_id = (out / "mlflow_run_id").read_text().strip()
    before = _history(_client(out / "mlruns"), run_id)
    shutil.rmtree(sorted((out / "checkpoints").glob("step-*"))[-1])  # died after its last points, before its checkpoint
    assert invoke("train", "--out", out, "--resume", "auto", *RUN).exit_code == 0
    assert (out / "mlflow_run_id").read_text().strip() == run_id
    after = _history(_client(out / "mlruns"), run_id)
    for key in ("train_loss", "val_loss", "epoch_train_loss", "lr"):
        steps = [step for step, _ in after[key]]
        assert steps == sorted(set(steps)) == [step for step, _ in before[key]], key
    assert after["val_loss"] == before["val_loss"]


def test_mlflow_tracking_uri_is_honoured(tmp_path):
    store = tmp_path / "elsewhere"
    result = invoke("train", "--out", tmp_path / "run", *RUN,
                    env={"MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"})
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "mlruns").exists()
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    assert _history(_client(store), run_id)["val_loss"]
