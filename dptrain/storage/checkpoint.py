"""Checkpoints: ``.npz`` arrays plus ``meta.json``, written atomically, verified on load.

Layout of a run folder::

    <out>/checkpoints/step-00000120/model.npz      one array per parameter: layers.0.weight, ...
                                    optimizer.npz  optimizer state (e.g. momentum_buffer)
                                    meta.json      step, epoch, world size, config, metrics, sha256s
    <out>/checkpoints/latest -> step-00000120      symlink to the newest

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed to
its real name, so a crash never leaves a half-written checkpoint under a real name. Nothing is
pickled; arrays load with ``allow_pickle=False``.

Nothing in a checkpoint is used unchecked: meta.json records the SHA-256 of each array file and of
its own contents (``meta_sha256``, over the canonical JSON of the other keys), and the values that
must agree with each other (the step and the folder's name, the epoch and the step within it, the
updates applied) are checked on load. A checkpoint asked for by name is refused by name; asked for
by its run folder, the newest valid one is taken and each damaged one skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dptrain.errors import UserError
from dptrain.nn.model import describe_mismatch

FORMAT_VERSION = 2  # 2: meta.json carries meta_sha256 (version 1 checkpoints load without that check)
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


def meta_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta`` without its ``meta_sha256`` key, as canonical JSON (sorted keys, the
    indentation meta.json is written with): the same value for the same contents, however the file
    is laid out."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, indent=2, sort_keys=True).encode()).hexdigest()


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
    try:
        _write_files(tmp, step, model, optimizer, meta)
    except OSError:  # a full disk, say: no temporary left behind, the earlier checkpoints untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _write_files(tmp: Path, step: int, model: dict[str, np.ndarray], optimizer: dict[str, np.ndarray],
                 meta: dict[str, Any]) -> None:
    """The arrays and meta.json of a checkpoint into the folder ``tmp``, each fsync'ed; an OSError names
    the file it was writing."""
    current = tmp
    try:
        for name, arrays in zip(_ARRAY_FILES, (model, optimizer)):
            current = tmp / name
            with open(current, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
        meta = dict(meta, format_version=FORMAT_VERSION, step=step,
                    files={name: _sha256(tmp / name) for name in _ARRAY_FILES})
        meta["meta_sha256"] = meta_checksum(meta)
        current = tmp / "meta.json"
        with open(current, "w") as fh:
            json.dump(meta, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), exc.filename or str(current)) from None


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run's ``checkpoints`` folder, or a run folder (their ``latest``)."""
    p = Path(path)
    for candidate in (p, p / "latest", p / "checkpoints" / "latest"):
        if (candidate / "meta.json").is_file():
            return candidate.resolve()
    if not p.exists():
        raise UserError(f"checkpoint {path}: not found")
    raise UserError(f"checkpoint {path}: no meta.json here (expected a step-NNNNNNNN folder, "
                    f"a checkpoints folder or a run folder)")


def _checkpoint_root(path: Path) -> Path | None:
    """The ``checkpoints`` folder when ``path`` is a run folder or a checkpoints folder; None when it
    is a checkpoint itself (or nothing)."""
    if (path / "meta.json").exists() or path.name == "latest":
        return None
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path if step_dirs(path) or (path / "latest").is_symlink() else None


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as archive:  # fh: closed even if np.load fails
            return {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"checkpoint file {path}: cannot be read ({exc})") from None


def load_checkpoint(path: str | Path, optimizer: bool = True, warn: Callable[[str], None] | None = None) -> Checkpoint:
    """Load and verify a checkpoint: every file must match the SHA-256 recorded in meta.json, meta.json
    its own, and its values must agree with each other; UserError naming the file otherwise.

    ``path`` a run folder or a checkpoints folder: the newest valid checkpoint in it, each newer damaged
    one skipped with a line to ``warn`` (when given; without it, the newest must be valid).
    ``optimizer=False`` (to predict or evaluate): optimizer.npz is neither hashed nor loaded, and
    the checkpoint's ``optimizer`` is empty; resuming needs the full load.
    """
    root = _checkpoint_root(Path(path)) if warn is not None else None
    if root is not None:
        ckpt = newest_valid_checkpoint(root, warn, optimizer)
        if ckpt is None:
            raise UserError(f"checkpoint {path}: no valid checkpoint in {root}")
        return ckpt
    ckpt = resolve_checkpoint_path(path)
    meta = _read_meta(ckpt)
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


