"""Preemption and crashes of real 2-rank runs: stop signals, repeated signals, SIGKILL, batch scripts.

A stop signal (SIGUSR1/SIGTERM/SIGINT) reaching one rank or mpiexec makes every rank stop after the
same step; rank 0 writes a checkpoint and the job exits with 75; `--resume auto` then ends with the
same weights, bit for bit, as a run that was never interrupted. A SIGKILL at any moment (even while
rank 0 writes a checkpoint) leaves only complete checkpoints. The Slurm and PBS scripts turn a
stop into a requeue (or a resubmission) that continues the same run folder.

Every process is started with a timeout or waited for with a deadline, so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from background import Jobs, rank_pid, wait_for_end, wait_for_path, wait_no_ranks_left

import dptrain.storage.checkpoint as checkpoint_module
from dptrain.storage.checkpoint import load_checkpoint, save_checkpoint, step_dirs

from helpers import MPIEXEC, assert_arrays_close, dptrain, load_arrays, needs_mpiexec

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm.sbatch"
PBS = ROOT / "launch" / "pbs.sh"
BIN = Path(sys.executable).parent
# mpiexec relays a signal to the ranks one after the other: the stop may come at a step for
# which only one of them had it yet.
STOPPED = re.compile(r"stop signal received by [12] of 2 rank\(s\)")
RUN_TIMEOUT = 120  # seconds for a whole run

# ~0.2-0.3 s per epoch on 2 ranks: uninterrupted ~2-3 s. 16000 training samples / 50 = 320 steps
# per epoch; a checkpoint at the end of each epoch, so `latest` appears after epoch 1.
LONG_EPOCHS, LONG_STEPS_PER_EPOCH = 10, 320
LONG_CONFIG = f"""
seed = 0
[data]
name = "synthetic"
n_samples = 20000
n_features = 64
n_classes = 10
[model]
hidden = [256, 256]
[train]
epochs = {LONG_EPOCHS}
batch_size = 50
dtype = "float64"
[optim]
lr = 0.01
[checkpoint]
every_epochs = 1
every_steps = 0
keep = 3
"""

# Slow steps (~0.1 s each): a stop takes longer than the 0.05 s between two signals.
SLOW_CONFIG = """
seed = 0
[data]
name = "synthetic"
n_samples = 20000
n_features = 64
n_classes = 10
[model]
hidden = [512, 512]
[train]
epochs = 3
batch_size = 2000
dtype = "float64"
[checkpoint]
every_steps = 1
every_epochs = 0
keep = 2
"""

# Fast steps (~2-5 ms with a checkpoint after every one, 0.2 ms without): rank 0 is writing a
# checkpoint most of the time. 1600 training samples / 20 = 80 steps per epoch, 3200 steps: far
# more than three kills 0.5-2 s after the start get through.
KILL_KEEP = 5
KILL_CONFIG = f"""
seed = 1
[data]
name = "synthetic"
n_samples = 2000
n_features = 16
n_classes = 4
[model]
hidden = [32]
[train]
epochs = 40
batch_size = 20
dtype = "float64"
[optim]
lr = 0.01
[checkpoint]
every_steps = 1
every_epochs = 0
keep = {KILL_KEEP}
"""


# ---------------------------------------------------------------------------------------------
# Helpers


def _train_argv(config: Path, out: Path, *extra: str) -> list[str]:
    return [MPIEXEC, "-n", "2", sys.executable, "-m", "dptrain", "train", "--config", str(config),
            "--out", str(out), *extra]


def meta_of(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def final_arrays(out: Path) -> tuple[dict, dict]:
    latest = out / "checkpoints" / "latest"
    return load_arrays(latest / "model.npz"), load_arrays(latest / "optimizer.npz")


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys(), what
    for name, expected in b.items():
        assert a[name].dtype == expected.dtype, f"{what}: {name} dtype {a[name].dtype} vs {expected.dtype}"
        assert np.array_equal(a[name], expected), (
            f"{what}: {name} differs (max |a-b| = {np.abs(a[name] - expected).max():.3e})")


def resume_to_the_end(config: Path, out: Path, stopped_at: int | None = None) -> subprocess.CompletedProcess:
    result = dptrain("train", "--config", str(config), "--out", str(out), "--resume", "auto", ranks=2,
                     timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    if stopped_at is not None:
        assert "resuming from" in result.stdout and f"(step {stopped_at}," in result.stdout, result.stdout
    return result


def _write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ---------------------------------------------------------------------------------------------
# Uninterrupted references (one per module)


def _reference_run(tmp_path_factory, name: str, text: str, *extra: str):
    """Write config ``text`` and train it uninterrupted on 2 ranks: (config path, final arrays)."""
    if MPIEXEC is None:
        pytest.skip("no mpiexec on this machine")
    folder = tmp_path_factory.mktemp(f"{name}-reference")
    config = folder / f"{name}.toml"
    config.write_text(text)
    result = dptrain("train", "--config", str(config), "--out", str(folder / "run"), *extra, ranks=2,
                     timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return config, final_arrays(folder / "run")


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The long config and the final (model, optimizer state) of an uninterrupted 2-rank run."""
    return _reference_run(tmp_path_factory, "long", LONG_CONFIG)


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory):
    # Only the final checkpoint: checkpoints do not change the arithmetic, and it is much faster.
    config, (model, _) = _reference_run(tmp_path_factory, "kill", KILL_CONFIG, "--set", "checkpoint.every_steps=0")
    return config, model


