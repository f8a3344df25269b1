"""Regression: scikit-learn's diabetes data, the r2 metric (exact at any world size), and the
diabetes config training to a sensible R^2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import r2_score

from dptrain import Dense, MeanSquaredError, ReLU, Sequential, SoftmaxCrossEntropy
from dptrain.cli import main
from dptrain.data import Dataset, load_diabetes
from dptrain.training.evaluation import EVAL_CHUNK, evaluate

from helpers import REPO, dptrain, needs_mpiexec

CONFIG = REPO / "configs" / "diabetes_mlp.toml"


def test_diabetes_shapes():
    d = load_diabetes()
    assert d.x.shape == (442, 10) and d.y.shape == (442, 1)
    assert d.x.dtype == np.float64 and d.y.dtype == np.float64
    assert d.task == "regression" and d.n_classes is None and d.n_outputs == 1
    assert 25 <= d.y.min() and d.y.max() <= 346  # the raw target, in its units
    assert abs(d.x.mean()) < 1e-6  # features as scikit-learn gives them: centred and scaled


def _model(n_in: int, n_out: int, seed: int = 0) -> Sequential:
    model = Sequential([Dense(16), ReLU(), Dense(n_out)], (n_in,), dtype=np.float64)
    model.init_params(np.random.default_rng(seed))
    return model


def _data(n: int, n_in: int, n_out: int, offset: float = 0.0, seed: int = 1) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_in))
    y = x[:, :n_out] * np.arange(1, n_out + 1) + rng.standard_normal((n, n_out)) * 0.5 + offset
    return Dataset(x, y, None, "test")


@pytest.mark.parametrize("n_out", [1, 3])
def test_r2_matches_a_direct_computation(n_out):
    data = _data(300, 5, n_out)
    model = _model(5, n_out)
    result = evaluate(model, MeanSquaredError(), data)
    z = model.forward(data.x, train=False)
    y = data.y
    direct = 1 - np.sum((y - z) ** 2) / np.sum((y - y.mean(axis=0)) ** 2)
    assert result["r2"] == pytest.approx(direct, rel=1e-12)
    assert result["r2"] == pytest.approx(r2_score(y, z, multioutput="variance_weighted"), rel=1e-12)
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean((y - z) ** 2)), rel=1e-12)
    assert result["n_samples"] == 300


class HalfSquaredError(MeanSquaredError):
    """A regression loss other than the MSE: half of it."""

    def value(self, z, y):
        return 0.5 * super().value(z, y)


def test_rmse_is_the_root_mean_squared_residual_whatever_the_loss():
    data = _data(200, 4, 2)
    model = _model(4, 2)
    z = model.forward(data.x, train=False)
    result = evaluate(model, HalfSquaredError(), data)
    assert result["loss"] == pytest.approx(0.5 * np.mean((data.y - z) ** 2), rel=1e-12)
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean((data.y - z) ** 2)), rel=1e-12)


def test_evaluate_reports_the_metrics_of_the_table():
    """evaluation.VALIDATION_METRICS, which metrics files, early stopping and logs follow, is what evaluate gives."""
    from dptrain import BCEWithLogits
    from dptrain.training.evaluation import VALIDATION_METRICS

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 3))
    cases = {"regression": (MeanSquaredError(), rng.standard_normal((20, 3)), None),
             "classification": (SoftmaxCrossEntropy(), rng.integers(0, 3, 20), 3),
             "multilabel": (BCEWithLogits(), rng.integers(0, 2, (20, 3)).astype(np.float64), None)}
    assert set(cases) == set(VALIDATION_METRICS)
    for task, (loss, y, n_classes) in cases.items():
        assert loss.task == task
        result = evaluate(_model(3, 3), loss, Dataset(x, y, n_classes, task))
        assert tuple(f"val_{k}" for k in result if k != "n_samples") == VALIDATION_METRICS[task]


def test_r2_of_predicting_the_mean_is_zero():
    data = _data(50, 2, 1)
    model = Sequential([Dense(1)], (2,), dtype=np.float64)
    model.param_buffer[...] = 0.0
    model.layers[0].params["bias"][...] = np.mean(data.y)  # ignores x, predicts the mean of y
    assert evaluate(model, MeanSquaredError(), data)["r2"] == pytest.approx(0.0, abs=1e-12)


def test_r2_is_accurate_when_the_mean_is_far_from_zero():
    """sum(y**2) - sum(y)**2 / n would lose every digit here; shifting y by its first value does not."""
    data = _data(400, 3, 1, offset=1e8)
    model = _model(3, 1)
    model.layers[-1].params["bias"][...] = 1e8
    z = model.forward(data.x, train=False)
    direct = 1 - np.sum((data.y - z) ** 2) / np.sum((data.y - data.y.mean()) ** 2)
    assert evaluate(model, MeanSquaredError(), data)["r2"] == pytest.approx(direct, rel=1e-9)


def test_constant_targets_give_nan_r2():
    rng = np.random.default_rng(0)
    data = Dataset(rng.standard_normal((10, 2)), np.full((10, 1), 3.0), None, "const")
    assert math.isnan(evaluate(_model(2, 1), MeanSquaredError(), data)["r2"])


def test_classification_reports_no_r2():
    rng = np.random.default_rng(0)
    data = Dataset(rng.standard_normal((20, 3)), rng.integers(0, 3, 20), 3, "cls")
    result = evaluate(_model(3, 3), SoftmaxCrossEntropy(), data)
    assert "accuracy" in result and "r2" not in result and "rmse" not in result


class FakeRank:
    """Rank ``rank`` of ``size``: records its local sums; given the total, returns it (an allreduce)."""

    def __init__(self, rank: int, size: int, total: np.ndarray | None = None) -> None:
        self.rank, self.size, self.total, self.calls = rank, size, total, []

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        self.calls.append(buf.copy())
        if self.total is not None:
            buf[...] = self.total
        return buf


@pytest.mark.parametrize("world", [2, 3, 7])
@pytest.mark.parametrize("n_out", [1, 2])
def test_r2_is_the_same_on_a_fake_split(world, n_out):
    """Every rank makes one allreduce, of the same size; the summed result equals one process's."""
    n = 2 * EVAL_CHUNK + 13  # several chunks on one process, and ranks with different shares
    data, model = _data(n, 4, n_out, offset=150.0), _model(4, n_out)
    single = evaluate(model, MeanSquaredError(), data)
    first = [FakeRank(r, world) for r in range(world)]
    for comm in first:
        evaluate(model, MeanSquaredError(), data, comm)
    assert all(len(c.calls) == 1 for c in first)
    assert len({c.calls[0].shape for c in first}) == 1
    total = np.sum([c.calls[0] for c in first], axis=0)
    results = [evaluate(model, MeanSquaredError(), data, FakeRank(r, world, total)) for r in range(world)]
    assert all(r == results[0] for r in results)
    assert results[0]["n_samples"] == n
    for key in ("loss", "rmse", "r2"):
        assert results[0][key] == pytest.approx(single[key], rel=1e-12), key


