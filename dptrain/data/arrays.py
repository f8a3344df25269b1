"""Array datasets: an .npz with x and y (memory-mapped where it is stored uncompressed), or a folder
with x.npy and y.npy."""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from dptrain.errors import UserError

from .dataset import CHUNK_BYTES, Dataset, _checked_arrays, list_names


def load_npz(path: str, n_classes: int | None = None) -> Dataset:
    """The data at ``path``: an .npz with arrays ``x`` (N, D) and ``y`` (N,) integer labels or
    (N, K) float targets, or a folder holding ``x.npy`` and ``y.npy``.

    Arrays stored uncompressed (np.savez, np.save) are memory-mapped, not read: the checks scan
    them a chunk at a time and training reads only the rows it takes, so the ranks of a node
    share one copy (the page cache). A compressed .npz (np.savez_compressed) is read into memory.
    Nothing is ever unpickled. Features are returned as float64, labels as int64.

    Labels are checked to lie in [0, n_classes); if n_classes is not given it is max(y) + 1.
    """
    if os.path.isdir(path):
        x, y = _load_npy_folder(path)
    elif not os.path.isfile(path):
        raise UserError(f"data file {path}: not found")
    else:
        x, y = load_npz_arrays(path, f"data file {path}", npy_hint=" (or a folder with x.npy and y.npy)")
    return _checked_arrays(x, y, n_classes, path)


def load_npz_arrays(path: str | Path, where: str, keys: tuple[str, ...] = ("x", "y"),
                    npy_hint: str = "") -> tuple[np.ndarray, ...]:
    """The arrays ``keys`` of the .npz at ``path``, memory-mapped if stored uncompressed (see
    :func:`load_npz`); ``where`` starts every error message. A lone .npy array is refused by its
    content, whatever its suffix, with ``npy_hint`` after the message."""
    try:
        with open(path, "rb") as fh:  # closed even if np.load fails; the memory maps outlive it
            if fh.read(len(npy_format.MAGIC_PREFIX)) == npy_format.MAGIC_PREFIX:
                raise UserError(f"{where}: is one .npy array, not an .npz with {' and '.join(keys)}{npy_hint}")
            fh.seek(0)
            with np.load(fh, allow_pickle=False) as archive:
                missing = [k for k in keys if k not in archive.files]
                if missing:
                    raise UserError(f"{where}: no array named {' or '.join(repr(k) for k in missing)} "
                                    f"(it holds {list_names(archive.files) or 'nothing'})")
                arrays = tuple(_npz_member(archive, fh, key) for key in keys)
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{where}: cannot be read as .npz ({exc})") from exc
    for key, array in zip(keys, arrays):
        if not isinstance(array, np.ndarray):
            raise UserError(f"{where}: {key!r} is not a NumPy array")
    return arrays


def _npz_member(archive, fh, key: str):
    """archive[key], memory-mapped if it is stored uncompressed (its CRC-32 checked by chunks)."""
    names = archive.zip.namelist()
    members = {name.removesuffix(".npy"): name for name in names}
    members.update(zip(names, names))  # the names np.load would read for key
    info = archive.zip.getinfo(members[key])
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:  # stored, not encrypted
        start = _member_data_start(fh, info)
        array = _map_npy(fh, start, info.file_size)
        if array is not None:
            _check_crc(fh, start, info)
            return array
    return archive[key]  # compressed, empty or unusual: read into memory


def _member_data_start(fh, info: zipfile.ZipInfo) -> int:
    """Offset in the file of the first byte of a zip member's data (after its local header)."""
    fh.seek(info.header_offset)
    header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("Bad magic number for file header")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _map_npy(fh, start: int, length: int) -> np.ndarray | None:
    """The .npy stored in bytes [start, start + length) of ``fh``, memory-mapped read-only; None
    if it is better read normally (no .npy magic, an empty or 0-d array, header version 3)."""
    fh.seek(start)
    if fh.read(len(npy_format.MAGIC_PREFIX)) != npy_format.MAGIC_PREFIX:
        return None
    fh.seek(start)
    version = npy_format.read_magic(fh)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(fh)
    else:
        return None
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    offset, nbytes = fh.tell(), math.prod(shape) * dtype.itemsize
    if not shape or nbytes == 0:
        return None
    if offset + nbytes > start + length:
        raise ValueError(f"EOF: array data of {nbytes} bytes expected, {start + length - offset} stored")
    return np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def _check_crc(fh, start: int, info: zipfile.ZipInfo) -> None:
    """The zip member's CRC-32, as reading it with zipfile would check, by chunks of the file's pages."""
    raw = np.memmap(fh, dtype=np.uint8, mode="r", offset=start, shape=(info.file_size,))
    crc = 0
    for begin in range(0, info.file_size, CHUNK_BYTES):
        crc = zlib.crc32(raw[begin:begin + CHUNK_BYTES], crc)
    del raw
    if crc != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")


def _load_npy_folder(path: str) -> tuple[np.ndarray, np.ndarray]:
    files = {key: os.path.join(path, f"{key}.npy") for key in ("x", "y")}
    missing = [key for key, file in files.items() if not os.path.isfile(file)]
    if len(missing) == 2:
        raise UserError(f"data file {path}: is a folder without x.npy and y.npy, not an .npz file")
    if missing:
        raise UserError(f"data file {path}: no array named {missing[0]!r} (no {missing[0]}.npy in the folder)")
    x, y = (load_npy(file, f"data file {file}") for file in files.values())
    return x, y


def load_npy(path: str | Path, where: str) -> np.ndarray:
    """The one array of the .npy file at ``path``, memory-mapped read-only; ``where`` starts every
    error message. An .npz archive is refused by its content, whatever its suffix."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{where}: cannot be read as .npy ({exc})") from exc
    if not isinstance(array, np.ndarray):  # np.load opened a zip archive (an NpzFile)
        array.close()
        raise UserError(f"{where}: is an .npz archive, not one .npy array")
    return array
