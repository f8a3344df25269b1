"""Divergence, desync and disagreement: every rank stops at the same point with a clear message."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain import SGD, Dense, ReLU, Sequential, SoftmaxCrossEntropy, Trainer
from dptrain.cli import main
from dptrain.data import make_synthetic
from dptrain.errors import DivergenceError
from dptrain.storage.checkpoint import load_checkpoint, step_dirs

from helpers import MPIEXEC, needs_mpiexec, run


def test_exploding_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--set", "optim.lr=1e30",
                                       "--set", "checkpoint.every_steps=1"])
    assert result.exit_code == 3
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "non-finite" in error[0] and "at step" in error[0]
    failed_step = int(error[0].split("at step ")[1].split()[0])
    last = step_dirs(out / "checkpoints")[-1]
    assert last.name == f"step-{failed_step - 1:08d}"
    assert all(np.isfinite(a).all() for a in load_checkpoint(last).model.values())


class NaNGradientDense(Dense):
    """A Dense layer whose weight gradient is NaN at the given steps (counted by backward calls)."""

    def __init__(self, out_features, bad_steps):
        super().__init__(out_features)
        self.bad_steps, self.calls = set(bad_steps), 0

    def backward(self, dy):
        dx = super().backward(dy)
        self.calls += 1
        if self.calls in self.bad_steps:
            self.grads["weight"][0, 0] = np.nan
        return dx


def _nan_trainer(on_nan, bad_steps):
    data = make_synthetic(64, 4, 3, seed=0)
    model = Sequential([Dense(8), ReLU(), NaNGradientDense(3, bad_steps)], 4, dtype=np.float64)
    model.init_params(np.random.default_rng(0))
    return Trainer(model, SoftmaxCrossEntropy(), SGD(model.param_buffer, model.grad_buffer, lr=0.1), data,
                   batch_size=16, epochs=3, on_nan=on_nan, log=None)


def test_nan_gradient_names_the_step_and_the_layer():
    trainer = _nan_trainer("error", bad_steps=[6])
    with pytest.raises(DivergenceError, match=r"non-finite gradient in layers\.2\.weight \(Dense\(3.*at step 6 \(epoch 2\)"):
        trainer.fit()
    assert trainer.step == 5 and np.isfinite(trainer.model.param_buffer).all()


def test_on_nan_skip_skips_the_update_and_counts_it():
    trainer = _nan_trainer("skip", bad_steps=[2, 7])
    history = trainer.fit()
    assert trainer.skipped_steps == 2 and history[-1]["skipped_steps"] == 2
    assert np.isfinite(trainer.model.param_buffer).all()


def test_on_nan_skip_in_the_cli_log(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--set", "optim.lr=1e30",
                                       "--set", "train.on_nan=skip", "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    assert "skipped_steps" in result.output


DESYNC_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from dptrain import Callback, Dense, ReLU, SGD, Sequential, SoftmaxCrossEntropy, Trainer, make_comm
    from dptrain.data import make_synthetic
    from dptrain.errors import DesyncError

    comm = make_comm()
    data = make_synthetic(200, 6, 3, seed=0)
    model = Sequential([Dense(8), ReLU(), Dense(3, init="xavier")], 6)
    model.init_params(np.random.default_rng(0))

    class Corrupt(Callback):
        def on_step_end(self, trainer, step, loss):
            if comm.rank == 2 and step == 5:
                trainer.model.param_buffer[0] += 1e-3

    trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.param_buffer, model.grad_buffer, lr=0.1), data,
                      batch_size=20, epochs=5, comm=comm, check_sync_every=2, callbacks=[Corrupt()], log=None)
    try:
        trainer.fit()
    except DesyncError as exc:
        if comm.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
""")


@needs_mpiexec
def test_desync_is_detected_naming_the_rank(tmp_path):
    script = tmp_path / "desync.py"
    script.write_text(DESYNC_SCRIPT)
    result = run([MPIEXEC, "-n", "3", sys.executable, str(script)], timeout=60)
    assert result.returncode == 3
    assert result.stderr.strip() == "error: parameters out of sync at step 6: rank 2 differs from rank 0"


CORRUPT = """        if comm.rank == 2 and step == 5:
            trainer.model.param_buffer[0] += 1e-3"""
MISMATCH = """        if step == 5:  # a max on rank 1, a sum on the others: MPI matches them anyway
            (comm.allreduce_max if comm.rank == 1 else comm.allreduce_sum)(np.ones(2))"""
assert CORRUPT in DESYNC_SCRIPT
MISMATCHED_SCRIPT = DESYNC_SCRIPT.replace(CORRUPT, MISMATCH).replace(
    'print(f"error: {exc}", file=sys.stderr)', 'print(exc.details + f"\\nerror: {exc}", file=sys.stderr)')


@needs_mpiexec
def test_ranks_that_made_different_collective_calls_are_named_with_their_last_calls(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCHED_SCRIPT)
    result = run([MPIEXEC, "-n", "3", sys.executable, str(script)], timeout=60)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("error: the ranks made different collective calls before step 6: rank 1 differs from rank 0 "
                         "(each rank's last collectives are listed above)")
    assert "rank 1 made " in result.stderr
    assert any(line.strip().startswith("#") and "allreduce_max 16 B, step 5" in line for line in lines), result.stderr
    assert any(line.strip().startswith("#") and "allreduce_sum 16 B, step 5" in line for line in lines), result.stderr