def test_a_rank_without_samples_still_makes_the_allreduce():
    data, model = _data(2, 3, 1), _model(3, 1)
    comm = FakeRank(rank=4, size=5)  # ranks 2..4 hold no sample
    evaluate(model, MeanSquaredError(), data, comm)
    assert len(comm.calls) == 1 and comm.calls[0][2] == 0


# ---------------------------------------------------------------------------------------------
# The diabetes config, through the CLI

@pytest.fixture(scope="module")
def diabetes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diabetes") / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(CONFIG), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_diabetes_config_trains_to_a_sensible_r2(diabetes_run):
    _, output = diabetes_run
    last = next(line for line in output.splitlines() if line.startswith("epoch 100/100"))
    r2 = float(last.split("val_r2 ")[1].split()[0])
    rmse = float(last.split("val_rmse ")[1].split()[0])
    assert r2 >= 0.4 and rmse < 62  # the target's spread on the validation split is ~79
    assert "val_r2" in output.splitlines()[-1]  # the closing summary


def test_eval_reports_r2(diabetes_run):
    out, output = diabetes_run
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["n_samples"] == 88  # 20 % of 442
    last = next(line for line in output.splitlines() if line.startswith("epoch 100/100"))
    assert f"val_r2 {report['r2']:.4f}" in last
    text = CliRunner().invoke(main, ["eval", "--checkpoint", str(out)])
    assert f"r2 {report['r2']:.4f}" in text.output and f"rmse {report['rmse']:.4f}" in text.output


@needs_mpiexec
def test_eval_on_two_ranks_matches_one_process(tmp_path):
    """float64, so that the model's outputs do not depend on how many rows a forward pass takes."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(CONFIG), "--out", str(out),
                                       "--set", "train.dtype=float64", "--set", "train.epochs=5"])
    assert result.exit_code == 0, result.output
    one = dptrain("eval", "--checkpoint", str(out), "--json")
    two = dptrain("eval", "--checkpoint", str(out), "--json", ranks=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["n_samples"] == b["n_samples"] == 88
    for key in ("loss", "rmse", "r2"):
        assert b[key] == pytest.approx(a[key], rel=1e-12), key


def test_evaluation_passes_hold_at_most_eval_values_of_the_widest_activation():
    from dptrain.nn import Dense, Embedding, Sequential
    from dptrain.training.evaluation import EVAL_VALUES, eval_chunk

    assert eval_chunk(Sequential([Dense(10)], 64, dtype=np.float32)) == EVAL_CHUNK
    text = Sequential([Embedding(128, vocab=74), Dense(74)], (64,), dtype=np.float32)
    assert eval_chunk(text) == EVAL_VALUES // (64 * 128) < EVAL_CHUNK
    assert eval_chunk(Sequential([Dense(EVAL_VALUES * 2)], 1, dtype=np.float32)) == 1
