"""Residual networks through the config and the trainer: the built-in digits ResNet, nested errors, and
the same float64 weights at 1, 2 and 3 ranks (BatchNorm and Dropout inside blocks, a partial last batch)."""

from __future__ import annotations

import pytest

from helpers import REPO, assert_arrays_close, dptrain, invoke, load_arrays, needs_mpiexec

RESNET = str(REPO / "configs" / "digits_resnet.toml")
# synthetic 1x8x8 images: 192 training samples, global batch 50 -> a last batch of 42
EXACT = ["train.dtype=float64", "train.epochs=2", "train.batch_size=50", "optim.warmup_epochs=0.5",
         "checkpoint.every_epochs=0", "data.name=synthetic", "data.n_samples=240", "data.n_features=64",
         "data.n_classes=10"]
DROPOUT_IN_A_BLOCK = ('model.layers=[{type="conv2d", filters=4, kernel=3, padding=1}, '
                      '{type="residual", layers=[{type="conv2d", filters=4, kernel=3, padding=1, bias=false}, '
                      '{type="batchnorm"}, {type="relu"}, {type="dropout", rate=0.3}]}, {type="relu"}, '
                      '{type="residual", layers=[{type="conv2d", filters=8, kernel=3, stride=2, padding=1, bias=false}, '
                      '{type="batchnorm"}], shortcut=[{type="conv2d", filters=8, kernel=1, stride=2}]}, '
                      '{type="globalavgpool"}]')


def _sets(*extra: str) -> list[str]:
    return [a for s in (*EXACT, *extra) for a in ("--set", s)]


@pytest.fixture(scope="module")
def resnet_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet") / "run"
    result = dptrain("train", "--config", RESNET, *_sets(DROPOUT_IN_A_BLOCK), "--out", str(out), "--comm", "single")
    assert result.returncode == 0, result.stderr
    return load_arrays(out / "checkpoints" / "latest" / "model.npz")


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_a_resnet_ends_with_the_same_weights_at_any_world_size(ranks, resnet_single, tmp_path):
    result = dptrain("train", "--config", RESNET, *_sets(DROPOUT_IN_A_BLOCK), "--out", str(tmp_path / "run"),
                     ranks=ranks)
    assert result.returncode == 0, result.stderr
    model = load_arrays(tmp_path / "run" / "checkpoints" / "latest" / "model.npz")
    assert "layers.1.body.1.running_var" in model and "layers.3.shortcut.0.weight" in model
    assert_arrays_close(model, resnet_single, rtol=1e-9)


def test_the_builtin_resnet_trains_and_names_its_parameters_by_path(tmp_path):
    result = invoke("train", "--config", "digits_resnet", "--set", "train.epochs=2", "--set", "optim.warmup_epochs=1",
                    "--out", tmp_path / "run",
                    "--quiet")
    assert result.exit_code == 0, result.output
    model = load_arrays(tmp_path / "run" / "checkpoints" / "latest" / "model.npz")
    assert "layers.3.body.0.weight" in model and "layers.5.shortcut.1.running_mean" in model
    summary = invoke("model", "summary", "--config", "digits_resnet")
    assert summary.exit_code == 0 and "5.shortcut.0" in summary.output and "Residual(body of 5, shortcut of 2)" in summary.output


@pytest.mark.parametrize("layers, message", [
    ('[{type="residual"}]', "model.layers[0]: type 'residual' needs 'layers'"),
    ('[{type="residual", layers=[{type="dense"}]}]', "model.layers[0].layers[0]: type 'dense' needs 'units'"),
    ('[{type="residual", layers=[{type="dense", units=3}]}]', "the body gives samples of shape (3,) but the input"),
    ('[{type="residual", layers=3}]', "model.layers[0].layers must be a list of layer tables"),
    ('[{type="residual", layers=[{type="relu"}], shortcut=[{type="nope"}]}]', "model.layers[0].shortcut[0].type is 'nope'"),
])
def test_a_bad_block_is_refused_in_one_line(layers, message):
    result = invoke("config", "validate", "--set", f"model.layers={layers}")
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
