"""Augmentation stays exact: a run on an image folder with random crops and flips ends with the same
weights at 1 to 4 ranks, and resumes bitwise from the middle of an epoch; prefetching changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_arrays_close, dptrain, invoke, load_arrays, needs_mpiexec, write_digit_images

SETTINGS = ["data.name=images", "train.dtype=float64", "train.batch_size=20", "train.epochs=2", "optim.lr=0.05",
            "data.augment={crop_padding = 2, hflip = true, normalize = true}", "data.val_fraction=0.25",
            'model.layers=[{type = "conv2d", filters = 4, kernel = 3, padding = 1}, {type = "relu"}, '
            '{type = "maxpool2d", pool = 2}]']


def _args(root, *more):
    return [a for s in (f"data.path={root}", *SETTINGS, *more) for a in ("--set", s)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """70 RGB digits, 8x8: 53 training and 17 validation samples, so the last batch of an epoch is partial."""
    return write_digit_images(tmp_path_factory.mktemp("img") / "train", per_class=7, size=8, colour=True)


def _weights(run):
    return load_arrays(run / "checkpoints" / "latest" / "model.npz")


def test_augmentation_changes_training_and_prefetch_does_not(tmp_path, images):
    runs = {}
    for name, more in (("plain", ["data.augment={normalize = true}"]), ("aug", []), ("aug-prefetch", ["data.prefetch=3"])):
        result = invoke("train", "--out", tmp_path / name, "--quiet", *_args(images, *more))
        assert result.exit_code == 0, result.output
        runs[name] = _weights(tmp_path / name)
    assert all(np.array_equal(runs["aug"][k], runs["aug-prefetch"][k]) for k in runs["aug"])
    assert not np.array_equal(runs["aug"]["layers.0.weight"], runs["plain"]["layers.0.weight"])


def test_resume_in_the_middle_of_an_epoch_is_bitwise(tmp_path, images):
    full = tmp_path / "full"
    result = invoke("train", "--out", full, "--quiet", *_args(images, "checkpoint.every_steps=4", "checkpoint.keep=10",
                                                             "data.prefetch=2"))
    assert result.exit_code == 0, result.output
    resumed = tmp_path / "resumed"
    result = invoke("train", "--out", resumed, "--quiet", "--resume", full / "checkpoints" / "step-00000004",
                    *_args(images, "data.prefetch=2"))  # step 4 of 6: epoch 2, its second batch
    assert result.exit_code == 0, result.output
    a, b = _weights(full), _weights(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@needs_mpiexec
def test_the_same_weights_at_one_to_four_ranks(tmp_path, images):
    single = tmp_path / "one"
    assert invoke("train", "--out", single, "--quiet", *_args(images)).exit_code == 0
    expected = _weights(single)
    for ranks in (2, 3, 4):
        run = tmp_path / f"n{ranks}"
        result = dptrain("train", "--out", str(run), "--quiet", *_args(images, "data.prefetch=2"), ranks=ranks)
        assert result.returncode == 0, result.stderr
        assert_arrays_close(_weights(run), expected, rtol=1e-9)


def test_the_api_of_the_docs_trains_on_an_image_folder(tmp_path, images):
    """docs/api.md, "Images, augmentation, prefetch": the builders the CLI uses, from Python."""
    from dptrain import load_config, make_comm
    from dptrain.app.build import build_parts, build_trainer
    from dptrain.app.image_cache import prepare_images

    comm = make_comm("single")
    config = load_config(None, [f"data.path={images}", *SETTINGS, "data.prefetch=2"])
    parts = build_parts(config, comm.size, prepare_images(config, comm))
    assert parts.train_set.augment.describe() == "crop (padding 2), horizontal flip"
    trainer = build_trainer(config, parts.model, parts.loss, parts.optimizer, parts.train_set, parts.val_set, comm,
                            out_dir=tmp_path / "api", log=None)
    trainer.fit()
    cli = tmp_path / "cli"
    assert invoke("train", "--out", cli, "--quiet", *_args(images, "data.prefetch=2")).exit_code == 0
    expected = _weights(cli)
    assert all(np.array_equal(trainer.model.named_params()[k], expected[k]) for k in expected)
