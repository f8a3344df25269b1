"""The batch scripts in launch/: syntax, the command they build, how they handle the scheduler's
signals and dptrain's exit status 75 (requeue), and real runs under a fake scheduler.

The end-to-end tests run the scripts with bash on this machine, with the variables Slurm or PBS
would set, 2 MPI ranks started by the local mpiexec (Slurm's srun is a stub that calls mpiexec).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm.sbatch"
PBS = ROOT / "launch" / "pbs.sh"
SCRIPTS = [pytest.param(SLURM, id="slurm"), pytest.param(PBS, id="pbs")]

TIMEOUT = 120  # seconds; a hang fails the test instead of blocking the suite
BIN = Path(sys.executable).parent  # the virtualenv's bin: dptrain, and mpiexec if from PyPI
QUICK_CONFIG = "[train]\nepochs = 2\n\n[checkpoint]\nevery_epochs = 0\n"

# Set by a scheduler, an MPI launcher, or the user: none may leak in from the test's own environment.
_SCRUBBED_PREFIXES = ("SLURM_", "SRUN_", "SBATCH_", "PBS_", "PMI_", "PMIX_", "OMPI_", "MV2_", "HYDRA_",
                      "DPTRAIN_")
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _find_mpiexec() -> str | None:
    for name in ("mpiexec", "mpirun"):
        if os.access(BIN / name, os.X_OK):
            return str(BIN / name)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _base_env(stub_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_SCRUBBED_PREFIXES) and k not in _THREAD_VARIABLES}
    path = [str(BIN), env.get("PATH", "/usr/bin:/bin")]
    if stub_dir is not None:
        path.insert(0, str(stub_dir))
    env["PATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


def _run(script: Path, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _recorder(stub_dir: Path, name: str, log: Path, exit_code: int = 0) -> Path:
    """A stub launcher that records its argv (NUL-separated) and thread variables, then exits."""
    return _write_executable(stub_dir / name, f"""#!/bin/bash
