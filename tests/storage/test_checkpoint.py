"""Checkpoints: layout, atomic write, pruning, verification, no pickles."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dptrain.errors import UserError
from dptrain.storage.checkpoint import load_checkpoint, meta_checksum, save_checkpoint, step_dirs

from helpers import load_arrays


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layers.0.weight": rng.standard_normal((3, 4)), "layers.0.bias": rng.standard_normal(4)}


def test_layout_and_round_trip(tmp_path):
    root = tmp_path / "checkpoints"
    model, opt = _arrays(0), {"momentum_buffer": np.arange(16.0)}
    path = save_checkpoint(root, 12, model, opt, {"epoch": 1, "config": {"seed": 3}}, keep=3)
    assert path == root / "step-00000012"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.npz", "optimizer.npz"]
    assert os.readlink(root / "latest") == "step-00000012"
    ckpt = load_checkpoint(root / "latest")
    assert ckpt.meta["step"] == 12 and ckpt.meta["epoch"] == 1 and ckpt.meta["config"] == {"seed": 3}
    assert list(ckpt.model) == ["layers.0.weight", "layers.0.bias"]  # layer order kept
    for k in model:
        np.testing.assert_array_equal(ckpt.model[k], model[k])
    np.testing.assert_array_equal(ckpt.optimizer["momentum_buffer"], opt["momentum_buffer"])
    # plain np.load with allow_pickle=False reads every file
    assert load_arrays(path / "model.npz").keys() == model.keys()


def test_prunes_to_keep_and_latest_is_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15, 20):
        save_checkpoint(root, step, _arrays(step), {}, {}, keep=2)
    assert [p.name for p in step_dirs(root)] == ["step-00000015", "step-00000020"]
    assert load_checkpoint(root).meta["step"] == 20
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_saving_the_same_step_again_replaces_it(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 7, _arrays(1), {}, {}, keep=3)
    save_checkpoint(root, 7, _arrays(2), {}, {}, keep=3)
    np.testing.assert_array_equal(load_checkpoint(root).model["layers.0.bias"], _arrays(2)["layers.0.bias"])


def test_a_crash_mid_write_leaves_no_checkpoint_under_a_real_name(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, _arrays(1), {}, {}, keep=3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(OSError):
        save_checkpoint(root, 2, _arrays(2), {}, {}, keep=3)
    assert [p.name for p in step_dirs(root)] == ["step-00000001"]
    assert load_checkpoint(root).meta["step"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_file_is_refused_naming_it(tmp_path, damage):
    path = save_checkpoint(tmp_path, 3, _arrays(0), {"momentum_buffer": np.ones(3)}, {}, keep=1)
    target = path / "model.npz"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    else:
        target.unlink()
    with pytest.raises(UserError, match="model.npz"):
        load_checkpoint(path)


def test_pickled_array_is_refused(tmp_path):
    """An .npz holding an object array (a pickle) is never unpickled, even with a matching hash."""
    path = save_checkpoint(tmp_path, 1, _arrays(0), {}, {}, keep=1)
    with open(path / "model.npz", "wb") as fh:
        np.savez(fh, **{"layers.0.weight": np.array([{"evil": 1}], dtype=object)})
    meta = json.loads((path / "meta.json").read_text())
    import hashlib

    meta["files"]["model.npz"] = hashlib.sha256((path / "model.npz").read_bytes()).hexdigest()
    meta["meta_sha256"] = meta_checksum(meta)  # every checksum matches: only the pickle is wrong
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="model.npz"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no meta.json"):
        load_checkpoint(tmp_path)


def test_without_the_optimizer_state(tmp_path):
    """optimizer=False (predict, eval): optimizer.npz is neither hashed nor read; a full load checks it."""
    path = save_checkpoint(tmp_path, 1, _arrays(0), {"momentum_buffer": np.ones(3)}, {}, keep=1)
    (path / "optimizer.npz").unlink()
    ckpt = load_checkpoint(path, optimizer=False)
    assert ckpt.optimizer == {} and list(ckpt.model) == ["layers.0.weight", "layers.0.bias"]
    with pytest.raises(UserError, match="optimizer.npz: missing"):
        load_checkpoint(path)
