"""Images in class folders, or listed in a CSV, and their decoding (Pillow, an optional extra).

A folder holds one subfolder per class, as torchvision's ``ImageFolder`` expects; the class ids
follow the sorted folder names::

    train/cat/001.png  train/cat/002.png  train/dog/001.jpg      ->  classes ("cat", "dog")

A CSV lists ``path,label`` rows (an optional header ``path,label``), paths relative to the CSV's
folder; labels are class names (sorted for their ids) or, when every label is a whole number,
the class ids themselves. Hidden files and folders (a leading ".") are left out; every other
file must be an image. Images are decoded to uint8 (C, H, W): grey (1 channel) if every image
is grey, else RGB (3 channels; grey repeated, alpha dropped), resized to ``image_size`` when
given (bilinear, antialiased), else all must share one size.

Listing reads only the folders' entries and each file's size and mtime, so a run whose images
are cached (:mod:`dptrain.app.image_cache`) decodes nothing: :func:`cache_key` identifies the
files and the settings.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dptrain.errors import UserError

from .dataset import Dataset, _checked_dataset

CACHE_FORMAT = 1  # bump when the decoded bytes of the same files and settings change
PILLOW_HINT = 'data.name = "images" needs Pillow: pip install "dptrain[images]"'
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass(frozen=True)
class ImageFiles:
    """The images of a folder or CSV, in sample order.

    root : the folder the paths are relative to; paths : (N,) relative paths; labels : (N,) int64
    class ids; classes : the class names; sizes, mtimes : (N,) bytes and st_mtime_ns of each file.
    """

    source: str
    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    sizes: np.ndarray
    mtimes: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> list[int]:
        """Images per class, in class-id order."""
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()

    def then(self, other: ImageFiles) -> ImageFiles:
        """These images followed by ``other``'s (with the same classes), each path relative to its own root."""
        root = Path(os.path.commonpath([self.root, other.root]))
        rel = [os.path.relpath(f.root / p, root) for f in (self, other) for p in f.paths]
        return ImageFiles(self.source, root, tuple(rel), np.concatenate([self.labels, other.labels]), self.classes,
                          np.concatenate([self.sizes, other.sizes]), np.concatenate([self.mtimes, other.mtimes]))


def list_images(path: str, classes: tuple[str, ...] | None = None) -> ImageFiles:
    """The images at ``path``: a folder of class folders or a .csv of path,label rows.

    ``classes``: the training data's classes, for a validation set (its labels are looked up by
    name; a class the training data lacks is refused). UserError naming the file or folder for an
    empty class folder, a folder that cannot be read, a CSV row whose image is missing.
    """
    p = Path(path)
    if p.is_dir():
        return _list_folder(p, path, classes)
    if not p.exists():
        raise UserError(f"data path {path}: not found")
    if p.suffix.lower() != ".csv":
        raise UserError(f"data path {path}: expected a folder with one subfolder per class, or a .csv of path,label rows")
    return _read_list(p, path, classes)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _scan(folder: Path, where: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not _hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"{where}: cannot read folder {folder} ({exc.strerror or exc})") from None


