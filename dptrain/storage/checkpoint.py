"""Checkpoints: ``.npz`` arrays plus ``meta.json``, written atomically, verified on load.

Layout of a run folder::

    <out>/checkpoints/step-00000120/model.npz      one array per parameter: layers.0.weight, ...
                                    optimizer.npz  optimizer state (e.g. momentum_buffer)
                                    meta.json      step, epoch, world size, config, metrics, sha256s
    <out>/checkpoints/latest -> step-00000120      symlink to the newest

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed to
its real name, so a crash never leaves a half-written checkpoint under a real name. Nothing is
pickled; arrays load with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dptrain.errors import UserError
from dptrain.nn.model import describe_mismatch

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_ARRAY_FILES = ("model.npz", "optimizer.npz")


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    meta: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dirs(checkpoint_root: Path) -> list[Path]:
    """Complete checkpoint folders under ``checkpoint_root``, oldest first."""
    if not checkpoint_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(checkpoint_root: str | Path, step: int, model: dict[str, np.ndarray],
                    optimizer: dict[str, np.ndarray], meta: dict[str, Any], keep: int) -> Path:
    """Write ``step-NNNNNNNN`` atomically, point ``latest`` at it, prune to the newest ``keep``."""
    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, arrays in zip(_ARRAY_FILES, (model, optimizer)):
        with open(tmp / name, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
    meta = dict(meta, format_version=FORMAT_VERSION, step=step,
                files={name: _sha256(tmp / name) for name in _ARRAY_FILES})
    with open(tmp / "meta.json", "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again: swap, so a real name never points at a partial folder
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    link_tmp = root / f".latest-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, root / "latest")
    _fsync_dir(root)
    for old in step_dirs(root)[:-keep]:
        if old != final:  # hide it first: a kill mid-delete must not leave a partial step-* folder
            hidden = root / f".old-{old.name}-{os.getpid()}"
            os.rename(old, hidden)
            shutil.rmtree(hidden)
    return final


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run's ``checkpoints`` folder, or a run folder."""
    p = Path(path)
    for candidate in (p, p / "latest", p / "checkpoints" / "latest"):
        if (candidate / "meta.json").is_file():
            return candidate.resolve()
    if not p.exists():
        raise UserError(f"checkpoint {path}: not found")
    raise UserError(f"checkpoint {path}: no meta.json here (expected a step-NNNNNNNN folder, "
                    f"a checkpoints folder or a run folder)")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as archive:  # fh: closed even if np.load fails
            return {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"checkpoint file {path}: cannot be read ({exc})") from None


def load_checkpoint(path: str | Path, optimizer: bool = True) -> Checkpoint:
    """Load and verify a checkpoint: every file must match the SHA-256 recorded in meta.json.

    ``optimizer=False`` (to predict or evaluate): optimizer.npz is neither hashed nor loaded, and
    the checkpoint's ``optimizer`` is empty; resuming needs the full load.
    """
    ckpt = resolve_checkpoint_path(path)
    meta_path = ckpt / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint file {meta_path}: cannot be read as JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise UserError(f"checkpoint file {meta_path}: no 'files' table of checksums")
    names = _ARRAY_FILES if optimizer else ("model.npz",)
    for name in names:
        file = ckpt / name
        expected = meta["files"].get(name)
        if not file.is_file():
            raise UserError(f"checkpoint file {file}: missing")
        if expected != _sha256(file):
            raise UserError(f"checkpoint file {file}: SHA-256 does not match meta.json (truncated or modified)")
    return Checkpoint(ckpt, _load_npz(ckpt / "model.npz"), _load_npz(ckpt / "optimizer.npz") if optimizer else {},
                      meta)


def clean_stale_temporaries(checkpoint_root: Path) -> list[Path]:
    """Remove what a crash in the middle of a save left behind (hidden temporaries only)."""
    removed = []
    if checkpoint_root.is_dir():
        for p in checkpoint_root.iterdir():
            if p.name.startswith((".tmp-", ".old-", ".latest-")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
    return removed


def describe_incompatibility(checkpoint: Checkpoint, names_shapes: dict[str, tuple[int, ...]], dtype) -> str | None:
    """What differs between a checkpoint and a model ({name: shape}, dtype); None if they match."""
    saved = {k: tuple(v.shape) for k, v in checkpoint.model.items()}
    problems = []
    layers_saved = {k.rsplit(".", 1)[0] for k in saved}
    layers_model = {k.rsplit(".", 1)[0] for k in names_shapes}
    if len(layers_saved) != len(layers_model):
        problems.append(f"{len(layers_saved)} layers with parameters vs {len(layers_model)}")
    dtypes = {str(v.dtype) for v in checkpoint.model.values()}
    if dtypes and dtypes != {str(np.dtype(dtype))}:
        problems.append(f"dtype {', '.join(sorted(dtypes))} vs {np.dtype(dtype)}")
    problems += describe_mismatch(names_shapes, saved)
    if not problems:
        return None
    return (f"checkpoint {checkpoint.path} does not match the model of the config (checkpoint vs config): "
            + "; ".join(problems))


def check_compatible(checkpoint: Checkpoint, model) -> None:
    """UserError saying what differs if the checkpoint's arrays do not fit ``model`` (a Sequential)."""
    problem = describe_incompatibility(checkpoint, model.state_shapes(), model.dtype)
    if problem:
        raise UserError(problem)


def restore_model(checkpoint: Checkpoint, model):
    """``model`` (a Sequential built with init=False) with the checkpoint's weights, once they are
    checked to fit it (UserError otherwise)."""
    check_compatible(checkpoint, model)
    model.load_params(checkpoint.model)
    return model
