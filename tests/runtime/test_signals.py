"""StopOnSignal in one process: first signal = stop request, repeats ignored briefly, then fatal."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

from dptrain.runtime.signals import StopOnSignal

from helpers import run


def _wait_until(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_first_signal_requests_a_stop_and_quick_repeats_are_ignored():
    with StopOnSignal(grace_seconds=5.0) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_until(lambda: stop.requested)
        assert stop.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # within the grace period: ignored, we are still alive
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored on exit


SECOND_SIGNAL = textwrap.dedent("""
    import os, signal, time
    import numpy as np
    from dptrain.runtime.signals import StopOnSignal
    with StopOnSignal(grace_seconds=0.2) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        while not stop.requested:
            time.sleep(0.001)
        time.sleep(0.3)
        print("first handled", flush=True)
        a = np.ones((1500, 1500))
        t0 = time.monotonic()
        # the second signal arrives while the main thread is busy in C code (matrix multiplies)
        import threading
        threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        while time.monotonic() - t0 < 10:
            a @ a
    print("survived", flush=True)
""")


def test_a_second_signal_after_the_grace_period_kills_even_inside_c_code(tmp_path):
    script = tmp_path / "second.py"
    script.write_text(SECOND_SIGNAL)
    start = time.monotonic()
    result = run([sys.executable, str(script)], timeout=30)
    assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr
    assert "first handled" in result.stdout and "survived" not in result.stdout
    assert time.monotonic() - start < 8