def newest_valid_checkpoint(checkpoint_root: Path, warn: Callable[[str], None], optimizer: bool = True) -> Checkpoint | None:
    """The newest checkpoint under ``checkpoint_root`` that loads and verifies; each newer one that does
    not is reported to ``warn`` and skipped. None if there is none."""
    for candidate in reversed(step_dirs(checkpoint_root)):
        try:
            return load_checkpoint(candidate, optimizer)
        except UserError as exc:
            warn(f"warning: skipping damaged checkpoint {candidate}: {exc}")
    return None


def _read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of the checkpoint folder ``ckpt``, verified against its checksum and checked for values
    that disagree; UserError naming the file."""
    meta_path = ckpt / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint file {meta_path}: cannot be read as JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise UserError(f"checkpoint file {meta_path}: no 'files' table of checksums")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"checkpoint file {meta_path}: format_version {version!r} is not one this dptrain reads "
                        f"(1..{FORMAT_VERSION})")
    if version >= 2 and meta.get("meta_sha256") != meta_checksum(meta):
        raise UserError(f"checkpoint file {meta_path}: its checksum (meta_sha256) does not match its contents "
                        f"(edited or damaged)")
    problem = _disagreement(meta, ckpt.name)
    if problem:
        raise UserError(f"checkpoint file {meta_path}: {problem}")
    return meta


def _disagreement(meta: dict[str, Any], folder: str) -> str | None:
    """What in a checkpoint's meta cannot be true (a step that is not its folder's, more updates than
    steps, a step within the epoch that no epoch length gives), or None."""
    def integer(key: str, default: int | None = None) -> int | None:
        value = meta.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{key} must be an integer >= 0, got {value!r}")
        return value

    try:
        step, epoch, in_epoch = integer("step"), integer("epoch", 0), integer("step_in_epoch")
        skipped, updates, report = integer("skipped_steps", 0), integer("optimizer_steps"), integer("report_step")
    except UserError as exc:
        return str(exc)
    if step is None:
        return "no step"
    match = _STEP_DIR.match(folder)
    if match and int(match.group(1)) != step:
        return f"step {step} but its folder is {folder}"
    if updates is not None and updates != step - skipped:
        return f"optimizer_steps {updates} is not step {step} - skipped_steps {skipped}"
    if in_epoch is not None:
        done = step - in_epoch  # the steps of the epochs completed
        if done < 0 or (epoch == 0 and done != 0) or (epoch > 0 and (done % epoch or in_epoch >= done // epoch)):
            return f"step {step}, epoch {epoch} and step_in_epoch {in_epoch} do not fit any epoch length"
    if report is not None and report > step:
        return f"report_step {report} is after step {step}"
    return None


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


def check_compatible(checkpoint: Checkpoint, model, optimizer=None) -> None:
    """UserError saying what differs if the checkpoint's arrays do not fit ``model`` (a Sequential), or
    (when given, and the checkpoint's optimizer state was loaded) its optimizer state ``optimizer``'s."""
    problem = describe_incompatibility(checkpoint, model.state_shapes(), model.dtype)
    if problem is None and optimizer is not None:
        problem = _optimizer_mismatch(checkpoint, optimizer)
    if problem:
        raise UserError(problem)


def _optimizer_mismatch(checkpoint: Checkpoint, optimizer) -> str | None:
    """What differs between the checkpoint's optimizer state and ``optimizer``'s (its arrays' names and sizes)."""
    mine = {name: tuple(np.shape(a)) for name, a in optimizer.state_dict().items()}
    saved = {name: tuple(np.shape(a)) for name, a in checkpoint.optimizer.items()}
    if mine == saved:
        return None
    name = checkpoint.meta.get("config", {}).get("optim", {}).get("name", "?")

    def listed(state):
        return ", ".join(f"{k} {list(v)}" for k, v in sorted(state.items())) or "nothing"

    return (f"checkpoint {checkpoint.path} holds the optimizer state of {name} ({listed(saved)}), but the config's "
            f"optimizer {optimizer.name} keeps {listed(mine)}: resume with the checkpoint's optim.name, or start a new run")


def restore_model(checkpoint: Checkpoint, model):
    """``model`` (a Sequential built with init=False) with the checkpoint's weights, once they are
    checked to fit it (UserError otherwise)."""
    check_compatible(checkpoint, model)
    model.load_params(checkpoint.model)
    return model