printf '%s\\0' "$@" > '{log}'
printf '%s\\0' "$OMP_NUM_THREADS" "$OPENBLAS_NUM_THREADS" "$MKL_NUM_THREADS" > '{log}.threads'
exit {exit_code}
""")


def _recorded(log: Path) -> tuple[list[str], list[str]]:
    argv = log.read_text().split("\0")[:-1]
    threads = Path(f"{log}.threads").read_text().split("\0")[:-1]
    return argv, threads


@pytest.fixture
def mpiexec() -> str:
    found = _find_mpiexec()
    if found is None:
        pytest.skip("no mpiexec or mpirun found")
    return found


def _fake_srun(tmp_path: Path, mpiexec: str) -> Path:
    """A stub dir whose `srun` starts $SLURM_NTASKS ranks with the local mpiexec."""
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    _write_executable(stub_dir / "srun", f'#!/bin/sh\nexec \'{mpiexec}\' -n "$SLURM_NTASKS" "$@"\n')
    return stub_dir


def _slurm_env(stub_dir: Path, **extra: str) -> dict[str, str]:
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "1",
             "SLURM_JOB_NODELIST": "localhost"}
    return _base_env(stub_dir, **{**slurm, **extra})


def _pbs_env(tmp_path: Path, mpiexec: str, **extra: str) -> dict[str, str]:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    return _base_env(None, PBS_JOBID="77.pbsserver", PBS_O_WORKDIR=str(tmp_path), PBS_NODEFILE=str(nodefile),
                     DPTRAIN_MPIRUN=mpiexec, **extra)


# ---------------------------------------------------------------------------------------------
# Syntax and the command line built


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash_and_executable(script: Path):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_slurm_headers():
    text = SLURM.read_text()
    for line in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --nodes=", "#SBATCH --ntasks-per-node=", "#SBATCH --time=", "#SBATCH --output=",
                 "#SBATCH --job-name="):
        assert line in text


def test_pbs_headers():
    text = PBS.read_text()
    for line in ("#PBS -N ", "#PBS -l select=", "#PBS -l walltime=", "#PBS -j oe", "#PBS -r y"):
        assert line in text


def test_slurm_command_with_srun(tmp_path: Path):
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    log = tmp_path / "argv"
    _recorder(stub_dir, "srun", log, exit_code=7)
    env = _slurm_env(stub_dir, SLURM_CPUS_PER_TASK="3", MKL_NUM_THREADS="5",
                     DPTRAIN_CONFIG="my config.toml", DPTRAIN_OUT="out dir")
    result = _run(SLURM, env, tmp_path, "--set", "train.epochs=3", "a  b")
    assert result.returncode == 7, result.stderr  # the launcher's exit status is the job's
    argv, threads = _recorded(log)
    assert argv == [shutil.which("dptrain", path=env["PATH"]), "train", "--config", "my config.toml", "--out", "out dir",
                    "--resume", "auto", "--set", "train.epochs=3", "a  b"]
    assert threads == ["3", "3", "5"]  # SLURM_CPUS_PER_TASK, unless already set


def test_slurm_command_with_mpiexec_and_defaults(tmp_path: Path):
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    log = tmp_path / "argv"
    _recorder(stub_dir, "my-mpiexec", log)
    env = _slurm_env(stub_dir, DPTRAIN_MPIRUN="my-mpiexec", DPTRAIN_PYTHON="python3")
    del env["SLURM_CPUS_PER_TASK"]
    result = _run(SLURM, env, tmp_path)
    assert result.returncode == 0, result.stderr
    argv, threads = _recorded(log)
    assert argv == ["-n", "2", "python3", "-m", "dptrain", "train", "--config", "digits_mlp",
                    "--out", "runs/slurm-4242", "--resume", "auto"]
    assert threads == ["1", "1", "1"]


def test_slurm_outside_a_job_is_refused(tmp_path: Path):
    result = _run(SLURM, _base_env(), tmp_path)
    assert result.returncode != 0
    assert "sbatch" in result.stderr


def test_pbs_command(tmp_path: Path):
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    log = tmp_path / "argv"
    launcher = _recorder(stub_dir, "mpiexec", log, exit_code=3)
    env = _pbs_env(tmp_path, str(launcher), OMP_NUM_THREADS="2", DPTRAIN_CONFIG="")
    result = _run(PBS, env, ROOT, "--set", "x=$(y)")
    assert result.returncode == 3, result.stderr
    argv, threads = _recorded(log)
    dptrain = shutil.which("dptrain", path=env["PATH"])
    assert argv == ["-n", "2", "-hostfile", str(tmp_path / "nodefile"), dptrain, "train",
                    "--out", "runs/pbs-77.pbsserver", "--resume", "auto", "--set", "x=$(y)"]
    assert threads == ["2", "2", "2"]

    env.update(DPTRAIN_HOSTFILE_FLAG="", DPTRAIN_NP="3")
    result = _run(PBS, env, ROOT)
    assert result.returncode == 3, result.stderr
    argv, _ = _recorded(log)
    assert argv[:3] == ["-n", "3", dptrain]


def test_pbs_without_nodefile_is_refused(tmp_path: Path):
    result = _run(PBS, _base_env(), tmp_path)
    assert result.returncode == 2
    assert "PBS_NODEFILE" in result.stderr


# ---------------------------------------------------------------------------------------------
# Exit status 75 and signals, with a stub launcher (no MPI)


def _signal_recorder(stub_dir: Path, name: str, log: Path, exit_code: int = 0) -> Path:
    """A stub launcher: on SIGUSR1/SIGTERM it appends the signal's name to log, then exits with 75
    0.3 s later (the checkpoint); without a signal it exits with exit_code. It creates log.ready
    once its traps are set."""
    return _write_executable(stub_dir / name, f"""#!/bin/bash
trap 'echo USR1 >> "{log}"; sleep 0.3; exit 75' USR1
trap 'echo TERM >> "{log}"; sleep 0.3; exit 75' TERM
: > '{log}.ready'
for i in $(seq 200); do sleep 0.05; done
exit {exit_code}
""")


def _requeue_recorder(stub_dir: Path, log: Path, exit_code: int = 0) -> Path:
    return _write_executable(stub_dir / "requeue", f"""#!/bin/sh
