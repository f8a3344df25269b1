"""MLflow tracking of a run, from rank 0 (``log.mlflow = true``).

:class:`MLflowLogger` is a :class:`~dptrain.training.Callback` using the MLflow client (the ``mlflow``
extra, mlflow-skinny). It logs to ``MLFLOW_TRACKING_URI``, or by default to a local file store in the
run folder (``<out>/mlruns``; ``mlflow ui --backend-store-uri <out>/mlruns`` shows it), in the
experiment ``MLFLOW_EXPERIMENT_NAME`` (default "dptrain"):

* params: the resolved config, flattened (``optim.lr``, ``model.layers``, ...), at the run's start;
* metrics, by global optimizer step: ``train_loss``, ``lr``, ``samples_per_s`` and the step split
  every ``every_steps`` steps, the validation metrics and ``epoch_train_loss`` at each evaluation;
* the final checkpoint as an artifact (``checkpoint/``) when the run ends.

One run across resumes and requeues: its id is kept in ``<out>/mlflow_run_id`` and a resumed run
logs into it. Points are sent as they come (a batch per report); a resumed run does not send again
the steps the interrupted one had sent after its last checkpoint (their values are the same: a
resume is exact), so each step appears once and the steps only go up.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dptrain.errors import UserError
from dptrain.storage.atomic import write_atomically
from dptrain.training.callback import Callback

from .metrics import Window

if TYPE_CHECKING:
    from dptrain.training.trainer import Trainer

RUN_ID_FILE = "mlflow_run_id"
PARAM_LENGTH = 6000  # MLflow's limit on a param value


def check_available() -> None:
    """UserError (exit 2, before anything is written) if the MLflow client is not installed."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError('log.mlflow = true needs MLflow: pip install "dptrain[mlflow]"') from None


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """{"optim.lr": "0.05", ...}: the config tree as MLflow params (lists and tables as JSON)."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[f"{prefix}{key}"] = text[:PARAM_LENGTH]
    return params


class MLflowLogger(Callback):
    """Log params, metrics and the final checkpoint to MLflow on rank 0 (see the module docstring).

    every_steps : a point of the step metrics every N optimizer steps; 0: only at evaluations.
    """

    def __init__(self, every_steps: int = 50) -> None:
        if every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {every_steps}")
        self.every_steps = every_steps
        self.run_id: str | None = None
        self._client = None
        self._pending: list = []  # metric points of the current report, not sent yet
        self._sent_up_to: dict[str, int] = {}  # a resumed run: the last step the run already has, per metric
        self._window = Window()

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.comm.rank != 0 or trainer.out_dir is None:
            return
        check_available()
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the default: a local file store in the run folder (maintained by MLflow, not developed)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (trainer.out_dir / "mlruns").resolve().as_uri()
        self._client = MlflowClient(uri)
        id_file = trainer.out_dir / RUN_ID_FILE
        if id_file.is_file():  # a resumed or requeued run: the same MLflow run
            self.run_id = id_file.read_text().strip()
            self._client.update_run(self.run_id, status="RUNNING")
            for key in self._client.get_run(self.run_id).data.metrics:
                self._sent_up_to[key] = max(m.step for m in self._client.get_metric_history(self.run_id, key))
        else:
            self.run_id = self._new_run(trainer)
            write_atomically(id_file, lambda fh: fh.write(self.run_id + "\n"), mode="w")
        self._window.reset(trainer)

    def _new_run(self, trainer: Trainer) -> str:
        from mlflow.entities import Param

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dptrain")
        experiment = self._client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
        run = self._client.create_run(experiment_id, run_name=trainer.out_dir.name,
                                      tags={"dptrain.run_folder": str(trainer.out_dir.resolve())})
        params = [Param(k, v) for k, v in flat_params(trainer.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def _point(self, key: str, value: Any, step: int) -> None:
        from mlflow.entities import Metric

        if value is not None and step > self._sent_up_to.get(key, -1):
            self._pending.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    def _send(self) -> None:
        for i in range(0, len(self._pending), 1000):  # MLflow takes at most 1000 metrics per batch
            self._client.log_batch(self.run_id, metrics=self._pending[i : i + 1000])
        self._pending.clear()

    def on_step_end(self, trainer: Trainer, step: int, loss_sum: float) -> None:
        if self._client is None or not self.every_steps or step % self.every_steps:
            return
        done = self._window.totals(trainer)
        self._point("train_loss", done.train_loss, step)
        self._point("lr", trainer.lr, step)
        self._point("samples_per_s", done.samples_per_s, step)
        for name, ms in self._window.phase_ms(trainer).items():
            self._point(name, ms, step)
        self._window.reset(trainer)
        self._send()

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if self._client is None:
            return
        self._point("epoch_train_loss", metrics["train_loss"], metrics["step"])
        for key, value in metrics.items():
            if key.startswith("val_"):
                self._point(key, value, metrics["step"])
        self._send()

    def on_train_end(self, trainer: Trainer) -> None:
        if self._client is None:
            return
        self._send()
        if trainer.last_checkpoint is not None and Path(trainer.last_checkpoint).is_dir():
            self._client.log_artifacts(self.run_id, str(Path(trainer.last_checkpoint).resolve()), "checkpoint")
        self._client.set_terminated(self.run_id, "KILLED" if trainer.stopped else "FINISHED")
        self._client = None