# ---------------------------------------------------------------------------------------------
# a, b: a stop signal to one rank, or to mpiexec; exact resume


def _stop_and_resume(jobs: Jobs, tmp_path: Path, long_reference, send) -> tuple[dict, str]:
    """Start a 2-rank run, call send(proc, out) once the first epoch's checkpoint exists, expect
    75, resume to the end and compare bit for bit with the uninterrupted run."""
    config, (ref_model, ref_optimizer) = long_reference
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = jobs.start(_train_argv(config, out), log)
    wait_for_path(out / "checkpoints" / "latest", proc, log)
    send(proc, out)
    code = wait_for_end(proc, log)
    output = log.read_text()
    assert code == 75, output
    wait_no_ranks_left(out)

    latest = (out / "checkpoints" / "latest").resolve()
    meta = meta_of(latest)
    load_checkpoint(latest)  # complete, checksums match
    assert f"checkpoint {out / 'checkpoints' / latest.name}" in output
    # After epoch 1's checkpoint, the stop came at least one step later, before the end.
    assert LONG_STEPS_PER_EPOCH < meta["step"] < LONG_EPOCHS * LONG_STEPS_PER_EPOCH, meta
    assert meta["step_in_epoch"] == meta["step"] - meta["epoch"] * LONG_STEPS_PER_EPOCH, meta
    # Mid-epoch, except in the rare case the stop fell on an epoch's last step (1 in 320).
    if meta["step_in_epoch"] == 0:
        print(f"note: the stop fell on an epoch boundary (step {meta['step']})")
    stopped_model = load_arrays(latest / "model.npz")

    resume_to_the_end(config, out, stopped_at=meta["step"])
    model, optimizer = final_arrays(out)
    assert_bitwise_equal(model, ref_model, "final model (resumed vs uninterrupted)")
    assert_bitwise_equal(optimizer, ref_optimizer, "final optimizer state (resumed vs uninterrupted)")
    assert any(not np.array_equal(model[k], stopped_model[k]) for k in model), "training did not continue"
    return meta, output


@needs_mpiexec
def test_sigusr1_to_one_rank_stops_every_rank_and_resume_is_exact(jobs: Jobs, tmp_path: Path, long_reference):
    def send(proc, out):
        os.kill(rank_pid(out, 1), signal.SIGUSR1)  # rank 1 only: rank 0 learns it from the step's allreduce

    _, output = _stop_and_resume(jobs, tmp_path, long_reference, send)
    assert "stop signal received by 1 of 2 rank(s)" in output
    assert "exit status 75" in output


