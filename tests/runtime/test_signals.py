"""StopOnSignal in one process: every stop signal, at any gap, is one stop request; a stop that
cannot come is ended by the watchdog."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest

from dptrain.runtime.signals import StopOnSignal

from helpers import run


def _wait_until(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_the_first_signal_requests_a_stop_and_the_handlers_are_restored_on_exit():
    with StopOnSignal() as stop:
        assert not stop.requested and stop.active
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_until(lambda: stop.requested)
        assert stop.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat: counted, ignored, we are still alive
        assert _wait_until(lambda: stop.repeats == 1)
    assert not stop.active
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored on exit


REPEATS = textwrap.dedent("""
    import os, signal, threading, time
    import numpy as np
    from dptrain.runtime.signals import StopOnSignal
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        # repeats at gaps from 10 ms to 0.6 s, of every stop signal, while the main thread is in C code
        for gap, sig in [(0.01, "SIGTERM"), (0.1, "SIGUSR1"), (0.6, "SIGINT"), (0.01, "SIGTERM")]:
            threading.Timer(gap, lambda s=sig: os.kill(os.getpid(), getattr(signal, s))).start()
            a = np.ones((400, 400))
            t0 = time.monotonic()
            while time.monotonic() - t0 < gap + 0.05:
                a @ a
        stop.keep_ignoring()  # as `dptrain train` does after a stop: the process ends
    print("after the context", stop.received, stop.repeats, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # after the stop: ignored until the process exits
    time.sleep(0.2)
    print("survived", flush=True)
""")


@pytest.mark.slow
def test_any_number_of_stop_signals_at_any_gaps_is_one_request(tmp_path):
    script = tmp_path / "repeats.py"
    script.write_text(REPEATS)
    result = run([sys.executable, str(script)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"after the context {int(signal.SIGTERM)} 4" in result.stdout
    assert "survived" in result.stdout


STUCK = textwrap.dedent("""
    import os, signal, time
    from dptrain.parallel.comm import SingleProcessComm
    from dptrain.runtime.signals import StopOnSignal
    comm = SingleProcessComm()
    comm.watchdog.timeout_s = 1
    with StopOnSignal() as stop:
        comm.watchdog.watch_stop(stop)
        comm.flight.step = 7
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1000)  # stuck where no step boundary comes (in C: no Python handler could run)
    print("unreachable", flush=True)
""")


@pytest.mark.slow
def test_a_stop_that_cannot_come_ends_the_process_after_the_timeout_with_its_stack(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    start = time.monotonic()
    result = run([sys.executable, str(script)], timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 124, result.stdout + result.stderr
    assert elapsed < 1 + 30, elapsed
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: stop signal SIGTERM not honoured within comm.timeout_s = 1 s"), lines[-1]
    assert "busy in step 7" in lines[-1] and lines[-1].endswith("exit status 124")
    assert any(line.startswith("[rank 0]") and "stuck.py\", line 11" in line for line in lines), result.stderr
    assert "unreachable" not in result.stdout
