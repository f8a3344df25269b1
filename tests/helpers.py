"""Shared helpers for tests that run dptrain in subprocesses (single process and under mpiexec)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120  # seconds; a hang fails the test instead of freezing the suite


def find_mpiexec() -> str | None:
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        if os.access(here / name, os.X_OK):
            return str(here / name)
    return shutil.which("mpiexec") or shutil.which("mpirun")


MPIEXEC = find_mpiexec()
#: the marks of a test that runs mpiexec: `pytest -m "not mpi"` leaves it out (the fast loop)
MPI_MARKS = (pytest.mark.mpi, pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on this machine"))
#: set by conftest.py for each test: whether it carries the mpi mark (run() refuses mpiexec otherwise)
current_test_is_mpi = True


def needs_mpiexec(test):
    """Decorator of a test that runs mpiexec: marked ``mpi``, skipped where there is no mpiexec."""
    for mark in MPI_MARKS:
        test = mark(test)
    return test


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(argv: list[str], timeout: float = TIMEOUT, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    if argv and argv[0] == MPIEXEC and not current_test_is_mpi:
        raise AssertionError("this test runs mpiexec: decorate it with @needs_mpiexec (the mpi mark)")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=subprocess_env(**env))


def dptrain(*args: str, ranks: int | None = None, timeout: float = TIMEOUT, cwd: Path | None = None,
            **env: str) -> subprocess.CompletedProcess:
    """Run `dptrain ARGS` single-process (ranks=None) or under `mpiexec -n ranks`."""
    argv = [sys.executable, "-m", "dptrain", *args]
    if ranks is not None:
        argv = [MPIEXEC, "-n", str(ranks), *argv]
    return run(argv, timeout=timeout, cwd=cwd, **env)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def assert_arrays_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float = 1e-9) -> None:
    """For every array: max|a - b| / max|b| <= rtol."""
    assert a.keys() == b.keys()
    for name in b:
        scale = np.abs(b[name]).max()
        err = np.abs(a[name] - b[name]).max() / (scale if scale > 0 else 1.0)
        assert err <= rtol, f"{name}: relative difference {err:.3e} > {rtol}"


def invoke(*args, env: dict[str, str | None] | None = None, catch_exceptions: bool = False):
    """`dptrain ARGS` in this process (click's CliRunner); arguments may be paths or numbers."""
    from click.testing import CliRunner

    from dptrain.cli import main

    return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=catch_exceptions)


def without_dac_override(argv: list[str]) -> list[str]:
    """argv run so that file permissions hold: as root, without CAP_DAC_OVERRIDE (setpriv)."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: permissions cannot be enforced")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *argv]


def write_digit_images(root: Path, per_class: int | None = 20, size: int = 16, colour: bool = False,
                       first: int = 0) -> Path:
    """scikit-learn's digits as PNG files root/<digit>/<index>.png (examples/digits_to_images.py):
    ``per_class`` of each digit from sample ``first`` on (None: all), size x size, grey or tinted RGB."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_to_images", REPO / "examples" / "digits_to_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_digits(root, size, colour, per_class, first)
    return root


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str):
    """A real file system of ``size`` (e.g. "64k") mounted at ``mount_point`` (created), for faults such
    as a full disk or a read-only remount; the test is skipped where mounting is not allowed."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
