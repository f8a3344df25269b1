"""``dptrain train --init-from PATH``: a new run (step 0, a fresh optimizer, the new config and data)
that starts from the weights of a checkpoint or of a ``.safetensors`` export.

Every parameter and buffer of the model must be in the file with its shape (``model.init_from_strict``,
the default), or a one-line error lists the first mismatches; with ``init_from_strict = false`` the
ones that match are loaded and the others keep their initial values (a new output layer for new
classes, say), and the run says which.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from dptrain.errors import UserError
from dptrain.nn import Sequential
from dptrain.nn.model import describe_mismatch
from dptrain.storage.checkpoint import load_checkpoint

SHOWN_MISMATCHES = 5


def read_weights(path: str | Path, warn: Callable[[str], None]) -> dict[str, np.ndarray]:
    """{name: array} in dptrain's names: a checkpoint folder, a run folder (its newest valid
    checkpoint) or a .safetensors file (either layout)."""
    path = Path(path)
    if path.is_file():
        from .export import load_safetensors

        return load_safetensors(path)[0]
    if not path.exists():
        raise UserError(f"--init-from {path}: no such checkpoint, run folder or file")
    return dict(load_checkpoint(path, optimizer=False, warn=warn).model)


def initialise_from(model: Sequential, weights: dict[str, np.ndarray], strict: bool, source: str) -> list[str]:
    """Copy ``weights`` into the model's parameters and buffers; returns the names left at their
    initial values (none when ``strict``). UserError listing the first mismatches if ``strict`` and
    any name or shape differs, or if nothing at all matches."""
    expected = model.state_shapes()
    given = {name: tuple(a.shape) for name, a in weights.items()}
    problems = describe_mismatch(expected, given)
    if strict and problems:
        shown = "; ".join(problems[:SHOWN_MISMATCHES]) + (f"; ... ({len(problems)} in all)"
                                                           if len(problems) > SHOWN_MISMATCHES else "")
        raise UserError(f"--init-from {source}: the weights do not fit the model (file vs model): {shown} -- "
                        f"set model.init_from_strict = false to load only those that match")
    matching = [name for name, shape in expected.items() if given.get(name) == shape]
    if not matching:
        raise UserError(f"--init-from {source}: no parameter of the model is in it with its shape")
    arrays = model.state_arrays()
    for name in matching:
        arrays[name][...] = weights[name]  # cast to the model's dtype
    return [name for name in expected if name not in matching]
