"""Jobs started in the background by a fault test, and what the test watches of them: a rank's pid,
a file appearing, the end of the job within a deadline, no process left behind.

Every wait has a deadline, so a hang fails the test instead of freezing the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import subprocess_env

START_TIMEOUT = 60  # seconds from the start to the first checkpoint
STOP_TIMEOUT = 30  # seconds from a signal to the end of the job


class Jobs:
    """Processes started in the background by one test; whatever is left is killed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        with open(log, "w") as fh:  # a file, not a pipe: nothing blocks if nobody reads it
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env if env is not None else subprocess_env(), cwd=cwd,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: bash, mpiexec
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
        for pid in pids_with_argument_under(self.tmp_path):  # ranks (mpiexec puts them in own sessions)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def proc_entries():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield entry


def pids_with_argument_under(folder: Path) -> list[int]:
    """Live processes working in ``folder`` or with an argument inside it (started by this test)."""
    prefix = str(folder).encode()
    found = []
    for entry in proc_entries():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd").encode()
        except OSError:
            continue
        if not args[0]:
            continue  # a zombie
        if (cwd == prefix or cwd.startswith(prefix + b"/") or any(a.startswith(prefix) for a in args)) \
                and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def rank_pid(out: Path, rank: int) -> int:
    """The process of ``rank`` of the run writing to ``out``: PMI_RANK in its environment and
    ``out`` among its arguments."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in proc_entries():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                if str(out).encode() not in args:
                    continue
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PMI_RANK={rank}".encode() in env:
                return int(entry.name)
        time.sleep(0.02)
    raise AssertionError(f"no process of rank {rank} for {out}")


def wait_for_path(path: Path, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() or path.is_symlink()):
        if proc.poll() is not None:
            pytest.fail(f"the job ended with status {proc.returncode} before {path} appeared:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s:\n{log.read_text()}")
        time.sleep(0.02)


def wait_for_end(proc: subprocess.Popen, log: Path, timeout: float = STOP_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not end within {timeout} s:\n{log.read_text()}")


def wait_no_ranks_left(folder: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (left := pids_with_argument_under(folder)):
        if time.monotonic() > deadline:
            pytest.fail(f"processes still running after the job ended: {left}")
        time.sleep(0.05)
