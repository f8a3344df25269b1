"""A disk that fills up while training: one line naming the path, exit 74, no temporary left behind and
every earlier checkpoint intact. The disk is a real one: a small tmpfs (skipped where mounting is not
allowed)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dptrain.cli import main
from dptrain.storage.checkpoint import load_checkpoint, step_dirs

from helpers import small_tmpfs


@pytest.fixture
def tiny_disk(tmp_path):
    with small_tmpfs(tmp_path / "tiny", "320k") as mount_point:
        yield mount_point


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_earlier_checkpoints(tiny_disk):
    out = tiny_disk / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--quiet", "--set", "train.epochs=30",
                                       "--set", "checkpoint.every_steps=3", "--set", "checkpoint.keep=1000",
                                       "--set", "log.every_steps=0"])
    assert result.exit_code == 74, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(out) in errors[0], result.output
    assert "Traceback" not in result.output
    kept = step_dirs(out / "checkpoints")
    assert kept, "some checkpoints fitted before the disk was full"
    for checkpoint in kept:
        load_checkpoint(checkpoint)  # each one complete, its checksums right
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-", ".latest-"))]
    assert leftovers == []


def test_a_full_disk_while_writing_the_metrics_names_the_file(tiny_disk):
    out = tiny_disk / "run"
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (300 * 1024))  # leave about 20 KB
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--quiet", "--set", "train.epochs=30",
                                       "--set", "checkpoint.every_epochs=0", "--set", "log.every_steps=1"])
    assert result.exit_code == 74, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "No space left on device" in errors[0], result.output
    assert str(out / "metrics.") in errors[0], errors[0]  # the metrics file it was writing
    assert "Traceback" not in result.output