def _two_folders(tmp_path, config_a, config_b, data_b_seed=0):
    for name, config, seed in (("a", config_a, 0), ("b", config_b, data_b_seed)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "c.toml").write_text(config)
        rng = np.random.default_rng(seed)
        np.savez(folder / "data.npz", x=rng.standard_normal((60, 5)), y=rng.integers(0, 3, 60))


CONFIG = '[data]\nname = "npz"\npath = "data.npz"\n[train]\nepochs = 1\n[optim]\nlr = {lr}\n'


@needs_mpiexec
@pytest.mark.parametrize("lr_b, data_seed_b, what", [
    (0.05, 1, "training data (rank 1 differs from rank 0)"),
    (0.01, 0, "config (rank 1 differs from rank 0)"),
])
def test_ranks_that_disagree_before_step_0_stop_the_job(tmp_path, lr_b, data_seed_b, what):
    """One node with another data file or config (MPMD: each rank starts in its own folder)."""
    _two_folders(tmp_path, CONFIG.format(lr=0.05), CONFIG.format(lr=lr_b), data_seed_b)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dptrain", "train", "--config", "c.toml", "--out", str(out)]
    result = run([MPIEXEC, "-n", "1", "-wdir", str(tmp_path / "a"), *command, ":",
                  "-n", "1", "-wdir", str(tmp_path / "b"), *command], timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ranks disagree before step 0 on: ")
    assert what in lines[0]
    assert not out.exists()  # nothing written: not even config.toml, before every rank has agreed


@needs_mpiexec
def test_agreeing_ranks_in_separate_folders_train(tmp_path):
    _two_folders(tmp_path, CONFIG.format(lr=0.05), CONFIG.format(lr=0.05))
    command = [sys.executable, "-m", "dptrain", "train", "--config", "c.toml", "--out", str(tmp_path / "run")]
    result = run([MPIEXEC, "-n", "1", "-wdir", str(tmp_path / "a"), *command, ":",
                  "-n", "1", "-wdir", str(tmp_path / "b"), *command], timeout=60)
    assert result.returncode == 0, result.stderr


SHARDED_NAN_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from dptrain import Dense, ReLU, SGD, Sequential, SoftmaxCrossEntropy, Trainer, make_comm
    from dptrain.data import make_synthetic
    from dptrain.errors import DivergenceError

    comm = make_comm()

    class NaNAt(Dense):
        '''On one rank, at backward call 3, a NaN at flat index ``at`` of the gradient of ``param``.'''

        def __init__(self, out_features, rank, param, at):
            super().__init__(out_features)
            self.rank, self.param, self.at, self.calls = rank, param, at, 0

        def backward(self, dy, input_grad=True):
            dx = super().backward(dy, input_grad)
            self.calls += 1
            if comm.rank == self.rank and self.calls == 3:
                self.grads[self.param].reshape(-1)[self.at] = np.nan
            return dx

    # 67 parameters in blocks [0, 22), [22, 44), [44, 67): layers.0.weight[25] is rank 1's, layers.2.bias
    # rank 2's; the NaNs come from ranks 2 and 0, and rank 0's own block stays finite
    data = make_synthetic(64, 4, 3, seed=0)
    model = Sequential([NaNAt(8, 2, "weight", 25), ReLU(), NaNAt(3, 0, "bias", 1)], 4, dtype=np.float64)
    model.init_params(np.random.default_rng(0))
    trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.param_buffer, model.grad_buffer, lr=0.1), data,
                      batch_size=16, epochs=2, comm=comm, shard_optimizer=True, clip_norm=float(sys.argv[1]),
                      log=None)
    try:
        trainer.fit()
    except DivergenceError as exc:
        with open(f"{sys.argv[2]}/rank{comm.rank}.txt", "w") as fh:  # a file each: stderr lines may interleave
            fh.write(f"error: {exc}")
        sys.exit(3)
""")


@needs_mpiexec
@pytest.mark.parametrize("clip_norm", ["0", "1"])
def test_sharded_nan_gradient_names_the_lowest_bad_parameter_on_every_rank(tmp_path, clip_norm):
    script = tmp_path / "nan.py"
    script.write_text(SHARDED_NAN_SCRIPT)
    result = run([MPIEXEC, "-n", "3", sys.executable, str(script), clip_norm, str(tmp_path)], timeout=60)
    assert result.returncode == 3
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(3)]
    expected = ("error: non-finite gradient in layers.0.weight (Dense(8, init=he)) at step 3 (epoch 1); "
                "no checkpoint written for it (set train.on_nan = \"skip\" to skip such steps)")
    assert messages == [expected] * 3


def test_an_overflowing_squared_norm_alone_is_not_a_non_finite_gradient():
    """float32 gradients near 1e20 are finite though their squares overflow: the exact search clears them,
    and clipping then scales the update to nothing (norm inf)."""
    data = make_synthetic(16, 4, 3, seed=0).astype(np.float32)
    model = Sequential([Dense(3)], 4, dtype=np.float32)
    model.init_params(np.random.default_rng(0))
    before = model.param_buffer.copy()
    trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.param_buffer, model.grad_buffer, lr=0.1), data,
                      batch_size=16, epochs=1, clip_norm=1.0, log=None)
    original = model.backward

    def huge_backward(dz, **kwargs):
        out = original(dz, **kwargs)
        model.grad_buffer[:] = 1e20
        return out

    model.backward = huge_backward
    trainer.fit()
    assert trainer.skipped_steps == 0 and trainer.last_grad_norm == math.inf
    assert np.array_equal(model.param_buffer, before)  # scaled by clip_norm / inf = 0
