"""`dptrain train --init-from PATH`: a new run that starts from trained weights (a checkpoint, a run
folder or a .safetensors export), strict by default, on any number of ranks.

With a learning rate of 1e-300 the first step changes nothing (lr x gradient rounds away next to any
weight), so the new run's first checkpoint must hold exactly the weights it started from."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import dptrain, invoke, load_arrays, needs_mpiexec

FROZEN_STEP = ["--set", "train.steps=1", "--set", "optim.lr=1e-300", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run of the digits MLP: its folder."""
    out = tmp_path_factory.mktemp("source") / "run"
    result = invoke("train", "--out", out, "--set", "train.epochs=2", "--quiet")
    assert result.exit_code == 0, result.output
    return out


def _final(run):
    return load_arrays(run / "checkpoints" / "latest" / "model.npz")


def _same(a, b, names=None):
    for name in names or a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("source", ["run folder", "checkpoint", "safetensors", "safetensors torch layout"])
def test_a_new_run_starts_from_the_weights(trained, tmp_path, source):
    path = trained if source == "run folder" else trained / "checkpoints" / "latest"
    if source.startswith("safetensors"):
        path = tmp_path / "w.safetensors"
        layout = "torch" if "torch" in source else "dptrain"
        assert invoke("export", "--checkpoint", trained, "--format", "safetensors", "--layout", layout,
                      "--output", path).exit_code == 0
    result = invoke("train", "--out", tmp_path / "new", "--init-from", path, *FROZEN_STEP[:-1])
    assert result.exit_code == 0, result.output
    assert f"initialised from {path}: 4 of 4 parameters and buffers" in result.output
    _same(_final(tmp_path / "new"), _final(trained))
    assert [p.name for p in (tmp_path / "new" / "checkpoints").glob("step-*")] == ["step-00000001"]  # step 0 + 1


def test_weights_that_do_not_fit_are_one_line_and_nothing_is_written(trained, tmp_path):
    result = invoke("train", "--out", tmp_path / "new", "--init-from", trained, "--set", "model.hidden=[32]",
                    *FROZEN_STEP)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "the weights do not fit the model (file vs model)" in errors[0], result.output
    assert "layers.0.weight shape (64, 128) vs (64, 32)" in errors[0] and "init_from_strict = false" in errors[0]
    assert not (tmp_path / "new").exists()


def test_not_strict_loads_what_fits_and_names_the_rest(trained, tmp_path):
    result = invoke("train", "--out", tmp_path / "new", "--init-from", trained, "--set", "model.hidden=[128, 32]",
                    "--set", "model.init_from_strict=false", *FROZEN_STEP[:-1])
    assert result.exit_code == 0, result.output
    assert ("2 of 6 parameters and buffers; left at their initial values: layers.2.weight, layers.2.bias, "
            "layers.4.weight, layers.4.bias") in result.output
    _same(_final(tmp_path / "new"), _final(trained), ["layers.0.weight", "layers.0.bias"])


def test_a_requeued_run_continues_its_own_checkpoint(trained, tmp_path):
    new = tmp_path / "new"
    assert invoke("train", "--out", new, "--init-from", trained, "--set", "train.steps=3").exit_code == 0
    result = invoke("train", "--out", new, "--init-from", trained, "--resume", "auto", "--set", "train.steps=5")
    assert result.exit_code == 0, result.output
    assert f"--init-from {trained} not used: continuing" in result.output


@needs_mpiexec
def test_two_ranks_start_from_rank_0s_reading_of_the_weights(trained, tmp_path):
    result = dptrain("train", "--out", str(tmp_path / "new"), "--init-from", str(trained), *FROZEN_STEP, ranks=2)
    assert result.returncode == 0, result.stderr
    _same(_final(tmp_path / "new"), _final(trained))
