"""The watchdog, with the faults produced for real: a stopped rank (SIGSTOP), a rank asleep inside a
step, ranks that call different collectives, a stop signal to a job that cannot stop.

Each job ends by itself within comm.timeout_s + 30 s, with exit status 124, one line naming the
ranks that did not arrive (rank, host, pid) and the collective the others waited in, and the
stacks and last collectives of every rank that could answer, "[rank r]"-prefixed.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

from background import rank_pid, wait_for_end, wait_for_path, wait_no_ranks_left

from dptrain.storage.checkpoint import load_checkpoint, step_dirs

from helpers import MPIEXEC, needs_mpiexec

TIMEOUT = 2  # comm.timeout_s of these jobs
STOPPED_TIMEOUT = 4  # ... and of the job with a stopped rank: 3.5 s to measure the CPU of the others' wait
BOUND = 30  # the job ends within the timeout plus 30 s
HOST = socket.gethostname()

# ~1-2 ms steps, a checkpoint every 50 steps, far more steps than a test lasts
LONG_CONFIG = """
seed = 0
[data]
name = "synthetic"
n_samples = 4000
n_features = 32
n_classes = 4
[model]
hidden = [64]
[train]
epochs = 500
batch_size = 60
dtype = "float64"
[checkpoint]
every_steps = 50
every_epochs = 0
keep = 2
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


@needs_mpiexec
def test_a_stopped_rank_ends_the_job_within_the_bound_and_is_named_by_the_next(jobs, tmp_path: Path):
    config, out, log = tmp_path / "long.toml", tmp_path / "run", tmp_path / "log.txt"
    config.write_text(LONG_CONFIG)
    proc = jobs.start([MPIEXEC, "-n", "3", sys.executable, "-m", "dptrain", "train", "--config", str(config),
                       "--out", str(out), "--set", f"comm.timeout_s={STOPPED_TIMEOUT}"], log)
    wait_for_path(out / "checkpoints" / "latest", proc, log)
    pids = [rank_pid(out, r) for r in range(3)]
    os.kill(pids[0], signal.SIGSTOP)  # rank 0, which would report: the next rank that can does
    stopped_at = time.monotonic()
    time.sleep(1.5)  # the others wait at full speed for a second, then nap
    cpu_before, wall_before = cpu_seconds(pids[1]) + cpu_seconds(pids[2]), time.monotonic()
    time.sleep(2.0)
    cpu_waiting = cpu_seconds(pids[1]) + cpu_seconds(pids[2]) - cpu_before
    wall_waiting = time.monotonic() - wall_before
    code = wait_for_end(proc, log, timeout=STOPPED_TIMEOUT + BOUND)
    output = log.read_text()
    assert code == 124, output
    assert time.monotonic() - stopped_at < STOPPED_TIMEOUT + BOUND
    line = error_line(output)
    assert line.startswith(f"error: a collective did not complete within comm.timeout_s = {STOPPED_TIMEOUT} s"), line
    assert f"rank 0 ({HOST}, pid {pids[0]}): no answer" in line
    # (the two may wait at different calls of the step: rank 0 stopped partway through the step's exchanges)
    assert "rank 1 waited in " in line or "ranks 1, 2 waited in " in line
    assert "different collectives" not in line and line.endswith("exit status 124")
    for r in (1, 2):  # the live ranks' stacks (the main thread in the wait) and flight recorders
        assert any(s.startswith(f"[rank {r}]") and "in _complete" in s for s in output.splitlines()), output
        assert f"[rank {r}] watchdog: the last 16 of this rank's" in output
    assert cpu_waiting < 0.25 * wall_waiting, f"two waiting ranks used {cpu_waiting:.2f} s of CPU in {wall_waiting:.1f} s"
    wait_no_ranks_left(out)  # the stopped rank too
    for ckpt in step_dirs(out / "checkpoints"):  # every checkpoint written before is intact
        load_checkpoint(ckpt)


STUCK_IN_A_STEP = textwrap.dedent("""
    import time
    import numpy as np
    from dptrain import Dense, Layer, ReLU, Sequential, SGD, SoftmaxCrossEntropy, Trainer, make_comm
    from dptrain.data import make_synthetic

    class StuckOnRank1(Layer):
        '''The identity, except that rank 1 (or every rank) sleeps forever in the forward pass of step 3.'''
        calls = 0
        def forward(self, x, train=True):
            StuckOnRank1.calls += 1
            if comm.rank in ({stuck}) and StuckOnRank1.calls == 3:
                print(f"rank {{comm.rank}} asleep", flush=True)
                time.sleep(10_000)  # a stuck file system, a deadlock
            return x
        def backward(self, dy):
            return dy

    comm = make_comm()
    comm.watchdog.timeout_s = {timeout}
    data = make_synthetic(n_samples=400, n_features=8, n_classes=3, seed=0)
    model = Sequential([Dense(16), StuckOnRank1(), ReLU(), Dense(3)], in_shape=(8,))
    model.init_params(np.random.default_rng(0))
    trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.param_buffer, model.grad_buffer, lr=0.1), data,
                      batch_size=40, epochs=5, comm=comm, log=None)
    trainer.fit()
    print("unreachable", flush=True)
""")