def _list_folder(root: Path, source: str, known: tuple[str, ...] | None) -> ImageFiles:
    where = f"data folder {source}"
    class_dirs = [e for e in _scan(root, where) if e.is_dir()]
    if not class_dirs:
        raise UserError(f"{where}: no class subfolders (expected one folder of images per class, e.g. {source}/cat/)")
    classes = tuple(e.name for e in class_dirs) if known is None else known
    unknown = [e.name for e in class_dirs if e.name not in classes]
    if unknown:
        raise UserError(f"{where}: class folder {unknown[0]!r} is not one of the training classes "
                        f"({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
    paths, labels, sizes, mtimes = [], [], [], []
    for entry in class_dirs:
        label = classes.index(entry.name)
        found = 0
        for rel, stat in _files_under(Path(entry.path), entry.name, where):
            paths.append(rel)
            labels.append(label)
            sizes.append(stat.st_size)
            mtimes.append(stat.st_mtime_ns)
            found += 1
        if not found:
            raise UserError(f"{where}: class folder {entry.name!r} holds no images")
    return ImageFiles(source, root, tuple(paths), np.array(labels, dtype=np.int64), classes,
                      np.array(sizes, dtype=np.int64), np.array(mtimes, dtype=np.int64))


def _files_under(folder: Path, rel: str, where: str):
    """(relative path, stat) of the files under ``folder``, subfolders included, in sorted order."""
    for entry in _scan(folder, where):
        name = f"{rel}/{entry.name}"
        try:
            if entry.is_dir():
                yield from _files_under(Path(entry.path), name, where)
            else:
                yield name, entry.stat()
        except OSError as exc:
            raise UserError(f"{where}: cannot read {name} ({exc.strerror or exc})") from None


def _read_list(csv_path: Path, source: str, known: tuple[str, ...] | None) -> ImageFiles:
    where = f"data file {source}"
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            rows = [(n, row) for n, row in enumerate(csv.reader(fh), start=1) if row and any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if rows and [c.strip().lower() for c in rows[0][1]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise UserError(f"{where}: no rows (expected path,label rows)")
    for line, row in rows:
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"{where}: line {line}: expected path,label, got {','.join(row)!r}")
    names = [row[1].strip() for _, row in rows]
    numeric = all(n.isdigit() for n in names)  # whole numbers: the class ids themselves
    if numeric:
        names = [str(int(n)) for n in names]
    if known is not None:
        classes = known
    elif numeric:
        classes = tuple(str(i) for i in range(max(int(n) for n in names) + 1))
    else:
        classes = tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, sizes, mtimes = [], [], [], []
    root = csv_path.parent
    for (line, row), name in zip(rows, names):
        if name not in index:
            raise UserError(f"{where}: line {line}: label {name!r} is not one of the training classes")
        rel = row[0].strip()
        try:
            stat = os.stat(root / rel)
        except OSError as exc:
            problem = "not found" if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)
            raise UserError(f"{where}: line {line}: image {rel} {problem}") from None
        if not os.path.isfile(root / rel):
            raise UserError(f"{where}: line {line}: image {rel} is not a file")
        paths.append(rel)
        labels.append(index[name])
        sizes.append(stat.st_size)
        mtimes.append(stat.st_mtime_ns)
    return ImageFiles(source, root, tuple(paths), np.array(labels, dtype=np.int64), classes,
                      np.array(sizes, dtype=np.int64), np.array(mtimes, dtype=np.int64))


def cache_key(files: ImageFiles, image_size: tuple[int, ...]) -> str:
    """A hex digest of the files (paths, sizes, mtimes) and the decode settings: any changed,
    added or removed file, or another image_size, gives another key."""
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, list(image_size)]).encode())
    for path, size, mtime in zip(files.paths, files.sizes.tolist(), files.mtimes.tolist()):
        h.update(f"\n{path}\0{size}\0{mtime}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Decoding


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise UserError(PILLOW_HINT) from None
    return Image


@dataclass(frozen=True)
class ImageFormat:
    """What the images decode to: channels (1 grey, 3 RGB) and (height, width)."""

    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width


class ImageDecoder:
    """Decodes the images of ``files`` to uint8 (C, H, W), ``image_size`` = (H, W) or () for their own size.

    ``inspect(start, stop)`` reads the headers of images [start, stop) (call it over every image
    first), then ``format`` gives the shape every image decodes to, and ``decode(start, stop)``
    returns images [start, stop) as an (n, C, H, W) uint8 array. UserError naming the file for
    a file that is not an image, and, without image_size, for the first image of another size.
    """

    def __init__(self, files: ImageFiles, image_size: tuple[int, ...] = ()) -> None:
        self.files, self.image_size = files, tuple(image_size)
        self._image = _pillow()
        self._colour = False
        self._first: tuple[str, tuple[int, int]] | None = None  # the first image's path and (W, H)

    def _where(self, i: int) -> str:
        kind = "file" if self.files.source.lower().endswith(".csv") else "folder"
        return f"data {kind} {self.files.source}: {self.files.paths[i]}"

    def _open(self, i: int):
        try:
            return self._image.open(self.files.root / self.files.paths[i])
        except self._image.UnidentifiedImageError:
            raise UserError(f"{self._where(i)} is not an image (PNG or JPEG) that Pillow can read") from None
        except self._image.DecompressionBombError as exc:
            raise UserError(f"{self._where(i)}: {exc}") from None
        except OSError as exc:
            raise UserError(f"{self._where(i)}: cannot be read ({exc.strerror or exc})") from None

    def inspect(self, start: int, stop: int) -> None:
        for i in range(start, stop):
            with self._open(i) as im:
                self._colour |= im.mode not in _GREY_MODES
                if self.image_size:
                    continue
                if self._first is None:
                    self._first = (self.files.paths[i], im.size)
                elif im.size != self._first[1]:
                    (w0, h0), (w, h) = self._first[1], im.size
                    raise UserError(f"{self._where(i)} is {w}x{h} pixels (width x height) but {self._first[0]} is "
                                    f"{w0}x{h0}: set data.image_size = [H, W] to resize them all")

    @property
    def format(self) -> ImageFormat:
        if self.image_size:
            height, width = self.image_size
        else:
            width, height = self._first[1]
        return ImageFormat(3 if self._colour else 1, height, width)

    def decode(self, start: int, stop: int) -> np.ndarray:
        fmt = self.format
        out = np.empty((stop - start, *fmt.shape), dtype=np.uint8)
        for k, i in enumerate(range(start, stop)):
            out[k] = self.decode_one(i, fmt)
        return out

    def decode_one(self, i: int, fmt: ImageFormat) -> np.ndarray:
        """Image i as uint8 (C, H, W)."""
        with self._open(i) as im:
            try:
                im = _converted(im, fmt.channels, self._image)
                if im.size != (fmt.width, fmt.height):
                    im = im.resize((fmt.width, fmt.height), self._image.Resampling.BILINEAR)
                pixels = np.asarray(im, dtype=np.uint8)
            except (OSError, ValueError) as exc:  # a truncated or damaged file
                raise UserError(f"{self._where(i)}: cannot be decoded ({exc})") from None
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _converted(im, channels: int, image_module):
    """``im`` in mode "L" (channels 1) or "RGB" (3); 16-bit and float grey are scaled to 8 bits."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I") else max(float(values.max()), 1.0)
        im = image_module.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return im.convert("L" if channels == 1 else "RGB")


def list_image_paths(path: str) -> ImageFiles:
    """Images to predict on, without labels: one image file, every image under a folder (class
    folders or not, in sorted order), or the first column of a CSV (a header ``path`` is skipped)."""
    p = Path(path)
    where = f"input {path}"
    if p.is_dir():
        rel = [name for name, _ in _files_under(p, "", where)]
        paths, root = tuple(r.lstrip("/") for r in rel), p
        if not paths:
            raise UserError(f"{where}: no images in this folder")
    elif not p.exists():
        raise UserError(f"{where}: not found")
    elif p.suffix.lower() == ".csv":
        try:
            with open(p, newline="", encoding="utf-8") as fh:
                first = [row[0].strip() for row in csv.reader(fh) if row and row[0].strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{where}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
        paths, root = tuple(first[1:] if first and first[0].lower() == "path" else first), p.parent
        missing = next((q for q in paths if not (root / q).is_file()), None)
        if missing is not None or not paths:
            raise UserError(f"{where}: " + (f"image {missing} not found" if paths else "no image paths"))
    else:
        paths, root = (p.name,), p.parent
    zeros = np.zeros(len(paths), dtype=np.int64)
    return ImageFiles(str(path), root, paths, zeros, (), zeros, zeros)


def decode_to_format(files: ImageFiles, fmt: ImageFormat) -> np.ndarray:
    """Every image of ``files`` as uint8 (N, C, H, W) in the format a model was trained on
    (resized to its size, in its channels): predict's and eval's inputs."""
    decoder = ImageDecoder(files, (fmt.height, fmt.width))
    out = np.empty((len(files), *fmt.shape), dtype=np.uint8)
    for i in range(len(files)):
        out[i] = decoder.decode_one(i, fmt)
    return out


def pixel_dataset(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], source: str) -> Dataset:
    """The dataset of decoded images (N, C, H, W) uint8 (perhaps memory-mapped): x (N, C * H * W) read
    as float64 (exact; later casts go straight to the run's dtype), y the class ids, ``classes`` and
    ``sample_shape`` set. Pixels are scaled by the run (an ``x_transform``), not here."""
    dataset = _checked_dataset(images.reshape(len(images), -1), labels, max(len(classes), 2), source, np.int64)
    dataset.classes, dataset.sample_shape = tuple(classes), tuple(images.shape[1:])
    return dataset
