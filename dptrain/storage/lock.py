"""One run per folder: a lock file that the training job's rank 0 holds while it runs.

``<out>/.dptrain.lock`` holds JSON: the host, the pid and the start time of the holder. It is created
with ``O_CREAT | O_EXCL``, which is atomic on local file systems, on NFS (version 3 and later) and on
Lustre; advisory locks (``fcntl``/``flock``) are not used, as they are not honoured alike by every NFS
or Lustre mount of a cluster. While the job runs, a daemon thread touches the file every
``HEARTBEAT_S`` seconds. A second job finds the file and:

* exits 2 naming the holder (host, pid, start time) when the holder may be alive;
* takes the lock over, with a warning, when the holder is dead: a pid that no longer exists on this
  host, or, from any host, a file not touched for ``STALE_S`` seconds (its node crashed or was
  killed: a requeued job on another node can continue with ``--resume auto``).

The job removes the file when it ends, also after a stop signal or an error; a job killed outright
(SIGKILL, MPI_Abort, a node failure) leaves it, to be taken over as above.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dptrain.errors import UserError

LOCK_NAME = ".dptrain.lock"
HEARTBEAT_S = 30.0  # how often a running job touches its lock
STALE_S = 300.0  # a lock untouched for this long belongs to a dead job, whatever its host


class RunLock:
    """The lock of the run folder ``out_dir``: :meth:`acquire`, then :meth:`release` when the job ends."""

    def __init__(self, out_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def acquire(self, warn: Callable[[str], None]) -> RunLock:
        """Take the lock (creating the run folder if needed); UserError naming the holder if a live job
        has it; a dead holder's lock is taken over with a line to ``warn``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a race with another job taking over the same stale lock: try again
            if self._create():
                break
            holder = self._read_holder()
            dead = self._dead(holder)
            if dead is None:
                raise UserError(f"--out {self.path.parent}: in use by another job ({describe(holder)}); wait for "
                                f"it, or choose another folder (if it is dead, delete {self.path})")
            warn(f"warning: taking over the lock of {self.path.parent} from a dead job ({describe(holder)}: {dead})")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        else:
            raise UserError(f"--out {self.path.parent}: could not take its lock {self.path} (another job keeps "
                            f"taking it)")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="dptrain-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file, if this job holds it."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._read_holder().get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False

    # -- the file -------------------------------------------------------------------------------

    def _create(self) -> bool:
        """Create the lock file holding this job's identity; False if it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "started_unix": time.time()}
        with os.fdopen(fd, "w") as fh:
            json.dump(holder, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _read_holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return {"gone": True}
        except (OSError, ValueError):
            return {}  # being written, or damaged: judged by its age alone

    def _dead(self, holder: dict) -> str | None:
        """Why the holder is dead, or None if it may be alive."""
        if holder.get("gone"):
            return "its lock file is gone"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "its lock file is gone"
        if age > self.stale_s:
            return f"its lock was last touched {age:.0f} s ago"
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            return f"no process {pid} on this host"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the folder went away or is read-only now: the job itself will say so


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def describe(holder: dict) -> str:
    """'host node7, pid 4711, started 2026-12-06 22:05:03' (what is known of it)."""
    parts = [f"host {holder['host']}" if "host" in holder else None, f"pid {holder['pid']}" if "pid" in holder else None,
             f"started {holder['started']}" if "started" in holder else None]
    return ", ".join(p for p in parts if p) or "an unreadable lock file"
