"""A built wheel works outside the source tree: the batch-job templates and the built-in configs ship
inside it (`dptrain launch --scheduler slurm --print`, `--config digits_cnn`, `dptrain config list`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import REPO, run

pytestmark = pytest.mark.slow  # builds a wheel and installs it


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a fresh venv holding dptrain installed from a wheel built from a clean copy of the
    sources (its dependencies are this environment's, added to the venv's path by a .pth file)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dptrain", src / "dptrain", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"),
                            str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("dptrain-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                          "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "dptrain_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return venv / "bin"


def test_the_wheel_holds_the_templates_and_configs(installed, tmp_path):
    where = run([str(installed / "python"), "-c", "import dptrain; print(dptrain.__file__)"], cwd=tmp_path)
    assert where.returncode == 0 and str(installed.parent) in where.stdout, where.stdout + where.stderr
    listed = run([str(installed / "dptrain"), "config", "list"], cwd=tmp_path)
    assert listed.returncode == 0 and "digits_cnn" in listed.stdout, listed.stderr


def test_launch_scheduler_print_from_a_wheel(installed, tmp_path):
    for scheduler, marker in (("slurm", "#SBATCH --nodes=2"), ("pbs", "#PBS -l select=2")):
        result = run([str(installed / "dptrain"), "launch", "--scheduler", scheduler, "--nodes", "2", "--ranks-per-node",
                      "4", "--time", "00:30:00", "--print", "--config", "digits_cnn", "--out", "runs/big"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert marker in result.stdout and "--resume auto" in result.stdout


def test_train_a_builtin_config_from_a_wheel(installed, tmp_path):
    result = run([str(installed / "dptrain"), "train", "--config", "digits_mlp", "--set", "train.epochs=2", "--quiet",
                  "--out", "run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest" / "model.npz").is_file()
