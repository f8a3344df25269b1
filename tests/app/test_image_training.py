"""Training on image folders from the command line: the decoded cache, bad input, predict and eval,
and the cache written by one rank of a job."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import (
    MPI_MARKS,
    dptrain,
    invoke,
    load_arrays,
    needs_mpiexec,
    small_tmpfs,
    without_dac_override,
    write_digit_images,
)

CNN = ['model.layers=[{type = "conv2d", filters = 4, kernel = 3, padding = 1}, {type = "relu"}, '
       '{type = "maxpool2d", pool = 2}]']


def _args(root, *more, epochs=2):
    sets = [f"data.path={root}", "data.name=images", f"train.epochs={epochs}", "train.batch_size=32",
            "train.dtype=float64", "optim.lr=0.1", *more]
    return [a for s in sets for a in ("--set", s)]


def _cache_files(root):
    folder = root.parent / ".dptrain-cache"
    return sorted(folder.glob("*.npy")) if folder.is_dir() else []


def test_the_first_run_decodes_into_the_cache_and_later_runs_read_it(tmp_path):
    root = write_digit_images(tmp_path / "data" / "train", per_class=8)
    first = invoke("train", "--out", tmp_path / "r1", *_args(root))
    assert first.exit_code == 0, first.output
    assert "decoding 80 images" in first.output
    (cache,) = _cache_files(root)
    assert np.load(cache, mmap_mode="r").shape == (80, 1, 16, 16)
    written = cache.stat().st_mtime_ns
    again = invoke("train", "--out", tmp_path / "r2", *_args(root))
    assert again.exit_code == 0 and "decoding" not in again.output, again.output
    assert cache.stat().st_mtime_ns == written
    same = [load_arrays(tmp_path / r / "checkpoints" / "latest" / "model.npz") for r in ("r1", "r2")]
    for name in same[0]:
        np.testing.assert_array_equal(same[0][name], same[1][name])


def test_a_changed_or_added_image_invalidates_the_cache(tmp_path):
    root = write_digit_images(tmp_path / "data" / "train", per_class=8)
    assert invoke("data", "summary", *_args(root)).exit_code == 0
    (old,) = _cache_files(root)
    victim = sorted((root / "2").iterdir())[0]
    Image.new("L", (16, 16), 255).save(victim)  # another picture under the same name
    result = invoke("data", "summary", *_args(root))
    assert result.exit_code == 0 and "decoding 80 images" in result.output, result.output
    (new,) = _cache_files(root)  # the stale one is removed
    assert new != old
    row = list(sorted(root.rglob("*.png"))).index(victim)
    assert (np.load(new)[row] == 255).all()
    Image.new("L", (16, 16), 0).save(root / "2" / "added.png")
    result = invoke("data", "summary", *_args(root))
    assert "decoding 81 images" in result.output and len(_cache_files(root)) == 1


def test_data_summary_names_classes_counts_shape_cache_and_statistics(tmp_path):
    root = write_digit_images(tmp_path / "d" / "train", per_class=6, colour=True)
    val = write_digit_images(tmp_path / "d" / "val", per_class=2, colour=True, first=900)
    cache = tmp_path / "cache"
    result = invoke("data", "summary", *_args(root, f"data.val_path={val}", f"data.cache={cache}",
                                               "data.augment={crop_padding = 2, hflip = true, normalize = true}"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "samples: 3 x 16 x 16 values each (channels x height x width), 60 training / 20 validation" in out
    assert re.search(r"^ +7 +7 +6 +2$", out, re.M) and re.search(r"^ +total +60 +20$", out, re.M), out
    assert f"cache: {cache}" in out
    line = next(x for x in out.splitlines() if x.startswith("normalisation"))
    mean = [float(v) for v in line.split("mean [")[1].split("]")[0].split(", ")]
    pixels = np.load(next(cache.glob("*.npy")))[:60].astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 2, 3)), atol=1e-4)
    assert "augmentation (training only): crop (padding 2), horizontal flip" in out


@pytest.mark.parametrize("spoil, message", [
    (lambda root: (root / "empty").mkdir(), "class folder 'empty' holds no images"),
    (lambda root: (root / "4" / "readme.txt").write_text("not a picture"), "4/readme.txt is not an image"),
    (lambda root: Image.new("L", (9, 16)).save(root / "4" / "narrow.png"), "4/narrow.png is 9x16 pixels"),
])
def test_bad_image_folders_are_one_line_exit_2_and_nothing_written(tmp_path, spoil, message):
    root = write_digit_images(tmp_path / "data" / "train", per_class=3)
    spoil(root)
    result = invoke("train", "--out", tmp_path / "run", *_args(root))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "run").exists() and _cache_files(root) == []


def test_a_csv_row_whose_image_is_missing_is_exit_2(tmp_path):
    root = write_digit_images(tmp_path / "imgs", per_class=2)
    rows = "".join(f"imgs/{p.parent.name}/{p.name},{p.parent.name}\n" for p in sorted(root.rglob("*.png")))
    (tmp_path / "list.csv").write_text("path,label\n" + rows + "imgs/3/lost.png,3\n")
    result = invoke("train", "--out", tmp_path / "run", *_args(tmp_path / "list.csv"))
    assert result.exit_code == 2 and "line 22: image imgs/3/lost.png not found" in result.output, result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_class_folder_without_read_permission_is_one_line_exit_2(tmp_path):
    root = write_digit_images(tmp_path / "data" / "train", per_class=2)
    (root / "6").chmod(0o000)
    try:
        argv = [sys.executable, "-m", "dptrain", "train", "--out", str(tmp_path / "run"), *_args(root)]
        result = subprocess.run(without_dac_override(argv), capture_output=True, text=True, timeout=120)
    finally:
        (root / "6").chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Permission denied" in result.stderr
    assert f"cannot read folder {root / '6'}" in result.stderr
    assert not (tmp_path / "run").exists()


def test_predict_and_eval_use_the_checkpoint_classes_and_normalisation(tmp_path):
    root = tmp_path / "train"
    for name, value in (("dark", 20), ("light", 230)):
        (root / name).mkdir(parents=True)
        for i in range(12):
            noise = np.random.default_rng(i).integers(-15, 16, (6, 6))
            Image.fromarray((value + noise).astype(np.uint8)).save(root / name / f"{i}.png")
    args = _args(root, "data.augment={normalize = true}", "model.hidden=[8]", "data.val_fraction=0.25", epochs=15)
    assert invoke("train", "--out", tmp_path / "run", "--quiet", *args).exit_code == 0
    probe = tmp_path / "probe"
    probe.mkdir()
    Image.fromarray(np.full((12, 12), 240, np.uint8)).save(probe / "b.png")  # resized to the model's 6x6
    Image.fromarray(np.full((6, 6, 3), 10, np.uint8)).save(probe / "a.png")  # RGB: read as grey
    result = invoke("predict", "--checkpoint", tmp_path / "run", "--input", probe, "--output", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "row,class,p_0,p_1,class_name,path"
    assert [line.split(",")[-2:] for line in lines[1:]] == [["dark", "a.png"], ["light", "b.png"]]
    result = invoke("eval", "--checkpoint", tmp_path / "run", "--data", root)
    assert result.exit_code == 0 and "accuracy 1.0000  n_samples 24" in result.output, result.output


@needs_mpiexec
def test_one_rank_writes_the_cache_while_the_others_wait(tmp_path):
    root = write_digit_images(tmp_path / "data" / "train", per_class=10)
    result = dptrain("train", "--out", str(tmp_path / "run"), *_args(root, *CNN, epochs=1),
                     ranks=3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("decoding 100 images") == 1
    assert len(_cache_files(root)) == 1 and not [p for p in os.listdir(root.parent / ".dptrain-cache")
                                                 if ".tmp" in p]


@pytest.mark.parametrize("args, expected", [
    (["--config", "diabetes_mlp"], "samples: 10 values each, 354 training / 88 validation"),
    (["--config", "digits_cnn"], "samples: 1 x 8 x 8 values each (channels x height x width)"),
    (["--set", "data.name=text", "--set", "data.block_size=8", "--set", "data.path={text}"], "vocabulary: 4 characters"),
])
def test_data_summary_of_other_data(tmp_path, args, expected):
    (tmp_path / "t.txt").write_text("abcd" * 300)
    result = invoke("data", "summary", *(a.format(text=tmp_path / "t.txt") for a in args))
    assert result.exit_code == 0 and expected in result.output, result.output


@pytest.fixture(params=["64k", "1m,nr_inodes=1"], ids=["no-space", "no-inode"])
def small_disk(tmp_path, request):
    """A tmpfs where the cache of 100 RGB 32x32 images (300 KiB) does not fit (64 KiB), or where its
    temporary file cannot even be created (no inode left: the failure comes before the first chunk)."""
    with small_tmpfs(tmp_path / "small", request.param) as mount_point:
        yield mount_point


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [None, pytest.param(2, marks=MPI_MARKS)])
def test_a_full_disk_while_writing_the_cache_is_one_line_exit_74(tmp_path, small_disk, ranks):
    root = write_digit_images(tmp_path / "data" / "train", per_class=10, size=32, colour=True)
    result = dptrain("train", "--out", str(tmp_path / "run"), *_args(root, f"data.cache={small_disk}"), ranks=ranks)
    assert result.returncode == 74, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(small_disk) in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(small_disk) == [] and not (tmp_path / "run").exists()


@needs_mpiexec
def test_a_bad_image_met_by_rank_0_ends_every_rank_with_one_line(tmp_path):
    root = write_digit_images(tmp_path / "data" / "train", per_class=10)
    (root / "8" / "zz.png").write_text("not a png")
    result = dptrain("train", "--out", str(tmp_path / "run"), *_args(root), ranks=3)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "8/zz.png is not an image" in errors[0], result.stderr
    assert _cache_files(root) == [] and not (tmp_path / "run").exists()
    assert os.listdir(root.parent / ".dptrain-cache") == []  # no temporary left behind