@needs_mpiexec
def test_sigterm_to_mpiexec_stops_the_job_and_resume_is_exact(jobs: Jobs, tmp_path: Path, long_reference):
    def send(proc, out):
        proc.send_signal(signal.SIGTERM)  # as a scheduler signals the job step; mpiexec relays it

    _, output = _stop_and_resume(jobs, tmp_path, long_reference, send)
    assert STOPPED.search(output), output


# ---------------------------------------------------------------------------------------------
# c: signals delivered twice or more (as schedulers and launchers do), at any gaps, still stop cleanly


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # the job has already ended


@needs_mpiexec
@pytest.mark.parametrize("gaps", [(0.01, 0.1), (0.1, 0.8)], ids=["10ms-100ms", "100ms-800ms"])
def test_any_number_of_signals_to_any_process_at_any_gaps_give_one_stop_and_exit_75(jobs: Jobs, tmp_path: Path,
                                                                                    gaps: tuple[float, float]):
    config, out, log = tmp_path / "slow.toml", tmp_path / "run", tmp_path / "log.txt"
    config.write_text(SLOW_CONFIG)
    proc = jobs.start(_train_argv(config, out), log)
    wait_for_path(out / "checkpoints" / "latest", proc, log)  # step 1 done: the handlers are in place
    rank0, rank1 = rank_pid(out, 0), rank_pid(out, 1)
    _signal(rank1, signal.SIGTERM)
    time.sleep(gaps[0])
    _signal(proc.pid, signal.SIGTERM)  # mpiexec relays it to both ranks
    _signal(rank0, signal.SIGUSR1)
    time.sleep(gaps[1])  # the stop may be over by now: these arrive while the job ends
    _signal(rank1, signal.SIGINT)
    _signal(proc.pid, signal.SIGTERM)
    assert wait_for_end(proc, log) == 75, log.read_text()
    output = log.read_text()
    assert output.count("stop signal received by") == 1 and "exit status 75" in output, output
    wait_no_ranks_left(out)
    for ckpt in step_dirs(out / "checkpoints"):
        load_checkpoint(ckpt)


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (SigCgt of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


@needs_mpiexec
def test_a_signal_during_start_up_stops_cleanly_after_the_first_step(jobs: Jobs, tmp_path: Path):
    config, out, log = tmp_path / "long.toml", tmp_path / "run", tmp_path / "log.txt"
    config.write_text(LONG_CONFIG)
    proc = jobs.start(_train_argv(config, out), log)
    ranks = [rank_pid(out, r) for r in (0, 1)]
    deadline = time.monotonic() + 30
    while not all(_catches(pid, signal.SIGTERM) for pid in ranks):  # dptrain's handlers: before MPI starts
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.002)
    assert not (out / "checkpoints").exists()  # still setting up: MPI, the config, the data, the model
    proc.send_signal(signal.SIGTERM)
    assert wait_for_end(proc, log) == 75, log.read_text()
    output = log.read_text()
    assert "stopped after step 1;" in output and "Traceback" not in output, output
    assert [p.name for p in step_dirs(out / "checkpoints")] == ["step-00000001"]
    load_checkpoint(out / "checkpoints" / "latest")
    wait_no_ranks_left(out)


# ---------------------------------------------------------------------------------------------
# d: SIGKILL of a rank at a random moment, even while rank 0 writes a checkpoint


def _damaged_step_folders(out: Path) -> dict[str, str]:
    damaged = {}
    for folder in sorted((out / "checkpoints").glob("step-*")):
        if folder.is_dir():
            try:
                load_checkpoint(folder)
            except Exception as exc:  # noqa: BLE001 - report every kind of damage
                damaged[folder.name] = str(exc)
    return damaged



