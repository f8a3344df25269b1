"""Memory-mapped data: an uncompressed .npz or a folder of x.npy and y.npy is mapped, not read,
training on it gives the same weights as on the same data read into memory, and with a 1 GiB file
and 4 ranks no rank holds a private copy (measured from outside, in /proc)."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from dptrain.app.build import train_val_split
from dptrain.config import load_config
from dptrain.data import Dataset, load_npz
from dptrain.errors import UserError

from helpers import MPIEXEC, invoke, load_arrays, needs_mpiexec, subprocess_env

FAST = ["--set", "train.epochs=2", "--set", "model.hidden=[16]", "--set", "train.batch_size=32",
        "--set", "checkpoint.every_epochs=0"]


def is_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of a memory-mapped file."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


def arrays(n=300, d=7, seed=0, regression=False, x_dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * 3).astype(x_dtype)
    y = rng.standard_normal((n, 2)).astype(np.float32) if regression else rng.integers(0, 4, n)
    return x, y


def npy_folder(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path.mkdir()
    np.save(path / "x.npy", x)
    np.save(path / "y.npy", y)
    return path


# ---------------------------------------------------------------------------------------------
# Loading


def test_uncompressed_npz_and_npy_folder_are_memory_mapped(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "small.npz", x=x, y=y)
    folder = npy_folder(tmp_path / "folder", x, y)
    plain, compressed, in_folder = (load_npz(str(p)) for p in (tmp_path / "plain.npz", tmp_path / "small.npz", folder))
    assert is_mapped(plain.base_x) and is_mapped(plain.base_y)
    assert is_mapped(in_folder.base_x) and is_mapped(in_folder.base_y)
    assert not is_mapped(compressed.base_x) and not is_mapped(compressed.base_y)  # read into memory
    for d in (plain, compressed, in_folder):
        assert len(d) == 300 and d.n_features == 7 and d.n_classes == 4 and d.task == "classification"
        rows, (xs, ys) = np.array([5, 0, 299, 5]), d.take(np.array([5, 0, 299, 5]))
        assert xs.dtype == np.float64 and ys.dtype == np.int64  # as read before: float64 features
        np.testing.assert_array_equal(xs, x[rows].astype(np.float64))
        np.testing.assert_array_equal(ys, y[rows])
        assert type(xs) is np.ndarray and not is_mapped(xs)  # a copy of the rows, not a view of the file


def test_split_and_cast_are_views_not_copies(tmp_path):
    x, y = arrays(regression=True, x_dtype=np.float64)
    np.savez(tmp_path / "r.npz", x=x, y=y)
    data = load_npz(str(tmp_path / "r.npz"))
    config = load_config(None, ["data.val_fraction=0.25", "train.dtype=float32"])
    train, val = train_val_split(config, data)
    assert train.base_x is data.base_x and val.base_x is data.base_x  # nothing copied
    assert len(train) + len(val) == 300 and train.n_outputs == 2 and train.task == "regression"
    assert train.x.shape == (len(train), 7) and train.x.dtype == np.float32  # what the trainer fingerprints
    assert train.y.shape == (len(train), 2) and train.y.dtype == np.float32
    xs, ys = train.take(np.array([3, 1]))
    np.testing.assert_array_equal(xs, x[train.rows[[3, 1]]].astype(np.float32))
    np.testing.assert_array_equal(ys, y[train.rows[[3, 1]]])
    np.testing.assert_array_equal(np.asarray(val.x), x[val.rows].astype(np.float32))
    nested = train.subset(np.array([2, 0]))
    np.testing.assert_array_equal(nested.take(np.arange(2))[0], x[train.rows[[2, 0]]].astype(np.float32))


def test_in_memory_datasets_behave_as_before():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((50, 3)), rng.integers(0, 3, 50)
    data = Dataset(x, y, 3, "arrays")
    assert data.x is x and data.y is y
    sub = data.subset(np.arange(10, 20)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(sub.x), x[10:20].astype(np.float32))
    np.testing.assert_array_equal(sub.take(np.array([0, 9]))[1], y[[10, 19]])
    assert len(data.subset(x[:, 0] > 0)) == int((x[:, 0] > 0).sum())
    with pytest.raises(UserError, match="values exceed the range of float32"):
        Dataset(np.full((2, 2), 1e300), np.zeros(2, dtype=np.int64), 2, "big").astype(np.float32)


def test_big_integers_are_converted_through_float64_as_before(tmp_path):
    """int64 features were read as float64, then cast to the run's dtype: two roundings, kept."""
    x = np.array([[2**60 + 2**36 + 1], [3]], dtype=np.int64)  # float32 of it differs from float32(float64(it))
    assert np.float32(x[0, 0]) != np.float32(np.float64(x[0, 0]))
    np.savez(tmp_path / "ints.npz", x=x, y=np.array([0, 1]))
    data = load_npz(str(tmp_path / "ints.npz")).astype(np.float32)
    assert data.take(np.array([0]))[0][0, 0] == np.float32(np.float64(x[0, 0]))


