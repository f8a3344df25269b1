"""Checkpoints that cannot lie: meta.json is covered by a checksum and its values must agree with each
other; an edited checkpoint is refused by name when asked for, and skipped (with a warning) when a run
folder is asked for, falling back to the newest valid one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.storage.checkpoint import load_checkpoint, step_dirs

from helpers import load_arrays

CONFIG = """
seed = 3
[data]
name = "synthetic"
n_samples = 200
n_features = 6
n_classes = 3
[model]
hidden = [8]
[train]
epochs = 2
batch_size = 32
dtype = "float64"
[optim]
name = "adam"
lr = 0.01
[checkpoint]
every_steps = 2
every_epochs = 0
keep = 10
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meta")
    (folder / "c.toml").write_text(CONFIG)
    result = CliRunner().invoke(main, ["train", "--config", str(folder / "c.toml"), "--out", str(folder / "run"),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    return folder


def _copy_run(run, tmp_path):
    shutil.copytree(run / "run", tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def _edit(checkpoint, **changes):
    path = checkpoint / "meta.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("key, value", [("step", 7), ("optimizer_steps", 3), ("lr", 0.5), ("epoch", 0),
                                        ("epoch_loss_sum", 1.0)])
def test_an_edited_meta_json_is_refused_by_name(run, tmp_path, key, value):
    out = _copy_run(run, tmp_path)
    newest = step_dirs(out / "checkpoints")[-1]
    _edit(newest, **{key: value})
    with pytest.raises(UserError, match=r"meta\.json.*(checksum|SHA-256)"):
        load_checkpoint(newest)
    result = CliRunner().invoke(main, ["train", "--config", str(run / "c.toml"), "--out", str(tmp_path / "new"),
                                       "--resume", str(newest)])
    assert result.exit_code == 2 and "meta.json" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "new").exists()
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(newest)])
    assert result.exit_code == 2 and "meta.json" in result.output


def test_resume_auto_skips_an_edited_meta_and_ends_as_the_uninterrupted_run(run, tmp_path):
    out = _copy_run(run, tmp_path)
    newest = step_dirs(out / "checkpoints")[-1]
    expected = load_arrays(newest / "model.npz")
    _edit(newest, step=7)  # it used to crash every resume with ZeroDivisionError
    result = CliRunner().invoke(main, ["train", "--config", str(run / "c.toml"), "--out", str(out),
                                       "--resume", "auto", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"skipping damaged checkpoint {newest}" in result.output and "meta.json" in result.output
    got = load_arrays(out / "checkpoints" / "latest" / "model.npz")
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_eval_of_a_run_folder_falls_back_to_the_newest_valid_checkpoint(run, tmp_path):
    out = _copy_run(run, tmp_path)
    dirs = step_dirs(out / "checkpoints")
    _edit(dirs[-1], lr=0.5)
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert f"skipping damaged checkpoint {dirs[-1]}" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["checkpoint"] == str(dirs[-2].resolve())


def test_eval_of_a_run_whose_latest_link_dangles_uses_the_newest_valid_checkpoint(run, tmp_path):
    out = _copy_run(run, tmp_path)
    dirs = step_dirs(out / "checkpoints")
    shutil.rmtree(dirs[-1])  # `latest` now points at nothing
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["checkpoint"] == str(dirs[-2].resolve())


@pytest.mark.parametrize("changes, message", [
    ({"step": 6}, "step 6 but its folder is step-00000008"),
    ({"optimizer_steps": 9}, "optimizer_steps 9"),
    ({"epoch": 1, "step_in_epoch": 5}, "step_in_epoch"),
])
def test_values_that_disagree_are_refused_even_under_a_matching_checksum(run, tmp_path, changes, message):
    from dptrain.storage.checkpoint import meta_checksum

    out = _copy_run(run, tmp_path)
    ckpt = out / "checkpoints" / "step-00000008"
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.update(changes)
    meta.pop("meta_sha256", None)
    meta["meta_sha256"] = meta_checksum(meta)  # a writer that got it wrong, not an edit
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    with pytest.raises(UserError, match=message):
        load_checkpoint(ckpt)


def test_a_checkpoint_of_format_1_still_loads(run, tmp_path):
    """Written before meta.json had its own checksum: its array files are still verified."""
    out = _copy_run(run, tmp_path)
    newest = step_dirs(out / "checkpoints")[-1]
    meta = json.loads((newest / "meta.json").read_text())
    del meta["meta_sha256"]
    meta["format_version"] = 1
    (newest / "meta.json").write_text(json.dumps(meta))
    assert load_checkpoint(newest).meta["step"] == meta["step"]
    meta["format_version"] = 2  # a version 2 meta.json without its checksum is not one dptrain wrote
    (newest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta_sha256"):
        load_checkpoint(newest)