@needs_mpiexec
def test_a_rank_asleep_in_a_step_is_named_with_its_stack(jobs, tmp_path: Path):
    script, log = tmp_path / "stuck.py", tmp_path / "log.txt"
    script.write_text(STUCK_IN_A_STEP.format(timeout=TIMEOUT, stuck="1,"))
    proc = jobs.start([MPIEXEC, "-n", "2", sys.executable, str(script)], log)
    start = time.monotonic()
    code = wait_for_end(proc, log, timeout=TIMEOUT + BOUND + 10)
    output = log.read_text()
    assert code == 124, output
    assert time.monotonic() - start < TIMEOUT + BOUND + 10  # (+ the start of Python and MPI)
    line = error_line(output)
    assert f"rank 1 ({HOST}, pid " in line and "busy in step 3, in no collective" in line, line
    assert "rank 0 waited in iallreduce_sum" in line or "rank 0 waited in allreduce_sum" in line, line
    assert any(s.startswith("[rank 1]") and 'stuck.py", line 14 in forward' in s
               for s in output.splitlines()), output  # where rank 1 is stuck
    assert "unreachable" not in output
    wait_no_ranks_left(tmp_path)


@needs_mpiexec
def test_a_stop_signal_to_a_job_that_cannot_stop_ends_it_after_the_timeout(jobs, tmp_path: Path):
    """Every rank asleep in step 3, none in a collective: only the bound on the stop ends the job."""
    script, log = tmp_path / "stuck.py", tmp_path / "log.txt"
    script.write_text(STUCK_IN_A_STEP.format(timeout=TIMEOUT, stuck="0, 1"))
    proc = jobs.start([MPIEXEC, "-n", "2", sys.executable, str(script)], log)
    deadline = time.monotonic() + 60
    while log.read_text().count("asleep") < 2:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # one SIGTERM, as a scheduler sends
    signalled = time.monotonic()
    code = wait_for_end(proc, log, timeout=TIMEOUT + BOUND)
    output = log.read_text()
    assert code == 124, output
    assert TIMEOUT <= time.monotonic() - signalled < TIMEOUT + BOUND
    line = error_line(output)
    assert line.startswith(f"error: stop signal SIGTERM not honoured within comm.timeout_s = {TIMEOUT} s"), line
    assert "rank 0 (" in line and "rank 1 (" in line and line.count("busy in step 3") == 2, line
    for r in (0, 1):
        assert any(s.startswith(f"[rank {r}]") and 'stuck.py", line 14 in forward' in s for s in output.splitlines())
    wait_no_ranks_left(tmp_path)


DIFFERENT_COLLECTIVES = textwrap.dedent("""
    import numpy as np
    from dptrain import make_comm
    comm = make_comm()
    comm.watchdog.timeout_s = {timeout}
    for step in range(1, 4):
        comm.flight.step = step
        comm.allreduce_sum(np.ones(4))
    comm.flight.step = 4
    if comm.rank == 0:
        comm.broadcast(np.ones(200_000))  # rank 1 skips this broadcast ...
    comm.allreduce_sum(np.ones(4))  # ... and waits in the allreduce, rank 0 in the broadcast
    print("unreachable", flush=True)
""")


@needs_mpiexec
def test_ranks_in_different_collectives_are_named_with_their_last_calls(jobs, tmp_path: Path):
    script, log = tmp_path / "desync.py", tmp_path / "log.txt"
    script.write_text(DIFFERENT_COLLECTIVES.format(timeout=TIMEOUT))
    proc = jobs.start([MPIEXEC, "-n", "2", sys.executable, str(script)], log)
    code = wait_for_end(proc, log, timeout=TIMEOUT + BOUND + 10)
    output = log.read_text()
    assert code == 124, output
    line = error_line(output)
    assert "the ranks waited in different collectives" in line, line
    assert "rank 0 waited in broadcast #4 (1.5 MB) of step 4; rank 1 waited in allreduce_sum #4 (32 B) of step 4" in line
    assert "[rank 0]   #4 broadcast 1.5 MB, step 4, not complete" in output
    assert "[rank 1]   #4 allreduce_sum 32 B, step 4, not complete" in output
    assert "unreachable" not in output
