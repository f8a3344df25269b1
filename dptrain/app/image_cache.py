"""The images of ``data.name = "images"``, decoded once into a cache file that every rank memory-maps.

    <cache folder>/<name>-<folder hash>-<size>-<key>.npy      (N, C, H, W) uint8, a plain .npy

The key (:func:`dptrain.data.images.cache_key`) covers every file's path, size and mtime and the
decode settings, so a changed, added or removed image gives a new file; the stale one of the same
data and settings is removed. Rank 0 decodes and writes the file atomically (a temporary renamed
into place), a chunk of ``CHUNK_IMAGES`` at a time; after each chunk it broadcasts how it went, so
the other ranks wait in short collectives that the watchdog can judge, and stop with it if a file
is bad. Then every rank memory-maps the file: the ranks of a node share its pages, and a later run
finds it and decodes nothing.

The cache folder is ``data.cache``, else ``.dptrain-cache`` beside ``data.path``, else (when that
folder cannot be written) ``$XDG_CACHE_HOME/dptrain`` (``~/.cache/dptrain``).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from dptrain.config import Config
from dptrain.data import Dataset
from dptrain.data.images import ImageDecoder, ImageFiles, cache_key, list_images, pixel_dataset
from dptrain.errors import EXIT_ENVIRONMENT, ExitQuietly, UserError, environment_message
from dptrain.parallel.agreement import agreed
from dptrain.parallel.comm import SingleProcessComm
from dptrain.storage.atomic import write_atomically

CHUNK_IMAGES = 256  # images rank 0 reads or decodes between two status broadcasts
_OK, _BAD_INPUT, _ENVIRONMENT = 0, 1, 2


@dataclass(frozen=True)
class ImageData:
    """The listing of a run's images (training, then validation if ``data.val_path``) and its cache file."""

    files: ImageFiles
    n_train: int  # the first n_train images are the training folder's (all of them without val_path)
    cache: Path

    @property
    def has_val_folder(self) -> bool:
        return self.n_train < len(self.files)


def list_run_images(config: Config) -> tuple[ImageFiles, int]:
    """(the images of data.path, then of data.val_path if given; how many are data.path's)."""
    d = config.data
    files = list_images(d.path)
    if not d.val_path:
        return files, len(files)
    return files.then(list_images(d.val_path, classes=files.classes)), len(files)


def default_cache_folder(data_path: str) -> Path:
    """``.dptrain-cache`` beside the data when that folder can be written, else the user's cache folder."""
    beside = Path(data_path).resolve().parent
    if os.access(beside, os.W_OK | os.X_OK):
        return beside / ".dptrain-cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dptrain"


def cache_file(folder: Path, data_path: str, files: ImageFiles, image_size: tuple[int, ...]) -> Path:
    """The cache file of these files and settings in ``folder``."""
    source = Path(data_path).resolve()
    where = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    size = "x".join(map(str, image_size)) if image_size else "own-size"
    return folder / f"{source.stem or 'images'}-{where}-{size}-{cache_key(files, image_size)[:20]}.npy"


def _stale(path: Path) -> list[Path]:
    """Cache files of the same data and settings with another key."""
    prefix = path.name.rsplit("-", 1)[0] + "-"
    return [p for p in path.parent.glob(prefix + "*.npy") if p != path and len(p.name) == len(path.name)]


