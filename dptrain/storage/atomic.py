"""Output files the commands write: the checks on an --output path, and writing one atomically."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from dptrain.errors import UserError


def check_output_path(output: str | Path, overwrite: bool, input_path: str | Path | None = None,
                      example: str = "predictions.csv") -> Path:
    """The output file, refused (UserError) if it is a folder (``example`` names a file in it), its
    folder does not exist, it is the input file, or it exists without ``overwrite``."""
    out = Path(output)
    if out.is_dir():
        raise UserError(f"--output {out}: is a folder; give a file name such as {out / example}")
    if not out.parent.is_dir():
        raise UserError(f"--output {out}: folder {out.parent} does not exist")
    if out.exists() and input_path is not None and Path(input_path).exists() and out.samefile(input_path):
        raise UserError(f"--output {out}: is the input file")
    if out.exists() and not overwrite:
        raise UserError(f"--output {out}: exists; pass --overwrite to replace it")
    return out


def write_atomically(path: str | Path, write: Callable[[object], None], mode: str = "wb") -> Path:
    """Call ``write(fh)`` on a hidden temporary file in the folder of ``path`` (opened with ``mode``:
    "w" is UTF-8 text, newlines as written), fsync it, then rename it to ``path``: the file is never
    seen half-written, and an error leaves no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    text = {"newline": "", "encoding": "utf-8"} if "b" not in mode else {}
    try:
        with open(tmp, mode, **text) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # named by the file asked for, not by the temporary
        _remove(tmp)
        if exc.filename in (str(tmp), tmp):
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(tmp: Path) -> None:
    """Remove a temporary if it is there (a read-only file system refuses even to look: nothing to do)."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