@pytest.mark.parametrize("where", ["npz", "folder"])
def test_object_arrays_are_refused_without_unpickling(tmp_path, where):
    x = np.empty((2, 2), dtype=object)
    x[:] = 1.0
    if where == "npz":
        path = tmp_path / "objects.npz"
        np.savez(path, x=x, y=np.array([0, 1]))
    else:
        path = npy_folder(tmp_path / "objects", x, np.array([0, 1]))
    with pytest.raises(UserError, match=str(path)) as info:
        load_npz(str(path))
    assert "\n" not in str(info.value)


def test_corrupted_uncompressed_npz_is_refused(tmp_path):
    """Mapping skips zipfile's read, so the CRC-32 is checked by chunks instead."""
    path = tmp_path / "flipped.npz"
    np.savez(path, x=np.ones((100, 4)), y=np.zeros(100, dtype=np.int64))
    raw = bytearray(path.read_bytes())
    raw[600] ^= 1  # a byte of x's data
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="Bad CRC-32"):
        load_npz(str(path))


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a folder without x.npy and y.npy"),
    (lambda p: (p.mkdir(), np.save(p / "x.npy", np.ones((2, 2)))), "no array named 'y'"),
    (lambda p: np.save(p, np.ones((2, 2))), "is one .npy array"),
])
def test_folder_and_npy_mistakes_name_the_path(tmp_path, make, message):
    path = tmp_path / "data.npy"
    make(path)
    with pytest.raises(UserError, match=str(path)) as info:
        load_npz(str(path))
    assert message in str(info.value)


def test_nan_is_found_by_the_chunked_scan(tmp_path, monkeypatch):
    import dptrain.data.dataset

    monkeypatch.setattr(dptrain.data.dataset, "CHUNK_BYTES", 64)  # many chunks: the NaN is in a late one
    x, y = arrays()
    x[297, 3] = np.nan
    folder = npy_folder(tmp_path / "nan", x, y)
    with pytest.raises(UserError, match=r"row 297 \(counting from 0\) contains NaN or infinity"):
        load_npz(str(folder))
    x = x.astype(np.float64)
    x[297, 3] = 1e300
    np.savez(tmp_path / "big.npz", x=x, y=y)
    data = load_npz(str(tmp_path / "big.npz"))
    with pytest.raises(UserError, match="values exceed the range of float32"):
        data.subset(np.arange(290, 300)).astype(np.float32)
    data.subset(np.arange(290)).astype(np.float32)  # rows of the split without it are fine


