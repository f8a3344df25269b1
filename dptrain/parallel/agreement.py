"""Checks that the ranks agree: on their input before the first collective, on the parameters while
training, and on whether set-up failed anywhere. Each is one small allgather, made by every rank."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from dptrain.errors import DesyncError, MismatchError, UserError

from .flight import RECORD_FIELDS, lines_from_array

FINGERPRINT_ROWS = 4096  # rows of each dataset hashed in the pre-flight agreement check


def agreed(comm, debug: bool, work: Callable[[], Any]) -> Any:
    """``work()`` on every rank, each checking its own input, then every rank agrees before any
    other collective: returns what ``work`` returned if no rank raised a UserError; otherwise
    every rank exits with status 2 and the error is printed once (comm.raise_if_any_failed).
    With ``debug`` a UserError propagates instead, with its traceback. Collective."""
    error, result = None, None
    try:
        result = work()
    except UserError as exc:
        if debug:
            raise
        error = exc
    comm.raise_if_any_failed(error)
    return result


def check_agreement(comm, config: dict, train_data, val_data, model) -> None:
    """Before step 0: every rank must hold the same config, data and model shapes (collective).

    MismatchError names what differs and the ranks that differ from rank 0.
    """
    items = {
        "config": json.dumps(config, sort_keys=True).encode(),
        "training data": data_fingerprint(train_data),
        "validation data": data_fingerprint(val_data),
        "model": json.dumps([(s.name, s.shape) for s in model.param_specs] + [str(model.dtype)]).encode(),
    }
    mine = np.array([zlib.crc32(v) for v in items.values()], dtype=np.int64)
    table = comm.allgather(mine)
    problems = []
    for j, what in enumerate(items):
        differ = [r for r in range(comm.size) if table[r, j] != table[0, j]]
        if differ:
            problems.append(f"{what} ({_ranks(differ)} from rank 0)")
    if problems:
        raise MismatchError("ranks disagree before step 0 on: " + "; ".join(problems) +
                            " -- every rank must see the same config and data files")


def check_sync(comm, model, step: int) -> None:
    """Compare a checksum of every rank's parameters and buffers, and of the sequence of collectives
    each made so far (operations and sizes, from its flight recorder): DesyncError names the ranks
    that differ, with every rank's last collectives in its ``details``. Collective."""
    crc = zlib.crc32(model.param_buffer.view(np.uint8))
    flight = comm.flight
    mine = np.array([zlib.crc32(model.state_buffer.view(np.uint8), crc), flight.count, flight.signature],
                    dtype=np.int64)
    table = comm.allgather(mine)
    params_differ = [r for r in range(comm.size) if table[r, 0] != table[0, 0]]
    calls_differ = [r for r in range(comm.size) if (table[r, 1:] != table[0, 1:]).any()]
    if not (params_differ or calls_differ):
        return
    problems = []
    if calls_differ:  # a mismatch MPI matched anyway (e.g. a sum against a max): results are garbage
        problems.append(f"the ranks made different collective calls before step {step}: {_ranks(calls_differ)} "
                        f"from rank 0 (each rank's last collectives are listed above)")
    if params_differ:
        problems.append(f"parameters out of sync at step {step}: {_ranks(params_differ)} from rank 0")
    recorders = comm.allgather(flight.as_array().reshape(-1)).reshape(comm.size, -1, RECORD_FIELDS)
    details = "\n".join(f"rank {r} made {table[r, 1]} collectives; the last ones (oldest first):\n"
                         + "\n".join("  " + line for line in lines_from_array(recorders[r]))
                         for r in range(comm.size))
    raise DesyncError("; ".join(problems), details)


def _ranks(differ: list[int]) -> str:
    """"rank 2 differs" or "ranks 1, 3 differ"."""
    many = len(differ) > 1
    return f"rank{'s' if many else ''} {', '.join(map(str, differ))} differ{'' if many else 's'}"


def data_fingerprint(dataset) -> bytes:
    """Size, shapes, dtypes and up to 4096 evenly spaced rows of a dataset (or None), as bytes to hash."""
    if dataset is None:
        return b"none"
    n = len(dataset)
    rows = np.unique(np.linspace(0, n - 1, num=min(n, FINGERPRINT_ROWS)).astype(np.int64)) if n else np.arange(0)
    head = f"{n} {dataset.x.shape} {dataset.x.dtype} {dataset.y.shape} {dataset.y.dtype} {dataset.n_classes}"
    x, y = dataset.take(rows)
    return head.encode() + x.tobytes() + y.tobytes()
