"""One run per folder: a second job on the same --out is refused naming the holder; a dead holder's
lock is taken over with a warning; the lock goes when the job ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.storage.lock import LOCK_NAME, RunLock

from helpers import TIMEOUT


def _write_lock(folder, host, pid, age_s=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-12-06 10:00:00"}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.slow
def test_a_second_job_on_the_same_folder_exits_2_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "dptrain", "train", "--out", str(out), "--quiet",
                              "--set", "train.epochs=400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "config.toml").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        config_before = (out / "config.toml").read_text()
        result = CliRunner().invoke(main, ["train", "--out", str(out), "--resume", "auto", "--set", "train.epochs=1"])
        assert result.exit_code == 2, result.output
        assert f"in use by another job (host {socket.gethostname()}, pid {first.pid}, started " in result.output
        assert (out / "config.toml").read_text() == config_before  # the second job wrote nothing
    finally:
        first.terminate()
        first.communicate(timeout=TIMEOUT)
    assert first.returncode == 75  # stopped by the signal after a checkpoint: it released its lock
    assert not (out / LOCK_NAME).exists()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "run"
    _write_lock(out, socket.gethostname(), _dead_pid())
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--quiet", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert f"warning: taking over the lock of {out} from a dead job" in result.output
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_lock_from_another_host_counts_until_it_is_stale(tmp_path):
    out = tmp_path / "run"
    lines = []
    _write_lock(out, "node-elsewhere", 12345, age_s=10)
    with pytest.raises(UserError, match="in use by another job \\(host node-elsewhere, pid 12345"):
        RunLock(out).acquire(lines.append)
    _write_lock(out, "node-elsewhere", 12345, age_s=3600)  # its node died: untouched for an hour
    lock = RunLock(out).acquire(lines.append)
    assert "last touched 3600 s ago" in lines[-1]
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire(print)
    try:
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5
    finally:
        lock.release()