@needs_mpiexec
@pytest.mark.parametrize("victim", [0, 1], ids=["kill-rank0", "kill-rank1"])
def test_sigkill_at_a_random_moment_leaves_only_complete_checkpoints(jobs: Jobs, tmp_path: Path, kill_reference,
                                                                      victim: int):
    config, ref_model = kill_reference
    out = tmp_path / "run"
    delays = [random.uniform(0.5, 2.0) for _ in range(3)]
    for i, delay in enumerate(delays):
        log = tmp_path / f"log-{i}.txt"
        proc = jobs.start(_train_argv(config, out, "--resume", "auto"), log)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before the kill ({delay:.2f} s):\n{log.read_text()}"
        os.kill(rank_pid(out, victim), signal.SIGKILL)
        code = wait_for_end(proc, log)
        assert code != 0, log.read_text()
        wait_no_ranks_left(out)  # no orphan rank goes on writing checkpoints
        damaged = _damaged_step_folders(out)
        assert not damaged, f"kill {i + 1} of rank {victim} after {delay:.2f} s left damaged checkpoints: {damaged}"

    # The rest without a checkpoint at every step (much faster; checkpoints do not change the arithmetic).
    result = dptrain("train", "--config", str(config), "--out", str(out), "--resume", "auto",
                     "--set", "checkpoint.every_steps=0", ranks=2, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout, result.stdout
    model, _ = final_arrays(out)
    assert_arrays_close(model, ref_model, rtol=1e-9)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # temporaries cleaned


def test_a_kill_while_pruning_leaves_no_damaged_step_folder(tmp_path: Path, monkeypatch):
    root = tmp_path / "checkpoints"
    model, optimizer = {"w": np.arange(6.0)}, {"momentum_buffer": np.zeros(6)}
    for step in (1, 2):
        save_checkpoint(root, step, model, optimizer, {"epoch": 0}, keep=2)

    class Killed(BaseException):
        pass

    def rmtree_killed_midway(path, *args, **kwargs):  # SIGKILL after the first file is deleted
        next(Path(path).iterdir()).unlink()
        raise Killed(path)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", rmtree_killed_midway)
    with pytest.raises(Killed):
        save_checkpoint(root, 3, model, optimizer, {"epoch": 0}, keep=2)
    monkeypatch.undo()
    for folder in root.glob("step-*"):
        load_checkpoint(folder)  # every folder with a real name must be complete


# ---------------------------------------------------------------------------------------------
# e: end to end through the batch scripts, with a fake scheduler

_SCRUBBED_PREFIXES = ("SLURM_", "SRUN_", "SBATCH_", "PBS_", "PMI_", "PMIX_", "OMPI_", "MV2_", "HYDRA_", "DPTRAIN_")


def _job_env(stub_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    path = [str(BIN), env.get("PATH", "/usr/bin:/bin")]
    if stub_dir is not None:
        path.insert(0, str(stub_dir))
    env.update(PATH=os.pathsep.join(path), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _argv_recorder(path: Path, log: Path) -> Path:
    """A stub requeue/qsub command: records its arguments (NUL-separated), succeeds."""
    return _write_executable(path, f"#!/bin/sh\nprintf '%s\\0' \"$@\" > '{log}'\n")


def _recorded_argv(log: Path) -> list[str]:
    return log.read_text().split("\0")[:-1]


@needs_mpiexec
def test_slurm_script_requeues_on_usr1_and_the_requeued_job_resumes(jobs: Jobs, tmp_path: Path, long_reference):
    config, (ref_model, ref_optimizer) = long_reference
    shutil.copy(config, tmp_path / "long.toml")
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    _write_executable(stub_dir / "srun", f'#!/bin/sh\nexec \'{MPIEXEC}\' -n "$SLURM_NTASKS" "$@"\n')
    marker = tmp_path / "requeued"
    requeue = _argv_recorder(stub_dir / "fake-scontrol-requeue", marker)
    env = _job_env(stub_dir, SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="1",
                   SLURM_JOB_NODELIST="localhost", DPTRAIN_CONFIG="long.toml", DPTRAIN_REQUEUE_CMD=str(requeue))
    out, log = tmp_path / "runs" / "slurm-4242", tmp_path / "job-1.txt"

    batch = jobs.start(["bash", str(SLURM)], log, env=env, cwd=tmp_path)
    wait_for_path(out / "checkpoints" / "latest", batch, log)
    os.kill(batch.pid, signal.SIGUSR1)  # --signal=B:USR1@120: the batch shell only
    code = wait_for_end(batch, log)
    output = log.read_text()
    assert code == 0, output  # requeued: not a failure
    assert _recorded_argv(marker) == ["4242"], output
    assert "got SIGUSR1" in output and STOPPED.search(output), output
    latest = (out / "checkpoints" / "latest").resolve()
    step = meta_of(latest)["step"]
    load_checkpoint(latest)
    assert step < LONG_EPOCHS * LONG_STEPS_PER_EPOCH
    wait_no_ranks_left(tmp_path)

    # The requeued job: same job id, hence the same run folder.
    marker.unlink()
    result = subprocess.run(["bash", str(SLURM)], env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "resuming from" in output and f"(step {step}," in output, output
    assert not marker.exists()  # finished: not requeued again
    model, optimizer = final_arrays(out)
    assert_bitwise_equal(model, ref_model, "final model (Slurm requeue vs uninterrupted)")
    assert_bitwise_equal(optimizer, ref_optimizer, "final optimizer state (Slurm requeue vs uninterrupted)")


@needs_mpiexec
def test_pbs_script_resubmits_on_sigterm_and_the_new_job_resumes(jobs: Jobs, tmp_path: Path, long_reference):
    config, (ref_model, ref_optimizer) = long_reference
    shutil.copy(config, tmp_path / "long.toml")
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    marker = tmp_path / "resubmitted"
    qsub = _argv_recorder(stub_dir / "fake-qsub", marker)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    pbs = {"PBS_O_WORKDIR": str(tmp_path), "PBS_NODEFILE": str(nodefile), "DPTRAIN_MPIRUN": MPIEXEC}
    env = _job_env(PBS_JOBID="77.pbsserver", DPTRAIN_CONFIG="long.toml", DPTRAIN_REQUEUE_CMD=str(qsub),
                   DPTRAIN_PBS_SCRIPT=str(PBS), **pbs)
    out, log = tmp_path / "runs" / "pbs-77.pbsserver", tmp_path / "job-1.txt"
    elsewhere = tmp_path / "elsewhere"  # PBS starts the job in the home folder
    elsewhere.mkdir()

    batch = jobs.start(["bash", str(PBS)], log, env=env, cwd=elsewhere)
    wait_for_path(out / "checkpoints" / "latest", batch, log)
    # qdel or preemption: PBS signals every process of the job's session (the batch shell and
    # mpiexec; mpiexec put the ranks in sessions of their own, and relays the signal to them).
    os.killpg(batch.pid, signal.SIGTERM)
    code = wait_for_end(batch, log)
    output = log.read_text()
    assert code == 0, output  # resubmitted: not a failure
    assert "got SIGTERM" in output and STOPPED.search(output), output
    argv = _recorded_argv(marker)
    assert len(argv) == 3 and argv[0] == "-v" and argv[2] == str(PBS), argv
    variables = dict(item.split("=", 1) for item in argv[1].split(","))
    assert variables["DPTRAIN_OUT"] == "runs/pbs-77.pbsserver", variables  # the same run folder
    assert variables["DPTRAIN_CONFIG"] == "runs/pbs-77.pbsserver/config.toml", variables  # its resolved config
    assert variables["DPTRAIN_MPIRUN"] == MPIEXEC and variables["DPTRAIN_REQUEUE_CMD"] == str(qsub)
    latest = (out / "checkpoints" / "latest").resolve()
    step = meta_of(latest)["step"]
    load_checkpoint(latest)
    assert step < LONG_EPOCHS * LONG_STEPS_PER_EPOCH
    wait_no_ranks_left(tmp_path)

    # The new job: another id, only the variables passed with qsub -v.
    marker.unlink()
    env2 = _job_env(PBS_JOBID="78.pbsserver", **{**pbs, **variables})
    result = subprocess.run(["bash", str(PBS)], env=env2, cwd=elsewhere, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "resuming from" in output and f"(step {step}," in output, output
    assert not marker.exists()  # finished: not resubmitted again
    assert not (tmp_path / "runs" / "pbs-78.pbsserver").exists()
    model, optimizer = final_arrays(out)
    assert_bitwise_equal(model, ref_model, "final model (PBS resubmission vs uninterrupted)")
    assert_bitwise_equal(optimizer, ref_optimizer, "final optimizer state (PBS resubmission vs uninterrupted)")