printf '%s\\0' "$@" > '{log}'
exit {exit_code}
""")


def _start_and_signal(script: Path, env: dict[str, str], cwd: Path, log: Path, sig: signal.Signals | None,
                      whole_job: bool = False) -> subprocess.CompletedProcess:
    """Run script; once the stub launcher is ready, send sig to the batch shell (or, whole_job, to
    every process of its session, as PBS does)."""
    proc = subprocess.Popen(["bash", str(script)], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if sig is not None:
            deadline = time.monotonic() + 30
            while not Path(f"{log}.ready").exists():
                assert proc.poll() is None and time.monotonic() < deadline, "the stub launcher did not start"
                time.sleep(0.01)
            if whole_job:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _signals(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.mark.parametrize("launcher", ["srun", "my-mpiexec"])
def test_slurm_relays_usr1_and_requeues_on_75(tmp_path: Path, launcher: str):
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    log, requeued = tmp_path / "signals", tmp_path / "requeued"
    _signal_recorder(stub_dir, launcher, log)
    env = _slurm_env(stub_dir, DPTRAIN_MPIRUN=launcher, DPTRAIN_REQUEUE_CMD=str(_requeue_recorder(stub_dir, requeued)))
    result = _start_and_signal(SLURM, env, tmp_path, log, signal.SIGUSR1)
    assert result.returncode == 0, result.stderr  # requeued: the job did not fail
    assert _signals(log) == ["USR1"]  # passed on once; the wait went on until the launcher's exit
    assert requeued.read_text().split("\0")[:-1] == ["4242"]
    assert "requeueing" in result.stderr


@pytest.mark.parametrize("launcher, relayed", [("srun", "USR1"), ("my-mpiexec", "TERM")])
def test_slurm_on_sigterm_relays_but_does_not_requeue(tmp_path: Path, launcher: str, relayed: str):
    # srun would answer SIGTERM with SIGKILL to its tasks: it gets USR1 instead. A SIGTERM means
    # scancel, preemption or shutdown: Slurm decides what happens to the job, no requeue here.
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    log, requeued = tmp_path / "signals", tmp_path / "requeued"
    _signal_recorder(stub_dir, launcher, log)
    env = _slurm_env(stub_dir, DPTRAIN_MPIRUN=launcher, DPTRAIN_REQUEUE_CMD=str(_requeue_recorder(stub_dir, requeued)))
    result = _start_and_signal(SLURM, env, tmp_path, log, signal.SIGTERM)
    assert result.returncode == 75, result.stderr
    assert _signals(log) == [relayed]
    assert not requeued.exists()
    assert "not requeued" in result.stderr


@pytest.mark.parametrize("launcher_exit, requeue_exit, expected", [(75, 0, 0), (75, 1, 75), (3, 0, 3), (0, 0, 0)])
def test_slurm_exit_status(tmp_path: Path, launcher_exit: int, requeue_exit: int, expected: int):
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    requeued = tmp_path / "requeued"
    _recorder(stub_dir, "srun", tmp_path / "argv", exit_code=launcher_exit)
    env = _slurm_env(stub_dir, DPTRAIN_REQUEUE_CMD=str(_requeue_recorder(stub_dir, requeued, requeue_exit)))
    result = _run(SLURM, env, tmp_path)
    assert result.returncode == expected, result.stderr
    assert requeued.exists() == (launcher_exit == 75)


def test_pbs_waits_without_relaying_and_resubmits_the_same_run(tmp_path: Path):
    # PBS signals every process of the job's session, mpiexec included: the shell must not pass the
    # signal on a second time (dptrain takes a second signal as "quit at once").
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    log, resubmitted = tmp_path / "signals", tmp_path / "resubmitted"
    launcher = _signal_recorder(stub_dir, "mpiexec", log)
    out = tmp_path / "runs" / "a,b"  # a comma: quoted for qsub -v
    out.mkdir(parents=True)
    (out / "config.toml").write_text("")  # the resolved config dptrain writes into the run folder
    env = _pbs_env(tmp_path, str(launcher), DPTRAIN_OUT="runs/a,b", DPTRAIN_HOSTFILE_FLAG="",
                   DPTRAIN_REQUEUE_CMD=f"{_requeue_recorder(stub_dir, resubmitted)} -l walltime=2:00:00")
    # DPTRAIN_PBS_SCRIPT defaults to launch/pbs.sh in the submit folder, missing here: not resubmitted.
    result = _start_and_signal(PBS, env, tmp_path, log, signal.SIGTERM, whole_job=True)
    assert result.returncode == 75, result.stderr
    assert _signals(log) == ["TERM"]  # once, from "PBS"
    assert f"{tmp_path / 'launch' / 'pbs.sh'} not found" in result.stderr
    assert not resubmitted.exists()

    log.unlink()
    Path(f"{log}.ready").unlink()
    env["DPTRAIN_PBS_SCRIPT"] = str(PBS)
    result = _start_and_signal(PBS, env, tmp_path, log, signal.SIGTERM, whole_job=True)
    assert result.returncode == 0, result.stderr
    assert _signals(log) == ["TERM"]
    argv = resubmitted.read_text().split("\0")[:-1]
    variables = ("DPTRAIN_CONFIG='runs/a,b/config.toml',DPTRAIN_OUT='runs/a,b',"
                 f"DPTRAIN_MPIRUN={launcher},DPTRAIN_HOSTFILE_FLAG=,DPTRAIN_PBS_SCRIPT={PBS},"
                 f"DPTRAIN_REQUEUE_CMD={env['DPTRAIN_REQUEUE_CMD']}")
    assert argv == ["-l", "walltime=2:00:00", "-v", variables, str(PBS)]


@pytest.mark.parametrize("launcher_exit, resubmit_exit, expected", [(75, 0, 0), (75, 1, 75), (1, 0, 1)])
def test_pbs_exit_status(tmp_path: Path, launcher_exit: int, resubmit_exit: int, expected: int):
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    resubmitted = tmp_path / "resubmitted"
    launcher = _recorder(stub_dir, "mpiexec", tmp_path / "argv", exit_code=launcher_exit)
    env = _pbs_env(tmp_path, str(launcher), DPTRAIN_CONFIG="my.toml", DPTRAIN_PBS_SCRIPT=str(PBS),
                   DPTRAIN_REQUEUE_CMD=str(_requeue_recorder(stub_dir, resubmitted, resubmit_exit)))
    result = _run(PBS, env, ROOT)
    assert result.returncode == expected, result.stderr
    assert resubmitted.exists() == (launcher_exit == 75)
    if launcher_exit == 75:  # no config.toml in the run folder: the config the job was given
        assert resubmitted.read_text().split("\0")[1].startswith("DPTRAIN_CONFIG=my.toml,DPTRAIN_OUT=runs/pbs-77.pbsserver,")


# ---------------------------------------------------------------------------------------------
# End to end: 2 ranks of real training


@pytest.mark.slow
def test_slurm_end_to_end(tmp_path: Path, mpiexec: str):
    fake_srun = _fake_srun(tmp_path, mpiexec)
    (tmp_path / "quick.toml").write_text(QUICK_CONFIG)
    # The job starts in the submit folder: a relative config and the default run folder resolve there.
    result = _run(SLURM, _slurm_env(fake_srun, DPTRAIN_CONFIG="quick.toml"), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2 ranks" in output
    assert (tmp_path / "runs" / "slurm-4242" / "checkpoints" / "latest" / "model.npz").is_file(), output


@pytest.mark.slow
def test_pbs_end_to_end(tmp_path: Path, mpiexec: str):
    (tmp_path / "quick.toml").write_text(QUICK_CONFIG)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Started elsewhere (as PBS does), the script changes to $PBS_O_WORKDIR; the real mpiexec reads
    # the node file through -hostfile.
    result = _run(PBS, _pbs_env(tmp_path, mpiexec, DPTRAIN_CONFIG="quick.toml"), elsewhere)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "-hostfile" in output  # the command echoed to the log
    assert "2 ranks" in output
    assert (tmp_path / "runs" / "pbs-77.pbsserver" / "checkpoints" / "latest" / "model.npz").is_file(), output
    assert not (elsewhere / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_extra_arguments_reach_dptrain_verbatim(script: Path, tmp_path: Path, mpiexec: str):
    (tmp_path / "quick.toml").write_text(QUICK_CONFIG)
    (tmp_path / "decoy").write_text("")  # a glob `*` that the shell expanded would show up as this name
    value = "a  b;$(touch pwned);`touch pwned2`|*"
    if script == SLURM:
        env = _slurm_env(_fake_srun(tmp_path, mpiexec), DPTRAIN_CONFIG="quick.toml",
                         DPTRAIN_OUT=str(tmp_path / "out"))
    else:
        env = _pbs_env(tmp_path, mpiexec, DPTRAIN_CONFIG="quick.toml", DPTRAIN_OUT=str(tmp_path / "out"))
    result = _run(script, env, tmp_path, "--set", f"train.epochs={value}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert value in result.stderr  # "train.epochs must be an integer, got '<value>'"
    assert "decoy" not in result.stderr
    assert not list(tmp_path.rglob("pwned*"))
    assert not list(ROOT.glob("pwned*"))
    assert not (tmp_path / "out" / "checkpoints").exists()