# ---------------------------------------------------------------------------------------------
# Training on a mapped file = training on the same data in memory, bit for bit


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("regression", [False, True])
def test_training_on_a_mapped_file_equals_training_in_memory(tmp_path, dtype, regression):
    x, y = arrays(regression=regression)
    np.savez(tmp_path / "mapped.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "in_memory.npz", x=x, y=y)
    npy_folder(tmp_path / "folder", x, y)
    loss = "mse" if regression else "cross_entropy"
    weights = {}
    for source in ("in_memory.npz", "mapped.npz", "folder"):
        out = tmp_path / f"run-{source}"
        result = invoke("train", "--out", str(out), *FAST, "--set", "data.name=npz",  # in this process: fast
                        "--set", f"data.path={tmp_path / source}", "--set", f"train.dtype={dtype}",
                        "--set", f"train.loss={loss}")
        assert result.exit_code == 0, result.output
        weights[source] = load_arrays(out / "checkpoints" / "latest" / "model.npz")
    assert is_mapped(load_npz(str(tmp_path / "mapped.npz")).base_x)
    for source in ("mapped.npz", "folder"):
        for name, array in weights["in_memory.npz"].items():
            assert weights[source][name].tobytes() == array.tobytes(), f"{source}: {name} differs"


# ---------------------------------------------------------------------------------------------
# Memory: 1 GiB of float32 features, 4 ranks on one node

N_ROWS, N_FEATURES = 262144, 1024  # float32: exactly 1 GiB of x
LIMIT_MB = 400


def write_big_npz(path: Path) -> None:
    """An uncompressed .npz like np.savez writes, x written 32 MiB at a time."""
    rng = np.random.default_rng(0)
    block = 8192
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as member:
            header = {"descr": npy_format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (N_ROWS, N_FEATURES)}
            npy_format.write_array_header_1_0(member, header)
            for _ in range(N_ROWS // block):
                member.write(rng.standard_normal((block, N_FEATURES), dtype=np.float32).tobytes())
        with zf.open("y.npy", "w", force_zip64=True) as member:
            npy_format.write_array(member, rng.integers(0, 10, N_ROWS))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:  # gone, or not ours
        return b""


def find_ranks(marker: str) -> dict[int, int]:
    """{MPI rank: pid} of the processes whose command line holds ``marker``."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or marker.encode() not in _read(f"/proc/{entry}/cmdline"):
            continue
        env = dict(item.split(b"=", 1) for item in _read(f"/proc/{entry}/environ").split(b"\0") if b"=" in item)
        rank = env.get(b"PMI_RANK", env.get(b"OMPI_COMM_WORLD_RANK"))
        if rank is not None:
            ranks[int(rank)] = int(entry)
    return ranks


def memory_kb(pid: int) -> dict[str, int]:
    """RssAnon (private anonymous resident memory) and RssFile (mapped file pages) of ``pid``."""
    fields = {}
    for line in _read(f"/proc/{pid}/status").decode().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def _free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 2**30


@needs_mpiexec
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_four_ranks_on_a_1gib_file_hold_no_private_copy(tmp_path):
    if _free_gb(tmp_path) < 3:
        pytest.skip(f"needs 3 GB free on the disk of {tmp_path}")
    path, out = tmp_path / "big.npz", tmp_path / "run-memory-test"
    try:
        t0 = time.perf_counter()
        write_big_npz(path)
        written = time.perf_counter() - t0
        assert path.stat().st_size >= 2**30
        argv = [MPIEXEC, "-n", "4", sys.executable, "-m", "dptrain", "train", "--out", str(out),
                "--set", "data.name=npz", "--set", f"data.path={path}", "--set", "model.hidden=[16]",
                "--set", "train.epochs=1", "--set", "train.batch_size=4096", "--set", "data.val_fraction=0.01",
                "--set", "checkpoint.every_epochs=0"]
        t1 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env())
        peak: dict[int, dict[str, int]] = {}
        pids: dict[int, int] = {}
        try:
            while proc.poll() is None:
                if len(pids) < 4:
                    pids.update(find_ranks(str(out)))
                for rank, pid in pids.items():
                    for key, kb in memory_kb(pid).items():
                        peak.setdefault(rank, {}).setdefault(key, 0)
                        peak[rank][key] = max(peak[rank][key], kb)
                if time.perf_counter() - t1 > 300:
                    raise AssertionError("the 4-rank run took more than 300 s")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            stdout, stderr = proc.communicate()
        ran = time.perf_counter() - t1
        assert proc.returncode == 0, stderr
        report = ", ".join(f"rank {r}: RssAnon {peak[r].get('RssAnon', 0) / 1024:.0f} MB, "
                           f"RssFile {peak[r].get('RssFile', 0) / 1024:.0f} MB" for r in sorted(peak))
        print(f"\n1 GiB file written in {written:.1f} s; 4 ranks trained 1 epoch in {ran:.1f} s; peaks: {report}")
        assert sorted(peak) == [0, 1, 2, 3], f"ranks seen: {sorted(peak)} (pids {pids})"
        for rank, fields in peak.items():
            assert fields["RssAnon"] < LIMIT_MB * 1024, f"rank {rank} held {fields['RssAnon'] / 1024:.0f} MB private"
        assert "259523 training / 2621 validation samples" in stdout and "done in" in stdout
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)


def test_in_memory_data_is_converted_once(monkeypatch):
    """converted(dtype): the values and errors of astype(dtype).in_memory(), each value converted once."""
    import dptrain.data.dataset

    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((60, 4)), rng.standard_normal((60, 2))
    data = Dataset(x, y, None, "arrays").subset(np.arange(5, 55))
    expected = data.astype(np.float32).in_memory()
    calls = []
    convert = dptrain.data.dataset._convert
    monkeypatch.setattr(dptrain.data.dataset, "_convert", lambda values, casts: calls.append(1) or convert(values, casts))
    done = data.converted(np.float32)
    assert len(calls) == 2  # x and y, once each
    assert done.dtype == np.float32 and not isinstance(done.x, np.memmap)
    np.testing.assert_array_equal(done.x, expected.x)
    np.testing.assert_array_equal(done.y, expected.y)
    big = Dataset(np.full((2, 2), 1e300), np.zeros(2, dtype=np.int64), 2, "big")
    for known_finite in (False, True):  # finite in float64 is no promise for float32
        big._finite = known_finite
        with pytest.raises(UserError, match="values exceed the range of float32"):
            big.converted(np.float32)


def test_a_mapped_file_stays_a_view_when_converted(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_npz(str(tmp_path / "d.npz"))
    done = data.converted(np.float64)
    assert is_mapped(done.base_x) and done.dtype == np.float64
    np.testing.assert_array_equal(done.take(np.arange(3))[0], x[:3].astype(np.float64))
