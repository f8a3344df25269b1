"""The run folder: which one (``--out`` or a new ``runs/<date-time>``), whether training may go into it
(``--overwrite``, ``--resume``), which checkpoint ``--resume auto`` continues, and setting it up.
Rank 0 calls these; the other ranks get the answer by broadcast."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dptrain.errors import UserError

from .atomic import write_atomically
from .checkpoint import (
    Checkpoint,
    check_compatible,
    clean_stale_temporaries,
    load_checkpoint,
    newest_valid_checkpoint,
    step_dirs,
)


def default_out_dir(base: Path = Path("runs")) -> Path:
    """``runs/<date-time>``, with ``-2``, ``-3`` ... added when that folder exists."""
    first = base / time.strftime("%Y%m%d-%H%M%S")
    out, i = first, 1
    while out.exists():
        i += 1
        out = first.with_name(f"{first.name}-{i}")
    return out


def choose_out_dir(out: str | None, overwrite: bool, resume: str | None) -> Path:
    """The run folder, refused if training there would replace an earlier run's checkpoints unasked."""
    if resume == "auto" and not out:
        raise UserError("--resume auto needs --out, the run folder to continue")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    path = Path(out) if out else default_out_dir()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a folder")
    if step_dirs(path / "checkpoints") and not overwrite and not resume:
        raise UserError(f"--out {path}: already holds checkpoints of an earlier run; pass --resume auto to "
                        f"continue it, --overwrite to replace it, or choose another folder")
    return path


def find_checkpoint(resume: str, out_dir: Path, model, info: Callable[[str], None],
                    warn: Callable[[str], None], optimizer=None) -> Checkpoint | None:
    """The checkpoint to resume from, verified and matching ``model``: the one at ``resume``, or for
    "auto" the newest valid one of ``out_dir`` (damaged ones are skipped with a warning), or None.
    UserError if it does not fit ``model`` (or ``optimizer``'s state, when given)."""

    def compatible(ckpt: Checkpoint) -> Checkpoint:
        check_compatible(ckpt, model, optimizer)
        return ckpt

    if resume != "auto":
        return compatible(load_checkpoint(resume))
    ckpt = newest_valid_checkpoint(out_dir / "checkpoints", warn)
    if ckpt is not None:
        return compatible(ckpt)
    info(f"no checkpoint in {out_dir / 'checkpoints'}: starting fresh")
    return None


def set_up_out_dir(out_dir: Path, overwrite: bool, config_toml: str) -> None:
    """Make the run folder ready: with ``overwrite`` the old checkpoints go, temporaries of a killed
    writer go, and the resolved config is written as ``config.toml``."""
    if overwrite and (out_dir / "checkpoints").is_dir():
        remove_tree(out_dir / "checkpoints")
    clean_stale_temporaries(out_dir / "checkpoints")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "config.toml", lambda fh: fh.write(config_toml), mode="w")


def remove_tree(folder: Path) -> None:
    """shutil.rmtree, whose OSError names the file it could not remove by its whole path (rmtree's
    own error carries only the name inside its folder, e.g. "latest")."""

    def named(function, path, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=named)
    else:
        shutil.rmtree(folder, onerror=lambda function, path, info: named(function, path, info[1]))
