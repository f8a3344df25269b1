"""Bucketed, overlapped, compressed and accumulated gradient exchange against the plain path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dptrain import Dense, ReLU, Sequential, Tanh
from dptrain.parallel.exchange import plan_buckets

from helpers import assert_arrays_close, dptrain, load_arrays, needs_mpiexec

CONFIG = """
seed = 5
[data]
name = "synthetic"
n_samples = 233
n_features = 12
n_classes = 5
[model]
hidden = [32, 24, 16]
activation = "tanh"
[train]
epochs = 2
batch_size = 23
dtype = "float64"
[optim]
lr = 0.1
momentum = 0.9
[checkpoint]
every_epochs = 0
"""


def test_buckets_are_layer_aligned_contiguous_and_last_layer_first():
    model = Sequential([Dense(64), ReLU(), Dense(32), Tanh(), Dense(16), ReLU(), Dense(4)], 10)
    sizes = {s.layer_index: 0 for s in model.param_specs}
    for s in model.param_specs:
        sizes[s.layer_index] += s.size
    buckets = plan_buckets(model, bucket_bytes=1)  # every layer its own bucket
    assert [b.first_layer for b in buckets] == [6, 4, 2, 0]
    assert [b.stop - b.start for b in buckets] == [sizes[6], sizes[4], sizes[2], sizes[0]]
    assert buckets[0].stop == model.n_params and buckets[-1].start == 0
    assert all(a.start == b.stop for a, b in zip(buckets, buckets[1:]))  # contiguous, no gap
    # float32: the two last (small) layers fill the first bucket; each larger layer fills one alone
    big = plan_buckets(model, bucket_bytes=(sizes[6] + sizes[4]) * 4)
    assert [b.first_layer for b in big] == [4, 2, 0]
    assert len(plan_buckets(model, bucket_bytes=model.n_params * 4)) == 1
    assert len(plan_buckets(model, bucket_bytes=0)) == 1


def _train(tmp_path, name, *sets, ranks=None):
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    out = tmp_path / name
    args = ["train", "--config", str(config), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    result = dptrain(*args, "--comm", "single", ranks=ranks) if ranks is None else dptrain(*args, ranks=ranks)
    assert result.returncode == 0, result.stderr
    return load_arrays(out / "checkpoints" / "latest" / "model.npz"), out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ref"), "single")[0]


@needs_mpiexec
@pytest.mark.parametrize("ranks, bucket_mb", [(2, 0), (3, 0.001), (4, 0.0001), (3, 4.0)])
def test_bucketed_overlapped_exchange_gives_the_single_process_weights(tmp_path, reference, ranks, bucket_mb):
    got, _ = _train(tmp_path, "run", f"comm.bucket_mb={bucket_mb}", ranks=ranks)
    assert_arrays_close(got, reference, rtol=1e-9)


@pytest.mark.parametrize("accumulate", [2, 5, 23])
def test_accumulation_gives_the_weights_of_one_step_on_the_whole_batch(tmp_path, reference, accumulate):
    got, _ = _train(tmp_path, "run", f"train.accumulate={accumulate}")
    assert_arrays_close(got, reference, rtol=1e-9)


@needs_mpiexec
def test_accumulation_under_mpi(tmp_path, reference):
    got, _ = _train(tmp_path, "run", "train.accumulate=3", "comm.bucket_mb=0.001", ranks=3)
    assert_arrays_close(got, reference, rtol=1e-9)


@needs_mpiexec
def test_fp16_compression_keeps_digits_accuracy(tmp_path):
    out = tmp_path / "fp16"
    result = dptrain("train", "--out", str(out), "--set", "comm.compression=fp16", ranks=2)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["metrics"]["val_accuracy"] >= 0.97


@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 3])
def test_fp16_compression_stays_close_to_the_exact_exchange(tmp_path, reference, ranks):
    got, _ = _train(tmp_path, "run", "comm.compression=fp16", "comm.bucket_mb=0.001", ranks=ranks)
    for name in reference:
        scale = np.abs(reference[name]).max()
        assert np.abs(got[name] - reference[name]).max() / scale < 2e-2, name


@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_sharded_optimizer_gives_the_single_process_weights(tmp_path, reference, ranks):
    got, out = _train(tmp_path, "run", "optim.shard=true", ranks=ranks)
    assert_arrays_close(got, reference, rtol=1e-9)


@needs_mpiexec
def test_sharded_checkpoints_hold_the_whole_state_and_resume_anywhere(tmp_path, reference):
    """3 sharded ranks -> checkpoint -> 2 unsharded ranks -> 4 sharded ranks: the same weights."""
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.replace("epochs = 2", "epochs = 4"))
    single = dptrain("train", "--config", str(config), "--out", str(tmp_path / "single"), "--comm", "single")
    assert single.returncode == 0, single.stderr
    out = tmp_path / "run"
    for ranks, epochs, shard in ((3, 1, "true"), (2, 2, "false"), (4, 4, "true")):
        result = dptrain("train", "--config", str(config), "--out", str(out), "--resume", "auto",
                         "--set", f"train.epochs={epochs}", "--set", f"optim.shard={shard}", ranks=ranks)
        assert result.returncode == 0, result.stderr
        momentum = load_arrays(out / "checkpoints" / "latest" / "optimizer.npz")["momentum_buffer"]
        assert momentum.shape == (sum(a.size for a in reference.values()),)
    expected = load_arrays(tmp_path / "single" / "checkpoints" / "latest" / "model.npz")
    assert_arrays_close(load_arrays(out / "checkpoints" / "latest" / "model.npz"), expected, rtol=1e-9)
    expected_m = load_arrays(tmp_path / "single" / "checkpoints" / "latest" / "optimizer.npz")
    assert_arrays_close(load_arrays(out / "checkpoints" / "latest" / "optimizer.npz"), expected_m, rtol=1e-9)


SHARD_MEMORY = """
import numpy as np
from dptrain import Dense, ReLU, SGD, Sequential, SoftmaxCrossEntropy, Trainer, make_comm
from dptrain.data import make_synthetic
comm = make_comm()
model = Sequential([Dense(64), ReLU(), Dense(3)], 10)
model.init_params(np.random.default_rng(0))
trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.param_buffer, model.grad_buffer, lr=0.1, momentum=0.9),
                  make_synthetic(50, 10, 3, seed=0), batch_size=10, epochs=1, comm=comm, shard_optimizer=True, log=None)
trainer.fit()
state = trainer.step_fn.sharded.optimizer.state_dict()
sizes = comm.allgather(np.array([sum(a.size for a in state.values())]))[:, 0]
if comm.rank == 0:
    print(model.n_params, *sizes)
"""


@needs_mpiexec
def test_sharded_optimizer_state_is_divided_by_the_world_size(tmp_path):
    import sys

    from helpers import MPIEXEC, run

    script = tmp_path / "shard.py"
    script.write_text(SHARD_MEMORY)
    result = run([MPIEXEC, "-n", "3", sys.executable, str(script)])
    assert result.returncode == 0, result.stderr
    n, *sizes = map(int, result.stdout.split())
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1  # each rank holds n / 3 of the momentum


@needs_mpiexec
@pytest.mark.parametrize("extra", ["optim.shard=true", "comm.compression=fp16", "train.accumulate=2"])
def test_divergence_is_still_caught_by_every_rank(tmp_path, extra):
    result = dptrain("train", "--out", str(tmp_path / "r"), "--set", "optim.lr=1e30", "--set", extra, ranks=2)
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite" in errors[0]
