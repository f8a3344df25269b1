"""A file system that turns read-only under a run (as a failing Lustre/NFS mount does), and folders
the user may not write: every write of dptrain (the run folder, --overwrite, a resume, the timeline,
predict's output) ends in one line naming the path and the cause, exit 74, and every checkpoint
already there is intact. The file system is a real one: a small tmpfs remounted read-only (skipped
where mounting is not allowed); permissions are real too (as root, dptrain runs without the
capabilities that bypass them)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain.cli import main
from dptrain.storage.checkpoint import load_checkpoint, step_dirs

from helpers import small_tmpfs, without_dac_override

SMALL = ["--set", "train.epochs=2", "--set", "model.hidden=[16]", "--quiet"]


@pytest.fixture
def read_only_run(tmp_path):
    """(mount point, a run folder with checkpoints in it), the file system then remounted read-only."""
    with small_tmpfs(tmp_path / "ro", "8m") as mount_point:
        run = mount_point / "run"
        result = CliRunner().invoke(main, ["train", "--out", str(run), *SMALL])
        assert result.exit_code == 0, result.output
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True, capture_output=True)
        yield mount_point, run


def _one_error_line(result) -> str:
    assert result.exit_code == 74, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Read-only file system" in errors[0], result.output
    return errors[0]


def _intact(run) -> None:
    kept = step_dirs(run / "checkpoints")
    assert kept
    for checkpoint in kept:
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("how", [["--overwrite"], ["--resume", "auto"]], ids=["overwrite", "resume"])
def test_training_into_a_read_only_run_folder_is_one_line(read_only_run, how):
    _, run = read_only_run
    line = _one_error_line(CliRunner().invoke(main, ["train", "--out", str(run), *SMALL, *how]))
    assert str(run) in line, line
    _intact(run)


def test_a_new_run_folder_on_a_read_only_file_system_is_one_line(read_only_run):
    mount_point, _ = read_only_run
    line = _one_error_line(CliRunner().invoke(main, ["train", "--out", str(mount_point / "new"), *SMALL]))
    assert str(mount_point / "new") in line, line


def test_a_timeline_on_a_read_only_file_system_is_one_line(read_only_run, tmp_path):
    mount_point, _ = read_only_run
    trace = mount_point / "trace.json"
    line = _one_error_line(CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), *SMALL,
                                                     "--timeline", str(trace)]))
    assert str(trace) in line, line


def test_predictions_to_a_read_only_file_system_are_one_line(read_only_run, tmp_path):
    mount_point, run = read_only_run
    rows = tmp_path / "rows.npy"
    np.save(rows, np.zeros((3, 64)))
    output = mount_point / "predictions.csv"
    line = _one_error_line(CliRunner().invoke(main, ["predict", "--checkpoint", str(run), "--input", str(rows),
                                                     "--output", str(output)]))
    assert str(output) in line, line


def _dptrain_without_override(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(without_dac_override([sys.executable, "-m", "dptrain", *args]), capture_output=True,
                          text=True, timeout=120)


def _one_permission_line(result) -> str:
    assert result.returncode == 74, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Permission denied" in errors[0], result.stderr
    return errors[0]


@pytest.mark.slow
def test_a_run_folder_in_a_folder_the_user_may_not_write_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = _one_permission_line(_dptrain_without_override("train", "--out", str(locked / "run"), *SMALL))
    assert str(locked / "run") in line, line


@pytest.mark.slow
def test_overwriting_a_run_the_user_may_not_change_is_one_line_and_keeps_it(tmp_path):
    run = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--out", str(run), *SMALL]).exit_code == 0
    (run / "checkpoints").chmod(0o555)  # its checkpoints cannot be deleted
    try:
        line = _one_permission_line(_dptrain_without_override("train", "--out", str(run), "--overwrite", *SMALL))
        assert str(run / "checkpoints") in line, line
        _intact(run)
    finally:
        (run / "checkpoints").chmod(0o755)
