"""Distributed runs compared with the single-process run, and fail-fast on one rank's error."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

from helpers import MPIEXEC, assert_arrays_close, dptrain, load_arrays, needs_mpiexec, run

# 233 samples, val_fraction 0.2 -> 186 training samples; global batch 23 -> 8 full batches and a
# last one of 2 samples: 23 does not divide by 2, 3 or 4, and at 3 or 4 ranks some ranks have no
# sample in the last step.
EXACT_CONFIG = """
seed = 7
[data]
name = "synthetic"
n_samples = 233
n_features = 12
n_classes = 5
val_fraction = 0.2
[model]
hidden = [32, 16]
activation = "tanh"
[train]
epochs = 3
batch_size = 23
dtype = "float64"
[optim]
lr = 0.1
momentum = 0.9
nesterov = true
weight_decay = 0.001
[checkpoint]
every_epochs = 0
"""


@pytest.fixture(scope="module")
def single_process_weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    (tmp / "exact.toml").write_text(EXACT_CONFIG)
    result = dptrain("train", "--config", str(tmp / "exact.toml"), "--out", str(tmp / "run"), "--comm", "single")
    assert result.returncode == 0, result.stderr
    return tmp / "exact.toml", load_arrays(tmp / "run" / "checkpoints" / "latest" / "model.npz")


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_same_weights_at_any_world_size(ranks, single_process_weights, tmp_path):
    config, expected = single_process_weights
    result = dptrain("train", "--config", str(config), "--out", str(tmp_path / "run"), ranks=ranks)
    assert result.returncode == 0, result.stderr
    assert f"{ranks} rank" in result.stdout
    got = load_arrays(tmp_path / "run" / "checkpoints" / "latest" / "model.npz")
    assert_arrays_close(got, expected, rtol=1e-9)


@needs_mpiexec
def test_only_rank_0_prints(tmp_path, single_process_weights):
    config, _ = single_process_weights
    result = dptrain("train", "--config", str(config), "--out", str(tmp_path / "run"), ranks=3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("epoch 1/3") == 1
    assert result.stdout.count("resolved config") == 1
    assert result.stderr == ""


FAULTY_SCRIPT = textwrap.dedent("""
    import numpy as np
    from dptrain import Callback, Dense, ReLU, SGD, Sequential, SoftmaxCrossEntropy, Trainer, make_comm
    from dptrain.data import make_synthetic

    comm = make_comm()
    data = make_synthetic(400, 8, 3, seed=0)
    model = Sequential([Dense(16), ReLU(), Dense(3, init="xavier")], 8)
    model.init_params(np.random.default_rng(0))

    class FailOnRank1(Callback):
        def on_step_end(self, trainer, step, loss):
            if comm.rank == 1 and step == 5:
                raise RuntimeError("injected failure on rank 1")

    optimizer = SGD(model.param_buffer, model.grad_buffer, lr=0.1)
    Trainer(model, SoftmaxCrossEntropy(), optimizer, data, batch_size=16, epochs=100000, comm=comm,
            callbacks=[FailOnRank1()], log=None).fit()
""")


@needs_mpiexec
def test_one_rank_raising_ends_the_job_quickly(tmp_path):
    """A script using the API, with no error handling of its own: the other rank must not hang."""
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY_SCRIPT)
    start = time.monotonic()
    result = run([MPIEXEC, "-n", "2", sys.executable, str(script)], timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 30
    assert "[rank 1] RuntimeError: injected failure on rank 1" in result.stderr
    assert "Traceback" in result.stderr


@needs_mpiexec
def test_bad_config_under_mpi_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nbatch_size = 0\n")
    result = dptrain("train", "--config", str(bad), "--out", str(tmp_path / "run"), ranks=2)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: config {bad}: train.batch_size must be >= 1, got 0"]
    assert not (tmp_path / "run").exists()


@needs_mpiexec
def test_data_file_missing_on_one_rank_names_that_rank(tmp_path):
    """A different input on one node: the job stops at set-up with exit 2, naming the rank."""
    script = tmp_path / "one_rank_missing.py"
    script.write_text(textwrap.dedent("""
        import sys
        from dptrain.parallel.comm import make_comm
        from dptrain.errors import ExitQuietly, UserError
        comm = make_comm()
        error = UserError("data file x.npz: not found") if comm.rank == 1 else None
        try:
            comm.raise_if_any_failed(error)
        except ExitQuietly as exc:
            sys.exit(exc.code)
    """))
    result = run([MPIEXEC, "-n", "2", sys.executable, str(script)], timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error (rank 1): data file x.npz: not found"


THREADS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from threadpoolctl import threadpool_info
    from dptrain.parallel.comm import make_comm
    from dptrain.optim import SGD

    comm = make_comm()  # caps the threads, and keeps the cap as comm.thread_limit
    SGD(np.zeros(3), np.zeros(3), lr=0.1, momentum=0.9)  # SciPy's BLAS, if it bundles its own: 1 thread
    scipys_own = lambda info: "/scipy.libs/" in info["filepath"] or "/scipy/.dylibs/" in info["filepath"]
    numpy_blas = [i["num_threads"] for i in threadpool_info() if not scipys_own(i)]
    others = [i["num_threads"] for i in threadpool_info() if scipys_own(i)]
    line = " ".join(map(str, [comm.rank, comm.thread_limit, *sorted(set(numpy_blas)), "|", *sorted(set(others))]))
    with open(f"{sys.argv[1]}/rank{comm.rank}.txt", "w") as fh:  # not stdout: the ranks' lines can interleave
        fh.write(line)
""")


@needs_mpiexec
def test_bare_mpirun_caps_the_threads_of_every_blas(tmp_path):
    """Without thread variables, each of 2 ranks gets cores / 2 BLAS threads (SciPy's own BLAS, used by
    SGD, always 1: two spinning thread pools in one process slow each other down)."""
    from dptrain.runtime.threads import threads_per_rank

    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    env = {k: "" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    result = run([MPIEXEC, "-n", "2", sys.executable, str(script), str(tmp_path)], **env)
    assert result.returncode == 0, result.stderr
    expected = threads_per_rank(2, environ={})
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert lines == [f"0 {expected} {expected} | 1", f"1 {expected} {expected} | 1"]