def open_cache(path: Path, n_images: int) -> np.ndarray | None:
    """The cache file memory-mapped as (N, C, H, W) uint8, or None if it is missing or not one."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n_images:
        return None
    return images


def prepare_images(config: Config, comm=None, debug: bool = True, info: Callable[[str], None] = lambda line: None
                   ) -> tuple[ImageData, np.ndarray]:
    """The run's images and their decoded pixels, memory-mapped (N, C, H, W) uint8. Collective.

    Every rank lists the folders; rank 0 chooses the cache file and, if it is missing, decodes the
    images into it (``info`` gets a line before and after) while the others wait. A UserError on
    any rank (a bad image, an empty class folder) ends every rank with status 2 (with ``debug``,
    it propagates on the rank that raised it). An OSError writing the cache ends rank 0 with it
    (one line, exit 74) and the others quietly with the same status.
    """
    comm = comm if comm is not None else SingleProcessComm()
    d = config.data
    files, n_train = agreed(comm, debug, lambda: list_run_images(config))
    folder = agreed(comm, debug, lambda: _make_folder(d) if comm.rank == 0 else None)
    path = Path(comm.broadcast_text(str(cache_file(folder, d.path, files, d.image_size)) if comm.rank == 0 else ""))
    found = np.array([1 if comm.rank == 0 and open_cache(path, len(files)) is not None else 0], dtype=np.int64)
    comm.broadcast(found, root=0)
    if not found[0]:
        _build(comm, files, path, tuple(d.image_size), info, debug)
    images = agreed(comm, debug, lambda: _open_written(path, len(files), comm.rank))
    return ImageData(files, n_train, path), images


def _make_folder(d) -> Path:
    folder = Path(d.cache) if d.cache else default_cache_folder(d.path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"data.cache: cannot create folder {folder} ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"data.cache: folder {folder} cannot be written (set data.cache to a writable folder)")
    return folder


def _open_written(path: Path, n_images: int, rank: int) -> np.ndarray:
    images = open_cache(path, n_images)
    if images is None:
        raise UserError(f"data.cache: rank {rank} cannot read {path}, which rank 0 wrote: set data.cache to a "
                        f"folder every rank sees (a shared file system)")
    return images


def _build(comm, files: ImageFiles, path: Path, image_size: tuple[int, ...], info: Callable[[str], None],
           debug: bool) -> None:
    """Rank 0 reads every header, then decodes every image into ``path``; all ranks take part in the
    status broadcast after each chunk, and all stop at the same chunk if rank 0 fails."""
    n_chunks = math.ceil(len(files) / CHUNK_IMAGES)
    decoder = ImageDecoder(files, image_size) if comm.rank == 0 else None
    start = time.perf_counter()
    if comm.rank == 0:
        info(f"decoding {len(files):,} images of {files.source} into {path} (once: later runs memory-map it)")
    failure: BaseException | None = None
    sent = 0  # status broadcasts made in the current pass over the chunks

    def chunks(work: Callable[[int, int], None]) -> None:
        nonlocal failure, sent
        for k in range(n_chunks):
            sent = k + 1
            status = np.zeros(1, dtype=np.int64)
            if comm.rank == 0 and failure is None:
                try:
                    work(k * CHUNK_IMAGES, min((k + 1) * CHUNK_IMAGES, len(files)))
                except UserError as exc:
                    failure, status[0] = exc, _BAD_INPUT
                except OSError as exc:  # named by the cache file when the error names none (a full disk)
                    failure = exc if exc.filename else type(exc)(exc.errno, exc.strerror, str(path))
                    status[0] = _ENVIRONMENT
            comm.broadcast(status, root=0)
            if status[0] != _OK:
                _fail(comm, int(status[0]), failure, debug)

    chunks(decoder.inspect if decoder else lambda a, b: None)
    if comm.rank == 0:
        shape = (len(files), *decoder.format.shape)

        def write(fh) -> None:
            npy_format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
            chunks(lambda a, b: fh.write(decoder.decode(a, b).tobytes()))

        sent = 0
        try:
            write_atomically(path, write)
        except OSError as exc:  # opening the temporary, or the rename after the last chunk
            failure = exc
            if sent < n_chunks:  # the others wait in the broadcast of the next chunk: it tells them
                comm.broadcast(np.array([_ENVIRONMENT], dtype=np.int64), root=0)
                _fail(comm, _ENVIRONMENT, failure, debug)
        for stale in _stale(path) if failure is None else ():
            stale.unlink(missing_ok=True)
    else:
        chunks(lambda a, b: None)
    status = np.array([_ENVIRONMENT if failure is not None else _OK], dtype=np.int64)
    comm.broadcast(status, root=0)
    if status[0] != _OK:
        _fail(comm, int(status[0]), failure, debug)
    if comm.rank == 0:
        info(f"decoded {len(files):,} images in {time.perf_counter() - start:.1f} s")


def _fail(comm, status: int, failure: BaseException | None, debug: bool):
    """Every rank stops together, as :func:`agreed` does: a bad image ends all with status 2 (its
    line printed once), the environment failing on rank 0 with status 74. Without MPI (or with
    ``debug``), rank 0 raises the error itself."""
    if comm.rank == 0 and (not comm.is_mpi or debug):
        raise failure
    if status == _BAD_INPUT:
        comm.raise_if_any_failed(failure if comm.rank == 0 else None)
    if comm.rank == 0:
        print(f"error: {environment_message(failure)}", file=sys.stderr, flush=True)
    raise ExitQuietly(EXIT_ENVIRONMENT)


def image_dataset(data: ImageData, images: np.ndarray) -> Dataset:
    """The dataset of the decoded images: x (N, C * H * W) uint8 on disk, read as float64 and scaled
    by the run (see :func:`dptrain.app.build.train_val_split`); y the class ids; ``classes`` and
    ``sample_shape`` set; ``split`` the folders' own when ``data.val_path`` is given."""
    files = data.files
    dataset = pixel_dataset(images, files.labels, files.classes, files.source)
    if data.has_val_folder:
        dataset.split = (np.arange(data.n_train), np.arange(data.n_train, len(files)))
    return dataset
