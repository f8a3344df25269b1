"""`dptrain doctor`: one line per check, OK or the problem and the fix, exit 1 if any fails; the run
folder must be writable and the same on every rank (simulated node-local folders: MPMD ranks in
different working directories)."""

from __future__ import annotations

import sys

from click.testing import CliRunner

from dptrain.cli import main

from helpers import MPIEXEC, dptrain, needs_mpiexec, run

CHECKS = ["mpi", "hosts", "scheduler", "threads", "allreduce", "watchdog", "run folder", "free space"]


def _checks(output):
    return {line[6:19].strip(): line[:4].strip() for line in output.splitlines() if line[:4] in ("OK  ", "FAIL")}


def test_every_check_passes_on_a_healthy_single_process(tmp_path):
    result = CliRunner().invoke(main, ["doctor", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert _checks(result.output) == {name: "OK" for name in CHECKS}
    assert list((tmp_path / "runs").iterdir()) == []  # its tokens are gone


def test_a_run_folder_that_cannot_be_written_fails_naming_it(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(main, ["doctor", "--out", str(tmp_path / "afile" / "runs")])
    assert result.exit_code == 1
    assert _checks(result.output)["run folder"] == "FAIL" and "choose a folder every rank can write" in result.output


def test_a_slurm_allocation_with_other_task_counts_fails(tmp_path):
    result = CliRunner().invoke(main, ["doctor", "--out", str(tmp_path)],
                                env={"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4"})
    assert result.exit_code == 1
    assert "Slurm job 77 has 4 tasks but 1 ranks started: start with srun" in result.output


def test_too_little_space_for_the_checkpoints_fails(tmp_path):
    result = CliRunner().invoke(main, ["doctor", "--out", str(tmp_path), "--set", "checkpoint.keep=1000000000"])
    assert result.exit_code == 1
    assert _checks(result.output)["free space"] == "FAIL" and "lower checkpoint.keep" in result.output


@needs_mpiexec
def test_two_ranks_answer_and_measure_the_allreduce(tmp_path):
    result = dptrain("doctor", "--out", str(tmp_path), ranks=2)
    assert result.returncode == 0, result.stderr
    assert "2 ranks started and answered" in result.stdout and "bus bandwidth" in result.stdout
    assert "a thread on each of the 2 ranks (MPI_THREAD_MULTIPLE)" in result.stdout


@needs_mpiexec
def test_a_folder_that_is_not_the_same_on_every_rank_fails(tmp_path):
    """Ranks started in different folders see different `runs`, as node-local disks would."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    command = [sys.executable, "-m", "dptrain", "doctor", "--out", "runs"]
    result = run([MPIEXEC, "-n", "1", "-wdir", str(tmp_path / "a"), *command, ":",
                  "-n", "1", "-wdir", str(tmp_path / "b"), *command])
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "is not the same folder on every node" in result.stdout
