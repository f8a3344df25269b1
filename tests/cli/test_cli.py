"""The dptrain command as a user types it: CliRunner in-process, subprocesses for MPI."""

from __future__ import annotations

import json
import sys
import time

import pytest
from click.testing import CliRunner

from dptrain.cli import main

from helpers import REPO, dptrain, invoke, load_arrays, needs_mpiexec, run

QUICK = ["--set", "train.epochs=2", "--set", "model.hidden=[16]"]


def test_train_then_eval_json(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--out", str(out), *QUICK)
    assert result.exit_code == 0, result.output
    assert "epoch 1/2" in result.output and "epoch 2/2" in result.output
    assert "resolved config" in result.output
    assert (out / "config.toml").is_file()
    result = invoke("eval", "--checkpoint", str(out / "checkpoints" / "latest"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["n_samples"] == 359  # 20 % of the 1797 digits
    assert 0 <= report["accuracy"] <= 1 and report["loss"] > 0
    # eval agrees with the metrics the trainer recorded at the same step
    meta = json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())
    assert report["accuracy"] == pytest.approx(meta["metrics"]["val_accuracy"])
    assert report["loss"] == pytest.approx(meta["metrics"]["val_loss"])


def test_eval_accepts_a_run_folder(tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--out", str(out), *QUICK).exit_code == 0
    result = invoke("eval", "--checkpoint", str(out))
    assert result.exit_code == 0
    assert "accuracy" in result.output and "n_samples 359" in result.output


def test_no_subcommand_trains_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke()
    assert result.exit_code == 0, result.output
    assert "epoch 30/30" in result.output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "latest" / "model.npz").is_file()


def test_python_dash_m_runs_the_cli():
    result = run([sys.executable, "-m", "dptrain", "--version"])
    assert result.returncode == 0 and "dptrain" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lr=-1"], "optim.lr must be > 0"),
    (["--set", "train.bogus=1"], "unknown key train.bogus"),
    (["--set", "train.batch_size=\"64\""], "train.batch_size must be an integer"),
    (["--config", "does-not-exist.toml"], "config does-not-exist.toml: not found"),
    (["--set", "data.name=npz", "--set", "data.path=missing.npz"], "data file missing.npz: not found"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--set", "optim.lr=-1", "--debug"])
    assert result.exit_code != 0 and result.exception is not None


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--out", str(out), *QUICK).exit_code == 0
    before = load_arrays(out / "checkpoints" / "latest" / "model.npz")
    result = CliRunner().invoke(main, ["train", "--out", str(out), *QUICK, "--set", "seed=1"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    after = load_arrays(out / "checkpoints" / "latest" / "model.npz")
    assert all((before[k] == after[k]).all() for k in before)
    assert invoke("train", "--out", str(out), *QUICK, "--set", "seed=1", "--overwrite").exit_code == 0


def test_launch_dry_run_prints_the_command(tmp_path):
    result = CliRunner(env={"OMP_NUM_THREADS": None, "OPENBLAS_NUM_THREADS": None, "MKL_NUM_THREADS": None}).invoke(
        main, ["launch", "-n", "3", "--mpirun", sys.executable, "--dry-run", "--out", str(tmp_path / "a b")])
    assert result.exit_code == 0, result.output
    assert "OMP_NUM_THREADS=" in result.output
    assert f"-n 3 {sys.executable} -m dptrain train --out '{tmp_path / 'a b'}'" in result.output


def test_launch_refuses_bad_train_options_before_starting(tmp_path):
    result = CliRunner().invoke(main, ["launch", "-n", "2", "--mpirun", sys.executable, "--no-such-option"])
    assert result.exit_code == 2 and "no-such-option" in result.output
    result = CliRunner().invoke(main, ["launch", "-n", "2", "--mpirun", sys.executable, "--set", "train.epochs=0"])
    assert result.exit_code == 2 and "train.epochs must be >= 1" in result.output


@needs_mpiexec
def test_launch_two_ranks_end_to_end(tmp_path):
    out = tmp_path / "d1"
    result = dptrain("launch", "-n", "2", "--config", str(REPO / "configs" / "digits_mlp.toml"), "--out", str(out),
                     "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    assert "2 ranks" in result.stdout and "epoch 3/3" in result.stdout
    result = dptrain("eval", "--checkpoint", str(out / "checkpoints" / "latest"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_samples"] == 359


@needs_mpiexec
def test_default_job_on_two_ranks_reaches_097_in_15_s(tmp_path):
    """The acceptance target of the built-in default: val_accuracy >= 0.97 in < 15 s on 2 ranks."""
    start = time.monotonic()
    result = dptrain("train", "--out", str(tmp_path / "run"), ranks=2)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["metrics"]["val_accuracy"] >= 0.97
    assert meta["world_size"] == 2
    assert elapsed < 15


@needs_mpiexec
def test_launch_passes_shell_metacharacters_verbatim(tmp_path):
    """The launcher builds an argv list: nothing is interpreted by a shell."""
    out = tmp_path / "run $(touch pwned); `touch pwned2` | * &"
    result = dptrain("launch", "-n", "2", "--out", str(out), "--set", "train.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "checkpoints" / "latest" / "model.npz").is_file()
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    result = dptrain("launch", "-n", "2", "--out", str(tmp_path / "r2"), "--set", "data.path=$(touch pwned3)",
                     "--set", "data.name=npz", cwd=tmp_path)
    assert result.returncode == 2
    assert "data file $(touch pwned3): not found" in result.stderr
    assert not (tmp_path / "pwned3").exists()


def test_launch_is_refused_under_mpirun():
    """Under mpirun each rank would start its own mpiexec: one line from rank 0, exit 2."""
    result = dptrain("launch", "-n", "2", "--dry-run", PMI_RANK="0", PMI_SIZE="1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: launch: run it outside mpirun/mpiexec/srun: it starts or submits the ranks itself"]
    assert "mpiexec" not in result.stdout  # the command was not printed
